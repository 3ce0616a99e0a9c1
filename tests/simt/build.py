"""Build CUDA C kernels for the SIMT emulation (tests/simt/simt.h) and run its self-test.

The CUDA sources (.cu) are compiled by the host C++ compiler with the emulation
header force-included; C sources (.c) by the C compiler; both are linked with
the emulation runtime into a shared library, a CPython extension module or an
executable. Objects and outputs are cached under build/simt/ (or $SIMT_BUILD_DIR)
by a hash of the sources, the headers they include, the flags and the compiler,
so repeated test runs do not rebuild.

    from build import build_library, sanitizer_env   # loaded by path by the tests
    lib = build_library(["csrc/cuda/loss.cu"], c_sources=["csrc/gmpo.c"],
                        include_dirs=["csrc"], sanitize="asan")

Command line:

    python tests/simt/build.py --selftest [--sanitize asan|tsan] [--cxx clang++]
    python tests/simt/build.py --bench

Standard library only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from typing import Iterable, Sequence

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
SIMT_H = HERE / "simt.h"
RUNTIME = HERE / "simt_runtime.cpp"
SELFTEST_DIR = HERE / "selftest"

SANITIZERS = (None, "asan", "tsan")
_CACHE_VERSION = "simt-build-2"
_WARNINGS = ("-Wall", "-Wextra")
_SAN_FLAGS = {
    None: [],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "tsan": ["-fsanitize=thread"],
}


class BuildError(RuntimeError):
    """A compile or link step failed; the message holds the command and the compiler's output."""


# ---------------------------------------------------------------------------
# helpers


def _default_root() -> pathlib.Path:
    env = os.environ.get("SIMT_BUILD_DIR")
    return pathlib.Path(env) if env else REPO / "build" / "simt"


@functools.lru_cache(maxsize=None)
def _compiler_id(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"compiler {compiler!r} does not run: {e}") from e
    return out.splitlines()[0] if out else compiler


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _file_sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _parse_depfile(text: str) -> list[str]:
    """Prerequisites of a make-style dependency file written by -MMD."""
    body = text.replace("\\\n", " ")
    _, _, prereqs = body.partition(": ")
    deps, cur, i = [], "", 0
    while i < len(prereqs):
        c = prereqs[i]
        if c == "\\" and i + 1 < len(prereqs) and prereqs[i + 1] == " ":
            cur += " "
            i += 2
            continue
        if c.isspace():
            if cur:
                deps.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    if cur:
        deps.append(cur)
    return deps


def _define_flags(defines: Iterable) -> list[str]:
    flags = []
    for d in defines:
        if isinstance(d, (tuple, list)):
            name, value = d
            flags.append(f"-D{name}" if value is None else f"-D{name}={value}")
        else:
            flags.append(f"-D{d}")
    return flags


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(
            f"{what} failed (exit {proc.returncode})\n$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}".rstrip()
        )


def _write_atomic(path: pathlib.Path, data: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, path)


class _Object:
    """One translation unit: its compile command and cache location."""

    def __init__(self, src: pathlib.Path, compiler: str, flags: list[str], obj_dir: pathlib.Path):
        self.src = src
        self.compiler = compiler
        self.flags = flags
        key = _sha(_CACHE_VERSION, _compiler_id(compiler), *flags, str(src), _file_sha(src))
        self.key = key
        self.obj = obj_dir / f"{src.stem}-{key[:20]}.o"
        self.stamp = self.obj.with_suffix(".json")

    def up_to_date(self) -> bool:
        if not (self.obj.exists() and self.stamp.exists()):
            return False
        try:
            deps = json.loads(self.stamp.read_text())["deps"]
            return all(pathlib.Path(p).exists() and _file_sha(pathlib.Path(p)) == h for p, h in deps.items())
        except (OSError, ValueError, KeyError):
            return False

    def build(self) -> None:
        self.obj.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.obj.parent, prefix=self.obj.stem + ".", suffix=".o")
        os.close(fd)
        dep = tmp + ".d"
        try:
            _run([self.compiler, *self.flags, "-MMD", "-MF", dep, "-c", str(self.src), "-o", tmp],
                 f"compiling {self.src}")
            deps = _parse_depfile(pathlib.Path(dep).read_text())
            hashes = {str(pathlib.Path(p).resolve()): _file_sha(pathlib.Path(p)) for p in deps}
            os.replace(tmp, self.obj)
            _write_atomic(self.stamp, json.dumps({"src": str(self.src), "deps": hashes}, indent=1))
        finally:
            for p in (tmp, dep):
                if os.path.exists(p):
                    os.unlink(p)


