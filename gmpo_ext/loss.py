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


_CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_TOKEN_NORMALISED = ("dapo", "cispo", "vespo")   # divided by num_items_in_batch


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
    importance_sampling_level: str = "token",
    delta: Optional[float] = None,
    off_policy_mask_threshold: Optional[float] = None,
    sampling_logps: Optional[Tensor] = None,
    use_bias_correction_kl: bool = False,
    token_mask: Optional[Tensor] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    entropies: Optional[Tensor] = None,
    entropy_coef: float = 0.0,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    normalizer: float = 1.0,
    num_rows: Optional[int] = None,
    group=None,
    return_metrics: bool = False,
    convention: str = "trl",
    loss_agg_mode: Optional[str] = None,
    clip_ratio_c: Optional[float] = None,
    global_batch_info=None,
):
    """TRL 1.16's GRPO loss family, fused, exactly as ``GRPOTrainer._compute_loss``;
    with ``convention="verl"``, verl's policy losses instead (see below).

    Per token, with ``coef = exp(logps - old_logps)`` (token level) or the
    row's ``exp(sum m*l / max(n, 1))`` (``importance_sampling_level=
    "sequence"``, GSPO) and ``A`` the advantage, the policy term ``P``:

    - "grpo", "bnpo", "dr_grpo", "dapo", "luspo": ``-min(c1*A, c2*A)`` with
      ``c2 = clamp(coef, 1-epsilon_low, 1+epsilon_high)`` (RATIO space) and
      ``c1 = coef``, or ``min(coef, delta)`` with ``delta`` (two-sided clipping);
    - "cispo": ``-sg(min(coef, epsilon_high)) * A * logps`` (the cap is
      epsilon_high itself, as in TRL);
    - "sapo": ``-(4/tau) * sigmoid(tau * (coef - 1)) * A``, tau =
      sapo_temperature_pos where A > 0, sapo_temperature_neg elsewhere;
    - "vespo": ``-sg(phi) * A * logps``, phi TRL's ``get_gamma_weights`` of the
      row (k, lambda by the sign of A; is_weights enter phi, clamped in log
      space and summed over ALL T tokens as TRL does, instead of multiplying P).

    ``P`` is multiplied by the row's off-policy keep (``off_policy_mask_threshold``:
    a row with A < 0 whose mean of ``nan_to_num(sampling_logps - logps)`` over
    its tokens exceeds the threshold is dropped; NaN sampler tokens count 0;
    ``sampling_logps`` defaults to ``old_logps``, as TRL), by ``token_mask``
    (TRL's top-entropy mask) and by ``is_weights`` (TRL's
    ``importance_sampling_ratio``, per token (B, T) or per row (B,) / (B, 1);
    not for vespo); then ``beta * k3`` is added (``use_bias_correction_kl``:
    k3 times coef, its gradient through coef as in TRL). The masked sum is
    reduced by ``loss_type``: grpo, sapo: token mean per row, mean over rows;
    bnpo: / sum of mask; dr_grpo: / (B * max_completion_length, default T);
    dapo, cispo, vespo: / num_items_in_batch (default the sum of mask); luspo:
    the row sums' mean over rows. Everything is then divided by ``normalizer``.

    With ``entropies`` (B, T) and ``entropy_coef`` != 0 the entropy bonus is
    subtracted: ``entropy_coef * sum(entropies * m_eff) / max(sum(m_eff), 1) /
    normalizer``, ``m_eff = mask * token_mask`` (mask alone without
    token_mask); ``entropies`` gets its gradient (it may require grad).

    Mapping from TRL's ``_compute_loss`` (train mode, GA = the current
    gradient-accumulation steps): ``normalizer=GA`` for every type;
    grpo, bnpo, dr_grpo, sapo, luspo need nothing else (dr_grpo:
    ``max_completion_length``); dapo, cispo, vespo divide by
    ``inputs["num_items_in_batch"] / num_processes * GA / steps_per_generation``:
    pass ``num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1) /
    num_processes / steps_per_generation`` (a tensor is divided on the device)
    and ``normalizer=GA``, so that ``sum / num_items_in_batch / normalizer`` is
    TRL's loss and the entropy bonus is divided by GA as TRL divides it.
    ``is_weights`` is ``inputs["importance_sampling_ratio"]`` where TRL applies
    it (vLLM with importance-sampling correction), ``token_mask`` TRL's
    ``entropy_mask``, ``sampling_logps`` ``inputs["sampling_per_token_logps"]``.

    Sequence level (GSPO) in log space: the clip bounds are compared with the
    row's mean log-ratio ``s`` as logs, and ``exp`` is taken of the clipped
    value only, in float64. Where ``s`` is large (fp32: ``exp(s)`` > 3.4e38,
    s > 88.7) TRL's ``exp(s)`` is inf: for a clipped row (A > 0 past
    1+epsilon_high, or with delta, or cispo's cap) TRL's loss is finite but its
    gradient 0 * inf = NaN, where ours is the exact 0; a zero advantage gives
    TRL NaN (inf * 0) and us 0; sapo's sigmoid saturates and TRL's gradient is
    0 * inf = NaN, ours 0. Where the true value itself exceeds the output
    dtype (an unclipped ratio e^s with A < 0 and no delta) both are inf. Away
    from overflow the two agree to rounding (a ratio exactly on a bound may
    compare differently as a log: one ulp).

    Per-token advantages (B, T) work at token level; the sequence level,
    off_policy_mask_threshold and vespo need one advantage per row.

    Non-finite inputs: a NaN or +-inf log-prob on a real token gives a NaN (or
    inf) loss counted in ``gmpo/nonfinite_rows``, as TRL's loss is NaN, also
    where the row's multiplier is 0 (vespo's phi, cispo's coef or A == 0:
    0 * NaN). Padding (mask == 0) never enters the arithmetic, and vespo
    differs from TRL there: with NaN or inf in a padded ``logps`` /
    ``old_logps`` TRL's loss is finite only because its unmasked
    ``clamp(l) * mask`` is NaN * 0, so phi becomes 0 and the whole row drops
    out; here the padding is masked and the row keeps its true phi. Where
    ``old_logps`` is NaN on a real token that token's gradient is NaN (as
    TRL's autograd), the other tokens' are finite.
    ``epsilon_low`` bounds the ratio of the clip types only (grpo, bnpo,
    dr_grpo, dapo, luspo: <= 1); cispo, sapo and vespo ignore it, as TRL.

    Metrics (``return_metrics``), TRL's names: ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (grpo, bnpo,
    dr_grpo, dapo, luspo), ``cispo_clip_ratio``, ``vespo/phi_seq_mean``,
    ``kl`` (beta != 0), ``entropy`` (entropies given; the plain mask's mean),
    ``gmpo/nonfinite_rows``. Token-level metrics are means over tokens,
    sequence-level ones and phi means over rows, as TRL's global_masked_mean.

    ``group``: rows split over the ranks of a process group, as in
    :func:`gmpo_loss` (the per-row sums, the entropy sums too, are
    all-reduced once). ``num_rows``: the whole batch's row count, for the
    types that average over rows ("grpo", "dr_grpo", "sapo", "luspo"; dr_grpo
    needs max_completion_length, with ``group`` too: its default T would be
    each rank's local width): rows are summed and divided by num_rows
    instead of B. Shapes, dtypes: as :func:`gmpo_loss`; sampling_logps and
    token_mask (B, T) (token_mask bool, integer or float).

    ``convention="verl"``: verl's ``compute_policy_loss_{vanilla,gspo,cispo,sapo}``
    (verl/trainer/ppo/core_algos.py, verl 0.9), ``loss_type`` one of
    "vanilla", "gspo", "cispo", "sapo". With ``l = logps - old_logps`` clamped
    to [-20, 20] (no gradient outside) and ``r = exp(l)``, per token:

    - "vanilla": ``max(-A r, -A clamp(r, 1-epsilon_low, 1+epsilon_high))``, for
      A < 0 capped at ``-A * clip_ratio_c`` (dual clip; default 3.0, > 1);
    - "gspo": every token's ratio is the row's ``s = exp(min(mu, 10))``, ``mu``
      the row's mean of the UNclamped l (over max(n, 1)), with the gradient of
      the token's own logp (verl's ``sg[s] * p / sg[p]``; none where mu > 10);
      then vanilla's surrogate without the dual clip;
    - "cispo": ``-sg(clamp(r, 1-epsilon_low, 1+epsilon_high)) * A * logps``;
    - "sapo": ``-(4/tau) sigmoid(tau (r - 1)) A``, tau = sapo_temperature_pos
      where A > 0, sapo_temperature_neg elsewhere.

    ``is_weights`` (verl's ``rollout_is_weights``, (B, T) or per row)
    multiply the token's loss. Aggregation is verl 0.9's ``agg_loss`` with
    ``loss_agg_mode`` (default "token-mean"; gspo's "seq-mean-token-mean", as
    the defaults of verl's functions; sapo always "seq-mean-token-mean", as
    verl's) and ``global_batch_info`` (a dict or object with ``dp_size``,
    ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``, each
    optional, but with dp_size > 1 the mode's global count is required, as in
    verl): "token-mean" ``sum m*loss / batch_num_tokens * dp_size``
    (default the mask's sum); "token-sum" ``sum m*loss * dp_size``;
    "seq-mean-token-sum" and "seq-mean-token-mean" the rows' sums (or token
    means over ``n + 1e-8``) summed ``/ global_batch_size * dp_size`` (default
    the non-empty rows); "seq-mean-token-sum-norm" seq-mean-token-sum's value
    ``/ loss_scale_factor`` (default the horizon T). Then ``/ normalizer``. Advantages may vary inside a row (per
    token, as verl's (B, T)). Metrics, verl's: ``actor/pg_clipfrac``,
    ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` (0 for gspo, cispo, sapo;
    0 pg_clipfrac for sapo), as 0-d tensors, means over the mask's sum + 1e-8;
    and ``gmpo/nonfinite_rows``. Differences, none changing a finite result:
    masked tokens never enter the arithmetic (NaN padding stays out), an
    all-empty batch gives 0 where verl's 0 / 0 is NaN, and everything
    accumulates in fp32 (fp64 for fp64 inputs) where verl computes in the
    inputs' dtype. TRL's options (beta, delta, the off-policy mask, token_mask,
    entropies, entropy_coef, num_items_in_batch, num_rows, group, ...) are not
    verl's and raise, naming the argument and verl's counterpart where it has
    one (``group``: verl's data parallelism goes through ``global_batch_info``).
    :func:`gmpo_ext.grpo_loss_from_logits` and
    :func:`gmpo_ext.grpo_loss_from_hidden` take the same convention and options.
    """
    if convention != "trl":
        _check_choice("convention", convention, _backend.CONVENTIONS)
        _reject_trl_options(beta=beta, ref_logps=ref_logps,
                            importance_sampling_level=importance_sampling_level, delta=delta,
                            off_policy_mask_threshold=off_policy_mask_threshold,
                            sampling_logps=sampling_logps,
                            use_bias_correction_kl=use_bias_correction_kl,
                            token_mask=token_mask, entropies=entropies,
                            entropy_coef=entropy_coef,
                            max_completion_length=max_completion_length,
                            num_items_in_batch=num_items_in_batch, num_rows=num_rows,
                            group=group)
        return _grpo_loss_verl(logps, old_logps, advantages, mask, loss_type, epsilon_low,
                               epsilon_high, is_weights, loss_agg_mode, clip_ratio_c,
                               global_batch_info, sapo_temperature_pos, sapo_temperature_neg,
                               normalizer, return_metrics)
    if loss_agg_mode is not None or clip_ratio_c is not None or global_batch_info is not None:
        raise ValueError("loss_agg_mode, clip_ratio_c and global_batch_info are options of "
                         "convention='verl'")
    _check_choice("loss_type", loss_type, _backend.FAMILY_LOSS_TYPES)
    if importance_sampling_level != "token":
        _check_choice("importance_sampling_level", importance_sampling_level, _backend.IS_LEVELS)
    el, eh = _epsilons(epsilon_low, epsilon_high)
    if el > 1 and loss_type in _CLIP_TYPES:   # cispo, sapo, vespo do not use it (as TRL)
        raise ValueError(f"epsilon_low must be <= 1 for the clip types (the ratio's lower "
                         f"bound is 1 - epsilon_low), got {el}")
    _check_number("beta", beta)
    _check_number("normalizer", normalizer, allow_zero=False, min_value=0.0)
    if delta is not None:
        _check_number("delta", delta)
        if delta <= 0:
            raise ValueError(f"delta must be > 0 or None, got {delta}")
    if off_policy_mask_threshold is not None:
        _check_number("off_policy_mask_threshold", off_policy_mask_threshold)
    if use_bias_correction_kl is not False and use_bias_correction_kl is not True:
        raise TypeError("use_bias_correction_kl must be a bool, got "
                        f"{type(use_bias_correction_kl).__name__}")
    # (the defaults need no check: the common call stays as cheap as before)
    if (sapo_temperature_pos, sapo_temperature_neg) != (1.0, 1.05):
        for name, x in (("sapo_temperature_pos", sapo_temperature_pos),
                        ("sapo_temperature_neg", sapo_temperature_neg)):
            _check_number(name, x, allow_zero=False, min_value=0.0)
    if (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg) != (2.0, 3.0, 3.0, 2.0):
        for name, x in (("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
                        ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg)):
            _check_number(name, x)
    if entropy_coef != 0 or type(entropy_coef) is not float:
        _check_number("entropy_coef", entropy_coef)
    denom = 0.0
    items_tensor = None
    if max_completion_length is not None:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
            raise TypeError("max_completion_length must be an int, got "
                            f"{type(max_completion_length).__name__}")
        _check_number("max_completion_length", max_completion_length, min_value=1)
        if loss_type == "dr_grpo":
            denom = float(max_completion_length)
    if loss_type in _TOKEN_NORMALISED and num_items_in_batch is not None:
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
    if sampling_logps is not None or token_mask is not None:
        _backend.check_family_inputs(logps, sampling_logps, token_mask)
    B, T = logps.shape
    if entropies is not None:
        _check_tensor("entropies", entropies, _TOKEN_DTYPES)
        if tuple(entropies.shape) != (B, T):
            raise ValueError(f"entropies must have the shape of logps {(B, T)}, got "
                             f"{tuple(entropies.shape)}")
        _backend.check_device("entropies", entropies, logps.device)
    elif entropy_coef != 0:
        raise ValueError("entropies is required when entropy_coef != 0 (the entropy bonus)")
    seq = importance_sampling_level == "sequence"
    if ((seq or off_policy_mask_threshold is not None or loss_type == "vespo")
            and advantages.dim() == 2 and advantages.shape[1] != 1 and T > 1):
        raise ValueError("advantages must be one per row, (B,) or (B, 1), with "
                         "importance_sampling_level='sequence', off_policy_mask_threshold or "
                         "loss_type='vespo' (a row quantity decides the row's loss)")
    if group is not None:
        _distributed().check_group("group", group)
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("group= with loss_type='dr_grpo' needs max_completion_length: "
                             "its default, the padded width T, is each rank's own local "
                             "width")
    norm = float(normalizer)
    if num_rows is not None:
        if loss_type not in ("grpo", "dr_grpo", "sapo", "luspo"):
            raise ValueError(f"num_rows applies to the loss types that average over rows "
                             f"('grpo', 'dr_grpo', 'sapo', 'luspo'); loss_type={loss_type!r} "
                             "divides by tokens: pass the whole batch's token count as "
                             "num_items_in_batch with loss_type='dapo'")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("num_rows with loss_type='dr_grpo' needs max_completion_length: "
                             "its default, this call's padded width T, differs between "
                             "micro-batches padded to their own lengths")
        norm = _distributed().rows_normalizer("num_rows", num_rows, B, norm)
    _warn_constant_grads(old_logps=old_logps, advantages=advantages, ref_logps=ref_logps,
                         is_weights=is_weights, sampling_logps=sampling_logps)
    bc = use_bias_correction_kl and beta != 0
    family = None
    if (loss_type in _backend.LOSS_TYPES and not seq and delta is None and not bc
            and off_policy_mask_threshold is None and token_mask is None):
        algo, lt = _backend.ALGO_GRPO, _backend.LOSS_TYPES[loss_type]   # the existing kernels
    else:
        algo, lt = _backend.ALGO_FAMILY, _backend.FAMILY_LOSS_TYPES[loss_type]
        opm = off_policy_mask_threshold is not None
        fopts = (int(seq), int(delta is not None), int(opm), int(bc),
                 float(delta) if delta is not None else 0.0,
                 float(off_policy_mask_threshold) if opm else 0.0,
                 float(sapo_temperature_pos), float(sapo_temperature_neg),
                 float(vespo_k_pos), float(vespo_lambda_pos), float(vespo_k_neg),
                 float(vespo_lambda_neg))
        slp = (sampling_logps if sampling_logps is not None else old_logps) if opm else None
        family = (slp, token_mask, fopts)
    opts = (algo, 0, lt, el, eh, float(beta), 0.0, norm, denom)
    ref = ref_logps if beta != 0 else None
    ent_on = entropies is not None
    extra = None
    if ent_on:
        m = mask if mask.dtype.is_floating_point else mask.to(torch.float32)
        m_eff = m if token_mask is None else m * token_mask.to(m.dtype)
        ent = entropies.to(torch.float64 if entropies.dtype == torch.float64 else torch.float32)
        ent_sum = (ent * m_eff).sum()
        eff_n = m_eff.sum().to(ent.dtype)
        ent_metric = (ent.detach() * m).sum()
        extra = torch.stack([ent_sum.detach(), eff_n, ent_metric.to(ent.dtype)])
    if group is None:
        loss, metrics, _ = fused_loss(logps, old_logps, advantages, mask, ref, is_weights, *opts,
                                      family=family)
        reduced = extra
    else:
        loss, metrics, _, reduced = _distributed().group_loss(
            logps, old_logps, advantages, mask, ref, is_weights, opts, group, extra, family)
    if items_tensor is not None:
        loss = loss / items_tensor.to(device=loss.device, dtype=loss.dtype)
    if ent_on:
        reduced = reduced.to(ent.dtype)
        # the whole group's sum, with the gradient of this process's tokens
        total = ent_sum + (reduced[0] - ent_sum.detach())
        bonus = total / reduced[1].clamp(min=1.0) / norm_entropy(normalizer)
        if entropy_coef != 0:
            loss = loss - (entropy_coef * bonus).to(loss.dtype)
    if not return_metrics:
        return loss
    out = {}
    if loss_type in _CLIP_TYPES:
        out = {n: metrics[k] for k, n in enumerate(_METRIC_NAMES["trl"])}
    elif loss_type == "cispo":
        out["cispo_clip_ratio"] = metrics[0]
    elif loss_type == "vespo":
        out["vespo/phi_seq_mean"] = metrics[0]
    if beta != 0:
        out["kl"] = metrics[3]
    if ent_on:
        out["entropy"] = (reduced[2] / metrics[6].to(reduced.dtype).clamp(min=1.0)).to(
            metrics.dtype)
    out[NONFINITE_ROWS] = metrics[5]
    return loss, out


