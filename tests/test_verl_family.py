"""verl's vanilla, gspo, cispo and sapo policy losses, fused (grpo_loss with
convention="verl", gmpo_ext.verl's *_fused functions).

Compared with a float64 transcription of verl's formulas written here from the
description of core_algos.py (verl/trainer/ppo/core_algos.py: the four
compute_policy_loss_* functions and agg_loss), autograd giving the reference
gradient; and, when verl imports, with verl's own functions through its
registry.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import gmpo_ext
import gmpo_ext.verl as gverl

from _verl import VERL_MISSING, core_algos, needs_verl  # noqa: F401

MODES = ("vanilla", "gspo", "cispo", "sapo")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")
GBI = {"dp_size": 2, "batch_num_tokens": 301, "global_batch_size": 13, "loss_scale_factor": 50}


# ----------------------------------------------------------------------------
# the float64 transcription (verl's semantics, written from its description)

def _masked_mean(x, m):
    return torch.where(m != 0, x, torch.zeros_like(x)).mul(m).sum() / (m.sum() + 1e-8)


def ref_agg(mat, m, mode, info):
    """verl 0.9's agg_loss: the five modes, with global_batch_info's overrides."""
    info = info or {}
    dp = info.get("dp_size", 1)
    rows_n = m.sum(-1)
    token_sum = torch.where(m != 0, mat, torch.zeros_like(mat)).mul(m)
    nonempty = (rows_n > 0).to(mat.dtype)
    if mode == "token-mean":
        return token_sum.sum() / info.get("batch_num_tokens", m.sum()) * dp
    if mode == "token-sum":
        return token_sum.sum() * dp
    per_row = token_sum.sum(-1)
    if mode == "seq-mean-token-mean":
        per_row = per_row / (rows_n + 1e-8)
    loss = (per_row * nonempty).sum() / info.get("global_batch_size", nonempty.sum()) * dp
    if mode == "seq-mean-token-sum-norm":
        loss = loss / info.get("loss_scale_factor", m.shape[-1])
    return loss


def ref_loss(mode, old, lp, adv, m, agg, cfg, w):
    """(loss, metrics) of verl's mode, in the dtype of the inputs (use float64)."""
    lo = cfg.clip_ratio_low if cfg.clip_ratio_low is not None else cfg.clip_ratio
    hi = cfg.clip_ratio_high if cfg.clip_ratio_high is not None else cfg.clip_ratio
    info = getattr(cfg, "global_batch_info", None)
    zero = torch.zeros((), dtype=lp.dtype)
    l_raw = lp - old
    lcl = l_raw.clamp(-20.0, 20.0)
    r = lcl.exp()
    clipfrac_lower = zero
    if mode == "vanilla":
        surrogate = -adv * r
        clipped = -adv * r.clamp(1 - lo, 1 + hi)
        ppo = torch.maximum(surrogate, clipped)
        clipfrac = _masked_mean((clipped > surrogate).to(lp.dtype), m)
        cap = -adv * cfg.clip_ratio_c
        tok = torch.where(adv < 0, torch.minimum(cap, ppo), ppo)
        clipfrac_lower = _masked_mean(((ppo > cap) & (adv < 0)).to(lp.dtype), m)
        kl = _masked_mean(-lcl, m)
    elif mode == "gspo":
        if gverl._gspo_ignores_agg_mode():   # the installed verl is 0.9.0
            agg = "seq-mean-token-mean"
        mu = (l_raw * m).sum(-1) / m.sum(-1).clamp(min=1)
        # each token: the row's ratio, with the gradient of its own logp only
        log_s = (mu.detach()[:, None] + (lp - lp.detach())).clamp(max=10.0)
        s = log_s.exp()
        surrogate = -adv * s
        clipped = -adv * s.clamp(1 - lo, 1 + hi)
        tok = torch.maximum(surrogate, clipped)
        clipfrac = _masked_mean((clipped > surrogate).to(lp.dtype), m)
        kl = _masked_mean(-l_raw, m)
    elif mode == "cispo":
        cr = r.clamp(1 - lo, 1 + hi)
        tok = -cr.detach() * adv * lp
        clipfrac = _masked_mean((r != cr).to(lp.dtype), m)
        kl = _masked_mean(-lcl, m)
    else:
        agg = "seq-mean-token-mean"
        tau = torch.where(adv > 0, torch.full_like(adv, cfg.tau_pos), torch.full_like(adv, cfg.tau_neg))
        tok = -torch.sigmoid(tau * (r - 1)) * (4 / tau) * adv
        clipfrac = zero
        kl = _masked_mean(-lcl, m)
    if w is not None:
        tok = tok * w
    loss = ref_agg(tok, m, agg, info)
    metrics = {"actor/pg_clipfrac": float(clipfrac), "actor/ppo_kl": float(kl.detach()),
               "actor/pg_clipfrac_lower": float(clipfrac_lower)}
    return loss, metrics


