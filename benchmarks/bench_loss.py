#!/usr/bin/env python
"""Benchmark of the fused GMPO loss against its PyTorch baselines.

Compares, on the same inputs in one run:

  fused       gmpo_ext.gmpo_loss (the torch.library op over the C / CUDA kernels)
  fused_C     the same kernels called straight through gmpo_ext._C on
              preallocated buffers: no torch op, no autograd, no allocation.
              fused - fused_C is the Python / dispatch / allocation overhead.
              In mode both: the forward call, then the backward call.
  fused_C1    mode both, CPU: the one call the eager path makes instead,
              forward_backward (the forward and the gradient in one pass over
              the inputs: 13 of the 22 B per token credited to every path).
  autograd_noop  the framework's fixed cost, for scale: an autograd.Function
              that computes nothing (its backward returns a preallocated
              gradient) under the same torch.autograd.grad call. No loss
              can run below it through autograd.
  eager       the eager PyTorch GMPO formula (gmpo_ext.reference.gmpo_eager)
  compiled    torch.compile of that formula (compiled once per shape)
  grpo_eager  eager GRPO (gmpo_ext.reference.grpo_loss_reference in the input
              dtype; it also computes its three clip metrics, as TRL does)
  grpo_fused  gmpo_ext.grpo_loss

in three modes: fwd (the loss, with autograd recording as in training), bwd
(the backward alone: before each timed backward an untimed forward) and both
(forward + backward). Every figure is the median of
per-call times after a warm-up, with enough calls to last --min-time seconds.

Bandwidth: every path is credited with the bytes the fused kernel must move
(fwd: read logps, old_logps, mask and the per-row advantages; bwd: the same
reads plus the gradient write; both: the sum) and compared with a memcpy
measured in the same run: torch copy_ between two preallocated uint8 buffers
of that many bytes, counted as read + write (2 x bytes), the STREAM convention.

    python benchmarks/bench_loss.py                 # full grid, fp32, CPU
    python benchmarks/bench_loss.py --quick --dtype bf16
    python benchmarks/bench_loss.py --shapes 64x4096 --modes both
    python benchmarks/bench_loss.py --device cuda   # on a machine with a GPU
    python benchmarks/bench_loss.py --floor         # bytes per token, H100/H200 floor
    python benchmarks/bench_loss.py --from-csv benchmarks/results/bench_loss_cpu.csv

Outputs: a table on stdout, benchmarks/results/bench_loss_<device>[_<dtype>][_quick].csv
and a .png beside it (time per path vs tokens, one panel per mode). README.md and
docs/benchmarks.md show results/bench_loss_cpu.csv through tools/gen_docs.py
(--readme runs it after the CSV is written).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import gmpo_ext  # noqa: E402
from gmpo_ext import _backend  # noqa: E402
from gmpo_ext.reference import gmpo_eager, grpo_loss_reference  # noqa: E402

BENCH_README = Path(__file__).resolve().parent / "README.md"
FLOOR_START, FLOOR_END = "<!-- bench_loss_floor:start -->", "<!-- bench_loss_floor:end -->"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MODES = ("fwd", "bwd", "both")
PATHS = ("fused", "fused_C", "fused_C1", "autograd_noop", "eager", "compiled", "grpo_eager",
         "grpo_fused")
BASELINE = {"fused": "eager", "fused_C": "eager", "fused_C1": "eager", "autograd_noop": "eager",
            "eager": "eager",
            "compiled": "eager", "grpo_eager": "grpo_eager", "grpo_fused": "grpo_eager"}
GRID = [(B, T) for B in (8, 16, 64) for T in (1024, 4096, 16384)]
QUICK = [(8, 1024), (8, 4096), (64, 4096)]
FLOOR_SHAPES = [(8, 4096), (64, 4096), (64, 16384)]
BUSY_LIMIT = 0.1       # others' share of the cores above which a shape counts as disturbed
GPU_BW = {"H100": 3.35e12, "H200": 4.8e12}   # HBM bytes / s (SXM parts)
EPS = 0.4              # GMPO's log-space clip (paper and TRL default)
GRPO_EPS = 0.2         # GRPO's ratio-space clip (TRL default)

FIELDS = ["device", "device_name", "torch", "gmpo_ext", "git", "threads", "B", "T", "tokens",
          "dtype", "mode", "path", "median_ms", "min_ms", "repeats", "bytes", "gbps", "memcpy_ms",
          "memcpy_gbps",
          "frac_of_memcpy", "baseline", "speedup_vs_eager", "others_busy"]


# ----------------------------------------------------------------------------
# bytes and the bandwidth floor

def kernel_bytes(B: int, T: int, dtype: torch.dtype, mode: str, *, mask_bytes: int = 1,
                 ref: bool = False) -> int:
    """Bytes the fused kernels must move for one call in ``mode``.

    forward reads logps, old_logps, mask (and ref_logps when beta != 0) per
    token and the advantages per row; backward reads the same and writes one
    gradient per token in logps' dtype; both is the sum.
    """
    es = dtype.itemsize
    read = B * T * (2 * es + mask_bytes + (es if ref else 0)) + B * es
    write = B * T * es
    return {"fwd": read, "bwd": read + write, "both": 2 * read + write}[mode]


def per_token(dtype: torch.dtype, mode: str, ref: bool = False) -> int:
    """Bytes per token of ``mode`` (the per-row advantage left out)."""
    adv_reads = 2 if mode == "both" else 1
    return kernel_bytes(1, 1, dtype, mode, ref=ref) - dtype.itemsize * adv_reads


def floor_markdown() -> str:
    """Markdown: bytes per token per mode and dtype, and the time they imply at
    H100 and H200 HBM bandwidth for the reference shapes."""
    out = ["Bytes per token the fused kernels must move (bool mask; the per-row "
           "advantage adds one element per row):", ""]
    rows = []
    for name in ("fp32", "bf16", "fp16", "fp64"):
        dt = DTYPES[name]
        for ref in (False, True):
            rows.append([name, "yes" if ref else "no"] +
                        [str(per_token(dt, m, ref)) for m in MODES])
    out.append(C.markdown_table(["dtype", "ref_logps (beta != 0)", "fwd B/token",
                                 "bwd B/token", "both B/token"], rows, "llrrr"))
    out += ["", "Time those bytes take at HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s): "
            "the floor the CUDA kernels must approach.", ""]
    rows = []
    for B, T in FLOOR_SHAPES:
        for name in ("fp32", "bf16"):
            dt = DTYPES[name]
            for mode in MODES:
                nb = kernel_bytes(B, T, dt, mode)
                rows.append([f"{B} x {T}", name, mode, f"{nb / 1e6:.2f}"] +
                            [f"{nb / bw * 1e6:.2f}" for bw in GPU_BW.values()])
    out.append(C.markdown_table(["B x T", "dtype", "mode", "MB moved", "H100 us", "H200 us"],
                                rows, "lllrrr"))
    return "\n".join(out)


# ----------------------------------------------------------------------------
# inputs and paths

def make_inputs(B, T, dtype, device, seed=0):
    """logps (requires grad), old_logps, (B,) advantages, bool mask with zeroed
    random tails (each row keeps between T/4 and T tokens)."""
    g = torch.Generator().manual_seed(seed + 1000 * B + T)
    lp = -4.0 * torch.rand(B, T, generator=g, dtype=torch.float64) - 0.01
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # some tokens clip
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(max(T // 4, 1), T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp = lp.to(device=device, dtype=dtype).requires_grad_()
    to = dict(device=device, dtype=dtype)
    return lp, old.to(**to), adv.to(**to), mask.to(device)


class _NoOp(torch.autograd.Function):
    """Computes nothing: the cost of autograd itself (see autograd_noop)."""

    @staticmethod
    def forward(ctx, lp, grad):
        ctx.grad = grad
        return lp.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return ctx.grad, None


def loss_fns(inp, compiled_fn):
    """path -> zero-argument callable returning the loss (autograd recording)."""
    lp, old, adv, mask = inp
    noop_grad = torch.zeros_like(lp.detach())
    fns = {
        "autograd_noop": lambda: _NoOp.apply(lp, noop_grad),
        "fused": lambda: gmpo_ext.gmpo_loss(lp, old, adv, mask, epsilon_low=EPS),
        "eager": lambda: gmpo_eager(lp, old, adv, mask, EPS, EPS),
        "grpo_eager": lambda: grpo_loss_reference(lp, old, adv, mask, epsilon_low=GRPO_EPS,
                                                  dtype=lp.dtype)[0],
        "grpo_fused": lambda: gmpo_ext.grpo_loss(lp, old, adv, mask, epsilon_low=GRPO_EPS),
    }
    if compiled_fn is not None:
        fns["compiled"] = lambda: compiled_fn(lp, old, adv, mask, EPS, EPS)
    return fns


def mode_fn(loss_fn, lp, mode):
    """(timed callable, untimed setup or None) for ``mode``. bwd: each timed
    backward gets a fresh forward from setup (no retain_graph, so every path
    runs exactly the backward it runs in training)."""
    if mode == "fwd":
        return loss_fn, None
    if mode == "both":
        return (lambda: torch.autograd.grad(loss_fn(), lp)), None
    return (lambda loss: torch.autograd.grad(loss, lp)), loss_fn


def raw_c_fn(inp, mode, one_pass=False):
    """The GMPO kernels called through gmpo_ext._C on preallocated buffers.

    Uses gmpo_ext._backend's private argument builder: a diagnostic path, so
    a change there skips it with a message rather than breaking the run.
    """
    lp, old, adv, mask = (t.detach() for t in inp)
    B, T = lp.shape
    dev = lp.device
    mod, code, stream = _backend.backend(dev)
    out_dtype = torch.float64 if lp.dtype == torch.float64 else torch.float32
    rows = torch.empty((B + 1, _backend.ROW_STATS), dtype=torch.float64, device=dev)
    loss = torch.empty((), dtype=out_dtype, device=dev)
    metrics = torch.empty((_backend.METRICS,), dtype=out_dtype, device=dev)
    grad = torch.empty_like(lp)
    go = torch.ones((), dtype=out_dtype, device=dev)
    (algo, B, T, *rest), keep = _backend._args(
        _backend.ALGO_GMPO, lp, old, adv, mask, None, None, _backend.CONVENTIONS["trl"], 0,
        EPS, EPS, 0.0, 0.0, 1.0, 0.0)
    buf = _backend.buf
    fwd_args = (algo, code, stream, B, T, *rest, buf(rows), buf(loss), buf(metrics),
                _backend.DTYPE_CODES[out_dtype])
    bwd_args = (algo, code, stream, B, T, *rest, buf(rows), buf(go),
                _backend.DTYPE_CODES[go.dtype], buf(grad), _backend.DTYPE_CODES[grad.dtype])
    fwd, bwd = mod.forward, mod.backward
    if one_pass:
        if mode != "both" or not _backend.fuses(dev):
            raise ValueError("the one-pass call exists in mode both on the CPU only")
        one_pass = mod.forward_backward
    fb_args = fwd_args + (buf(grad), _backend.DTYPE_CODES[grad.dtype])
    hold = (keep, rows, loss, metrics, grad, go, lp, old, adv, mask)

    def f():
        fwd(*fwd_args)

    def b():
        bwd(*bwd_args)

    def fb():
        if one_pass:   # what the eager path runs on the CPU: one pass
            one_pass(*fb_args)
        else:
            fwd(*fwd_args)
            bwd(*bwd_args)

    f()  # rows for the backward
    fn = {"fwd": f, "bwd": b, "both": fb}[mode]
    fn.hold = hold
    return fn


def check_agreement(inp, compiled_fn, dtype):
    """Warn when the paths disagree on the loss (a benchmark of a wrong answer is void)."""
    fns = loss_fns(inp, compiled_fn)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)
    with torch.no_grad():
        pairs = [("fused", "eager"), ("grpo_fused", "grpo_eager")]
        if compiled_fn is not None:
            pairs.append(("compiled", "eager"))
        for a, b in pairs:
            try:
                x, y = float(fns[a]()), float(fns[b]())
            except Exception as e:
                print(f"# {a} vs {b}: not compared ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            if not math.isclose(x, y, rel_tol=tol, abs_tol=tol):
                print(f"WARNING: {a} loss {x:.7g} != {b} loss {y:.7g} (tolerance {tol:g})",
                      file=sys.stderr)


# ----------------------------------------------------------------------------
# the run

def make_compiled():
    """torch.compile of the eager formula, shape-specialised; each shape compiles
    once (the recompile limit is raised so no shape silently falls back to eager)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    return torch.compile(gmpo_eager, dynamic=False)


