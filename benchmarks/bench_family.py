#!/usr/bin/env python
"""The GRPO family's trainer loss step: gmpo_ext.trl.GRPOTrainer (LM head and
loss fused) against TRL 1.16's own trl.GRPOTrainer, per loss type (and GSPO:
grpo at the sequence level), fp32 and bf16 autocast, same model, same batch,
one run.

The step, the model (a 2-layer Qwen2 with the Qwen2.5-0.5B head, H=896,
V=151936, untied, random weights), the batch and the peak-memory measure are
bench_trl_step.py's (imported from it): ``loss = trainer.compute_loss(model,
inputs); loss.backward()``, generation excluded. Per loss type and dtype the
two trainers run in turn: first a warm-up round, untimed, that checks the
losses agree and measures each step's peak memory (torch.profiler's allocator
events, with every parameter gradient allocated beforehand so neither trainer
pays for them), then ``--repeats`` timed rounds; the median wall time per
trainer and the ratios TRL / ours (time) and ours / TRL (peak) are reported,
with the process CPU time of the same steps and the 1-minute load average at
the end of each case (a loaded machine shows there). Each case's rows are
merged into the CSV as soon as it ends (same loss, dtype and shape replaced),
so a long run can be split over several calls with ``--losses``. A loss type whose fused arguments
this build's ``gmpo_ext.grpo_loss`` lacks runs TRL's own loss inside our
trainer (a warning; column ``fused`` = no): its row compares TRL with itself.

    python benchmarks/bench_family.py                        # CSV in benchmarks/results
    python benchmarks/bench_family.py --shapes 2x32 --vocab 4096 --hidden 64   # quick
    python benchmarks/bench_family.py --device cuda --shapes 8x512
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
from _common import (cpu_alloc_peak, device_name, read_csv, resolve_device, set_threads,  # noqa: E402
                     synchronizer, write_csv)
from bench_trl_step import MiB, batch, build, step, step_arguments  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (loss_type, importance_sampling_level)
CASES = {"grpo": ("grpo", "token"), "bnpo": ("bnpo", "token"), "dr_grpo": ("dr_grpo", "token"),
         "dapo": ("dapo", "token"), "cispo": ("cispo", "token"), "sapo": ("sapo", "token"),
         "luspo": ("luspo", "sequence"), "vespo": ("vespo", "token"),
         "gspo": ("grpo", "sequence")}


def family_trainer(cls, model, tok, out_dir, B, T, loss_type, level, bf16, device):
    """A GRPOTrainer (TRL's or ours) for one loss type, ready for compute_loss."""
    from datasets import Dataset
    from trl import GRPOConfig
    args = GRPOConfig(output_dir=str(out_dir), report_to="none", use_cpu=device.type == "cpu",
                      bf16=bf16, gradient_checkpointing=False, save_strategy="no",
                      disable_tqdm=True, per_device_train_batch_size=B, num_generations=B,
                      max_completion_length=T, max_steps=1, loss_type=loss_type,
                      importance_sampling_level=level)
    ds = Dataset.from_dict({"prompt": ["1+2="] * B})
    t = cls(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
            train_dataset=ds, processing_class=tok)
    t.model.train()
    t.current_gradient_accumulation_steps = 1   # set by train() otherwise
    return t


def cuda_peak_beyond(t, model, inputs, device):
    """What one step allocates on the GPU beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(t, model, inputs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    step_arguments(ap)
    ap.add_argument("--losses", default=",".join(CASES),
                    help="comma-separated, of " + ", ".join(CASES))
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="CSV (default results/bench_family_<device>.csv)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = resolve_device(args.device)
    threads = set_threads(args.threads)
    sync = synchronizer(device)
    out = Path(args.out or RESULTS / f"bench_family_{device.type}.csv")

    import tempfile
    from trl import GRPOTrainer as TRLGRPOTrainer
    from gmpo_ext.demo import build_tokenizer
    from gmpo_ext.trl import GRPOTrainer

    tok = build_tokenizer("0123456789+-=abc ")
    tmp = Path(tempfile.mkdtemp(prefix="bench_family_"))
    rows = []
    dev_name = device_name(device)
    print(f"{dev_name}, {threads} threads; {args.layers}-layer Qwen2, H={args.hidden}, "
          f"V={args.vocab}")
    for dtype in args.dtypes.split(","):
        bf16 = {"fp32": False, "bf16": True}[dtype]
        for shape in args.shapes.split(","):
            B, T = (int(x) for x in shape.split("x"))
            for name in args.losses.split(","):
                loss_type, level = CASES[name]
                model = build(args.hidden, args.vocab, args.layers).to(device)
                inputs = batch(model, args.vocab, B, args.prompt, T)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                inputs["old_per_token_logps"] = near_policy_logps(model, inputs)
                inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
                trainers = {
                    "trl": family_trainer(TRLGRPOTrainer, model, tok, tmp / "trl", B, T,
                                          loss_type, level, bf16, device),
                    "ours": family_trainer(GRPOTrainer, model, tok, tmp / "ours", B, T,
                                           loss_type, level, bf16, device),
                }
                for p in model.parameters():   # both trainers' steps find them allocated
                    if p.requires_grad and p.grad is None:
                        p.grad = torch.zeros_like(p)
                losses, peaks, grads = {}, {}, {}
                for k, t in trainers.items():   # warm-up: parity and peak memory
                    if device.type == "cuda":
                        peaks[k] = cuda_peak_beyond(t, model, inputs, device)
                        losses[k] = float(step(t, model, inputs))
                    else:
                        peaks[k], loss = cpu_alloc_peak(lambda: step(t, model, inputs))
                        losses[k] = float(loss)
                    grads[k] = {n: p.grad.detach().float().clone() for n, p in
                                model.named_parameters() if n in CHECKED_GRADS}
                fused = trainers["ours"].fused_lm_head and \
                    not trainers["ours"]._gmpo_fallback_warned
                rel = abs(losses["ours"] - losses["trl"]) / max(abs(losses["trl"]), 1e-12)
                assert rel < (2e-2 if bf16 else 1e-4), \
                    f"{name} {dtype}: loss {losses['ours']} differs from TRL's {losses['trl']}"
                grad_err = max(float((grads["ours"][n] - g).double().norm()
                                     / g.double().norm().clamp(min=1e-30))
                               for n, g in grads["trl"].items())
                assert grad_err < (5e-2 if bf16 else 1e-3), \
                    f"{name} {dtype}: gradients differ from TRL's by {grad_err:.3g} (relative)"
                del grads
                times = {k: [] for k in trainers}
                cpu = {k: [] for k in trainers}
                for _ in range(args.repeats):
                    for k, t in trainers.items():
                        sync()
                        t0, c0 = time.perf_counter(), time.process_time()
                        step(t, model, inputs)
                        sync()
                        times[k].append(time.perf_counter() - t0)
                        cpu[k].append(time.process_time() - c0)
                med = {k: statistics.median(v) for k, v in times.items()}
                load = os.getloadavg()[0]
                case_rows = []
                for k in trainers:
                    case_rows.append(dict(loss=name, loss_type=loss_type, level=level, dtype=dtype,
                                     B=B, T=T, P=args.prompt, H=args.hidden, V=args.vocab,
                                     trainer=k, fused=("yes" if fused else "no") if k == "ours"
                                     else "-", seconds=f"{med[k]:.4f}",
                                     peak_mib=f"{peaks[k] / MiB:.1f}",
                                     speedup_vs_trl=f"{med['trl'] / med[k]:.2f}",
                                     peak_vs_trl=f"{peaks[k] / max(peaks['trl'], 1):.3f}",
                                     loss_value=f"{losses[k]:.6g}",
                                     grad_rel_err=f"{grad_err:.2e}", threads=threads,
                                     device=dev_name, repeats=args.repeats,
                                     cpu_seconds=f"{statistics.median(cpu[k]):.4f}",
                                     load_1min=f"{load:.2f}"))
                rows = merge_rows(out, case_rows)
                print(f"{name:8s} {dtype} B={B} T={T}: TRL {med['trl']:.4f} s "
                      f"{peaks['trl'] / MiB:.1f} MiB; ours {med['ours']:.4f} s "
                      f"{peaks['ours'] / MiB:.1f} MiB (fused: {'yes' if fused else 'no'}); "
                      f"TRL/ours time {med['trl'] / med['ours']:.2f}x, ours/TRL peak "
                      f"{peaks['ours'] / max(peaks['trl'], 1):.3f}; load {load:.2f}")
                del trainers, model, inputs
    print(f"wrote {out} ({len(rows)} rows)")


KEY = ("loss", "dtype", "B", "T", "H", "V", "trainer")
# the parameters whose gradients the warm-up compares (the head's and one
# attention projection's, upstream of the head's backward)
CHECKED_GRADS = ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight")


@torch.no_grad()
def near_policy_logps(model, inputs, noise=0.1, seed=2):
    """Old log-probs as a training step sees them: the model's own log-probs
    of the completion tokens plus N(0, noise^2), so the ratios sit around 1
    (inside and outside the clip range) and every loss type's value and
    gradient depend on the log-probs the step computes (random old log-probs
    far from the model's clip every ratio, and a loss of constants compares
    nothing)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, -T - 1:-1]
    out = torch.empty(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
    for b in range(hidden.shape[0]):   # one row's logits at a time
        lp = torch.log_softmax(model.lm_head(hidden[b]).float(), -1)
        out[b] = lp.gather(-1, inputs["completion_ids"][b, :, None])[:, 0]
    g = torch.Generator().manual_seed(seed)   # the same noise on every device
    return out + noise * torch.randn(out.shape, generator=g).to(out.device)


def merge_rows(out: Path, new_rows: list) -> list:
    """Write ``new_rows`` into the CSV at ``out``, replacing the rows of the
    same case (KEY) and keeping the others; return the rows written."""
    fields = list(new_rows[0])
    old = read_csv(out) if out.exists() else []
    if old and list(old[0]) != fields:
        print(f"{out}: other columns than this version writes; its rows are replaced")
        old = []
    keys = {tuple(str(r[k]) for k in KEY) for r in new_rows}
    rows = [r for r in old if tuple(r[k] for k in KEY) not in keys] + new_rows
    order = list(CASES)
    rows.sort(key=lambda r: (str(r["dtype"]) != "fp32", int(r["B"]), int(r["T"]),
                             order.index(r["loss"]) if r["loss"] in order else len(order),
                             str(r["trainer"]) != "trl"))
    write_csv(out, rows, fields)
    return rows


if __name__ == "__main__":
    main()
