"""The fused path from logits: gmpo_loss_from_logits and selective_logps against
a float64 reference (log_softmax + gather in float64, then
gmpo_ext.reference.gmpo_loss_reference), on strided views, both temperatures,
every logits dtype, odd vocabularies, both conventions; masked tokens, the
ignored last position, in-place backward, bad ids, the entropy metric, 64-bit
indexing, opcheck and torch.compile.

GMPO: Geometric-Mean Policy Optimization, arXiv 2507.20673. Every test runs on
each backend of conftest.BACKENDS (the C kernels; the CUDA kernels under the
SIMT emulation or on a GPU when listed).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch

import gmpo_ext
from gmpo_ext import logits as glog
from gmpo_ext.reference import gmpo_loss_reference

from _helpers import assert_close_metrics

pytestmark = pytest.mark.usefixtures("backend")

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
LAYOUTS = ["aligned", "tplus1", "strided"]
UPSTREAM = 0.37


@dataclass(frozen=True)
class Tol:
    logp: float   # |logp - ref| <= logp * (1 + |ref|): fp32 arithmetic on exact inputs
    grad_rel: float    # per element, relative to the element (the output dtype's rounding)
    grad_scale: float  # per element, relative to max |grad_ref|
    grad_floor: float = 0.0


# Why: the kernels read bf16/fp16 logits exactly and compute in fp32 for every
# dtype, so logp, lse and entropy carry fp32 error only: sums of up to ~50 000
# terms in fp32 lanes within chunks of 2048 and fp32 across chunks, and an exp
# within 1 ulp: ~1e-7 relative measured, 2e-6 leaves margin (1e-5 for the
# loss, which also carries the loss kernel's tolerance). The gradient is
# written in the logits' dtype: half an ulp of it per element (2^-8 bf16,
# 2^-11 fp16; fp16 gradients below 2^-14 are subnormal, spacing 2^-24).
TOLS = {
    torch.float32: Tol(logp=2e-6, grad_rel=1e-5, grad_scale=1e-6),
    torch.bfloat16: Tol(logp=2e-6, grad_rel=2.0 ** -8 + 1e-5, grad_scale=1e-6),
    torch.float16: Tol(logp=2e-6, grad_rel=2.0 ** -11 + 1e-5, grad_scale=1e-6,
                       grad_floor=2.0 ** -24),
}


@pytest.fixture
def kernels(backend, device):
    """Every backend (C core, SIMT-emulated CUDA, real CUDA) has the logits
    kernels: a failure here is a failure, never a skip."""
    return backend


# ----------------------------------------------------------------------------
# inputs and the float64 reference

def make_logits(B, T, V, dtype, layout, seed=0, scale=2.0, device="cpu"):
    """(logits, ids): logits of the given layout, ids (B, T).

    aligned: (B, T, V) contiguous; tplus1: (B, T + 1, V) contiguous (the last
    position is ignored); strided: a (B, T + 1, V) view of a larger tensor with
    a non-contiguous batch stride and an offset.
    """
    g = torch.Generator().manual_seed(seed)
    TL = T if layout == "aligned" else T + 1
    if layout == "strided":
        big = torch.randn(2 * B, T + 3, V, generator=g) * scale
        z = big.to(dtype).to(device)[::2, 1:T + 2]
        assert not z.is_contiguous() and z.stride(2) == 1
    else:
        z = (torch.randn(B, TL, V, generator=g) * scale).to(dtype).to(device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    return z, ids


def ref_logps(z, ids, temperature):
    """(logp, entropy) in float64 from the same (rounded) logits: log_softmax + gather."""
    T = ids.shape[1]
    x = z[:, :T].to(F64) / temperature
    lsm = torch.log_softmax(x, -1)
    logp = lsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return logp, ent


def make_loss_inputs(logp_ref, seed=1, tail=True):
    """old_logps (log-ratios N(0, 0.3) around the true logps), advantages of both
    signs with one exact 0, a mask with zeroed tails and one empty row."""
    g = torch.Generator().manual_seed(seed)
    B, T = logp_ref.shape
    old = (logp_ref - 0.3 * torch.randn(B, T, generator=g, dtype=F64)).to(torch.float32)
    adv = torch.randn(B, generator=g)
    if B >= 2:
        adv[0] = adv[0].abs() + 0.1
        adv[1] = -adv[1].abs() - 0.1
    if B >= 4:
        adv[3] = 0.0
    lengths = torch.randint(1, T + 1, (B,), generator=g) if tail else torch.full((B,), T)
    if B >= 3:
        lengths[2] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return old, adv, mask


def reference_step(z, ids, old, adv, mask, temperature, **kw):
    """float64 loss, metrics (with entropy) and d(loss * UPSTREAM)/d logits."""
    z64 = z.detach().to(F64).requires_grad_(True)
    logp, ent = ref_logps(z64, ids, temperature)
    loss, metrics = gmpo_loss_reference(logp, old, adv, mask, **kw)
    (loss * UPSTREAM).backward()
    m = mask.to(F64)
    metrics["entropy"] = (ent.detach() * m).sum() / m.sum().clamp(min=1.0)
    metrics["gmpo/invalid_ids"] = torch.zeros((), dtype=F64)
    return loss.detach(), metrics, z64.grad


def fused_step(z, ids, old, adv, mask, temperature, inplace_backward=False, **kw):
    leaf = z.detach().clone() if not inplace_backward else z.detach()
    leaf.requires_grad_(True)
    dev = z.device
    loss, metrics = gmpo_ext.gmpo_loss_from_logits(
        leaf, ids, old.to(dev), adv.to(dev), mask.to(dev), temperature=temperature,
        inplace_backward=inplace_backward, return_metrics=True, **kw)
    (grad,) = torch.autograd.grad(loss * UPSTREAM, leaf)
    return loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}, grad, leaf


def assert_close(got, ref, tol, what):
    got = got.detach().cpu().to(F64)
    err = (got - ref).abs()
    bound = tol * (1 + ref.abs())
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} out of tolerance; first "
                             f"at {i}: got {float(got.flatten()[i])!r}, reference "
                             f"{float(ref.flatten()[i])!r}")


def assert_grad_close(got, ref, dtype, what="grad"):
    tol = TOLS[dtype]
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    g64 = got.detach().cpu().to(F64)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    bound = tol.grad_rel * ref.abs() + tol.grad_scale * scale + tol.grad_floor
    bad = ~((g64 - ref).abs() <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements out of "
                             f"tolerance; first at flat index {i}: got {float(g64.flatten()[i])!r}, "
                             f"reference {float(ref.flatten()[i])!r}")


def zero_rows(grad, ids, mask):
    """Positions that must have exactly zero gradient rows: masked tokens and the
    ignored last position."""
    B, TL, V = grad.shape
    T = ids.shape[1]
    rows = torch.zeros(B, TL, dtype=torch.bool)
    rows[:, :T] = mask.cpu() == 0
    rows[:, T:] = True
    return rows


# ----------------------------------------------------------------------------
# selective_logps

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("V", [1031, 50257])
def test_selective_logps_matches_reference(dtype, temperature, layout, V, device, kernels):
    B, T = (3, 5) if V > 10000 else (2, 37)
    z, ids = make_logits(B, T, V, dtype, layout, seed=V + T, device=device)
    logp, ent = gmpo_ext.selective_logps(z, ids, temperature, return_entropy=True)
    rlogp, rent = ref_logps(z.cpu(), ids.cpu(), temperature)
    assert logp.dtype == torch.float32 and logp.shape == (B, T)
    assert_close(logp, rlogp, TOLS[dtype].logp, "logp")
    assert_close(ent, rent, TOLS[dtype].logp, "entropy")
    alone = gmpo_ext.selective_logps(z, ids, temperature)   # without the entropy pass
    assert torch.equal(alone, logp)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_logps_gradient_with_entropy(dtype, temperature, device, kernels):
    """Differentiable in logp and in entropy: d/dx of G logp + Gh H."""
    B, T, V = 2, 9, 1031
    z, ids = make_logits(B, T, V, dtype, "tplus1", seed=3, device=device)
    g = torch.Generator().manual_seed(4)
    G = torch.randn(B, T, generator=g, dtype=F64)
    Gh = torch.randn(B, T, generator=g, dtype=F64)
    leaf = z.detach().clone().requires_grad_(True)
    logp, ent = gmpo_ext.selective_logps(leaf, ids, temperature, return_entropy=True)
    (logp * G.float().to(device) + ent * Gh.float().to(device)).sum().backward()
    z64 = z.detach().cpu().to(F64).requires_grad_(True)
    rlogp, rent = ref_logps(z64, ids.cpu(), temperature)
    (rlogp * G + rent * Gh).sum().backward()
    assert_grad_close(leaf.grad, z64.grad, dtype)
    assert (leaf.grad[:, T] == 0).all(), "the ignored last position must get a zero gradient row"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_edge_ids_at_chunk_boundaries(dtype, device, kernels):
    """Ids at 0, V - 1 and around multiples of the kernels' chunk and block sizes."""
    V = 50257
    edge = [0, 1, 255, 256, 1023, 1024, 2047, 2048, 2049, 4095, 4096, 8192, V - 2, V - 1]
    z, _ = make_logits(1, len(edge), V, dtype, "tplus1", seed=7, device=device)
    ids = torch.tensor([edge], device=device)
    leaf = z.detach().clone().requires_grad_(True)
    lp = gmpo_ext.selective_logps(leaf, ids, 0.7)
    G = torch.linspace(-1.0, 1.0, len(edge), dtype=F64)[None]
    (lp * G.float().to(device)).sum().backward()
    z64 = z.detach().cpu().to(F64).requires_grad_(True)
    rlogp, _ = ref_logps(z64, ids.cpu(), 0.7)
    (rlogp * G).sum().backward()
    assert_close(lp, rlogp.detach(), 2e-6, "logp")
    assert_grad_close(leaf.grad, z64.grad, dtype)