def run(args, device, meta) -> list[dict]:
    dtype = DTYPES[args.dtype]
    shapes = args.shapes or (QUICK if args.quick else GRID)
    paths = [p for p in args.paths if not (p == "compiled" and args.no_compile)]
    state = {"paths": paths, "compiled": make_compiled() if "compiled" in paths else None}
    print(C.fixed_row(HEADER, WIDTHS), flush=True)
    rows = []
    for B, T in shapes:
        best = None
        for attempt in range(1 + args.retry_busy):
            if args.wait_idle:
                C.wait_until_quiet(args.wait_idle)
            with C.BusyMonitor() as mon:
                got = run_shape(B, T, dtype, device, args, meta, state)
            others = mon.others if mon.others == mon.others else 0.0  # NaN: unknown
            for r in got:
                r["others_busy"] = mon.others
            if best is None or others < best[0]:
                best = (others, got)
            if others <= BUSY_LIMIT:
                break
            print(f"# WARNING: {B}x{T}: other processes kept {100 * others:.0f}% of the "
                  "cores busy during the measurement: disturbed"
                  + ("; measuring again" if attempt < args.retry_busy else ""),
                  file=sys.stderr, flush=True)
        if len(best[1]) and best[1] is not got:
            print(f"# {B}x{T}: keeping the least disturbed attempt "
                  f"({100 * best[0]:.0f}% busy)", flush=True)
        rows += best[1]
    return rows


