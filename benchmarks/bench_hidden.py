#!/usr/bin/env python
"""Benchmark of GMPO's loss step from hidden states (the LM head fused in):
gmpo_ext.gmpo_loss_from_hidden against TRL 1.16's fused head and against full
logits, time and peak memory, forward + backward, on the same inputs in one run.

Paths, all on the same hidden (B, T, H), weight (V, H), ids, old log-probs,
advantages and a full mask (no token skipped, so the fused path gets no credit
for padding):

  ours   gmpo_ext.gmpo_loss_from_hidden (token tiles + recompute: C fold and
         tile-gradient kernels between torch GEMMs)
  rows   the whole-row variant (mode="rows"): a row's T x V logits held, its
         G_t finished, then dH and dW: 3 GEMMs instead of 4 (measured to
         decide the default; see the printout and benchmarks/README)
  trl    TRL 1.16's path: trl.kernels.chunked_logprob.ChunkedLogProbFunction
         (4096-token x 32768-vocab tiles; on CPU its torch-op fold) on every
         position, then the eager GMPO formula (gmpo_ext.reference.gmpo_eager)
  full   full logits: hidden @ weight.T, then gmpo_ext.gmpo_loss_from_logits

The step is ``loss = path(...); torch.autograd.grad(loss, [hidden, weight])``.
Time: per configuration the paths run in turn, ``--repeats`` rounds after one
warm-up round (interleaved, so drift of the shared machine hits all alike);
the median per path is reported, and the ratio trl / ours.

Peak memory (CPU): torch.profiler with profile_memory=True records every
allocation (+bytes) and free (-bytes) of torch's CPU allocator during one step
(the kernels allocate nothing themselves); the running sum in time order is
what the step holds beyond what existed before it, and its maximum the peak.
The returned gradients (hidden's and the weight's, the parameter gradients)
are subtracted: "beyond" = peak - bytes(dH) - bytes(dW). Reported in MiB and
in units of ours' tile (tile_tokens x tile_vocab elements of the input dtype).

    python benchmarks/bench_hidden.py                            # the default grid (slow: minutes)
    python benchmarks/bench_hidden.py --shape 896x151936 --n 2048 --dtypes fp32 --repeats 3
    python benchmarks/bench_hidden.py --shape 256x32768 --bt 8x4096 --paths ours --repeats 1
    python benchmarks/bench_hidden.py --device cuda --shape 896x151936 --n 32768 --dtypes bf16

On CUDA the peak is torch.cuda.max_memory_allocated during the step beyond what
was allocated before it (minus dH and dW), the time is taken after a
synchronize, and each row also gives the achieved TFLOPS (the path's own GEMM
FLOPs: 8 N H V with recompute, 6 N H V for rows and full logits) and the
3-GEMM floor (6 N H V at the device's dense peak, --peak-tflops or looked up
from the device name).

Outputs: a table on stdout, rows appended to
benchmarks/results/bench_hidden_cpu.csv (--csv to change), and a plot
(--plot) benchmarks/results/bench_hidden_cpu.png.
"""

from __future__ import annotations

import argparse
import csv
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _common  # noqa: E402
import gmpo_ext  # noqa: E402
from gmpo_ext.hidden import default_tiles  # noqa: E402
from gmpo_ext.reference import gmpo_eager  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FIELDS = ["device", "rev", "threads", "H", "V", "B", "T", "N", "dtype", "path", "median_s",
          "min_s", "repeats", "peak_beyond_mib", "tile_mib", "peak_tiles", "speedup_vs_trl",
          "tflops", "floor_ms"]
# GEMM FLOPs per path in units of N H V: forward 2, backward dH 2 + dW 2, and 2
# more where the logits are recomputed in backward (ours' tiles, TRL)
GEMM_UNITS = {"ours": 8, "trl": 8, "rows": 6, "full": 6}
# dense bf16/fp16 tensor-core peaks (TFLOPS), by device name, for the floor
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0}


