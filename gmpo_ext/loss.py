"""Public API: gmpo_loss, grpo_loss and their nn.Module wrappers."""

from __future__ import annotations

import numbers
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from .ops import fused_loss

__all__ = ["gmpo_loss", "grpo_loss", "GMPOLoss", "GRPOLoss"]

_TOKEN_DTYPES = _backend.FLOAT_DTYPES
_MASK_DTYPES = tuple(_backend.DTYPE_CODES)
_METRIC_NAMES = {
    "trl": ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"),
    "verl": ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"),
}
MAX_MEAN_LOG_RATIO = "gmpo/max_mean_log_ratio"
NONFINITE_ROWS = "gmpo/nonfinite_rows"


_check_tensor = _backend.check_tensor


_SYMBOLIC = (torch.SymInt, torch.SymFloat)


def _check_number(name, x, *, min_value=None, allow_zero=True, allow_none=False):
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, (numbers.Real,) + _SYMBOLIC):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    # plain comparisons (not math.isfinite) so that torch.compile(dynamic=True),
    # which traces a float option as symbolic, turns them into guards
    if not (x - x == 0):
        raise ValueError(f"{name} must be finite, got {x}")
    if min_value is not None and x < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {x}")
    if not allow_zero and x == 0:
        raise ValueError(f"{name} must be non-zero")


_check_inputs = _backend.check_loss_inputs


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; "
                         f"got {value!r}")


_warned_constant_grads = False


def _warn_constant_grads(**tensors):
    """Only logps gets a gradient; say so once if another input wants one."""
    global _warned_constant_grads
    if _warned_constant_grads or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    names = [k for k, t in tensors.items() if isinstance(t, Tensor) and t.requires_grad]
    if names:
        _warned_constant_grads = True
        warnings.warn(f"gmpo_ext: {', '.join(names)} require grad but are treated as constants "
                      "(only logps gets a gradient, as in TRL and verl); detach them to "
                      "silence this warning", stacklevel=3)


def _epsilons(epsilon_low, epsilon_high):
    _check_number("epsilon_low", epsilon_low, min_value=0.0)
    if epsilon_high is None:
        epsilon_high = epsilon_low
    _check_number("epsilon_high", epsilon_high, min_value=0.0)
    return float(epsilon_low), float(epsilon_high)


def _metrics_dict(metrics, names, beta, gmpo):
    out = {names[0]: metrics[0], names[1]: metrics[1], names[2]: metrics[2]}
    if beta != 0:
        out["kl"] = metrics[3]
    if gmpo:
        out[MAX_MEAN_LOG_RATIO] = metrics[4]
    out[NONFINITE_ROWS] = metrics[5]
    return out


def gmpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.4,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    ref_logps: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    convention: str = "trl",
    log_ratio_clamp: Optional[float] = None,
    normalizer: float = 1.0,
    num_rows: Optional[int] = None,
    group=None,
    return_metrics: bool = False,
):
    """GMPO's clipped geometric-mean policy loss (arXiv 2507.20673), fused.

    Per row i: ``L_i = -Ahat_i * exp(sum_t m*y / D_i) * w_i + beta * KL_i`` with
    ``y`` the token log-ratio ``logps - old_logps`` clipped one-sidedly in log
    space by the advantage's sign; the loss is ``mean_i L_i / normalizer``.

    Args:
        logps: (B, T) log-probs of the sampled tokens under the current policy;
            float32, float64, float16 or bfloat16. The only input that gets a
            gradient (in its own dtype).
        old_logps: (B, T) log-probs under the policy that sampled them.
        advantages: (B,) or (B, 1) per row, or (B, T) per token (verl's
            semantics: the clip side follows each token's sign and the row's
            multiplier is the masked mean of its advantages).
        mask: (B, T) bool, integer or float (float = token weights).
        epsilon_low, epsilon_high: the clip range in LOG space: log-ratios are
            kept within (-epsilon_low, epsilon_high). Default 0.4 both (the
            paper's and TRL's); epsilon_high None means epsilon_low.
        beta: coefficient of the k3 KL to the reference policy (needs ref_logps).
        ref_logps: (B, T) reference-model log-probs.
        is_weights: rollout-engine importance weights: (B, T) per token,
            combined per row as a geometric mean (verl), or (B,) or (B, 1)
            per row (a (B, 1) tensor is per row even when T == 1). They
            multiply the row's policy term.
        convention: "trl" or "verl": reproduces TRL's GMPOTrainer or verl's
            ``geo_mean`` policy loss exactly, including empty rows (trl: D =
            max(n, 1), a row with no tokens contributes -A_i; verl: D = n + 1e-8,
            it contributes 0) and zero advantages (verl: the tokens are dropped).
        log_ratio_clamp: optional safety clamp of the log-ratio to [-C, C]
            before anything else (verl uses 20 in its other losses).
        normalizer: the loss is divided by it (gradient-accumulation steps); > 0.
        num_rows: the number of rows of the whole batch (across data-parallel
            ranks and gradient-accumulation steps): the row losses are summed
            and divided by it (times normalizer) instead of averaged over the
            B rows at hand, so micro-batches of any sizes add up to exactly
            the whole batch's loss and gradient. None: the mean over B.
        group: a torch.distributed process group whose ranks each hold some of
            every row's tokens (context / sequence parallelism; any split, the
            mask says which tokens are present; per-row advantages and
            importance weights the same on every rank). The row statistics
            are all-reduced in one collective of B * 8 float64 values before
            the geometric mean: every rank gets the whole batch's loss and
            metrics, and the exact gradient of its own tokens (see
            gmpo_ext.distributed for gradient averaging over the group).
        return_metrics: also return a dict of 0-d tensors on the input's
            device (no host sync): trl: ``clip_ratio/low_mean``,
            ``clip_ratio/high_mean``, ``clip_ratio/region_mean``; verl:
            ``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower``,
            ``actor/ppo_kl``; ``kl`` when beta != 0; in both,
            ``gmpo/max_mean_log_ratio`` (the largest mu_i: exp overflows in fp32
            past 88.7) and ``gmpo/nonfinite_rows``.

    Masked tokens (mask == 0) never enter the arithmetic: NaN in padding cannot
    poison a row. A NaN among real tokens gives a NaN loss, and the row is
    counted in ``gmpo/nonfinite_rows``. A row whose multiplier is exactly 0
    contributes exactly 0, even where exp overflowed. B == 0 gives loss 0.

    Returns:
        The 0-d loss (float32, or float64 for float64 logps), or
        ``(loss, metrics)`` with ``return_metrics=True``.
    """
    loss, metrics, _ = _gmpo(logps, old_logps, advantages, mask, epsilon_low, epsilon_high,
                             beta, ref_logps, is_weights, convention, log_ratio_clamp,
                             normalizer, num_rows, group, None)
    if not return_metrics:
        return loss
    return loss, _metrics_dict(metrics, _METRIC_NAMES[convention], beta, gmpo=True)


def _gmpo(logps, old_logps, advantages, mask, epsilon_low, epsilon_high, beta, ref_logps,
          is_weights, convention, log_ratio_clamp, normalizer, num_rows, group, extra):
    """gmpo_loss's checks and call: (loss, metrics tensor, extra sums reduced over
    the group with the row sums, or None)."""
    _check_choice("convention", convention, _backend.CONVENTIONS)
    el, eh = _epsilons(epsilon_low, epsilon_high)
    _check_number("beta", beta)
    _check_number("log_ratio_clamp", log_ratio_clamp, allow_none=True)
    if log_ratio_clamp is not None and log_ratio_clamp <= 0:
        raise ValueError(f"log_ratio_clamp must be > 0 or None, got {log_ratio_clamp}")
    _check_number("normalizer", normalizer, allow_zero=False, min_value=0.0)
    _check_inputs(logps, old_logps, advantages, mask, ref_logps, is_weights, beta)
    if group is not None:
        _distributed().check_group("group", group)
    norm = _distributed().rows_normalizer("num_rows", num_rows, logps.shape[0],
                                          float(normalizer)) if num_rows is not None \
        else float(normalizer)
    _warn_constant_grads(old_logps=old_logps, advantages=advantages, ref_logps=ref_logps,
                         is_weights=is_weights)
    opts = (_backend.ALGO_GMPO, _backend.CONVENTIONS[convention], 0, el, eh, float(beta),
            float(log_ratio_clamp or 0.0), norm, 0.0)
    ref = ref_logps if beta != 0 else None
    if group is None:
        loss, metrics, _ = fused_loss(logps, old_logps, advantages, mask, ref, is_weights, *opts)
        return loss, metrics, extra
    loss, metrics, _, reduced = _distributed().group_loss(logps, old_logps, advantages, mask,
                                                          ref, is_weights, opts, group, extra)
    return loss, metrics, reduced