def test_selective_logps_flat_int32_and_mask(device, kernels):
    V = 1031
    z, ids = make_logits(1, 40, V, torch.float32, "aligned", seed=5, device=device)
    flat = gmpo_ext.selective_logps(z[0], ids[0].to(torch.int32), 0.7)
    assert flat.shape == (40,)
    rlogp, _ = ref_logps(z.cpu(), ids.cpu(), 0.7)
    assert_close(flat, rlogp[0], 2e-6, "flat logp")
    mask = torch.arange(40, device=device)[None] < 25
    bad_ids = ids.clone()
    bad_ids[0, 30] = -100                      # padding label: not read where masked
    lp = gmpo_ext.selective_logps(z, bad_ids, 0.7, mask=mask)
    assert (lp[0, 25:] == 0).all()
    assert_close(lp[0, :25], rlogp[0, :25], 2e-6, "masked logp")


def test_selective_logps_no_grad_allocates_nothing_per_vocab(device, kernels):
    z, ids = make_logits(2, 8, 1031, torch.float32, "tplus1", device=device)
    with torch.no_grad():
        lp = gmpo_ext.selective_logps(z.requires_grad_(), ids)
    assert not lp.requires_grad


# ----------------------------------------------------------------------------
# gmpo_loss_from_logits against the reference

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("convention", ["trl", "verl"])
def test_loss_from_logits_matches_reference(dtype, temperature, layout, convention, device,
                                            kernels):
    B, T, V = 5, 23, 1031
    z, ids = make_logits(B, T, V, dtype, layout, seed=17, device=device)
    rlogp, _ = ref_logps(z.cpu(), ids.cpu(), temperature)
    old, adv, mask = make_loss_inputs(rlogp)
    loss, metrics, grad, _ = fused_step(z, ids, old, adv, mask, temperature,
                                        convention=convention)
    rloss, rmetrics, rgrad = reference_step(z.cpu(), ids.cpu(), old, adv, mask, temperature,
                                            convention=convention)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(float(loss) - float(rloss)) <= 1e-5 * (1 + abs(float(rloss))), (loss, rloss)
    assert_close_metrics(metrics, rmetrics, 1e-5)
    assert grad.shape == z.shape
    assert_grad_close(grad, rgrad, dtype)
    zr = zero_rows(grad, ids, mask)
    assert (grad.cpu()[zr] == 0).all(), "masked tokens and the last position get zero rows"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_loss_from_logits_options(dtype, device, kernels):
    """The options of gmpo_loss pass through: beta + ref_logps, is_weights,
    per-token advantages, float mask, clamp, normalizer, asymmetric epsilons."""
    B, T, V = 4, 19, 1031
    z, ids = make_logits(B, T, V, dtype, "tplus1", seed=23, device=device)
    rlogp, _ = ref_logps(z.cpu(), ids.cpu(), 0.7)
    old, _, mask = make_loss_inputs(rlogp, seed=2)
    g = torch.Generator().manual_seed(9)
    adv = torch.randn(B, T, generator=g)
    fmask = mask.float() * (0.5 + torch.rand(B, T, generator=g))
    ref = (rlogp + 0.1 * torch.randn(B, T, generator=g, dtype=F64)).float()
    isw = torch.exp(0.2 * torch.randn(B, T, generator=g))
    kw = dict(epsilon_low=0.3, epsilon_high=0.5, beta=0.04, ref_logps=ref, is_weights=isw,
              convention="verl", log_ratio_clamp=20.0, normalizer=2.0)
    dkw = dict(kw, ref_logps=ref.to(device), is_weights=isw.to(device))
    loss, metrics, grad, _ = fused_step(z, ids, old, adv.to(device), fmask, 0.7, **dkw)
    rloss, rmetrics, rgrad = reference_step(z.cpu(), ids.cpu(), old, adv, fmask, 0.7, **kw)
    assert abs(float(loss) - float(rloss)) <= 1e-5 * (1 + abs(float(rloss)))
    assert_close_metrics(metrics, rmetrics, 1e-5)
    assert_grad_close(grad, rgrad, dtype)