VERL_LOSS_TYPES = ("vanilla", "gspo", "cispo", "sapo")
# verl's agg_loss modes (verl 0.9)
VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                  "seq-mean-token-sum-norm")
_VERL_GBI_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


# the TRL-only options of grpo_loss, and what verl has in their place (the
# error names the argument and, where verl has one, its counterpart)
_VERL_INSTEAD = {
    "group": "group= splits each row's tokens over ranks, which verl's losses do not do "
             "(verl gathers a row's log-probs before its policy loss); verl's data "
             "parallelism goes through global_batch_info (dp_size, batch_num_tokens, "
             "global_batch_size), the supported route: each rank passes its own rows and "
             "the global counts",
    "num_rows": "the whole batch's row count is global_batch_info['global_batch_size'] "
                "(the seq-mean loss_agg_modes)",
    "num_items_in_batch": "the whole batch's token count is "
                          "global_batch_info['batch_num_tokens'] (loss_agg_mode='token-mean')",
    "max_completion_length": "a fixed length divisor is global_batch_info['loss_scale_factor'] "
                             "with loss_agg_mode='seq-mean-token-sum-norm'",
    "entropy_coef": "verl adds its entropy bonus outside the policy loss",
    "entropies": "verl adds its entropy bonus outside the policy loss",
}


