"""gmpo_ext.verl: the "gmpo_fused" policy loss against verl's geo_mean.

When verl imports (``pip install verl --no-deps`` plus ray, tensordict,
omegaconf, codetiming, msgpack, protobuf, pyvers is enough), the registered
function is compared with verl's own ``compute_policy_loss_geo_mean`` and
loaded through verl's hooks. Without verl, it is compared with a transcription
of geo_mean's formula (shared/DESIGN.md section 1, verl column), written here
line by line from that description, and those tests say so in their names.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import gmpo_ext.verl as gverl

from _verl import VERL_MISSING, core_algos, needs_verl  # noqa: F401


def geo_mean_transcribed(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                         config=None, rollout_is_weights=None):
    """verl's geo_mean as DESIGN.md describes it (the verl column of its table)."""
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    m = response_mask.to(log_prob.dtype)
    l = log_prob - old_log_prob
    c = torch.clamp(l, -low, high)
    s = torch.sign(advantages)
    y = s * torch.minimum(s * l, s * c)
    n = m.sum(-1)
    r = torch.exp((y * m).sum(-1) / (n + 1e-8))
    a = (advantages * m).sum(-1) / (n + 1e-8)
    row = -a * r
    if rollout_is_weights is not None:
        row = row * torch.exp((torch.log(rollout_is_weights + 1e-10) * m).sum(-1) / (n + 1e-8))
    l, c = l.detach(), c.detach()            # metrics only from here on
    clipped = (l != c).to(log_prob.dtype)
    cnt = m.sum()
    metrics = {
        "actor/pg_clipfrac": float((clipped * (advantages > 0) * m).sum() / cnt),
        "actor/ppo_kl": float((-l * m).sum() / cnt),
        "actor/pg_clipfrac_lower": float((clipped * (advantages < 0) * m).sum() / cnt),
    }
    return row.mean(), metrics


def _inputs(seed, B=8, T=37, token_level=True, with_is=False, mask_dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    lp = (old + 0.4 * torch.randn(B, T, generator=g)).requires_grad_()
    a_row = torch.randn(B, 1, generator=g)
    a_row[1] = 0.0
    adv = a_row.expand(B, T).clone() if token_level else a_row.reshape(B)
    if token_level:
        adv[2, ::3] *= -1.0                      # mixed signs inside a row
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0                               # an empty row
    mask = (torch.arange(T) < lengths[:, None]).to(mask_dtype)
    isw = (0.5 + torch.rand(B, T, generator=g)) if with_is else None
    return old, lp, adv, mask, isw


CONFIGS = [
    SimpleNamespace(clip_ratio=0.4, clip_ratio_low=None, clip_ratio_high=None),
    SimpleNamespace(clip_ratio=0.2, clip_ratio_low=0.3, clip_ratio_high=0.45),
]


def _compare(fn_ref, seed, config, with_is, rtol=2e-6):
    old, lp, adv, mask, isw = _inputs(seed, with_is=with_is)
    lp.grad = None
    l_ref, m_ref = fn_ref(old, lp, adv, mask, "token-mean", config, isw)
    l_ref.backward()
    g_ref = lp.grad.clone()
    lp.grad = None
    l_fused, m_fused = gverl.compute_policy_loss_gmpo_fused(old, lp, adv, mask, "token-mean",
                                                            config, isw)
    l_fused.backward()
    assert l_fused.dtype == l_ref.dtype and l_fused.dim() == 0
    assert abs(float(l_fused.detach() - l_ref.detach())) <= rtol * abs(float(l_ref.detach())) + 1e-7
    torch.testing.assert_close(lp.grad, g_ref, rtol=rtol, atol=1e-8)
    assert m_fused.keys() == m_ref.keys()
    for k in m_ref:
        assert isinstance(m_fused[k], float)
        assert abs(m_fused[k] - m_ref[k]) <= 1e-6, (k, m_fused[k], m_ref[k])


@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=["symmetric", "asymmetric"])
def test_against_design_transcription(config, with_is):
    _compare(geo_mean_transcribed, 0, config, with_is)


@needs_verl
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=["symmetric", "asymmetric"])
def test_against_verl_geo_mean(config, with_is):
    assert gverl.REGISTERED
    assert core_algos.get_policy_loss_fn("gmpo_fused") is gverl.compute_policy_loss_gmpo_fused
    _compare(core_algos.get_policy_loss_fn("geo_mean"), 1, config, with_is)


@needs_verl
def test_against_verl_geo_mean_omegaconf():
    """verl hands the actor config over as a DictConfig in its older code paths."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.35, "clip_ratio_high": None})
    _compare(core_algos.get_policy_loss_fn("geo_mean"), 2, cfg, True)


@needs_verl
@pytest.mark.parametrize("hook", ["VERL_USE_EXTERNAL_MODULES", "verl.plugins entry point"])
def test_loaded_through_verl_hooks(hook):
    """A fresh process that only imports verl finds "gmpo_fused" registered."""
    env = {**os.environ}
    if hook == "VERL_USE_EXTERNAL_MODULES":
        env["VERL_USE_EXTERNAL_MODULES"] = "gmpo_ext.verl"
        env["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    else:
        from importlib.metadata import entry_points

        if not any(ep.value == "gmpo_ext.verl" for ep in entry_points(group="verl.plugins")):
            pytest.skip("gmpo_ext's verl.plugins entry point is not installed (pip install -e .)")
        env.pop("VERL_USE_EXTERNAL_MODULES", None)
        env["VERL_USE_EXTERNAL_PLUGINS"] = "auto"
    code = ("import verl\n"
            "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
            "print(get_policy_loss_fn('gmpo_fused').__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("gmpo_ext.verl"), \
        out.stdout + out.stderr[-2000:]


def test_without_verl_nothing_is_registered_but_the_function_works():
    """The module imports with or without verl; REGISTERED says whether it registered."""
    assert gverl.REGISTERED == (core_algos is not None)
    assert gverl.LOSS_MODE == "gmpo_fused"
    assert importlib.util.find_spec("gmpo_ext.verl") is not None


def test_bad_config():
    old, lp, adv, mask, _ = _inputs(0)
    with pytest.raises(ValueError, match="config"):
        gverl.compute_policy_loss_gmpo_fused(old, lp, adv, mask, "token-mean", None)
    with pytest.raises(ValueError, match="clip_ratio"):
        gverl.compute_policy_loss_gmpo_fused(old, lp, adv, mask, "token-mean", SimpleNamespace())
