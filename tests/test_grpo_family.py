"""TRL 1.16's GRPO family in the fused core: every loss type (grpo, bnpo, dr_grpo,
dapo, cispo, sapo, luspo, vespo) at both importance-sampling levels (token, and
GSPO's sequence level), with delta, the off-policy mask, the bias-corrected KL,
token_mask, importance weights and the entropy bonus, against the float64
transcription of TRL's formulas (gmpo_ext.reference.grpo_family_reference):

- fp64 tight (loss, gradient, metrics), every type x level x option set (C core);
- fp32, bf16 and fp16 with per-dtype tolerances;
- the CUDA kernels under the SIMT emulation ("simt" backend) on a modest subset;
- gradcheck in fp64 (the types whose coefficients are not detached);
- TRL's own static functions (get_gamma_weights, get_off_policy_mask), and TRL's
  own GRPOTrainer._compute_loss on a stand-in trainer for every type and level
  (loss, gradients, metrics: the documented argument mapping);
- the sequence ratio e^100: ours finite and right, TRL's formula inf / NaN;
- bad arguments raise naming the argument.
Rows split over ranks (group=) are tested in tests/_dist_worker.py (seq_split).
"""

from __future__ import annotations

import pytest
import torch

import gmpo_ext
from gmpo_ext.reference import (gamma_weights_reference, grpo_family_reference,
                                off_policy_mask_reference)

TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
LEVELS = ("token", "sequence")
# option sets: each turns on a few of TRL's options at once
OPTIONS = {
    "plain": {},
    "kl_bc": dict(beta=0.1, use_bias_correction_kl=True),
    "kl": dict(beta=0.05),
    "delta": dict(delta=1.5),
    "opm": dict(off_policy_mask_threshold=0.05),
    "tm_isw": dict(token_mask=True, is_weights="token"),
    "isw_row_ent": dict(is_weights="row", entropy_coef=0.02),
    "all": dict(beta=0.07, use_bias_correction_kl=True, delta=1.6, off_policy_mask_threshold=0.0,
                token_mask=True, is_weights="token", entropy_coef=0.01),
}
B, T = 6, 37


def _inputs(dtype, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 1.0
    old = base + torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5, 0.7], dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[4, 20:] = False                      # a zeroed tail
    mask[5] = False                           # an empty row
    ref = base + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    slp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    slp[0, 3] = float("nan")                  # a token the sampler could not score
    tm = torch.rand(B, T, generator=g) > 0.3
    isw_t = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    isw_r = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    # rounded to the test dtype once: the reference sees the same inputs
    c = lambda t: t.to(dtype).to(torch.float64) if t.dtype == torch.float64 else t  # noqa: E731
    return dict(lp=c(base), old=c(old), adv=c(adv), mask=mask, ref=c(ref), slp=c(slp), tm=tm,
                isw_t=c(isw_t), isw_r=c(isw_r), ent=c(ent))


def _kwargs(x, loss_type, level, opts, dtype):
    kw = dict(loss_type=loss_type, importance_sampling_level=level,
              epsilon_high=4.0 if loss_type == "cispo" else 0.28)
    o = dict(opts)
    if o.pop("token_mask", False):
        kw["token_mask"] = x["tm"]
    isw = o.pop("is_weights", None)
    if isw:
        kw["is_weights"] = (x["isw_t"] if isw == "token" else x["isw_r"]).to(dtype)
    if o.get("beta"):
        kw["ref_logps"] = x["ref"].to(dtype)
    if "off_policy_mask_threshold" in o:
        kw["sampling_logps"] = x["slp"].to(dtype)
    if o.get("entropy_coef"):
        kw["entropies"] = x["ent"].to(dtype)
    kw.update(o)
    return kw


def _run(x, dtype, **kw):
    lp = x["lp"].to(dtype).requires_grad_(True)
    ent = kw.get("entropies")
    if ent is not None:
        ent = ent.detach().clone().requires_grad_(True)
        kw["entropies"] = ent
    loss, metrics = gmpo_ext.grpo_loss(lp, x["old"].to(dtype), x["adv"].to(dtype), x["mask"],
                                       return_metrics=True, **kw)
    grads = torch.autograd.grad(loss, [lp] + ([ent] if ent is not None else []))
    return loss, metrics, grads