# ----------------------------------------------------------------------------
# inputs with every edge: |l| > 20, a row with mu > 10, an empty row, A = 0,
# advantages that change sign inside a row, a float mask

def make_inputs(seed, B=7, T=29, dtype=torch.float64, with_is=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lp[0, 2] = old[0, 2] + 23.0          # l > 20
    lp[0, 5] = old[0, 5] - 25.0          # l < -20
    lp[4] = old[4] + 12.0                # the row's mean log-ratio > 10
    a_row = torch.randn(B, 1, generator=g, dtype=torch.float64)
    a_row[1] = 0.0                       # A = 0
    adv = a_row.expand(B, T).clone()
    adv[2, ::3] *= -1.0                  # mixed signs inside a row
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0                       # an empty row
    lengths[0] = T
    mask = (torch.arange(T) < lengths[:, None]).to(torch.float64)
    mask[5, :3] = 0.5                    # a float mask weighs tokens
    isw = (0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)) if with_is else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(old), cast(lp), cast(adv), cast(mask), cast(isw)


def config(with_gbi, clip_ratio_c=3.0):
    cfg = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                          clip_ratio_c=clip_ratio_c, tau_pos=1.0, tau_neg=1.05,
                          global_batch_info=dict(GBI) if with_gbi else {})
    return cfg


FUSED = {"vanilla": gverl.compute_policy_loss_vanilla_fused,
         "gspo": gverl.compute_policy_loss_gspo_fused,
         "cispo": gverl.compute_policy_loss_cispo_fused,
         "sapo": gverl.compute_policy_loss_sapo_fused}

TOL = {torch.float64: (1e-10, 1e-12, 1e-12), torch.float32: (2e-5, 1e-6, 1e-6),
       torch.bfloat16: (2e-5, 1e-6, 1e-3)}   # rtol, atol of the loss/grad, metric atol


def check(mode, agg, with_is, with_gbi, dtype=torch.float64, seed=0, fused_fn=None, ref_fn=None):
    old, lp, adv, mask, isw = make_inputs(seed, dtype=dtype, with_is=with_is)
    cfg = config(with_gbi)
    # the reference in float64 from the same (rounded) inputs
    up = (lambda t: None if t is None else t.double())
    lp_ref = lp.detach().double().clone().requires_grad_()
    if ref_fn is None:
        l_ref, m_ref = ref_loss(mode, up(old), lp_ref, up(adv), up(mask), agg, cfg, up(isw))
    else:
        l_ref, m_ref = ref_fn(up(old), lp_ref, up(adv), up(mask), agg, cfg, up(isw))
    l_ref.backward()
    lp_f = lp.detach().clone().requires_grad_()
    fn = fused_fn or FUSED[mode]
    l_f, m_f = fn(old, lp_f, adv, mask, agg, cfg, isw)
    l_f.backward()
    rtol, atol, matol = TOL[dtype]
    assert l_f.dim() == 0 and l_f.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want, got = float(l_ref.detach()), float(l_f.detach())
    assert math.isfinite(got) and abs(got - want) <= rtol * abs(want) + atol, (got, want)
    assert lp_f.grad.dtype == dtype
    torch.testing.assert_close(lp_f.grad.double(), lp_ref.grad, rtol=rtol if dtype != torch.bfloat16 else 1e-2,
                               atol=atol if dtype != torch.bfloat16 else 1e-3)
    assert list(m_f) == ["actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"]
    for k, v in m_ref.items():
        assert isinstance(m_f[k], float)
        assert abs(m_f[k] - v) <= matol * max(1.0, abs(v)), (k, m_f[k], v)
    return l_f, lp_f.grad


