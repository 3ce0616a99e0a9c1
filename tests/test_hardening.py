"""The reproducers of issue 9 (hardening), each now an error or the right answer.

- the registered ops (torch.ops.gmpo_ext.*) check every tensor themselves:
  inconsistent shapes, dtypes, devices, buffers raise, naming the argument,
  before any pointer reaches C (and the C core checks each buffer's extent);
- forward_backward's outputs live on the inputs' device, whatever the default
  device is;
- in-place logits gradients never go into overlapping or aliased logits;
- neg views (``z.conj().imag``) are read with their sign;
- (B, 1) is_weights mean one weight per row in the kernels and the reference;
- a CUDA build that the driver cannot run is refused with the three versions.
"""

from __future__ import annotations

import pytest
import torch

import gmpo_ext
from gmpo_ext import _backend
from gmpo_ext.reference import gmpo_loss_reference

from _helpers import make_case

ops = torch.ops.gmpo_ext
B, T, V = 3, 5, 11
ERRORS = (TypeError, ValueError, IndexError, RuntimeError)
# algo, convention, loss_type, eps_low, eps_high, beta, clamp, normalizer, denom
OPTS = (0, 0, 0, 0.4, 0.4, 0.0, 0.0, 1.0, 0.0)


def _loss_inputs(seed=0):
    c = make_case(B, T, seed=seed)
    return c.logps, c.old_logps, c.advantages, c.mask


def _raises_naming(name, fn, *args):
    with pytest.raises(ERRORS) as info:
        fn(*args)
    assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"
    return str(info.value)


# ----------------------------------------------------------------------------
# raw loss ops

LOSS_FWD_BAD = {
    "old_logps-rows": ("old_logps", lambda lp, o, a, m: (lp, o[:2], a, m, None, None)),
    "old_logps-tokens": ("old_logps", lambda lp, o, a, m: (lp, o[:, :1], a, m, None, None)),
    "mask-short": ("mask", lambda lp, o, a, m: (lp, o, a, m[:1], None, None)),
    "advantages-short": ("advantages", lambda lp, o, a, m: (lp, o, a[:1], m, None, None)),
    "advantages-3d": ("advantages", lambda lp, o, a, m: (lp, o, a[:, None, None], m, None, None)),
    "ref_logps-short": ("ref_logps", lambda lp, o, a, m: (lp, o, a, m, o[:1], None)),
    "is_weights-short": ("is_weights", lambda lp, o, a, m: (lp, o, a, m, None, a[:2])),
    "logps-1d": ("logps", lambda lp, o, a, m: (lp[0], o, a, m, None, None)),
    "mask-meta": ("mask", lambda lp, o, a, m: (lp, o, a, m.to("meta"), None, None)),
    "old_logps-int": ("old_logps", lambda lp, o, a, m: (lp, o.to(torch.int32), a, m, None, None)),
    "logps-sparse": ("logps", lambda lp, o, a, m: (lp.to_sparse(), o, a, m, None, None)),
}


_probe = {}


def _torch_reads_storages_first():
    """Whether torch's custom_op wrapper takes every input's untyped_storage()
    before the kernel runs (torch 2.4: a sparse input then raises torch's
    NotImplementedError before the op's own checks; 2.13 checks aliasing after
    the kernel). Found out once with a throwaway op whose kernel raises."""
    if "first" not in _probe:
        # the schema spelled out: this module's annotations are strings, which
        # torch 2.4's schema inference rejects
        @torch.library.custom_op("gmpo_ext_tests::storage_probe", mutates_args=(),
                                 schema="(Tensor x) -> Tensor")
        def probe(x):
            raise ValueError("reached the kernel")

        try:
            probe(torch.zeros(2, 2).to_sparse())
        except ValueError:
            _probe["first"] = False
        except NotImplementedError:
            _probe["first"] = True
    return _probe["first"]


@pytest.mark.parametrize("case", list(LOSS_FWD_BAD))
def test_loss_fwd_op_checks_its_tensors(case):
    name, make = LOSS_FWD_BAD[case]
    if case.endswith("-sparse") and _torch_reads_storages_first():
        # still an error before any pointer reaches C, but torch's, not naming the argument
        with pytest.raises(NotImplementedError, match="storage"):
            ops.loss_fwd(*make(*_loss_inputs()), *OPTS)
        pytest.skip(f"torch {torch.__version__}: custom_op reads the inputs' storages before the "
                    "kernel, so a sparse tensor raises torch's NotImplementedError, not the op's "
                    "own error naming the argument")
    _raises_naming(name, ops.loss_fwd, *make(*_loss_inputs()), *OPTS)