def _reject_trl_options(beta=0.0, ref_logps=None, importance_sampling_level="token", delta=None,
                        off_policy_mask_threshold=None, sampling_logps=None,
                        use_bias_correction_kl=False, token_mask=None, entropies=None,
                        entropy_coef=0.0, max_completion_length=None, num_items_in_batch=None,
                        num_rows=None, group=None):
    """convention="verl": raise, naming the first of grpo_loss's TRL-only
    options that is set (the defaults are grpo_loss's)."""
    given = dict(beta=beta != 0, ref_logps=ref_logps is not None,
                 importance_sampling_level=importance_sampling_level != "token",
                 delta=delta is not None,
                 off_policy_mask_threshold=off_policy_mask_threshold is not None,
                 sampling_logps=sampling_logps is not None,
                 use_bias_correction_kl=use_bias_correction_kl is not False,
                 token_mask=token_mask is not None,
                 # entropy_coef before entropies: the loss-from-logits / -hidden
                 # functions pass entropies themselves when entropy_coef is set
                 entropy_coef=entropy_coef != 0, entropies=entropies is not None,
                 max_completion_length=max_completion_length is not None,
                 num_items_in_batch=num_items_in_batch is not None,
                 num_rows=num_rows is not None, group=group is not None)
    for name, is_set in given.items():
        if is_set:
            hint = _VERL_INSTEAD.get(name)
            raise ValueError(f"{name} is an option of convention='trl' (TRL's GRPO family); "
                             "verl's policy losses (convention='verl') do not take it"
                             + (f": {hint}" if hint else ""))


