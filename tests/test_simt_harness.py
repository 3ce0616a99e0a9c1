"""Tests of the SIMT emulation harness in tests/simt/, which runs the CUDA C
kernels on the CPU (see tests/simt/simt.h and /work/shared/CUDA_EMULATION.md).

The self-test kernels (tests/simt/selftest/) are built three ways: plain (-O2
-Werror), ASan+UBSan and TSan. The correct kernels must give the CPU's answer
in every build with no sanitizer report; each kernel with a planted bug must be
caught in the build where it shows, with the message that names it (the table
is SELFTEST_CASES in tests/simt/build.py, shared with its --selftest command).
Builds are cached under build/simt/, so a second run only runs.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import threading

import pytest

pytestmark = pytest.mark.simt

HERE = pathlib.Path(__file__).resolve().parent
SELFTEST = HERE / "simt" / "selftest"

_spec = importlib.util.spec_from_file_location("simt_build", HERE / "simt" / "build.py")
simt_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(simt_build)

BUILD_NAMES = {None: "plain", "asan": "asan", "tsan": "tsan"}
CASES = [(case, san) for case, per_build in simt_build.SELFTEST_CASES.items() for san in per_build]

if shutil.which(os.environ.get("SIMT_CXX", "g++")) is None:
    pytest.skip("no C++ compiler for the SIMT emulation", allow_module_level=True)

_exes: dict = {}


def selftest_exe(sanitize):
    """The self-test program of one build, built once per session (and cached on disk)."""
    if sanitize:
        reason = simt_build.sanitizer_works(sanitize)
        if reason:
            pytest.skip(f"{sanitize} runtime unusable here: {reason}")
    if sanitize not in _exes:
        _exes[sanitize] = simt_build.build_selftest(sanitize)
    return _exes[sanitize]


def run_case(sanitize, case, *args, env=None):
    exe = selftest_exe(sanitize)
    full_env = simt_build.sanitizer_env(sanitize)
    full_env.update(env or {})
    return subprocess.run([str(exe), case, *args], capture_output=True, text=True, env=full_env, timeout=120)


# ----------------------------------------------------------------------------
# the self-test table: correct kernels clean, planted bugs caught


@pytest.mark.parametrize("case,sanitize", CASES, ids=[f"{c}-{BUILD_NAMES[s]}" for c, s in CASES])
def test_selftest_case(case, sanitize):
    proc = simt_build.run_selftest_case(selftest_exe(sanitize), case, sanitize)
    problems = simt_build.check_case(proc, case, sanitize)
    want_rc, needles = simt_build.SELFTEST_CASES[case][sanitize]
    assert not problems, (
        f"case {case!r}, {BUILD_NAMES[sanitize]} build: {'; '.join(problems)} "
        f"(expected exit {want_rc} and {needles})\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    )


def _line_of(path, text):
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_removed_syncthreads_race_names_both_lines():
    """TSan names the write of a warp's partial sum and warp 0's read of it with the barrier gone."""
    write = _line_of(SELFTEST / "correct.cu", "if (lane == 0) warp_sums[warp] = v;")
    read = _line_of(SELFTEST / "correct.cu", "v = lane < nwarps ? warp_sums[lane] : 0.0f;")
    proc = run_case("tsan", "missing_sync", "2", "256", "64")
    assert "WARNING: ThreadSanitizer: data race" in proc.stderr
    assert f"correct.cu:{write}" in proc.stderr and f"correct.cu:{read}" in proc.stderr, proc.stderr[-4000:]
    assert "simt block (" in proc.stderr  # fibers are named after their CUDA thread


@pytest.mark.parametrize(
    "args",
    [("block_sum", "7", "1025", "96"), ("block_sum", "1", "1", "1024"), ("block_sum", "257", "97", "32"),
     ("histogram", "997")],
    ids=lambda a: "-".join(a),
)
def test_awkward_sizes(args):
    proc = run_case(None, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("workers", ["1", "3"])
def test_worker_count(workers):
    proc = run_case(None, "all", env={"SIMT_WORKERS": workers})
    assert proc.returncode == 0 and "0 failed" in proc.stdout, proc.stdout + proc.stderr


def test_divergent_barrier_odd_block():
    line = _line_of(SELFTEST / "broken.cu", "if (threadIdx.x < blockDim.x / 2) __syncthreads();")
    proc = run_case(None, "divergent", "97")
    assert proc.returncode == 2
    assert "divergent __syncthreads" in proc.stdout and f"broken.cu:{line}" in proc.stdout, proc.stdout


def test_fiber_stack_size_setting():
    proc = run_case(None, "all", env={"SIMT_STACK_KB": "32"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_case(None, "stack_overflow", env={"SIMT_STACK_KB": "512"})  # 256 KiB of locals now fit
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ucontext_fallback():
    """The portable fibers (used off x86-64) run the same self-test."""
    exe = simt_build.build_library(
        [SELFTEST / "correct.cu", SELFTEST / "broken.cu"], cxx_sources=[SELFTEST / "driver.cpp"],
        include_dirs=[SELFTEST], runtime_defines=["SIMT_USE_UCONTEXT"], name="simt_selftest_uc", executable=True,
    )
    proc = subprocess.run([str(exe), "all"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "0 failed" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_selftest_kernels_are_valid_cuda(tmp_path):
    """The same self-test sources build with nvcc for the GPU, warning-free (no GPU needed)."""
    procs = [
        subprocess.Popen(["nvcc", "-arch=sm_90", "-std=c++17", "-Werror", "all-warnings", f"-I{SELFTEST}", "-c",
                          str(SELFTEST / f"{stem}.cu"), "-o", str(tmp_path / f"{stem}.o")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for stem in ("correct", "broken")
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out


# ----------------------------------------------------------------------------
# in-process use: a shared library through ctypes, a CPython extension


@pytest.fixture(scope="module")
def selftest_lib():
    path = simt_build.build_library([SELFTEST / "correct.cu", SELFTEST / "broken.cu"], include_dirs=[SELFTEST],
                                    name="simt_selftest_kernels")
    lib = ctypes.CDLL(str(path))
    lib.st_block_sum.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_int, ctypes.c_int]
    lib.st_divergent_barrier.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.st_error_string.restype = ctypes.c_char_p
    return lib


def _block_sum(lib, rows, n, threads):
    x = (ctypes.c_float * (rows * n))(*[float((r * 3 + i) % 11 - 5) for r in range(rows) for i in range(n)])
    sums = (ctypes.c_float * rows)()
    centered = (ctypes.c_float * (rows * n))()
    code = lib.st_block_sum(x, sums, centered, rows, n, threads, 1)
    expect = [sum(x[r * n:(r + 1) * n]) for r in range(rows)]
    return code, list(sums), expect


def test_library_in_process(selftest_lib):
    code, sums, expect = _block_sum(selftest_lib, 5, 300, 128)
    assert code == 0 and sums == expect
    out = (ctypes.c_float * 128)()
    code = selftest_lib.st_divergent_barrier(out, 64)
    assert code == 715  # cudaErrorIllegalInstruction
    assert b"divergent __syncthreads" in selftest_lib.st_error_string(code)
    code, sums, expect = _block_sum(selftest_lib, 3, 64, 32)  # the harness recovers
    assert code == 0 and sums == expect


def test_library_from_concurrent_python_threads(selftest_lib):
    results = []

    def body(seed):
        for k in range(3):
            results.append(_block_sum(selftest_lib, 2 + seed, 100 + 31 * k, 64))

    threads = [threading.Thread(target=body, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 9
    for code, sums, expect in results:
        assert code == 0 and sums == expect


def test_python_extension():
    path = simt_build.build_library([SELFTEST / "correct.cu", SELFTEST / "broken.cu"],
                                    c_sources=[SELFTEST / "pymodule.c"], include_dirs=[SELFTEST],
                                    python_extension=True, name="simt_selftest_ext")
    assert path.name == "simt_selftest_ext" + sysconfig.get_config_var("EXT_SUFFIX")
    needed = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    assert "libpython" not in needed
    spec = importlib.util.spec_from_file_location("simt_selftest_ext", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.warp_semantics()
    assert out[6] == 0x49249249 and out[8] == 13  # ballot and __syncthreads_count of thread 0
    with pytest.raises(RuntimeError, match="divergent __syncthreads"):
        mod.divergent(64)


# ----------------------------------------------------------------------------
# build.py itself


def test_runtime_is_warning_free():
    """The runtime in each of its configurations, -Wall -Wextra -Wshadow -Werror (compiled side by side)."""
    cxx = os.environ.get("SIMT_CXX", "g++")
    modes = {"plain": [], "tsan": ["-DSIMT_TSAN_RUNTIME"], "asan": ["-fsanitize=address,undefined"],
             "ucontext": ["-DSIMT_USE_UCONTEXT"]}
    procs = {
        name: subprocess.Popen([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Wshadow", "-Werror", "-fPIC", *flags,
                                "-c", str(simt_build.RUNTIME), "-o", os.devnull],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, flags in modes.items()
    }
    failed = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    failed = {name: out for name, out in failed.items() if procs[name].returncode != 0}
    assert not failed, failed


def test_build_error_shows_compiler_output(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k(float* p) { p[threadIdx.x] = undeclared_name; }\n")
    with pytest.raises(simt_build.BuildError) as info:
        simt_build.build_library([bad], out_dir=tmp_path / "cache")
    assert "bad.cu" in str(info.value) and "undeclared_name" in str(info.value)


def test_build_cache_tracks_included_headers(tmp_path):
    header = tmp_path / "value.h"
    header.write_text("#define VALUE 1\n")
    src = tmp_path / "k.cu"
    src.write_text('#include "value.h"\n'
                   "__global__ void k(int* p) { p[threadIdx.x] = VALUE; }\n"
                   'extern "C" int run(int* p) { GMPO_LAUNCH(k, 1, 4, 0, nullptr, p); return (int)cudaGetLastError(); }\n')
    cache = tmp_path / "cache"
    probe = "import ctypes, sys; b = (ctypes.c_int * 4)(); print(ctypes.CDLL(sys.argv[1]).run(b), list(b))"

    def run_once():
        path = simt_build.build_library([src], include_dirs=[tmp_path], out_dir=cache, name="k1")
        # a fresh process each time: dlopen would hand back an already loaded library of the same name
        out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
        return path, path.stat().st_mtime_ns, out.stdout.strip()

    first = run_once()
    assert first[2] == "0 [1, 1, 1, 1]"
    assert run_once() == first  # cached: neither recompiled nor relinked
    header.write_text("#define VALUE 2\n")
    assert run_once()[2] == "0 [2, 2, 2, 2]"


def test_plant_bug_patterns_apply():
    # tests/simt/plant_bugs.py plants each bug by an exact text replacement in a
    # copy of csrc/cuda: every text must still occur exactly once
    spec = importlib.util.spec_from_file_location("plant_bugs", HERE / "simt" / "plant_bugs.py")
    plant_bugs = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("plant_bugs", plant_bugs)   # dataclasses look their module up
    spec.loader.exec_module(plant_bugs)
    assert plant_bugs.pattern_problems() == []
    kinds = {b.kind.split(":")[0] for b in plant_bugs.BUGS}
    assert {"grid-stride loop", "barrier guarding shared-memory reuse removed",
            "32-bit truncation of the gradient's row offset", "misaligned 16-byte vector access",
            "shared-memory read past the written slots"} <= kinds


def test_default_grid_caps_are_cudas(tmp_path):
    # launch.cuh's caps default to CUDA's limits (what an nvcc build gets); a
    # build may only lower them
    src = tmp_path / "caps.cu"
    src.write_text('#include "launch.cuh"\n'
                   "static_assert(GMPO_MAX_GRID_X == 2147483647LL, \"grid.x cap\");\n"
                   "static_assert(GMPO_MAX_GRID_Y == 65535, \"grid.y cap\");\n")
    cuda = HERE.parent / "csrc" / "cuda"
    cmd = [os.environ.get("SIMT_CXX", "g++"), "-x", "c++", "-std=c++17", "-DGMPO_SIMT", "-include",
           str(simt_build.SIMT_H), f"-I{cuda}", "-fsyntax-only", str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    bad = subprocess.run(cmd[:-1] + ["-DGMPO_MAX_GRID_Y=70000", str(src)], capture_output=True, text=True)
    assert bad.returncode != 0 and "GMPO_MAX_GRID_Y" in bad.stderr
