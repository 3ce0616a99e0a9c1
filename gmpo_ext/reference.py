"""Plain-PyTorch references of the GMPO and GRPO losses: the test oracle and the
benchmark baselines.

GMPO: Geometric-Mean Policy Optimization, Zhao et al., arXiv 2507.20673.

Each function is written the way the published implementation it mirrors is
structured (TRL's ``trl.experimental.gmpo.GMPOTrainer._compute_loss`` and
verl's ``core_algos`` loss ``geo_mean``), from the formulas, not from the fused
kernels, so that the tests compare two independent derivations. Every function
is differentiable with respect to ``logps`` through ordinary autograd.

Two deliberate differences from both published versions, shared with the fused
kernels: a token whose mask is 0 is never part of the arithmetic, so a NaN or
inf sitting in padding cannot poison its row (``NaN * 0`` is NaN in PyTorch);
and a row whose advantage multiplier is exactly 0 contributes exactly 0 even
where exp overflowed. Neither changes any finite result.

Shapes: B rows (sequences), T tokens. logps, old_logps, mask, ref_logps: (B, T);
advantages and is_weights (B,) or (B, 1) per row, (B, T) per token (a (B, 1)
tensor is per row even when T == 1).
"""

from __future__ import annotations

import torch

__all__ = [
    "gmpo_loss_reference",
    "grpo_loss_reference",
    "grpo_family_reference",
    "gamma_weights_reference",
    "off_policy_mask_reference",
    "gmpo_eager",
]


