"""Property-based fuzzing of every entry point (issue 9, item 2).

Random shapes (0 and 1 included), memory layouts (storage offsets, slices,
transposes, stride-0 expands, as_strided views with overlapping rows, neg-bit
views: ``torch._neg_view``, ``z.conj().imag``), dtypes (every float dtype,
bool/int/float masks, int32/int64 ids, wrong dtypes), devices (meta, cpu,
``torch.set_default_device("meta")``) and inconsistent arguments, through

  * the public functions gmpo_loss, grpo_loss, selective_logps and
    gmpo_loss_from_logits (forward and backward, inplace_backward on and off);
  * the registered ops torch.ops.gmpo_ext.{loss_fwd, loss_bwd, logits_fwd,
    logits_bwd, logits_bwd_} called directly, with consistent and with
    inconsistent arguments (rows buffers too small or of the wrong dtype, lse /
    entropy of the wrong shape, ids out of range or of fewer rows than the
    logits...).

Every call must either return what the float64 oracle (gmpo_ext.reference, or
a float64 log-softmax for the logits path) returns on the same values, within
per-dtype tolerances, gradient included, or raise TypeError, ValueError,
IndexError, RuntimeError or NotImplementedError: never crash, never read out of
bounds, never return a silently wrong value. Where an argument is invalid (no
right answer exists, e.g. a rows buffer of the wrong size) the call must raise.
An IndexError about a token id must quote an id that is really in the input,
at the position it names.

Two runs of the same properties:

  * in process, in the normal suite, with few examples (GMPO_FUZZ_EXAMPLES,
    default 20 per property);
  * test_fuzz_under_asan: a subprocess `python tests/_fuzz_asan_main.py` in
    which gmpo_ext._C is the module built with -fsanitize=address,undefined
    -fno-sanitize-recover=all (tests/_asan_build.py) and the sanitizer runtimes
    are preloaded; more examples (GMPO_FUZZ_ASAN_EXAMPLES, default 600 per
    property), then every reproducer below; it must exit 0 with no sanitizer
    report.

Both use a fixed, derandomized profile (derandomize=True, database=None,
deadline=None): CI runs the same cases every time.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis",
                                 reason="hypothesis is not installed (pip install -e .[test])")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gmpo_ext  # noqa: E402
from gmpo_ext import reference  # noqa: E402

HERE = Path(__file__).resolve().parent
ALLOWED = (TypeError, ValueError, IndexError, RuntimeError, NotImplementedError)
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOGITS_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, *FLOATS]
OPS = torch.ops.gmpo_ext

EXAMPLES = int(os.environ.get("GMPO_FUZZ_EXAMPLES", "20"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck), print_blob=False)

# Relative tolerances of the loss / metrics and of the gradient, per dtype of
# logps (the kernels compute in fp64 for fp64, in fp32 otherwise; fp16/bf16
# gradients are rounded to their dtype). Looser than tests/_helpers.TOLS: the
# fuzzer looks for wrong layouts and bounds, which give O(1) errors.
LOSS_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2.0 ** -9,
            torch.bfloat16: 2.0 ** -6}


# GMPO_FUZZ_ONLY=name,...: draw only these corruptions / modes (to study one failure)
_ONLY = {x for x in os.environ.get("GMPO_FUZZ_ONLY", "").split(",") if x}


_EXCLUDE = {x for x in os.environ.get("GMPO_FUZZ_EXCLUDE", "").split(",") if x}


def only(choices):
    kept = [c for c in choices if c in _ONLY and c not in _EXCLUDE]
    return kept or [c for c in choices if c not in _EXCLUDE] or list(choices)


# ----------------------------------------------------------------------------
# checking outcomes

class Invalid(Exception):
    """Raised by an expectation that has no right answer: the call had to raise."""


_BAD_ID = re.compile(r"token id (-?\d+) at \[(\d+), (\d+)\]")


def check_message(exc, ids=None):
    """An error message may only quote values of the inputs."""
    msg = str(exc)
    m = _BAD_ID.search(msg)
    if m is None:
        return
    assert ids is not None, f"message quotes a token id but no ids were passed: {msg!r}"
    idv, b, t = (int(x) for x in m.groups())
    assert ids.dim() == 2 and b < ids.shape[0] and t < ids.shape[1], \
        f"message names a position outside ids {tuple(ids.shape)}: {msg!r}"
    assert int(ids[b, t]) == idv, \
        f"message quotes id {idv} but ids[{b}, {t}] = {int(ids[b, t])}: {msg!r}"


def outcome(call, expect, ids=None, must_succeed=False):
    """Run call(); it raises an allowed exception, or its result passes expect(result).
    expect raises Invalid where there is no right answer (the call had to raise)."""
    try:
        res = call()
    except ALLOWED as e:
        event(f"raised {type(e).__name__}")
        if must_succeed:
            raise AssertionError(f"valid input rejected: {type(e).__name__}: {e}") from e
        check_message(e, ids)
        return None
    event("returned")
    try:
        expect(res)
    except Invalid as why:
        raise AssertionError(f"invalid input accepted ({why}); the call returned {res!r}"[:2000])
    return res


def close(got, ref, tol, what):
    got = got.detach().to(torch.float64).reshape(-1)
    ref = ref.detach().to(torch.float64).reshape(-1)
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    if not got.numel():
        return
    scale = float(ref[torch.isfinite(ref)].abs().max()) if torch.isfinite(ref).any() else 0.0
    same_nan = torch.isnan(got) == torch.isnan(ref)
    ok = (got == ref) | ((got - ref).abs() <= tol * (ref.abs() + scale + 1e-30))
    ok = ok | (torch.isnan(got) & torch.isnan(ref))
    bad = ~(ok & same_nan)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} values wrong; first at "
                             f"{i}: got {float(got[i])!r}, reference {float(ref[i])!r}")


# ----------------------------------------------------------------------------
# tensors with random memory layouts

LAYOUTS = ["contiguous", "offset", "sliced", "transposed", "expand_b", "expand_t", "overlap",
           "neg", "conj_imag"]


def _fill(shape, dtype, gen, lo, hi, kind):
    if kind == "bool":
        return torch.rand(shape, generator=gen) < 0.7
    if kind == "int":
        return torch.randint(int(lo), int(hi), shape, generator=gen).to(dtype)
    if kind == "mask01":
        return (torch.rand(shape, generator=gen) < 0.7).to(dtype)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def laid_out(draw, shape, dtype, gen, lo=-1.0, hi=1.0, kind="float", layouts=LAYOUTS):
    """A tensor of `shape` and `dtype` with values in [lo, hi), in a random layout."""
    layout = draw(st.sampled_from(only(layouts)))
    shape = tuple(shape)
    n = math.prod(shape)
    is_float = dtype.is_floating_point
    if layout == "offset":
        off = draw(st.integers(1, 5))
        buf = _fill((n + off,), dtype, gen, lo, hi, kind)
        return buf[off:].view(shape) if n else buf[off:off].reshape(shape)
    if layout == "sliced" and len(shape) >= 1:
        big = (*shape[:-1], shape[-1] * 2 + 1)
        return _fill(big, dtype, gen, lo, hi, kind)[..., 1::2][..., :shape[-1]]
    if layout == "transposed" and len(shape) >= 2:
        return _fill((shape[1], shape[0], *shape[2:]), dtype, gen, lo, hi, kind).transpose(0, 1)
    if layout == "expand_b" and len(shape) >= 1:
        return _fill((1, *shape[1:]), dtype, gen, lo, hi, kind).expand(shape)
    if layout == "expand_t" and len(shape) == 2:
        return _fill((shape[0], 1), dtype, gen, lo, hi, kind).expand(shape)
    if layout == "overlap" and len(shape) >= 2 and n:
        # rows overlap: row b starts one inner row after row b - 1
        inner = math.prod(shape[1:])
        step = max(1, inner // 2)
        strides = [step] + list(torch.empty(shape[1:]).stride())
        buf = _fill((step * (shape[0] - 1) + inner,), dtype, gen, lo, hi, kind)
        return buf.as_strided(shape, strides)
    # neg-bit views: memory holds -x, the tensor's values are x
    if layout == "neg" and is_float:
        return torch._neg_view(-_fill(shape, dtype, gen, lo, hi, kind))
    if layout == "conj_imag" and dtype in (torch.float32, torch.float64):
        im = -_fill(shape, dtype, gen, lo, hi, kind)
        return torch.complex(torch.zeros_like(im), im).conj().imag
    return _fill(shape, dtype, gen, lo, hi, kind)


def leaf(t):
    """A leaf that requires grad with t's memory layout (overlaps included)."""
    return t.detach().requires_grad_(True)


