"""gmpo_ext.trl.GRPOTrainer against TRL's own GRPOTrainer, and GMPOTrainer's
options beyond TRL's GMPOTrainer, with the real TRL on CPU.

A tiny Qwen2-style causal LM with random weights (gmpo_ext.demo, nothing
downloaded). (a) On one fixed batch, built the way ``_compute_loss`` receives
it, the loss, every parameter's gradient, the logged metrics and the entropy
controller's state equal those of ``trl.GRPOTrainer`` in fp32 (1e-5 relative
to the tensor's largest entry), for each loss type at each importance-sampling
level and for each option ``_compute_loss`` reads; the fused path must have
run (no fallback warning). (b) The MoE router's auxiliary loss with a tiny
Qwen2-MoE. (c) A 4-step ``trainer.train()`` trajectory with generation,
beta > 0, num_iterations 2 and gradient accumulation 2, equal to TRL's.
(d) GMPOTrainer's entropy bonus, off-policy mask, delta and MoE auxiliary loss
against float32 torch formulas on TRL's own log-probs.

A batch the trainer does not fuse (per-token advantages) goes to TRL's loss
with a warning (tested below).
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[test]' installs it)")
pytest.importorskip("transformers", reason="transformers is not installed")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402
from trl import GRPOTrainer as TRLGRPOTrainer  # noqa: E402
from trl.experimental.gmpo import GMPOConfig  # noqa: E402
from trl.experimental.gmpo import GMPOTrainer as TRLGMPOTrainer  # noqa: E402

import gmpo_ext.trl as gtrl  # noqa: E402
from gmpo_ext import _backend, grpo_loss  # noqa: E402
from gmpo_ext.demo import build_model, build_tokenizer  # noqa: E402
from gmpo_ext.trl import GMPOTrainer, GRPOTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

RTOL = 1e-5
B, P, T = 6, 3, 7

TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("0123456789+-=abc ")


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    """Random weights saved once: TRL re-creates the reference model from this path (beta != 0)."""
    model = build_model(len(tok), seed=0, hidden=32, tie_word_embeddings=False)
    path = str(tmp_path_factory.mktemp("tiny_qwen2_family"))
    model.save_pretrained(path)
    return path


def _model(model_dir, tok):
    model = build_model(len(tok), seed=0, hidden=32, tie_word_embeddings=False)
    model.config._name_or_path = model_dir
    return model


def _reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _trainer(cls, model, tok, tmp_path, trainer_kw=None, config=GRPOConfig, **kw):
    args = config(output_dir=str(tmp_path / cls.__module__.replace(".", "_")), report_to="none",
                  use_cpu=True, gradient_checkpointing=False, save_strategy="no",
                  per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                  max_steps=1, disable_tqdm=True, **{"bf16": False, **kw})
    ds = Dataset.from_dict({"prompt": ["1+2=", "3+4="] * 4})
    return cls(model=model, reward_funcs=_reward, args=args, train_dataset=ds, processing_class=tok,
               **(trainer_kw or {}))


def _batch(model, V, temperature, *, beta, tool=False, isr=None, sampling=False,
           token_adv=False):
    """One batch shaped like GRPOTrainer's output: left-padded prompts, right-padded
    completions (one empty), a zero advantage, old log-probs off-policy by noise,
    the generation batch's token count; optionally the rollout engine's
    log-probs (``sampling``) and importance-sampling ratio (``isr``)."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(2, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0
    completion_ids = torch.randint(2, V, (B, T), generator=g)
    lengths = torch.tensor([7, 5, 3, 0, 6, 1])
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    advantages = torch.tensor([1.0, -0.7, 0.0, 0.5, -1.2, -0.8])
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        am = torch.cat([prompt_mask, completion_mask], 1)
        logits = model(input_ids=ids, attention_mask=am).logits[:, P - 1:-1] / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None])[..., 0]
    old = lp + 0.8 * torch.randn(B, T, generator=g)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=advantages,
                  old_per_token_logps=old,
                  num_items_in_batch=completion_mask.sum() * 3)   # a generation batch's tokens
    if beta:
        inputs["ref_per_token_logps"] = lp + 0.3 * torch.randn(B, T, generator=g)
    if tool:
        inputs["tool_mask"] = torch.tensor([[1, 1, 0, 0, 1, 1, 1]] * B)
    if sampling:   # rows 1 and 4 (negative advantages) far off-policy, the others close
        far = torch.tensor([0.0, 1.5, 0.0, 0.0, 1.5, 0.1])[:, None]
        inputs["sampling_per_token_logps"] = lp + far + 0.05 * torch.randn(B, T, generator=g)
    if isr is not None:
        inputs["importance_sampling_ratio"] = isr
    if token_adv:   # (B, T) advantages, as a GRPOTrainer subclass may hand over
        inputs["advantages"] = advantages[:, None] * torch.linspace(0.5, 1.5, T)
    return inputs, lp


