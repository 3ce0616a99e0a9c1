"""One rank of tests/test_trl_engines.py: the TRL drop-in under a training engine.

    python -m torch.distributed.run --nproc_per_node 2 tests/_trl_engine_worker.py \
        SCENARIO OUT_DIR

Every rank builds the same tiny Qwen2-style model and the same fixed batch
(B = 8 rows: rank r takes rows [r * 4, r * 4 + 4)), wraps the model with the
engine named by SCENARIO (DDP, FSDP1, FSDP2, DeepSpeed ZeRO-3, PEFT LoRA), runs
the real trainer step (``trainer.compute_loss`` + backward, ``grad_accum``
micro-batches per rank) and gathers every parameter's full gradient the
engine's way (FSDP2: DTensor.full_tensor(); FSDP1: summon_full_params with
grads; ZeRO-3: safe_get_full_grad). Rank 0 writes them to OUT_DIR/result.pt
with what the fused path did (the LM head module's largest input, the number
of linear_logps calls); tests/test_trl_engines.py compares them with TRL's own
GMPOTrainer on the whole batch in one process (``reference`` below).
"""

from __future__ import annotations

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


def _model(V, tie, scale=1.0, path=None):
    """The tiny model; saved to ``path`` (TRL loads the reference model from
    config._name_or_path when beta != 0)."""
    from gmpo_ext.demo import build_model
    model = build_model(V, seed=0, hidden=H, tie_word_embeddings=tie)
    if scale != 1.0:   # logits of a trained model's size
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale)
    if path is not None:
        if not os.path.exists(os.path.join(path, "config.json")):
            model.save_pretrained(path)
        model.config._name_or_path = path
    return model


def _batch(model, V, temperature=1.0):
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
                ref_per_token_logps=lp + 0.3 * torch.randn(B, T, generator=g))


def _rows(inputs, lo, hi):
    return {k: v[lo:hi] for k, v in inputs.items()}


def _trainer(cls, model, tok, out, bf16=False, **kw):
    from datasets import Dataset
    from trl.experimental.gmpo import GMPOConfig
    args = GMPOConfig(output_dir=out, report_to="none", use_cpu=True, bf16=bf16,
                      gradient_checkpointing=kw.pop("gradient_checkpointing", False),
                      save_strategy="no", per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=T, max_steps=1, disable_tqdm=True, beta=0.1,
                      **kw)
    ds = Dataset.from_dict({"prompt": ["1+2=", "3+4="] * 8})
    return cls(model=model, reward_funcs=lambda completions, **k: [float(len(c)) for c in completions],
               args=args, train_dataset=ds, processing_class=tok)


def reference(tok, tie, scale, gc, path):
    """TRL's own GMPOTrainer, one process, the whole batch, fp32."""
    from trl.experimental.gmpo import GMPOTrainer as TRLGMPOTrainer
    model = _model(len(tok), tie, scale, path)
    tr = _trainer(TRLGMPOTrainer, model, tok, "/tmp/_gmpo_ref_unused", gradient_checkpointing=gc)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    inputs = _batch(model, len(tok))
    loss = tr.compute_loss(model, inputs)
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------
# engines

def _accelerate_fsdp(trainer, version):
    """Switch accelerate's state to FSDP (a CPU run does not turn it on by
    itself) so that its own FSDP preparation wraps the model."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=version, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Qwen2DecoderLayer"],
        **({"use_orig_params": True} if version == 1 else {}))
    acc = trainer.accelerator
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    if version == 1:
        # accelerate passes device_id=cpu:0 on a CPU run, which FSDP1 compares
        # with its compute device "cpu" and refuses: the indexless device
        acc.state.device = torch.device("cpu")
        return acc.prepare_model(trainer.model)
    # FSDP2's preparation wants the optimizer too (it re-binds its parameters)
    wrapped, _ = acc.prepare(trainer.model, torch.optim.SGD(trainer.model.parameters(), lr=0.0))
    return wrapped


def _deepspeed_zero3(trainer):
    import deepspeed
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=trainer.model, model_parameters=trainer.model.parameters(),
                                      config=cfg)
    return engine


def _full_grads(engine_name, wrapped, model):
    """{name: full gradient} (the engine's reduction: averaged over ranks)."""
    out = {}
    if engine_name == "zero3":
        from deepspeed.utils import safe_get_full_grad
        for n, p in model.named_parameters():
            g = safe_get_full_grad(p)
            out[n] = None if g is None else g.detach().clone()
        return out
    if engine_name == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(wrapped, with_grads=True):
            for n, p in wrapped.named_parameters():
                out[n.replace("_fsdp_wrapped_module.", "")] = None if p.grad is None else p.grad.detach().clone()
        return out
    for n, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[n] = None if g is None else g.detach().clone()
    return out


def main():
    scenario, out_dir = sys.argv[1], sys.argv[2]
    engine, *opts = scenario.split("+")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = _tok()
    tie = "tied" in opts
    scale = 30.0 if "big" in opts else 1.0
    gc = "gc" in opts
    ga = 2 if "ga" in opts else 1

    path = os.path.join(out_dir, "model")
    if rank == 0:
        _model(len(tok), tie, scale, path)
    dist.barrier()

    from gmpo_ext import trl as gtrl
    calls = {"linear_logps": 0, "head_in": 0}
    real = gtrl.linear_logps

    def counted(*a, **k):
        calls["linear_logps"] += 1
        return real(*a, **k)
    gtrl.linear_logps = counted

    model = _model(len(tok), tie, scale, path)
    inputs = _batch(model, len(tok))
    if "lora" in opts:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0))
    head = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_output_embeddings()
    head.register_forward_hook(
        lambda m, a, o: calls.__setitem__("head_in", max(calls["head_in"], a[0].shape[-2])))

    trainer = _trainer(gtrl.GMPOTrainer, model, tok, os.path.join(out_dir, f"r{rank}"),
                       gradient_checkpointing=gc)
    if engine == "ddp":
        wrapped = trainer.accelerator.prepare_model(trainer.model)
    elif engine in ("fsdp1", "fsdp2"):
        wrapped = _accelerate_fsdp(trainer, int(engine[-1]))
    elif engine == "zero3":
        wrapped = _deepspeed_zero3(trainer)
    else:
        raise SystemExit(f"unknown engine {engine}")
    trainer.model_wrapped = wrapped
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = ga

    per = B // world
    lo = rank * per
    losses = []
    step = per // ga
    for k in range(ga):
        mb = _rows(inputs, lo + k * step, lo + (k + 1) * step)
        if engine == "ddp" and k < ga - 1:
            with wrapped.no_sync():
                loss = trainer.compute_loss(wrapped, mb)
                loss.backward()
        else:
            loss = trainer.compute_loss(wrapped, mb)
            if engine == "zero3":
                wrapped.backward(loss, scale_wrt_gas=False)
            else:
                loss.backward()
        losses.append(loss.detach().float())
    local = torch.stack(losses).sum()
    dist.all_reduce(local)
    got_loss = float(local) / world
    module = wrapped.module if engine == "zero3" else model
    grads = _full_grads(engine, wrapped, module)
    if rank == 0:
        torch.save(dict(loss=got_loss, grads=grads,
                        calls=calls, fused=trainer.fused_lm_head,
                        warned=sorted(trainer._gmpo_fallback_warned)),
                   os.path.join(out_dir, "result.pt"))
    dist.barrier()
    # the engines' objects hold the process group's threads: drop them first
    del wrapped, trainer, model
    import gc
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