def _reference(x, **kw):
    lp = x["lp"].clone().requires_grad_(True)
    kw = {k: (v.to(torch.float64) if torch.is_tensor(v) and v.is_floating_point() else v)
          for k, v in kw.items()}
    ent = kw.get("entropies")
    if ent is not None:
        ent = ent.detach().clone().requires_grad_(True)
        kw["entropies"] = ent
    loss, metrics = grpo_family_reference(lp, x["old"], x["adv"], x["mask"], **kw)
    grads = torch.autograd.grad(loss, [lp] + ([ent] if ent is not None else []))
    return loss, metrics, grads


def _compare(got, want, rtol, atol, what):
    loss, metrics, grads = got
    rloss, rmetrics, rgrads = want
    torch.testing.assert_close(loss.double(), rloss, rtol=rtol, atol=atol, msg=f"{what}: loss")
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol, msg=f"{what}: grad")
    for k, v in rmetrics.items():
        assert k in metrics, f"{what}: metric {k} missing"
        torch.testing.assert_close(metrics[k].double(), v, rtol=rtol, atol=atol,
                                   msg=f"{what}: metric {k}")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", TYPES)
def test_fp64_every_option_against_trl_formulas(loss_type, level):
    x = _inputs(torch.float64)
    for name, opts in OPTIONS.items():
        kw = _kwargs(x, loss_type, level, opts, torch.float64)
        _compare(_run(x, torch.float64, **kw), _reference(x, **kw), 1e-10, 1e-12,
                 f"{loss_type} {level} {name}")


TOL = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (2e-5, 1e-6), torch.float16: (2e-5, 1e-6)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", TYPES)
def test_low_precision(loss_type, dtype):
    # inputs rounded to dtype, fp32 accumulation: the result is the reference's
    # on the rounded inputs to fp32 rounding (gradients are stored in dtype)
    x = _inputs(dtype, seed=1)
    for level in LEVELS:
        for name in ("plain", "all"):
            kw = _kwargs(x, loss_type, level, OPTIONS[name], dtype)
            got = _run(x, dtype, **kw)
            want = _reference(x, **kw)
            rtol, atol = TOL[dtype]
            torch.testing.assert_close(got[0].double(), want[0], rtol=rtol, atol=atol)
            gt = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
            for g, r in zip(got[2], want[2]):
                torch.testing.assert_close(g.double(), r, rtol=gt, atol=gt * 1e-2,
                                           msg=f"{loss_type} {level} {name} grad")


SIMT_CASES = [("dapo", "sequence", "all"), ("grpo", "token", "all"), ("cispo", "sequence", "tm_isw"),
              ("cispo", "token", "kl_bc"), ("sapo", "sequence", "kl_bc"), ("sapo", "token", "opm"),
              ("luspo", "sequence", "delta"), ("vespo", "token", "tm_isw"),
              ("vespo", "sequence", "isw_row_ent"), ("bnpo", "sequence", "plain")]


@pytest.mark.parametrize("case", SIMT_CASES, ids=["-".join(c) for c in SIMT_CASES])
def test_backends(backend, device, case):
    """The C core and the CUDA kernels (SIMT emulation) on the same cases, fp64
    and fp32."""
    loss_type, level, name = case
    for dtype, tol in ((torch.float64, (1e-10, 1e-12)), (torch.float32, (2e-5, 1e-6))):
        x = _inputs(dtype, seed=2)
        kw = _kwargs(x, loss_type, level, OPTIONS[name], dtype)
        _compare(_run(x, dtype, **kw), _reference(x, **kw), *tol, f"{backend} {case} {dtype}")