def _isr(shape):
    g = torch.Generator().manual_seed(5)
    return 0.5 + torch.rand((B, 1) if shape == "sequence" else (B, T), generator=g)


def _run(cls, model_dir, tok, tmp_path, *, grad_accum=1, beta=0.0, tool=False, isr=None,
         sampling=False, eval_mode=False, state=None, trainer_kw=None, token_adv=False, **cfg):
    """One compute_loss + backward: (loss, grads, last metrics, trainer)."""
    model = _model(model_dir, tok)
    trainer = _trainer(cls, model, tok, tmp_path, trainer_kw, beta=beta, **cfg)
    trainer.model.train(not eval_mode)
    trainer.current_gradient_accumulation_steps = grad_accum
    if isr is not None:   # what use_vllm=True with the correction on sets (no vLLM here)
        trainer.use_vllm = True
        trainer.vllm_importance_sampling_correction = True
    for k, v in (state or {}).items():
        setattr(trainer, k, v)
    inputs, _ = _batch(model, len(tok), trainer.temperature, beta=beta, tool=tool, isr=isr,
                       sampling=sampling, token_adv=token_adv)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    mode = "eval" if eval_mode else "train"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    return loss.detach(), grads, metrics, trainer


def _max_rel(a, b):
    """max |a - b| / max |a| (0 when both are 0)."""
    scale = a.abs().max()
    if scale == 0:
        return float((b != 0).any())
    return float((a - b).abs().max() / scale)


def _assert_same(ref, ours, what, all_params=True):
    (l_ref, g_ref), (l_ours, g_ours) = ref, ours
    assert torch.isfinite(l_ref), what
    assert abs(float(l_ours - l_ref)) <= RTOL * max(abs(float(l_ref)), 1e-6), \
        (what, float(l_ours), float(l_ref))
    assert g_ref.keys() == g_ours.keys()
    nonzero = 0
    for name, g in g_ref.items():
        assert _max_rel(g, g_ours[name]) <= RTOL, (what, name, _max_rel(g, g_ours[name]))
        nonzero += bool(g.abs().max() > 0)
    if all_params:
        assert nonzero == len(g_ref), what     # every parameter took part


def _parity(case, kw, model_dir, tok, tmp_path):
    cfg = {k: v for k, v in kw.items()
           if k not in ("grad_accum", "tool", "isr", "sampling", "eval_mode", "state", "beta")}
    l_trl, g_trl, m_trl, t_trl = _run(TRLGRPOTrainer, model_dir, tok, tmp_path, **kw)
    l_ours, g_ours, m_ours, t_ours = _run(GRPOTrainer, model_dir, tok, tmp_path, **kw)
    assert t_ours.fused_lm_head and not t_ours._gmpo_fallback_warned, t_ours._gmpo_fallback_warned
    _assert_same((l_trl, g_trl), (l_ours, g_ours), case)
    for name, value in m_trl.items():     # TRL's metric names, same values
        if name.startswith("sampling/") or name in ("step_time",):
            continue
        assert name in m_ours, (case, name)
        assert math.isclose(m_ours[name], value, rel_tol=1e-5, abs_tol=1e-6), \
            (case, name, m_ours[name], value)
    # TRL's entropy controller: the same state after the step
    for attr in ("entropy_coef", "_last_world_entropy"):
        assert getattr(t_ours, attr) == pytest.approx(getattr(t_trl, attr), rel=1e-6), attr
    return m_ours


