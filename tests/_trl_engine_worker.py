"""One rank of tests/test_trl_engines.py: the TRL drop-in under a training engine.

    python -m torch.distributed.run --nproc_per_node 2 tests/_trl_engine_worker.py \
        ENGINE OUT_DIR VARIANT [VARIANT ...]

ENGINE: ddp, fsdp1 (use_orig_params), fsdp2 or zero3. A VARIANT is a
"+"-joined set of options (or "plain"): tied (tied embeddings), lora (PEFT
LoRA on q/v, the head frozen), ga (2 micro-batches per rank), gc (gradient
checkpointing), bf16 (bf16=True, fp32 master weights, the head scaled so the
logits reach |z| = 30), train (one ``trainer.train()`` step with generation instead
of the fixed batch: it must run fused, not match), rank1fail (the first-batch
head check fails on rank 1 only: every rank must take the logits path), grpo
(gmpo_ext.trl.GRPOTrainer, loss_type dapo, against TRL's GRPOTrainer: the
token-count normaliser over the ranks' share of num_items_in_batch).

For each variant every rank builds the same tiny Qwen2-style model and the
same fixed batch (B = 8 rows: rank r takes rows [4 r, 4 r + 4)), wraps the
model with the engine (accelerate's own FSDP preparation; deepspeed.initialize
for ZeRO-3), runs the real trainer step (``trainer.compute_loss`` on the
wrapped model + the engine's backward) and gathers every parameter's full
gradient the engine's way (FSDP2: DTensor.full_tensor(); FSDP1:
summon_full_params with grads; ZeRO-3: safe_get_full_grad). Rank 0 writes
them to OUT_DIR/<variant>.pt with what the fused path did (the LM head
module's largest input length, the linear_logps calls);
tests/test_trl_engines.py compares them with TRL's own GMPOTrainer on the
whole batch in one process (``reference`` below).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

B, P, T = 8, 3, 7
H = 32


def _tok():
    from gmpo_ext.demo import build_tokenizer
    return build_tokenizer("0123456789+-=abc ")


def _model(V, opts, path=None):
    """The tiny model for a variant's options; saved to ``path`` (TRL loads the
    reference model from config._name_or_path when beta != 0)."""
    from gmpo_ext.demo import build_model
    model = build_model(V, seed=0, hidden=H, tie_word_embeddings="tied" in opts)
    if "bf16" in opts:   # logits of a trained model's size: |z| up to 30
        with torch.no_grad():
            ids = torch.randint(2, V, (B, P + T), generator=torch.Generator().manual_seed(2))
            model.lm_head.weight.mul_(30.0 / float(model(input_ids=ids).logits.abs().max()))
    if path is not None:
        if not os.path.exists(os.path.join(path, "config.json")):
            model.save_pretrained(path)
        model.config._name_or_path = path
    if "gc" in opts:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if "lora" in opts:
        from peft import LoraConfig, get_peft_model
        with torch.random.fork_rng():
            torch.manual_seed(3)
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():   # B = 0 at init: make the adapters count
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    return model


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def canonical(name):
    """A parameter's name without the engines' and PEFT's wrapper prefixes."""
    for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "base_model.model.",
                 "module."):
        name = name.replace(junk, "")
    return name