def test_loss_fwd_op_needs_ref_logps_for_kl():
    lp, o, a, m = _loss_inputs()
    opts = list(OPTS)
    opts[5] = 0.1
    _raises_naming("ref_logps", ops.loss_fwd, lp, o, a, m, None, None, *opts)


def _bwd_args(rows=None, grad_loss=None, **over):
    lp, o, a, m = _loss_inputs()
    _, _, good_rows = ops.loss_fwd(lp, o, a, m, None, None, *OPTS)
    args = dict(grad_loss=torch.ones(()) if grad_loss is None else grad_loss,
                rows=good_rows if rows is None else rows, logps=lp, old_logps=o, advantages=a,
                mask=m, ref_logps=None, is_weights=None)
    args.update(over)
    return list(args.values()) + list(OPTS)


LOSS_BWD_BAD = {
    "rows-short": ("rows", dict(rows=torch.zeros(B, _backend.ROW_STATS, dtype=torch.float64))),
    "rows-one": ("rows", dict(rows=torch.zeros(1, 1, dtype=torch.float64))),
    "rows-float32": ("rows", dict(rows=torch.zeros(B + 1, _backend.ROW_STATS))),
    "rows-strided": ("rows", dict(rows=torch.zeros(B + 1, 2 * _backend.ROW_STATS,
                                                   dtype=torch.float64)[:, ::2])),
    "grad_loss-empty": ("grad_loss", dict(grad_loss=torch.ones(0))),
    "grad_loss-many": ("grad_loss", dict(grad_loss=torch.ones(4))),
    "old_logps-short": ("old_logps", dict(old_logps=torch.zeros(B - 1, T))),
    "mask-short": ("mask", dict(mask=torch.ones(B, T - 1, dtype=torch.bool))),
}


@pytest.mark.parametrize("case", list(LOSS_BWD_BAD))
def test_loss_bwd_op_checks_its_tensors(case):
    name, over = LOSS_BWD_BAD[case]
    _raises_naming(name, ops.loss_bwd, *_bwd_args(**over))


def test_loss_ops_are_right_on_good_input():
    lp, o, a, m = _loss_inputs()
    loss, metrics, rows = ops.loss_fwd(lp, o, a, m, None, None, *OPTS)
    grad = ops.loss_bwd(torch.tensor(2.0), rows, lp, o, a, m, None, None, *OPTS)
    x = lp.double().requires_grad_(True)
    want, _ = gmpo_loss_reference(x, o.double(), a.double(), m)
    (2 * want).backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# raw logits ops