# every loss type at each importance-sampling level (GSPO = grpo at "sequence")
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", TYPES)
def test_loss_type_parity_with_trl_grpo(loss_type, level, model_dir, tok, tmp_path):
    kw = dict(loss_type=loss_type, importance_sampling_level=level)
    m = _parity(f"{loss_type}/{level}", kw, model_dir, tok, tmp_path)
    if loss_type in ("grpo", "dapo") and level == "token":    # both clip sides exercised
        assert m["clip_ratio/low_mean"] > 0 and m["clip_ratio/high_mean"] > 0


OPTIONS = {
    "beta": dict(loss_type="dapo", beta=0.1),     # (TRL's default: the KL bias-corrected)
    "beta_plain_kl": dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=False),
    "beta_grad_accum_tool": dict(loss_type="bnpo", beta=0.1, grad_accum=4, tool=True,
                                 use_bias_correction_kl=False),
    "dr_grpo_eval": dict(loss_type="dr_grpo", beta=0.1, eval_mode=True,
                         use_bias_correction_kl=False),
    "dapo_eval_grad_accum": dict(loss_type="dapo", grad_accum=2, eval_mode=True),
    "bias_corrected_kl": dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=True),
    "bias_corrected_kl_gspo": dict(loss_type="grpo", importance_sampling_level="sequence",
                                   beta=0.1, use_bias_correction_kl=True),
    "delta": dict(loss_type="dapo", delta=1.3),
    "delta_at_clip": dict(loss_type="dapo", delta=1.2),   # the high clip metric then 0
    "delta_gspo": dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.05),
    "off_policy_mask_sampling_logps": dict(loss_type="dapo", off_policy_mask_threshold=0.5,
                                           sampling=True, beta=0.1),
    "off_policy_mask_old_logps": dict(loss_type="grpo", off_policy_mask_threshold=0.05),
    "is_ratio_token": dict(loss_type="dapo", isr=_isr("token"), beta=0.1,
                           use_bias_correction_kl=False),
    "is_ratio_sequence": dict(loss_type="grpo", isr=_isr("sequence")),
    "is_ratio_cispo_sequence_level": dict(loss_type="cispo", importance_sampling_level="sequence",
                                          isr=_isr("token")),
    "is_ratio_vespo": dict(loss_type="vespo", isr=_isr("token")),
    "top_entropy_quantile": dict(loss_type="grpo", top_entropy_quantile=0.5, beta=0.1),
    "entropy_bonus": dict(loss_type="dapo", entropy_coef=0.05, grad_accum=2),
    "entropy_bonus_with_quantile": dict(loss_type="sapo", entropy_coef=0.05,
                                        top_entropy_quantile=0.5),
    # the gate reads the previous step's entropy (here below the target: the bonus
    # applies) and the controller moves the coefficient at the step boundary
    "entropy_adaptive": dict(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.02,
                             entropy_target=5.0, state=dict(_last_world_entropy=1.0)),
    "entropy_adaptive_gated_off": dict(loss_type="dapo", use_adaptive_entropy=True,
                                       entropy_target=0.2),
    "sapo_temperatures": dict(loss_type="sapo", sapo_temperature_pos=2.0,
                              sapo_temperature_neg=0.5, beta=0.1),
    "vespo_gamma": dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.0,
                        vespo_k_neg=2.5, vespo_lambda_neg=1.5),
    "luspo_temperature": dict(loss_type="luspo", importance_sampling_level="sequence",
                              temperature=0.7, beta=0.1),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_option_parity_with_trl_grpo(case, model_dir, tok, tmp_path):
    m = _parity(case, dict(OPTIONS[case]), model_dir, tok, tmp_path)
    if case.startswith("entropy_"):
        assert "entropy_coef" in m and "policy_loss" in m


