"""Bad input gets a clear exception that names the argument, never a crash or a
silent wrong answer; the C module itself rejects bad arguments with ValueError;
large shapes (70 000 tokens in a row, 70 000 rows) work and match the oracle."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import gmpo_ext
from gmpo_ext import _backend
from gmpo_ext.reference import gmpo_loss_reference, grpo_loss_reference

from _helpers import check_parity, make_case

B, T = 3, 5


def _base():
    c = make_case(B, T, seed=1, ref=True)
    return dict(logps=c.logps, old_logps=c.old_logps, advantages=c.advantages, mask=c.mask,
                ref=c.ref_logps)


def _call(fn, **over):
    a = _base()
    args = [over.pop(k, a[k]) for k in ("logps", "old_logps", "advantages", "mask")]
    return fn(*args, **over)


def _names(name):
    """A regex matching `name` as a whole identifier (so 'logps' does not match 'old_logps')."""
    return re.compile(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])")


def _raises(name, fn, **over):
    with pytest.raises((TypeError, ValueError)) as info:
        _call(fn, **over)
    msg = str(info.value)
    assert _names(name).search(msg), f"message does not name {name!r}: {msg!r}"
    return msg


FNS = [gmpo_ext.gmpo_loss, gmpo_ext.grpo_loss]
FN_IDS = ["gmpo", "grpo"]
meta = torch.device("meta")

BAD_TENSORS = {
    # wrong shapes
    "logps-1d": ("logps", dict(logps=torch.zeros(T))),
    "logps-3d": ("logps", dict(logps=torch.zeros(B, T, 1))),
    "old_logps-shape": ("old_logps", dict(old_logps=torch.zeros(B, T - 1))),
    "old_logps-transposed": ("old_logps", dict(old_logps=torch.zeros(T, B))),
    "advantages-rows": ("advantages", dict(advantages=torch.zeros(B + 1))),
    "advantages-B-T+1": ("advantages", dict(advantages=torch.zeros(B, T + 1))),
    "advantages-3d": ("advantages", dict(advantages=torch.zeros(B, T, 1))),
    "mask-1d": ("mask", dict(mask=torch.ones(T, dtype=torch.bool))),
    "mask-shape": ("mask", dict(mask=torch.ones(B, T + 2, dtype=torch.bool))),
    "ref_logps-shape": ("ref_logps", dict(ref_logps=torch.zeros(B, T - 1), beta=0.1)),
    "is_weights-shape": ("is_weights", dict(is_weights=torch.ones(B, T - 1))),
    "is_weights-3d": ("is_weights", dict(is_weights=torch.ones(B, T, 1))),
    "is_weights-rows": ("is_weights", dict(is_weights=torch.ones(B + 2))),
    # wrong dtypes
    "logps-int": ("logps", dict(logps=torch.zeros(B, T, dtype=torch.int64))),
    "logps-complex": ("logps", dict(logps=torch.zeros(B, T, dtype=torch.complex64))),
    "logps-bool": ("logps", dict(logps=torch.zeros(B, T, dtype=torch.bool))),
    "old_logps-int": ("old_logps", dict(old_logps=torch.zeros(B, T, dtype=torch.int32))),
    "old_logps-complex": ("old_logps", dict(old_logps=torch.zeros(B, T, dtype=torch.complex128))),
    "advantages-int": ("advantages", dict(advantages=torch.zeros(B, dtype=torch.int64))),
    "mask-int16": ("mask", dict(mask=torch.ones(B, T, dtype=torch.int16))),
    "mask-complex": ("mask", dict(mask=torch.ones(B, T, dtype=torch.complex64))),
    "ref_logps-int": ("ref_logps", dict(ref_logps=torch.zeros(B, T, dtype=torch.int32), beta=0.1)),
    "is_weights-int": ("is_weights", dict(is_weights=torch.ones(B, T, dtype=torch.int32))),
    # wrong devices
    "logps-meta": ("logps", dict(logps=torch.zeros(B, T, device=meta))),
    "old_logps-meta": ("old_logps", dict(old_logps=torch.zeros(B, T, device=meta))),
    "advantages-meta": ("advantages", dict(advantages=torch.zeros(B, device=meta))),
    "mask-meta": ("mask", dict(mask=torch.ones(B, T, device=meta))),
    "ref_logps-meta": ("ref_logps", dict(ref_logps=torch.zeros(B, T, device=meta), beta=0.1)),
    "is_weights-meta": ("is_weights", dict(is_weights=torch.ones(B, T, device=meta))),
    # not tensors
    "logps-list": ("logps", dict(logps=[[0.0] * T] * B)),
    "old_logps-numpy": ("old_logps", dict(old_logps=np.zeros((B, T)))),
    "advantages-float": ("advantages", dict(advantages=1.0)),
    "mask-None": ("mask", dict(mask=None)),
    "ref_logps-str": ("ref_logps", dict(ref_logps="ref", beta=0.1)),
    "is_weights-int": ("is_weights", dict(is_weights=3)),
    "logps-None": ("logps", dict(logps=None)),
}


@pytest.mark.parametrize("fn", FNS, ids=FN_IDS)
@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensor_argument_is_named(fn, case):
    name, over = BAD_TENSORS[case]
    _raises(name, fn, **dict(over))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
@pytest.mark.parametrize("fn", FNS, ids=FN_IDS)
@pytest.mark.parametrize("name", ["old_logps", "advantages", "mask", "ref_logps", "is_weights"])
def test_cuda_cpu_mix_is_named(fn, name):
    a = _base()
    cuda = {k: v.cuda() for k, v in a.items()}
    over = {"logps": cuda["logps"], "old_logps": cuda["old_logps"],
            "advantages": cuda["advantages"], "mask": cuda["mask"], "beta": 0.1,
            "ref_logps": cuda["ref"], "is_weights": torch.ones(B, T, device="cuda")}
    key = name
    over[key] = a["ref"] if name == "ref_logps" else (
        torch.ones(B, T) if name == "is_weights" else a[name])
    _raises(name, fn, **over)


BAD_OPTIONS = {
    "epsilon_low-negative": ("epsilon_low", dict(epsilon_low=-0.1)),
    "epsilon_high-negative": ("epsilon_high", dict(epsilon_high=-0.01)),
    "epsilon_low-nan": ("epsilon_low", dict(epsilon_low=float("nan"))),
    "epsilon_low-inf": ("epsilon_low", dict(epsilon_low=float("inf"))),
    "epsilon_high-nan": ("epsilon_high", dict(epsilon_high=float("nan"))),
    "epsilon_high-inf": ("epsilon_high", dict(epsilon_high=float("inf"))),
    "epsilon_low-str": ("epsilon_low", dict(epsilon_low="0.4")),
    "normalizer-zero": ("normalizer", dict(normalizer=0.0)),
    "normalizer-int-zero": ("normalizer", dict(normalizer=0)),
    "normalizer-nan": ("normalizer", dict(normalizer=float("nan"))),
    "normalizer-inf": ("normalizer", dict(normalizer=float("inf"))),
    "normalizer-negative": ("normalizer", dict(normalizer=-2.0)),
    "beta-without-ref": ("ref_logps", dict(beta=0.1)),
    "beta-nan": ("beta", dict(beta=float("nan"))),
    "beta-str": ("beta", dict(beta="0.1")),
}


@pytest.mark.parametrize("fn", FNS, ids=FN_IDS)
@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_is_named(fn, case):
    name, over = BAD_OPTIONS[case]
    _raises(name, fn, **dict(over))


@pytest.mark.parametrize("over", [dict(convention="TRL"), dict(convention="ppo"),
                                  dict(convention=None), dict(convention=1),
                                  dict(convention=["trl"])],
                         ids=["upper", "other", "none", "int", "list"])
def test_bad_convention(over):
    msg = _raises("convention", gmpo_ext.gmpo_loss, **over)
    assert "trl" in msg and "verl" in msg   # lists the valid ones


@pytest.mark.parametrize("clamp", [0.0, -1.0, float("nan"), float("-inf"), "20", True])
def test_bad_log_ratio_clamp(clamp):
    _raises("log_ratio_clamp", gmpo_ext.gmpo_loss, log_ratio_clamp=clamp)


@pytest.mark.parametrize("over,name", [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(loss_type=None), "loss_type"),
    (dict(epsilon_low=1.5), "epsilon_low"),
    (dict(loss_type="dr_grpo", max_completion_length=0), "max_completion_length"),
    (dict(loss_type="dr_grpo", max_completion_length="5"), "max_completion_length"),
    (dict(loss_type="dapo", num_items_in_batch=0), "num_items_in_batch"),
    (dict(loss_type="dapo", num_items_in_batch=-3), "num_items_in_batch"),
    (dict(loss_type="dapo", num_items_in_batch=float("nan")), "num_items_in_batch"),
], ids=["loss_type", "loss_type-None", "eps_low>1", "mcl-0", "mcl-str", "items-0", "items-neg",
        "items-nan"])
def test_bad_grpo_option(over, name):
    msg = _raises(name, gmpo_ext.grpo_loss, **over)
    if name == "loss_type":
        assert all(t in msg for t in ("grpo", "bnpo", "dr_grpo", "dapo"))


def test_modules_reject_bad_options():
    with pytest.raises(ValueError, match="convention"):
        gmpo_ext.GMPOLoss(convention="x")
    with pytest.raises(ValueError, match="loss_type"):
        gmpo_ext.GRPOLoss(loss_type="x")
    a = _base()
    with pytest.raises(ValueError, match="epsilon_low"):
        gmpo_ext.GMPOLoss(epsilon_low=-1.0)(a["logps"], a["old_logps"], a["advantages"], a["mask"])


def test_good_inputs_still_pass():
    # the base inputs of this file are valid: the failures above are the bad argument's
    a = _base()
    for fn in FNS:
        loss = fn(a["logps"], a["old_logps"], a["advantages"], a["mask"], beta=0.1,
                  ref_logps=a["ref"], is_weights=torch.ones(B, T))
        assert torch.isfinite(loss)


# ----------------------------------------------------------------------------
# the C module: ValueError naming the argument, never a crash

class CCall:
    """A valid argument list for gmpo_ext._C.forward / backward, to corrupt one at a time."""

    def __init__(self, algo=_backend.ALGO_GMPO, beta=0.1):
        c = make_case(B, T, seed=2, ref=True, is_weights="BT")
        self.keep = [c]
        args, keep = _backend._args(algo, c.logps, c.old_logps, c.advantages, c.mask,
                                    c.ref_logps, c.is_weights, 0, 0, 0.4, 0.4, beta, 0.0, 1.0, 0.0)
        self.keep.append(keep)
        self.algo, self.B, self.T, *rest = args
        (self.logp, self.old_logp, self.adv, self.mask, self.ref_logp, self.is_w,
         self.samp_logp, self.tok_mask, self.family, self.convention, self.loss_type, self.eps_low, self.eps_high, self.beta,
         self.log_ratio_clamp, self.normalizer, self.denom, self.num_threads) = rest
        self.device, self.stream = 0, 0
        self.rows = torch.zeros(B + 1, _backend.ROW_STATS, dtype=torch.float64)
        self.loss = torch.zeros((), dtype=torch.float32)
        self.metrics = torch.zeros(_backend.METRICS, dtype=torch.float32)
        # output and saved buffers: (data_ptr, extent)
        self.out_loss, self.out_metrics = _backend.buf(self.loss), _backend.buf(self.metrics)
        self.rows_ptr, self.out_dtype = _backend.buf(self.rows), 1
        self.grad = torch.full((B, T), 7.0)
        self.grad_out = torch.tensor(1.0)
        self.grad_ptr, self.grad_dtype = _backend.buf(self.grad), 1
        self.grad_out_ptr, self.grad_out_dtype = _backend.buf(self.grad_out), 1

    def common(self):
        return (self.algo, self.device, self.stream, self.B, self.T, self.logp, self.old_logp,
                self.adv, self.mask, self.ref_logp, self.is_w, self.samp_logp, self.tok_mask,
                self.family, self.convention, self.loss_type,
                self.eps_low, self.eps_high, self.beta, self.log_ratio_clamp, self.normalizer,
                self.denom, self.num_threads)

    def forward(self):
        return gmpo_ext._C.forward(*self.common(), self.rows_ptr, self.out_loss,
                                   self.out_metrics, self.out_dtype)

    def backward(self):
        return gmpo_ext._C.backward(*self.common(), self.rows_ptr, self.grad_out_ptr,
                                    self.grad_out_dtype, self.grad_ptr, self.grad_dtype)


def _view(v, **kw):
    data, dtype, sb, st, extent = v
    d = dict(data=data, dtype=dtype, sb=sb, st=st, extent=extent)
    d.update(kw)
    return (d["data"], d["dtype"], d["sb"], d["st"], d["extent"])


C_BAD = {
    "logps-dtype-code": ("logps", lambda c: setattr(c, "logp", _view(c.logp, dtype=42))),
    "logps-dtype-none": ("logps", lambda c: setattr(c, "logp", _view(c.logp, dtype=0))),
    "logps-dtype-bool": ("logps", lambda c: setattr(c, "logp", _view(c.logp, dtype=5))),
    "logps-null": ("logps", lambda c: setattr(c, "logp", _view(c.logp, data=0))),
    "logps-stride0": ("logps", lambda c: setattr(c, "logp", _view(c.logp, st=0))),
    "old_logps-null": ("old_logps", lambda c: setattr(c, "old_logp", _view(c.old_logp, data=0))),
    "old_logps-int": ("old_logps", lambda c: setattr(c, "old_logp", _view(c.old_logp, dtype=8))),
    "advantages-null": ("advantages", lambda c: setattr(c, "adv", _view(c.adv, data=0))),
    "advantages-dtype": ("advantages", lambda c: setattr(c, "adv", _view(c.adv, dtype=-3))),
    "mask-null": ("mask", lambda c: setattr(c, "mask", _view(c.mask, data=0))),
    "mask-dtype": ("mask", lambda c: setattr(c, "mask", _view(c.mask, dtype=99))),
    # bug: csrc/gmpo_common.c check_view accepts negative codes for non-float tensors
    "mask-dtype-negative": ("mask", lambda c: setattr(c, "mask", _view(c.mask, dtype=-1))),
    "ref_logps-dtype": ("ref_logps", lambda c: setattr(c, "ref_logp", _view(c.ref_logp, dtype=77))),
    "ref_logps-missing": ("ref_logps", lambda c: setattr(c, "ref_logp", (0, 0, 0, 0, 0))),
    "is_weights-int": ("is_weights", lambda c: setattr(c, "is_w", _view(c.is_w, dtype=9))),
    "algo": ("algo", lambda c: setattr(c, "algo", 7)),
    "device": ("device", lambda c: setattr(c, "device", 5)),
    "convention": ("convention", lambda c: setattr(c, "convention", 2)),
    "loss_type": ("loss_type", lambda c: setattr(c, "loss_type", 4)),
    "epsilon_low": ("epsilon_low", lambda c: setattr(c, "eps_low", -0.5)),
    "epsilon_low-inf": ("epsilon_low", lambda c: setattr(c, "eps_low", float("inf"))),
    "epsilon_high-nan": ("epsilon_high", lambda c: setattr(c, "eps_high", float("nan"))),
    "beta-inf": ("beta", lambda c: setattr(c, "beta", float("inf"))),
    "log_ratio_clamp-nan": ("log_ratio_clamp", lambda c: setattr(c, "log_ratio_clamp", float("nan"))),
    "normalizer-zero": ("normalizer", lambda c: setattr(c, "normalizer", 0.0)),
    "normalizer-nan": ("normalizer", lambda c: setattr(c, "normalizer", float("nan"))),
    "denominator-inf": ("denominator", lambda c: setattr(c, "denom", float("inf"))),
    # 0 is the default; a negative one was silently the default too
    "denominator-negative": ("denominator", lambda c: setattr(c, "denom", -3.0)),
    "size-negative": ("logps", lambda c: setattr(c, "B", -1)),
    # extents: shapes and strides that address memory outside a buffer
    "logps-extent": ("logps", lambda c: setattr(c, "logp", _view(c.logp, extent=B * T - 1))),
    "logps-rows": ("logps", lambda c: setattr(c, "B", B + 1)),
    "old_logps-stride": ("old_logps", lambda c: setattr(c, "old_logp", _view(c.old_logp, sb=T + 1))),
    "old_logps-negative-stride": ("old_logps", lambda c: setattr(c, "old_logp", _view(c.old_logp, st=-1))),
    "advantages-extent": ("advantages", lambda c: setattr(c, "adv", _view(c.adv, extent=B - 1))),
    "mask-extent": ("mask", lambda c: setattr(c, "mask", _view(c.mask, extent=1))),
    "ref_logps-extent": ("ref_logps", lambda c: setattr(c, "ref_logp", _view(c.ref_logp, extent=0))),
    "is_weights-extent": ("is_weights", lambda c: setattr(c, "is_w", _view(c.is_w, extent=T))),
    "stride-overflow": ("logps", lambda c: setattr(c, "logp", _view(c.logp, sb=2 ** 62))),
}


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("case", list(C_BAD))
def test_c_module_rejects_bad_argument(case, which):
    name, corrupt = C_BAD[case]
    c = CCall()
    corrupt(c)
    with pytest.raises(ValueError) as info:
        getattr(c, which)()
    assert _names(name).search(str(info.value)), str(info.value)
    if which == "backward":
        assert (c.grad == 7.0).all()   # nothing written on failure


@pytest.mark.parametrize("attr,value,name", [
    ("out_dtype", 4, "output dtype"), ("out_dtype", 99, "output dtype"),
    ("rows_ptr", (0, 0), "output buffer"), ("out_loss", (0, 0), "output buffer"),
    ("out_metrics", (0, 0), "output buffer"),
    ("rows_ptr", "small", "rows"), ("out_loss", "small", "loss"),
    ("out_metrics", "small", "metrics"),
])
def test_c_forward_rejects_bad_outputs(attr, value, name):
    c = CCall()
    if value == "small":   # one element fewer than the call needs
        ptr, extent = getattr(c, attr)
        value = (ptr, extent - 1)
    setattr(c, attr, value)
    with pytest.raises(ValueError, match=name):
        c.forward()


@pytest.mark.parametrize("attr,name", [("rows_ptr", "rows"), ("grad_out_ptr", "grad_output"),
                                       ("grad_ptr", "grad")])
def test_c_backward_rejects_small_buffers(attr, name):
    c = CCall()
    ptr, extent = getattr(c, attr)
    setattr(c, attr, (ptr, extent - 1))
    with pytest.raises(ValueError) as info:
        c.backward()
    assert _names(name).search(str(info.value)), str(info.value)
    assert (c.grad == 7.0).all()


@pytest.mark.parametrize("attr,value,name", [
    ("grad_dtype", 5, "grad"), ("grad_dtype", 99, "grad"), ("grad_out_dtype", 8, "grad_output"),
    ("grad_out_ptr", (0, 0), "grad_output"), ("grad_ptr", (0, 0), "buffer"),
    ("rows_ptr", (0, 0), "buffer"),
])
def test_c_backward_rejects_bad_outputs(attr, value, name):
    c = CCall()
    c.forward()
    setattr(c, attr, value)
    with pytest.raises(ValueError, match=name):
        c.backward()


def test_c_module_grpo_eps_low_above_one():
    c = CCall(algo=_backend.ALGO_GRPO)
    c.eps_low = 1.5
    with pytest.raises(ValueError, match="epsilon_low"):
        c.forward()


_FAMILY_GOOD = (0, 0, 0, 0, 0.0, 0.0, 1.0, 1.05, 2.0, 3.0, 3.0, 2.0)


def test_c_module_family_options_checked():
    """The family's options tuple: a list is a TypeError naming family (not
    SystemError), algo 2 without it says the options are required (not a
    message about sapo_temperature_pos), and the family's call with it runs."""
    c = CCall(algo=_backend.ALGO_FAMILY, beta=0.0)
    c.ref_logp = (0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="family options required"):
        c.forward()
    c.family = list(_FAMILY_GOOD)
    with pytest.raises(TypeError, match="family"):
        c.forward()
    c.family = _FAMILY_GOOD
    c.forward()
    assert torch.isfinite(c.loss)