CASES = [(mode, agg) for mode in MODES
         for agg in (AGG_MODES if mode != "sapo" else ("token-mean",))]


@pytest.mark.parametrize("with_gbi", [False, True], ids=["no_gbi", "gbi"])
@pytest.mark.parametrize("with_is", [False, True], ids=["no_is", "is"])
@pytest.mark.parametrize("mode,agg", CASES)
def test_matches_transcription_fp64(mode, agg, with_is, with_gbi):
    """Every mode x its aggregation modes (sapo ignores loss_agg_mode, as
    verl's does) x rollout_is_weights x global_batch_info, fp64 1e-10."""
    check(mode, agg, with_is, with_gbi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_transcription_low_precision(mode, dtype):
    check(mode, "seq-mean-token-mean", True, True, dtype=dtype, seed=3)


def test_float16_runs_and_matches():
    check("vanilla", "token-mean", True, False, dtype=torch.float32, seed=4)
    old, lp, adv, mask, isw = make_inputs(4, dtype=torch.float16, with_is=True)
    lp.requires_grad_()
    loss, _ = gverl.compute_policy_loss_cispo_fused(old, lp, adv, mask, "token-mean",
                                                    config(False), isw)
    loss.backward()
    want, _ = ref_loss("cispo", old.double(), lp.detach().double(), adv.double(),
                       mask.double(), "token-mean", config(False), isw.double())
    assert abs(float(loss.detach()) - float(want)) <= 1e-4 * abs(float(want)) + 1e-6
    assert lp.grad.dtype == torch.float16 and torch.isfinite(lp.grad).all()


def test_edges_do_what_verl_does():
    """The edges of the inputs, one by one: |l| > 20 gives vanilla and sapo no
    gradient (the clamp) and cispo its clipped ratio; a row past mu = 10 gives
    gspo no gradient; an empty row and A = 0 give 0."""
    old, lp, adv, mask, isw = make_inputs(0)
    grads = {}
    for mode in MODES:
        lpg = lp.clone().requires_grad_()
        loss, _ = FUSED[mode](old, lpg, adv, mask, "token-mean", config(False), None)
        loss.backward()
        grads[mode] = lpg.grad
        assert grads[mode][3].abs().sum() == 0        # the empty row
        assert grads[mode][1].abs().sum() == 0        # A = 0
    for mode in ("vanilla", "sapo"):
        assert grads[mode][0, 2] == 0 and grads[mode][0, 5] == 0
    assert grads["cispo"][0, 2] != 0 and grads["cispo"][0, 5] != 0
    assert grads["gspo"][4].abs().sum() == 0 and grads["gspo"][0].abs().sum() != 0
    # gspo with mu > 10: the loss holds e^10, not e^12
    row = torch.zeros_like(lp)
    row[4] = 1.0
    loss, _ = gmpo_ext.grpo_loss(lp, old, adv, mask * row, convention="verl", loss_type="gspo",
                                 epsilon_low=0.2, epsilon_high=0.28, return_metrics=True)
    a4 = float(adv[4, 0])
    want = -a4 * (math.exp(10.0) if a4 < 0 else 1.28)
    assert abs(float(loss) - want) <= 1e-9 * abs(want)


def test_dual_clip_caps_negative_advantages():
    """vanilla: A < 0 and a ratio above clip_ratio_c: the loss is -A * c, no gradient."""
    old = torch.zeros(1, 4, dtype=torch.float64)
    lp = torch.tensor([[math.log(5.0), math.log(2.0), math.log(0.5), 0.1]],
                      dtype=torch.float64, requires_grad=True)
    adv = torch.full((1, 4), -1.0, dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    loss, m = gverl.compute_policy_loss_vanilla_fused(old, lp, adv, mask, "token-mean",
                                                      config(False), None)
    loss.backward()
    # tokens: 5 -> capped at 3; 2 -> 2; 0.5 -> clipped up to 0.8; e^0.1 -> itself
    want = (3.0 + 2.0 + 0.8 + math.exp(0.1)) / 4
    assert abs(float(loss) - want) < 1e-12
    assert lp.grad[0, 0] == 0 and lp.grad[0, 2] == 0
    assert abs(float(lp.grad[0, 1]) - 2.0 / 4) < 1e-12
    assert abs(m["actor/pg_clipfrac_lower"] - 0.25) < 1e-6
    assert abs(m["actor/pg_clipfrac"] - 0.25) < 1e-6


def test_gspo_gradient_is_per_token():
    """verl's gspo: each token's gradient carries its own advantage and weight
    (sg[s] * p / sg[p]), which TRL's sequence level (the row's mean) does not."""
    old, lp, adv, mask, _ = make_inputs(1)
    isw = torch.ones_like(lp)
    isw[0, :4] = 3.0
    lpg = lp.clone().requires_grad_()
    loss = gmpo_ext.grpo_loss(lpg, old, adv, mask, convention="verl", loss_type="gspo",
                              is_weights=isw)
    loss.backward()
    g = lpg.grad[0]
    assert abs(float(g[0] / g[5]) - 3.0 * float(adv[0, 0] / adv[0, 5])) < 1e-9


def test_grpo_loss_verl_options():
    old, lp, adv, mask, _ = make_inputs(2)
    kw = dict(convention="verl", loss_type="vanilla")
    with pytest.raises(ValueError, match="loss_type"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, convention="verl", loss_type="dapo")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode="mean", **kw)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, clip_ratio_c=1.0, **kw)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, convention="verl", loss_type="cispo",
                           clip_ratio_c=2.0)
    with pytest.raises(ValueError, match="delta"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, delta=2.0, **kw)
    with pytest.raises(ValueError, match="beta"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, beta=0.1, ref_logps=old, **kw)
    with pytest.raises(ValueError, match="global_batch_info\\['dp_size'\\]"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, global_batch_info={"dp_size": 0}, **kw)
    with pytest.raises(ValueError, match="global_batch_info\\['global_batch_size'\\]"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-sum",
                           global_batch_info={"global_batch_size": 2.5}, **kw)
    with pytest.raises(TypeError, match="global_batch_info"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, global_batch_info=3, **kw)
    with pytest.raises(ValueError, match="convention"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode="token-mean")
    # global_batch_info as a tensor-valued dict, as verl may fill it
    a = gmpo_ext.grpo_loss(lp, old, adv, mask, global_batch_info={"batch_num_tokens":
                                                                 torch.tensor(100)}, **kw)
    b = gmpo_ext.grpo_loss(lp, old, adv, mask, global_batch_info={"batch_num_tokens": 100}, **kw)
    assert float(a) == float(b)