def test_every_gmpo_loss_option_is_accepted():
    """gmpo_loss_from_logits takes every keyword option gmpo_loss has."""
    ours = inspect.signature(gmpo_ext.gmpo_loss_from_logits).parameters
    theirs = inspect.signature(gmpo_ext.gmpo_loss).parameters
    kw_only = [n for n, p in theirs.items() if p.kind == p.KEYWORD_ONLY]
    missing = [n for n in kw_only if n not in ours]
    assert not missing, f"gmpo_loss_from_logits lacks options of gmpo_loss: {missing}"
    for n in kw_only:
        assert ours[n].default == theirs[n].default, n


@pytest.mark.parametrize("V", [1031, 50257])
def test_odd_vocab_bf16_loss(V, device, kernels):
    B, T = 3, 6
    z, ids = make_logits(B, T, V, torch.bfloat16, "tplus1", seed=V, device=device)
    rlogp, _ = ref_logps(z.cpu(), ids.cpu(), 1.0)
    old, adv, mask = make_loss_inputs(rlogp, seed=V)
    loss, metrics, grad, _ = fused_step(z, ids, old, adv, mask, 1.0)
    rloss, rmetrics, rgrad = reference_step(z.cpu(), ids.cpu(), old, adv, mask, 1.0)
    assert abs(float(loss) - float(rloss)) <= 1e-5 * (1 + abs(float(rloss)))
    assert_grad_close(grad, rgrad, torch.bfloat16)