def _masked(x, mask):
    """x where the mask is non-zero, exactly 0 elsewhere (padding never enters)."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _adv_2d(advantages, B, T):
    if advantages.dim() == 1:
        return advantages.reshape(B, 1).expand(B, T)
    return advantages.expand(B, T)


def _row_is_weight(is_weights, m, denom, B):
    """(B,) and (B, 1) weights are per row and pass through; (B, T) (T != 1)
    are per token, combined per row as a geometric mean."""
    if is_weights is None:
        return None
    if is_weights.dim() == 1 or is_weights.shape[1] == 1:
        return is_weights.reshape(B)
    logw = _masked(torch.log(is_weights + 1e-10), m)
    return torch.exp((logw * m).sum(-1) / denom)


def gmpo_loss_reference(
    logps,
    old_logps,
    advantages,
    mask,
    *,
    epsilon_low=0.4,
    epsilon_high=None,
    beta=0.0,
    ref_logps=None,
    is_weights=None,
    convention="trl",
    log_ratio_clamp=None,
    normalizer=1.0,
    dtype=torch.float64,
):
    """GMPO loss and metrics, computed in ``dtype`` (float64 for the oracle).

    Returns ``(loss, metrics)``: a 0-d tensor differentiable w.r.t. ``logps`` and
    a dict of 0-d tensors with the same names the fused op reports.
    """
    if epsilon_high is None:
        epsilon_high = epsilon_low
    B, T = logps.shape
    lp = logps.to(dtype)
    olp = old_logps.to(dtype)
    m = mask.to(dtype)
    A = _adv_2d(advantages.to(dtype), B, T)
    n = m.sum(-1)

    l = _masked(lp - olp, m)
    if log_ratio_clamp is not None:
        l = torch.clamp(l, -log_ratio_clamp, log_ratio_clamp)
    lc = torch.clamp(l, -epsilon_low, epsilon_high)

    if convention == "trl":
        denom = n.clamp(min=1.0)
        y = torch.where(A > 0, torch.minimum(l, lc), torch.maximum(l, lc))
    elif convention == "verl":
        denom = n + 1e-8
        s = torch.sign(A)
        y = s * torch.minimum(s * l, s * lc)
    else:
        raise ValueError(f"convention must be 'trl' or 'verl', got {convention!r}")

    mu = (y * m).sum(-1) / denom
    r = torch.exp(mu)
    if advantages.dim() == 1 or advantages.shape[-1] == 1:
        a_row = advantages.reshape(B).to(dtype)
        a_hat = a_row if convention == "trl" else a_row * n / denom
    else:
        a_hat = (_masked(A, m) * m).sum(-1) / denom
    # A row whose multiplier is exactly 0 contributes exactly 0, even where r
    # overflowed (the published versions give 0 * inf = NaN there); NaN stays NaN.
    row_loss = torch.where((a_hat == 0) & ~torch.isnan(r), torch.zeros((), dtype=dtype), -a_hat * r)
    w = _row_is_weight(None if is_weights is None else is_weights.to(dtype), m, denom, B)
    if w is not None:
        row_loss = row_loss * w

    metrics = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        d = _masked(ref_logps.to(dtype) - lp, m)
        k = torch.exp(d) - d - 1.0
        row_loss = row_loss + beta * (k * m).sum(-1) / denom

    # B = 0: a defined zero (a plain mean over no rows would be NaN).
    loss = row_loss.sum() / max(B, 1) / normalizer

    with torch.no_grad():
        mtot = m.sum()
        if convention == "trl":
            low = ((l < -epsilon_low) & (A < 0)).to(dtype)
            high = ((l > epsilon_high) & (A > 0)).to(dtype)
            region = ((low + high) > 0).to(dtype)
            cnt = mtot.clamp(min=1.0)
            metrics["clip_ratio/low_mean"] = (low * m).sum() / cnt
            metrics["clip_ratio/high_mean"] = (high * m).sum() / cnt
            metrics["clip_ratio/region_mean"] = (region * m).sum() / cnt
        else:
            clipped = (l != lc).to(dtype)
            cnt = mtot + 1e-8
            metrics["actor/pg_clipfrac"] = (clipped * (A > 0).to(dtype) * m).sum() / cnt
            metrics["actor/pg_clipfrac_lower"] = (clipped * (A < 0).to(dtype) * m).sum() / cnt
            metrics["actor/ppo_kl"] = (-l * m).sum() / cnt
        if beta != 0.0:
            metrics["kl"] = (k * m).sum() / cnt
        nonempty = n > 0
        mu_ne = mu[nonempty & ~torch.isnan(mu)]
        metrics["gmpo/max_mean_log_ratio"] = (
            mu_ne.max() if mu_ne.numel() else torch.zeros((), dtype=dtype)
        )
        metrics["gmpo/nonfinite_rows"] = (~torch.isfinite(row_loss)).sum().to(dtype)
    return loss, metrics


def grpo_loss_reference(
    logps,
    old_logps,
    advantages,
    mask,
    *,
    epsilon_low=0.2,
    epsilon_high=None,
    beta=0.0,
    ref_logps=None,
    is_weights=None,
    loss_type="dapo",
    max_completion_length=None,
    num_items_in_batch=None,
    normalizer=1.0,
    dtype=torch.float64,
):
    """GRPO's arithmetic-mean clipped surrogate with TRL's four loss types.

    Per token: rho = exp(logp - old), loss = -min(rho*A, clamp(rho, 1-eps_low,
    1+eps_high)*A), times the rollout importance weight, plus beta * k3 KL.
    Reductions: grpo (per-row token mean, then row mean), bnpo (sum / sum of
    mask), dr_grpo (sum / (B * max_completion_length)), dapo (sum /
    num_items_in_batch, default the sum of the mask); then / normalizer.
    """
    if epsilon_high is None:
        epsilon_high = epsilon_low
    B, T = logps.shape
    lp = logps.to(dtype)
    m = mask.to(dtype)
    A = _adv_2d(advantages.to(dtype), B, T)
    l = _masked(lp - old_logps.to(dtype), m)
    rho = torch.exp(l)
    rho_c = torch.clamp(rho, 1.0 - epsilon_low, 1.0 + epsilon_high)
    ptl = -torch.minimum(rho * A, rho_c * A)
    if is_weights is not None:
        w = is_weights.to(dtype)
        ptl = ptl * (w.reshape(B, 1) if w.dim() == 1 else _masked(w, m))
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        d = _masked(ref_logps.to(dtype) - lp, m)
        k = torch.exp(d) - d - 1.0
        ptl = ptl + beta * k
    s = ptl * m
    if loss_type == "grpo":
        loss = (s.sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / max(B, 1)
    elif loss_type == "bnpo":
        loss = s.sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        L = T if max_completion_length is None else max_completion_length
        loss = s.sum() / max(B * L, 1)
    elif loss_type == "dapo":
        items = m.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
        loss = s.sum() / items
    else:
        raise ValueError(f"loss_type must be one of grpo, bnpo, dr_grpo, dapo; got {loss_type!r}")
    loss = loss / normalizer
    with torch.no_grad():
        cnt = m.sum().clamp(min=1.0)
        low = ((rho < 1.0 - epsilon_low) & (A < 0)).to(dtype)
        high = ((rho > 1.0 + epsilon_high) & (A > 0)).to(dtype)
        metrics = {
            "clip_ratio/low_mean": (low * m).sum() / cnt,
            "clip_ratio/high_mean": (high * m).sum() / cnt,
            "clip_ratio/region_mean": (((low + high) > 0).to(dtype) * m).sum() / cnt,
        }
        if beta != 0.0:
            metrics["kl"] = (k * m).sum() / cnt
    return loss, metrics


# ----------------------------------------------------------------------------
# TRL 1.16's whole GRPO family (GRPOTrainer._compute_loss and its static helpers),
# transcribed from the formulas in float64: the oracle of gmpo_ext.grpo_loss.

def off_policy_mask_reference(advantages, logps, sampling_logps, mask, threshold):
    """(B, 1) keep mask of the off-policy sequence mask (DeepSeek-V3.2): a row
    is kept when A >= 0 or the masked mean of nan_to_num(sampling - logps) is
    at most the threshold (NaN sampler tokens count 0)."""
    kl = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    kl = _masked(kl, mask)
    avg = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg <= threshold)).to(mask.dtype)


def gamma_weights_reference(advantages, log_ratio, mask, is_ratio, k_pos=2.0, lambda_pos=3.0,
                            k_neg=3.0, lambda_neg=2.0):
    """(B, 1) VESPO gamma weights phi = e^(lam + k log w - lam w), w the row's
    clamped sequence ratio (sum of clamp(l, -20, 20) over masked tokens, plus
    the clamped log importance ratios summed over every token), detached."""
    with torch.no_grad():
        lo = -18.420680743952367   # log(1e-8)
        slr = (_masked(torch.clamp(log_ratio, -20.0, 20.0), mask) * mask).sum(-1, keepdim=True)
        if is_ratio is not None:
            slr = slr + torch.clamp(torch.log(is_ratio), lo, 20.0).sum(-1, keepdim=True)
        lw = torch.clamp(slr, lo, 20.0)
        nonneg = advantages >= 0
        k = torch.where(nonneg, torch.tensor(k_pos, dtype=lw.dtype),
                        torch.tensor(k_neg, dtype=lw.dtype))
        lam = torch.where(nonneg, torch.tensor(lambda_pos, dtype=lw.dtype),
                          torch.tensor(lambda_neg, dtype=lw.dtype)).clamp(min=1e-4)
        phi = torch.exp(lam + k * lw - lam * torch.exp(lw))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_family_reference(
    logps,
    old_logps,
    advantages,
    mask,
    *,
    loss_type="dapo",
    importance_sampling_level="token",
    epsilon_low=0.2,
    epsilon_high=None,
    delta=None,
    beta=0.0,
    ref_logps=None,
    use_bias_correction_kl=False,
    off_policy_mask_threshold=None,
    sampling_logps=None,
    token_mask=None,
    is_weights=None,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    entropies=None,
    entropy_coef=0.0,
    max_completion_length=None,
    num_items_in_batch=None,
    normalizer=1.0,
    dtype=torch.float64,
):
    """TRL 1.16's GRPOTrainer._compute_loss (train mode, GA = normalizer) for
    every loss type and both importance-sampling levels, in ``dtype``.

    The loss of dapo, cispo and vespo is sum / num_items_in_batch / normalizer
    (see gmpo_ext.grpo_loss for the mapping of TRL's normaliser). Returns
    (loss, metrics) with TRL's metric names; differentiable in logps (and in
    entropies).
    """
    if epsilon_high is None:
        epsilon_high = epsilon_low
    B, T = logps.shape
    lp = logps.to(dtype)
    m = mask.to(dtype)
    A = advantages.to(dtype)
    A = A.reshape(B, 1) if A.dim() == 1 else A
    old = old_logps.to(dtype)
    log_ratio = _masked(lp - old, m)
    if importance_sampling_level == "token":
        liw = log_ratio
    else:
        liw = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(liw)
    if off_policy_mask_threshold is not None:
        slp = old if sampling_logps is None else sampling_logps.to(dtype)
        keep = off_policy_mask_reference(A if A.shape[1] == 1 else A[:, :1], lp, slp, m,
                                         off_policy_mask_threshold)
    if beta != 0.0:
        d = _masked(ref_logps.to(dtype) - lp, m)
        kl = torch.exp(d) - d - 1.0
        if use_bias_correction_kl:
            kl = kl * coef_1
    if loss_type == "cispo":
        ptl = -torch.clamp(coef_1, max=epsilon_high).detach() * A * lp
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        ptl = -torch.min(coef_1 * A, coef_2 * A)
    elif loss_type == "sapo":
        # the temperatures in dtype (torch.where with two Python floats gives float32)
        tau = torch.where(A > 0, torch.tensor(sapo_temperature_pos, dtype=dtype),
                          torch.tensor(sapo_temperature_neg, dtype=dtype))
        ptl = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * A
    elif loss_type == "vespo":
        isr = None if is_weights is None else is_weights.to(dtype)
        if isr is not None and isr.dim() == 1:
            isr = isr.reshape(B, 1)
        phi = gamma_weights_reference(A, log_ratio, m, isr, vespo_k_pos, vespo_lambda_pos,
                                      vespo_k_neg, vespo_lambda_neg)
        ptl = -phi * A * lp
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if off_policy_mask_threshold is not None:
        ptl = ptl * keep
    if token_mask is not None:
        ptl = ptl * token_mask.to(dtype)
    if is_weights is not None and loss_type != "vespo":
        w = is_weights.to(dtype)
        ptl = ptl * (w.reshape(B, 1) if w.dim() == 1 else _masked(w, m))
    if beta != 0.0:
        ptl = ptl + beta * kl
    s = _masked(ptl.expand(B, T), m) * m
    if loss_type in ("grpo", "sapo"):
        loss = (s.sum(-1) / m.sum(-1).clamp(min=1.0)).mean() if B else s.sum()
    elif loss_type == "bnpo":
        loss = s.sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        L = T if max_completion_length is None else max_completion_length
        loss = s.sum() / max(B * L, 1)
    elif loss_type == "luspo":
        loss = s.sum(-1).mean() if B else s.sum()
    else:
        items = m.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
        loss = s.sum() / items
    loss = loss / normalizer
    if entropies is not None and entropy_coef != 0.0:
        me = m if token_mask is None else m * token_mask.to(dtype)
        ent = entropies.to(dtype)
        loss = loss - entropy_coef * (ent * me).sum() / me.sum().clamp(min=1.0) / normalizer

    def gmean(x):   # TRL's global_masked_mean
        if x.shape[1] == 1:
            return x.sum() / max(B, 1)
        return (x * m).sum() / m.sum().clamp(min=1.0)

    with torch.no_grad():
        metrics = {}
        if beta != 0.0:
            metrics["kl"] = gmean(_masked(kl.expand(B, T), m))
        if entropies is not None:
            metrics["entropy"] = gmean(entropies.to(dtype))
        if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            low = ((coef_1 < 1 - epsilon_low) & (A < 0)).to(dtype)
            high = ((coef_1 > 1 + epsilon_high) & (A > 0)).to(dtype)
            metrics["clip_ratio/low_mean"] = gmean(low)
            metrics["clip_ratio/high_mean"] = gmean(high)
            metrics["clip_ratio/region_mean"] = gmean(((low + high) > 0).to(dtype))
        elif loss_type == "cispo":
            metrics["cispo_clip_ratio"] = gmean(((coef_1 > epsilon_high) & (A > 0)).to(dtype))
        elif loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = gmean(phi)
    return loss, metrics


def gmpo_eager(logps, old_logps, advantages, mask, epsilon_low=0.4, epsilon_high=0.4, normalizer=1.0):
    """The eager TRL-style GMPO formula in the inputs' own dtype: the benchmark baseline.

    This is what a trainer runs without gmpo_ext (about 15 elementwise ops).
    """
    log_ratio = logps - old_logps
    clamped = torch.clamp(log_ratio, min=-epsilon_low, max=epsilon_high)
    a = advantages.unsqueeze(1)
    clipped = torch.where(a > 0, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped))
    m = mask.to(logps.dtype)
    coef = torch.exp((clipped * m).sum(-1) / m.sum(-1).clamp(min=1.0))
    return (-coef * advantages).mean() / normalizer