def test_op_family_options_checked():
    """torch.ops.gmpo_ext.loss_fwd: algo 2 without family, and a NaN integer
    option, name the problem."""
    import gmpo_ext.ops  # noqa: F401  (registers the ops)
    c = make_case(B, T, seed=3)
    args = (c.logps, c.old_logps, c.advantages, c.mask, None, None, _backend.ALGO_FAMILY, 0, 3,
            0.2, 0.28, 0.0, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="family options required"):
        torch.ops.gmpo_ext.loss_fwd(*args)
    bad = [float("nan")] + list(_FAMILY_GOOD[1:])
    with pytest.raises(ValueError, match="seq_level"):
        torch.ops.gmpo_ext.loss_fwd(*args, family=bad)
    bad = [0.0, 0.0, 0.5] + list(_FAMILY_GOOD[3:])
    with pytest.raises(ValueError, match="off_policy"):
        torch.ops.gmpo_ext.loss_fwd(*args, family=bad)
    loss = torch.ops.gmpo_ext.loss_fwd(*args, family=[float(v) for v in _FAMILY_GOOD])[0]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("loss_type,ok", [(4, True), (5, True), (7, True), (0, False),
                                          (3, False), (6, False)])
def test_c_module_family_eps_low_above_one(loss_type, ok):
    """epsilon_low > 1 is an error only where it is a clip bound (grpo, bnpo,
    dr_grpo, dapo, luspo); cispo (4), sapo (5) and vespo (7) ignore it, as TRL."""
    c = CCall(algo=_backend.ALGO_FAMILY, beta=0.0)
    c.ref_logp = (0, 0, 0, 0, 0)
    c.family, c.loss_type, c.eps_low = _FAMILY_GOOD, loss_type, 1.5
    c.adv = _view(c.adv, st=0)   # vespo: one advantage per row
    if ok:
        c.forward()
        assert torch.isfinite(c.loss)
    else:
        with pytest.raises(ValueError, match="epsilon_low"):
            c.forward()


