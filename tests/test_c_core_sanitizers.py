"""The C core on its own: tests/csrc/test_core.c built with AddressSanitizer and
UndefinedBehaviorSanitizer (and once plainly at -O2), run, and the fp16 / bf16
converters of csrc/gmpo_math.h checked against independent references."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

import _c_build

SANITIZER_EXIT = 86   # distinct from the test program's own failure exit (1)
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")


def _gcc():
    gcc = _c_build.gcc()
    if gcc is None:
        pytest.skip("gcc not found")
    return gcc


@pytest.fixture(scope="module")
def builds():
    """Both variants (started in the background at collection, see _c_build)."""
    _gcc()
    return _c_build.wait()


@pytest.fixture(scope="module")
def lsan_works(tmp_path_factory):
    """Whether LeakSanitizer runs here (it does not under some ptrace-restricted
    containers); if not, the sanitized run uses detect_leaks=0."""
    gcc = _gcc()
    d = tmp_path_factory.mktemp("lsan")
    src = d / "leak.c"
    src.write_text("#include <stdlib.h>\nvoid *volatile sink;\n"
                   "int main(void) { sink = malloc(77); sink = 0; return 0; }\n")
    exe = d / "leak"
    r = subprocess.run([gcc, "-g", "-fsanitize=address", str(src), "-o", str(exe)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return False
    r = subprocess.run([str(exe)], capture_output=True, text=True,
                       env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"})
    return "detected memory leaks" in r.stderr


def _built(builds, name):
    exe, rc, err, cmd = builds[name]
    assert rc == 0, f"build {name} failed (-Wall -Wextra -Werror):\n{cmd}\n{err}"
    return exe


def _run(exe, lsan, *args):
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = (f"detect_leaks={1 if lsan else 0}:exitcode={SANITIZER_EXIT}:"
                           "abort_on_error=0:detect_stack_use_after_return=1")
    env["UBSAN_OPTIONS"] = f"print_stacktrace=1:halt_on_error=1:exitcode={SANITIZER_EXIT}"
    env["OMP_NUM_THREADS"] = "2"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)


def test_sanitized_build_is_warning_free(builds):
    _built(builds, "asan-ubsan")


@pytest.fixture(scope="module")
def sanitized_run(builds, lsan_works):
    return _run(_built(builds, "asan-ubsan"), lsan_works)


def test_sanitized_run_has_no_sanitizer_report(sanitized_run):
    r = sanitized_run
    report = [m for m in SANITIZER_MARKS if m in r.stderr]
    assert r.returncode in (0, 1) and not report, \
        f"exit {r.returncode}, sanitizer report:\n{r.stderr[-6000:]}"
    assert " passed, " in r.stdout, r.stdout


def test_sanitized_run_all_cases_pass(sanitized_run):
    r = sanitized_run
    assert r.returncode == 0 and r.stdout.strip().endswith(" 0 failed"), \
        f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}"


def test_leak_sanitizer_is_used_when_it_works(lsan_works):
    # informative: records whether leaks were checked; the run above adapts
    if not lsan_works:
        pytest.skip("LeakSanitizer does not work here: the sanitized run uses detect_leaks=0")


def test_optimized_build_all_cases_pass(builds):
    r = _run(_built(builds, "O2"), False)
    assert r.returncode == 0 and r.stdout.strip().endswith(" 0 failed"), \
        f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}"


# ----------------------------------------------------------------------------
# float -> fp16 / bf16 rounding against independent references

def _sample_floats():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 2 ** 32, size=1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)]
    # every midpoint between adjacent finite halves (ties: round to even), both signs,
    # and the floats one ulp either side of it
    h = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = ((h[:-1] + h[1:]) / 2).astype(np.float32)
    assert np.array_equal(mids.astype(np.float64), (h[:-1] + h[1:]) / 2)  # exact in fp32
    near = [mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))]
    # every bf16 midpoint: low half 0x8000, and one ulp either side
    hi = np.arange(0, 0x7F80, dtype=np.uint32) << 16
    bmid = [(hi | 0x8000).view(np.float32), (hi | 0x8001).view(np.float32), (hi | 0x7FFF).view(np.float32)]
    # overflow edges, subnormals of both formats, specials
    special = np.array([65504, 65519.996, 65520, 65536, 1e5, 3.4e38, np.inf, 2.0 ** -24, 2.0 ** -25,
                        3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -25, 1e-45, 1e-40, 0.0,
                        2.0 ** -126, 3.3895314e38, 3.3961775e38, np.nan], dtype=np.float32)
    nans = (np.array([0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x7FA00000, 0x7F80FFFF],
                     dtype=np.uint32)).view(np.float32)
    allf = np.concatenate(parts + near + bmid + [special, nans])
    return np.concatenate([allf, -allf]).astype(np.float32)


def _bf16_reference(f):
    """Round to nearest even with integer ops: keep the top 16 bits, add one when
    the dropped half is above 0x8000, or exactly 0x8000 with an odd kept half."""
    u = f.view(np.uint32)
    top = (u >> 16).astype(np.uint32)
    rest = u & 0xFFFF
    up = (rest > 0x8000) | ((rest == 0x8000) & ((top & 1) == 1))
    return (top + up.astype(np.uint32)).astype(np.uint16)


@pytest.fixture(scope="module")
def converted(builds, tmp_path_factory):
    exe = _built(builds, "asan-ubsan")
    f = _sample_floats()
    d = tmp_path_factory.mktemp("convert")
    (d / "in.bin").write_bytes(f.tobytes())
    r = _run(exe, False, "convert", str(d / "in.bin"), str(d / "out.bin"))
    assert r.returncode == 0 and not any(m in r.stderr for m in SANITIZER_MARKS), r.stderr[-4000:]
    pairs = np.frombuffer((d / "out.bin").read_bytes(), dtype=np.uint16).reshape(-1, 2)
    assert len(pairs) == len(f)
    return f, pairs[:, 0].copy(), pairs[:, 1].copy()


def test_float_to_half_matches_numpy(converted):
    f, half, _ = converted
    with np.errstate(over="ignore"):          # overflow to inf is the point
        want = f.astype(np.float16).view(np.uint16)
    nan = np.isnan(f)
    got_nan = ((half & 0x7C00) == 0x7C00) & ((half & 0x3FF) != 0)
    assert np.array_equal(got_nan, nan), "NaN must map to NaN and only NaN"
    bad = np.nonzero((half != want) & ~nan)[0]
    assert bad.size == 0, (f"{bad.size} of {f.size} floats convert differently from numpy; e.g. "
                           + ", ".join(f"{f[i]!r}: {half[i]:#06x} vs {want[i]:#06x}" for i in bad[:5]))
    # the sample reaches the interesting places
    assert (want == 0x7C00).any() and ((want & 0x7C00) == 0).sum() > 1000  # inf, subnormals


def test_float_to_bf16_round_to_nearest_even(converted):
    f, _, bf = converted
    nan = np.isnan(f)
    got_nan = ((bf & 0x7F80) == 0x7F80) & ((bf & 0x7F) != 0)
    assert np.array_equal(got_nan, nan), "NaN must map to NaN and only NaN (no NaN -> inf)"
    want = _bf16_reference(f)
    bad = np.nonzero((bf != want) & ~nan)[0]
    assert bad.size == 0, (f"{bad.size} of {f.size} differ; e.g. "
                           + ", ".join(f"{f[i]!r}: {bf[i]:#06x} vs {want[i]:#06x}" for i in bad[:5]))
    # the integer reference agrees with torch's own conversion
    t = torch.from_numpy(f[~nan]).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(t, want[~nan])