def _distributed():
    from . import distributed   # imports torch.distributed only when asked for
    return distributed


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    ref_logps: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    loss_type: str = "dapo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    normalizer: float = 1.0,
    num_rows: Optional[int] = None,
    group=None,
    return_metrics: bool = False,
):
    """GRPO's arithmetic-mean clipped surrogate, fused, as TRL's GRPOTrainer computes it.

    Per token: ``rho = exp(logps - old_logps)``, ``loss_t = -min(rho*A,
    clamp(rho, 1-epsilon_low, 1+epsilon_high)*A)`` (RATIO space), times
    ``is_weights``, plus ``beta * k3``. Reduced by ``loss_type``:
    "grpo" (token mean per row, then mean over rows), "bnpo" (sum / sum of
    mask), "dr_grpo" (sum / (B * max_completion_length), default T), "dapo"
    (sum / num_items_in_batch, default the sum of the mask); then divided by
    ``normalizer``. Shapes, dtypes and the other arguments as in
    :func:`gmpo_loss`; ``is_weights`` is per token (B, T) or per row (B,) or (B, 1).
    Metrics: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean``, ``kl`` (beta != 0), ``gmpo/nonfinite_rows``.
    ``group``: rows split over the ranks of a process group, as in
    :func:`gmpo_loss` (the per-row sums, token counts included, are
    all-reduced once, so every loss type sees whole rows and the whole mask).
    ``num_rows``: the whole batch's row count (as in :func:`gmpo_loss`), for
    the loss types that average over rows: "grpo" sums the row means and
    "dr_grpo" the rows' sums, each divided by num_rows (times
    max_completion_length for dr_grpo, which must then be given) instead of
    the B rows at hand, so micro-batches of any sizes add up to the whole
    batch. "bnpo" and "dapo" divide by tokens, not rows: for those pass the
    whole batch's token count as ``num_items_in_batch`` with loss_type="dapo"
    (TRL's own fix of bnpo).
    """
    _check_choice("loss_type", loss_type, _backend.LOSS_TYPES)
    el, eh = _epsilons(epsilon_low, epsilon_high)
    if el > 1:
        raise ValueError(f"epsilon_low must be <= 1 for GRPO (ratio space), got {el}")
    _check_number("beta", beta)
    _check_number("normalizer", normalizer, allow_zero=False, min_value=0.0)
    denom = 0.0
    items_tensor = None
    if max_completion_length is not None:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
            raise TypeError("max_completion_length must be an int, got "
                            f"{type(max_completion_length).__name__}")
        _check_number("max_completion_length", max_completion_length, min_value=1)
        if loss_type == "dr_grpo":
            denom = float(max_completion_length)
    if loss_type == "dapo" and num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            # TRL passes a tensor: divide on the device (no host sync, traceable)
            if num_items_in_batch.numel() != 1:
                raise ValueError("num_items_in_batch must be a number or a one-element tensor")
            items_tensor = num_items_in_batch.reshape(())
            denom = 1.0
        else:
            _check_number("num_items_in_batch", num_items_in_batch, allow_zero=False,
                          min_value=0.0)
            denom = float(num_items_in_batch)
    _check_inputs(logps, old_logps, advantages, mask, ref_logps, is_weights, beta)
    if group is not None:
        _distributed().check_group("group", group)
    norm = float(normalizer)
    if num_rows is not None:
        if loss_type not in ("grpo", "dr_grpo"):
            raise ValueError(f"num_rows applies to the loss types that average over rows "
                             f"('grpo', 'dr_grpo'); loss_type={loss_type!r} divides by "
                             "tokens: pass the whole batch's token count as "
                             "num_items_in_batch with loss_type='dapo'")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("num_rows with loss_type='dr_grpo' needs max_completion_length: "
                             "its default, this call's padded width T, differs between "
                             "micro-batches padded to their own lengths")
        norm = _distributed().rows_normalizer("num_rows", num_rows, logps.shape[0], norm)
    _warn_constant_grads(old_logps=old_logps, advantages=advantages, ref_logps=ref_logps,
                         is_weights=is_weights)
    opts = (_backend.ALGO_GRPO, 0, _backend.LOSS_TYPES[loss_type], el, eh, float(beta), 0.0,
            norm, denom)
    ref = ref_logps if beta != 0 else None
    if group is None:
        loss, metrics, _ = fused_loss(logps, old_logps, advantages, mask, ref, is_weights, *opts)
    else:
        loss, metrics, _, _ = _distributed().group_loss(logps, old_logps, advantages, mask, ref,
                                                        is_weights, opts, group)
    if items_tensor is not None:
        loss = loss / items_tensor.to(device=loss.device, dtype=loss.dtype)
    if not return_metrics:
        return loss
    return loss, _metrics_dict(metrics, _METRIC_NAMES["trl"], beta, gmpo=False)


