#!/usr/bin/env python
"""Benchmark of GMPO's loss step from logits: gmpo_ext.gmpo_loss_from_logits
against TRL's path, time and peak memory, forward + backward, in one run.

Paths, all on the same (B, T + 1, V) logits (the model's output with
logits_to_keep = T + 1) and a full mask (no token skipped, so the fused kernels
get no credit for padding):

  trl            TRL's path: drop the last position (a slice view), divide by the
                 temperature, a per-row selective log-softmax loop (fp32: gather
                 + a logsumexp per row; bf16/fp16: a log_softmax + gather per
                 row), the eager GMPO formula (gmpo_ext.reference.gmpo_eager),
                 autograd for the gradient
  fused          gmpo_ext.gmpo_loss_from_logits (one read forward, one read and
                 one write backward)
  fused_inplace  the same with inplace_backward=True: the gradient is written
                 into the logits' buffer

The step is ``loss = path(logits); grad = torch.autograd.grad(loss, logits)``:
the gradient that would flow into lm_head's backward, not accumulated into a
.grad (so no path pays for an extra copy there). Time: the median of per-call
times after a warm-up (benchmarks/_common.measure); before each timed
fused_inplace call the logits are restored, untimed.

Peak memory beyond the logits (CPU): every allocation and free of torch's CPU
allocator during one step is recorded by torch.profiler (profile_memory=True:
one "[memory]" event per allocation, +bytes, and per free, -bytes, with a
timestamp); the running sum of those events in time order is the memory the
step holds beyond what existed before it (the logits and the other inputs),
and its maximum is the step's peak. The returned gradient is still alive at
the end of the step and is counted. Reported as a multiple of the logits'
size. On CUDA: torch.cuda.max_memory_allocated() during the step minus the
memory allocated before it.

    python benchmarks/bench_logits.py                      # B=4, T=1024, V=32768; fp32, bf16; CPU
    python benchmarks/bench_logits.py --device cuda        # B=8, T=4096, V=151936 bf16
    python benchmarks/bench_logits.py --shape 2x256x32768 --dtypes fp32 --repeats 3
    python benchmarks/bench_logits.py --from-csv benchmarks/results/bench_logits_cpu.csv --readme

The CUDA run prints the bandwidth floor beside the fused time: three passes
over the logits (read; read + write) at the HBM bandwidth of an H200 (4.8 TB/s:
6.2 ms for the reference workload) and an H100 (3.35 TB/s: 8.9 ms).

Outputs: a table on stdout, benchmarks/results/bench_logits_<device>.csv;
README.md and docs/benchmarks.md show results/bench_logits_cpu.csv through
tools/gen_docs.py (readme_markdown below); --readme runs it after the CSV is
written.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import gmpo_ext  # noqa: E402
from gmpo_ext.reference import gmpo_eager  # noqa: E402


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = ("trl", "fused", "fused_inplace")
DEFAULT_SHAPE = {"cpu": (4, 1024, 32768), "cuda": (8, 4096, 151936)}
DEFAULT_DTYPES = {"cpu": "fp32,bf16", "cuda": "bf16"}
GPU_BW = {"H200": 4.8e12, "H100": 3.35e12}   # HBM bytes / s (SXM parts)
TEMPERATURE = 0.7
FIELDS = ["device", "device_name", "torch", "gmpo_ext", "git", "threads", "B", "T", "V", "dtype",
          "path", "median_ms", "repeats", "speedup_vs_trl", "logits_bytes", "peak_beyond_bytes",
          "peak_beyond_x_logits", "floor_h200_ms", "floor_h100_ms", "others_busy"]


# ----------------------------------------------------------------------------
# the paths

def trl_logps(logits, ids, temperature):
    """TRL's route to per-token log-probs: slice, divide, per-row selective log-softmax."""
    logits = logits[:, :-1, :]
    logits = logits / temperature
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, ids.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    rows = []
    for row, row_ids in zip(logits, ids):
        rows.append(F.log_softmax(row, dim=-1).gather(-1, row_ids.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def make_step(path, inputs):
    logits, ids, old, adv, mask = inputs

    if path == "trl":
        def step():
            logps = trl_logps(logits, ids, TEMPERATURE)
            loss = gmpo_eager(logps, old, adv, mask)
            return torch.autograd.grad(loss, logits)[0]
    else:
        inplace = path == "fused_inplace"

        def step():
            loss = gmpo_ext.gmpo_loss_from_logits(logits, ids, old, adv, mask,
                                                  temperature=TEMPERATURE,
                                                  inplace_backward=inplace)
            return torch.autograd.grad(loss, logits)[0]
    return step


def make_inputs(B, T, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(B, T + 1, V, generator=g, device=device, dtype=torch.float32)
    logits = logits.mul_(2.0).to(dtype).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=g, device=device)
    old = -5.0 + 0.1 * torch.randn(B, T, generator=g, device=device)
    adv = torch.randn(B, generator=g, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    return logits, ids, old, adv, mask


# ----------------------------------------------------------------------------
# memory

def cpu_peak_beyond(step) -> int:
    """Peak bytes the step allocates beyond what existed before it (see the module doc)."""
    return C.cpu_alloc_peak(step)[0]


def cuda_peak_beyond(step, device) -> int:
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


# ----------------------------------------------------------------------------
# driver

def run(args):
    device = C.resolve_device(args.device)
    threads = C.set_threads(args.threads)
    B, T, V = args.shape or DEFAULT_SHAPE[device.type]
    dtypes = [d.strip() for d in (args.dtypes or DEFAULT_DTYPES[device.type]).split(",")]
    paths = [p.strip() for p in args.paths.split(",")]
    busy = C.wait_until_quiet(args.wait_quiet) if device.type == "cpu" else 0.0
    meta = dict(device=device.type, device_name=C.device_name(device), torch=torch.__version__,
                gmpo_ext=gmpo_ext.__version__, git=C.git_rev(), threads=threads, B=B, T=T, V=V,
                others_busy=f"{busy:.2f}")
    print(f"# {meta['device_name']} | torch {torch.__version__} | {threads} threads | "
          f"B={B} T={T} V={V} | others busy {busy:.0%} at start")
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        inputs = make_inputs(B, T, V, dtype, device)
        logits = inputs[0]
        nbytes = logits.numel() * logits.element_size()
        pristine = logits.detach().clone() if "fused_inplace" in paths else None
        floor = {k: 3 * nbytes / bw * 1e3 for k, bw in GPU_BW.items()}
        res = {}
        for path in paths:
            step = make_step(path, inputs)
            setup = None
            if path == "fused_inplace":
                def setup(_src=pristine, _dst=logits):
                    with torch.no_grad():
                        _dst.copy_(_src)
            if device.type == "cpu":
                if setup:
                    setup()
                peak = cpu_peak_beyond(step)
            else:
                if setup:
                    setup()
                peak = cuda_peak_beyond(step, device)
            fn = step if setup is None else (lambda _x, _s=step: _s())
            sec, n = C.measure(fn, device, setup=setup, min_time=args.min_time,
                               min_repeats=args.repeats, max_repeats=max(args.repeats, 1000),
                               warmup=1)
            res[path] = sec
            rows.append(dict(meta, dtype=dname, path=path, median_ms=f"{sec * 1e3:.2f}",
                             repeats=n, logits_bytes=nbytes, peak_beyond_bytes=peak,
                             peak_beyond_x_logits=f"{peak / nbytes:.3f}",
                             floor_h200_ms=f"{floor['H200']:.2f}",
                             floor_h100_ms=f"{floor['H100']:.2f}"))
            print(f"  {dname:5s} {path:14s} {sec * 1e3:10.1f} ms  peak beyond logits "
                  f"{peak / nbytes:6.3f} x  ({n} calls)", flush=True)
            del step
            gc.collect()
        for r in rows:
            if r["dtype"] == dname and "trl" in res:
                r["speedup_vs_trl"] = f"{res['trl'] / float(r['median_ms']) * 1e3:.2f}"
        del inputs, logits, pristine
        gc.collect()
    return rows


def table(rows):
    header = ["dtype", "path", "fwd+bwd ms", "vs TRL", "peak beyond logits", "floor H200 / H100 ms"]
    body = []
    for r in rows:
        floor = (f"{r['floor_h200_ms']} / {r['floor_h100_ms']}"
                 if r["device"] == "cuda" else "")
        body.append([r["dtype"], r["path"], r["median_ms"], (r.get("speedup_vs_trl") or "") + "x",
                     r["peak_beyond_x_logits"] + " x", floor])
    r0 = rows[0]
    title = (f"{r0['device_name']}, {r0['threads']} threads, torch {r0['torch']}: B={r0['B']}, "
             f"T={r0['T']}, V={r0['V']}, temperature {TEMPERATURE}, logits (B, T+1, V); "
             f"other processes held {float(r0['others_busy']):.0%} of the CPU at the start")
    return title, header, body


def readme_markdown(rows) -> str:
    """The docs' table of a run (tools/gen_docs.py renders results/bench_logits_cpu.csv with it)."""
    title, header, body = table(rows)
    md = f"{title}\n\n" + C.markdown_table(header, body, align="llrrrr")
    cmd = "python benchmarks/bench_logits.py" + (" --device cuda"
                                                  if rows[0]["device"] == "cuda" else "")
    return md + (f"\n\n`{cmd}` (git {rows[0]['git']}); peak memory measured with "
                 "torch.profiler memory events (CPU) or max_memory_allocated (CUDA).")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", type=lambda s: tuple(int(x) for x in s.split("x")),
                    help="BxTxV (default 4x1024x32768 on CPU, 8x4096x151936 on CUDA)")
    ap.add_argument("--dtypes", help="comma-separated: fp32,bf16,fp16 (CPU default fp32,bf16; "
                                     "CUDA bf16)")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5, help="at least this many timed calls")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--wait-quiet", type=float, default=30.0,
                    help="seconds to wait for other processes to leave the CPU")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--from-csv", type=Path, default=None, help="print / --readme from a CSV")
    ap.add_argument("--readme", action="store_true",
                    help="then regenerate README.md and docs/ from the results CSVs "
                         "(python tools/gen_docs.py)")
    args = ap.parse_args(argv)
    if args.from_csv:
        rows = C.read_csv(args.from_csv)
    else:
        rows = run(args)
        out = args.out or C.RESULTS_DIR / f"bench_logits_{torch.device(args.device).type}.csv"
        C.write_csv(out, rows, FIELDS)
        print(f"# wrote {out}")
    title, header, body = table(rows)
    print(title)
    print(C.text_table(header, body))
    if args.readme:
        print("# regenerating README.md and docs/ from benchmarks/results (tools/gen_docs.py; "
              "they show results/bench_logits_cpu.csv)")
        C.regenerate_docs()


if __name__ == "__main__":
    main()