def test_config_errors_and_kinds():
    old, lp, adv, mask, _ = make_inputs(2)
    with pytest.raises(ValueError, match="gspo_fused: config"):
        gverl.compute_policy_loss_gspo_fused(old, lp, adv, mask, "token-mean", None)
    with pytest.raises(ValueError, match="vanilla_fused: config has no clip_ratio"):
        gverl.compute_policy_loss_vanilla_fused(old, lp, adv, mask, "token-mean",
                                                SimpleNamespace())
    with pytest.raises(ValueError, match="tau_neg"):
        gverl.compute_policy_loss_sapo_fused(old, lp, adv, mask, "token-mean",
                                             {"tau_pos": 1.0})
    # a dict and a dataclass-like object give the same as the namespace
    cfg = config(True)
    want, _ = gverl.compute_policy_loss_cispo_fused(old, lp, adv, mask, "seq-mean-token-sum", cfg)
    got, _ = gverl.compute_policy_loss_cispo_fused(old, lp, adv, mask, "seq-mean-token-sum",
                                                   dict(vars(cfg)))
    assert float(got) == float(want)
    # clip_ratio_c absent: verl's default 3.0
    cfg2 = SimpleNamespace(**{k: v for k, v in vars(config(False)).items() if k != "clip_ratio_c"})
    a, _ = gverl.compute_policy_loss_vanilla_fused(old, lp, adv, mask, "token-mean", cfg2)
    b, _ = gverl.compute_policy_loss_vanilla_fused(old, lp, adv, mask, "token-mean", config(False))
    assert float(a) == float(b)