class GMPOLoss(torch.nn.Module):
    """nn.Module form of :func:`gmpo_loss`; the constructor takes its options."""

    def __init__(self, epsilon_low=0.4, epsilon_high=None, beta=0.0, convention="trl",
                 log_ratio_clamp=None, normalizer=1.0, return_metrics=False, group=None):
        super().__init__()
        if group is not None:
            _distributed().check_group("group", group)
        self.group = group
        _check_choice("convention", convention, _backend.CONVENTIONS)
        _epsilons(epsilon_low, epsilon_high)
        _check_number("beta", beta)
        _check_number("log_ratio_clamp", log_ratio_clamp, allow_none=True, min_value=0.0)
        _check_number("normalizer", normalizer, allow_zero=False, min_value=0.0)
        self.kwargs = dict(epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
                           convention=convention, log_ratio_clamp=log_ratio_clamp,
                           normalizer=normalizer, return_metrics=return_metrics)

    def forward(self, logps, old_logps, advantages, mask, ref_logps=None, is_weights=None,
                num_rows=None):
        """num_rows: the whole batch's row count for this call (see gmpo_loss)."""
        return gmpo_loss(logps, old_logps, advantages, mask, ref_logps=ref_logps,
                         is_weights=is_weights, num_rows=num_rows, group=self.group,
                         **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class GRPOLoss(torch.nn.Module):
    """nn.Module form of :func:`grpo_loss`; the constructor takes its options."""

    def __init__(self, epsilon_low=0.2, epsilon_high=None, beta=0.0, loss_type="dapo",
                 max_completion_length=None, normalizer=1.0, return_metrics=False):
        super().__init__()
        _check_choice("loss_type", loss_type, _backend.LOSS_TYPES)
        _epsilons(epsilon_low, epsilon_high)
        _check_number("beta", beta)
        _check_number("normalizer", normalizer, allow_zero=False, min_value=0.0)
        self.kwargs = dict(epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
                           loss_type=loss_type, max_completion_length=max_completion_length,
                           normalizer=normalizer, return_metrics=return_metrics)

    def forward(self, logps, old_logps, advantages, mask, ref_logps=None, is_weights=None,
                num_items_in_batch=None, num_rows=None):
        """num_items_in_batch, num_rows: this call's (see grpo_loss)."""
        return grpo_loss(logps, old_logps, advantages, mask, ref_logps=ref_logps,
                         is_weights=is_weights, num_items_in_batch=num_items_in_batch,
                         num_rows=num_rows, **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