def batch(model, V, temperature=1.0):
    """TRL's _compute_loss input for the whole batch: left-padded prompts,
    right-padded completions (one empty), old log-probs off-policy by noise."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(2, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0
    completion_ids = torch.randint(2, V, (B, T), generator=g)
    lengths = torch.tensor([7, 5, 3, 0, 6, 1, 7, 4])
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    advantages = torch.tensor([1.0, -0.7, 0.0, 0.5, -1.2, 0.8, -0.3, 1.1])
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        am = torch.cat([prompt_mask, completion_mask], 1)
        logits = model(input_ids=ids, attention_mask=am).logits[:, P - 1:-1].float()
        lp = torch.log_softmax(logits / temperature, -1).gather(-1, completion_ids[..., None])[..., 0]
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=advantages,
                old_per_token_logps=lp + 0.8 * torch.randn(B, T, generator=g),
                ref_per_token_logps=lp + 0.3 * torch.randn(B, T, generator=g),
                # the whole generation batch's token count (GRPO's dapo normaliser)
                num_items_in_batch=completion_mask.sum())


def _trainer(cls, model, tok, out, bf16=False, grpo=False, **kw):
    from datasets import Dataset
    from trl import GRPOConfig
    from trl.experimental.gmpo import GMPOConfig
    if grpo:   # TRL's default loss (dapo); the KL without the bias correction
        kw.update(loss_type="dapo", use_bias_correction_kl=False)
    args = (GRPOConfig if grpo else GMPOConfig)(output_dir=out, report_to="none", use_cpu=True, bf16=bf16,
                      gradient_checkpointing=kw.pop("gradient_checkpointing", False),
                      save_strategy="no", per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=T, max_steps=1, disable_tqdm=True, beta=0.1,
                      **kw)
    ds = Dataset.from_dict({"prompt": ["1+2=", "3+4="] * 8})
    return cls(model=model, reward_funcs=lambda completions, **k: [float(len(c)) for c in completions],
               args=args, train_dataset=ds, processing_class=tok)


# ----------------------------------------------------------------------------
# engines

def _accelerate_fsdp(trainer, version, prepare=True):
    """Switch accelerate's state to FSDP (a CPU run does not turn it on by
    itself) so that its own FSDP preparation wraps the model (here, or in
    trainer.train() with ``prepare=False``)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=version, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Qwen2DecoderLayer"],
        **({"use_orig_params": True} if version == 1 else {}))
    acc = trainer.accelerator
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    if not prepare:
        return None
    if version == 1:
        # accelerate passes device_id=cpu:0 on a CPU run, which FSDP1 compares
        # with its compute device "cpu" and refuses: the indexless device
        acc.state.device = torch.device("cpu")
        return acc.prepare_model(trainer.model)
    # FSDP2's preparation wants the optimizer too (it re-binds its parameters)
    wrapped, _ = acc.prepare(trainer.model, torch.optim.SGD(trainer.model.parameters(), lr=0.0))
    return wrapped


def _deepspeed_zero3(trainer, ga):
    import deepspeed
    cfg = {"train_micro_batch_size_per_gpu": B // 2 // ga, "gradient_accumulation_steps": ga,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=trainer.model, model_parameters=trainer.model.parameters(),
                                      config=cfg)
    return engine


def reference(tok, opts, path, bf16=False):
    """TRL's own GMPOTrainer (GRPOTrainer for ``grpo``), one process, the whole
    batch (fp32, or under bf16 autocast): (loss, {canonical name: gradient})."""
    from trl import GRPOTrainer as TRLGRPOTrainer
    from trl.experimental.gmpo import GMPOTrainer as TRLGMPOTrainer
    model = _model(len(tok), opts, path)
    grpo = "grpo" in opts
    tr = _trainer(TRLGRPOTrainer if grpo else TRLGMPOTrainer, model, tok,
                  os.path.join(path, "ref_run"), bf16=bf16, grpo=grpo)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    loss = tr.compute_loss(model, batch(model, len(tok)))
    loss.backward()
    return float(loss), {canonical(n): p.grad.detach().clone()
                         for n, p in model.named_parameters() if p.grad is not None}


def _grads(engine, wrapped, model):
    """{canonical name: full gradient} as the engine reduced it (averaged over
    ranks); frozen parameters left out."""
    out = {}
    if engine == "zero3":
        from deepspeed.utils import safe_get_full_grad
        for n, p in wrapped.module.named_parameters():
            g = safe_get_full_grad(p) if p.requires_grad else None
            if g is not None:
                out[canonical(n)] = g.detach().clone()
        return out
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(wrapped, with_grads=True):
            for n, p in wrapped.named_parameters():
                if p.grad is not None:
                    out[canonical(n)] = p.grad.detach().clone()
        return out
    for n, p in model.named_parameters():
        g = p.grad
        if g is not None:
            out[canonical(n)] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _direct_call(model):
    """linear_logps given the head's weight as the engine leaves it outside the
    forward (a DTensor shard, an FSDP1 flat shard, a ZeRO-3 partition): the
    error's type and message, or None when it ran."""
    weight = model.get_output_embeddings().weight
    from gmpo_ext import linear_logps
    try:
        linear_logps(torch.zeros(2, H), weight, torch.zeros(2, dtype=torch.long))
    except Exception as e:   # noqa: BLE001 - the test asserts which
        return type(e).__name__, str(e)
    return None