def make_inputs(B, T, H, V, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) * 1.0).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    old = (-torch.rand(B, T, generator=g) * 5 - 8).to(device)   # about log(1/V): ratios near 1
    adv = torch.randn(B, generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    return hidden, weight, ids, old, adv, mask


def make_step(path, inp):
    hidden, weight, ids, old, adv, mask = inp
    B, T, H = hidden.shape
    V = weight.shape[0]
    if path in ("ours", "rows"):
        mode = "tiles" if path == "ours" else "rows"

        def step():
            loss = gmpo_ext.gmpo_loss_from_hidden(hidden, weight, ids, old, adv, mask, mode=mode)
            return torch.autograd.grad(loss, [hidden, weight])
    elif path == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def step():
            lp = ChunkedLogProbFunction.apply(hidden.reshape(B * T, H), weight, None,
                                              ids.reshape(-1), 1.0, 32768, None, 1.0, ())[0]
            loss = gmpo_eager(lp.view(B, T), old, adv, mask)
            return torch.autograd.grad(loss, [hidden, weight])
    elif path == "full":
        def step():
            logits = hidden @ weight.t()
            loss = gmpo_ext.gmpo_loss_from_logits(logits, ids, old, adv, mask)
            return torch.autograd.grad(loss, [hidden, weight])
    else:
        raise ValueError(path)
    return step


def cuda_peak_beyond(step) -> tuple[int, object]:
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    grads = sum(g.numel() * g.element_size() for g in out)
    return torch.cuda.max_memory_allocated() - base - grads, out


def cpu_peak_beyond(step) -> tuple[int, object]:
    peak, out = _common.cpu_alloc_peak(step)
    grads = sum(g.numel() * g.element_size() for g in out)
    return peak - grads, out


def run_config(H, V, B, T, dtype_name, paths, repeats, check=True, device="cpu", peak_tflops=None):
    dtype = DTYPES[dtype_name]
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak_fn = cuda_peak_beyond if cuda else cpu_peak_beyond
    inp = make_inputs(B, T, H, V, dtype, device=device)
    N = B * T
    tn, tv = default_tiles(N, H, V, dtype)
    tile_bytes = tn * tv * torch.empty((), dtype=dtype).element_size()
    steps = {p: make_step(p, inp) for p in paths}
    res = {p: {"times": []} for p in paths}
    # memory first (one profiled step each; also the warm-up round)
    outs = {}
    for p in paths:
        peak, out = peak_fn(steps[p])
        res[p]["peak"] = peak
        outs[p] = [o.float() for o in out]
        del out
    if check and len(paths) > 1:   # the paths compute the same gradients
        ref = outs[paths[0]]
        for p in paths[1:]:
            for a, b in zip(ref, outs[p]):
                err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                if err > (2e-3 if dtype == torch.float32 else 5e-2):
                    print(f"WARNING: {p} vs {paths[0]}: gradient relative error {err:.2e}")
    del outs
    for _ in range(repeats):
        for p in paths:
            gc.collect()
            sync()
            t0 = time.perf_counter()
            out = steps[p]()
            sync()
            res[p]["times"].append(time.perf_counter() - t0)
            del out
    rows = []
    for p in paths:
        ts = res[p]["times"] or [float("nan")]
        med = statistics.median(ts)
        flops = GEMM_UNITS.get(p, 8) * N * H * V
        rows.append(dict(device=_common.device_name(torch.device(device)) if cuda else
                         _common.cpu_name(), rev=_common.git_rev(),
                         tflops=f"{flops / med / 1e12:.1f}" if med == med else "",
                         floor_ms=f"{6 * N * H * V / (peak_tflops * 1e12) * 1e3:.2f}"
                         if peak_tflops else "",
                         threads=torch.get_num_threads(), H=H, V=V, B=B, T=T, N=N,
                         dtype=dtype_name, path=p, median_s=f"{statistics.median(ts):.4f}",
                         min_s=f"{min(ts):.4f}", repeats=len(res[p]["times"]),
                         peak_beyond_mib=f"{res[p]['peak'] / 2**20:.1f}",
                         tile_mib=f"{tile_bytes / 2**20:.1f}",
                         peak_tiles=f"{res[p]['peak'] / tile_bytes:.2f}", speedup_vs_trl=""))
    if "trl" in paths and "ours" in paths:
        t_trl = statistics.median(res["trl"]["times"]) if res["trl"]["times"] else float("nan")
        for r in rows:
            r["speedup_vs_trl"] = f"{t_trl / float(r['median_s']):.2f}"
    return rows


def plot(csv_path, png_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no plot", file=sys.stderr)
        return
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    keys = sorted({(r["H"], r["V"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(2, len(keys), figsize=(4.5 * len(keys), 7), squeeze=False)
    for j, k in enumerate(keys):
        sel = [r for r in rows if (r["H"], r["V"], r["dtype"]) == k]
        for p in sorted({r["path"] for r in sel}):
            pts = sorted((int(r["N"]), float(r["median_s"]), float(r["peak_beyond_mib"]))
                         for r in sel if r["path"] == p)
            axes[0][j].plot([x[0] for x in pts], [x[1] for x in pts], "o-", label=p)
            axes[1][j].plot([x[0] for x in pts], [x[2] for x in pts], "o-", label=p)
        axes[0][j].set_title(f"H={k[0]} V={k[1]} {k[2]}: fwd+bwd")
        axes[0][j].set_ylabel("seconds (median)")
        axes[1][j].set_ylabel("peak MiB beyond inputs and grads")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens N")
            ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)


def summary(csv_paths, md_path):
    """A markdown table per CSV (regenerated from the benchmark output, never typed)."""
    out = ["# bench_hidden results (generated by benchmarks/bench_hidden.py --summary)", "",
           "peak = torch CPU allocator high-water during one fwd+bwd step beyond inputs, minus "
           "the returned dH and dW (profiler memory events); tiles = peak / ours' default tile; "
           "time = median over the repeats, paths interleaved on the same inputs; x trl = "
           "trl's median / this path's.", ""]
    for path in csv_paths:
        path = Path(path)
        if not path.exists():
            continue
        with open(path) as f:
            rows = list(csv.DictReader(f))
        out += [f"## {path.name}", "",
                "| H | V | B x T | dtype | path | median s | min s | reps | peak MiB | tiles | x trl |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['H']} | {r['V']} | {r['B']} x {r['T']} | {r['dtype']} | {r['path']} "
                       f"| {r['median_s']} | {r['min_s']} | {r['repeats']} | "
                       f"{r['peak_beyond_mib']} | {r['peak_tiles']} | {r['speedup_vs_trl']} |")
        out.append("")
    if rows:
        out.append(f"Machine: {rows[-1]['device']}, {rows[-1]['threads']} threads, rev "
                   f"{rows[-1]['rev']}.")
    Path(md_path).write_text("\n".join(out) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", help="HxV (default 896x151936 and 256x32768)")
    ap.add_argument("--n", type=int, action="append", help="tokens N (rows of T = --t)")
    ap.add_argument("--t", type=int, default=512, help="tokens per row (default 512)")
    ap.add_argument("--bt", action="append", help="BxT instead of --n")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--paths", default="ours,trl,full")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense peak for the floor (default: by device name)")
    ap.add_argument("--csv", default=None, help="default results/bench_hidden_<cpu|cuda>.csv")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--summary", action="store_true",
                    help="only write results/bench_hidden_cpu.md from the CSVs there")
    args = ap.parse_args(argv)
    if args.summary:
        res = _common.RESULTS_DIR
        summary([res / "bench_hidden_cpu.csv", res / "bench_hidden_rows_cpu.csv"],
                res / "bench_hidden_cpu.md")
        plot(res / "bench_hidden_cpu.csv", res / "bench_hidden_cpu.png")
        return
    _common.set_threads(args.threads)
    dev = _common.resolve_device(args.device)
    peak_tflops = args.peak_tflops
    if peak_tflops is None and dev.type == "cuda":
        name = _common.device_name(dev)
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        print(f"{name}: dense peak {peak_tflops} TFLOPS (--peak-tflops to set it)")
    if args.csv is None:
        args.csv = str(_common.RESULTS_DIR / f"bench_hidden_{dev.type}.csv")
    shapes = [tuple(int(x) for x in s.split("x")) for s in (args.shape or ["896x151936", "256x32768"])]
    bts = ([tuple(int(x) for x in s.split("x")) for s in args.bt] if args.bt else
           [(max(1, n // args.t), min(n, args.t)) for n in (args.n or [1024, 2048, 4096, 8192])])
    paths = args.paths.split(",")
    csv_path = Path(args.csv)
    new = not csv_path.exists()
    if not new:   # an older file without the newer columns: rewritten with them
        with open(csv_path, newline="") as f:
            old = list(csv.DictReader(f))
        if old and list(old[0]) != FIELDS:
            _common.write_csv(csv_path, old, FIELDS)
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for H, V in shapes:
            for dn in args.dtypes.split(","):
                for B, T in bts:
                    rows = run_config(H, V, B, T, dn, paths, args.repeats, device=dev,
                                      peak_tflops=peak_tflops)
                    for r in rows:
                        w.writerow(r)
                        print(" ".join(f"{k}={r[k]}" for k in ("H", "V", "N", "dtype", "path",
                                                                  "median_s", "peak_beyond_mib",
                                                                  "peak_tiles", "speedup_vs_trl",
                                                                  "tflops", "floor_ms")),
                              flush=True)
                    f.flush()
    if args.plot:
        plot(csv_path, csv_path.with_suffix(".png"))


if __name__ == "__main__":
    main()
