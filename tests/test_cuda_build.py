"""Static checks of the CUDA kernels with nvcc (no GPU needed): .ci/nvcc_check.sh
compiles every csrc/cuda/*.cu with setup.py's own nvcc flags for every
architecture of setup.py's DEFAULT_ARCHS, with ptxas' spill and local-memory
warnings and all warnings as errors. These tests run it, read its report and
search the PTX it writes.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPT = REPO / ".ci" / "nvcc_check.sh"


def _setup_nvcc_config():
    """(nvcc flags, architectures) as setup.py builds with them."""
    out = subprocess.run([sys.executable, "setup.py", "--print-nvcc-flags"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    flags, archs = out.splitlines()
    return flags.split(), ["sm_" + a for a in archs.split()]


SETUP_FLAGS, ARCHS = _setup_nvcc_config()


def _nvcc():
    explicit = os.environ.get("GMPO_EXT_NVCC")
    home = os.environ.get("CUDA_HOME")
    if explicit:
        return explicit
    if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
        return str(pathlib.Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


if _nvcc() is None:
    pytest.skip("nvcc not found (set CUDA_HOME or GMPO_EXT_NVCC): the static CUDA checks need it",
                allow_module_level=True)


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """(exit status, report, output dir) of one run of .ci/nvcc_check.sh."""
    out = tmp_path_factory.mktemp("nvcc_check")
    env = {k: v for k, v in os.environ.items() if k != "ARCHS"}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True,
                          env={**env, "NVCC": _nvcc(), "PYTHON": sys.executable}, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr, out


def kernels(report):
    """{(arch, kernel): (regs, spill stores, spill loads, stack)} from the report table."""
    rows = {}
    for line in report.splitlines():
        m = re.match(r"(sm_\d+)\s+(.+?)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", line)
        if m:
            rows[(m.group(1), m.group(2))] = tuple(int(m.group(k)) for k in (3, 4, 5, 6))
    return rows


LOSS_KERNELS = ["gmpo_fwd_rows_kernel<float, 4>", "gmpo_fwd_rows_kernel<double, 2>",
                "gmpo_fwd_totals_kernel", "gmpo_bwd_kernel<float, 4>", "gmpo_bwd_kernel<double, 2>"]


def test_the_check_uses_setup_pys_flags_and_architectures(check):
    _, report, _ = check
    assert ARCHS and all(re.fullmatch(r"sm_\d+", a) for a in ARCHS), ARCHS
    m = re.search(r"nvcc_check: flags (.*?) -I \S+; archs (.*)", report)
    assert m, report
    assert m.group(1).split() == SETUP_FLAGS
    assert ["sm_" + a for a in m.group(2).split()] == ARCHS
    # setup.py builds without fast math; so must the check
    assert "--use_fast_math" not in SETUP_FLAGS


def test_every_kernel_compiles_without_spills_or_warnings(check):
    rc, report, _ = check
    assert rc == 0, report
    rows = kernels(report)
    for arch in ARCHS:
        for k in LOSS_KERNELS:
            assert (arch, k) in rows, f"{k} missing for {arch} in the report:\n{report}"
        assert any(k.startswith("lg_fwd_kernel") for a, k in rows if a == arch), report
        assert any(k.startswith("lg_bwd_kernel") for a, k in rows if a == arch), report
    for (arch, k), (regs, st, ld, stack) in rows.items():
        assert st == 0 and ld == 0 and stack == 0, f"{k} on {arch}: spills or stack\n{report}"
        assert 0 < regs <= 255
    # the fp32 kernels fit 1024 resident threads per SM (<= 64 registers)
    for arch in ARCHS:
        for k in LOSS_KERNELS:
            if "double" not in k:
                assert rows[(arch, k)][0] <= 64, f"{k} on {arch} uses {rows[(arch, k)][0]} registers"


def _ptx_entries(path):
    """{mangled entry name: its PTX body}"""
    text = path.read_text()
    parts = re.split(r"\n\.(?:visible|weak) \.entry ", text)
    return {p.split("(", 1)[0].strip(): p for p in parts[1:]}


@pytest.mark.parametrize("arch", ARCHS)
def test_reductions_use_warp_shuffles_not_atomics(check, arch):
    _, report, out = check
    entries = _ptx_entries(out / f"gmpo_loss.{arch}.ptx")
    fwd = {k: v for k, v in entries.items() if "gmpo_fwd" in k}
    assert len(fwd) == 3, sorted(entries)
    for name, body in fwd.items():
        assert "shfl.sync.bfly" in body, f"{name}: no warp shuffle in its reduction"
    for name, body in entries.items():
        # deterministic: no atomics anywhere in the loss kernels
        assert not re.search(r"^\s*(@%p\d+\s+)?(atom|red)\.", body, re.M), f"{name} uses atomics"


@pytest.mark.parametrize("arch", ARCHS)
def test_contiguous_rows_take_16_byte_loads(check, arch):
    _, _, out = check
    entries = _ptx_entries(out / f"gmpo_loss.{arch}.ptx")
    for name, body in entries.items():
        if "fwd_rows" in name or "bwd_kernel" in name:
            assert re.search(r"ld\.global\.nc\.v4\.(u32|b32)", body), f"{name}: no 16-byte loads"
        if "bwd_kernel" in name:
            assert re.search(r"st\.global\.v4\.(u32|b32|f32)", body), f"{name}: no 16-byte stores"


def test_a_spilling_kernel_fails_the_check(tmp_path):
    # the check must be able to fail: 64 live floats in 32 registers
    src = tmp_path / "spill.cu"
    src.write_text(
        "__global__ void __launch_bounds__(1024, 2) spill(const float* p, float* q) {\n"
        "  float v[64];\n"
        "#pragma unroll\n"
        "  for (int k = 0; k < 64; k++) v[k] = p[threadIdx.x + 1024 * k];\n"
        "  float s = 0.f;\n"
        "#pragma unroll\n"
        "  for (int k = 0; k < 64; k++) s += v[k] * v[63 - k] + v[(k * 7) % 64];\n"
        "  q[threadIdx.x] = s;\n"
        "}\n")
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "NVCC": _nvcc(), "PYTHON": sys.executable, "CU_SOURCES": str(src),
                               "ARCHS": "90"},
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "spill" in (proc.stdout + proc.stderr).lower()