def test_c_module_cuda_without_cuda_build():
    if gmpo_ext._C.WITH_CUDA:
        pytest.skip("built with CUDA: device 1 is valid")
    c = CCall()
    c.device = 1
    with pytest.raises(RuntimeError, match="CUDA"):
        c.forward()


def test_c_module_argument_parsing_errors():
    c = CCall()
    with pytest.raises(TypeError):
        gmpo_ext._C.forward(*c.common())                       # too few arguments
    with pytest.raises(TypeError):
        gmpo_ext._C.forward(*c.common(), c.rows_ptr, c.out_loss, c.out_metrics, "f32")
    with pytest.raises(TypeError):
        bad = list(c.common())
        bad[5] = (1, 2)                                        # a view that is not a 4-tuple
        gmpo_ext._C.forward(*bad, c.rows_ptr, c.out_loss, c.out_metrics, 1)


def test_c_module_valid_call_and_odd_thread_counts():
    c = CCall()
    c.forward()
    first = float(c.loss)
    assert np.isfinite(first)
    for n in (-5, 0, 1, 64):
        c.num_threads = n
        c.forward()
        assert float(c.loss) == first
        c.backward()
        assert torch.isfinite(c.grad).all()


# ----------------------------------------------------------------------------
# large shapes: 70 000 tokens in one row, 70 000 rows of 3 tokens

