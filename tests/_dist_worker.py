"""The process side of tests/test_distributed.py: each spawned rank joins a gloo
group on loopback, runs every scenario of its world size, and compares its
loss, metrics and gradients with the single-process result it computes itself
on the whole batch (same seed on every rank). A mismatch raises in the rank,
which torch.multiprocessing.spawn re-raises in the test.

Scenarios (B rows, T tokens, V vocabulary):
  seq       rows split over ranks: contiguous token slices and an arbitrary
            (interleaved) split through the mask; both conventions, KL, token
            and row importance weights, token advantages; fp32 and fp64; GRPO
  vocab     logits (B, T+1, V/P) sharded on the vocabulary: selective_logps
            (logp, entropy, gradient) and gmpo_loss_from_logits
  verl      convention="verl" (verl's vanilla, gspo, cispo, sapo) from
            vocabulary-sharded logits and head (tests/test_verl_paths.py)
  both      (4 ranks) 2 sequence x 2 vocabulary ranks, gmpo_loss_from_logits
  dp        data parallel with unequal micro-batches and accumulation steps:
            num_rows makes the summed losses and gradients the whole batch's
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

BACKEND = "c"
TOL = 1e-6   # fp32: relative, with an absolute floor of TOL * max|ref|


def _close(name, got, ref, tol=TOL, floor=1e-2):
    """Elementwise relative error <= tol, each element's error measured against
    max(|ref|, floor * max|ref|) (floor=1: normwise, against the largest)."""
    got = torch.as_tensor(got).detach().to(torch.float64).cpu()
    ref = torch.as_tensor(ref).detach().to(torch.float64).cpu()
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
    if not torch.equal(torch.isnan(got), torch.isnan(ref)):
        raise AssertionError(f"{name}: NaN pattern differs")
    g, r = got[~torch.isnan(got)], ref[~torch.isnan(ref)]
    if g.numel() == 0:
        return
    scale = r.abs().max().clamp(min=1e-30)
    err = ((g - r).abs() / torch.maximum(r.abs(), scale * floor)).max()
    if not err <= tol:
        raise AssertionError(f"{name}: max relative error {float(err):.3g} > {tol} "
                             f"(got {g.flatten()[:6].tolist()}, ref {r.flatten()[:6].tolist()})")


def _metrics_close(prefix, got, ref, tol=TOL):
    if set(got) != set(ref):
        raise AssertionError(f"{prefix}: metric names {sorted(got)} != {sorted(ref)}")
    for k in ref:
        _close(f"{prefix} metric {k}", got[k], ref[k], tol)


def _batch(seed, B, T, dtype=torch.float32, token_adv=False, token_isw=False, row_isw=False,
           beta=0.0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1] = False                                   # an empty row
    if B > 3:
        mask[3, T // 2:] = False                      # a zeroed tail
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64)
    if token_adv:
        # verl's layout: a row's advantage on each token, here with noise and a
        # few tokens of the other sign (the clip side is per token). Not
        # independent random signs: their masked mean would cancel, and fp32
        # sums in any two orders then differ by more than 1e-6 of the result
        adv = adv + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
        adv[2, :4] = -adv[2, :4]
    else:
        adv = adv.reshape(B)
    adv.view(-1)[0] = 0.0                             # a zero advantage
    out = dict(logps=logps.to(dtype), old_logps=old.to(dtype), advantages=adv.to(dtype),
               mask=mask)
    if beta:
        out["ref_logps"] = (logps + torch.randn(B, T, generator=g, dtype=torch.float64)
                            * 0.2).to(dtype)
    if token_isw:
        out["is_weights"] = (torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    elif row_isw:
        out["is_weights"] = (torch.rand(B, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return out


def _slices(T, world, rank, how, seed=0):
    """(token index tensor of this rank) for a contiguous or an arbitrary split."""
    if how == "contiguous":
        bounds = [T * k // world for k in range(world)] + [T]
        bounds[1] = max(bounds[1] - 2, 1)             # unequal slices
        return torch.arange(bounds[rank], bounds[rank + 1])
    owner = torch.randint(0, world, (T,), generator=torch.Generator().manual_seed(seed + 7))
    return torch.nonzero(owner == rank).flatten()


def _local(batch, idx, per_token_keys=("logps", "old_logps", "mask", "ref_logps")):
    out = {}
    for k, v in batch.items():
        if k in per_token_keys or (v.dim() == 2 and v.shape[1] > 1):
            out[k] = v[:, idx].contiguous()
        else:
            out[k] = v
    return out


def _grad_of(fn, x, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, **kw)
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    loss.backward()
    return loss.detach(), metrics, x.grad


# ----------------------------------------------------------------------------
# scenarios

def seq_split(rank, world, group):
    import gmpo_ext

    cases = [
        ("trl kl rowisw contiguous", "contiguous", torch.float32,
         dict(convention="trl", beta=0.04), dict(row_isw=True, beta=0.04)),
        ("verl tokadv tokisw any", "any", torch.float32,
         dict(convention="verl"), dict(token_adv=True, token_isw=True)),
        ("verl kl clamp contiguous fp64", "contiguous", torch.float64,
         dict(convention="verl", beta=0.1, log_ratio_clamp=0.3), dict(beta=0.1)),
        ("trl plain any", "any", torch.float32, dict(convention="trl"), {}),
    ]
    for i, (name, how, dtype, opts, bopts) in enumerate(cases):
        full = _batch(100 + i, 6, 41, dtype, **bopts)
        idx = _slices(41, world, rank, how, seed=i)
        loc = _local(full, idx)
        call = dict(opts, return_metrics=True, epsilon_low=0.3, epsilon_high=0.35)

        def f(x, batch, **kw):
            b = dict(batch)
            b.pop("logps")
            return gmpo_ext.gmpo_loss(x, **b, **kw)

        ref_loss, ref_m, ref_g = _grad_of(f, full["logps"], batch=full, **call)
        loss, m, g = _grad_of(f, loc["logps"], batch=loc, group=group, **call)
        _close(f"seq {name} loss", loss, ref_loss)
        _metrics_close(f"seq {name}", m, ref_m)
        _close(f"seq {name} grad", g, ref_g[:, idx])
        if g.dtype != dtype:
            raise AssertionError(f"seq {name}: gradient dtype {g.dtype}")

    # GRPO: per-row token counts and the batch's mask sum come from all ranks
    for lt in ("grpo", "bnpo", "dr_grpo"):
        full = _batch(200, 5, 33, beta=0.05)
        idx = _slices(33, world, rank, "any", seed=3)
        loc = _local(full, idx)

        def f(x, batch, **kw):
            b = dict(batch)
            b.pop("logps")
            return gmpo_ext.grpo_loss(x, **b, **kw)

        kw = dict(loss_type=lt, beta=0.05, return_metrics=True, max_completion_length=40)
        ref_loss, ref_m, ref_g = _grad_of(f, full["logps"], batch=full, **kw)
        loss, m, g = _grad_of(f, loc["logps"], batch=loc, group=group, **kw)
        _close(f"grpo {lt} loss", loss, ref_loss)
        _metrics_close(f"grpo {lt}", m, ref_m)
        _close(f"grpo {lt} grad", g, ref_g[:, idx])

    # the GRPO family (cispo..vespo, GSPO's sequence level, its options): the
    # family's row sums (sequence log-ratios, off-policy KL, vespo's unmasked
    # log-IS sum) and the entropy bonus's sums come from all ranks
    fam_cases = [
        ("dapo", "sequence", dict(delta=1.4, off_policy_mask_threshold=0.02, beta=0.05,
                                  use_bias_correction_kl=True), dict(beta=0.05)),
        ("sapo", "sequence", dict(entropy_coef=0.01), {}),
        ("vespo", "token", {}, dict(token_isw=True)),
        ("cispo", "sequence", dict(epsilon_high=1.1), dict(row_isw=True)),
    ]
    for j, (lt, level, kw0, bopts) in enumerate(fam_cases):
        full = _batch(300 + j, 5, 29, **bopts)
        g = torch.Generator().manual_seed(400 + j)
        full["sampling_logps"] = full["old_logps"] + 0.3 * torch.randn(5, 29, generator=g)
        full["token_mask"] = torch.rand(5, 29, generator=g) < 0.7
        full["entropies"] = torch.rand(5, 29, generator=g) * 2
        idx = _slices(29, world, rank, "any", seed=5 + j)
        loc = _local(full, idx)

        def f(x, batch, **kw):
            b = dict(batch)
            b.pop("logps")
            return gmpo_ext.grpo_loss(x, **b, **kw)

        kw = dict(kw0, loss_type=lt, importance_sampling_level=level, return_metrics=True)
        ref_loss, ref_m, ref_g = _grad_of(f, full["logps"], batch=full, **kw)
        loss, m, g = _grad_of(f, loc["logps"], batch=loc, group=group, **kw)
        _close(f"family {lt} {level} loss", loss, ref_loss)
        _metrics_close(f"family {lt} {level}", m, ref_m)
        _close(f"family {lt} {level} grad", g, ref_g[:, idx])

    # from hidden states (the LM head fused): rows split over the ranks, each
    # rank's hidden, weight and bias gradients exact for its tokens (their sum
    # over the ranks is the whole batch's weight gradient)
    g = torch.Generator().manual_seed(300)
    Bh, Th, H, V = 4, 23, 16, 37
    hid = torch.randn(Bh, Th, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.3
    bias = torch.randn(V, generator=g) * 0.1
    ids = torch.randint(0, V, (Bh, Th), generator=g)
    maskh = (torch.rand(Bh, Th, generator=g) < 0.8).float()
    maskh[1] = 0
    with torch.no_grad():
        lp0 = torch.log_softmax(hid @ W.t() + bias, -1).gather(-1, ids[..., None])[..., 0]
    oldh = lp0 + 0.3 * torch.randn(Bh, Th, generator=g)
    advh = torch.randn(Bh, generator=g)
    idx = _slices(Th, world, rank, "any", seed=7)

    def fh(h_, w_, b_, ids_, old_, mask_, **kw):
        h_, w_, b_ = (t.clone().requires_grad_(True) for t in (h_, w_, b_))
        loss_, m_ = gmpo_ext.gmpo_loss_from_hidden(h_, w_, ids_, old_, advh, mask_, bias=b_,
                                                   temperature=0.8, beta=0.0, convention="verl",
                                                   return_metrics=True, tile_tokens=16,
                                                   tile_vocab=16, **kw)
        gh, gw, gb = torch.autograd.grad(loss_, (h_, w_, b_))
        return loss_.detach(), m_, gh, gw, gb

    ref = fh(hid, W, bias, ids, oldh, maskh)
    got = fh(hid[:, idx], W, bias, ids[:, idx], oldh[:, idx], maskh[:, idx], group=group)
    _close("hidden loss", got[0], ref[0])
    _metrics_close("hidden", got[1], ref[1])
    # the gradients pass through fp32 GEMMs over other token tiles than the
    # single process's (another summation order): 1e-5 there
    _close("hidden grad hidden", got[2], ref[2][:, idx], tol=1e-5)
    gw, gb = got[3].clone(), got[4].clone()
    dist.all_reduce(gw, group=group)
    dist.all_reduce(gb, group=group)
    _close("hidden grad weight (summed over ranks)", gw, ref[3], tol=1e-5)
    _close("hidden grad bias (summed over ranks)", gb, ref[4], tol=1e-5)

    # GRPO from hidden states with the rows split: its entropy metric too is
    # over every rank's tokens
    def fg(h_, w_, b_, ids_, old_, mask_, **kw):
        h_, w_, b_ = (t.clone().requires_grad_(True) for t in (h_, w_, b_))
        loss_, m_ = gmpo_ext.grpo_loss_from_hidden(h_, w_, ids_, old_, advh.abs() + 0.5, mask_,
                                                   bias=b_, loss_type="grpo",
                                                   return_metrics=True, tile_tokens=16, **kw)
        return (loss_.detach(), m_) + torch.autograd.grad(loss_, (h_, w_, b_))

    ref = fg(hid, W, bias, ids, oldh, maskh)
    got = fg(hid[:, idx], W, bias, ids[:, idx], oldh[:, idx], maskh[:, idx], group=group)
    _close("hidden grpo loss", got[0], ref[0])
    _metrics_close("hidden grpo", got[1], ref[1], 2e-6)
    _close("hidden grpo grad hidden", got[2], ref[2][:, idx], tol=1e-5)

    # every rank holds the same loss, bit for bit
    for t in (loss.reshape(1).to(torch.float64),):
        gathered = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(gathered, t, group=group)
        if any(not torch.equal(x, gathered[0]) for x in gathered):
            raise AssertionError(f"seq: ranks disagree on the loss: {gathered}")


def _logits_batch(seed, B, T, V):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T + 1, V, generator=g) * 2
    logits[0, 2, :V // 3] = -float("inf")             # part of one shard masked out
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1] = False
    # old and reference log-probs near the policy's own, as in training (far
    # ones make the k3 KL dominate the loss by orders of magnitude, where fp32
    # rounding of any two computations differs by more than 1e-6)
    lp = torch.log_softmax(logits[:, :T].double(), -1).gather(2, ids.unsqueeze(-1)).squeeze(-1)
    lp = torch.where(torch.isfinite(lp), lp, torch.full_like(lp, -3.0))
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, generator=g)
    ref = (lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return logits, ids, mask, old, adv, ref


def vocab_split(rank, world, group):
    import gmpo_ext

    B, T, V = 4, 19, 96
    logits, ids, mask, old, adv, ref = _logits_batch(300, B, T, V)
    P = world
    lo, hi = V * rank // P, V * (rank + 1) // P
    shard = logits[:, :, lo:hi].contiguous()

    # selective_logps: logp and entropy, and their gradient through the shard
    w1 = torch.randn(B, T, generator=torch.Generator().manual_seed(5))
    w2 = torch.randn(B, T, generator=torch.Generator().manual_seed(6))

    def sel(x, **kw):
        lp, ent = gmpo_ext.selective_logps(x, ids, 0.7, return_entropy=True, mask=mask, **kw)
        return (lp * w1).sum() + (ent * w2).sum(), {"lp": lp.detach(), "ent": ent.detach()}

    ref_l, ref_o, ref_g = _grad_of(sel, logits)
    got_l, got_o, got_g = _grad_of(sel, shard, vocab_group=group, vocab_start=lo,
                                   vocab_size=V if P != 2 else None)
    _close("vocab selective logp", got_o["lp"], ref_o["lp"])
    _close("vocab selective entropy", got_o["ent"], ref_o["ent"], 2e-6)
    # normwise: the entropy's term p (x - lse + H) cancels elementwise in fp32,
    # in the single-process kernel as here
    _close("vocab selective grad", got_g, ref_g[:, :, lo:hi], 1e-6, floor=1.0)

    for conv, beta in (("trl", 0.04), ("verl", 0.0)):
        def f(x, **kw):
            return gmpo_ext.gmpo_loss_from_logits(
                x, ids, old, adv, mask, temperature=0.7, convention=conv, beta=beta,
                ref_logps=ref, return_metrics=True, **kw)

        ref_loss, ref_m, ref_g = _grad_of(f, logits)
        loss, m, g = _grad_of(f, shard, vocab_group=group, vocab_start=lo)
        _close(f"vocab {conv} loss", loss, ref_loss)
        _metrics_close(f"vocab {conv}", m, ref_m, 2e-6)
        # normwise (against the largest element): the KL's 1 - exp(ref - logp)
        # cancels token by token, so one ulp of logp (the shards' merge and the
        # one-pass kernel round differently) moves small elements by more
        _close(f"vocab {conv} grad", g, ref_g[:, :, lo:hi], floor=1.0)

    # the GRPO family from vocabulary-sharded logits, the entropy bonus's
    # gradient through the shards' merged entropy
    def fam(x, **kw):
        return gmpo_ext.grpo_loss_from_logits(
            x, ids, old, adv, mask, temperature=0.7, loss_type="sapo",
            importance_sampling_level="sequence", beta=0.04, ref_logps=ref,
            use_bias_correction_kl=True, entropy_coef=0.05, return_metrics=True, **kw)

    ref_loss, ref_m, ref_g = _grad_of(fam, logits)
    loss, m, g = _grad_of(fam, shard, vocab_group=group, vocab_start=lo)
    _close("vocab family loss", loss, ref_loss)
    _metrics_close("vocab family", m, ref_m, 2e-6)
    _close("vocab family grad", g, ref_g[:, :, lo:hi], floor=1.0)

    # an id outside the whole vocabulary is still an error, naming the argument
    bad = ids.clone()
    bad[0, 0] = V
    m2 = mask.clone()
    m2[0, 0] = True
    # (the C core checks every id; the CUDA kernels write NaN, validate=True raises)
    for validate in ((False, True) if BACKEND == "c" else (True,)):
        try:
            gmpo_ext.selective_logps(shard, bad, mask=m2, vocab_group=group, vocab_start=lo,
                                     validate=validate)
        except IndexError as e:
            if "ids" not in str(e):
                raise AssertionError(f"vocab: the IndexError does not name ids: {e}")
        else:
            raise AssertionError("vocab: an id outside [0, vocab_size) did not raise")
    if BACKEND != "c":
        lp = gmpo_ext.selective_logps(shard, bad, mask=m2, vocab_group=group, vocab_start=lo)
        if not (torch.isnan(lp[0, 0]) and not torch.isnan(lp[0, 1:][mask[0, 1:]]).any()):
            raise AssertionError("vocab: an invalid id's logp is not NaN alone")


def _head_batch(seed, B, T, H, V, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1] = False                                   # an empty row
    with torch.no_grad():
        lp = torch.log_softmax((hid @ W.t() + bias) / 0.9, -1).gather(-1, ids[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[0] = 0.0
    isw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    c = lambda t: t.to(dtype)   # noqa: E731
    return dict(hidden=c(hid), weight=c(W), bias=c(bias), ids=ids, mask=mask, old=c(old),
                ref=c(ref), adv=c(adv), isw=c(isw))


def _head_grads(fn, hid, W, bias):
    """fn(h, w, b) -> (scalar, outputs dict); returns (scalar, outputs, dh, dw, db)."""
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (hid, W, bias))
    out, extra = fn(h, w, b)
    dh, dw, db = torch.autograd.grad(out, (h, w, b))
    return out.detach(), extra, dh, dw, db


def head_split(rank, world, group):
    """The LM head's vocabulary sharded over the ranks (vocab_group= on
    linear_logps, gmpo_loss_from_hidden, grpo_loss_from_hidden): every rank
    gets the whole vocabulary's logp, entropy, loss and metrics; the weight
    and bias gradients are the shard's rows of the single process's, the
    hidden gradient the whole one (summed over the shards in backward)."""
    import gmpo_ext

    B, T, H, V = 4, 21, 16, 75           # 75 rows: unequal shards with vocab_size
    P = world
    lo, hi = V * rank // P, V * (rank + 1) // P
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        d = _head_batch(600, B, T, H, V, dtype)
        sh = dict(vocab_group=group, vocab_start=lo, vocab_size=V)
        w1 = torch.randn(B, T, generator=torch.Generator().manual_seed(1)).to(dtype)
        w2 = torch.randn(B, T, generator=torch.Generator().manual_seed(2)).to(dtype)

        def sel(h, w, b, **kw):
            lp, ent = gmpo_ext.linear_logps(h, w, d["ids"], bias=b, temperature=0.9,
                                            return_entropy=True, mask=d["mask"],
                                            tile_tokens=16, tile_vocab=8, **kw)
            return (lp * w1).sum() + (ent * w2).sum(), {"lp": lp.detach(), "ent": ent.detach()}

        ref = _head_grads(sel, d["hidden"], d["weight"], d["bias"])
        got = _head_grads(lambda h, w, b: sel(h, w, b, **sh), d["hidden"], d["weight"][lo:hi],
                          d["bias"][lo:hi])
        name = f"head {dtype} linear_logps"
        _close(f"{name} logp", got[1]["lp"], ref[1]["lp"], 1e-6 if dtype == torch.float32 else tol)
        _close(f"{name} entropy", got[1]["ent"], ref[1]["ent"],
               2e-6 if dtype == torch.float32 else tol)
        # the gradients pass through fp32 GEMMs of other tiles than the single
        # process's (another summation order): 1e-5, normwise where the
        # entropy's p (x - lse + H) cancels elementwise
        _close(f"{name} grad hidden", got[2], ref[2], tol, floor=1.0)
        _close(f"{name} grad weight", got[3], ref[3][lo:hi], tol, floor=1.0)
        _close(f"{name} grad bias", got[4], ref[4][lo:hi], tol, floor=1.0)

        for conv, beta in (("trl", 0.04), ("verl", 0.0)):
            def f(h, w, b, **kw):
                loss, m = gmpo_ext.gmpo_loss_from_hidden(
                    h, w, d["ids"], d["old"], d["adv"], d["mask"], bias=b, temperature=0.9,
                    convention=conv, beta=beta, ref_logps=d["ref"], is_weights=d["isw"],
                    return_metrics=True, tile_tokens=32, **kw)
                return loss, m

            ref = _head_grads(f, d["hidden"], d["weight"], d["bias"])
            got = _head_grads(lambda h, w, b: f(h, w, b, **sh), d["hidden"],
                              d["weight"][lo:hi], d["bias"][lo:hi])
            name = f"head {dtype} gmpo {conv}"
            _close(f"{name} loss", got[0], ref[0], 1e-6 if dtype == torch.float32 else tol)
            _metrics_close(name, got[1], ref[1], 2e-6 if dtype == torch.float32 else tol)
            _close(f"{name} grad hidden", got[2], ref[2], tol, floor=1.0)
            _close(f"{name} grad weight", got[3], ref[3][lo:hi], tol, floor=1.0)
            _close(f"{name} grad bias", got[4], ref[4][lo:hi], tol, floor=1.0)

    # GRPO from hidden states, with the default tiles and vocab_size inferred
    # (equal shards). fp32 with advantages of one sign: with mixed signs the
    # token terms (each about |A|) cancel to a loss below fp32's resolution of
    # them, where any two summation orders differ by more than 1e-6 of it;
    # fp64 with mixed signs
    for dtype, tol, gtol in ((torch.float32, 1e-6, 1e-5), (torch.float64, 1e-12, 1e-12)):
        d = _head_batch(601, B, T, H, 64, dtype)
        if dtype == torch.float32:
            d["adv"] = d["adv"].abs() + 0.5
        lo, hi = 64 * rank // P, 64 * (rank + 1) // P

        def gr(h, w, b, **kw):
            return gmpo_ext.grpo_loss_from_hidden(h, w, d["ids"], d["old"], d["adv"], d["mask"],
                                                  bias=b, loss_type="grpo", beta=0.04,
                                                  ref_logps=d["ref"], return_metrics=True,
                                                  **kw)

        ref = _head_grads(gr, d["hidden"], d["weight"], d["bias"])
        got = _head_grads(lambda h, w, b: gr(h, w, b, vocab_group=group, vocab_start=lo),
                          d["hidden"], d["weight"][lo:hi], d["bias"][lo:hi])
        _close(f"head grpo {dtype} loss", got[0], ref[0], tol)
        _metrics_close(f"head grpo {dtype}", got[1], ref[1],
                       2e-6 if dtype == torch.float32 else tol)
        _close(f"head grpo {dtype} grad hidden", got[2], ref[2], gtol, floor=1.0)
        _close(f"head grpo {dtype} grad weight", got[3], ref[3][lo:hi], gtol, floor=1.0)

    # shard layouts that do not tile the vocabulary: every rank raises the same
    # error (none waits in a collective, none computes a wrong log-prob)
    d = _head_batch(602, B, T, H, 75)
    lo, hi = 75 * rank // P, 75 * (rank + 1) // P
    bad_layouts = [
        ("vocab_size", dict(vocab_start=lo, vocab_size=75 + rank), d["weight"][lo:hi]),
        ("tile", dict(vocab_start=0, vocab_size=75), d["weight"][lo:hi]),   # overlap + gap
        ("tile", dict(vocab_start=0), d["weight"][lo:hi]),   # default size: the same gap
        ("tile", dict(vocab_start=lo, vocab_size=76), d["weight"][lo:hi]),  # id 75 unowned
    ]
    for match, kw, w in bad_layouts:
        for fn in ("linear_logps", "selective_logps"):
            try:
                if fn == "linear_logps":
                    gmpo_ext.linear_logps(d["hidden"], w, d["ids"], vocab_group=group, **kw)
                else:
                    gmpo_ext.selective_logps(d["hidden"] @ w.t(), d["ids"], vocab_group=group,
                                             **kw)
            except ValueError as e:
                if match not in str(e):
                    raise AssertionError(f"head layout {kw} ({fn}): {e}")
            else:
                raise AssertionError(f"head layout {kw} ({fn}) did not raise")

    d = _head_batch(601, B, T, H, 64)   # fp32: the kernels (float64 folds in torch)
    lo, hi = 64 * rank // P, 64 * (rank + 1) // P
    # an id outside the whole vocabulary is an error naming the argument (the
    # C core checks each id against vocab_size, not against the shard)
    bad = d["ids"].clone()
    bad[0, 0] = 64
    m2 = d["mask"].clone()
    m2[0, 0] = True
    if BACKEND == "c":
        try:
            gmpo_ext.linear_logps(d["hidden"], d["weight"][lo:hi], bad, mask=m2,
                                  vocab_group=group, vocab_start=lo)
        except IndexError as e:
            if "ids" not in str(e):
                raise AssertionError(f"head: the IndexError does not name ids: {e}")
        else:
            raise AssertionError("head: an id outside [0, vocab_size) did not raise")
    else:   # the CUDA kernels: NaN for that token alone, on every rank
        lp = gmpo_ext.linear_logps(d["hidden"], d["weight"][lo:hi], bad, mask=m2,
                                   vocab_group=group, vocab_start=lo)
        if not (torch.isnan(lp[0, 0]) and not torch.isnan(lp[m2].view(-1)[1:]).any()):
            raise AssertionError("head: an invalid id's logp is not NaN alone")


def verl_split(rank, world, group):
    """verl's policy losses (convention="verl") from vocabulary-sharded logits
    and from the vocabulary-sharded head: the loss, metrics and gradients of
    the single process, on every rank."""
    import gmpo_ext

    gbi = {"dp_size": 2, "global_batch_size": 5, "loss_scale_factor": 11, "batch_num_tokens": 23}
    cases = (("vanilla", "seq-mean-token-sum-norm"), ("cispo", "token-mean"),
             ("gspo", "seq-mean-token-mean"), ("gspo", "token-sum"), ("sapo", None))
    B, T, V = 4, 9, 40
    logits, ids, mask, old, adv, _ = _logits_batch(310, B, T, V)
    adv = adv.abs() + 0.5   # one sign: no cancellation below fp32's resolution (head_split)
    lo, hi = V * rank // world, V * (rank + 1) // world
    shard = logits[:, :, lo:hi].contiguous()
    for loss_type, agg in cases:
        def f(x, **kw):
            return gmpo_ext.grpo_loss_from_logits(
                x, ids, old, adv, mask, temperature=0.7, convention="verl",
                loss_type=loss_type, loss_agg_mode=agg, global_batch_info=gbi,
                epsilon_low=0.2, epsilon_high=0.28, return_metrics=True, **kw)

        ref_loss, ref_m, ref_g = _grad_of(f, logits)
        loss, m, g = _grad_of(f, shard, vocab_group=group, vocab_start=lo)
        _close(f"verl logits {loss_type} loss", loss, ref_loss)
        _metrics_close(f"verl logits {loss_type}", m, ref_m, 2e-6)
        _close(f"verl logits {loss_type} grad", g, ref_g[:, :, lo:hi], floor=1.0)

    B, T, H, V = 4, 13, 16, 75           # unequal shards with vocab_size
    lo, hi = V * rank // world, V * (rank + 1) // world
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        d = _head_batch(610, B, T, H, V, dtype)
        adv = d["adv"].abs() + 0.5 if dtype == torch.float32 else d["adv"]
        for loss_type, agg in cases:
            def fh(h, w, b, **kw):
                return gmpo_ext.grpo_loss_from_hidden(
                    h, w, d["ids"], d["old"], adv, d["mask"], bias=b, temperature=0.9,
                    convention="verl", loss_type=loss_type, loss_agg_mode=agg,
                    global_batch_info=gbi, is_weights=d["isw"], return_metrics=True,
                    tile_tokens=16, **kw)

            ref = _head_grads(fh, d["hidden"], d["weight"], d["bias"])
            got = _head_grads(lambda h, w, b: fh(h, w, b, vocab_group=group, vocab_start=lo,
                                                 vocab_size=V),
                              d["hidden"], d["weight"][lo:hi], d["bias"][lo:hi])
            name = f"verl head {dtype} {loss_type}"
            _close(f"{name} loss", got[0], ref[0], 1e-6 if dtype == torch.float32 else tol)
            _metrics_close(name, got[1], ref[1], 2e-6 if dtype == torch.float32 else tol)
            _close(f"{name} grad hidden", got[2], ref[2], tol, floor=1.0)
            _close(f"{name} grad weight", got[3], ref[3][lo:hi], tol, floor=1.0)
            _close(f"{name} grad bias", got[4], ref[4][lo:hi], tol, floor=1.0)


def _all_raise(what, fn, match):
    """fn() must raise ValueError naming ``match`` (on every rank: the caller
    runs it on each; a rank that did not raise would leave the others in a
    collective, so the next one fails loudly)."""
    try:
        fn()
    except ValueError as e:
        if match not in str(e):
            raise AssertionError(f"{what}: the ValueError does not name {match!r}: {e}")
    else:
        raise AssertionError(f"{what}: ranks that disagree did not raise")


def head_agree(rank, world, group):
    """The fused head's vocabulary shard: ranks that disagree on what sizes
    the collectives (the mask's count, the token tile, H, the dtype, the
    entropy) or on whether the backward all-reduces (hidden's requires_grad)
    raise the same ValueError from the layout all_gather (gloo aborted, NCCL
    would hang); unequal shards without vocab_size get it from that gather."""
    import gmpo_ext

    B, T, H, V = 3, 7, 8, 45             # 45 rows over 2 ranks: 22 + 23
    P = world
    lo, hi = V * rank // P, V * (rank + 1) // P
    d = _head_batch(700, B, T, H, V)
    w = d["weight"][lo:hi]

    def lp(**kw):
        args = dict(hidden=d["hidden"], mask=d["mask"], ids=d["ids"], weight=w)
        args.update(kw)
        return gmpo_ext.linear_logps(args["hidden"], args["weight"], args["ids"],
                                     mask=args["mask"], vocab_group=group, vocab_start=lo,
                                     tile_tokens=args.get("tile_tokens"),
                                     return_entropy=args.get("return_entropy", False))

    # vocab_size inferred (unequal shards tiling [0, 45)) == given == one process's
    want = gmpo_ext.linear_logps(d["hidden"], d["weight"], d["ids"], mask=d["mask"])
    for kw in ({}, dict(vocab_size=V), dict(vocab_size=V if rank else None)):
        got = gmpo_ext.linear_logps(d["hidden"], w, d["ids"], mask=d["mask"],
                                    vocab_group=group, vocab_start=lo, **kw)
        _close(f"head inferred vocab_size {kw}", got, want, 1e-6)
    loss_kw = dict(vocab_group=group, vocab_start=lo)
    got = gmpo_ext.gmpo_loss_from_hidden(d["hidden"], w, d["ids"], d["old"], d["adv"],
                                         d["mask"], **loss_kw)
    ref = gmpo_ext.gmpo_loss_from_hidden(d["hidden"], d["weight"], d["ids"], d["old"],
                                         d["adv"], d["mask"])
    _close("head inferred vocab_size gmpo", got, ref, 1e-6)

    m_fewer = d["mask"].clone()
    if rank == 0:
        m_fewer[0, m_fewer[0].nonzero()[0, 0]] = False
    m_moved = d["mask"].clone()
    if rank == 0:   # the same count, another token
        flat = m_moved.view(-1)
        i, j = flat.nonzero()[0, 0], (~flat).nonzero()[0, 0]
        flat[i], flat[j] = False, True
    ids_other = d["ids"].clone()
    if rank == 0:
        ids_other[0, d["mask"][0].nonzero()[0, 0]] += 1
    cases = [
        ("mask count", dict(mask=m_fewer), "number of scored tokens"),
        ("mask moved", dict(mask=m_moved), "mask"),
        ("ids", dict(ids=ids_other), "ids"),
        ("tile_tokens", dict(tile_tokens=8 + 8 * rank), "tile_tokens"),
        ("tile_tokens on one rank", dict(tile_tokens=16 if rank else None), "tile_tokens"),
        ("dtype", dict(hidden=d["hidden"].double() if rank else d["hidden"],
                       weight=w.double() if rank else w), "dtype"),
        ("H", dict(hidden=d["hidden"][..., :H - rank], weight=w[:, :H - rank]), "H"),
        ("return_entropy", dict(return_entropy=bool(rank)), "return_entropy"),
        ("requires_grad", dict(hidden=d["hidden"].clone().requires_grad_(rank == 0)),
         "requires_grad"),
    ]
    for what, kw, match in cases:
        _all_raise(f"head agree {what}", lambda: lp(**kw), match)
    with torch.no_grad():   # grad mode off on one rank: the backward all-reduces on one only
        h1 = d["hidden"].clone().requires_grad_(True)
        if rank == 0:
            torch.set_grad_enabled(True)
        _all_raise("head agree grad mode", lambda: lp(hidden=h1), "requires_grad")
    _all_raise("head agree (gmpo_loss_from_hidden)",
               lambda: gmpo_ext.gmpo_loss_from_hidden(d["hidden"], w, d["ids"], d["old"],
                                                      d["adv"], m_fewer, **loss_kw),
               "number of scored tokens")
    # still in step: a good call after the errors
    _close("head agree after the errors", lp(), want, 1e-6)


def both(rank, world, group_seq, group_vocab, seq_rank, vocab_rank, P_seq, P_vocab):
    import gmpo_ext

    B, T, V = 5, 23, 64
    logits, ids, mask, old, adv, ref = _logits_batch(400, B, T, V)
    isw = torch.rand(B, T, generator=torch.Generator().manual_seed(8)) + 0.5
    idx = _slices(T, P_seq, seq_rank, "contiguous")
    lo, hi = V * vocab_rank // P_vocab, V * (vocab_rank + 1) // P_vocab
    # the (B, T+1, V) logits of this rank's tokens (position T stays with the last slice)
    pos = idx if seq_rank != P_seq - 1 else torch.cat([idx, torch.tensor([T])])
    loc_logits = logits[:, pos, lo:hi].contiguous()
    for conv, beta in (("trl", 0.04), ("verl", 0.04)):
        def f(x, ids_, old_, mask_, ref_, isw_, **kw):
            return gmpo_ext.gmpo_loss_from_logits(
                x, ids_, old_, adv, mask_, temperature=1.3, convention=conv, beta=beta,
                ref_logps=ref_, is_weights=isw_, return_metrics=True, **kw)

        ref_loss, ref_m, ref_g = _grad_of(f, logits, ids_=ids, old_=old, mask_=mask, ref_=ref,
                                          isw_=isw)
        cut = lambda t: t[:, idx].contiguous()   # noqa: E731
        loss, m, g = _grad_of(f, loc_logits, ids_=cut(ids), old_=cut(old), mask_=cut(mask),
                              ref_=cut(ref), isw_=cut(isw), group=group_seq,
                              vocab_group=group_vocab, vocab_start=lo)
        _close(f"both {conv} loss", loss, ref_loss)
        _metrics_close(f"both {conv}", m, ref_m, 2e-6)
        _close(f"both {conv} grad", g, ref_g[:, pos][:, :, lo:hi], floor=1.0)

    # from hidden states: rows split over group_seq, the head's vocabulary over
    # group_vocab (the weight and bias gradients: this rank's tokens and rows,
    # summed over group_seq they are the whole batch's rows of the shard)
    Vh = 48
    d = _head_batch(402, B, T, 16, Vh)
    lo, hi = Vh * vocab_rank // P_vocab, Vh * (vocab_rank + 1) // P_vocab
    for conv in ("trl", "verl"):
        def fh(h, w, b, ids_, old_, mask_, ref_, isw_, **kw):
            return gmpo_ext.gmpo_loss_from_hidden(
                h, w, ids_, old_, d["adv"], mask_, bias=b, temperature=0.9, convention=conv,
                beta=0.04, ref_logps=ref_, is_weights=isw_, return_metrics=True,
                tile_tokens=16, tile_vocab=16, **kw)

        keys = ("ids", "old", "mask", "ref", "isw")
        ref = _head_grads(lambda h, w, b: fh(h, w, b, *(d[k] for k in keys)), d["hidden"],
                          d["weight"], d["bias"])
        cut = lambda t: t[:, idx].contiguous()   # noqa: E731
        got = _head_grads(lambda h, w, b: fh(h, w, b, *(cut(d[k]) for k in keys),
                                             group=group_seq, vocab_group=group_vocab,
                                             vocab_start=lo),
                          cut(d["hidden"]), d["weight"][lo:hi], d["bias"][lo:hi])
        _close(f"both hidden {conv} loss", got[0], ref[0])
        _metrics_close(f"both hidden {conv}", got[1], ref[1], 2e-6)
        _close(f"both hidden {conv} grad hidden", got[2], ref[2][:, idx], 1e-5, floor=1.0)
        gw, gb = got[3].clone(), got[4].clone()
        dist.all_reduce(gw, group=group_seq)
        dist.all_reduce(gb, group=group_seq)
        _close(f"both hidden {conv} grad weight", gw, ref[3][lo:hi], 1e-5, floor=1.0)
        _close(f"both hidden {conv} grad bias", gb, ref[4][lo:hi], 1e-5, floor=1.0)


def data_parallel(rank, world, group):
    """Unequal micro-batches over ranks and accumulation steps: with num_rows
    the losses add up to the whole batch's and the gradients to its gradient."""
    import gmpo_ext

    B, T = 11, 17
    # rows of each rank, cut into accumulation steps of unequal sizes
    cuts = {2: [[[0], [1, 2]], [[3, 4, 5, 6], [7], [8, 9, 10]]],
            4: [[[0, 1]], [[2], [3, 4, 5]], [[6, 7, 8]], [[9], [10]]]}[world]
    for conv, bopts, opts in (("trl", dict(beta=0.05, row_isw=True), dict(beta=0.05)),
                              ("verl", dict(token_adv=True, token_isw=True), {})):
        full = _batch(500, B, T, **bopts)

        def f(x, batch, **kw):
            b = dict(batch)
            b.pop("logps")
            return gmpo_ext.gmpo_loss(x, **b, convention=conv, **opts, **kw)

        ref_loss, _, ref_g = _grad_of(f, full["logps"], batch=full)
        total = torch.zeros((), dtype=torch.float64)
        for rows in cuts[rank]:
            r = torch.tensor(rows)
            part = {k: v[r] for k, v in full.items()}
            # normalizer 1/world: DDP averages the gradients over the ranks
            loss, _, g = _grad_of(f, part["logps"], batch=part, num_rows=B,
                                  normalizer=1.0 / world)
            _close(f"dp {conv} grad rows {rows}", g / world, ref_g[r])
            total += loss.to(torch.float64)
        dist.all_reduce(total, group=group)
        _close(f"dp {conv} summed loss", total / world, ref_loss)


# ----------------------------------------------------------------------------
# entry point (torch.multiprocessing.spawn)

def run(rank, world, port, backend_name, scenarios):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    global BACKEND
    BACKEND = backend_name
    if backend_name == "simt":
        from gmpo_ext import _backend
        from simt_backend import load_simt_module
        _backend.set_simt_module(load_simt_module())
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        world_group = dist.group.WORLD
        for s in scenarios:
            if s == "seq":
                seq_split(rank, world, world_group)
            elif s == "vocab":
                vocab_split(rank, world, world_group)
            elif s == "head":
                head_split(rank, world, world_group)
            elif s == "head_agree":
                head_agree(rank, world, world_group)
            elif s == "dp":
                data_parallel(rank, world, world_group)
            elif s == "verl":
                verl_split(rank, world, world_group)
            elif s == "both":
                # rank = 2 * seq_rank + vocab_rank: sequence groups {0, 2} and
                # {1, 3} (same vocabulary shard), vocabulary groups {0, 1}, {2, 3}
                seq_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
                vocab_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
                seq_rank, vocab_rank = rank // 2, rank % 2
                both(rank, world, seq_groups[rank % 2], vocab_groups[rank // 2], seq_rank,
                     vocab_rank, 2, 2)
        dist.barrier()
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