def test_off_policy_mask_is_exercised(model_dir, tok):
    """The fixed batch's off-policy mask drops one negative-advantage row and keeps
    another (so the parity above covers both branches)."""
    model = _model(model_dir, tok)
    inputs, lp = _batch(model, len(tok), 1.0, beta=0.0, sampling=True)
    keep = TRLGRPOTrainer.get_off_policy_mask(inputs["advantages"][:, None], lp,
                                              inputs["sampling_per_token_logps"],
                                              inputs["completion_mask"], 0.5)
    neg = inputs["advantages"] < 0
    assert (keep[neg, 0] == 0).any() and (keep[neg, 0] == 1).any()


def test_per_token_advantages_fall_back_with_a_warning(model_dir, tok, tmp_path):
    """(B, T) advantages are not fused: TRL's own loss, one warning naming them,
    TRL's result."""
    kw = dict(loss_type="dapo", token_adv=True)
    l_trl, g_trl, _, _ = _run(TRLGRPOTrainer, model_dir, tok, tmp_path, **kw)
    with pytest.warns(UserWarning, match=r"per-token \(B, T\) advantages"):
        l_ours, g_ours, _, tr = _run(GRPOTrainer, model_dir, tok, tmp_path, **kw)
    assert tr._gmpo_fallback_warned
    _assert_same((l_trl, g_trl), (l_ours, g_ours), "per-token advantages fallback")


def test_fused_head_is_used(model_dir, tok, tmp_path, monkeypatch):
    """The drop-in scores with linear_logps (the head fused), not the logits kernels;
    fused_lm_head=False takes the logits path; both equal TRL's."""
    calls = {"hidden": 0, "logits": 0}
    real_h, real_l = gtrl.linear_logps, gtrl.selective_logps

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(gtrl, "linear_logps", count("hidden", real_h))
    monkeypatch.setattr(gtrl, "selective_logps", count("logits", real_l))
    kw = dict(loss_type="grpo", beta=0.1, temperature=0.7, use_bias_correction_kl=False)
    l_trl, g_trl, _, _ = _run(TRLGRPOTrainer, model_dir, tok, tmp_path, **kw)
    for fused in (True, False):
        l_ours, g_ours, _, _ = _run(GRPOTrainer, model_dir, tok, tmp_path,
                                    trainer_kw=dict(fused_lm_head=fused), **kw)
        _assert_same((l_trl, g_trl), (l_ours, g_ours), f"fused={fused}")
    assert calls == {"hidden": 1, "logits": 1}


# ----------------------------------------------------------------------------
# MoE: the router's load-balancing loss

def _moe_model(V, path=None):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    cfg = Qwen2MoeConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                         moe_intermediate_size=16, shared_expert_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_experts=4, num_experts_per_tok=2, output_router_logits=True,
                         router_aux_loss_coef=0.05, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(cfg)
    if path is not None:
        model.config._name_or_path = path
    return model


def _moe_run(cls, tok, tmp_path, config=GRPOConfig, trainer_kw=None, **cfg):
    model = _moe_model(len(tok))
    trainer = _trainer(cls, model, tok, tmp_path, trainer_kw, config=config, **cfg)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs, _ = _batch(model, len(tok), 1.0, beta=0.0)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}, \
        trainer, model, inputs


def test_moe_aux_loss_parity_with_trl_grpo(tok, tmp_path):
    """A tiny Qwen2-MoE (output_router_logits=True): TRL adds router_aux_loss_coef x
    the router's load-balancing loss; the drop-in, fused, adds the same (loss,
    every gradient, the aux_loss metric)."""
    l_trl, g_trl, m_trl, _, _, _ = _moe_run(TRLGRPOTrainer, tok, tmp_path, loss_type="dapo")
    l_ours, g_ours, m_ours, tr, _, _ = _moe_run(GRPOTrainer, tok, tmp_path, loss_type="dapo")
    assert tr.fused_lm_head and not tr._gmpo_fallback_warned and tr.aux_loss_enabled
    assert m_trl["aux_loss"] > 0
    assert math.isclose(m_ours["aux_loss"], m_trl["aux_loss"], rel_tol=1e-5)
    _assert_same((l_trl, g_trl), (l_ours, g_ours), "moe", all_params=False)
    gate = [n for n in g_trl if n.endswith("mlp.gate.weight")]
    assert gate and all(g_trl[n].abs().max() > 0 for n in gate)   # the router learned from it


