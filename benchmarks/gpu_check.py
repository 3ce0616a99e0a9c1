#!/usr/bin/env python
"""One command for a machine with an NVIDIA GPU: build, test, sanitize, benchmark.

    python benchmarks/gpu_check.py                  # everything, summary in build/gpu_check/
    python benchmarks/gpu_check.py --out DIR --budget 480
    python benchmarks/gpu_check.py --dry-run        # detect the GPU, print the plan, run nothing

Steps, in this order (each with its own timeout, all within --budget seconds,
8 minutes by default; a step that would start past the budget is skipped):

  gpu          nvidia-smi --query-gpu: name, compute capability, driver, memory
  torch        the torch installed here (this script installs nothing: the GPU
               machine may have no network): its version, its CUDA, whether it
               sees the GPU. A CPU-only torch fails the steps that need CUDA tensors
  build        GMPO_EXT_CUDA=1 GMPO_EXT_CUDA_ARCHS=<the GPU's own arch>
               python setup.py build_ext --inplace, then gmpo_ext._C.WITH_CUDA == 1
               in a fresh interpreter
  bandwidth    a device-to-device copy of 1 GiB (read + write), the measured floor
  tests_cuda   python -m pytest -m cuda (the "cuda" backend of tests/conftest.py,
               added when torch.cuda.is_available())
  memcheck, racecheck, synccheck
               compute-sanitizer --tool <tool> over a short run of the loss and the
               logits ops (forward and backward, fp32 / bf16 / fp64, aligned and
               unaligned rows), when compute-sanitizer is installed (else skipped)
  bench_loss   benchmarks/bench_loss.py --device cuda --quick --no-compile, fp32
               and bf16, all three modes
  bench_logits benchmarks/bench_logits.py --device cuda (B=8, T=4096, V=151936 bf16)
  tests_rest   python -m pytest -m "not cuda": the rest of the suite (CPU and the
               SIMT emulation), so that the whole suite runs once

Summary: stdout and OUT/summary.txt (OUT/summary.json), one line per step
(PASS, FAIL, TIMEOUT, SKIP) and the achieved bandwidth of the fused kernels
against the HBM bandwidth of the GPU (H200 4.8 TB/s, H100 SXM 3.35 TB/s, H100
NVL 3.9, H100 PCIe 2.0; other GPUs: the measured copy) and against the measured
copy. Every step's output is in OUT/<step>.log.

Exit status: 0 every step passed, or no NVIDIA GPU was found (the message says
"no NVIDIA GPU found"; --require-gpu makes that 3); 1 a step failed or timed
out; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_GPU_EXIT = 3

# HBM bandwidth, bytes/s, by a substring of nvidia-smi's name (first match wins)
HBM = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
       ("GH200", 4.0e12), ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12),
       ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12)]

TIMEOUTS = {"build": 300, "bandwidth": 60, "tests_cuda": 180, "memcheck": 90, "racecheck": 90,
            "synccheck": 90, "bench_loss": 150, "bench_logits": 150, "tests_rest": 300}

SANITIZE_RUN = r'''
# short run of every CUDA kernel of gmpo_ext for compute-sanitizer
import torch, gmpo_ext
dev = torch.device("cuda")
g = torch.Generator(device="cpu").manual_seed(0)
def rnd(*s): return torch.randn(*s, generator=g)
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for B, T in ((3, 37), (2, 1030)):   # odd lengths: scalar heads and tails
        full = (-2 + rnd(B, T + 1)).to(dtype)
        for lp0 in (full[:, :T], full[:, 1:]):   # 16-byte aligned rows and not
            lp = lp0.to(dev, copy=True).requires_grad_(True)
            old = (lp0.float() + 0.3 * rnd(B, T)).to(dtype).to(dev)
            mask = (torch.rand(B, T, generator=g) > 0.2).to(dev)
            for adv, extra in ((rnd(B), {}),
                               (rnd(B, T), dict(beta=0.1, ref_logps=(lp0.float() + 0.1).to(dtype).to(dev))),
                               (rnd(B), dict(convention="verl", is_weights=rnd(B, T).abs().to(dev)))):
                loss = gmpo_ext.gmpo_loss(lp, old, adv.to(dev), mask, **extra)
                (grad,) = torch.autograd.grad(loss, lp)
for dtype in (torch.float32, torch.bfloat16):
    B, T, V = 2, 33, 1000
    for inplace in (False, True):
        logits = (2 * rnd(B, T + 1, V)).to(dtype).to(dev).requires_grad_(True)
        ids = torch.randint(0, V, (B, T), generator=g).to(dev)
        old = (-5 + 0.1 * rnd(B, T)).to(dev)
        mask = (torch.rand(B, T, generator=g) > 0.2).to(dev)
        loss = gmpo_ext.gmpo_loss_from_logits(logits, ids, old, rnd(B).to(dev), mask,
                                              temperature=0.7, inplace_backward=inplace)
        (grad,) = torch.autograd.grad(loss, logits)
torch.cuda.synchronize()
print("sanitize run: done")
'''

BANDWIDTH_RUN = r'''
import torch
n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
best = float("inf")
for _ in range(10):
    s.record(); b.copy_(a); e.record(); e.synchronize(); best = min(best, s.elapsed_time(e) / 1e3)
print(f"COPY_GBPS {2 * n / best / 1e9:.1f}")
'''


class Check:
    def __init__(self, out: Path, budget: float):
        self.out = out
        self.deadline = time.monotonic() + budget
        self.steps: list[dict] = []
        self.info: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, name, status, seconds=0.0, note="", log=None):
        self.steps.append(dict(step=name, status=status, seconds=round(seconds, 1), note=note,
                               log=str(log) if log else ""))
        print(f"gpu_check: {name:13s} {status:7s} {seconds:6.1f} s  {note}", flush=True)

    def run(self, name, cmd, env=None, timeout=None, note_fn=None, ok_fn=None):
        """Run one step; returns its PASS/FAIL/TIMEOUT/SKIP status and its output."""
        timeout = min(timeout or TIMEOUTS.get(name, 120), self.left())
        if timeout < 5:
            self.record(name, "SKIP", note="out of time (--budget)")
            return "SKIP", ""
        log = self.out / f"{name}.log"
        t0 = time.monotonic()
        # its own process group, so that a timeout also ends what the step started
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
            status = "PASS" if (ok_fn(rc, text) if ok_fn else rc == 0) else "FAIL"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            text, _ = proc.communicate()
            rc, status = None, "TIMEOUT"
        log.write_text(f"$ {' '.join(map(str, cmd))}\n# timeout {timeout:.0f} s, exit {rc}\n{text}")
        note = note_fn(rc, text) if note_fn else ""
        if status != "PASS" and not note:
            tail = [l for l in text.strip().splitlines() if l.strip()][-1:] or [""]
            note = f"exit {rc}: {tail[0][:150]}"
        self.record(name, status, time.monotonic() - t0, note, log)
        return status, text


def query_gpus(smi: str | None):
    """[(name, compute_cap, driver, memory)] from nvidia-smi, or (None, why)."""
    if not smi:
        return None, "nvidia-smi not found"
    try:
        proc = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version,memory.total",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"nvidia-smi failed: {e}"
    if proc.returncode != 0:
        why = (proc.stdout + proc.stderr).strip().splitlines()
        return None, f"nvidia-smi exit {proc.returncode}: {why[0] if why else ''}"
    gpus = []
    for line in proc.stdout.splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) >= 2 and f[0] and f[1].replace(".", "").isdigit():
            gpus.append((f[0], f[1], f[2] if len(f) > 2 else "", f[3] if len(f) > 3 else ""))
    if not gpus:
        return None, "nvidia-smi lists no GPU"
    return gpus, ""


def hbm_of(name: str):
    for key, bw in HBM:
        if key.lower() in name.lower():
            return key, bw
    return None, None


def find_sanitizer():
    cands = [os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands += [f"{home}/bin/compute-sanitizer", f"{home}/compute-sanitizer/compute-sanitizer"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent / "compute-sanitizer"))
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def read_csv(path: Path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "gpu_check",
                    help="folder for summary.txt, summary.json and the step logs")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all steps (480)")
    ap.add_argument("--dry-run", action="store_true",
                    help="detect the GPU and print the plan; build and run nothing")
    ap.add_argument("--require-gpu", action="store_true",
                    help=f"exit {NO_GPU_EXIT} (not 0) when no NVIDIA GPU is found")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.out.mkdir(parents=True, exist_ok=True)
    chk = Check(args.out, args.budget)
    py = sys.executable

    smi = os.environ.get("GMPO_GPU_CHECK_NVIDIA_SMI") or shutil.which("nvidia-smi")
    gpus, why = query_gpus(smi)
    if gpus is None:
        msg = f"gpu_check: no NVIDIA GPU found ({why}); nothing to check"
        print(msg)
        (args.out / "summary.txt").write_text(msg + "\n")
        (args.out / "summary.json").write_text(json.dumps({"gpu": None, "reason": why}) + "\n")
        return NO_GPU_EXIT if args.require_gpu else 0

    name, cap, driver, mem = gpus[0]
    archs = ";".join(sorted({c.replace(".", "") for _, c, _, _ in gpus}, key=int))
    hbm_key, hbm = hbm_of(name)
    chk.info.update(gpu=name, compute_cap=cap, archs=archs, driver=driver, memory=mem,
                    gpus=len(gpus), hbm_tbps=hbm / 1e12 if hbm else None)
    chk.record("gpu", "PASS", note=f"{len(gpus)} x {name}, sm_{cap.replace('.', '')}, driver "
                                   f"{driver}, {mem}; HBM "
                                   + (f"{hbm / 1e12:.2f} TB/s ({hbm_key})" if hbm else "unknown: "
                                      "the measured copy is the floor"))
    sanitizer = find_sanitizer()
    build_env = {"GMPO_EXT_CUDA": "1", "GMPO_EXT_CUDA_ARCHS": archs}
    if args.dry_run:
        print(f"gpu_check: plan: build with {build_env}; pytest -m cuda; compute-sanitizer "
              f"{sanitizer or '(not found: skipped)'}; bench_loss, bench_logits; pytest -m 'not cuda'")
        return 0

    # torch: what is installed here (nothing is installed by this script)
    def torch_fields(text):
        return next((l.split()[1:] for l in text.splitlines() if l.startswith("TORCH ")), [])

    def torch_note(rc, text):
        f = torch_fields(text)
        if len(f) != 4:
            return ""
        return (f"torch {f[0]} (CUDA {f[1]}), the one installed here; "
                + (f"sees {f[3]} GPU(s)" if f[2] == "True" else
                   "does NOT see the GPU (a CPU-only torch, or a driver too old for its CUDA)"))
    _, text = chk.run("torch", [py, "-c", "import torch; print('TORCH', torch.__version__, "
                                "torch.version.cuda, torch.cuda.is_available(), "
                                "torch.cuda.device_count())"], timeout=120,
                      ok_fn=lambda rc, t: rc == 0 and torch_fields(t)[2:3] == ["True"],
                      note_fn=torch_note)
    fields = torch_fields(text)
    torch_cuda = len(fields) == 4 and fields[2] == "True"
    chk.info.update(torch=fields[0] if fields else None, torch_cuda=fields[1] if fields else None,
                    torch_sees_gpu=torch_cuda)

    built = False
    if "build" not in skip:
        status, _ = chk.run("build", [py, "setup.py", "build_ext", "--inplace"], env=build_env)
        if status == "PASS":
            status, _ = chk.run("build_import", [py, "-c", "import gmpo_ext._C as C; "
                                                 "assert C.WITH_CUDA == 1, 'built without CUDA'; "
                                                 "print('WITH_CUDA', C.WITH_CUDA)"], timeout=60)
        built = status == "PASS"
    else:
        chk.record("build", "SKIP", note="--skip build: the module as it is")
        built = True
    ready = built and torch_cuda
    need = "needs the CUDA build and a torch that sees the GPU"

    copy_gbps = None
    if ready and "bandwidth" not in skip:
        (args.out / "bandwidth_run.py").write_text(BANDWIDTH_RUN)
        status, text = chk.run("bandwidth", [py, str(args.out / "bandwidth_run.py")])
        for l in text.splitlines():
            if l.startswith("COPY_GBPS"):
                copy_gbps = float(l.split()[1])
                chk.steps[-1]["note"] = f"device copy {copy_gbps:.0f} GB/s (read + write)"
    chk.info["copy_gbps"] = copy_gbps

    pytest_ok = lambda rc, t: rc == 0  # noqa: E731

    def pytest_note(rc, text):
        last = [l for l in text.strip().splitlines() if l.strip()]
        return last[-1][:200] if last else ""

    for step, marker in (("tests_cuda", "cuda"),):
        if step in skip:
            chk.record(step, "SKIP", note="--skip")
        elif not ready:
            chk.record(step, "FAIL", note=need)
        else:
            chk.run(step, [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker],
                    note_fn=pytest_note, ok_fn=pytest_ok)

    (args.out / "sanitize_run.py").write_text(SANITIZE_RUN)
    for tool in ("memcheck", "racecheck", "synccheck"):
        if tool in skip:
            chk.record(tool, "SKIP", note="--skip")
        elif not sanitizer:
            chk.record(tool, "SKIP", note="compute-sanitizer not installed")
        elif not ready:
            chk.record(tool, "FAIL", note=need)
        else:
            def ok(rc, text):
                return rc == 0 and "ERROR SUMMARY: 0 errors" in text and "sanitize run: done" in text

            def note(rc, text):
                summ = [l for l in text.splitlines() if "ERROR SUMMARY" in l or "RACECHECK SUMMARY" in l]
                return summ[-1].replace("=========", "").strip() if summ else ""
            chk.run(tool, [sanitizer, "--tool", tool, "--error-exitcode", "1", py,
                           str(args.out / "sanitize_run.py")], ok_fn=ok, note_fn=note)

    bw_rows = []
    floor = hbm or (copy_gbps * 1e9 if copy_gbps else None)
    floor_name = f"HBM {hbm / 1e12:.2f} TB/s" if hbm else "measured copy"
    if "bench_loss" in skip:
        chk.record("bench_loss", "SKIP", note="--skip")
    elif not ready:
        chk.record("bench_loss", "FAIL", note=need)
    else:
        results = []
        for dt in ("fp32", "bf16"):
            csv_path = args.out / f"bench_loss_cuda_{dt}.csv"
            status, _ = chk.run(f"bench_loss_{dt}",
                                [py, "benchmarks/bench_loss.py", "--device", "cuda", "--quick",
                                 "--no-compile", "--dtype", dt, "--out", str(csv_path)],
                                timeout=TIMEOUTS["bench_loss"] / 2)
            results.append(status)
            for r in read_csv(csv_path):
                if r.get("path") in ("fused", "fused_C") and r.get("gbps"):
                    bw_rows.append((f"loss {dt} {r['B']}x{r['T']} {r['mode']} {r['path']}",
                                    float(r["gbps"]), float(r.get("memcpy_gbps") or 0)))
    if "bench_logits" in skip:
        chk.record("bench_logits", "SKIP", note="--skip")
    elif not ready:
        chk.record("bench_logits", "FAIL", note=need)
    else:
        csv_path = args.out / "bench_logits_cuda.csv"
        chk.run("bench_logits", [py, "benchmarks/bench_logits.py", "--device", "cuda",
                                 "--out", str(csv_path)])
        for r in read_csv(csv_path):
            if r.get("path") in ("fused", "fused_inplace") and r.get("median_ms"):
                # three passes over the logits: read (forward), read + write (backward)
                gbps = 3 * int(r["logits_bytes"]) / (float(r["median_ms"]) / 1e3) / 1e9
                bw_rows.append((f"logits {r['dtype']} {r['B']}x{r['T']}x{r['V']} fwd+bwd "
                                f"{r['path']} ({float(r['median_ms']):.2f} ms, floor H200 "
                                f"{r['floor_h200_ms']} / H100 {r['floor_h100_ms']} ms)", gbps, 0.0))

    if "tests_rest" in skip:
        chk.record("tests_rest", "SKIP", note="--skip")
    else:
        chk.run("tests_rest", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda"],
                note_fn=pytest_note, ok_fn=pytest_ok)

    # summary
    lines = [f"gpu_check summary ({time.strftime('%Y-%m-%d %H:%M:%S')})",
             f"GPU: {len(gpus)} x {name}, compute capability {cap}, driver {driver}, {mem}",
             f"torch: {chk.info.get('torch')} (CUDA {chk.info.get('torch_cuda')}), the one "
             f"installed in this environment; sees the GPU: {chk.info.get('torch_sees_gpu')}",
             f"built for: sm_{archs.replace(';', ', sm_')}",
             f"bandwidth floor: {floor_name}"
             + (f"; measured device copy {copy_gbps:.0f} GB/s" if copy_gbps else ""), "",
             f"{'step':14s} {'status':7s} {'seconds':>8s}  note"]
    for s in chk.steps:
        lines.append(f"{s['step']:14s} {s['status']:7s} {s['seconds']:8.1f}  {s['note']}")
    if bw_rows:
        lines += ["", f"achieved bandwidth (GB/s; % of {floor_name}"
                      + ("; % of the copy" if copy_gbps else "") + ")"]
        for what, gbps, _ in bw_rows:
            pct = f"{100 * gbps * 1e9 / floor:5.1f} %" if floor else "  n/a"
            pc = f"  {100 * gbps / copy_gbps:5.1f} % of copy" if copy_gbps else ""
            lines.append(f"  {gbps:8.1f}  {pct}{pc}  {what}")
    failed = [s["step"] for s in chk.steps if s["status"] in ("FAIL", "TIMEOUT")]
    lines += ["", "RESULT: " + ("PASS" if not failed else "FAIL (" + ", ".join(failed) + ")")
              + f"; logs in {args.out}"]
    text = "\n".join(lines) + "\n"
    (args.out / "summary.txt").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(
        {"info": chk.info, "steps": chk.steps,
         "bandwidth": [dict(what=w, gbps=g) for w, g, _ in bw_rows], "failed": failed},
        indent=1) + "\n")
    print()
    print(text, end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