# ----------------------------------------------------------------------------
# loss inputs

def draw_loss_case(draw, algo):
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    B = draw(st.sampled_from([0, 1, 1, 2, 3, 5, 8]))
    T = draw(st.sampled_from([0, 1, 1, 2, 3, 7, 16, 37]))
    event(f"B*T > 0: {B * T > 0}")
    dt = draw(st.sampled_from(FLOATS))
    other = lambda: draw(st.sampled_from([dt, dt, dt, *FLOATS]))  # noqa: E731
    logps = laid_out(draw, (B, T), dt, gen, -3.0, -0.1)
    old = laid_out(draw, (B, T), other(), gen, -3.0, -0.1)
    adv_shape = draw(st.sampled_from([(B,), (B, 1), (B, T)]))
    adv = laid_out(draw, adv_shape, other(), gen, -2.0, 2.0)
    mdt = draw(st.sampled_from(MASK_DTYPES))
    kind = "bool" if mdt == torch.bool else ("mask01" if not mdt.is_floating_point
                                              or draw(st.booleans()) else "float")
    mask = laid_out(draw, (B, T), mdt, gen, 0.0, 2.0, kind=kind)
    beta = draw(st.sampled_from([0.0, 0.0, 0.04]))
    ref = laid_out(draw, (B, T), other(), gen, -3.0, -0.1) if beta or draw(st.booleans()) else None
    isw = None
    if draw(st.booleans()):
        isw = laid_out(draw, draw(st.sampled_from([(B,), (B, 1), (B, T)])), other(), gen, 0.5, 1.5)
    kw = dict(beta=beta, normalizer=draw(st.sampled_from([1.0, 3.0])))
    if algo == "gmpo":
        kw.update(epsilon_low=draw(st.sampled_from([0.4, 0.1, 2.0])),
                  convention=draw(st.sampled_from(["trl", "verl"])),
                  log_ratio_clamp=draw(st.sampled_from([None, None, 0.5, 20.0])))
    else:
        kw.update(epsilon_low=draw(st.sampled_from([0.2, 0.05, 1.0])),
                  loss_type=draw(st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo"])))
        if draw(st.booleans()):
            kw["max_completion_length"] = draw(st.integers(1, 40))
        if kw["loss_type"] == "dapo" and draw(st.booleans()):
            kw["num_items_in_batch"] = float(draw(st.integers(1, 50)))
    if draw(st.booleans()):
        kw["epsilon_high"] = draw(st.sampled_from([0.1, 0.28, 0.5]))
    # NaN / inf in padding must never enter the arithmetic
    if draw(st.booleans()) and B * T:
        for t in (logps, old):
            if t.is_neg() or t._base is not None or t.stride() != t.contiguous().stride():
                continue
            with torch.no_grad():
                t.masked_fill_(mask.to(torch.float64) == 0, float("nan"))
    return dict(logps=logps, old_logps=old, advantages=adv, mask=mask, ref_logps=ref,
                is_weights=isw, kw=kw)


def reference_loss(algo, c, upstream):
    """(loss, metrics, grad) of the float64 oracle on the same values."""
    lp = c["logps"].detach().to(torch.float64).requires_grad_(True)
    f = reference.gmpo_loss_reference if algo == "gmpo" else reference.grpo_loss_reference
    loss, metrics = f(lp, c["old_logps"].to(torch.float64), c["advantages"].to(torch.float64),
                      c["mask"], ref_logps=None if c["ref_logps"] is None else
                      c["ref_logps"].to(torch.float64),
                      is_weights=None if c["is_weights"] is None else
                      c["is_weights"].to(torch.float64), **c["kw"])
    (grad,) = torch.autograd.grad(loss * upstream, lp, allow_unused=True)
    return loss.detach(), metrics, (torch.zeros_like(lp) if grad is None else grad)


def public(algo):
    return gmpo_ext.gmpo_loss if algo == "gmpo" else gmpo_ext.grpo_loss


def check_loss_result(algo, c, loss, metrics, grad, upstream):
    dt = c["logps"].dtype
    rloss, rmetrics, rgrad = reference_loss(algo, c, upstream)
    assert loss.dtype == (torch.float64 if dt == torch.float64 else torch.float32), loss.dtype
    assert loss.dim() == 0 and loss.device.type == "cpu"
    close(loss, rloss, LOSS_TOL[dt], "loss")
    for k, v in rmetrics.items():
        assert k in metrics, f"metric {k} missing"
        close(metrics[k], v, LOSS_TOL[dt], f"metric {k}")
    if grad is not None:
        assert grad.dtype == dt and tuple(grad.shape) == tuple(c["logps"].shape)
        close(grad, rgrad, GRAD_TOL[dt], "grad")


@st.composite
def loss_cases(draw):
    algo = draw(st.sampled_from(["gmpo", "grpo"]))
    return algo, draw_loss_case(draw, algo), draw(st.sampled_from([1.0, 0.37])), \
        draw(st.sampled_from(only(["grad", "grad", "nograd", "default_meta"])))


@FUZZ
@given(loss_cases())
def test_public_loss_matches_reference(case):
    algo, c, upstream, mode = case
    lp = leaf(c["logps"]) if mode != "nograd" else c["logps"]

    def call():
        ctx = torch.device("meta") if mode == "default_meta" else contextlib.nullcontext()
        with ctx:
            loss, metrics = public(algo)(lp, c["old_logps"], c["advantages"], c["mask"],
                                         ref_logps=c["ref_logps"], is_weights=c["is_weights"],
                                         return_metrics=True, **c["kw"])
            grad = None
            if mode != "nograd":
                (grad,) = torch.autograd.grad(loss * upstream if upstream != 1.0 else loss, lp,
                                              allow_unused=True)
                grad = torch.zeros_like(lp) if grad is None else grad
        return loss, metrics, grad

    outcome(call, lambda r: check_loss_result(algo, c, *r, upstream), must_succeed=True)


# ----------------------------------------------------------------------------
# invalid arguments to the public loss functions: each must raise

def _corrupt(draw, t, gen, B, T):
    """A wrong version of tensor t: shape, dtype, device or type."""
    how = draw(st.sampled_from(["shape", "dtype", "meta", "nontensor", "3d"]))
    if how == "shape":
        shape = draw(st.sampled_from([(B + 1, T), (max(B - 1, 0), T), (B, T + 1),
                                      (B, max(T - 1, 0)), (B * T + 1,), (T + 2, B + 2)]))
        return laid_out(draw, shape, t.dtype if t is not None else torch.float32, gen)
    if how == "dtype":
        return _fill(tuple(t.shape) if t is not None else (B, T),
                     draw(st.sampled_from([torch.complex64, torch.int16, torch.uint16,
                                           torch.float8_e4m3fn])), gen, 0, 1,
                     "float" if draw(st.booleans()) else "int")
    if how == "meta":
        return torch.empty((B, T), device="meta")
    if how == "3d":
        return torch.zeros((B, T, 2))
    return draw(st.sampled_from([None, 1.0, [[0.0] * T] * B]))


@st.composite
def bad_loss_cases(draw):
    algo = draw(st.sampled_from(["gmpo", "grpo"]))
    c = draw_loss_case(draw, algo)
    B, T = c["logps"].shape
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    name = draw(st.sampled_from(["logps", "old_logps", "advantages", "mask", "ref_logps",
                                 "is_weights"]))
    bad = _corrupt(draw, c[name], gen, B, T)
    c[name] = bad
    return algo, c, name


def _loss_valid_anyway(c, name):
    """Corruptions that happen to leave the arguments valid (e.g. an optional
    tensor set to None)."""
    t = c[name]
    B, T = (c["logps"].shape if isinstance(c["logps"], torch.Tensor) and c["logps"].dim() == 2
            else (None, None))
    if t is None and name in ("ref_logps", "is_weights"):
        return name == "is_weights" or c["kw"]["beta"] == 0
    if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in FLOATS:
        if name in ("advantages", "is_weights") and tuple(t.shape) in ((B,), (B, 1), (B, T)):
            return True
        if tuple(t.shape) == (B, T):
            return True
    return False


@FUZZ
@given(bad_loss_cases())
def test_public_loss_rejects_invalid_arguments(case):
    algo, c, name = case
    if _loss_valid_anyway(c, name):
        return
    lp = c["logps"]
    if isinstance(lp, torch.Tensor) and lp.dtype.is_floating_point and lp.device.type != "meta":
        lp = leaf(lp)

    def call():
        loss = public(algo)(lp, c["old_logps"], c["advantages"], c["mask"],
                            ref_logps=c["ref_logps"], is_weights=c["is_weights"], **c["kw"])
        if isinstance(lp, torch.Tensor) and lp.requires_grad:
            loss.backward()
        return loss

    def expect(_):
        raise Invalid(f"{name} corrupted")

    outcome(call, expect)


# ----------------------------------------------------------------------------
# the raw loss ops: consistent arguments give the reference; inconsistent raise

def op_options(algo, kw):
    el = kw["epsilon_low"]
    eh = kw.get("epsilon_high", el)
    if algo == "gmpo":
        return (0, {"trl": 0, "verl": 1}[kw["convention"]], 0, el, eh, kw["beta"],
                float(kw["log_ratio_clamp"] or 0.0), kw["normalizer"], 0.0)
    lt = kw["loss_type"]
    denom = 0.0
    if lt == "dr_grpo" and "max_completion_length" in kw:
        denom = float(kw["max_completion_length"])
    if lt == "dapo" and "num_items_in_batch" in kw:
        denom = kw["num_items_in_batch"]
    return (1, 0, ["grpo", "bnpo", "dr_grpo", "dapo"].index(lt), el, eh, kw["beta"], 0.0,
            kw["normalizer"], denom)


def _metrics_of(algo, kw, m):
    names = (("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
             if algo == "grpo" or kw["convention"] == "trl" else
             ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"))
    out = dict(zip(names, m[:3]))
    out["kl"] = m[3]
    if algo == "gmpo":
        out["gmpo/max_mean_log_ratio"] = m[4]
    out["gmpo/nonfinite_rows"] = m[5]
    return out


RAW_LOSS_BAD = ["none", "none", "old_short", "old_long", "mask_short", "adv_short", "adv_3d",
                "ref_short", "isw_short", "isw_long", "logps_1d", "algo", "convention",
                "loss_type", "mask_complex", "old_meta",
                "rows_short", "rows_cols", "rows_f32", "rows_strided", "rows_1d", "rows_meta",
                "grad_empty", "grad_vec", "grad_meta", "grad_int", "all_meta"]


@st.composite
def raw_loss_cases(draw):
    algo = draw(st.sampled_from(["gmpo", "grpo"]))
    c = draw_loss_case(draw, algo)
    return algo, c, draw(st.sampled_from(only(RAW_LOSS_BAD)))


@FUZZ
@given(raw_loss_cases())
def test_raw_loss_ops(case):
    algo, c, bad = case
    B, T = c["logps"].shape
    opts = list(op_options(algo, c["kw"]))
    args = [c["logps"], c["old_logps"], c["advantages"], c["mask"],
            c["ref_logps"] if c["kw"]["beta"] else None, c["is_weights"]]
    shorter = lambda t, d: t.narrow(d, 0, t.shape[d] - 1) if t.shape[d] else None  # noqa: E731
    fwd_bad = True
    if bad == "old_short":
        args[1] = shorter(args[1], 0 if B else 1) if B or T else None
    elif bad == "old_long":
        args[1] = torch.zeros((B + 1, T + 1), dtype=args[1].dtype)
    elif bad == "mask_short":
        args[3] = shorter(args[3], 1 if T else 0)
    elif bad == "adv_short":
        args[2] = torch.zeros((max(B - 1, 0),)) if B else torch.zeros((1, 0, 1))
    elif bad == "adv_3d":
        args[2] = torch.zeros((B, T, 1))
    elif bad == "ref_short":
        args[4] = torch.zeros((B, max(T - 1, 0))) if T else torch.zeros((B + 1, T))
    elif bad == "isw_short":
        args[5] = torch.ones((max(B - 1, 0),)) if B else torch.ones((2,))
    elif bad == "isw_long":
        args[5] = torch.ones((B, T + 2))
    elif bad == "logps_1d":
        args[0] = torch.zeros((B,), dtype=c["logps"].dtype)
    elif bad == "algo":
        opts[0] = 7
    elif bad == "convention":
        opts[1] = 5
    elif bad == "loss_type":
        opts[2] = 9
    elif bad == "mask_complex":
        args[3] = torch.zeros((B, T), dtype=torch.complex64)
    elif bad == "old_meta":
        args[1] = torch.empty((B, T), device="meta")
    else:
        fwd_bad = False
    if any(a is None for a in args[:4]):   # a shape that cannot be shortened: nothing to test
        return
    if bad == "logps_1d" and B == 0 and T == 0:
        fwd_bad = True

    if bad == "all_meta":
        # the fake kernels: outputs of the right shapes on meta, nothing read
        # (ambiguous: a refusal is accepted too)
        meta = [None if a is None else a.to("meta") for a in args]

        def meta_fwd(r):
            loss, metrics, rows = r
            assert rows.device.type == "meta" and tuple(rows.shape) == (B + 1, 10)
            assert rows.dtype == torch.float64 and loss.shape == () and tuple(metrics.shape) == (7,)

        r = outcome(lambda: OPS.loss_fwd(*meta, *opts), meta_fwd)

        def meta_bwd(g):
            assert g.device.type == "meta" and tuple(g.shape) == (B, T) and g.dtype == args[0].dtype

        if r is not None:
            outcome(lambda: OPS.loss_bwd(torch.ones((), device="meta"), r[2], *meta, *opts),
                    meta_bwd)
        return
    ref = reference_loss(algo, c, 0.37) if not fwd_bad else None

    def expect_fwd(r):
        if fwd_bad:
            raise Invalid(bad)
        loss, metrics, rows = r
        assert tuple(rows.shape) == (B + 1, 10) and rows.dtype == torch.float64
        close(loss, ref[0], LOSS_TOL[c["logps"].dtype], "loss_fwd loss")
        got = _metrics_of(algo, c["kw"], metrics)
        for k, v in ref[1].items():
            close(got[k], v, LOSS_TOL[c["logps"].dtype], f"loss_fwd metric {k}")

    res = outcome(lambda: OPS.loss_fwd(*args, *opts), expect_fwd, must_succeed=not fwd_bad)
    if res is None:
        return
    rows = res[2]
    grad_loss = torch.tensor(0.37, dtype=res[0].dtype)
    bwd_bad = True
    if bad == "rows_short":
        rows = rows[:B]
    elif bad == "rows_cols":
        rows = rows[:, :9].contiguous()
    elif bad == "rows_f32":
        rows = rows.to(torch.float32)
    elif bad == "rows_strided":
        # the same values, not contiguous: must be read through its strides or refused
        rows = rows.t().contiguous().t()
        bwd_bad = None   # ambiguous: refused, or read through its strides (result checked)
    elif bad == "rows_1d":
        rows = rows.reshape(-1)
    elif bad == "rows_meta":
        rows = torch.empty((B + 1, 10), dtype=torch.float64, device="meta")
    elif bad == "grad_empty":
        grad_loss = torch.empty((0,))
    elif bad == "grad_vec":
        grad_loss = torch.full((3,), 0.37)
    elif bad == "grad_meta":
        grad_loss = torch.empty((), device="meta")
    elif bad == "grad_int":
        grad_loss = torch.tensor(1)
        bwd_bad = None   # ambiguous: an integer upstream gradient is converted (result checked)
    else:
        bwd_bad = False

    def expect_bwd(g):
        if bwd_bad:
            raise Invalid(bad)
        up = float(grad_loss)
        assert g.dtype == c["logps"].dtype and tuple(g.shape) == (B, T)
        close(g, ref[2] / 0.37 * up, GRAD_TOL[c["logps"].dtype], "loss_bwd grad")

    outcome(lambda: OPS.loss_bwd(grad_loss, rows, *args, *opts), expect_bwd,
            must_succeed=bwd_bad is False)


# ----------------------------------------------------------------------------
# the logits path

def draw_logits_case(draw):
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    B = draw(st.sampled_from([0, 1, 1, 2, 3, 4]))
    T = draw(st.sampled_from([0, 1, 1, 2, 3, 6]))
    V = draw(st.sampled_from([1, 2, 3, 7, 16, 33]))
    TL = T + draw(st.sampled_from([0, 1]))
    event(f"B*T > 0: {B * T > 0}")
    dt = draw(st.sampled_from(LOGITS_DTYPES))
    logits = laid_out(draw, (B, TL, V), dt, gen, -4.0, 4.0,
                      layouts=["contiguous", "offset", "transposed", "expand_b", "overlap", "neg",
                               "conj_imag"])
    idt = draw(st.sampled_from([torch.int64, torch.int32]))
    ids = laid_out(draw, (B, T), idt, gen, 0, V, kind="int",
                   layouts=["contiguous", "offset", "sliced", "transposed", "expand_b", "expand_t"])
    mask = None
    if draw(st.booleans()):
        mdt = draw(st.sampled_from(MASK_DTYPES))
        mask = laid_out(draw, (B, T), mdt, gen, 0.0, 1.0,
                        kind="bool" if mdt == torch.bool else "mask01")
        if B * T and draw(st.booleans()):
            # out-of-range ids under masked tokens are never read
            ids = ids.clone()
            ids[mask.to(torch.float64) == 0] = draw(st.sampled_from([-1, V, 2 ** 31 - 1]))
    temp = draw(st.sampled_from([1.0, 0.7, 2.0]))
    return dict(logits=logits, ids=ids, mask=mask, temperature=temp, B=B, T=T, TL=TL, V=V)


def logits_reference(c, logits64):
    """(logp, entropy) in float64 from logits64 (B, TL, V), masked tokens 0."""
    B, T, V = c["B"], c["T"], c["V"]
    x = logits64[:, :T] / c["temperature"]
    lse = torch.logsumexp(x, -1)
    ids = c["ids"].to(torch.int64).clamp(0, V - 1)
    logp = x.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
    p = torch.softmax(x, -1)
    ent = lse - (p * x).sum(-1)
    if c["mask"] is not None:
        keep = c["mask"].to(torch.float64) != 0
        logp = torch.where(keep, logp, torch.zeros_like(logp))
        ent = torch.where(keep, ent, torch.zeros_like(ent))
    return logp, ent


def ids_invalid(c):
    ids = c["ids"].to(torch.int64)
    bad = (ids < 0) | (ids >= c["V"])
    if c["mask"] is not None:
        bad &= c["mask"].to(torch.float64) != 0
    return bool(bad.any())


@st.composite
def logits_cases(draw):
    c = draw_logits_case(draw)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    c["fn"] = draw(st.sampled_from(["selective", "selective", "loss"]))
    c["entropy"] = draw(st.booleans())
    c["inplace"] = draw(st.booleans())
    c["wg"] = (float(draw(st.sampled_from([1.0, -0.5]))), float(draw(st.sampled_from([0.0, 0.3]))))
    if draw(st.integers(0, 5)) == 0 and c["B"] * c["T"]:
        ids = c["ids"].clone()
        b, t = draw(st.integers(0, c["B"] - 1)), draw(st.integers(0, c["T"] - 1))
        ids[b, t] = draw(st.sampled_from([-1, c["V"], 2 ** 31 - 1, -(2 ** 31)]))
        c["ids"] = ids
    B, T = c["B"], c["T"]
    if c["fn"] == "loss":
        if c["mask"] is None:
            c["mask"] = torch.ones((B, T), dtype=torch.bool)
        c["old"] = laid_out(draw, (B, T), torch.float32, gen, -3.0, -0.1)
        c["adv"] = laid_out(draw, draw(st.sampled_from([(B,), (B, 1), (B, T)])), torch.float32,
                            gen, -2.0, 2.0)
        c["conv"] = draw(st.sampled_from(["trl", "verl"]))
    return c


@FUZZ
@given(logits_cases())
def test_public_logits_matches_reference(c):
    base = c["logits"]
    orig = base.detach().to(torch.float64)
    L = leaf(base)
    dt = base.dtype
    invalid = ids_invalid(c)

    def call():
        if c["fn"] == "selective":
            out = gmpo_ext.selective_logps(L, c["ids"], c["temperature"], c["entropy"],
                                           mask=c["mask"], inplace_backward=c["inplace"])
            logp, ent = out if c["entropy"] else (out, None)
            obj = logp.sum() * c["wg"][0]
            if ent is not None:
                obj = obj + (ent * c["wg"][1]).sum()
            outs = (logp.detach(), None if ent is None else ent.detach())
        else:
            obj, _ = gmpo_ext.gmpo_loss_from_logits(
                L, c["ids"], c["old"], c["adv"], c["mask"], temperature=c["temperature"],
                convention=c["conv"], inplace_backward=c["inplace"], return_metrics=True)
            outs = (obj.detach(),)
        (g,) = torch.autograd.grad(obj, L, allow_unused=True)
        return outs, (torch.zeros_like(L) if g is None else g)

    def expect(r):
        if invalid:
            raise Invalid("an id outside [0, V) under a counted token")
        outs, g = r
        x = orig.clone().requires_grad_(True)
        logp, ent = logits_reference(c, x)
        if c["fn"] == "selective":
            close(outs[0], logp, 1e-4, "logp")
            if outs[1] is not None:
                close(outs[1], ent, 1e-4, "entropy")
            obj = logp.sum() * c["wg"][0] + ((ent * c["wg"][1]).sum() if c["entropy"] else 0)
        else:
            obj, _ = reference.gmpo_loss_reference(logp, c["old"].to(torch.float64),
                                                   c["adv"].to(torch.float64), c["mask"],
                                                   convention=c["conv"])
            close(outs[0], obj, 1e-4, "loss")
        (rg,) = torch.autograd.grad(obj, x, allow_unused=True) if obj.requires_grad else (None,)
        rg = torch.zeros_like(x) if rg is None else rg
        assert g.dtype == dt and tuple(g.shape) == tuple(L.shape)
        close(g, rg, GRAD_TOL[dt] * 4, "logits grad")

    # a vocabulary axis of stride != 1 (conj().imag has stride 2) is documented as
    # refused (never copied): refused, or right
    vocab_ok = base.stride(2) == 1 or c["V"] == 1
    outcome(call, expect, ids=c["ids"], must_succeed=not invalid and vocab_ok)


RAW_LOGITS_BAD = ["none", "none", "ids_fewer_rows", "ids_more_rows", "ids_long_T", "ids_float",
                  "logits_f64", "logits_vstride", "mask_short", "ids_meta", "lse_short",
                  "lse_f64", "lse_strided", "ent_short", "grad_short", "grad_long", "grad_strided",
                  "gent_short", "grad_int", "all_meta"]


@st.composite
def raw_logits_cases(draw):
    c = draw_logits_case(draw)
    c["bad"] = draw(st.sampled_from(only(RAW_LOGITS_BAD)))
    c["inplace"] = draw(st.booleans())
    c["entropy"] = draw(st.booleans())
    return c


@FUZZ
@given(raw_logits_cases())
def test_raw_logits_ops(c):
    B, T, TL, V = c["B"], c["T"], c["TL"], c["V"]
    logits, ids, mask, temp = c["logits"], c["ids"], c["mask"], c["temperature"]
    bad = c["bad"]
    fwd_bad = True
    if bad == "ids_fewer_rows" and B:
        ids = ids[: B - 1]
    elif bad == "ids_more_rows":
        ids = torch.zeros((B + 1, T), dtype=ids.dtype)
    elif bad == "ids_long_T":
        ids = torch.zeros((B, TL + 1), dtype=ids.dtype)
    elif bad == "ids_float":
        ids = ids.to(torch.float32)
    elif bad == "logits_f64":
        logits = logits.to(torch.float64)
        fwd_bad = None   # ambiguous: the public API refuses float64 logits; result checked
    elif bad == "logits_vstride" and V > 1:
        logits = _fill((B, TL, V * 2), logits.dtype, torch.Generator().manual_seed(V), -4.0, 4.0,
                       "float")[..., ::2]
        fwd_bad = None   # not copied: refused, or read through its stride (result checked)
    elif bad == "mask_short" and T:
        mask = torch.ones((B, T - 1), dtype=torch.bool)
    elif bad == "ids_meta":
        ids = torch.zeros((B, T), dtype=torch.int64, device="meta")
    else:
        fwd_bad = False
    if bad == "all_meta":
        # ambiguous: the fake kernels' outputs (right shapes, on meta), or refused
        ml, mi = logits.to("meta"), ids.to("meta")
        mm = None if mask is None else mask.to("meta")

        def meta_fwd(r):
            assert all(t.device.type == "meta" and tuple(t.shape) == (B, T) for t in r)

        r = outcome(lambda: OPS.logits_fwd(ml, mi, mm, temp, c["entropy"], c["inplace"]), meta_fwd)
        if r is not None:
            logp, ent, lse = r

            def meta_bwd(g):
                assert g.device.type == "meta" and tuple(g.shape) == (B, TL, V) \
                    and g.dtype == ml.dtype

            outcome(lambda: OPS.logits_bwd(logp, ent, ml, mi, mm, lse, ent, temp), meta_bwd)
            outcome(lambda: OPS.logits_bwd_(ml, logp, None, mi, mm, lse, ent, temp), lambda r: None)
        return
    cc = dict(c, logits=logits, ids=ids, mask=mask)
    invalid_ids = fwd_bad is not True and ids_invalid(cc)
    orig = logits.detach().to(torch.float64)

    def expect_fwd(r):
        if fwd_bad or invalid_ids:
            raise Invalid(bad if fwd_bad else "id outside [0, V)")
        logp, ent, lse = r
        rl, re_ = logits_reference(cc, orig)
        close(logp, rl, 1e-4, "logits_fwd logp")
        if c["entropy"]:
            close(ent, re_, 1e-4, "logits_fwd entropy")

    res = outcome(lambda: OPS.logits_fwd(logits, ids, mask, temp, c["entropy"], c["inplace"]),
                  expect_fwd, ids=ids if ids.device.type == "cpu" and ids.dim() == 2 else None,
                  must_succeed=fwd_bad is False and not invalid_ids
                  and (logits.stride(2) == 1 or V == 1))
    if res is None:
        return
    _, ent, lse = res
    gen = torch.Generator().manual_seed(B * 131 + T * 7 + V)
    glogp = _fill((B, T), torch.float32, gen, -1.0, 1.0, "float")
    gent = _fill((B, T), torch.float32, gen, -1.0, 1.0, "float") if c["entropy"] else None
    bwd_bad = True
    if bad == "lse_short":
        lse = lse[:, : T - 1] if T else torch.zeros((B + 1, 1))
    elif bad == "lse_f64":
        lse = lse.to(torch.float64)
    elif bad == "lse_strided":
        lse = lse.t().contiguous().t()
        bwd_bad = None   # ambiguous: refused, or read through its strides (result checked)
    elif bad == "ent_short":
        ent = ent[: max(B - 1, 0)] if B else torch.zeros((1, T + 1))
    elif bad == "grad_short":
        glogp = glogp[:, : T - 1] if T else torch.zeros((B + 1, 0))
        if not T and not B:
            glogp = torch.zeros((1, 1, 1))
    elif bad == "grad_long":
        glogp = torch.zeros((B + 1, T + 1))
    elif bad == "grad_strided":
        glogp = glogp.t().contiguous().t()
        bwd_bad = None   # ambiguous: refused, or read through its strides (result checked)
    elif bad == "gent_short":
        gent = torch.zeros((B, T + 1))
    elif bad == "grad_int":
        glogp = (glogp * 0).to(torch.int32)
        bwd_bad = None   # ambiguous: refused, or converted (result checked)
    else:
        bwd_bad = False

    def expect_bwd(g):
        if bwd_bad:
            raise Invalid(bad)
        x = orig.clone().requires_grad_(True)
        rl, re_ = logits_reference(cc, x)
        obj = (rl * glogp.to(torch.float64)).sum()
        if gent is not None:
            obj = obj + (re_ * gent.to(torch.float64)).sum()
        (rg,) = torch.autograd.grad(obj, x, allow_unused=True) if obj.requires_grad else (None,)
        rg = torch.zeros_like(x) if rg is None else rg
        assert tuple(g.shape) == tuple(logits.shape)
        close(g, rg, GRAD_TOL[logits.dtype] * 4 if logits.dtype in GRAD_TOL else 1e-4,
              "logits grad")

    inplace = c["inplace"]
    # logits_bwd_ writes into its first argument: give it a copy with the same
    # layout when the logits overlap themselves only if asked (the overlap is
    # a case to reject or handle)
    target = logits.clone() if not logits._is_view() and logits.is_contiguous() else logits

    def call_bwd():
        if inplace:
            OPS.logits_bwd_(target, glogp, gent, ids, mask, lse, ent, temp)
            return target
        return OPS.logits_bwd(glogp, gent, logits, ids, mask, lse, ent, temp)

    # writing in place into a neg view (torch's Negative fallback cannot return a
    # mutated tensor for it) or into logits whose elements overlap: refused, or right
    in_place_ok = (logits.stride(2) == 1 or V == 1) and (
        not inplace or (not target.is_neg() and torch._debug_has_internal_overlap(target) == 0))
    outcome(call_bwd, expect_bwd, ids=ids,
            must_succeed=bwd_bad is False and fwd_bad is False and in_place_ok)


# ----------------------------------------------------------------------------
# the same properties against the ASan + UBSan build of the C module

ASAN_EXAMPLES = int(os.environ.get("GMPO_FUZZ_ASAN_EXAMPLES", "600"))


def _properties():
    return [n for n, f in globals().items() if n.startswith("test_") and hasattr(f, "hypothesis")]


@pytest.mark.slow
def test_fuzz_under_asan():
    """Every property, ASAN_EXAMPLES examples each, in a python whose gmpo_ext._C
    is the sanitized build: exit 0, no sanitizer report."""
    sys.path.insert(0, str(HERE))
    import _asan_build

    if _asan_build.gcc() is None:
        pytest.skip("gcc not found: cannot build the sanitized module")
    try:
        path = _asan_build.wait()
    except _asan_build.BuildFailed as e:
        pytest.fail(f"building gmpo_ext._C with ASan + UBSan failed:\n{e}")
    env = _asan_build.run_env()
    for k in ("GMPO_FUZZ_ONLY", "GMPO_FUZZ_EXCLUDE"):
        env.pop(k, None)
    env["GMPO_FUZZ_EXAMPLES"] = str(ASAN_EXAMPLES)
    env["OMP_NUM_THREADS"] = "2"
    names = _properties() + REPROS
    r = subprocess.run([sys.executable, str(HERE / "_fuzz_asan_main.py"), str(path), *names],
                       capture_output=True, text=True, env=env, cwd=str(HERE.parent), timeout=1800)
    reports = [m for m in _asan_build.SANITIZER_MARKS if m in r.stderr]
    assert r.returncode != _asan_build.SANITIZER_EXIT and not reports, \
        f"sanitizer report (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-12000:]}"
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-12000:]}"
    assert f"{len(names)} passed, 0 failed" in r.stdout, r.stdout


# ----------------------------------------------------------------------------
# reproducers of what the fuzzer found (issue 9): each asserts the behaviour
# the fuzz properties require; they also run in the sanitized subprocess

def _raises(fn, *, ids=None):
    with pytest.raises(ALLOWED) as info:
        fn()
    check_message(info.value, ids)
    return info.value


def _loss_inputs(B=3, T=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand((B, T), generator=g, dtype=torch.float64).to(dtype) - 0.1
    old = lp - 0.2
    adv = torch.tensor([1.0, -0.5, 2.0][:B] + [0.7] * max(B - 3, 0), dtype=dtype)
    mask = torch.ones((B, T), dtype=torch.bool)
    return lp, old, adv, mask


GMPO_OPTS = (0, 0, 0, 0.4, 0.4, 0.0, 0.0, 1.0, 0.0)


def repro_logits_fwd_ids_fewer_rows():
    # heap-buffer-overflow reading ids (logits_cpu.c, gmpo_logits_cpu_forward)
    logits = torch.randn(3, 4, 5)
    ids = torch.zeros((2, 4), dtype=torch.int64)
    _raises(lambda: OPS.logits_fwd(logits, ids, None, 1.0, False, False), ids=ids)


def repro_logits_fwd_ids_more_rows():
    logits = torch.randn(1, 4, 5)
    ids = torch.zeros((3, 4), dtype=torch.int64)
    _raises(lambda: OPS.logits_fwd(logits, ids, None, 1.0, False, False), ids=ids)


def repro_logits_fwd_mask_short():
    logits = torch.randn(2, 4, 5)
    ids = torch.zeros((2, 4), dtype=torch.int64)
    mask = torch.ones((2, 3), dtype=torch.bool)
    _raises(lambda: OPS.logits_fwd(logits, ids, mask, 1.0, False, False))


def repro_logits_fwd_ids_on_meta():
    logits = torch.randn(2, 4, 5)
    ids = torch.zeros((2, 4), dtype=torch.int64, device="meta")
    _raises(lambda: OPS.logits_fwd(logits, ids, None, 1.0, False, False))


def repro_logits_fwd_vocab_stride():
    # the C API takes no stride for V: a strided vocabulary axis is read as contiguous
    logits = torch.randn(2, 3, 10)[..., ::2]
    ids = torch.tensor([[0, 1, 2], [3, 4, 0]])
    try:
        logp, _, _ = OPS.logits_fwd(logits, ids, None, 1.0, False, False)
    except ALLOWED:
        return
    ref = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None]).squeeze(-1)
    close(logp, ref, 1e-5, "logp of a vocab-strided logits")


def _logits_bwd_args():
    logits = torch.randn(2, 3, 5)
    ids = torch.tensor([[0, 1, 2], [3, 4, 0]])
    logp, ent, lse = OPS.logits_fwd(logits, ids, None, 1.0, True, False)
    return logits, ids, torch.ones(2, 3), torch.ones(2, 3), lse, ent


def repro_logits_bwd_lse_short():
    logits, ids, gl, ge, lse, ent = _logits_bwd_args()
    _raises(lambda: OPS.logits_bwd(gl, ge, logits, ids, None, lse[:1], ent, 1.0))


def repro_logits_bwd_lse_float64():
    logits, ids, gl, ge, lse, ent = _logits_bwd_args()
    _raises(lambda: OPS.logits_bwd(gl, ge, logits, ids, None, lse.double()[:, :1], ent, 1.0))


def repro_logits_bwd_entropy_short():
    logits, ids, gl, ge, lse, ent = _logits_bwd_args()
    _raises(lambda: OPS.logits_bwd(gl, ge, logits, ids, None, lse, ent[:, :1], 1.0))


def repro_logits_bwd_grad_logp_short():
    logits, ids, gl, ge, lse, ent = _logits_bwd_args()
    _raises(lambda: OPS.logits_bwd(gl[:1], ge, logits, ids, None, lse, ent, 1.0))


def repro_logits_bwd_grad_entropy_short():
    logits, ids, gl, ge, lse, ent = _logits_bwd_args()
    _raises(lambda: OPS.logits_bwd(gl, ge[:, :1], logits, ids, None, lse, ent, 1.0))


def repro_logits_bwd_inplace_grad_short():
    logits, ids, gl, ge, lse, ent = _logits_bwd_args()
    _raises(lambda: OPS.logits_bwd_(logits, gl[:1], None, ids, None, lse, ent, 1.0))


def repro_loss_fwd_old_logps_short():
    lp, old, adv, mask = _loss_inputs()
    _raises(lambda: OPS.loss_fwd(lp, old[:, :2], adv, mask, None, None, *GMPO_OPTS))


def repro_loss_fwd_mask_short():
    lp, old, adv, mask = _loss_inputs()
    _raises(lambda: OPS.loss_fwd(lp, old, adv, mask[:1], None, None, *GMPO_OPTS))


def repro_loss_fwd_advantages_short():
    lp, old, adv, mask = _loss_inputs()
    _raises(lambda: OPS.loss_fwd(lp, old, adv[:1], mask, None, None, *GMPO_OPTS))


def repro_loss_fwd_advantages_3d():
    lp, old, adv, mask = _loss_inputs()
    _raises(lambda: OPS.loss_fwd(lp, old, adv[:, None, None], mask, None, None, *GMPO_OPTS))


def repro_loss_fwd_ref_logps_short():
    lp, old, adv, mask = _loss_inputs()
    opts = (0, 0, 0, 0.4, 0.4, 0.04, 0.0, 1.0, 0.0)
    _raises(lambda: OPS.loss_fwd(lp, old, adv, mask, old[:, :1], None, *opts))


def repro_loss_fwd_is_weights_short():
    lp, old, adv, mask = _loss_inputs()
    _raises(lambda: OPS.loss_fwd(lp, old, adv, mask, None, torch.ones(1), *GMPO_OPTS))


def repro_loss_fwd_is_weights_long():
    lp, old, adv, mask = _loss_inputs()
    _raises(lambda: OPS.loss_fwd(lp, old, adv, mask, None, torch.ones(3, 5), *GMPO_OPTS))


def repro_loss_fwd_mask_complex_dtype():
    # KeyError (DTYPE_CODES lookup) is not one of the documented exceptions
    lp, old, adv, mask = _loss_inputs()
    _raises(lambda: OPS.loss_fwd(lp, old, adv, mask.to(torch.complex64), None, None, *GMPO_OPTS))


def repro_loss_fwd_old_logps_on_meta():
    # a meta tensor's data pointer is 0, read as "absent": a silently wrong loss
    lp, old, adv, mask = _loss_inputs()
    _raises(lambda: OPS.loss_fwd(lp, old.to("meta"), adv, mask, None, None, *GMPO_OPTS))


def _loss_bwd_args():
    lp, old, adv, mask = _loss_inputs()
    loss, metrics, rows = OPS.loss_fwd(lp, old, adv, mask, None, None, *GMPO_OPTS)
    return (lp, old, adv, mask), rows


def repro_loss_bwd_rows_too_few():
    args, rows = _loss_bwd_args()
    _raises(lambda: OPS.loss_bwd(torch.tensor(1.0), rows[:2], *args, None, None, *GMPO_OPTS))


def repro_loss_bwd_rows_too_narrow():
    args, rows = _loss_bwd_args()
    _raises(lambda: OPS.loss_bwd(torch.tensor(1.0), rows[:, :9].contiguous(), *args, None, None,
                                 *GMPO_OPTS))


def repro_loss_bwd_rows_float32():
    args, rows = _loss_bwd_args()
    _raises(lambda: OPS.loss_bwd(torch.tensor(1.0), rows.float(), *args, None, None, *GMPO_OPTS))


def repro_loss_bwd_rows_not_contiguous():
    # read as if contiguous: a silently wrong gradient
    args, rows = _loss_bwd_args()
    want = OPS.loss_bwd(torch.tensor(1.0), rows, *args, None, None, *GMPO_OPTS)
    strided = rows.t().contiguous().t()
    try:
        got = OPS.loss_bwd(torch.tensor(1.0), strided, *args, None, None, *GMPO_OPTS)
    except ALLOWED:
        return
    close(got, want, 1e-6, "grad from non-contiguous rows")


def repro_loss_bwd_grad_loss_empty():
    args, rows = _loss_bwd_args()
    _raises(lambda: OPS.loss_bwd(torch.empty(0), rows, *args, None, None, *GMPO_OPTS))


def repro_loss_bwd_grad_loss_on_meta():
    args, rows = _loss_bwd_args()
    _raises(lambda: OPS.loss_bwd(torch.empty((), device="meta"), rows, *args, None, None,
                                 *GMPO_OPTS))


def repro_neg_view_advantages():
    lp, old, adv, mask = _loss_inputs(dtype=torch.float64)
    nadv = torch._neg_view(-adv)    # values adv, memory -adv
    got = gmpo_ext.gmpo_loss(lp, old, nadv, mask)
    want, _ = reference.gmpo_loss_reference(lp, old, adv, mask)
    close(got, want, 1e-12, "loss with neg-view advantages")


def repro_conj_imag_logps():
    lp, old, adv, mask = _loss_inputs(dtype=torch.float64)
    z = torch.complex(torch.zeros_like(lp), -lp).conj().imag    # values lp, neg bit set
    got = gmpo_ext.grpo_loss(z, old, adv, mask)
    want, _ = reference.grpo_loss_reference(lp, old, adv, mask)
    close(got, want, 1e-12, "loss with conj().imag logps")


def repro_neg_view_logits():
    logits = torch.randn(2, 3, 5)
    ids = torch.tensor([[0, 1, 2], [3, 4, 0]])
    got = gmpo_ext.selective_logps(torch._neg_view(-logits), ids)
    want = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None]).squeeze(-1)
    close(got, want, 1e-5, "logp of neg-view logits")