def _verl_agg_mode(loss_type, loss_agg_mode):
    """The loss_agg_mode verl's ``loss_type`` aggregates with: sapo always
    seq-mean-token-mean (verl's sapo ignores it); None: the defaults of verl's
    functions (gspo seq-mean-token-mean, the others token-mean)."""
    _check_choice("loss_type", loss_type, VERL_LOSS_TYPES)
    if loss_agg_mode is not None:
        _check_choice("loss_agg_mode", loss_agg_mode, VERL_AGG_MODES)
    if loss_type == "sapo":
        return "seq-mean-token-mean"
    if loss_agg_mode is None:
        return "seq-mean-token-mean" if loss_type == "gspo" else "token-mean"
    return loss_agg_mode


def _check_gbi_kind(global_batch_info):
    if global_batch_info is not None and not isinstance(global_batch_info, dict) \
            and not hasattr(global_batch_info, "get") \
            and not any(hasattr(global_batch_info, k) for k in _VERL_GBI_KEYS):
        raise TypeError("global_batch_info must be a dict (or DictConfig, or an object) with "
                        f"{', '.join(_VERL_GBI_KEYS)}; got {type(global_batch_info).__name__}")


def _gbi_value(info, key):
    if info is None:
        return None
    if isinstance(info, dict):
        v = info.get(key)
    elif hasattr(info, "get") and not isinstance(info, Tensor):   # DictConfig
        v = info.get(key, None)
    else:
        v = getattr(info, key, None)
    if v is None:
        return None
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"global_batch_info[{key!r}] must be a number or a one-element "
                             f"tensor, got shape {tuple(v.shape)}")
        v = v.item()
    name = f"global_batch_info[{key!r}]"
    _check_number(name, v, allow_zero=False, min_value=0.0)
    if key in ("dp_size", "global_batch_size") and v != int(v):
        raise ValueError(f"{name} must be an integer, got {v}")
    return float(v)


