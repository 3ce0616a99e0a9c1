"""Builds of tests/csrc/test_core.c for test_c_core_sanitizers.py, started early.

gmpo_cpu.c takes several seconds per build (UBSan at -O1 most), so conftest
starts both builds in the background as soon as collection selects a test of
test_c_core_sanitizers.py and moves those tests to the end of the run: the
compilers use the second core while the Python tests run on the first.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = [ROOT / "tests" / "csrc" / "test_core.c", CSRC / "gmpo_common.c", CSRC / "cpu" / "gmpo_cpu.c"]
WARN = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-fopenmp", f"-I{CSRC}"]
BUILDS = {
    "asan-ubsan": ["-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "O2": ["-O2"],
}

_state = {}


def gcc():
    return shutil.which("gcc")


def start():
    """Start both builds (once); a no-op without gcc."""
    if "procs" in _state or gcc() is None:
        return
    out = Path(tempfile.mkdtemp(prefix="gmpo_c_core_"))
    atexit.register(shutil.rmtree, out, True)
    _state["dir"] = out
    procs = {}
    for name, flags in BUILDS.items():
        exe = out / f"test_core_{name}"
        cmd = [gcc(), *WARN, *flags, *map(str, SOURCES), "-lm", "-o", str(exe)]
        procs[name] = (exe, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True))
    _state["procs"] = procs


def wait():
    """{name: (exe, returncode, stderr, command line)} of the builds started by start()."""
    start()
    if "results" not in _state:
        results = {}
        for name, (exe, cmd, p) in _state["procs"].items():
            _, err = p.communicate(timeout=900)
            results[name] = (exe, p.returncode, err, " ".join(cmd))
        _state["results"] = results
    return _state["results"]


def workdir():
    start()
    return _state["dir"]