@pytest.mark.parametrize("loss_type,level,opts", [
    ("grpo", "sequence", dict(delta=1.2, beta=0.1, use_bias_correction_kl=True)),
    ("sapo", "token", dict(beta=0.1, use_bias_correction_kl=True, token_mask=True)),
    ("sapo", "sequence", dict(is_weights="token")),
    ("luspo", "token", dict(delta=1.1, is_weights="row")),
])
def test_gradcheck(loss_type, level, opts):
    # the types whose coefficients carry their gradient (cispo and vespo detach
    # theirs, as TRL does: checked against the reference's autograd above)
    x = _inputs(torch.float64, seed=3, scale=0.05)
    kw = _kwargs(x, loss_type, level, opts, torch.float64)

    def f(lp):
        return gmpo_ext.grpo_loss(lp, x["old"], x["adv"], x["mask"], **kw)

    lp = x["lp"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (lp,), eps=1e-6, atol=1e-7)


def _trl():
    trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    return trainer.GRPOTrainer


def test_trl_static_functions():
    """TRL's own get_gamma_weights and get_off_policy_mask against our
    reference helpers, and our fused vespo / off-policy losses built on TRL's."""
    GRPOTrainer = _trl()
    x = _inputs(torch.float32, seed=4)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in x.items()}
    A = f32["adv"].reshape(B, 1)
    m = f32["mask"].float()
    lr = (f32["lp"] - f32["old"]) * m
    for isw in (None, f32["isw_t"], f32["isw_r"].reshape(B, 1)):
        phi = GRPOTrainer.get_gamma_weights(A, lr, m, isw, 2.0, 3.0, 3.0, 2.0)
        ours = gamma_weights_reference(A.double(), lr.double(), m.double(),
                                       None if isw is None else isw.double())
        torch.testing.assert_close(phi.double(), ours, rtol=1e-5, atol=1e-7)
        # the fused vespo loss is -sum(phi * A * logp * m) / N with TRL's phi
        lp = f32["lp"].clone().requires_grad_(True)
        loss = gmpo_ext.grpo_loss(lp, f32["old"], f32["adv"], f32["mask"], loss_type="vespo",
                                  is_weights=isw.reshape(B, -1).squeeze(1) if isw is not None
                                  and isw.shape[1] == 1 else isw)
        want = (-phi * A * f32["lp"] * m).sum() / m.sum()
        torch.testing.assert_close(loss, want, rtol=2e-5, atol=1e-6)
    for thr in (0.0, 0.05, 1.0):
        keep = GRPOTrainer.get_off_policy_mask(A, f32["lp"], f32["slp"], m, thr)
        ours = off_policy_mask_reference(A.double(), f32["lp"].double(), f32["slp"].double(),
                                         m.double(), thr)
        assert torch.equal(keep.double(), ours)
        loss = gmpo_ext.grpo_loss(f32["lp"], f32["old"], f32["adv"], f32["mask"],
                                  loss_type="bnpo", off_policy_mask_threshold=thr,
                                  sampling_logps=f32["slp"], epsilon_low=0.2, epsilon_high=0.2)
        rho = torch.exp(f32["lp"] - f32["old"])
        ptl = -torch.min(rho * A, torch.clamp(rho, 0.8, 1.2) * A) * keep
        torch.testing.assert_close(loss, (ptl * m).sum() / m.sum(), rtol=2e-5, atol=1e-6)


