"""benchmarks/gpu_check.py without a GPU: it must exit cleanly with a clear message,
and read nvidia-smi's answer right (a stand-in nvidia-smi, --dry-run: nothing is
built or run)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def run(tmp_path, *args, smi=None):
    env = {k: v for k, v in os.environ.items() if k != "GMPO_GPU_CHECK_NVIDIA_SMI"}
    if smi is not None:
        env["GMPO_GPU_CHECK_NVIDIA_SMI"] = str(smi)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    return proc, out


def fake_smi(tmp_path, body):
    p = tmp_path / "nvidia-smi"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return p


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                    reason="this machine has nvidia-smi: the no-GPU path needs a machine without one")
def test_no_gpu_here_exits_0_with_a_clear_message(tmp_path):
    proc, out = run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no NVIDIA GPU found" in proc.stdout
    assert "no NVIDIA GPU found" in (out / "summary.txt").read_text()
    # nothing was built or run
    assert not (out / "build.log").exists() and not (out / "torch.log").exists()


def test_missing_or_failing_nvidia_smi_means_no_gpu(tmp_path):
    proc, _ = run(tmp_path, smi=tmp_path / "absent" / "nvidia-smi")
    assert proc.returncode == 0 and "no NVIDIA GPU found" in proc.stdout, proc.stdout + proc.stderr
    # the driver is not loaded: nvidia-smi fails
    smi = fake_smi(tmp_path, 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with '
                             'the NVIDIA driver." >&2; exit 9')
    proc, out = run(tmp_path, smi=smi)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no NVIDIA GPU found" in proc.stdout and "exit 9" in proc.stdout
    proc, _ = run(tmp_path, "--require-gpu", smi=smi)
    assert proc.returncode == 3 and "no NVIDIA GPU found" in proc.stdout


@pytest.mark.parametrize("line, arch, hbm", [
    ("NVIDIA H200, 9.0, 570.86.15, 143771 MiB", "90", "HBM 4.80 TB/s"),
    ("NVIDIA H100 PCIe, 9.0, 550.54.15, 81559 MiB", "90", "HBM 2.00 TB/s"),
    ("NVIDIA H100 80GB HBM3, 9.0, 550.54.15, 81559 MiB", "90", "HBM 3.35 TB/s"),
    ("NVIDIA RTX PRO 6000 Blackwell, 12.0, 575.51, 97887 MiB", "120", "the measured copy"),
])
def test_dry_run_builds_for_the_gpus_own_arch(tmp_path, line, arch, hbm):
    smi = fake_smi(tmp_path, f'echo "{line}"')
    proc, out = run(tmp_path, "--dry-run", smi=smi)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"'GMPO_EXT_CUDA_ARCHS': '{arch}'" in proc.stdout
    assert hbm in proc.stdout
    assert not (out / "build.log").exists()