def test_gmpo_moe_aux_loss(tok, tmp_path):
    """GMPOTrainer(router_aux_loss=True) adds coef x the router's loss / gas to TRL's
    GMPO loss (TRL's GMPOTrainer drops it; the default keeps TRL's behaviour)."""
    l_trl, g_trl, _, _, _, _ = _moe_run(TRLGMPOTrainer, tok, tmp_path, config=GMPOConfig)
    l_off, g_off, _, _, _, _ = _moe_run(GMPOTrainer, tok, tmp_path, config=GMPOConfig)
    _assert_same((l_trl, g_trl), (l_off, g_off), "gmpo moe default", all_params=False)
    l_on, g_on, m_on, tr, model, inputs = _moe_run(GMPOTrainer, tok, tmp_path, config=GMPOConfig,
                                                   trainer_kw=dict(router_aux_loss=True))
    assert tr.fused_lm_head and not tr._gmpo_fallback_warned
    # the reference: TRL's GMPO loss + coef * aux / gas, the aux loss from the model's own forward
    model.zero_grad()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    aux = model(input_ids=ids, attention_mask=am, output_router_logits=True).aux_loss
    (0.05 * aux / 2).backward()
    assert math.isclose(m_on["aux_loss"], float(aux), rel_tol=1e-5)
    assert abs(float(l_on) - float(l_trl + 0.05 * aux.detach() / 2)) <= RTOL * abs(float(l_on))
    for n, g in g_on.items():
        aux_grad = model.get_parameter(n).grad
        want = g_trl.get(n, torch.zeros_like(g)) + \
            (torch.zeros_like(g) if aux_grad is None else aux_grad)
        assert _max_rel(want, g) <= RTOL, n


# ----------------------------------------------------------------------------
# GMPOTrainer's options beyond TRL's GMPOTrainer, against torch formulas on
# TRL's own log-probs and entropies (float32, autograd)