def run_shape(B, T, dtype, device, args, meta, state) -> list[dict]:
    """Every mode and path at one shape: rows for the CSV."""
    paths, compiled_fn = state["paths"], state["compiled"]
    inp = make_inputs(B, T, dtype, device, args.seed)
    lp = inp[0]
    if compiled_fn is not None:
        t0 = time.perf_counter()
        try:
            torch.autograd.grad(compiled_fn(*inp, EPS, EPS), lp)  # compile fwd + bwd once
            C.synchronizer(device)()
            print(f"# {B}x{T}: torch.compile took {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:
            print(f"# torch.compile failed ({type(e).__name__}: {e}); the compiled path "
                  "is skipped", file=sys.stderr, flush=True)
            paths.remove("compiled")
            state["compiled"] = compiled_fn = None
    check_agreement(inp, compiled_fn, dtype)
    fns = loss_fns(inp, compiled_fn)
    rows = []
    for mode in args.modes:
        nb = kernel_bytes(B, T, dtype, mode)
        memcpy = C.memcpy_fn(nb, device)
        mc_s = C.measure_stats(memcpy, device, min_time=args.min_time,
                               min_repeats=args.repeats)[0]
        times = {}
        for path in paths:
            if path == "fused_C1" and (mode != "both" or not _backend.fuses(device)):
                continue   # the one-pass call: mode both, CPU only
            fn = None
            try:
                fn, setup = ((raw_c_fn(inp, mode, path == "fused_C1"), None)
                             if path in ("fused_C", "fused_C1") else mode_fn(fns[path], lp, mode))
                times[path] = C.measure_stats(fn, device, setup=setup, min_time=args.min_time,
                                        min_repeats=args.repeats)
            except Exception as e:  # a path that cannot run here is reported, not fatal
                print(f"# {B}x{T} {mode} {path}: skipped ({type(e).__name__}: {e})",
                      file=sys.stderr, flush=True)
            del fn
        # memcpy again after the paths; the faster of the two (the stricter bar)
        mc_s = min(mc_s, C.measure_stats(memcpy, device, min_time=args.min_time,
                                   min_repeats=args.repeats)[0])
        mc_gbps = C.memcpy_gbps(nb, mc_s)
        del memcpy
        for path, (sec, fastest, reps) in times.items():
            base = times.get(BASELINE[path])
            r = dict(meta, B=B, T=T, tokens=B * T, dtype=args.dtype, mode=mode, path=path,
                     median_ms=sec * 1e3, min_ms=fastest * 1e3, repeats=reps, bytes=nb,
                     gbps=C.gbps(nb, sec), memcpy_ms=mc_s * 1e3, memcpy_gbps=mc_gbps,
                     frac_of_memcpy=C.gbps(nb, sec) / mc_gbps, baseline=BASELINE[path],
                     speedup_vs_eager=(base[0] / sec) if base else float("nan"))
            rows.append(r)
            print(C.fixed_row(fmt_row(r), WIDTHS), flush=True)
    return rows


HEADER = ["B", "T", "mode", "path", "ms", "GB/s", "memcpy GB/s", "of memcpy", "speedup"]
WIDTHS = [3, 6, 5, 11, 9, 7, 11, 9, 22]


def fmt_row(r):
    return [str(r["B"]), str(r["T"]), r["mode"], r["path"], f"{r['median_ms']:.3f}",
            f"{r['gbps']:.2f}", f"{r['memcpy_gbps']:.1f}", f"{100 * r['frac_of_memcpy']:.1f}%",
            f"{r['speedup_vs_eager']:.2f}x vs {r['baseline']}"]


def load_csv(path: Path) -> list[dict]:
    rows = C.read_csv(path)
    for r in rows:
        for k in ("threads", "B", "T", "tokens", "repeats", "bytes"):
            r[k] = int(r[k])
        for k in ("median_ms", "min_ms", "gbps", "memcpy_ms", "memcpy_gbps", "frac_of_memcpy",
                  "speedup_vs_eager", "others_busy"):
            r[k] = float(r[k])
    return rows


# ----------------------------------------------------------------------------
# plot and README

def plot(rows, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no plot", file=sys.stderr)
        return
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.4), squeeze=False)
    r0 = rows[0]
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        for p in PATHS:
            pts = sorted((r["tokens"], r["median_ms"]) for r in sel if r["path"] == p)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=p)
        mc = sorted({(r["tokens"], r["memcpy_ms"]) for r in sel})
        ax.plot(*zip(*mc), "k--", marker="x", ms=4, lw=1, label="memcpy (same bytes)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens (B x T)")
        ax.set_ylabel("median ms per call")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"gmpo_ext {r0['gmpo_ext']} loss, {r0['dtype']}, {r0['device_name']}, "
                 f"{r0['threads']} threads, torch {r0['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_table(rows) -> str | None:
    sel = [r for r in rows if r["dtype"] == "fp32" and r["mode"] == "both"]
    if not sel:
        return None
    by = {(r["B"], r["T"], r["path"]): r for r in sel}
    shapes = sorted({(r["B"], r["T"]) for r in sel}, key=lambda s: (s[0] * s[1], s))
    ms = lambda B, T, p: f"{by[(B, T, p)]['median_ms']:.3f}" if (B, T, p) in by else "-"

    def kfrac(B, T):
        k = by.get((B, T, "fused_C"))
        return f"{100 * k['frac_of_memcpy']:.1f}%" if k else "-"

    body = []
    for B, T in shapes:
        f = by.get((B, T, "fused"))
        body.append([f"{B} x {T}", ms(B, T, "fused"), ms(B, T, "eager"), ms(B, T, "compiled"),
                     ms(B, T, "grpo_eager"),
                     f"{f['speedup_vs_eager']:.1f}x" if f else "-",
                     f"{f['gbps']:.2f}" if f else "-",
                     f"{f['memcpy_gbps']:.1f}" if f else "-",
                     f"{100 * f['frac_of_memcpy']:.1f}%" if f else "-",
                     ms(B, T, "fused_C"), kfrac(B, T), ms(B, T, "fused_C1"),
                     ms(B, T, "autograd_noop")])
    r0 = sel[0]
    head = (f"fp32, forward + backward, median ms per call on {r0['device_name']} "
            f"({r0['device']}, {r0['threads']} threads), torch {r0['torch']}, gmpo_ext "
            f"{r0['gmpo_ext']}" + (f" (git {r0['git']})" if r0.get("git") else "") + ". "
            "GB/s counts the bytes the fused kernels move (22 B per token); "
            "memcpy is a copy of the same bytes in the same run (read + write counted). "
            "Kernel-only: the C forward and backward calls on preallocated buffers; "
            "one pass: the single forward_backward call the eager path makes on the CPU "
            "(it moves 13 of the 22 B). Autograd no-op: an "
            "autograd.Function that computes nothing, under the same autograd.grad call: "
            "the floor of any loss called through autograd. "
            "Regenerate: `python benchmarks/bench_loss.py`, then `python tools/gen_docs.py`.")
    table = C.markdown_table(
        ["B x T", "fused ms", "eager ms", "compiled ms", "GRPO eager ms", "fused vs eager",
         "fused GB/s", "memcpy GB/s", "fused / memcpy", "kernel-only ms",
         "kernel-only / memcpy", "one-pass ms", "autograd no-op ms"], body, "lrrrrrrrrrrrr")
    return head + "\n\n" + table