def test_registered_names():
    assert set(gverl.LOSS_MODES) == {"gmpo_fused", "vanilla_fused", "gspo_fused",
                                     "cispo_fused", "sapo_fused"}
    assert gverl.REGISTERED == (core_algos is not None)


@pytest.mark.simt
def test_simt_case_per_mode():
    """The CUDA kernels (gmpo_fam_fwd_kernel / gmpo_fam_bwd_kernel) under the
    SIMT emulation against the C core, one case per mode."""
    import shutil
    import os

    if shutil.which(os.environ.get("SIMT_CXX", "g++")) is None:
        pytest.skip("no C++ compiler for the SIMT emulation")
    import simt_backend
    from gmpo_ext import _backend

    mod = simt_backend.load_simt_module()
    for dtype in (torch.float64, torch.float32):
        old, lp, adv, mask, isw = make_inputs(5, dtype=dtype, with_is=True)
        for mode in MODES:
            agg = "seq-mean-token-sum" if mode == "cispo" else "token-mean"
            out = []
            for m in (None, mod):
                _backend.set_simt_module(m)
                try:
                    lpg = lp.clone().requires_grad_()
                    loss, met = FUSED[mode](old, lpg, adv, mask, agg, config(True), isw)
                    loss.backward()
                finally:
                    _backend.set_simt_module(None)
                out.append((float(loss), lpg.grad, met))
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert abs(out[0][0] - out[1][0]) <= tol * abs(out[0][0]) + tol, mode
            torch.testing.assert_close(out[1][1], out[0][1], rtol=tol, atol=tol)
            for k in out[0][2]:
                assert abs(out[0][2][k] - out[1][2][k]) <= tol, (mode, k)


# ----------------------------------------------------------------------------
# verl itself, through its registry

@needs_verl
@pytest.mark.parametrize("with_gbi", [False, True], ids=["no_gbi", "gbi"])
@pytest.mark.parametrize("with_is", [False, True], ids=["no_is", "is"])
@pytest.mark.parametrize("mode,agg", CASES)
def test_against_verl(mode, agg, with_is, with_gbi):
    from verl.workers.config import ActorConfig   # gspo, sapo, cispo assert an ActorConfig

    fused = core_algos.get_policy_loss_fn(f"{mode}_fused")
    assert fused is FUSED[mode]
    theirs = core_algos.get_policy_loss_fn(mode)
    base = config(with_gbi)
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                      clip_ratio=base.clip_ratio, clip_ratio_low=base.clip_ratio_low,
                      clip_ratio_high=base.clip_ratio_high, clip_ratio_c=base.clip_ratio_c,
                      tau_pos=base.tau_pos, tau_neg=base.tau_neg)
    cfg.global_batch_info.update(base.global_batch_info)

    def ref(old, lp, adv, mask, agg_, _cfg, w):
        return theirs(old, lp, adv, mask, agg_, cfg, w)

    def ours(old, lp, adv, mask, agg_, _cfg, w):
        return fused(old, lp, adv, mask, agg_, cfg, w)

    check(mode, agg, with_is, with_gbi, fused_fn=ours, ref_fn=ref)


