"""Input builders, runners and per-dtype tolerances shared by the loss tests.

Every comparison runs the fused op in the test dtype and the float64 oracle of
gmpo_ext.reference on the SAME values: low-precision inputs are rounded to
their dtype first and the reference reads the rounded values, so what is left
is the kernel's own arithmetic error (fp32 accumulation) and, for bf16/fp16,
the rounding of the gradient it writes in that dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

UPSTREAM = 0.37  # the upstream gradient: backward of loss * 0.37


@dataclass(frozen=True)
class Tol:
    loss: float        # |loss - ref| <= loss * scale (scale: the loss's size without cancellation)
    metric: float      # |m - ref| <= metric * (1 + |ref|) (every metric is O(1) or smaller)
    grad_rel: float    # per element, relative to the element
    grad_scale: float  # per element, relative to max |grad_ref| (the gradient's scale)
    grad_floor: float = 0.0  # absolute floor (fp16 subnormal spacing)


# Why each tolerance:
# fp64: the kernel computes in fp64 end to end; only summation order and libm's
#   exp differ from the oracle (~1e-15 relative per op, a few thousand terms).
# fp32: the kernel accumulates sums of up to 4097 fp32 terms sequentially; the
#   error of such a sum is ~n * 2^-24 relative to the running sum at worst,
#   ~1e-7 relative to the row's scale in practice (measured: under 2% of 1e-5);
#   1e-5 leaves margin for expf and for other summation orders (CUDA).
# bf16 / fp16 inputs are read exactly and computed in fp32 (loss and metrics
#   are fp32 outputs, so they get the fp32 tolerance); the gradient is written
#   in the input dtype, so each element carries that dtype's rounding: half an
#   ulp, 2^-8 relative for bf16 (8 significant bits), 2^-11 for fp16 (11 bits);
#   fp16 gradients below 2^-14 are subnormal with an absolute spacing of 2^-24,
#   which sets the floor (gradients here are ~1/(B*T), often that small).
TOLS = {
    torch.float64: Tol(loss=1e-12, metric=1e-12, grad_rel=1e-12, grad_scale=1e-12),
    torch.float32: Tol(loss=1e-5, metric=1e-5, grad_rel=1e-5, grad_scale=1e-5),
    torch.bfloat16: Tol(loss=1e-5, metric=1e-5, grad_rel=2.0 ** -8 + 1e-5, grad_scale=1e-5),
    torch.float16: Tol(loss=1e-5, metric=1e-5, grad_rel=2.0 ** -11 + 1e-5, grad_scale=1e-5,
                       grad_floor=2.0 ** -24),
}

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]


@dataclass
class Case:
    """One set of loss inputs (on the CPU; moved to the backend's device by run_fused)."""

    logps: torch.Tensor
    old_logps: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logps: Optional[torch.Tensor] = None
    is_weights: Optional[torch.Tensor] = None
    kwargs: dict = field(default_factory=dict)

    def with_(self, **kw):
        return replace(self, **kw)


def make_case(B, T, *, dtype=torch.float32, mask_kind="bool", adv_shape="B", seed=0,
              spread=0.3, empty_row=True, zero_adv=True, tail=True, ref=False,
              is_weights=None, adv_dtype=None) -> Case:
    """Random realistic inputs.

    logps in (-3.05, -0.05); log-ratios N(0, spread) (spread 0.3 puts a good share
    of tokens beyond eps = 0.4 on both sides); zeroed mask tails of random length;
    row 1 empty and row 2 with advantage exactly 0 when B >= 3; advantages of
    both signs. mask_kind: bool, int (int64), float (weights in [0.5, 1.5)).
    adv_shape: "B" (B,), "B1" (B, 1), "BT" (B, T) with some exact zeros.
    is_weights: None, "B" or "BT".
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    lp = -(torch.rand(B, T, generator=g, dtype=f64) * 3 + 0.05)
    lr = torch.randn(B, T, generator=g, dtype=f64) * spread
    old = lp - lr
    if tail:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
    else:
        lengths = torch.full((B,), T)
    if empty_row and B >= 3:
        lengths[1] = 0
    valid = torch.arange(T)[None, :] < lengths[:, None]
    if mask_kind == "bool":
        mask = valid
    elif mask_kind == "int":
        mask = valid.to(torch.int64)
    elif mask_kind == "float":
        mask = valid.to(torch.float32) * (0.5 + torch.rand(B, T, generator=g))
    else:
        raise ValueError(mask_kind)
    a = torch.randn(B, generator=g, dtype=f64)
    if B >= 2:
        a[0] = a[0].abs() + 0.1
        a[-1] = -a[-1].abs() - 0.1
    if zero_adv and B >= 3:
        a[2] = 0.0
    if adv_dtype is None:
        adv_dtype = f64 if dtype == f64 else torch.float32
    if adv_shape == "B":
        adv = a
    elif adv_shape == "B1":
        adv = a[:, None]
    elif adv_shape == "BT":
        adv = a[:, None] + 0.5 * torch.randn(B, T, generator=g, dtype=f64)
        adv[torch.rand(B, T, generator=g) < 0.1] = 0.0
        if zero_adv and B >= 3:
            adv[2] = 0.0
    else:
        raise ValueError(adv_shape)
    case = Case(lp.to(dtype), old.to(dtype), adv.to(adv_dtype), mask)
    if ref:
        case.ref_logps = (lp + 0.2 * torch.randn(B, T, generator=g, dtype=f64)).to(dtype)
    if is_weights == "BT":
        case.is_weights = torch.exp(0.3 * torch.randn(B, T, generator=g, dtype=f64)).to(dtype)
    elif is_weights == "B":
        case.is_weights = torch.exp(0.3 * torch.randn(B, generator=g, dtype=f64)).to(dtype)
    return case


def _to(t, device):
    return None if t is None else t.to(device)


def run_fused(fn, case: Case, device="cpu", upstream=UPSTREAM, **kw):
    """(loss, metrics, grad) of the fused op, on the CPU; backward of loss*upstream."""
    lp = case.logps.to(device).detach().requires_grad_(True)
    kwargs = dict(case.kwargs)
    kwargs.update(kw)
    if case.ref_logps is not None:
        kwargs.setdefault("ref_logps", _to(case.ref_logps, device))
    if case.is_weights is not None:
        kwargs.setdefault("is_weights", _to(case.is_weights, device))
    loss, metrics = fn(lp, _to(case.old_logps, device), _to(case.advantages, device),
                       _to(case.mask, device), return_metrics=True, **kwargs)
    (loss * upstream).backward()
    assert lp.grad is not None
    return loss.detach().cpu(), {k: v.detach().cpu() for k, v in metrics.items()}, lp.grad.cpu()


def run_ref(fn, case: Case, upstream=UPSTREAM, advantages=None, **kw):
    """(loss, metrics, grad) of the float64 oracle on the same (rounded) values."""
    lp = case.logps.detach().to(torch.float64).requires_grad_(True)
    kwargs = dict(case.kwargs)
    kwargs.update(kw)
    if case.ref_logps is not None:
        kwargs.setdefault("ref_logps", case.ref_logps)
    if case.is_weights is not None:
        kwargs.setdefault("is_weights", case.is_weights)
    adv = case.advantages if advantages is None else advantages
    loss, metrics = fn(lp, case.old_logps, adv, case.mask, **kwargs)
    (loss * upstream).backward()
    grad = lp.grad if lp.grad is not None else torch.zeros_like(lp)
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grad


def loss_scale(fn, case: Case, **kw):
    """The loss's size without cancellation between rows of opposite advantage sign:
    the oracle's loss with |A| (every row term then has the same sign). Callers
    take the max with |loss| itself: with |A| a row of huge ratios is clipped."""
    loss, _, _ = run_ref(fn, case, advantages=case.advantages.abs(), **kw)
    return float(loss.abs()) + 1e-30


def assert_close_loss(got, ref, tol, scale, what="loss"):
    got, ref = float(got), float(ref)
    err = abs(got - ref)
    assert err <= tol * scale, f"{what}: got {got!r}, reference {ref!r}, |err| {err:.3g} > {tol:.3g} * {scale:.3g}"


def assert_close_metrics(got: dict, ref: dict, tol: float, exact_keys=True):
    if exact_keys:
        assert set(got) == set(ref), f"metric names differ: {sorted(got)} vs {sorted(ref)}"
    else:
        missing = set(ref) - set(got)
        assert not missing, f"metrics missing: {sorted(missing)}"
    for k, r in ref.items():
        g = float(got[k])
        r = float(r)
        assert got[k].dim() == 0, f"metric {k} is not 0-d"
        assert abs(g - r) <= tol * (1 + abs(r)), f"metric {k}: got {g!r}, reference {r!r}"


def assert_close_grad(got, ref, dtype, tol: Tol, mask=None):
    assert got.dtype == dtype, f"grad dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"grad shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    g64 = got.to(torch.float64)
    if mask is not None:
        padded = (mask == 0)
        assert (g64[padded] == 0).all(), "masked tokens must get exactly zero gradient"
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    atol = tol.grad_scale * scale + tol.grad_floor
    err = (g64 - ref).abs()
    bound = tol.grad_rel * ref.abs() + atol
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"grad: {int(bad.sum())} of {bad.numel()} elements out of tolerance; first at flat "
            f"index {i}: got {float(g64.flatten()[i])!r}, reference {float(ref.flatten()[i])!r}, "
            f"bound {float(bound.flatten()[i]):.3g}")


def check_parity(fused_fn, ref_fn, case: Case, device="cpu", exact_keys=True, **kw):
    """Full comparison of loss, metrics and gradient; returns the fused results."""
    dtype = case.logps.dtype
    tol = TOLS[dtype]
    loss, metrics, grad = run_fused(fused_fn, case, device, **kw)
    rloss, rmetrics, rgrad = run_ref(ref_fn, case, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.dim() == 0
    scale = max(abs(float(rloss)), loss_scale(ref_fn, case, **kw))
    assert_close_loss(loss, rloss, tol.loss, scale)
    assert_close_metrics(metrics, rmetrics, tol.metric, exact_keys=exact_keys)
    assert_close_grad(grad, rgrad, dtype, tol, mask=case.mask)
    return loss, metrics, grad
