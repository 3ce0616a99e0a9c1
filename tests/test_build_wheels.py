"""tools/build_wheels.sh's choices that need no toolkit and no download: which
CUDA architectures a flavour is built for with a given nvcc (--print-archs,
against stand-in nvcc scripts), and tools/glibc_link.sh's check of the linked
module's symbol versions (with the host's gcc standing in for zig). Each case
runs a shell script for well under a second.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_WHEELS = REPO / "tools" / "build_wheels.sh"
GLIBC_LINK = REPO / "tools" / "glibc_link.sh"

if not sys.platform.startswith("linux") or shutil.which("bash") is None:
    pytest.skip("the release scripts are bash scripts for Linux", allow_module_level=True)


def _default_archs():
    out = subprocess.run([sys.executable, "setup.py", "--print-nvcc-flags"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return out.splitlines()[1].split()


DEFAULT_ARCHS = _default_archs()


def fake_nvcc(tmp_path, release, archs):
    """An nvcc stand-in: --version names the release, --list-gpu-arch lists archs."""
    path = tmp_path / f"nvcc-{release}"
    listing = "".join(f"echo compute_{a}\n" for a in archs)
    path.write_text("#!/bin/sh\ncase \"$1\" in\n"
                    f"--version) echo 'Cuda compilation tools, release {release}, V{release}.0' ;;\n"
                    f"--list-gpu-arch)\n{listing};;\nesac\n")
    path.chmod(0o755)
    return path


def print_archs(flavour, nvcc, archs_env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("ARCHS", "NVCC_CU12", "NVCC_CU13")}
    env.update({f"NVCC_CU{flavour[2:]}": str(nvcc), "PYTHON": sys.executable})
    if archs_env is not None:
        env["ARCHS"] = archs_env
    return subprocess.run(["bash", str(BUILD_WHEELS), "--print-archs", flavour], capture_output=True,
                          text=True, env=env, timeout=120)


OLD = ["50", "52", "60", "61", "70", "75", "80", "86", "87", "89", "90"]


def test_cu12_with_a_12_4_nvcc_drops_only_the_newest(tmp_path):
    p = print_archs("cu12", fake_nvcc(tmp_path, "12.4", OLD))
    assert p.returncode == 0, p.stderr
    kept = [a for a in DEFAULT_ARCHS if a in OLD]
    dropped = [a for a in DEFAULT_ARCHS if a not in OLD]
    assert p.stdout.strip() == ";".join(kept)
    newest = max(kept, key=int)
    assert all(f"sm_{a}" in p.stderr for a in dropped), p.stderr
    assert f"PTX for compute_{newest}" in p.stderr, p.stderr


def test_cu12_with_a_toolkit_that_has_them_all(tmp_path):
    p = print_archs("cu12", fake_nvcc(tmp_path, "12.8", OLD + DEFAULT_ARCHS + ["101"]))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ";".join(DEFAULT_ARCHS)


def test_cu12_refuses_a_gap_below_the_newest(tmp_path):
    # an nvcc without sm_86 but with sm_90 is not merely old: refuse, ask for ARCHS
    p = print_archs("cu12", fake_nvcc(tmp_path, "12.4", [a for a in OLD if a != "86"]))
    assert p.returncode == 1 and p.stdout.strip() == "", p.stdout + p.stderr
    assert "sm_86" in p.stderr and "ARCHS" in p.stderr


def test_archs_given_are_taken_as_they_are(tmp_path):
    p = print_archs("cu12", fake_nvcc(tmp_path, "12.4", OLD), archs_env="80;90")
    assert p.returncode == 0 and p.stdout.strip() == "80;90", p.stdout + p.stderr


def test_cu13_asks_for_every_default_arch(tmp_path):
    # cu13 never drops one: setup.py (GMPO_EXT_CUDA_STRICT_ARCHS=1) then fails the build
    p = print_archs("cu13", fake_nvcc(tmp_path, "13.0", OLD))
    assert p.returncode == 0 and p.stdout.strip() == ";".join(DEFAULT_ARCHS), p.stdout + p.stderr


def _host_glibc():
    try:
        return tuple(int(x) for x in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
    except (ValueError, OSError, AttributeError, IndexError):
        return None


@pytest.fixture
def gcc_as_zig(tmp_path):
    """A `zig` that is the host's gcc ("zig cc -target T args" -> "gcc args"): the
    link binds to the host's glibc, so a symbol newer than the target shows."""
    for tool in ("gcc", "readelf"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found")
    z = tmp_path / "zig"
    z.write_text('#!/bin/sh\n[ "$1" = version ] && { echo 0.0-gcc; exit 0; }\n'
                 'shift; [ "$1" = -target ] && shift 2; exec gcc "$@"\n')
    z.chmod(0o755)
    return z


def _link(tmp_path, zig, code, target="2.28"):
    src = tmp_path / "t.c"
    src.write_text(code)
    obj = tmp_path / "t.o"
    subprocess.run(["gcc", "-fPIC", "-O1", "-c", str(src), "-o", str(obj)], check=True, timeout=60)
    out = tmp_path / "t.so"
    env = {**os.environ, "GLIBC_LINK_ZIG": str(zig), "GLIBC_LINK_TARGET": target}
    p = subprocess.run(["bash", str(GLIBC_LINK), "-shared", str(obj), "-o", str(out), "-lpthread",
                        "-Wl,-rpath,/nowhere"], capture_output=True, text=True, env=env, timeout=60)
    return p, out


def test_glibc_link_refuses_a_symbol_newer_than_the_target(tmp_path, gcc_as_zig):
    if (_host_glibc() or (0, 0)) < (2, 30):
        pytest.skip("needs a host glibc with pthread_cond_clockwait (2.30+)")
    code = ("#define _GNU_SOURCE\n#include <pthread.h>\n#include <time.h>\n"
            "int f(pthread_cond_t *c, pthread_mutex_t *m) { struct timespec t = {0, 0};\n"
            "  return pthread_cond_clockwait(c, m, CLOCK_MONOTONIC, &t); }\n")
    p, out = _link(tmp_path, gcc_as_zig, code)
    assert p.returncode == 1, p.stdout + p.stderr
    # GLIBC_2.30 where libpthread still has it, GLIBC_2.34 where libc does
    assert re.search(r"pthread_cond_clockwait@GLIBC_2\.3\d\b", p.stderr), p.stderr
    assert not out.exists()


def test_glibc_link_accepts_old_symbols_and_python_ones(tmp_path, gcc_as_zig):
    code = ("#include <string.h>\nextern void *PyLong_FromLong(long);\n"
            "void *g(char *d, const char *s, unsigned long n) { memmove(d, s, n);\n"
            "  return PyLong_FromLong((long)strlen(d)); }\n")
    p, out = _link(tmp_path, gcc_as_zig, code)
    assert p.returncode == 0, p.stdout + p.stderr
    assert out.exists() and "for glibc 2.28" in p.stdout, p.stdout
    dyn = subprocess.run(["readelf", "-d", str(out)], capture_output=True, text=True).stdout
    assert "RPATH" not in dyn and "RUNPATH" not in dyn   # -Wl,-rpath dropped