# ----------------------------------------------------------------------------
# masked tokens, the last position, in-place backward

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_masked_rows_are_never_read(dtype, device, kernels):
    """NaN in the logits of masked tokens and of the ignored last position: the
    loss stays finite and those gradient rows are exactly zero."""
    B, T, V = 4, 11, 1031
    z, ids = make_logits(B, T, V, dtype, "tplus1", seed=31, device=device)
    rlogp, _ = ref_logps(z.cpu(), ids.cpu(), 1.0)
    old, adv, mask = make_loss_inputs(rlogp, seed=3)
    poisoned = z.clone()
    pm = torch.zeros(B, T + 1, dtype=torch.bool)
    pm[:, :T] = mask == 0
    pm[:, T] = True
    poisoned[pm.to(device)] = float("nan")
    loss, metrics, grad, _ = fused_step(poisoned, ids, old, adv, mask, 1.0)
    assert torch.isfinite(loss)
    assert float(metrics["gmpo/nonfinite_rows"]) == 0
    assert torch.isfinite(metrics["entropy"])
    assert (grad.cpu()[pm] == 0).all()
    assert torch.isfinite(grad).all()
    rloss, _, rgrad = reference_step(z.cpu(), ids.cpu(), old, adv, mask, 1.0)
    assert abs(float(loss) - float(rloss)) <= 1e-5 * (1 + abs(float(rloss)))
    assert_grad_close(grad, rgrad, dtype)