def test_sequence_ratio_e100_stays_finite():
    """l = 100 on every token: exp(s) = e^100 overflows fp32. TRL's formula
    gives a NaN gradient (clipped: 0 * inf; sapo's saturated sigmoid: 0 * inf)
    and a NaN loss where A = 0 (inf * 0); ours gives the exact values: loss
    -A(1+eps_high) per token (sapo -4A, cispo the capped REINFORCE term) and
    gradient 0 (cispo: -eps_high A per token, as TRL's)."""
    Bq, Tq = 3, 5
    old = torch.full((Bq, Tq), -101.0)
    lp = torch.full((Bq, Tq), -1.0, requires_grad=True)
    adv = torch.tensor([1.0, 0.0, 2.0])
    mask = torch.ones(Bq, Tq, dtype=torch.bool)
    for lt in ("grpo", "dapo", "luspo", "cispo", "sapo"):
        kw = dict(loss_type=lt, importance_sampling_level="sequence", epsilon_high=0.28)
        loss = gmpo_ext.grpo_loss(lp, old, adv, mask, **kw)
        (g,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), lt
        # TRL's own formula in fp32
        x = lp.detach().clone().requires_grad_(True)
        s = ((x - old) * mask).sum(-1, keepdim=True) / Tq
        coef = torch.exp(s)
        A = adv.reshape(Bq, 1)
        if lt == "cispo":
            trl = -torch.clamp(coef, max=0.28).detach() * A * x
        elif lt == "sapo":
            trl = -torch.sigmoid(1.0 * (coef - 1)) * 4 / 1.0 * A
        else:
            trl = -torch.min(coef * A, torch.clamp(coef, 0.8, 1.28) * A)
        trl_loss = (trl.expand(Bq, Tq) * mask).sum()
        trl_loss.backward()
        if lt != "cispo":   # cispo's detached clamp(inf, max=eps_high) is finite in TRL too
            assert not torch.isfinite(trl_loss) or not torch.isfinite(x.grad).all(), lt
        # ours against the exact value (float64 reference where it is finite)
        want_rows = {"cispo": -0.28 * adv * (-1.0 * Tq), "sapo": -4.0 * adv * Tq,
                     }.get(lt, -1.28 * adv * Tq)
        if lt in ("grpo", "sapo"):
            want = (want_rows / Tq).mean()
        elif lt == "luspo":
            want = want_rows.mean()
        else:
            want = want_rows.sum() / (Bq * Tq)
        torch.testing.assert_close(loss, want.float(), rtol=1e-6, atol=1e-6)
        if lt != "cispo":
            assert torch.equal(g, torch.zeros_like(g)), lt


def test_entropy_bonus_needs_entropies_and_uses_token_mask():
    x = _inputs(torch.float64, seed=5)
    with pytest.raises(ValueError, match="entropies"):
        gmpo_ext.grpo_loss(x["lp"], x["old"], x["adv"], x["mask"], entropy_coef=0.1)
    base = gmpo_ext.grpo_loss(x["lp"], x["old"], x["adv"], x["mask"], token_mask=x["tm"],
                              normalizer=2.0)
    ent = x["ent"].clone().requires_grad_(True)
    loss = gmpo_ext.grpo_loss(x["lp"], x["old"], x["adv"], x["mask"], token_mask=x["tm"],
                              entropies=ent, entropy_coef=0.3, normalizer=2.0)
    me = x["mask"].double() * x["tm"].double()
    want = base - 0.3 * (x["ent"] * me).sum() / me.sum() / 2.0
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(loss, ent)
    torch.testing.assert_close(g, -0.3 * me / me.sum() / 2.0, rtol=1e-12, atol=1e-14)


def test_module_and_tensor_items():
    x = _inputs(torch.float64, seed=6)
    mod = gmpo_ext.GRPOLoss(loss_type="cispo", epsilon_high=3.0, importance_sampling_level="sequence")
    n = torch.tensor(50.0, dtype=torch.float64)
    got = mod(x["lp"], x["old"], x["adv"], x["mask"], num_items_in_batch=n)
    want, _ = grpo_family_reference(x["lp"], x["old"], x["adv"], x["mask"], loss_type="cispo",
                                    epsilon_high=3.0, importance_sampling_level="sequence",
                                    num_items_in_batch=50.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert "importance_sampling_level='sequence'" in repr(mod)


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="gspo"), "loss_type"),
    (dict(importance_sampling_level="row"), "importance_sampling_level"),
    (dict(delta=-1.0), "delta"),
    (dict(delta=float("nan")), "delta"),
    (dict(off_policy_mask_threshold=float("inf")), "off_policy_mask_threshold"),
    (dict(sapo_temperature_pos=0.0, loss_type="sapo"), "sapo_temperature_pos"),
    (dict(sapo_temperature_neg=-1.0, loss_type="sapo"), "sapo_temperature_neg"),
    (dict(vespo_k_pos=float("nan"), loss_type="vespo"), "vespo_k_pos"),
    (dict(vespo_lambda_neg=float("inf"), loss_type="vespo"), "vespo_lambda_neg"),
    (dict(token_mask=torch.ones(B, T + 1)), "token_mask"),
    (dict(sampling_logps=torch.ones(B, 2), off_policy_mask_threshold=0.1), "sampling_logps"),
    (dict(entropies=torch.ones(B), entropy_coef=0.1), "entropies"),
    (dict(advantages=torch.ones(B, T), importance_sampling_level="sequence"), "advantages"),
    (dict(advantages=torch.ones(B, T), loss_type="vespo"), "advantages"),
    (dict(use_bias_correction_kl=1), "use_bias_correction_kl"),
    (dict(num_rows=12, loss_type="cispo"), "num_rows"),
])
def test_bad_arguments_name_themselves(kw, match):
    x = _inputs(torch.float64, seed=7)
    adv = kw.pop("advantages", x["adv"])
    with pytest.raises((ValueError, TypeError), match=match):
        gmpo_ext.grpo_loss(x["lp"], x["old"], adv, x["mask"], **kw)