# ---------------------------------------------------------------------------
# public API


def build_library(
    cu_sources: Sequence[str | os.PathLike],
    c_sources: Sequence[str | os.PathLike] = (),
    cxx_sources: Sequence[str | os.PathLike] = (),
    include_dirs: Sequence[str | os.PathLike] = (),
    defines: Iterable = (),
    sanitize: str | None = None,
    opt: str = "-O2",
    out_dir: str | os.PathLike | None = None,
    python_extension: bool = False,
    *,
    name: str | None = None,
    executable: bool = False,
    extra_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = (),
    runtime_defines: Iterable = (),
    cu_defines: Iterable = (),
    cxx: str | None = None,
    cc: str | None = None,
    jobs: int = 2,
) -> pathlib.Path:
    """Compile and link sources for the emulation; returns the path of the output.

    cu_sources: CUDA C files, compiled as C++17 with -DGMPO_SIMT and simt.h
        force-included. c_sources: C11 files (e.g. a CPython module calling the
        extern "C" entry points). cxx_sources: plain C++17 files (no simt.h).
    include_dirs, defines ("NAME", "NAME=VALUE" or (name, value)) and
        extra_cflags apply to every source; the runtime is built on its own.
    sanitize: None, "asan" (AddressSanitizer + UBSan) or "tsan".
    out_dir: cache root (default $SIMT_BUILD_DIR or <repo>/build/simt); the
        output lands in <root>/<hash>/.
    python_extension: name the output <name><EXT_SUFFIX> and add Python's
        include directory (libpython is not linked).
    executable: link a program instead of a shared library.
    cu_defines: defines for the .cu files only (e.g. grid caps: the C objects
        stay shared with other builds in the cache).
    runtime_defines: defines for the runtime only (SIMT_USE_UCONTEXT selects
        the portable ucontext fibers on x86-64 too).
    cxx, cc: compilers (default $SIMT_CXX or g++, $SIMT_CC or gcc).
    """
    if sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be one of {SANITIZERS}, not {sanitize!r}")
    if python_extension and executable:
        raise ValueError("python_extension and executable exclude each other")
    cxx = cxx or os.environ.get("SIMT_CXX", "g++")
    cc = cc or os.environ.get("SIMT_CC", "gcc")
    root = pathlib.Path(out_dir) if out_dir is not None else _default_root()
    cu = [pathlib.Path(s).resolve() for s in cu_sources]
    cs = [pathlib.Path(s).resolve() for s in c_sources]
    cxxs = [pathlib.Path(s).resolve() for s in cxx_sources]
    for p in (*cu, *cs, *cxxs):
        if not p.is_file():
            raise BuildError(f"source not found: {p}")
    if not (cu or cs or cxxs):
        raise ValueError("no sources")

    san = _SAN_FLAGS[sanitize]
    common = [opt, "-g", "-fPIC", *_WARNINGS, *[f"-I{pathlib.Path(d).resolve()}" for d in include_dirs]]
    if python_extension:
        common.append(f"-I{sysconfig.get_paths()['include']}")
    common += _define_flags(defines)
    common += list(extra_cflags)
    # -fstack-clash-protection: a big kernel frame probes its pages, so an
    # overflow hits the fiber stack's guard region instead of skipping it.
    # -fsanitize=alignment (no UBSan runtime: simt_runtime.cpp handles its calls):
    # a misaligned load or store in a kernel ends the block with
    # cudaErrorMisalignedAddress in every build (ASan's UBSan checks it too).
    align = [] if sanitize == "asan" else ["-fsanitize=alignment"]
    cu_flags = ["-x", "c++", "-std=c++17", "-DGMPO_SIMT", "-include", str(SIMT_H), "-Wno-unknown-pragmas",
                "-fstack-clash-protection", *common, *_define_flags(cu_defines), *san, *align]
    c_flags = ["-std=c11", *common, *san]
    cxx_flags = ["-std=c++17", *common, *san]
    # The runtime hands scheduler state between fibers without happens-before
    # edges on purpose: under TSan it is built uninstrumented (see its header).
    rt_flags = ["-std=c++17", "-O2", "-g", "-fPIC", *_WARNINGS]
    rt_flags += ["-DSIMT_TSAN_RUNTIME"] if sanitize == "tsan" else san
    rt_flags += _define_flags(runtime_defines)

    obj_dir = root / "obj"
    objects = [_Object(RUNTIME, cxx, rt_flags, obj_dir)]
    objects += [_Object(p, cxx, cu_flags, obj_dir) for p in cu]
    objects += [_Object(p, cc, c_flags, obj_dir) for p in cs]
    objects += [_Object(p, cxx, cxx_flags, obj_dir) for p in cxxs]
    stale = [o for o in objects if not o.up_to_date()]
    if stale:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(jobs, len(stale)))) as pool:
            for fut in [pool.submit(o.build) for o in stale]:
                fut.result()

    stem = name or (cu or cs or cxxs)[0].stem
    if python_extension:
        filename = stem + sysconfig.get_config_var("EXT_SUFFIX")
    elif executable:
        filename = stem
    else:
        filename = f"lib{stem}.so"
    ld_flags = ([] if executable else ["-shared"]) + ["-pthread", *san, *extra_ldflags]
    link_key = _sha(_CACHE_VERSION, _compiler_id(cxx), filename, *ld_flags, *(o.obj.name for o in objects))
    out = root / link_key[:20] / filename
    if out.exists() and all(out.stat().st_mtime_ns >= o.obj.stat().st_mtime_ns for o in objects):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=filename + ".")
    os.close(fd)
    try:
        _run([cxx, *[str(o.obj) for o in objects], "-o", tmp, *ld_flags], f"linking {filename}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def sanitizer_env(sanitize: str | None, base: dict | None = None, preload: bool = False) -> dict:
    """Environment for running code built with `sanitize`.

    Reports go to stderr and stop the program at the first error; TSan does not
    sleep a second at exit. preload=True adds LD_PRELOAD of the sanitizer
    runtime, needed to load an instrumented extension into a plain python.
    """
    env = dict(os.environ if base is None else base)

    def add(var: str, opts: str) -> None:
        env[var] = f"{opts}:{env[var]}" if env.get(var) else opts

    if sanitize == "asan":
        add("ASAN_OPTIONS", "halt_on_error=1:detect_leaks=0" if preload else "halt_on_error=1")
        add("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    elif sanitize == "tsan":
        add("TSAN_OPTIONS", "atexit_sleep_ms=0:halt_on_error=1:second_deadlock_stack=1")
    if preload and sanitize:
        lib = "libasan.so" if sanitize == "asan" else "libtsan.so"
        path = subprocess.run([os.environ.get("SIMT_CC", "gcc"), f"-print-file-name={lib}"], capture_output=True,
                              text=True).stdout.strip()
        if sanitize == "asan":
            ubsan = subprocess.run([os.environ.get("SIMT_CC", "gcc"), "-print-file-name=libubsan.so"],
                                   capture_output=True, text=True).stdout.strip()
            path = f"{path}:{ubsan}"
        env["LD_PRELOAD"] = path
    return env


@functools.lru_cache(maxsize=None)
def sanitizer_works(sanitize: str, cxx: str | None = None) -> str | None:
    """None when `cxx` can build and run a program with `sanitize`, else the reason it cannot."""
    cxx = cxx or os.environ.get("SIMT_CXX", "g++")
    src = "#include <thread>\nint x;\nint main(){std::thread t([]{x=1;});t.join();return x-1;}\n"
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "probe")
        proc = subprocess.run([cxx, "-x", "c++", "-", "-o", exe, "-pthread", *_SAN_FLAGS[sanitize]], input=src,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return f"{cxx} cannot link with {' '.join(_SAN_FLAGS[sanitize])}: {proc.stderr.strip()[:300]}"
        run = subprocess.run([exe], capture_output=True, text=True, env=sanitizer_env(sanitize), timeout=60)
        if run.returncode != 0:
            return f"a {sanitize} program does not run here: {run.stderr.strip()[:300]}"
    return None


# ---------------------------------------------------------------------------
# self-test

# Options per build: the sanitizer builds use -O1, the plain one -O2 and -Werror
# (the header must stay warning-free).
SELFTEST_BUILDS = {
    None: {"opt": "-O2", "extra_cflags": ("-Werror",)},
    "asan": {"opt": "-O1", "extra_cflags": ()},
    "tsan": {"opt": "-O1", "extra_cflags": ()},
}

def _src_line(name: str, marker: str) -> str:
    """"name:line" of the first line of a self-test source holding `marker`."""
    lines = (SELFTEST_DIR / name).read_text().splitlines()
    return f"{name}:{next(i for i, text in enumerate(lines, 1) if marker in text)}"


# What each case must do, per build: (exit status, substrings of stdout+stderr).
# Exit statuses of the driver: 0 right answer and no error, 1 wrong answer, 2
# error reported by the harness; 1 also for an ASan abort, 66 for TSan's
# report (exit code after a report with halt_on_error=1).
_CAUGHT = {
    "divergent": (2, ["divergent __syncthreads", "thread exited while"]),
    "partial_warp": (2, ["mask 0xffffffff names lane(s) 0xffff0000 that do not exist", "partial last warp"]),
    "missing_lanes": (2, ["mask 0xffffffff names a lane that never arrives", "__shfl_down_sync"]),
    "barrier_vs_shuffle": (2, ["deadlock", "__syncthreads", "__shfl_xor_sync"]),
    "trap": (2, ["cudaErrorLaunchFailure", "block (1,0,0), thread (5,0,0): __trap() at"]),
    "assert": (2, ["cudaErrorAssert", "assertion `x[i] >= 0.0f"]),
}
SELFTEST_CASES: dict[str, dict[str | None, tuple[int, list[str]]]] = {
    "all": {b: (0, ["0 failed"]) for b in SANITIZERS},
    "missing_sync": {
        None: (1, ["wrong result"]),
        "asan": (1, ["wrong result"]),
        "tsan": (66, ["WARNING: ThreadSanitizer: data race", "block_sum_kernel<false>", "correct.cu:"]),
    },
    "oob_read": {"asan": (1, ["ERROR: AddressSanitizer: heap-buffer-overflow", "oob_read_sum_kernel",
                          _src_line("broken.cu", "// BUG: <= n")])},
    "smem_overrun": {
        None: (2, ["write past the end of dynamic shared memory", "histogram_kernel"]),
        "tsan": (2, ["write past the end of dynamic shared memory", "histogram_kernel"]),
        "asan": (1, ["ERROR: AddressSanitizer: use-after-poison", "histogram_kernel", "correct.cu:"]),
    },
    **{case: {b: expect for b in SANITIZERS} for case, expect in _CAUGHT.items()},
    # a read of static shared memory past the written slots sees the 0xFF poison
    # (NaN), not the zeros an earlier launch left in the same copy
    "smem_uninit": {b: (1, ["wrong result", "block sums 8.000000, -nan"]) for b in SANITIZERS},
    # a misaligned 16-byte load: a launch error in every build (ASan's UBSan
    # reports the plain dereference itself)
    "misaligned": {
        None: (2, ["cudaErrorMisalignedAddress", "misaligned address", "misaligned_kernel",
                   _src_line("broken.cu", "v = *p;")]),
        "tsan": (2, ["cudaErrorMisalignedAddress", "misaligned address", "misaligned_kernel",
                     _src_line("broken.cu", "v = *p;")]),
        "asan": (1, ["runtime error:", "misaligned address", _src_line("broken.cu", "v = *p;")]),
    },
    "misaligned_ldg": {b: (2, ["cudaErrorMisalignedAddress", "16-byte __ldg needs 16-byte alignment",
                               "misaligned_kernel", _src_line("broken.cu", "v = __ldg(p);")])
                       for b in SANITIZERS},
    # killed by SIGSEGV after the harness names the overflow (ASan/TSan report it their own way)
    "stack_overflow": {None: (-11, ["fiber stack overflow (64 KiB); raise SIMT_STACK_KB", "stack_overflow_kernel"])},
}
# Sanitizer reports that must not appear in a run expected to be clean.
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "WARNING: ThreadSanitizer", "runtime error:", "ERROR: LeakSanitizer")


def build_selftest(sanitize: str | None = None, *, cxx: str | None = None, out_dir=None) -> pathlib.Path:
    """The self-test program for one build."""
    opts = SELFTEST_BUILDS[sanitize]
    return build_library(
        [SELFTEST_DIR / "correct.cu", SELFTEST_DIR / "broken.cu"],
        cxx_sources=[SELFTEST_DIR / "driver.cpp"],
        include_dirs=[SELFTEST_DIR],
        sanitize=sanitize,
        opt=opts["opt"],
        extra_cflags=opts["extra_cflags"],
        out_dir=out_dir,
        name="simt_selftest" + (f"_{sanitize}" if sanitize else ""),
        executable=True,
        cxx=cxx,
    )


# Extra arguments per (case, build): TSan runs tiny sizes.
SELFTEST_ARGS = {("all", "tsan"): ("small",), ("missing_sync", "tsan"): ("2", "256", "64")}


def run_selftest_case(exe: pathlib.Path, case: str, sanitize: str | None, *args: str,
                      timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one case; without `args`, the case's SELFTEST_ARGS for this build."""
    args = args or SELFTEST_ARGS.get((case, sanitize), ())
    env = sanitizer_env(sanitize)
    env.setdefault("SIMT_WORKERS", "2")
    return subprocess.run([str(exe), case, *args], capture_output=True, text=True, env=env, timeout=timeout)


def check_case(proc: subprocess.CompletedProcess, case: str, sanitize: str | None) -> list[str]:
    """Problems with one case's run (empty when it did what SELFTEST_CASES says)."""
    want_rc, needles = SELFTEST_CASES[case][sanitize]
    out = proc.stdout + proc.stderr
    problems = []
    if proc.returncode != want_rc:
        problems.append(f"exit status {proc.returncode}, expected {want_rc}")
    problems += [f"missing {n!r}" for n in needles if n not in out]
    if want_rc in (0, 2, -11):  # clean runs and harness-reported errors: no sanitizer report
        problems += [f"unexpected {m!r}" for m in SANITIZER_MARKERS if m in out]
    return problems


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--selftest", action="store_true", help="build and run the harness self-test")
    ap.add_argument("--bench", action="store_true", help="time the block-sum kernel (64 blocks x 256 threads)")
    ap.add_argument("--sanitize", choices=["asan", "tsan"], default=None)
    ap.add_argument("--cxx", default=None, help="C++ compiler (default $SIMT_CXX or g++)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the output of every case")
    args = ap.parse_args(argv)
    if not (args.selftest or args.bench):
        ap.error("nothing to do: give --selftest and/or --bench")
    if args.sanitize:
        reason = sanitizer_works(args.sanitize, args.cxx)
        if reason:
            print(f"cannot run the {args.sanitize} build: {reason}", file=sys.stderr)
            return 77
    try:
        exe = build_selftest(args.sanitize, cxx=args.cxx)
    except BuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"built {exe}")
    failures = 0
    if args.selftest:
        for case, per_build in SELFTEST_CASES.items():
            if args.sanitize not in per_build:
                continue
            proc = run_selftest_case(exe, case, args.sanitize)
            problems = check_case(proc, case, args.sanitize)
            failures += bool(problems)
            print(f"{'ok  ' if not problems else 'FAIL'} {case}" + ("" if not problems else ": " + "; ".join(problems)))
            if args.verbose or problems:
                print(re.sub(r"(?m)^", "    ", (proc.stdout + proc.stderr).rstrip()[-4000:]))
    if args.bench:
        proc = run_selftest_case(exe, "bench", args.sanitize)
        print(proc.stdout.strip() or proc.stderr.strip())
        failures += proc.returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_main())