def _logits_inputs(seed=0, TL=T + 1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, TL, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    return logits, ids, mask


LOGITS_FWD_BAD = {
    # the outputs were sized from ids, the kernel walked the logits' rows: heap corruption
    "ids-fewer-rows": ("logits", lambda z, i, m: (z, i[:1], m[:1])),
    "ids-1x1": ("logits", lambda z, i, m: (z, i[:1, :1], None)),
    "mask-short": ("mask", lambda z, i, m: (z, i, m[:, :2])),
    "ids-float": ("ids", lambda z, i, m: (z, i.float(), m)),
    "logits-int": ("logits", lambda z, i, m: (z.to(torch.int32), i, m)),
    "logits-2d": ("logits", lambda z, i, m: (z[0], i, m)),
    "logits-v-stride": ("logits", lambda z, i, m: (z[:, :, ::2], i % 6, m)),
    "ids-meta": ("ids", lambda z, i, m: (z, i.to("meta"), m)),
}


@pytest.mark.parametrize("case", list(LOGITS_FWD_BAD))
def test_logits_fwd_op_checks_its_tensors(case):
    name, make = LOGITS_FWD_BAD[case]
    z, i, m = make(*_logits_inputs())
    _raises_naming(name, ops.logits_fwd, z, i, m, 1.0, True, False)


def test_logits_fwd_id_error_quotes_only_input():
    z, ids, m = _logits_inputs()
    ids[1, 2] = V + 7
    msg = _raises_naming("ids", ops.logits_fwd, z, ids, None, 1.0, False, False)
    assert str(V + 7) in msg and "[1, 2]" in msg


def _saved(z, ids, m):
    logp, ent, lse = ops.logits_fwd(z, ids, m, 1.0, True, False)
    return logp, ent, lse


LOGITS_BWD_BAD = {
    "lse-short": ("lse", lambda z, i, m, g, e, lse: dict(lse=lse[:1])),
    "lse-float64": ("lse", lambda z, i, m, g, e, lse: dict(lse=lse.double())),
    "lse-transposed": ("lse", lambda z, i, m, g, e, lse: dict(lse=torch.zeros(T, B).t())),
    "entropy-short": ("entropy", lambda z, i, m, g, e, lse: dict(entropy=e[:, :1])),
    "grad_logp-short": ("grad_logp", lambda z, i, m, g, e, lse: dict(grad_logp=g[:1])),
    "grad_entropy-short": ("grad_entropy", lambda z, i, m, g, e, lse: dict(grad_entropy=g[:, :2])),
    "grad_logp-int": ("grad_logp", lambda z, i, m, g, e, lse: dict(grad_logp=g.to(torch.int64))),
    "ids-short": ("logits", lambda z, i, m, g, e, lse: dict(ids=i[:1], mask=None)),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("case", list(LOGITS_BWD_BAD))
def test_logits_bwd_ops_check_their_tensors(case, inplace):
    name, make = LOGITS_BWD_BAD[case]
    z, ids, m = _logits_inputs()
    _, ent, lse = _saved(z, ids, m)
    g = torch.randn(B, T)
    a = dict(grad_logp=g, grad_entropy=g.clone(), logits=z, ids=ids, mask=m, lse=lse, entropy=ent)
    a.update(make(z, ids, m, g, ent, lse))
    before = z.clone()
    if inplace:
        _raises_naming(name, ops.logits_bwd_, a["logits"], a["grad_logp"], a["grad_entropy"],
                       a["ids"], a["mask"], a["lse"], a["entropy"], 1.0)
        assert torch.equal(z, before), "logits written before the error"
    else:
        _raises_naming(name, ops.logits_bwd, a["grad_logp"], a["grad_entropy"], a["logits"],
                       a["ids"], a["mask"], a["lse"], a["entropy"], 1.0)


def test_logits_bwd_inplace_refuses_overlap_and_aliases():
    z, ids, m = _logits_inputs()
    _, ent, lse = _saved(z, ids, m)
    g = torch.randn(B, T)
    row = torch.randn(1, T + 1, V)
    for bad in (row.expand(B, T + 1, V), torch.randn(B * V + 5).as_strided((B, T + 1, V), (V, 1, 1))):
        _raises_naming("overlap", ops.logits_bwd_, bad, g, None, ids, m, lse, ent, 1.0)
    # a float mask that is a view of the logits: writing the gradient would change it
    zz = z.clone()
    fmask = zz[:, :T, 0]
    _raises_naming("memory", ops.logits_bwd_, zz, g, None, ids, fmask, lse, ent, 1.0)


# ----------------------------------------------------------------------------
# public paths: overlap, neg views, default device

@pytest.mark.parametrize("kind", ["expand", "as_strided"])
def test_inplace_backward_with_overlapping_logits_falls_back(kind):
    """Rows that share memory (3x5x11 case of the issue): the in-place request is
    served out of place, so the gradient equals the out-of-place one."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, T), generator=g)
    old = -torch.rand(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    grads = []
    for inplace in (False, True):
        base = torch.randn(1, T, V, generator=torch.Generator().manual_seed(4)) if kind == "expand" \
            else torch.randn(2 * V + T * V, generator=torch.Generator().manual_seed(4))
        leaf = base.clone().requires_grad_(True)
        z = leaf.expand(B, T, V) if kind == "expand" else leaf.as_strided((B, T, V), (V, V, 1))
        loss = gmpo_ext.gmpo_loss_from_logits(z, ids, old, adv, mask, inplace_backward=inplace)
        loss.backward()
        grads.append(leaf.grad)
        assert torch.equal(leaf.detach(), base), "the logits were overwritten"
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_neg_views_are_read_with_their_sign():
    lp, o, a, m = _loss_inputs(seed=5)
    want = gmpo_ext.gmpo_loss(lp, o, a, m)
    neg_lp = torch.complex(torch.zeros_like(lp), -lp).conj().imag   # == lp, neg bit set
    neg_a = torch.complex(torch.zeros_like(a), -a).conj().imag
    assert neg_lp.is_neg() and neg_a.is_neg()
    x = neg_lp.detach().requires_grad_(False)
    got = gmpo_ext.gmpo_loss(x, o, neg_a, m)
    assert torch.equal(got, want)
    # and through the raw op
    loss, _, _ = ops.loss_fwd(neg_lp, o, neg_a, m, None, None, *OPTS)
    assert torch.equal(loss, want)
    # the logits path
    z, ids, mask = _logits_inputs(seed=6, TL=T)
    neg_z = torch._neg_view(-z)   # unit stride on V (a complex tensor's .imag has stride 2)
    assert neg_z.is_neg()
    assert torch.equal(gmpo_ext.selective_logps(neg_z, ids), gmpo_ext.selective_logps(z, ids))


def test_neg_view_logits_inplace_gradient_is_right():
    z, ids, _ = _logits_inputs(seed=7, TL=T)
    old = -torch.rand(B, T)
    adv = torch.randn(B)
    mask = torch.ones(B, T)
    grads = []
    for neg in (False, True):
        leaf = z.clone().requires_grad_(True)
        x = torch._neg_view(-leaf) if neg else leaf * 1
        assert x.is_neg() == neg
        gmpo_ext.gmpo_loss_from_logits(x, ids, old, adv, mask, inplace_backward=True).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("default", ["meta", "cpu"])
def test_forward_backward_outputs_on_the_inputs_device(default):
    lp, o, a, m = _loss_inputs(seed=8)
    want_x = lp.clone().requires_grad_(True)
    want = gmpo_ext.gmpo_loss(want_x, o, a, m)
    want.backward()
    prev = torch.get_default_device()
    torch.set_default_device(default)
    try:
        x = lp.clone().requires_grad_(True)
        loss = gmpo_ext.gmpo_loss(x, o, a, m)
        loss.backward()
        out = _backend.forward_backward(0, lp, o, a, m, None, None, *OPTS[1:])
    finally:
        torch.set_default_device(prev)
    assert loss.device.type == "cpu" and x.grad.device.type == "cpu"
    assert torch.equal(loss, want) and torch.equal(x.grad, want_x.grad)
    assert all(t.device.type == "cpu" for t in out)


def test_meta_inputs_give_shapes_without_compute():
    lp, o, a, m = (t.to("meta") for t in _loss_inputs())
    loss, metrics = gmpo_ext.gmpo_loss(lp, o, a, m, return_metrics=True)
    assert loss.device.type == "meta" and loss.shape == ()
    assert all(v.device.type == "meta" for v in metrics.values())


# ----------------------------------------------------------------------------
# (B, 1) is_weights: one weight per row, everywhere

@pytest.mark.parametrize("convention", ["trl", "verl"])
@pytest.mark.parametrize("T_", [1, 6])
def test_is_weights_b1_is_per_row(convention, T_):
    g = torch.Generator().manual_seed(9)
    Bn = 4
    lp = -torch.rand(Bn, T_, generator=g, dtype=torch.float64)
    old = lp + 0.2 * torch.randn(Bn, T_, generator=g, dtype=torch.float64)
    adv = torch.randn(Bn, generator=g, dtype=torch.float64)
    mask = torch.rand(Bn, T_, generator=g, dtype=torch.float64) * 0.4   # sums below 1
    mask[2] = 0                                                          # an empty row
    w = torch.rand(Bn, 1, generator=g, dtype=torch.float64) + 0.5
    x = lp.clone().requires_grad_(True)
    got = gmpo_ext.gmpo_loss(x, old, adv, mask, convention=convention, is_weights=w)
    got.backward()
    per_row = gmpo_ext.gmpo_loss(lp, old, adv, mask, convention=convention, is_weights=w[:, 0])
    assert torch.equal(got.detach(), per_row)
    r = lp.clone().requires_grad_(True)
    want, _ = gmpo_loss_reference(r, old, adv, mask, convention=convention, is_weights=w)
    want.backward()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------
# CUDA build vs driver

def test_cuda_version_problem_names_the_three_versions():
    msg = _backend.cuda_version_problem(13000, 12040, "12.4")
    assert msg and "13.0" in msg and "12.4" in msg and "driver" in msg and "CUDA 12" in msg
    assert "no driver" in _backend.cuda_version_problem(13000, 0, "12.8")
    # same major (minor version compatibility), newer driver, no CUDA build: fine
    assert _backend.cuda_version_problem(13000, 13000, "13.0") is None
    assert _backend.cuda_version_problem(12080, 12020, "12.1") is None
    assert _backend.cuda_version_problem(12080, 13010, "12.8") is None
    assert _backend.cuda_version_problem(0, 0, None) is None


def test_cuda_versions_reported():
    v = gmpo_ext._C.cuda_versions()
    if not gmpo_ext.WITH_CUDA:
        assert v is None
    else:
        built, runtime, driver = v
        assert built >= 11000 and runtime >= 11000 and driver >= 0