def test_c_core_rejects_bad_family_options():
    """The C core checks the family's options itself (a caller of the ops or
    the C API gets GMPO_EINVAL naming the option, never a wrong result)."""
    from gmpo_ext import _backend
    x = _inputs(torch.float64, seed=8)
    good = [1, 1, 1, 0, 1.5, 0.1, 1.0, 1.05, 2.0, 3.0, 3.0, 2.0]
    args = (_backend.ALGO_FAMILY, x["lp"], x["old"], x["adv"], x["mask"], None, None, 0, 3, 0.2,
            0.28, 0.0, 0.0, 1.0, 0.0)
    _backend.forward(*args, family=(x["slp"], None, good))
    for k, v, name in [(4, -1.0, "delta"), (6, 0.0, "sapo_temperature_pos"),
                       (9, float("nan"), "vespo_lambda_pos"), (0, 2, "importance_sampling_level")]:
        bad = list(good)
        bad[k] = v
        with pytest.raises(ValueError, match=name):
            _backend.forward(*args, family=(x["slp"], None, bad))
    with pytest.raises(ValueError, match="sampling_logps"):
        _backend.forward(*args, family=(None, None, good))
    bad_type = list(args)
    bad_type[8] = 9
    with pytest.raises(ValueError, match="loss_type"):
        _backend.forward(*bad_type, family=(x["slp"], None, good))