def test_nan_in_a_counted_row_propagates_and_neg_inf_logits_are_fine(device, kernels):
    B, T, V = 2, 5, 1031
    z, ids = make_logits(B, T, V, torch.float32, "aligned", seed=37, device=device)
    z[1, 2, 7] = float("nan")
    z[0, :, 100:200] = float("-inf")            # a vocabulary mask: softmax weight 0
    ids[0, :] = 5
    lp, ent = gmpo_ext.selective_logps(z, ids, return_entropy=True)
    assert torch.isnan(lp[1, 2]) and torch.isnan(ent[1, 2])
    assert torch.isfinite(lp[0]).all() and torch.isfinite(ent[0]).all()
    rlogp, rent = ref_logps(z[:1].cpu(), ids[:1].cpu(), 1.0)
    assert_close(lp[0], rlogp[0], 2e-6, "logp with -inf logits")
    rent = torch.where(torch.isnan(rent), torch.zeros_like(rent), rent)   # 0 * -inf in the oracle
    x = z[:1].cpu().double()
    p = torch.softmax(x, -1)
    rent = -(p * torch.where(p > 0, torch.log_softmax(x, -1), torch.zeros_like(x))).sum(-1)
    assert_close(ent[0], rent[0], 2e-6, "entropy with -inf logits")
    leaf = z[:1].clone().requires_grad_(True)
    lp0, ent0 = gmpo_ext.selective_logps(leaf, ids[:1], return_entropy=True)
    (lp0.sum() + ent0.sum()).backward()
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[0, :, 100:200] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["tplus1", "strided"])
def test_inplace_backward(dtype, layout, device, kernels):
    """The gradient lands in the logits' own buffer, equal to the out-of-place one."""
    B, T, V = 4, 13, 1031
    z, ids = make_logits(B, T, V, dtype, layout, seed=41, device=device)
    rlogp, _ = ref_logps(z.cpu(), ids.cpu(), 0.7)
    old, adv, mask = make_loss_inputs(rlogp, seed=4)
    loss0, m0, grad0, _ = fused_step(z, ids, old, adv, mask, 0.7)
    buf = z.clone() if layout != "strided" else z   # strided: a view into a larger tensor
    ptr = buf.data_ptr()
    loss1, m1, grad1, leaf = fused_step(buf, ids, old, adv, mask, 0.7, inplace_backward=True)
    assert float(loss1) == float(loss0)
    assert grad1.data_ptr() == ptr, "the gradient must be the logits' buffer"
    assert torch.equal(buf, grad0), "the logits' buffer must hold the gradient"
    assert torch.equal(grad1, grad0)


def test_inplace_backward_through_a_producer(device, kernels):
    """A non-leaf logits tensor (the output of an op whose backward does not need
    it): the gradient flows on to the producer's input."""
    B, T, V = 2, 7, 1031
    z, ids = make_logits(B, T, V, torch.float32, "tplus1", seed=43, device=device)
    rlogp, _ = ref_logps(z.cpu(), ids.cpu(), 1.0)
    old, adv, mask = make_loss_inputs(rlogp, seed=5)
    res = []
    for inplace in (False, True):
        base = z.detach().clone().requires_grad_(True)
        logits = base * 2.0                           # mul by a constant: saves nothing
        loss = gmpo_ext.gmpo_loss_from_logits(logits, ids, old.to(device), adv.to(device),
                                              mask.to(device), inplace_backward=inplace)
        loss.backward()
        res.append(base.grad)
    assert torch.equal(res[0], res[1])


def test_inplace_backward_refuses_a_logits_tensor_saved_elsewhere(device, kernels):
    """Another op that saved the logits for its backward: autograd notices the
    in-place overwrite instead of computing a wrong gradient."""
    B, T, V = 2, 5, 1031
    z, ids = make_logits(B, T, V, torch.float32, "aligned", seed=47, device=device)
    rlogp, _ = ref_logps(z.cpu(), ids.cpu(), 1.0)
    old, adv, mask = make_loss_inputs(rlogp, seed=6, tail=False)
    base = z.detach().clone().requires_grad_(True)
    logits = base * 1.0
    other = (logits ** 2).sum()                       # pow saves its input
    loss = gmpo_ext.gmpo_loss_from_logits(logits, ids, old.to(device), adv.to(device),
                                          mask.to(device), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + 1e-3 * other).backward()


# ----------------------------------------------------------------------------
# ids outside the vocabulary