def _grpo_loss_verl(logps, old_logps, advantages, mask, loss_type, epsilon_low, epsilon_high,
                    is_weights, loss_agg_mode, clip_ratio_c, global_batch_info, tau_pos,
                    tau_neg, normalizer, return_metrics):
    """grpo_loss(convention="verl"): verl's vanilla, gspo, cispo, sapo (see grpo_loss)."""
    mode = _verl_agg_mode(loss_type, loss_agg_mode)
    el, eh = _epsilons(epsilon_low, epsilon_high)
    if el > 1:
        raise ValueError(f"epsilon_low must be <= 1 (ratio space), got {el}")
    _check_number("normalizer", normalizer, allow_zero=False, min_value=0.0)
    cc = 0.0
    if loss_type == "vanilla":
        cc = 3.0 if clip_ratio_c is None else clip_ratio_c
        _check_number("clip_ratio_c", cc)
        if not cc > 1:
            raise ValueError(f"clip_ratio_c must be > 1 (the dual clip's lower bound of the "
                             f"ratio), got {cc}")
    elif clip_ratio_c is not None:
        raise ValueError("clip_ratio_c is vanilla's (the dual clip); loss_type="
                         f"{loss_type!r} does not take it")
    if loss_type == "sapo":
        for name, x in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
            _check_number(name, x, allow_zero=False, min_value=0.0)
    _check_gbi_kind(global_batch_info)
    dp = _gbi_value(global_batch_info, "dp_size")
    _check_inputs(logps, old_logps, advantages, mask, None, is_weights, 0.0)
    # verl's agg_loss on the kernel's three aggregations (csrc/gmpo_math.h,
    # gmpo_verl_row_weight): the loss divided by the mode's denominator (0:
    # the kernel's default, the mask's sum or the non-empty rows) times
    # normalizer / dp_size; token-sum is token-mean over 1, and
    # seq-mean-token-sum-norm is seq-mean-token-sum over loss_scale_factor
    # (default: the horizon, mask.shape[-1])
    code = {"token-mean": _backend.VERL_AGG_MODES["token-mean"],
            "token-sum": _backend.VERL_AGG_MODES["token-mean"],
            "seq-mean-token-mean": _backend.VERL_AGG_MODES["seq-mean-token-mean"]}.get(
                mode, _backend.VERL_AGG_MODES["seq-mean-token-sum"])
    key = None
    if mode == "token-mean":
        key = "batch_num_tokens"
    elif mode != "token-sum":
        key = "global_batch_size"
    denom = 1.0 if key is None else (_gbi_value(global_batch_info, key) or 0.0)
    if key is not None and denom == 0.0 and dp is not None and dp > 1:
        # verl's agg_loss refuses too: the local count would scale the loss wrongly
        raise ValueError(f"global_batch_info[{key!r}] (the global count) is required with "
                         f"dp_size > 1 and loss_agg_mode={mode!r}, as in verl's agg_loss")
    norm = float(normalizer)
    if dp is not None:
        norm = norm / dp      # verl multiplies every mode by dp_size
    if mode == "seq-mean-token-sum-norm":
        lsf = _gbi_value(global_batch_info, "loss_scale_factor")
        if lsf is None:
            if mask.shape[-1] == 0:
                raise ValueError("loss_agg_mode='seq-mean-token-sum-norm' divides by "
                                 "global_batch_info['loss_scale_factor'], by default the "
                                 "horizon mask.shape[-1], which is 0 here: pass "
                                 "loss_scale_factor")
            lsf = float(mask.shape[-1])
        norm = norm * lsf
    _warn_constant_grads(old_logps=old_logps, advantages=advantages, is_weights=is_weights)
    lt = 0 if loss_type in ("vanilla", "gspo") else _backend.FAMILY_LOSS_TYPES[loss_type]
    fopts = (int(loss_type == "gspo"), 0, 0, 0, 0.0, 0.0, float(tau_pos), float(tau_neg),
             2.0, 3.0, 3.0, 2.0, code, float(cc))
    opts = (_backend.ALGO_FAMILY, _backend.CONVENTIONS["verl"], lt, el, eh, 0.0, 0.0, norm,
            float(denom))
    loss, metrics, _ = fused_loss(logps, old_logps, advantages, mask, None, is_weights, *opts,
                                  family=(None, None, fopts))
    if not return_metrics:
        return loss
    names = _METRIC_NAMES["verl"]
    out = {names[0]: metrics[0], names[2]: metrics[2], names[1]: metrics[1],
           NONFINITE_ROWS: metrics[5]}
    return loss, out


