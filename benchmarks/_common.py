"""Helpers shared by the benchmark scripts: threads, device names, timing,
a memcpy baseline, CSV output and README table regeneration.

Timing: every measurement is the median of per-call times after a warm-up,
with enough calls that the measurement lasts at least ``min_time`` seconds.
CPU calls are timed with time.perf_counter; CUDA calls with a pair of CUDA
events each, synchronised once at the end (no host sync between calls).
"""

from __future__ import annotations

import csv
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------
# environment

def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (default: every core) and return the number."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def git_rev(paths=("csrc", "gmpo_ext", "setup.py")) -> str:
    """Short commit of the checkout, + "+dirty" when ``paths`` have local changes
    (the numbers may then come from uncommitted kernels); "" outside git."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=root,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return rev + ("+dirty" if dirty else "")


def resolve_device(name: str) -> torch.device:
    """torch.device for ``name``; exits with a clear message when CUDA is asked
    for but not available (never at import time)."""
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                 f"torch.version.cuda = {torch.version.cuda}); run on a machine with a GPU "
                 "and a CUDA build of torch, or use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        sys.exit(f"--device {name}: only cpu and cuda are supported")
    return dev


def _cpu_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def others_busy(interval: float = 0.5) -> float:
    """Fraction of all cores busy over ``interval`` seconds while this process
    sleeps, i.e. taken by other processes (NaN where /proc/stat is missing).
    A benchmark on a shared machine should report it: a busy core slows the
    OpenMP regions of both the fused kernels and torch."""
    try:
        b0, t0 = _cpu_ticks()
        time.sleep(interval)
        b1, t1 = _cpu_ticks()
    except (OSError, ValueError):
        return float("nan")
    return (b1 - b0) / max(t1 - t0, 1)


def _self_ticks():
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of every thread, in ticks


class BusyMonitor:
    """Context manager: ``others`` is the fraction of all cores that other
    processes kept busy while the block ran (total busy time from /proc/stat
    minus this process's own; NaN where /proc is missing)."""

    def __enter__(self):
        try:
            self._b0, self._t0 = _cpu_ticks()
            self._s0 = _self_ticks()
        except (OSError, ValueError, IndexError):
            self._b0 = None
        self.others = float("nan")
        return self

    def __exit__(self, *exc):
        if self._b0 is not None:
            try:
                b1, t1 = _cpu_ticks()
                s1 = _self_ticks()
                self.others = max(0.0, ((b1 - self._b0) - (s1 - self._s0)) / max(t1 - self._t0, 1))
            except (OSError, ValueError, IndexError):
                pass
        return False


def wait_until_quiet(max_wait: float, threshold: float = 0.1) -> float:
    """Wait up to ``max_wait`` seconds for others_busy() < threshold; return the last reading."""
    deadline = time.monotonic() + max_wait
    busy = others_busy()
    while busy >= threshold and time.monotonic() < deadline:
        busy = others_busy(2.0)
    return busy


def synchronizer(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# ----------------------------------------------------------------------------
# timing

def measure(fn, device: torch.device, **kw) -> tuple[float, int]:
    """(median seconds per call, number of timed calls); see measure_stats."""
    med, _, n = measure_stats(fn, device, **kw)
    return med, n


def measure_stats(fn, device: torch.device, *, setup=None, min_time: float = 0.2,
                  min_repeats: int = 10, max_repeats: int = 100_000,
                  warmup: int = 3) -> tuple[float, float, int]:
    """(median and fastest seconds per call, number of timed calls) of ``fn()``, or of
    ``fn(setup())`` when ``setup`` is given (setup runs before each call,
    untimed: e.g. the forward whose backward is timed).

    ``warmup`` untimed calls first (compilation, allocator and cache warm-up),
    then a short estimate of the per-call time picks the number of timed calls
    so that they last about ``min_time`` in all (at least ``min_repeats``).
    """
    sync = synchronizer(device)
    call = fn if setup is None else (lambda: fn(setup()))
    for _ in range(warmup):
        call()
    sync()
    k, t0 = 0, time.perf_counter()
    while k < 3 or (time.perf_counter() - t0 < 0.02 and k < 1000):
        call()
        k += 1
    sync()
    est = max((time.perf_counter() - t0) / k, 1e-7)  # with setup: an overestimate
    n = int(min(max(math.ceil(min_time / est), min_repeats), max_repeats))
    times = []
    if device.type == "cuda":
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(n)]
        for start, end in evs:
            x = setup() if setup is not None else None
            start.record()
            fn() if setup is None else fn(x)
            end.record()
            del x
        sync()
        times = [start.elapsed_time(end) * 1e-3 for start, end in evs]
    elif setup is None:
        pc = time.perf_counter
        for _ in range(n):
            t = pc()
            fn()
            times.append(pc() - t)
    else:
        pc = time.perf_counter
        for _ in range(n):
            x = setup()
            t = pc()
            fn(x)
            times.append(pc() - t)
            del x
    return statistics.median(times), min(times), n


def cpu_alloc_peak(fn):
    """(peak bytes, fn's result): over one call of fn, the largest amount torch's
    CPU allocator held beyond what it held before the call (torch.profiler's
    allocator events, summed in time order)."""
    import gc

    from torch.profiler import ProfilerActivity, profile
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, out


def memcpy_fn(nbytes: int, device: torch.device):
    """A copy_ of ``nbytes`` between two preallocated uint8 buffers on ``device``.

    It reads nbytes and writes nbytes: its bandwidth is counted as 2 * nbytes
    per call (the STREAM "copy" convention); see memcpy_gbps.
    """
    src = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def memcpy_gbps(nbytes: int, seconds: float) -> float:
    """Bandwidth of a copy of nbytes (read + write: 2 * nbytes moved)."""
    return 2 * nbytes / seconds / 1e9


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# ----------------------------------------------------------------------------
# output

def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def regenerate_docs() -> int:
    """Rewrite the generated blocks of README.md and docs/*.md from the CSVs in
    results/ (``python tools/gen_docs.py``); its exit status."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, str(root / "tools" / "gen_docs.py")], cwd=root).returncode


def replace_between_markers(path: Path, start: str, end: str, body: str) -> bool:
    """Replace the text between the marker lines ``start`` and ``end`` of
    ``path`` with ``body``. Returns False (and changes nothing) when the file or
    either marker is missing; markers are never created here."""
    try:
        text = path.read_text()
    except OSError:
        return False
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        return False
    new = text[: i + len(start)] + "\n" + body.rstrip("\n") + "\n" + text[j:]
    if new != text:
        path.write_text(new)
    return True


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one of l/r per column (default: r)."""
    align = align or "r" * len(header)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fixed_row(cells: list[str], widths: list[int]) -> str:
    """One right-aligned terminal table row (rows printed as they are measured)."""
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths))


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain fixed-width table for the terminal."""
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h)
              for k, h in enumerate(header)]
    fmt = "  ".join("{:>%d}" % w for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])