def repro_default_device_meta():
    # forward_backward allocated its outputs on the default device
    lp, old, adv, mask = _loss_inputs(dtype=torch.float64)
    lp = lp.requires_grad_(True)
    with torch.device("meta"):
        loss = gmpo_ext.gmpo_loss(lp, old, adv, mask)
        loss.backward()
    x = lp.detach().requires_grad_(True)
    want, _ = reference.gmpo_loss_reference(x, old, adv, mask)
    want.backward()
    close(loss, want, 1e-12, "loss under set_default_device('meta')")
    close(lp.grad, x.grad, 1e-12, "grad under set_default_device('meta')")


def repro_inplace_backward_overlapping_logits():
    # rows of the logits share memory (expand): the in-place gradient overwrites them
    base = torch.randn(1, 3, 5)
    logits = base.expand(2, 3, 5).detach().requires_grad_(True)
    ids = torch.tensor([[0, 1, 2], [3, 4, 0]])
    try:
        logp = gmpo_ext.selective_logps(logits, ids, inplace_backward=True)
        (g,) = torch.autograd.grad(logp.sum(), logits)
    except ALLOWED:
        return
    x = base.double().expand(2, 3, 5).clone().requires_grad_(True)
    torch.log_softmax(x, -1).gather(-1, ids[..., None]).sum().backward()
    close(g, x.grad, 1e-5, "in-place gradient of overlapping logits")


def repro_is_weights_b1_empty_row():
    # (B, 1) is_weights with an empty row (trl): per row in the kernel, per token
    # in gmpo_ext.reference (where an empty row's geometric mean is 1)
    lp, old, adv, mask = _loss_inputs(B=2, T=2, dtype=torch.float64)
    mask[1] = False
    w = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    got = gmpo_ext.gmpo_loss(lp, old, adv, mask, is_weights=w)
    want, _ = reference.gmpo_loss_reference(lp, old, adv, mask, is_weights=w)
    close(got, want, 1e-12, "loss with (B, 1) is_weights and an empty row")


REPROS = sorted(n for n in dir() if n.startswith("repro_"))


@pytest.mark.parametrize("name", REPROS)
def test_reproducer(name):
    globals()[name]()