def update_docs():
    """README.md and docs/ show results/bench_loss_cpu.csv (fp32): regenerate them."""
    print("# regenerating README.md and docs/ from benchmarks/results (tools/gen_docs.py; "
          "they show results/bench_loss_cpu.csv)")
    if C.regenerate_docs() != 0:
        print("WARNING: tools/gen_docs.py reported a problem (above)", file=sys.stderr)


# ----------------------------------------------------------------------------
# main

def parse_shapes(s):
    try:
        return [tuple(int(x) for x in part.lower().split("x")) for part in s.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes wants BxT[,BxT...], got {s!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK} only")
    ap.add_argument("--shapes", type=parse_shapes, help="BxT[,BxT...], e.g. 64x4096,8x1024")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                    help="comma-separated subset of fwd,bwd,both")
    ap.add_argument("--paths", type=lambda s: s.split(","), default=list(PATHS),
                    help="comma-separated subset of " + ",".join(PATHS))
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    ap.add_argument("--repeats", type=int, default=10, help="minimum timed calls (default 10)")
    ap.add_argument("--min-time", type=float, default=0.2,
                    help="seconds each measurement lasts at least (default 0.2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retry-busy", type=int, default=0, metavar="N",
                    help="measure a shape again (up to N times) when other processes kept "
                         "more than 10%% of the cores busy meanwhile; the least disturbed "
                         "attempt is kept")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each shape, wait up to this long for other processes to "
                         "leave the cores idle (shared machines)")
    ap.add_argument("--out", type=Path, default=None, help="CSV path (the PNG goes beside it)")
    ap.add_argument("--from-csv", type=Path, default=None,
                    help="take the results from this CSV instead of measuring")
    ap.add_argument("--readme", action="store_true",
                    help="then regenerate README.md and docs/ from the results CSVs "
                         "(python tools/gen_docs.py)")
    ap.add_argument("--floor", action="store_true",
                    help="print the bytes per token and the H100/H200 bandwidth floor; with "
                         "--readme also write them into benchmarks/README.md; then exit")
    args = ap.parse_args(argv)
    for m in args.modes:
        if m not in MODES:
            ap.error(f"--modes: {m!r} is not one of {', '.join(MODES)}")
    for p in args.paths:
        if p not in PATHS:
            ap.error(f"--paths: {p!r} is not one of {', '.join(PATHS)}")

    if args.floor:
        text = floor_markdown()
        print(text)
        if args.readme:
            if C.replace_between_markers(BENCH_README, FLOOR_START, FLOOR_END, text):
                print(f"# wrote the floor tables into {BENCH_README}")
            else:
                print(f"WARNING: {BENCH_README} lacks {FLOOR_START} ... {FLOOR_END}",
                      file=sys.stderr)
        return 0

    device = C.resolve_device(args.device)
    if args.from_csv is not None:
        rows = load_csv(args.from_csv)
        print(C.text_table(HEADER, [fmt_row(r) for r in rows]))
        if args.readme:
            update_docs()
        return 0

    threads = C.set_threads(args.threads)
    meta = dict(device=device.type, device_name=C.device_name(device), torch=torch.__version__,
                gmpo_ext=gmpo_ext.__version__, git=C.git_rev(), threads=threads)
    print(f"# device: {meta['device_name']} ({device}); torch {meta['torch']}; gmpo_ext "
          f"{meta['gmpo_ext']} (git {meta['git']}, CUDA build: {gmpo_ext.WITH_CUDA}); "
          f"torch threads: {threads}; "
          f"dtype: {args.dtype}; min time {args.min_time} s, >= {args.repeats} calls",
          flush=True)
    t0 = time.perf_counter()
    rows = run(args, device, meta)
    print(f"# total {time.perf_counter() - t0:.0f} s")
    if not rows:
        return 1

    suffix = ("" if args.dtype == "fp32" else f"_{args.dtype}") + ("_quick" if args.quick else "")
    out = args.out or C.RESULTS_DIR / f"bench_loss_{device.type}{suffix}.csv"
    C.write_csv(out, rows, FIELDS)
    plot(rows, out.with_suffix(".png"))
    print(f"# wrote {out} and {out.with_suffix('.png')}")
    if args.readme:
        update_docs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