@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 70_000), (70_000, 3)], ids=["one-long-row", "many-rows"])
@pytest.mark.parametrize("convention", ["trl", "verl"])
def test_large_shapes_match_reference(shape, convention, device):
    prev = torch.get_num_threads()
    torch.set_num_threads(2)   # the multi-threaded path of the C core
    try:
        case = make_case(*shape, seed=3, mask_kind="int", ref=True)
        check_parity(gmpo_ext.gmpo_loss, gmpo_loss_reference, case, device,
                     convention=convention, beta=0.02)
        if convention == "trl":
            check_parity(gmpo_ext.grpo_loss, grpo_loss_reference, case, device, exact_keys=False,
                         loss_type="grpo", beta=0.02)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("cls,over,name", [
    (gmpo_ext.GMPOLoss, dict(epsilon_low=-1.0), "epsilon_low"),
    (gmpo_ext.GMPOLoss, dict(convention="ppo"), "convention"),
    (gmpo_ext.GMPOLoss, dict(normalizer=0), "normalizer"),
    (gmpo_ext.GMPOLoss, dict(log_ratio_clamp=-5.0), "log_ratio_clamp"),
    (gmpo_ext.GRPOLoss, dict(loss_type=["dapo"]), "loss_type"),
    (gmpo_ext.GRPOLoss, dict(epsilon_high=float("nan")), "epsilon_high"),
])
def test_module_constructor_rejects_bad_options(cls, over, name):
    """The nn.Module forms fail at construction, not at their first forward."""
    with pytest.raises((TypeError, ValueError)) as info:
        cls(**over)
    assert _names(name).search(str(info.value)), str(info.value)


def test_max_completion_length_must_be_an_int():
    _raises("max_completion_length", gmpo_ext.grpo_loss, loss_type="dr_grpo",
            max_completion_length=2.5)