def _gmpo_reference(trainer, model, inputs, *, coef=0.0, quantile=1.0, keep=None, delta=None,
                    gas=1):
    """TRL's GMPO loss (its _compute_loss's formula, written out) with the bonus,
    off-policy mask and delta as GMPOTrainer documents them."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logps, ent, _ = trainer._get_per_token_logps_and_entropies(model, ids, am, T,
                                                               compute_entropy=True)
    mask = inputs["completion_mask"].float()
    adv = inputs["advantages"]
    if keep is not None:
        adv = adv * keep
    l = logps - inputs["old_per_token_logps"]
    c = l.clamp(-trainer.epsilon_low, trainer.epsilon_high)
    y = torch.where(adv[:, None] > 0, torch.minimum(l, c), torch.maximum(l, c))
    if delta is not None:
        y = y.clamp(max=math.log(delta))
    seq_mask = mask
    if quantile < 1.0:
        seq_mask = mask * trainer.get_high_entropy_mask(ent.detach(), mask.long(), 1 - quantile)
    mu = (y * seq_mask).sum(-1) / seq_mask.sum(-1).clamp(min=1.0)
    loss = (-adv * torch.exp(mu)).mean() / gas
    if coef:
        loss = loss - coef * (ent * seq_mask).sum() / seq_mask.sum().clamp(min=1.0) / gas
    return loss


GMPO_OPTIONS = {
    "entropy_bonus": dict(entropy_coef=0.05),
    "entropy_bonus_quantile_gas": dict(entropy_coef=0.05, top_entropy_quantile=0.5, gas=2),
    "entropy_adaptive": dict(use_adaptive_entropy=True, entropy_coef=0.03, entropy_target=5.0),
    "off_policy_mask": dict(off_policy_mask_threshold=0.5),
    "delta": dict(delta=1.2),
}


@pytest.mark.parametrize("case", list(GMPO_OPTIONS))
def test_gmpo_options(case, model_dir, tok, tmp_path):
    cfg = dict(GMPO_OPTIONS[case])
    gas = cfg.pop("gas", 1)
    model = _model(model_dir, tok)
    trainer = _trainer(GMPOTrainer, model, tok, tmp_path, config=GMPOConfig, **cfg)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = gas
    adaptive = cfg.get("use_adaptive_entropy", False)
    if adaptive:
        trainer._last_world_entropy = 1.0     # below the target: the bonus applies
    inputs, lp = _batch(model, len(tok), 1.0, beta=0.0, sampling=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    assert trainer.fused_lm_head and not trainer._gmpo_fallback_warned
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    ref_model = _model(model_dir, tok)
    ref_tr = _trainer(TRLGMPOTrainer, ref_model, tok, tmp_path, config=GMPOConfig)
    keep = None
    if "off_policy_mask_threshold" in cfg:
        keep = TRLGRPOTrainer.get_off_policy_mask(
            inputs["advantages"][:, None], lp, inputs["sampling_per_token_logps"],
            inputs["completion_mask"], cfg["off_policy_mask_threshold"])[:, 0].float()
        assert 0 < keep.sum() < B
    ref = _gmpo_reference(ref_tr, ref_model, inputs, coef=cfg.get("entropy_coef", 0.0),
                          quantile=cfg.get("top_entropy_quantile", 1.0), keep=keep,
                          delta=cfg.get("delta"), gas=gas)
    ref.backward()
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
    _assert_same((ref.detach(), ref_grads), (loss.detach(), grads), case)
    metrics = trainer._metrics["train"]
    if "entropy_coef" in cfg or adaptive:
        assert "policy_loss" in metrics and metrics["entropy_coef"][-1] == trainer.entropy_coef
    if adaptive:   # entropy ~ log V > 5? no: a tiny random model's is below 5 -> coef grows
        assert trainer.entropy_coef == pytest.approx(0.03 + trainer.args.entropy_coef_delta)
        assert trainer._last_world_entropy < 5.0
    if "delta" in cfg:   # the cap bit: some token's log-ratio went past log(delta)
        l = lp - inputs["old_per_token_logps"]
        assert bool(((l > math.log(cfg["delta"])) & (inputs["completion_mask"] > 0)
                     & (inputs["advantages"][:, None] < 0)).any())


def test_gmpo_defaults_match_trl_gmpo(model_dir, tok, tmp_path):
    """With none of the new options set, GMPOTrainer equals TRL's GMPOTrainer (the
    options are off by default)."""
    out = []
    for cls in (TRLGMPOTrainer, GMPOTrainer):
        model = _model(model_dir, tok)
        tr = _trainer(cls, model, tok, tmp_path, config=GMPOConfig)
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1
        inputs, _ = _batch(model, len(tok), 1.0, beta=0.0, sampling=True)
        loss = tr.compute_loss(model, inputs)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    _assert_same(out[0], out[1], "gmpo defaults")


def test_gmpo_refuses_a_fallback_that_would_drop_an_option(model_dir, tok, tmp_path):
    """TRL's GMPO loss (the fallback for vision inputs) ignores the entropy bonus:
    with the bonus set the trainer raises instead of training without it."""
    model = _model(model_dir, tok)
    tr = _trainer(GMPOTrainer, model, tok, tmp_path, config=GMPOConfig, entropy_coef=0.05)
    inputs, _ = _batch(model, len(tok), 1.0, beta=0.0)
    inputs["pixel_values"] = torch.zeros(1)
    with pytest.raises(ValueError, match="ignores entropy_coef"):
        tr.compute_loss(model, inputs)


@pytest.mark.parametrize("delta", [-1.0, 0.5])
def test_gmpo_delta_must_be_at_least_one(model_dir, tok, tmp_path, delta):
    """Below 1 the cap would act inside GMPO's clip range, where capping before
    and after the clip differ: refused."""
    with pytest.raises(ValueError, match="delta must be a number >= 1"):
        _trainer(GMPOTrainer, _model(model_dir, tok), tok, tmp_path, config=GMPOConfig,
                 delta=delta)


# ----------------------------------------------------------------------------
# 4-step training trajectories, generation included

TRAJECTORIES = {
    "dapo": dict(loss_type="dapo", use_bias_correction_kl=False),
    "grpo": dict(loss_type="grpo"),
    "cispo": dict(loss_type="cispo"),
    "sapo": dict(loss_type="sapo"),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
}


def _train(cls, model_dir, tok, tmp_path, **cfg):
    torch.manual_seed(0)
    model = _model(model_dir, tok)
    args = GRPOConfig(output_dir=str(tmp_path / f"run_{cls.__module__}"), report_to="none",
                      use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no",
                      disable_tqdm=True, per_device_train_batch_size=4, num_generations=4,
                      gradient_accumulation_steps=2, num_iterations=2, beta=0.05,
                      max_completion_length=6, max_steps=4, logging_steps=1, optim="sgd",
                      learning_rate=0.05, lr_scheduler_type="constant", seed=0, **cfg)
    ds = Dataset.from_dict({"prompt": ["1+2=", "3+4=", "5+1=", "2+2="] * 4})
    trainer = cls(model=model, reward_funcs=_reward, args=args, train_dataset=ds,
                  processing_class=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logs, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(TRAJECTORIES))
def test_training_trajectory_matches_trl(name, model_dir, tok, tmp_path):
    """4 optimizer steps (2 micro-batches each, every generation batch used twice,
    beta > 0, SGD at a constant rate) through trainer.train(): the logged losses
    and the final parameters equal TRL's GRPOTrainer. Tolerances: each step's
    gradient agrees to ~1e-6 relative (fp32 rounding of two reduction orders),
    so a parameter may differ by a few fp32 ulps of its size (4 eps |p|, one
    rounding per step) plus 1e-3 of how far it moved (measured: at most 7e-9,
    while the parameters moved 2e-6 to 4e-2); the losses to 1e-5 relative, or
    1e-7 absolute where the group-centred advantages make a loss of size 0.1
    terms cancel to ~0 (the first step's grpo loss is exactly 0 in TRL). The
    completions are sampled from the same RNG stream and must be identical (a
    flipped sample would show as a loss difference of order 0.1)."""
    cfg = TRAJECTORIES[name]
    ref, ref_logs, ref_params = _train(TRLGRPOTrainer, model_dir, tok, tmp_path, **cfg)
    ours, logs, params = _train(GRPOTrainer, model_dir, tok, tmp_path, **cfg)
    assert ours.fused_lm_head and not ours._gmpo_fallback_warned
    assert ref.state.global_step == ours.state.global_step == 4 and len(logs) == 4
    for a, b in zip(ref_logs, logs):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-7), \
            (a["loss"], b["loss"])
        assert math.isclose(a["kl"], b["kl"], rel_tol=1e-4, abs_tol=1e-7), (a["kl"], b["kl"])
    start = dict(_model(model_dir, tok).named_parameters())
    eps = torch.finfo(torch.float32).eps
    for n, p in ref_params.items():
        moved = float((p - start[n]).abs().max())
        diff = float((p - params[n]).abs().max())
        assert moved > 0, n     # every parameter trained
        assert diff <= 4 * eps * float(p.abs().max()) + 1e-3 * moved, (n, diff, moved)


# ----------------------------------------------------------------------------
# docs/trl-verl.md's "GRPOConfig option -> gmpo_ext" table is written from this
# list (tools/gen_docs.py, block grpo-options):
# (option, what gmpo_ext.trl.GRPOTrainer does, the parity cases above that show it)

FUSED = "fused, same result"
OPTION_TABLE = [
    ("`loss_type` grpo, bnpo, dr_grpo, dapo", FUSED,
     ["grpo/token", "bnpo/token", "dr_grpo/token", "dapo/token"]),
    ("`loss_type` cispo, sapo, luspo, vespo", FUSED,
     ["cispo/token", "sapo/token", "luspo/token", "vespo/token"]),
    ("`importance_sampling_level=\"sequence\"` (GSPO: grpo at sequence level)", FUSED,
     [f"{t}/sequence" for t in TYPES]),
    ("`epsilon`, `epsilon_high`, `temperature`", FUSED,
     ["grpo/token", "luspo_temperature"]),
    ("`beta` (k3 KL to the reference model)", FUSED, ["beta_plain_kl", "dr_grpo_eval"]),
    ("`use_bias_correction_kl` (TRL's default, with `beta != 0`)", FUSED,
     ["beta", "bias_corrected_kl", "bias_corrected_kl_gspo"]),
    ("`delta` (two-sided clipping)", FUSED, ["delta", "delta_at_clip", "delta_gspo"]),
    ("`off_policy_mask_threshold` (with the batch's `sampling_per_token_logps`, else the old "
     "log-probs)", FUSED, ["off_policy_mask_sampling_logps", "off_policy_mask_old_logps"]),
    ("vLLM `importance_sampling_ratio` (token or sequence modes; vespo: in its gamma weights)",
     FUSED, ["is_ratio_token", "is_ratio_sequence", "is_ratio_cispo_sequence_level",
                    "is_ratio_vespo"]),
    ("`top_entropy_quantile` (TRL's `get_high_entropy_mask` on the fused head's entropies)",
     FUSED, ["top_entropy_quantile", "entropy_bonus_with_quantile"]),
    ("`entropy_coef` (fixed bonus)", FUSED, ["entropy_bonus", "entropy_bonus_with_quantile"]),
    ("`use_adaptive_entropy`, `entropy_target`, `entropy_coef_min/max/delta` (TRL's controller "
     "and its state)", FUSED, ["entropy_adaptive", "entropy_adaptive_gated_off"]),
    ("`sapo_temperature_pos/neg`", FUSED, ["sapo_temperatures"]),
    ("`vespo_k_pos`, `vespo_lambda_pos`, `vespo_k_neg`, `vespo_lambda_neg`", FUSED,
     ["vespo_gamma"]),
    ("`router_aux_loss_coef` (MoE models with `output_router_logits`)", FUSED,
     ["moe_aux_loss"]),
    ("`gradient_accumulation_steps`, `steps_per_generation`, `num_iterations`, "
     "`num_items_in_batch`, `max_completion_length`, eval mode", FUSED,
     ["beta_grad_accum_tool", "dapo_eval_grad_accum", "dr_grpo_eval", "trajectory/dapo"]),
    ("tool masks (`tool_mask` in the batch)", FUSED, ["beta_grad_accum_tool"]),
    ("vision-language inputs (`pixel_values`, ...), per-token (B, T) advantages, a forward "
     "without `logits_to_keep`", "TRL's own loss (TRL's fused head), a warning naming the "
     "reason; same result", []),
]


def _known_cases():
    cases = {f"{t}/{lv}" for t in TYPES for lv in ("token", "sequence")}
    cases |= set(OPTIONS) | {f"trajectory/{n}" for n in TRAJECTORIES} | {"moe_aux_loss"}
    return cases


def option_table():
    """The markdown table docs/trl-verl.md shows (between its option-table markers)."""
    rows = ["| TRL `GRPOConfig` option | `gmpo_ext.trl.GRPOTrainer` | parity cases "
            "(`tests/test_trl_family.py`) |", "| :--- | :--- | :--- |"]
    for option, status, cases in OPTION_TABLE:
        rows.append(f"| {option} | {status} | {', '.join(cases) or '-'} |")
    return "\n".join(rows)


def test_readme_option_table_is_current():
    """docs/trl-verl.md's option table is option_table(), and every case it names is
    run above."""
    known = _known_cases()
    for _, _, cases in OPTION_TABLE:
        assert set(cases) <= known, set(cases) - known
    covered = {c for *_, cases in OPTION_TABLE for c in cases}
    assert set(OPTIONS) <= covered, set(OPTIONS) - covered     # every option case is in a row
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "docs", "trl-verl.md"), encoding="utf-8") as f:
        text = f.read()
    begin, end = "<!-- grpo-options:begin (tests/test_trl_family.py) -->", \
        "<!-- grpo-options:end -->"
    assert begin in text and end in text, "docs/trl-verl.md lost its option table markers"
    shown = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert shown == option_table(), ("docs/trl-verl.md's option table drifted; regenerate it "
                                     "with python tools/gen_docs.py")