@pytest.mark.parametrize("mode", ["gspo", "vanilla"])
def test_opcheck_verl_family(mode):
    """The registered ops (what torch.compile and export call) take verl's
    options: the family's 14 numbers."""
    from gmpo_ext import _backend

    old, lp, adv, mask, isw = make_inputs(6, dtype=torch.float32, with_is=True)
    lp.requires_grad_()
    seq = float(mode == "gspo")
    agg = 2.0 if mode == "gspo" else 1.0
    cc = 0.0 if mode == "gspo" else 3.0
    fam = [seq, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.05, 2.0, 3.0, 3.0, 2.0, agg, cc]
    args = (lp, old, adv, mask, None, isw, _backend.ALGO_FAMILY, 1, 0, 0.2, 0.28, 0.0, 0.0,
            0.5, 0.0)
    torch.library.opcheck(torch.ops.gmpo_ext.loss_fwd.default, args, {"family": fam})
    loss, _, rows = torch.ops.gmpo_ext.loss_fwd(*args, family=fam)
    gl = torch.tensor(0.37)
    torch.library.opcheck(torch.ops.gmpo_ext.loss_bwd.default,
                          (gl, rows) + tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                             for a in args), {"family": fam})
    # the op's loss is grpo_loss's (normalizer 0.5: dp_size 2)
    want = gmpo_ext.grpo_loss(lp, old, adv, mask, convention="verl", loss_type=mode,
                              epsilon_low=0.2, epsilon_high=0.28, is_weights=isw,
                              loss_agg_mode="seq-mean-token-mean" if mode == "gspo"
                              else "seq-mean-token-sum",
                              global_batch_info={"dp_size": 2,
                                                 "global_batch_size": int((mask.sum(-1) > 0).sum())})
    assert float(loss.detach()) == float(want.detach())


