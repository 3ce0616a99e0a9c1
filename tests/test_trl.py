"""gmpo_ext.trl.GMPOTrainer against TRL's own GMPOTrainer, with the real TRL on CPU.

A tiny Qwen2-style causal LM with random weights and a character tokenizer, both
built locally (nothing is downloaded). (a) On one fixed batch, built the way
``_compute_loss`` receives it, the loss, every parameter's gradient and the
logged metrics equal those of ``trl.experimental.gmpo.GMPOTrainer`` in fp32,
for TRL's options (clip range, beta, temperature, top-entropy mask, tool mask,
gradient accumulation); (b) the rollout importance-sampling ratio, which TRL's
GMPO ignores, weights each row as documented; (c) a few steps of
``trainer.train()`` run end to end.
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
from trl.experimental.gmpo import GMPOConfig  # noqa: E402
from trl.experimental.gmpo import GMPOTrainer as TRLGMPOTrainer  # noqa: E402

from gmpo_ext.demo import build_model, build_tokenizer  # noqa: E402
from gmpo_ext.reference import gmpo_loss_reference  # noqa: E402
from gmpo_ext.trl import GMPOTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

RTOL = 1e-5
B, P, T = 6, 3, 7


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("0123456789+-=abc ")


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    """Random weights saved once: TRL re-creates the reference model from this path (beta != 0)."""
    model = build_model(len(tok), seed=0, hidden=32, tie_word_embeddings=False)
    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    model.save_pretrained(path)
    return path


def _model(model_dir, tok):
    model = build_model(len(tok), seed=0, hidden=32, tie_word_embeddings=False)
    model.config._name_or_path = model_dir
    return model


def _reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _trainer(cls, model, tok, tmp_path, trainer_kw=None, **kw):
    args = GMPOConfig(output_dir=str(tmp_path / cls.__module__.replace(".", "_")), report_to="none",
                      use_cpu=True, gradient_checkpointing=False, save_strategy="no",
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                      max_steps=1, disable_tqdm=True, **{"bf16": False, **kw})
    ds = Dataset.from_dict({"prompt": ["1+2=", "3+4="] * 4})
    return cls(model=model, reward_funcs=_reward, args=args, train_dataset=ds, processing_class=tok,
               **(trainer_kw or {}))


def _batch(model, V, temperature, *, beta, tool, isr=None):
    """One batch shaped like GRPOTrainer's output: left-padded prompts, right-padded
    completions (one empty), a zero advantage, old log-probs off-policy by noise."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(2, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0
    completion_ids = torch.randint(2, V, (B, T), generator=g)
    lengths = torch.tensor([7, 5, 3, 0, 6, 1])
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    advantages = torch.tensor([1.0, -0.7, 0.0, 0.5, -1.2, 0.8])
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        am = torch.cat([prompt_mask, completion_mask], 1)
        logits = model(input_ids=ids, attention_mask=am).logits[:, P - 1:-1] / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None])[..., 0]
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=advantages,
                  old_per_token_logps=lp + 0.8 * torch.randn(B, T, generator=g))
    if beta:
        inputs["ref_per_token_logps"] = lp + 0.3 * torch.randn(B, T, generator=g)
    if tool:
        inputs["tool_mask"] = torch.tensor([[1, 1, 0, 0, 1, 1, 1]] * B)
    if isr is not None:
        inputs["importance_sampling_ratio"] = isr
    return inputs, lp


def _loss_and_grads(cls, model_dir, tok, tmp_path, *, grad_accum=1, beta=0.0, tool=False,
                    isr=None, trainer_kw=None, **cfg):
    model = _model(model_dir, tok)
    trainer = _trainer(cls, model, tok, tmp_path, trainer_kw, beta=beta, **cfg)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = grad_accum
    inputs, lp = _batch(model, len(tok), trainer.temperature, beta=beta, tool=tool, isr=isr)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics, inputs, lp


def _max_rel(a, b):
    """max |a - b| / max |a| (0 when both are 0)."""
    scale = a.abs().max()
    if scale == 0:
        return float((b != 0).any())
    return float((a - b).abs().max() / scale)