def test_bad_ids(backend, device, kernels):
    B, T, V = 2, 6, 1031
    z, ids = make_logits(B, T, V, torch.float32, "tplus1", seed=53, device=device)
    rlogp, _ = ref_logps(z.cpu(), ids.cpu(), 1.0)
    old, adv, mask = make_loss_inputs(rlogp, seed=7, tail=False)
    bad = ids.clone()
    bad[1, 3] = V
    args = (z, bad, old.to(device), adv.to(device), mask.to(device))
    with pytest.raises(IndexError, match="completion_ids"):
        gmpo_ext.gmpo_loss_from_logits(*args, validate=True)
    with pytest.raises(IndexError, match="ids"):
        gmpo_ext.selective_logps(z, bad, validate=True)
    neg = ids.clone()
    neg[0, 0] = -1
    if backend == "c":   # the CPU kernels check before any compute
        with pytest.raises(IndexError, match=r"completion_ids: token id 1031 at \[1, 3\]"):
            gmpo_ext.gmpo_loss_from_logits(*args)
        with pytest.raises(IndexError, match=r"ids: token id -1 at \[0, 0\]"):
            gmpo_ext.selective_logps(z, neg)
    else:                # CUDA: no out-of-bounds read, the token is flagged
        loss, metrics = gmpo_ext.gmpo_loss_from_logits(*args, return_metrics=True)
        assert float(metrics["gmpo/invalid_ids"]) == 1
        assert float(metrics["gmpo/nonfinite_rows"]) == 1
        lp = gmpo_ext.selective_logps(z, neg)
        assert torch.isnan(lp[0, 0]) and torch.isfinite(lp.flatten()[1:]).all()
    # an out-of-range id under a zero mask is padding: fine everywhere
    m2 = mask.clone()
    m2[1, 3] = False
    loss, metrics = gmpo_ext.gmpo_loss_from_logits(z, bad, old.to(device), adv.to(device),
                                                   m2.to(device), validate=True,
                                                   return_metrics=True)
    assert torch.isfinite(loss) and float(metrics["gmpo/invalid_ids"]) == 0


# ----------------------------------------------------------------------------
# sizes: many rows, the largest vocabulary, 64-bit offsets