def _engine_name(wrapped):
    """The engine the model ran under, as the test names it (None: none seen)."""
    name = type(wrapped).__name__
    if name == "DistributedDataParallel":
        return "ddp"
    if name == "FullyShardedDataParallel":
        return "fsdp1"
    if name == "DeepSpeedEngine":
        return "zero3" if wrapped.zero_optimization_stage() == 3 else None
    if name.startswith("FSDP"):   # fully_shard's dynamic class of the model
        return "fsdp2"
    return None


def _wrap(engine, trainer, ga):
    if engine == "ddp":
        return trainer.accelerator.prepare_model(trainer.model)
    if engine in ("fsdp1", "fsdp2"):
        return _accelerate_fsdp(trainer, int(engine[-1]))
    if engine == "zero3":
        return _deepspeed_zero3(trainer, ga)
    raise SystemExit(f"unknown engine {engine}")


def _step(engine, trainer, wrapped, inputs, rank, world, ga):
    """This rank's rows in ga micro-batches through compute_loss and the
    engine's backward; the loss summed over micro-batches, averaged over ranks."""
    per = B // world
    step = per // ga
    total = torch.zeros(())
    for k in range(ga):
        lo = rank * per + k * step
        mb = {key: v if v.dim() == 0 else v[lo:lo + step] for key, v in inputs.items()}
        sync = k == ga - 1
        ctx = wrapped.no_sync() if engine == "ddp" and not sync else contextlib.nullcontext()
        with ctx:
            loss = trainer.compute_loss(wrapped, mb)
            if engine == "zero3":
                wrapped.backward(loss, scale_wrt_gas=False)
            else:
                loss.backward()
        total += loss.detach().float()
    dist.all_reduce(total)
    return float(total) / world


def run_variant(engine, variant, out_dir, tok, rank, world):
    from gmpo_ext import trl as gtrl
    opts = set(variant.split("+"))
    ga = 2 if "ga" in opts else 1
    path = os.path.join(out_dir, f"model_{variant}")
    if rank == 0:
        _model(len(tok), opts, path)
    dist.barrier()

    calls = {"linear_logps": 0, "head_in": 0}
    real = gtrl.linear_logps

    def counted(*a, **k):
        calls["linear_logps"] += 1
        return real(*a, **k)
    gtrl.linear_logps = counted
    real_check = gtrl._head_mismatch
    if "rank1fail" in opts and rank == 1:   # the first-batch check fails on one rank only
        gtrl._head_mismatch = lambda *a: ("a mismatch forced on rank 1", True)
    model = _model(len(tok), opts, path)
    inputs = batch(model, len(tok))      # (the full logits, before the head is watched)
    _base(model).get_output_embeddings().register_forward_hook(
        lambda m, a, o: calls.__setitem__("head_in", max(calls["head_in"], a[0].shape[-2])))
    grpo = "grpo" in opts
    trainer = _trainer(gtrl.GRPOTrainer if grpo else gtrl.GMPOTrainer, model, tok,
                       os.path.join(out_dir, f"run_{variant}_{rank}"), grpo=grpo,
                       gradient_accumulation_steps=ga, bf16="bf16" in opts,
                       **({"logging_steps": 1} if "train" in opts else {}))
    try:
        if "train" in opts:   # generation, GA micro-batches: the trainer's own loop
            _accelerate_fsdp(trainer, int(engine[-1]), prepare=False)
            trainer.train()
            logs = [h for h in trainer.state.log_history if "loss" in h]
            result = dict(loss=logs[-1]["loss"], grads={}, steps=trainer.state.global_step,
                          wrapped=_engine_name(trainer.model_wrapped))
        else:
            wrapped = _wrap(engine, trainer, ga)
            trainer.model_wrapped = wrapped
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = ga
            loss = _step(engine, trainer, wrapped, inputs, rank, world, ga)
            result = dict(loss=loss, grads=_grads(engine, wrapped, model),
                          wrapped=_engine_name(wrapped), direct=_direct_call(_base(model)))
            del wrapped
    finally:
        gtrl.linear_logps, gtrl._head_mismatch = real, real_check
    result.update(calls=calls, fused=trainer.fused_lm_head,
                  warned=sorted(trainer._gmpo_fallback_warned))
    if rank == 0:
        torch.save(result, os.path.join(out_dir, f"{variant}.pt"))
    del trainer, model
    gc.collect()
    dist.barrier()


def main():
    engine, out_dir, *variants = sys.argv[1:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = _tok()
    for variant in variants:
        run_variant(engine, variant, out_dir, tok, rank, world)
    # the engines' objects hold the process group's threads: dropped above
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