@needs_verl
def test_every_mode_loaded_through_verl_hooks():
    """A fresh process that only imports verl (VERL_USE_EXTERNAL_MODULES) finds
    the four modes registered next to gmpo_fused."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "gmpo_ext.verl",
           "VERL_USE_EXTERNAL_PLUGINS": "none"}
    code = ("import verl\n"
            "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
            "for m in ('vanilla', 'gspo', 'cispo', 'sapo'):\n"
            "    print(get_policy_loss_fn(m + '_fused').__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [f"compute_policy_loss_{m}_fused" for m in MODES]


def test_gspo_follows_the_installed_verl_release(monkeypatch):
    """verl 0.9.1's gspo aggregates by loss_agg_mode, 0.9.0's always by
    seq-mean-token-mean: gspo_fused follows the installed release."""
    old, lp, adv, mask, _ = make_inputs(7)
    cfg = config(False)
    kw = dict(convention="verl", loss_type="gspo", epsilon_low=0.2, epsilon_high=0.28)
    by_mode = {agg: float(gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode=agg, **kw))
               for agg in ("token-mean", "seq-mean-token-mean")}
    assert by_mode["token-mean"] != by_mode["seq-mean-token-mean"]
    monkeypatch.setattr(gverl, "_GSPO_IGNORES", False)      # 0.9.1 and later
    got, _ = gverl.compute_policy_loss_gspo_fused(old, lp, adv, mask, "token-mean", cfg)
    assert float(got) == by_mode["token-mean"]
    monkeypatch.setattr(gverl, "_GSPO_IGNORES", True)       # 0.9.0
    got, _ = gverl.compute_policy_loss_gspo_fused(old, lp, adv, mask, "token-mean", cfg)
    assert float(got) == by_mode["seq-mean-token-mean"]


@pytest.mark.parametrize("version,want", [("0.9.1", False), ("0.9.0", True), ("0.8.0", True),
                                          ("0.9.1.dev0+g0abc", False), ("0.10.0rc1", False),
                                          ("1.0", False), ("0.9", True)])
def test_release_parsing(version, want):
    assert (gverl._release(version) < (0, 9, 1)) == want


def test_agg_modes_token_sum_and_sum_norm():
    """verl 0.9's token-sum (the masked sum times dp_size) and
    seq-mean-token-sum-norm (seq-mean-token-sum over loss_scale_factor, by
    default the horizon T) in terms of the other modes."""
    old, lp, adv, mask, _ = make_inputs(8)
    kw = dict(convention="verl", loss_type="vanilla", epsilon_low=0.2, epsilon_high=0.28)
    T = mask.shape[-1]
    tm = float(gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode="token-mean", **kw))
    ts = float(gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode="token-sum", **kw))
    assert abs(ts - tm * float(mask.sum())) <= 1e-12 * abs(ts)
    ts2 = float(gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode="token-sum",
                                   global_batch_info={"dp_size": 4, "batch_num_tokens": 7}, **kw))
    assert abs(ts2 - 4 * ts) <= 1e-12 * abs(ts2)
    ss = float(gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-sum", **kw))
    sn = float(gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-sum-norm",
                                  **kw))
    assert abs(sn - ss / T) <= 1e-12 * abs(sn)
    gbi = {"dp_size": 2, "global_batch_size": 13, "loss_scale_factor": 50}
    ss2 = float(gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-sum",
                                   global_batch_info=gbi, **kw))
    sn2 = float(gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-sum-norm",
                                   global_batch_info=gbi, **kw))
    assert abs(sn2 - ss2 / 50) <= 1e-12 * abs(sn2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, loss_agg_mode="token_mean", **kw)


@pytest.mark.parametrize("agg,key", [("token-mean", "batch_num_tokens"),
                                     ("seq-mean-token-sum", "global_batch_size"),
                                     ("seq-mean-token-mean", "global_batch_size"),
                                     ("seq-mean-token-sum-norm", "global_batch_size")])
def test_dp_size_needs_the_global_count(agg, key):
    """dp_size > 1 without the mode's global count raises, as verl's agg_loss
    (the micro-batch's own count would scale the loss wrongly); token-sum and
    dp_size 1 need none."""
    old, lp, adv, mask, _ = make_inputs(9)
    kw = dict(convention="verl", loss_type="vanilla", loss_agg_mode=agg)
    with pytest.raises(ValueError, match=f"global_batch_info\\['{key}'\\].*dp_size > 1"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, global_batch_info={"dp_size": 2}, **kw)
    with pytest.raises(ValueError, match=key):
        gverl.compute_policy_loss_vanilla_fused(
            old, lp, adv, mask, agg, SimpleNamespace(**{**vars(config(False)),
                                                        "global_batch_info": {"dp_size": 4}}))
    gmpo_ext.grpo_loss(lp, old, adv, mask, global_batch_info={"dp_size": 2, key: 30}, **kw)
    gmpo_ext.grpo_loss(lp, old, adv, mask, global_batch_info={"dp_size": 1}, **kw)
    gmpo_ext.grpo_loss(lp, old, adv, mask, convention="verl", loss_type="vanilla",
                       loss_agg_mode="token-sum", global_batch_info={"dp_size": 2})


def test_sum_norm_without_a_horizon_names_loss_scale_factor():
    z = torch.zeros(3, 0, dtype=torch.float64)
    kw = dict(convention="verl", loss_type="vanilla", loss_agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="loss_scale_factor"):
        gmpo_ext.grpo_loss(z, z, torch.ones(3, dtype=torch.float64), z, **kw)
    loss = gmpo_ext.grpo_loss(z, z, torch.ones(3, dtype=torch.float64), z,
                              global_batch_info={"loss_scale_factor": 8}, **kw)
    assert float(loss) == 0.0
