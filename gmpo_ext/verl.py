"""GMPO in verl, fused: the policy loss ``gmpo_fused``, a drop-in for verl's ``geo_mean``.

Select it in the actor config once this module is imported in every verl process:

    actor_rollout_ref.actor.policy_loss.loss_mode=gmpo_fused

Ways to get it imported (any one):

* nothing to do with verl >= 0.9 when gmpo_ext is pip-installed: gmpo_ext
  declares a ``verl.plugins`` entry point, which ``import verl`` loads in every
  process (unless ``VERL_USE_EXTERNAL_PLUGINS=none``);
* ``VERL_USE_EXTERNAL_MODULES=gmpo_ext.verl`` in the environment of the driver
  and the Ray workers (verl imports the listed modules on ``import verl``);
* ``import gmpo_ext.verl`` in your own entry script before verl builds the actor.

The function has verl's policy-loss signature and return (the one of
``compute_policy_loss_geo_mean`` in verl 0.6 to 0.9):
``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights) -> (pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
"actor/pg_clipfrac_lower"})``, the metrics as Python floats like verl's. It
computes :func:`gmpo_ext.gmpo_loss` with ``convention="verl"``: the clip range
is ``config.clip_ratio_low`` / ``config.clip_ratio_high`` (falling back to
``config.clip_ratio``) in LOG space, token-level advantages give the clip side
per token and the row multiplier as their masked mean, a zero advantage drops
its tokens, ``rollout_is_weights`` (B, T) are combined per row as
``exp(masked mean log(w + 1e-10))``, the loss is the plain mean over rows, and
``loss_agg_mode`` is not used (as in geo_mean). Two differences, neither
changing a finite result: a masked token never enters the arithmetic, so NaN
in padding cannot poison a row, and a row whose multiplier is exactly 0
contributes exactly 0 even where its ratio overflowed.

Batch-size invariance. verl's ``geo_mean`` takes ``torch.mean`` over the rows
of each micro-batch, so a mini-batch cut into micro-batches of unequal sizes
(``use_dynamic_bsz``, uneven data-parallel shards) weighs its rows unequally:
the summed gradient is not the whole mini-batch's. Where verl provides the
global batch size (``config.global_batch_info``, filled by the actor's
``ppo_loss`` in verl's new engine: ``dp_size`` and ``global_batch_size``, the
rows of the mini-batch over all data-parallel ranks), ``gmpo_fused`` follows
the contract of verl's ``agg_loss`` for its seq-mean modes: the row losses are
summed and divided by ``global_batch_size``, times ``dp_size`` to cancel the
averaging of the gradients over the data-parallel ranks (``num_rows`` and
``normalizer`` of :func:`gmpo_ext.gmpo_loss`). Then every cut of the
mini-batch gives its exact gradient. Where verl does not provide it (the
legacy workers, ``global_batch_size`` None), the loss is the plain mean over
the micro-batch's rows, exactly ``geo_mean``, and inherits its dependence on
the cut; a warning says so once when the micro-batches seen differ in size.

verl's own policy losses, fused. Next to ``gmpo_fused`` the module registers
``vanilla_fused``, ``gspo_fused``, ``cispo_fused`` and ``sapo_fused``
(:func:`compute_policy_loss_vanilla_fused` and the others): verl's
``vanilla``, ``gspo``, ``cispo`` and ``sapo`` with the same signature, return
and metrics, computed by :func:`gmpo_ext.grpo_loss` with ``convention="verl"``
(one pass over the tokens, the gradient written by the same kernels). They
read the config as verl does: ``clip_ratio_low`` / ``clip_ratio_high``
(falling back to ``clip_ratio``) in RATIO space, ``clip_ratio_c`` (vanilla's
dual clip, default 3.0), ``tau_pos`` / ``tau_neg`` (sapo) and
``global_batch_info`` (``dp_size``, ``batch_num_tokens``,
``global_batch_size``, ``loss_scale_factor``, handed to verl's ``agg_loss``).
vanilla, cispo and gspo aggregate by ``loss_agg_mode`` (gspo as verl 0.9.1's
does; with verl 0.9.0 installed, always by "seq-mean-token-mean" as that
release's gspo), sapo always by "seq-mean-token-mean", as verl's. The modes
are verl 0.9's ``agg_loss``: "token-mean", "token-sum", "seq-mean-token-sum",
"seq-mean-token-mean", "seq-mean-token-sum-norm" (over ``loss_scale_factor``,
default the horizon). Select one with, e.g.,
``actor_rollout_ref.actor.policy_loss.loss_mode=gspo_fused``.

Importing this module without verl installed defines the functions and
registers nothing (``REGISTERED`` is False); :func:`register` registers
``gmpo_fused`` by hand, :func:`register_all` every mode of ``LOSS_MODES``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from .loss import gmpo_loss, grpo_loss

__all__ = ["LOSS_MODE", "LOSS_MODES", "compute_policy_loss_gmpo_fused",
           "compute_policy_loss_vanilla_fused", "compute_policy_loss_gspo_fused",
           "compute_policy_loss_cispo_fused", "compute_policy_loss_sapo_fused", "register",
           "register_all", "REGISTERED"]

LOSS_MODE = "gmpo_fused"
REGISTERED = False


def _option(config, name):
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(name)
    return getattr(config, name, None)


def _clip_range(config, mode=LOSS_MODE):
    if config is None:
        raise ValueError(f"{mode}: config (verl's actor config) is required: it carries "
                         "clip_ratio, clip_ratio_low and clip_ratio_high")
    clip = _option(config, "clip_ratio")
    low = _option(config, "clip_ratio_low")
    high = _option(config, "clip_ratio_high")
    low = clip if low is None else low
    high = clip if high is None else high
    if low is None or high is None:
        raise ValueError(f"{mode}: config has no clip_ratio (nor clip_ratio_low and "
                         "clip_ratio_high)")
    return float(low), float(high)


_seen_sizes = set()


def _as_int(name, v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    try:
        out = int(v)
    except (TypeError, ValueError):
        raise TypeError(f"gmpo_fused: config.global_batch_info[{name!r}] must be an integer, "
                        f"got {v!r}") from None
    if out != v:
        raise TypeError(f"gmpo_fused: config.global_batch_info[{name!r}] must be an integer, "
                        f"got {v!r}")
    return out


def _global_rows(config, log_prob):
    """(num_rows, normalizer) from verl's global batch info, or (None, 1.0)."""
    info = _option(config, "global_batch_info")
    gbs = _option(info, "global_batch_size") if info is not None else None
    if gbs is None:
        B = int(log_prob.shape[0])
        if B not in _seen_sizes:
            _seen_sizes.add(B)
            if len(_seen_sizes) == 2:
                warnings.warn("gmpo_fused: micro-batches of different sizes and no "
                              "config.global_batch_info['global_batch_size'] from verl: the "
                              "loss is the mean over each micro-batch's rows (as geo_mean), so "
                              "the summed gradient depends on how the mini-batch is cut",
                              stacklevel=3)
        return None, 1.0
    dp = _option(info, "dp_size")
    dp = 1 if dp is None else _as_int("dp_size", dp)
    if dp < 1:
        raise ValueError(f"gmpo_fused: config.global_batch_info['dp_size'] must be >= 1, got {dp}")
    return _as_int("global_batch_size", gbs), 1.0 / dp