def test_from_logits_with_entropy_bonus():
    """grpo_loss_from_logits: the fused logits kernel's logps and entropy (its
    gradient into the logits) against log_softmax in float64."""
    g = torch.Generator().manual_seed(9)
    Bq, Tq, V = 3, 7, 13
    logits = torch.randn(Bq, Tq + 1, V, generator=g, dtype=torch.float64).float().double()
    ids = torch.randint(0, V, (Bq, Tq), generator=g)
    mask = torch.rand(Bq, Tq, generator=g) > 0.2
    tm = torch.rand(Bq, Tq, generator=g) > 0.3
    adv = torch.tensor([1.0, -0.7, 0.4], dtype=torch.float64)
    tau = 0.9
    with torch.no_grad():
        lp0 = torch.log_softmax(logits[:, :-1] / tau, -1).gather(-1, ids[..., None])[..., 0]
    old = lp0 + 0.2 * torch.randn(Bq, Tq, generator=g, dtype=torch.float64)
    kw = dict(loss_type="sapo", importance_sampling_level="sequence", token_mask=tm,
              entropy_coef=0.2, normalizer=2.0)
    x = logits.float().requires_grad_(True)   # the logits kernels take fp32, bf16, fp16
    loss, metrics = gmpo_ext.grpo_loss_from_logits(x, ids, old, adv, mask, temperature=tau,
                                                   return_metrics=True, **kw)
    (gx,) = torch.autograd.grad(loss, x)
    y = logits.float().double().requires_grad_(True)
    logp_all = torch.log_softmax(y[:, :-1] / tau, -1)
    lp = logp_all.gather(-1, ids[..., None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    want, wm = grpo_family_reference(lp, old, adv, mask, entropies=ent, **kw)
    (gy,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), gy, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(metrics["entropy"].double(), wm["entropy"], rtol=1e-5, atol=1e-6)


def test_from_hidden_family_packed_and_entropy_bonus():
    """grpo_loss_from_hidden passes every family option; packed rows
    (cu_seqlens: sampling_logps / token_mask packed like old_logps) equal the
    padded call; the entropy bonus from the fused head's entropy has its
    gradient into hidden and weight (against torch in float64)."""
    g = torch.Generator().manual_seed(10)
    lens = [5, 3, 6]
    Bq, Tq, H, V = 3, 6, 8, 17
    hid = torch.randn(Bq, Tq, H, generator=g, dtype=torch.float64).float()
    W = (0.3 * torch.randn(V, H, generator=g, dtype=torch.float64)).float()
    ids = torch.randint(0, V, (Bq, Tq), generator=g)
    mask = torch.zeros(Bq, Tq, dtype=torch.bool)
    for i, n in enumerate(lens):
        mask[i, :n] = True
    adv = torch.tensor([1.0, -0.7, 0.4])
    with torch.no_grad():
        lp0 = torch.log_softmax(hid.double() @ W.double().T, -1).gather(-1, ids[..., None])[..., 0]
    old = (lp0 + 0.2 * torch.randn(Bq, Tq, generator=g, dtype=torch.float64)).float()
    slp = (old + 0.3 * torch.randn(Bq, Tq, generator=g)).float()
    tm = torch.rand(Bq, Tq, generator=g) > 0.3
    kw = dict(loss_type="dapo", importance_sampling_level="sequence", delta=1.3,
              off_policy_mask_threshold=0.01, entropy_coef=0.1)

    def padded():
        h, w = hid.clone().requires_grad_(True), W.clone().requires_grad_(True)
        loss = gmpo_ext.grpo_loss_from_hidden(h, w, ids, old, adv, mask, sampling_logps=slp,
                                              token_mask=tm, **kw)
        return (loss,) + torch.autograd.grad(loss, (h, w))

    def packed():
        sel = mask.reshape(-1)
        h = hid.reshape(-1, H)[sel].clone().requires_grad_(True)
        w = W.clone().requires_grad_(True)
        cu = torch.tensor([0, 5, 8, 14], dtype=torch.int32)
        pk = lambda t: t.reshape(-1)[sel]   # noqa: E731
        loss = gmpo_ext.grpo_loss_from_hidden(h, w, pk(ids), pk(old), adv, pk(mask),
                                              cu_seqlens=cu, sampling_logps=pk(slp),
                                              token_mask=pk(tm), **kw)
        gh, gw = torch.autograd.grad(loss, (h, w))
        full = torch.zeros(Bq * Tq, H)
        full[sel] = gh
        return loss, full.reshape(Bq, Tq, H), gw

    def reference():
        h, w = hid.double().requires_grad_(True), W.double().requires_grad_(True)
        la = torch.log_softmax(h @ w.T, -1)
        lp = la.gather(-1, ids[..., None])[..., 0]
        ent = -(la.exp() * la).sum(-1)
        loss, _ = grpo_family_reference(lp, old, adv, mask, sampling_logps=slp, token_mask=tm,
                                        entropies=ent, **kw)
        return (loss,) + torch.autograd.grad(loss, (h, w))

    a, b, r = padded(), packed(), reference()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(a, r):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-6)


def _op_args(dtype=torch.float32):
    from gmpo_ext import _backend
    x = _inputs(dtype, seed=11)
    lp = x["lp"].to(dtype).requires_grad_(True)
    fam = [1.0, 1.0, 1.0, 1.0, 1.4, 0.02, 1.0, 1.05, 2.0, 3.0, 3.0, 2.0]
    return (lp, x["old"].to(dtype), x["adv"].to(dtype), x["mask"], x["ref"].to(dtype),
            x["isw_t"].to(dtype), _backend.ALGO_FAMILY, 0, _backend.FAMILY_LOSS_TYPES["dapo"],
            0.2, 0.28, 0.05, 0.0, 1.0, 0.0, x["slp"].to(dtype), x["tm"], fam)


def test_opcheck_family_ops(backend, device):
    """The registered ops with the family's tensors and options: schema, fake
    kernels, autograd registration (torch.library.opcheck)."""
    args = _op_args()
    torch.library.opcheck(torch.ops.gmpo_ext.loss_fwd.default, args)
    _, _, rows = torch.ops.gmpo_ext.loss_fwd(*args)
    grad_loss = torch.tensor(0.37)
    nograd = (args[0].detach(),) + args[1:]
    torch.library.opcheck(torch.ops.gmpo_ext.loss_bwd.default, (grad_loss, rows) + nograd)


@pytest.mark.slow
def test_compile_fullgraph_family_equals_eager():
    torch._dynamo.reset()
    x = _inputs(torch.float32, seed=12)

    def step(lp, ent):
        loss, m = gmpo_ext.grpo_loss(lp, x["old"].float(), x["adv"].float(), x["mask"],
                                     loss_type="sapo", importance_sampling_level="sequence",
                                     off_policy_mask_threshold=0.02,
                                     sampling_logps=x["slp"].float(), token_mask=x["tm"],
                                     entropies=ent, entropy_coef=0.1, return_metrics=True)
        return loss * 0.37, m["entropy"]

    compiled = torch.compile(step, fullgraph=True)
    outs = []
    for fn in (step, compiled):
        lp = x["lp"].float().requires_grad_(True)
        ent = x["ent"].float().requires_grad_(True)
        loss, e = fn(lp, ent)
        loss.backward()
        outs.append((loss.detach(), e, lp.grad, ent.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


class _Acc:
    """The few accelerate calls _compute_loss makes, for one process."""
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _trl_compute_loss(GRPOTrainer, x, lp, ent, loss_type, level, kw, ga, spg, items):
    """TRL's own GRPOTrainer._compute_loss on a stand-in trainer whose model
    returns these log-probs and entropies: (loss, metrics)."""
    from collections import defaultdict
    from types import SimpleNamespace
    B_, T_ = lp.shape
    args = SimpleNamespace(use_bias_correction_kl=kw.get("use_bias_correction_kl", False),
                           delta=kw.get("delta"), sapo_temperature_pos=1.0,
                           sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                           vespo_k_neg=3.0, vespo_lambda_neg=2.0, steps_per_generation=spg,
                           entropy_target=0.0)
    entropy_mask = kw.get("token_mask")
    self = SimpleNamespace(
        args=args, loss_type=loss_type, importance_sampling_level=level,
        epsilon_low=0.2, epsilon_high=kw["epsilon_high"], beta=kw.get("beta", 0.0),
        off_policy_mask_threshold=kw.get("off_policy_mask_threshold"),
        top_entropy_quantile=0.5 if entropy_mask is not None else 1.0,
        use_vllm=kw.get("is_weights") is not None, vllm_importance_sampling_correction=True,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=ga,
        max_completion_length=T_, accelerator=_Acc(), aux_loss_enabled=False,
        _entropy_bonus_enabled=kw.get("entropy_coef", 0.0) != 0, use_adaptive_entropy=False,
        entropy_coef=kw.get("entropy_coef", 0.0), _metrics={"train": defaultdict(list)},
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        get_high_entropy_mask=lambda e, m, thr: entropy_mask,
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, ent, None))
    inputs = dict(prompt_ids=torch.zeros(B_, 1, dtype=torch.long),
                  prompt_mask=torch.ones(B_, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B_, T_, dtype=torch.long),
                  completion_mask=x["mask"].long(), advantages=x["adv"].float(),
                  old_per_token_logps=x["old"].float(), num_items_in_batch=torch.tensor(items))
    if kw.get("beta"):
        inputs["ref_per_token_logps"] = kw["ref_logps"].float()
    if kw.get("sampling_logps") is not None:
        inputs["sampling_per_token_logps"] = kw["sampling_logps"].float()
    if kw.get("is_weights") is not None:
        inputs["importance_sampling_ratio"] = kw["is_weights"].float().reshape(B_, -1)
    loss = GRPOTrainer._compute_loss(self, None, inputs)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", TYPES)
def test_equals_trl_compute_loss(loss_type, level):
    """TRL 1.16's own GRPOTrainer._compute_loss (on a stand-in trainer) against
    grpo_loss with the documented mapping: loss, d loss / d logps, d loss /
    d entropies and the metrics, fp32, every option on (is_weights per token,
    the entropy mask as token_mask, the entropy bonus, gradient accumulation 2,
    steps_per_generation 2)."""
    GRPOTrainer = _trl()
    x = _inputs(torch.float32, seed=13)
    ga, spg, items = 2, 2, 123.0
    for name in ("plain", "all"):
        kw = _kwargs(x, loss_type, level, OPTIONS[name], torch.float32)
        kw = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in kw.items()}
        lp = x["lp"].float().requires_grad_(True)
        ent = x["ent"].float().requires_grad_(True)
        want, wm = _trl_compute_loss(GRPOTrainer, x, lp, ent, loss_type, level, kw, ga, spg,
                                     items)
        gw = torch.autograd.grad(want, [lp, ent], allow_unused=True)
        lp2 = x["lp"].float().requires_grad_(True)
        ent2 = x["ent"].float().requires_grad_(True)
        mine = dict(kw)
        mine["entropies"] = ent2   # TRL always logs the entropy

        got, gm = gmpo_ext.grpo_loss(lp2, x["old"].float(), x["adv"].float(), x["mask"],
                                     normalizer=ga, num_items_in_batch=items / 1 / spg,
                                     return_metrics=True, **mine)
        gg = torch.autograd.grad(got, [lp2] + ([ent2] if mine.get("entropy_coef") else []))
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6,
                                   msg=f"{loss_type} {level} {name}: loss")
        torch.testing.assert_close(gg[0], gw[0], rtol=2e-5, atol=1e-6,
                                   msg=f"{loss_type} {level} {name}: grad")
        if mine.get("entropy_coef"):
            torch.testing.assert_close(gg[1], gw[1], rtol=2e-5, atol=1e-7)
        for k, v in wm.items():
            if k in gm:
                assert abs(float(gm[k]) - v) <= 2e-5 * (1 + abs(v)), f"{loss_type} {level} {k}"
        for k in ("clip_ratio/low_mean", "cispo_clip_ratio", "vespo/phi_seq_mean", "kl",
                  "entropy"):
            assert (k in wm) == (k in gm), f"{loss_type} {level} {name}: metric {k}"