def test_more_than_65536_rows(device, kernels):
    B, T, V = 3, 23000, 8
    z, ids = make_logits(B, T, V, torch.float32, "aligned", seed=59, device=device)
    lp, ent = gmpo_ext.selective_logps(z, ids, 0.7, return_entropy=True)
    rlogp, rent = ref_logps(z.cpu(), ids.cpu(), 0.7)
    assert_close(lp, rlogp, 2e-6, "logp")
    assert_close(ent, rent, 2e-6, "entropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vocab_262144(dtype, device, kernels):
    B, T, V = 1, 3, 262144
    z, ids = make_logits(B, T, V, dtype, "tplus1", seed=61, scale=4.0, device=device)
    z[0, 1] += 40.0                              # a large offset: the max must be subtracted
    rlogp, _ = ref_logps(z.cpu(), ids.cpu(), 1.0)
    old, adv, mask = make_loss_inputs(rlogp, seed=8, tail=False)
    loss, metrics, grad, _ = fused_step(z, ids, old, adv, mask, 1.0)
    rloss, rmetrics, rgrad = reference_step(z.cpu(), ids.cpu(), old, adv, mask, 1.0)
    assert abs(float(loss) - float(rloss)) <= 1e-5 * (1 + abs(float(rloss)))
    assert_close_metrics(metrics, rmetrics, 1e-5)
    assert_grad_close(grad, rgrad, dtype)


@pytest.mark.slow
def test_64bit_offsets(device, kernels):
    """B*T*V beyond 2^31 elements: (1, 8201, 2^18) bf16 logits (4.3 GB, no
    copy), rows past element 2^31 checked against closed forms. Each counted
    row is all zeros but for a spike c at column j = its id, so logp = c -
    log(V - 1 + e^c); most rows are masked so the test stays fast, and the
    in-place backward keeps the memory at the logits alone."""
    T, V = 8200, 1 << 18
    try:
        z = torch.zeros(1, T + 1, V, dtype=torch.bfloat16, device=device)
    except RuntimeError:
        pytest.skip("not enough memory for 4.3 GB of logits")
    assert z.numel() > 2 ** 31
    rows = [0, 4095, 8191, 8192, 8195, 8199]      # 8192 * V = 2^31: the last four start beyond
    mask = torch.zeros(1, T, dtype=torch.bool)
    ids = torch.zeros(1, T, dtype=torch.long)
    spikes = {}
    for k, t in enumerate(rows):
        j = (t * 7919 + 13) % V
        c = float(2 + k)                          # exact in bf16
        z[0, t, j] = c
        z[0, t, (j + 1) % V] = -3.0
        ids[0, t] = j
        mask[0, t] = True
        spikes[t] = (j, c)
    leaf = z.requires_grad_(True)
    lp = gmpo_ext.selective_logps(leaf, ids.to(device), mask=mask.to(device),
                                  inplace_backward=True)
    w = torch.zeros(1, T)
    for k, t in enumerate(rows):
        w[0, t] = 1.0 + k
    (grad,) = torch.autograd.grad((lp * w.to(device)).sum(), leaf)
    assert grad.data_ptr() == z.data_ptr()
    for k, t in enumerate(rows):
        j, c = spikes[t]
        S = (V - 2) + torch.tensor(c, dtype=F64).exp() + torch.tensor(-3.0, dtype=F64).exp()
        ref = c - float(S.log())
        assert abs(float(lp[0, t]) - ref) <= 2e-6 * (1 + abs(ref)), (t, float(lp[0, t]), ref)
        # gradient: w (1[v == j] - p_v); bf16 rounding
        p_j = float(torch.tensor(c, dtype=F64).exp() / S)
        p_0 = float(1.0 / S)
        g = grad[0, t]
        assert abs(float(g[j]) - w[0, t].item() * (1 - p_j)) <= 2 ** -8 * abs(1 - p_j) * w[0, t].item()
        other = (j + 2) % V
        assert abs(float(g[other]) + w[0, t].item() * p_0) <= 2 ** -8 * p_0 * w[0, t].item()
        assert float(g.float().sum()) == pytest.approx(0.0, abs=1e-3 * w[0, t].item())
    assert (grad[0, 100] == 0).all() and (grad[0, T] == 0).all()


# ----------------------------------------------------------------------------
# torch.library: opcheck and torch.compile

def _op_inputs(device, dtype=torch.float32, requires_grad=True):
    B, T, V = 2, 5, 67
    z, ids = make_logits(B, T, V, dtype, "tplus1", seed=71, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[1, 3:] = False
    return z.detach().clone().requires_grad_(requires_grad), ids, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck_logits_fwd(dtype, device, kernels):
    z, ids, mask = _op_inputs(device, dtype)
    for args in ((z, ids, mask, 0.7, True, False), (z, ids, None, 1.0, False, False)):
        torch.library.opcheck(torch.ops.gmpo_ext.logits_fwd.default, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck_logits_bwd(dtype, device, kernels):
    z, ids, mask = _op_inputs(device, dtype, requires_grad=False)
    logp, ent, lse = torch.ops.gmpo_ext.logits_fwd(z, ids, mask, 0.7, True, False)
    g = torch.randn(logp.shape, device=device)
    gh = torch.randn(logp.shape, device=device)
    torch.library.opcheck(torch.ops.gmpo_ext.logits_bwd.default,
                          (g, gh, z, ids, mask, lse, ent, 0.7))
    torch.library.opcheck(torch.ops.gmpo_ext.logits_bwd.default,
                          (g, None, z, ids, mask, lse, ent, 0.7))
    torch.library.opcheck(torch.ops.gmpo_ext.logits_bwd_.default,
                          (z.clone(), g, gh, ids, mask, lse, ent, 0.7))


def _step(z, ids, old, adv, mask, inplace):
    loss, metrics = gmpo_ext.gmpo_loss_from_logits(z, ids, old, adv, mask, temperature=0.7,
                                                   inplace_backward=inplace,
                                                   return_metrics=True)
    return loss, metrics["entropy"]


# torch 2.4's AOTAutograd cannot trace a backward that writes into an input
# requiring grad (2.5 can); gmpo_ext then computes the gradient out of place
TORCH_MINOR = tuple(int(v) for v in torch.__version__.split(".")[:2])
OLD_AOT = TORCH_MINOR < (2, 5)


def _compile_case(device):
    """The inputs of the torch.compile tests and _step compiled with fullgraph."""
    B, T, V = 3, 9, 257
    z, ids = make_logits(B, T, V, torch.float32, "tplus1", seed=73, device=device)
    rlogp, _ = ref_logps(z.cpu(), ids.cpu(), 0.7)
    old, adv, mask = make_loss_inputs(rlogp, seed=9)
    old, adv, mask = old.to(device), adv.to(device), mask.to(device)
    torch._dynamo.reset()
    return z, ids, old, adv, mask, torch.compile(_step, fullgraph=True)


@pytest.mark.parametrize("inplace", [
    False,
    pytest.param(True, marks=pytest.mark.skipif(
        OLD_AOT, reason=f"torch {torch.__version__} < 2.5: AOTAutograd rejects a backward that "
        "mutates an input requiring grad, so the compiled gradient is out of place (checked by "
        "test_torch_compile_inplace_backward_out_of_place_before_2_5)")),
], ids=["out_of_place", "inplace"])
def test_torch_compile_fullgraph(inplace, device, kernels):
    z, ids, old, adv, mask, compiled = _compile_case(device)
    out = []
    for fn in (_step, compiled):
        leaf = z.detach().clone().requires_grad_(True)
        loss, ent = fn(leaf, ids, old, adv, mask, inplace)
        loss.backward()
        grad = leaf if inplace else leaf.grad
        out.append((loss.detach(), ent.detach(), grad.detach().clone()))
    (l0, e0, g0), (l1, e1, g1) = out
    assert torch.allclose(l0, l1, rtol=1e-6, atol=0)
    assert torch.allclose(e0, e1, rtol=1e-6, atol=0)
    assert torch.allclose(g0, g1, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not OLD_AOT, reason="torch >= 2.5 compiles the in-place backward "
                    "(test_torch_compile_fullgraph[inplace])")
def test_torch_compile_inplace_backward_out_of_place_before_2_5(device, kernels):
    """torch 2.4: inplace_backward=True under torch.compile(fullgraph=True)
    compiles, and its backward goes out of place: the logits keep their values
    and .grad holds eager's in-place gradient."""
    z, ids, old, adv, mask, compiled = _compile_case(device)
    leaf = z.detach().clone().requires_grad_(True)
    l0, e0 = _step(leaf, ids, old, adv, mask, True)
    l0.backward()
    g0 = leaf.detach().clone()          # eager: the gradient is in the logits' buffer
    assert not torch.equal(g0, z)
    leaf = z.detach().clone().requires_grad_(True)
    l1, e1 = compiled(leaf, ids, old, adv, mask, True)
    l1.backward()
    assert torch.equal(leaf.detach(), z), "the compiled backward wrote into the logits"
    assert torch.allclose(l0, l1, rtol=1e-6, atol=0)
    assert torch.allclose(e0, e1, rtol=1e-6, atol=0)
    assert torch.allclose(g0, leaf.grad, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------
# the CUDA kernels under the SIMT emulation built with ASan: no out-of-bounds
# access for odd vocabularies, misaligned rows, in-place backward and ids
# outside [0, V) (flagged as NaN, never used as an address)

_ASAN_SCRIPT = r"""
import importlib.util, sys
import torch, gmpo_ext
from gmpo_ext import _backend
spec = importlib.util.spec_from_file_location(sys.argv[2], sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
_backend.set_simt_module(mod)
torch.manual_seed(0)
n = 0
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for V in (1, 7, 33, 1031):
        for layout in ("aligned", "tplus1", "strided"):
            B, T = 2, 3
            if layout == "strided":   # odd element offset: rows not 16-byte aligned
                z = torch.randn(2 * B, T + 3, V + 1).to(dt)[::2, 1:T + 2, 1:]
            else:
                z = torch.randn(B, T + (layout != "aligned"), V).to(dt)
            ids = torch.randint(0, V, (B, T))
            ids[0, 0] = V + 5
            ids[1, 1] = -3
            for inplace in (False, True):
                leaf = z.detach().clone() if layout != "strided" else z.detach()
                leaf.requires_grad_(True)
                lp, ent = gmpo_ext.selective_logps(leaf, ids, 0.7, True, inplace_backward=inplace)
                assert torch.isnan(lp[0, 0]) and torch.isnan(lp[1, 1])
                torch.autograd.grad((torch.nan_to_num(lp) + ent).sum(), leaf)
                n += 1
print("logits asan ok", n)
"""


@pytest.mark.slow
@pytest.mark.simt
def test_simt_asan_no_out_of_bounds(backend, tmp_path):
    if backend == "cuda":
        pytest.skip("the SIMT emulation check runs on CPU backends")
    import subprocess
    import sys

    import simt_backend
    so = simt_backend.build_simt_module(sanitize="asan")
    script = tmp_path / "asan_logits.py"
    script.write_text(_ASAN_SCRIPT)
    env = simt_backend.simt_build.sanitizer_env("asan", preload=True)
    proc = subprocess.run([sys.executable, str(script), str(so), simt_backend.MODULE_NAME],
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "logits asan ok 72" in proc.stdout, out[-6000:]
    for marker in simt_backend.simt_build.SANITIZER_MARKERS:
        assert marker not in out, out[-6000:]
