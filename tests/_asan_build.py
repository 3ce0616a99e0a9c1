"""gmpo_ext._C built with AddressSanitizer + UndefinedBehaviorSanitizer, for
tests/test_fuzz.py's sanitized run.

The same sources as setup.py's CPU build (csrc/module.c, csrc/gmpo_common.c,
csrc/cpu/*.c), at -O1 -g with -fsanitize=address,undefined
-fno-sanitize-recover=all, linked into a CPython extension module named _C.
Objects are cached by content under build/fuzz_asan/ (key: the compiler, the
flags, the source and every header under csrc/), so only what changed is
recompiled. gmpo_cpu.c (many SIMD kernel instances) takes the longest: conftest
starts the compiles in the background at collection, as it does for
tests/_c_build.py, so they overlap with the rest of the suite.

    import _asan_build
    _asan_build.start()             # non-blocking; a no-op without gcc
    path = _asan_build.wait()       # the built module (raises BuildFailed)
    env = _asan_build.run_env()     # LD_PRELOAD of libasan + libubsan

Command line (prints the module's path): python tests/_asan_build.py
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
BUILD = Path(os.environ.get("GMPO_FUZZ_BUILD_DIR", ROOT / "build" / "fuzz_asan"))

SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
CFLAGS = ["-std=c11", "-O1", "-g", "-fPIC", "-Wall", "-Wextra", "-fno-strict-aliasing",
          "-fno-trapping-math", "-fno-math-errno", "-fopenmp", *SAN,
          f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}"]
LDFLAGS = ["-shared", "-fopenmp", *SAN]
# the exit status of a sanitizer report, distinct from a Python error (1)
SANITIZER_EXIT = 86
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "runtime error:",
                   "UndefinedBehaviorSanitizer")


class BuildFailed(RuntimeError):
    pass


def sources():
    return [CSRC / "module.c", CSRC / "gmpo_common.c", *sorted((CSRC / "cpu").glob("*.c"))]


def gcc():
    return os.environ.get("GMPO_FUZZ_CC") or shutil.which("gcc")


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def _headers_key() -> str:
    hs = sorted(p for p in CSRC.rglob("*.h") if "cuda" not in p.relative_to(CSRC).parts)
    return _sha(*[x for p in hs for x in (str(p.relative_to(CSRC)), p.read_bytes())])


def _compiler_id(cc) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout


_state: dict = {}


def start():
    """Start compiling the stale objects in the background (at most two at a time
    is the caller's business: there are four sources, two of them tiny)."""
    if "objs" in _state:
        return
    cc = gcc()
    if cc is None:
        _state["objs"] = None
        return
    base = _sha(_compiler_id(cc), *CFLAGS, _headers_key())
    objdir = BUILD / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    objs = []
    for src in sources():
        key = _sha(base, src.name, src.read_bytes())[:24]
        obj = objdir / f"{src.stem}-{key}.o"
        proc = None
        if not obj.exists():
            fd, tmp = tempfile.mkstemp(dir=objdir, prefix=obj.name + ".", suffix=".o")
            os.close(fd)
            cmd = [cc, *CFLAGS, "-c", str(src), "-o", tmp]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            proc = (p, tmp, cmd)
        objs.append((obj, proc))
    _state["objs"] = objs
    _state["cc"] = cc
    atexit.register(_abandon)


def _abandon():
    """At exit: stop compiles nobody waited for and drop their partial objects."""
    for _, proc in _state.get("objs") or ():
        if proc is not None and proc[0].poll() is None:
            proc[0].kill()
            proc[0].wait()
            Path(proc[1]).unlink(missing_ok=True)


def wait() -> Path:
    """The sanitized extension module (built or taken from the cache)."""
    start()
    if "result" in _state:
        res = _state["result"]
        if isinstance(res, Exception):
            raise res
        return res
    try:
        _state["result"] = _finish()
    except Exception as e:   # remembered: every caller sees the same failure
        _state["result"] = e
        raise
    return _state["result"]


def _finish() -> Path:
    objs = _state["objs"]
    if objs is None:
        raise BuildFailed("gcc not found")
    errors = []
    for obj, proc in objs:
        if proc is None:
            continue
        p, tmp, cmd = proc
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            errors.append(f"{' '.join(cmd)}\n{err}")
            Path(tmp).unlink(missing_ok=True)
        else:
            os.replace(tmp, obj)
    if errors:
        raise BuildFailed("\n\n".join(errors))
    names = [o.name for o, _ in objs]
    out = BUILD / _sha(*names, *LDFLAGS)[:20] / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
        os.close(fd)
        cmd = [_state["cc"], *map(str, (o for o, _ in objs)), *LDFLAGS, "-lm", "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            raise BuildFailed(f"{' '.join(cmd)}\n{r.stderr}")
        os.replace(tmp, out)
    return out


def _runtime(lib: str) -> str:
    return subprocess.run([gcc(), f"-print-file-name={lib}"], capture_output=True,
                          text=True).stdout.strip()


def run_env(base: dict | None = None) -> dict:
    """Environment for a plain python that loads the sanitized module: the
    sanitizer runtimes preloaded (they must come before libc's malloc), every
    report fatal with exit status SANITIZER_EXIT. Leak checking is off: the
    interpreter and torch keep allocations alive at exit by design."""
    env = dict(os.environ if base is None else base)
    env["ASAN_OPTIONS"] = (f"detect_leaks=0:halt_on_error=1:abort_on_error=0:"
                           f"exitcode={SANITIZER_EXIT}:detect_odr_violation=0:"
                           "allocator_may_return_null=1")
    env["UBSAN_OPTIONS"] = f"print_stacktrace=1:halt_on_error=1:exitcode={SANITIZER_EXIT}"
    env["LD_PRELOAD"] = ":".join([_runtime("libasan.so"), _runtime("libubsan.so")])
    return env


if __name__ == "__main__":
    try:
        print(wait())
    except BuildFailed as e:
        print(e, file=sys.stderr)
        sys.exit(1)