def compute_policy_loss_gmpo_fused(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GMPO's clipped geometric-mean policy loss for verl, fused (arXiv 2507.20673).

    Args:
        old_log_prob: (B, T) log-probs under the rollout (old) policy.
        log_prob: (B, T) log-probs under the current policy (gets the gradient).
        advantages: (B, T) token-level (verl's layout) or (B,) per row.
        response_mask: (B, T) bool / int / float mask of the response tokens.
        loss_agg_mode: not used (GMPO normalises each row inside the geometric
            mean), as in verl's geo_mean.
        config: verl's actor config (``ActorConfig`` or a DictConfig) with
            ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``: the LOG-space
            clip range; and ``global_batch_info`` (``dp_size``,
            ``global_batch_size``) where verl fills it: the loss is then
            sum_i L_i / global_batch_size * dp_size (batch-size invariant).
        rollout_is_weights: optional (B, T) rollout-correction weights.

    Returns:
        ``(pg_loss, metrics)``: the 0-d loss and ``actor/pg_clipfrac``,
        ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` as floats.
    """
    low, high = _clip_range(config)
    num_rows, normalizer = _global_rows(config, log_prob)
    loss, m = gmpo_loss(log_prob, old_log_prob, advantages, response_mask,
                        epsilon_low=low, epsilon_high=high, is_weights=rollout_is_weights,
                        convention="verl", num_rows=num_rows, normalizer=normalizer,
                        return_metrics=True)
    metrics = {
        "actor/pg_clipfrac": m["actor/pg_clipfrac"].item(),
        "actor/ppo_kl": m["actor/ppo_kl"].item(),
        "actor/pg_clipfrac_lower": m["actor/pg_clipfrac_lower"].item(),
    }
    return loss, metrics


def _verl_mode(mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
               config, rollout_is_weights):
    name = f"{mode}_fused"
    if config is None:
        raise ValueError(f"{name}: config (verl's actor config) is required")
    kw = {}
    if mode != "sapo":
        kw["epsilon_low"], kw["epsilon_high"] = _clip_range(config, name)
    if mode == "vanilla":
        cc = _option(config, "clip_ratio_c")
        kw["clip_ratio_c"] = 3.0 if cc is None else float(cc)   # verl's default
    if mode == "sapo":
        for key, arg in (("tau_pos", "sapo_temperature_pos"), ("tau_neg", "sapo_temperature_neg")):
            v = _option(config, key)
            if v is None:
                raise ValueError(f"{name}: config has no {key} (SAPO's temperature)")
            kw[arg] = float(v)
    loss, m = grpo_loss(log_prob, old_log_prob, advantages, response_mask, convention="verl",
                        loss_type=mode, is_weights=rollout_is_weights,
                        loss_agg_mode=loss_agg_mode,
                        global_batch_info=_option(config, "global_batch_info"),
                        return_metrics=True, **kw)
    metrics = {k: m[k].item() for k in ("actor/pg_clipfrac", "actor/ppo_kl",
                                         "actor/pg_clipfrac_lower")}
    return loss, metrics


def compute_policy_loss_vanilla_fused(old_log_prob, log_prob, advantages, response_mask,
                                      loss_agg_mode: str = "token-mean", config=None,
                                      rollout_is_weights=None):
    """verl's ``vanilla`` (PPO clip with the dual clip ``clip_ratio_c``), fused.

    Args and return as verl's ``compute_policy_loss_vanilla``: ``(pg_loss,
    {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})``, the
    metrics as floats. ``config``: ``clip_ratio``, ``clip_ratio_low``,
    ``clip_ratio_high`` (ratio space), ``clip_ratio_c`` (default 3.0),
    ``global_batch_info``. See :func:`gmpo_ext.grpo_loss`, ``convention="verl"``.
    """
    return _verl_mode("vanilla", old_log_prob, log_prob, advantages, response_mask,
                      loss_agg_mode, config, rollout_is_weights)


def compute_policy_loss_gspo_fused(old_log_prob, log_prob, advantages, response_mask,
                                   loss_agg_mode: str = "seq-mean-token-mean", config=None,
                                   rollout_is_weights=None):
    """verl's ``gspo`` (sequence-level ratio, clamped at e^10), fused; aggregated
    by ``loss_agg_mode`` as verl 0.9.1's, or always by "seq-mean-token-mean"
    where the installed verl is 0.9.0 (that release's gspo ignores the mode)."""
    if _gspo_ignores_agg_mode():
        loss_agg_mode = "seq-mean-token-mean"
    return _verl_mode("gspo", old_log_prob, log_prob, advantages, response_mask,
                      loss_agg_mode, config, rollout_is_weights)


_GSPO_IGNORES = None


def _gspo_ignores_agg_mode() -> bool:
    """True where the installed verl's gspo aggregates by "seq-mean-token-mean"
    whatever loss_agg_mode says (verl 0.9.0 and older; 0.9.1 honours it)."""
    global _GSPO_IGNORES
    if _GSPO_IGNORES is None:
        from importlib import metadata
        try:
            version = metadata.version("verl")
        except metadata.PackageNotFoundError:
            _GSPO_IGNORES = False
        else:
            _GSPO_IGNORES = _release(version) < (0, 9, 1)
    return _GSPO_IGNORES


def _release(version: str) -> tuple:
    """(major, minor, micro) of a version string: "0.9.1.dev0+abc" -> (0, 9, 1)."""
    import re
    nums = []
    for part in version.split("+")[0].split(".")[:3]:
        m = re.match(r"\d+", part)
        nums.append(int(m.group()) if m else 0)
        if not m or m.end() < len(part):   # "1rc1": stop after the pre-release's number
            break
    return tuple(nums + [0] * (3 - len(nums)))


def compute_policy_loss_cispo_fused(old_log_prob, log_prob, advantages, response_mask,
                                    loss_agg_mode: str = "token-mean", config=None,
                                    rollout_is_weights=None):
    """verl's ``cispo`` (``-sg(clip(r, 1-low, 1+high)) * A * log_prob``), fused."""
    return _verl_mode("cispo", old_log_prob, log_prob, advantages, response_mask,
                      loss_agg_mode, config, rollout_is_weights)


def compute_policy_loss_sapo_fused(old_log_prob, log_prob, advantages, response_mask,
                                   loss_agg_mode: str = "seq-mean-token-mean", config=None,
                                   rollout_is_weights=None):
    """verl's ``sapo`` (the soft gate, ``config.tau_pos`` / ``tau_neg``), fused;
    always "seq-mean-token-mean", as verl's."""
    return _verl_mode("sapo", old_log_prob, log_prob, advantages, response_mask,
                      loss_agg_mode, config, rollout_is_weights)


LOSS_MODES = {
    LOSS_MODE: compute_policy_loss_gmpo_fused,
    "vanilla_fused": compute_policy_loss_vanilla_fused,
    "gspo_fused": compute_policy_loss_gspo_fused,
    "cispo_fused": compute_policy_loss_cispo_fused,
    "sapo_fused": compute_policy_loss_sapo_fused,
}


def register_all():
    """Register every function of ``LOSS_MODES`` in verl's policy-loss registry."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    for name, fn in LOSS_MODES.items():
        register_policy_loss(name)(fn)


def register(name: str = LOSS_MODE):
    """Register :func:`compute_policy_loss_gmpo_fused` in verl's policy-loss registry."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    register_policy_loss(name)(compute_policy_loss_gmpo_fused)
    return compute_policy_loss_gmpo_fused


try:
    import verl.trainer.ppo.core_algos  # noqa: F401
except ImportError:   # verl not installed (or one of its own imports missing)
    pass
else:
    register_all()
    REGISTERED = True