def test_from_hidden_packed_vespo_token_weights():
    """Packed rows: the padding of the (B, T_max) layout adds nothing to
    vespo's unmasked sum of log importance weights (padded with weight 1)."""
    g = torch.Generator().manual_seed(14)
    lens, H, V = [4, 2, 5], 6, 11
    N, Bq, Tq = sum(lens), 3, 5
    hid = torch.randn(N, H, generator=g)
    W = 0.3 * torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (N,), generator=g)
    old = -torch.rand(N, generator=g) * 3
    isw = torch.rand(N, generator=g) + 0.5
    adv = torch.tensor([1.0, -0.5, 0.3])
    cu = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    loss = gmpo_ext.grpo_loss_from_hidden(hid, W, ids, old, adv, torch.ones(N, dtype=torch.bool),
                                          cu_seqlens=cu, loss_type="vespo", is_weights=isw)
    lp = torch.log_softmax(hid.double() @ W.double().T, -1).gather(-1, ids[:, None].long())[:, 0]
    want = 0.0
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        phi = gamma_weights_reference(adv[i].double().reshape(1, 1),
                                      (lp[a:b] - old[a:b].double()).reshape(1, -1),
                                      torch.ones(1, b - a, dtype=torch.float64),
                                      isw[a:b].double().reshape(1, -1))
        want = want - (phi * adv[i] * lp[a:b]).sum()
    torch.testing.assert_close(loss.double(), want / N, rtol=2e-5, atol=1e-6)