def norm_entropy(normalizer):
    """The entropy bonus's divisor: TRL divides it by the accumulation steps
    only (``normalizer``), never by the loss type's own normaliser."""
    return float(normalizer)


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
    """nn.Module form of :func:`grpo_loss`; the constructor takes its options
    (every keyword of grpo_loss but the tensors and the per-call counts)."""

    def __init__(self, epsilon_low=0.2, epsilon_high=None, beta=0.0, loss_type="dapo",
                 max_completion_length=None, normalizer=1.0, return_metrics=False, *,
                 importance_sampling_level="token", delta=None, off_policy_mask_threshold=None,
                 use_bias_correction_kl=False, sapo_temperature_pos=1.0,
                 sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                 vespo_k_neg=3.0, vespo_lambda_neg=2.0, entropy_coef=0.0, group=None):
        super().__init__()
        _check_choice("loss_type", loss_type, _backend.FAMILY_LOSS_TYPES)
        _check_choice("importance_sampling_level", importance_sampling_level, _backend.IS_LEVELS)
        _epsilons(epsilon_low, epsilon_high)
        _check_number("beta", beta)
        _check_number("normalizer", normalizer, allow_zero=False, min_value=0.0)
        if group is not None:
            _distributed().check_group("group", group)
        self.group = group
        self.kwargs = dict(epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
                           loss_type=loss_type, max_completion_length=max_completion_length,
                           normalizer=normalizer, return_metrics=return_metrics,
                           importance_sampling_level=importance_sampling_level, delta=delta,
                           off_policy_mask_threshold=off_policy_mask_threshold,
                           use_bias_correction_kl=use_bias_correction_kl,
                           sapo_temperature_pos=sapo_temperature_pos,
                           sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos,
                           vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                           vespo_lambda_neg=vespo_lambda_neg, entropy_coef=entropy_coef)

    def forward(self, logps, old_logps, advantages, mask, ref_logps=None, is_weights=None,
                num_items_in_batch=None, num_rows=None, *, sampling_logps=None,
                token_mask=None, entropies=None):
        """num_items_in_batch, num_rows: this call's (see grpo_loss)."""
        return grpo_loss(logps, old_logps, advantages, mask, ref_logps=ref_logps,
                         is_weights=is_weights, num_items_in_batch=num_items_in_batch,
                         num_rows=num_rows, sampling_logps=sampling_logps,
                         token_mask=token_mask, entropies=entropies, group=self.group,
                         **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