CASES = {
    "defaults": dict(),
    "tool_mask": dict(tool=True),
    "entropy_mask": dict(top_entropy_quantile=0.5),
    "beta": dict(beta=0.1),
    "beta_entropy_tool": dict(beta=0.1, top_entropy_quantile=0.5, tool=True),
    "grad_accum": dict(grad_accum=4),
    "temperature": dict(temperature=0.7),
    "asymmetric_clip": dict(epsilon=0.2, epsilon_high=0.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_trl_gmpo(case, model_dir, tok, tmp_path):
    kw = CASES[case]
    l_trl, g_trl, m_trl, _, _ = _loss_and_grads(TRLGMPOTrainer, model_dir, tok, tmp_path, **kw)
    l_ours, g_ours, m_ours, _, _ = _loss_and_grads(GMPOTrainer, model_dir, tok, tmp_path, **kw)
    assert torch.isfinite(l_trl) and l_trl != 0
    assert abs(float(l_ours - l_trl)) <= RTOL * abs(float(l_trl)), (float(l_ours), float(l_trl))
    assert g_trl.keys() == g_ours.keys()
    nonzero = 0
    for name, g in g_trl.items():
        assert _max_rel(g, g_ours[name]) <= RTOL, (name, _max_rel(g, g_ours[name]))
        nonzero += bool(g.abs().max() > 0)
    assert nonzero == len(g_trl)          # every parameter took part
    for name, value in m_trl.items():     # TRL's metric names, same values
        assert name in m_ours, name
        assert math.isclose(m_ours[name], value, rel_tol=1e-5, abs_tol=1e-6), (name, m_ours[name], value)
    assert m_ours["gmpo/log_ratio_min"] < 0 < m_ours["gmpo/log_ratio_max"]


def test_clipping_is_exercised(model_dir, tok, tmp_path):
    """The fixed batch clips on both sides, so the parity above covers the clipped branches."""
    _, _, m, _, _ = _loss_and_grads(GMPOTrainer, model_dir, tok, tmp_path)
    assert m["clip_ratio/low_mean"] > 0 and m["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("shape", ["sequence", "token"])
def test_rollout_importance_weights(shape, model_dir, tok, tmp_path):
    """TRL's GMPO ignores the rollout IS ratio; ours weights each row's policy term by it
    (per sequence as given, per token as the geometric mean over the row's tokens), and
    rollout_is_correction=False restores TRL's behaviour."""
    g = torch.Generator().manual_seed(5)
    isr = (0.5 + torch.rand(B, 1, generator=g)) if shape == "sequence" else \
        (0.5 + torch.rand(B, T, generator=g))
    l_trl, g_trl, _, _, _ = _loss_and_grads(TRLGMPOTrainer, model_dir, tok, tmp_path, isr=isr)
    l_off, g_off, _, _, _ = _loss_and_grads(GMPOTrainer, model_dir, tok, tmp_path, isr=isr,
                                            trainer_kw=dict(rollout_is_correction=False))
    assert abs(float(l_off - l_trl)) <= RTOL * abs(float(l_trl))
    assert all(_max_rel(g_trl[n], g_off[n]) <= RTOL for n in g_trl)

    l_on, _, _, inputs, lp = _loss_and_grads(GMPOTrainer, model_dir, tok, tmp_path, isr=isr)
    mask = inputs["completion_mask"]
    w = isr.reshape(B) if shape == "sequence" else isr
    ref, _ = gmpo_loss_reference(lp.double(), inputs["old_per_token_logps"].double(),
                                 inputs["advantages"].double(), mask, is_weights=w.double(),
                                 convention="trl")
    assert abs(float(l_on) - float(ref)) <= 1e-5 * abs(float(ref)), (float(l_on), float(ref))
    assert abs(float(l_on - l_trl)) > 1e-3 * abs(float(l_trl))     # the weights did something


def test_train_end_to_end(tok, tmp_path):
    """A few optimizer steps through trainer.train(), several updates per generation batch."""
    torch.manual_seed(0)
    model = build_model(len(tok), seed=0, hidden=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = GMPOConfig(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, bf16=False,
                      gradient_checkpointing=False, save_strategy="no", disable_tqdm=True,
                      per_device_train_batch_size=8, num_generations=4, steps_per_generation=2,
                      num_iterations=2, max_completion_length=6, max_steps=4, logging_steps=1,
                      learning_rate=1e-2, seed=0)
    ds = Dataset.from_dict({"prompt": ["1+2=", "3+4=", "5+1=", "2+2="] * 4})
    trainer = GMPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=ds,
                          processing_class=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 4 and len(logs) == 4
    assert all(math.isfinite(h["loss"]) for h in logs)
    for key in ("clip_ratio/region_mean", "entropy", "gmpo/log_ratio_min", "gmpo/log_ratio_max",
                "gmpo/nonfinite_rows"):
        assert key in logs[-1], key
    # updates 2..4 of a generation batch see a policy that moved: ratios away from 1
    assert any(h["gmpo/log_ratio_max"] - h["gmpo/log_ratio_min"] > 1e-4 for h in logs[1:])
    assert all(h["gmpo/nonfinite_rows"] == 0 for h in logs)
    changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert changed == len(before)


def test_bad_trl_version_message(monkeypatch):
    """Importing with an unsupported TRL release fails with a message naming the range."""
    import importlib.util

    import trl

    import gmpo_ext.trl as mod

    monkeypatch.setattr(trl, "__version__", "1.11.0")
    monkeypatch.delenv("GMPO_EXT_TRL_ANY_VERSION", raising=False)
    spec = importlib.util.spec_from_file_location("gmpo_ext._trl_version_probe", mod.__file__)
    with pytest.raises(ImportError, match=r"1\.11\.0.*|>=1\.12\.0") as info:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert "1.11.0" in str(info.value) and ">=1.12.0" in str(info.value)
    assert "pip install" in str(info.value)


@pytest.mark.parametrize("why", ["vision", "no_logits_to_keep"])
def test_fallback_to_trl(why, model_dir, tok, tmp_path, monkeypatch):
    """Batches the fused path does not handle go to TRL's own _compute_loss, with one warning."""
    import gmpo_ext.trl as gtrl

    model = _model(model_dir, tok)
    trainer = _trainer(GMPOTrainer, model, tok, tmp_path)
    calls = []
    monkeypatch.setattr(TRLGMPOTrainer, "_compute_loss",
                        lambda self, m, inputs: calls.append(inputs) or torch.tensor(1.5))
    inputs, _ = _batch(model, len(tok), trainer.temperature, beta=0.0, tool=False)
    if why == "vision":
        inputs["pixel_values"] = torch.zeros(1)
        match = "vision"
    else:
        monkeypatch.setattr(gtrl, "_accepts", lambda module, name: False)
        match = "logits_to_keep"
    with pytest.warns(UserWarning, match=match):
        assert float(trainer.compute_loss(model, inputs)) == 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # warned once per reason
        assert float(trainer.compute_loss(model, inputs)) == 1.5
    assert len(calls) == 2


@pytest.mark.parametrize("fused", [True, False])
def test_fused_head_and_logits_path(fused, model_dir, tok, tmp_path, monkeypatch):
    """The default path never calls the logits kernels (the LM head is fused:
    linear_logps on the last hidden states); fused_lm_head=False uses them. Both
    match TRL's own trainer."""
    import gmpo_ext.trl as gtrl

    calls = {"hidden": 0, "logits": 0}
    real_h, real_l = gtrl.linear_logps, gtrl.selective_logps

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(gtrl, "linear_logps", count("hidden", real_h))
    monkeypatch.setattr(gtrl, "selective_logps", count("logits", real_l))
    kw = dict(beta=0.1, temperature=0.7)
    l_trl, g_trl, _, _, _ = _loss_and_grads(TRLGMPOTrainer, model_dir, tok, tmp_path, **kw)
    l_ours, g_ours, _, _, _ = _loss_and_grads(GMPOTrainer, model_dir, tok, tmp_path,
                                              trainer_kw=dict(fused_lm_head=fused), **kw)
    assert calls == ({"hidden": 1, "logits": 0} if fused else {"hidden": 0, "logits": 1})
    assert abs(float(l_ours - l_trl)) <= RTOL * abs(float(l_trl))
    assert all(_max_rel(g_trl[n], g_ours[n]) <= RTOL for n in g_trl)


def test_fused_head_falls_back_with_one_warning(model_dir, tok, tmp_path):
    """A config that rescales the logits (here logit_scale) is not fused: the logits
    path runs, with one warning, and still matches TRL."""
    model = _model(model_dir, tok)
    model.config.logit_scale = 0.5
    trainer, inputs = _ready(GMPOTrainer, model, tok, tmp_path, beta=0.0)
    with pytest.warns(UserWarning, match="logit_scale"):
        loss = trainer.compute_loss(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(trainer.compute_loss(model, inputs))
    assert torch.isfinite(loss)


def _ready(cls, model, tok, tmp_path, trainer_kw=None, beta=0.0, **cfg):
    """A trainer in training mode, one accumulation step, and the fixed batch."""
    trainer = _trainer(cls, model, tok, tmp_path, trainer_kw, **cfg)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs, _ = _batch(model, len(tok), trainer.temperature, beta=beta, tool=False)
    return trainer, inputs


def _scaled_model(model_dir, tok, zmax):
    """The tiny model with its head scaled so that its logits reach |z| ~ zmax,
    a trained model's size (a random tiny model's are ~0.3)."""
    model = _model(model_dir, tok)
    with torch.no_grad():
        ids = torch.randint(2, len(tok), (B, P + T), generator=torch.Generator().manual_seed(2))
        z = model(input_ids=ids).logits.abs().max()
        model.lm_head.weight.mul_(zmax / float(z))
    return model


def _bf16_loss_and_grads(cls, model, tok, tmp_path, bf16, trainer_kw=None):
    trainer, inputs = _ready(cls, model, tok, tmp_path, trainer_kw, bf16=bf16, beta=0.1)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}, trainer


def test_bf16_autocast_keeps_the_fused_head_at_trained_magnitudes(model_dir, tok, tmp_path,
                                                                  monkeypatch):
    """bf16=True (fp32 master weights, CPU autocast) with logits of |z| ~ 30: the
    head check passes (the tolerance follows the bf16 products and logits, not the
    fp32 weight), the fused head runs its GEMMs in bf16 as the model's own head
    does, and the result equals TRL's own trainer under bf16=True.

    The tolerance, justified the way flash-attention accepts a kernel: against the
    fp32 run of TRL's trainer (the truth), our bf16 run's error is at most twice
    TRL's own bf16 error, per parameter, plus 1e-3 of the gradient's scale (a
    tensor where TRL's bf16 error happens to be near 0); the loss within 2e-3
    relative of TRL's bf16 loss (both round the same bf16 logits)."""
    import gmpo_ext.trl as gtrl
    from gmpo_ext.hidden import _autocast_dtype

    dtypes = []
    real = gtrl.linear_logps

    def spy(hidden, weight, *a, **k):
        # (Qwen2's RMSNorm returns fp32 from an fp32 norm weight: the GEMMs still run
        # in bf16, on cast copies)
        dtypes.append((_autocast_dtype(hidden, weight, k.get("bias")), weight.dtype))
        return real(hidden, weight, *a, **k)

    monkeypatch.setattr(gtrl, "linear_logps", spy)
    zmax = 30.0
    runs = {}
    for name, cls, bf16 in (("trl32", TRLGMPOTrainer, False), ("trl16", TRLGMPOTrainer, True),
                            ("ours16", GMPOTrainer, True)):
        model = _scaled_model(model_dir, tok, zmax)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)   # no fallback warning
            warnings.filterwarnings("ignore", message=".*(?<!gmpo_ext).*", category=UserWarning)
            loss, grads, trainer = _bf16_loss_and_grads(cls, model, tok, tmp_path, bf16)
        runs[name] = (loss, grads)
        if cls is GMPOTrainer:
            assert trainer.fused_lm_head and not trainer._gmpo_fallback_warned
    assert dtypes and all(d == (torch.bfloat16, torch.float32) for d in dtypes), dtypes
    (l32, g32), (lt, gt), (lo, go) = runs["trl32"], runs["trl16"], runs["ours16"]
    assert abs(float(lo - lt)) <= 2e-3 * abs(float(lt)), (float(lo), float(lt))
    for n in g32:
        scale = float(g32[n].abs().max())
        err_trl = float((gt[n] - g32[n]).abs().max())
        err_ours = float((go[n] - g32[n]).abs().max())
        assert err_ours <= 2 * err_trl + 1e-3 * scale, (n, err_ours, err_trl, scale)
        assert go[n].dtype == torch.float32


def test_head_check_catches_a_head_that_does_not_reproduce_the_logits(model_dir, tok, tmp_path):
    """A model whose forward rescales the logits without saying so in its config
    (by 1.05: 1.5 at |z| ~ 30, under bf16) fails the first-batch check: the
    logits path runs, with a warning that names the mismatch."""
    model = _scaled_model(model_dir, tok, 30.0)
    inner = model.lm_head.forward
    model.lm_head.forward = lambda x: inner(x) * 1.05
    trainer, inputs = _ready(GMPOTrainer, model, tok, tmp_path, bf16=True, beta=0.0)
    with pytest.warns(UserWarning, match="do not reproduce the model's logits"):
        loss = trainer.compute_loss(model, inputs)
    assert torch.isfinite(loss) and not trainer.fused_lm_head


def test_head_sharded_inside_the_forward_falls_back(model_dir, tok, tmp_path, monkeypatch):
    """A head whose weight is still a shard inside the model's forward (its own FSDP
    unit) is not fused and does not crash: the logits path runs, with one warning
    that names the reason, and still matches TRL's trainer."""
    import gmpo_ext.hidden as hd

    model = _model(model_dir, tok)
    monkeypatch.setattr(hd, "_is_dtensor", lambda t: t is model.lm_head.weight)
    monkeypatch.setattr(torch.Tensor, "to_local", lambda self: self[:1], raising=False)
    trainer, inputs = _ready(GMPOTrainer, model, tok, tmp_path, beta=0.0)
    with pytest.warns(UserWarning, match="sharded inside the model's forward.*DTensor"):
        loss = trainer.compute_loss(model, inputs)
    assert not trainer.fused_lm_head
    l_trl, _, _, _, _ = _loss_and_grads(TRLGMPOTrainer, model_dir, tok, tmp_path)
    assert abs(float(loss - l_trl)) <= RTOL * abs(float(l_trl))


@pytest.mark.parametrize("bf16", [False, True], ids=["bf16_model", "autocast"])
def test_cast_lm_head_to_fp32(bf16, model_dir, tok, tmp_path):
    """TRL's cast_lm_head_to_fp32=True (the head in fp32: a bf16 model without
    autocast, or fp32 weights under bf16 autocast): the fused head stays on and
    runs in fp32 outside autocast, as TRL's does, and the loss equals TRL's (the
    two differ only in the bf16 backbone's own rounding). Before: a TypeError from
    linear_logps (bf16 hidden states, fp32 head) and, under autocast, a bf16 head."""
    import gmpo_ext.trl as gtrl

    seen = []
    real = gtrl.linear_logps

    def spy(hidden, weight, *a, **k):
        seen.append((hidden.dtype, weight.dtype, torch.is_autocast_enabled("cpu")))
        return real(hidden, weight, *a, **k)

    losses = {}
    for cls in (TRLGMPOTrainer, GMPOTrainer):
        model = _model(model_dir, tok)
        if not bf16:
            model = model.to(torch.bfloat16)
        trainer, inputs = _ready(cls, model, tok, tmp_path, bf16=bf16, cast_lm_head_to_fp32=True)
        assert model.lm_head.weight.dtype == torch.float32
        gtrl.linear_logps = spy
        try:
            loss = trainer.compute_loss(model, inputs)
        finally:
            gtrl.linear_logps = real
        loss.backward()
        losses[cls] = float(loss)
        if cls is GMPOTrainer:
            assert trainer.fused_lm_head and not trainer._gmpo_fallback_warned
    assert seen == [(torch.float32, torch.float32, False)]
    assert abs(losses[GMPOTrainer] - losses[TRLGMPOTrainer]) <= 1e-5 * abs(losses[TRLGMPOTrainer])


@pytest.mark.parametrize("zmax", [1.0, 30.0, 80.0])
def test_head_check_with_a_bias_under_autocast(zmax):
    """A right head with a bias passes the check under bf16 autocast at any |z| (the
    check adds the bias inside the GEMM, one rounding, as the model's F.linear;
    rounding h.w first failed where b cancels h.w); the same head rescaled by 1.05,
    or overflowing to inf against finite logits (fp16), fails it."""
    from gmpo_ext.trl import _head_mismatch

    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 256, generator=g)
    w = torch.randn(300, 256, generator=g) / 16
    b = torch.randn(300, generator=g) * 0.5
    s = zmax / float((h @ w.t() + b).abs().max())
    w, b = w * s, b * s
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(h, w, b)
        assert ref.dtype == torch.bfloat16
        assert _head_mismatch(h, w, b, None, ref) == (None, True)
        why, conclusive = _head_mismatch(h, w * 1.05, b * 1.05, None, ref)
        assert why is not None and "do not reproduce" in why and conclusive
    big = torch.full((2, 8), 300.0)
    with torch.autocast("cpu", dtype=torch.float16):   # 300 * 300 * 8 overflows fp16
        why, _ = _head_mismatch(big, torch.full((5, 8), 300.0), None, None,
                                torch.full((2, 5), 1000.0))
    assert why is not None


@pytest.mark.parametrize("autocast", [False, True])
def test_head_check_leaves_the_head_alone(autocast):
    """The check reads the head's parameters, never writes them (an in-place abs on
    a block that was the fp32 weight itself turned the model's head positive)."""
    from gmpo_ext.trl import _head_mismatch

    g = torch.Generator().manual_seed(1)
    h, w, b = torch.randn(3, 16, generator=g), torch.randn(40, 16, generator=g), \
        torch.randn(40, generator=g)
    w0, b0 = w.clone(), b.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert _head_mismatch(h, w, b, None, torch.nn.functional.linear(h, w, b))[0] is None
    assert torch.equal(w, w0) and torch.equal(b, b0)
