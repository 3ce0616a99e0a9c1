#!/usr/bin/env python
"""The loss step of a TRL trainer, end to end: gmpo_ext.trl.GMPOTrainer (LM head
fused, its default; and its logits path, fused_lm_head=False) against TRL
1.16's own trl.experimental.gmpo.GMPOTrainer, same model, same batch, one run.

The step is what a training step spends on the loss: ``loss =
trainer.compute_loss(model, inputs); loss.backward()`` (the model's forward
and backward included, generation excluded). The model is a 2-layer Qwen2
with the Qwen2.5-0.5B head (H=896, V=151936, untied), random weights, fp32 on
the CPU; the batch is shaped as GRPOTrainer hands it over (left-padded prompts,
right-padded completions of mixed lengths, off-policy old log-probs).

Time: the three trainers run in turn, ``--repeats`` rounds after a warm-up
round; the median per trainer and the ratio TRL / ours are reported.
Peak memory: torch.profiler's allocator events during one step (running sum in
time order, its maximum), with the parameter gradients already allocated by
the warm-up and zeroed in place: what the step holds beyond the model, the
batch and the parameter gradients.

    python benchmarks/bench_trl_step.py                  # CSV in benchmarks/results
    python benchmarks/bench_trl_step.py --shapes 2x64    # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_alloc_peak, cpu_name, set_threads, write_csv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2.0 ** 20


def build(H, V, layers, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=layers,
                      num_attention_heads=14 if H % 14 == 0 else 4, num_key_value_heads=2,
                      max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = 0
    return model


def trainer(cls, model, tok, out_dir, B, **kw):
    from datasets import Dataset
    from trl.experimental.gmpo import GMPOConfig
    args = GMPOConfig(output_dir=str(out_dir), report_to="none", use_cpu=True, bf16=False,
                      gradient_checkpointing=False, save_strategy="no", disable_tqdm=True,
                      per_device_train_batch_size=B, num_generations=B, max_completion_length=8,
                      max_steps=1)
    ds = Dataset.from_dict({"prompt": ["1+2="] * B})
    t = cls(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
            train_dataset=ds, processing_class=tok, **kw)
    t.model.train()
    t.current_gradient_accumulation_steps = 1   # set by train() otherwise
    return t


def batch(model, V, B, P, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, : P // 2] = 0
    completion_ids = torch.randint(2, V, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    advantages = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 3 + 0.3 * torch.randn(B, T, generator=g)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=advantages, old_per_token_logps=old)


def step(t, model, inputs):
    # the parameter gradients stay allocated (zeroed in place): a step's
    # allocations are then its own transient memory only
    model.zero_grad(set_to_none=False)
    loss = t.compute_loss(model, inputs)
    loss.backward()
    return loss.detach()


def peak_beyond(t, model, inputs):
    assert all(p.grad is not None for p in model.parameters()), "run a step first"
    return cpu_alloc_peak(lambda: step(t, model, inputs))[0]


def step_arguments(ap):
    """The model, batch and timing flags of the trainer-step benchmarks (this
    script and bench_family.py)."""
    ap.add_argument("--shapes", default="4x256,8x512", help="BxT completions, comma-separated")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    step_arguments(ap)
    ap.add_argument("--out", default=str(RESULTS / "bench_trl_step_cpu.csv"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    threads = set_threads(args.threads)

    import tempfile
    from trl.experimental.gmpo import GMPOTrainer as TRLGMPOTrainer
    from gmpo_ext.demo import build_tokenizer
    from gmpo_ext.trl import GMPOTrainer

    tok = build_tokenizer("0123456789+-=abc ")
    model = build(args.hidden, args.vocab, args.layers)
    tmp = Path(tempfile.mkdtemp(prefix="bench_trl_step_"))
    rows = []
    print(f"{cpu_name()}, {threads} threads; 2-layer Qwen2, H={args.hidden}, V={args.vocab}, fp32")
    for shape in args.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        inputs = batch(model, args.vocab, B, args.prompt, T)
        trainers = {
            "trl": trainer(TRLGMPOTrainer, model, tok, tmp / "trl", B),
            "ours_fused": trainer(GMPOTrainer, model, tok, tmp / "fused", B),
            "ours_logits": trainer(GMPOTrainer, model, tok, tmp / "logits", B,
                                   fused_lm_head=False),
        }
        losses = {k: float(step(t, model, inputs)) for k, t in trainers.items()}   # warm-up
        for k in ("ours_fused", "ours_logits"):
            rel = abs(losses[k] - losses["trl"]) / max(abs(losses["trl"]), 1e-12)
            assert rel < 1e-4, f"{k} loss {losses[k]} differs from TRL's {losses['trl']}"
        times = {k: [] for k in trainers}
        for _ in range(args.repeats):
            for k, t in trainers.items():
                t0 = time.perf_counter()
                step(t, model, inputs)
                times[k].append(time.perf_counter() - t0)
        peaks = {k: peak_beyond(t, model, inputs) for k, t in trainers.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in trainers:
            rows.append(dict(B=B, T=T, P=args.prompt, H=args.hidden, V=args.vocab, trainer=k,
                             seconds=f"{med[k]:.3f}", peak_mib=f"{peaks[k] / MiB:.1f}",
                             speedup_vs_trl=f"{med['trl'] / med[k]:.2f}",
                             peak_vs_trl=f"{peaks[k] / peaks['trl']:.3f}",
                             loss=f"{losses[k]:.6g}", threads=threads, cpu=cpu_name()))
            print(f"B={B} T={T} {k:12s} {med[k]:8.3f} s  peak beyond {peaks[k] / MiB:8.1f} MiB  "
                  f"TRL/this time {med['trl'] / med[k]:.2f}x  peak/TRL {peaks[k] / peaks['trl']:.3f}")
    write_csv(Path(args.out), rows, list(rows[0]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
