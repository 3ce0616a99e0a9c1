"""Issue 12: the CPU wheel is a cp39-abi3 wheel that installs into a fresh venv
without a compiler and works there under the pinned torch.

tests/_wheel_build.py builds it (GMPO_EXT_CUDA=0; or takes $GMPO_TEST_WHEEL),
creates a plain venv, installs torch from the local wheel file of the running
torch's version and the gmpo_ext wheel with no compiler on PATH, and runs
tests/wheel_smoke.py there (loss and logits paths against the float64
references, 2 OpenMP threads); conftest starts all of it at collection so the
compile overlaps with the rest of the suite. These tests check each step, the
wheel's name and contents (abi3audit, auditwheel, the module's ELF: no rpath,
no shared library but libc and libgomp), and load its module under every other
CPython >= 3.9 found here.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import _wheel_build

pytestmark = pytest.mark.slow

if not sys.platform.startswith("linux"):
    pytest.skip("the wheel checks read ELF files and /proc: Linux only", allow_module_level=True)

# what the module may need at run time: the C runtime (glibc's parts) and
# libgomp, which torch ships and has loaded by the time gmpo_ext loads _C
ALLOWED_NEEDED = {"libc.so.6", "libm.so.6", "libgomp.so.1", "libpthread.so.0", "libdl.so.2",
                  "librt.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}


@pytest.fixture(scope="module")
def state():
    return _wheel_build.wait()


def _step(state, name):
    if name not in state["steps"]:
        done = ", ".join(f"{k} (exit {v[1]})" for k, v in state["steps"].items()) or "none"
        pytest.fail(f"step {name!r} did not run; steps run: {done}")
    cmd, rc, out = state["steps"][name]
    assert rc == 0, f"{name} failed (exit {rc}): {cmd}\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(state):
    _step(state, "build")
    return Path(state["wheel"])


@pytest.fixture(scope="module")
def module_so(wheel, tmp_path_factory):
    d = tmp_path_factory.mktemp("wheel_contents")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(d)
    return d / "gmpo_ext" / "_C.abi3.so"


def test_wheel_name_and_contents(wheel):
    m = re.fullmatch(r"gmpo_ext-([^-]+)-cp39-abi3-(\S+)\.whl", wheel.name)
    assert m, f"not a cp39-abi3 wheel: {wheel.name}"
    machine = platform.machine()
    assert m.group(2).endswith("_" + machine) and "linux" in m.group(2), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        tags = z.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    binaries = [n for n in names if n.endswith(".so") or ".so." in n]
    assert binaries == ["gmpo_ext/_C.abi3.so"], binaries
    assert "gmpo_ext/reference.py" in names and "gmpo_ext/ops.py" in names
    assert not [n for n in names if n.startswith("tests/")], "tests in the wheel"
    assert "Tag: cp39-abi3-" in tags, tags
    assert re.search(r"^Requires-Dist: torch>=", meta, re.M), "torch is not a dependency"
    # the CPU wheel: a +cpu local version label (tools/build_wheels.sh) or none
    assert m.group(1).split("+")[0] == re.search(r"^Version: (\S+)", meta, re.M).group(1).split("+")[0]


def _readelf(so, flag):
    exe = shutil.which("readelf")
    if exe is None:
        pytest.skip("readelf (binutils) not found: it reads the module's ELF headers")
    return subprocess.run([exe, flag, "-W", str(so)], capture_output=True, text=True,
                          check=True).stdout


def test_module_needs_only_libc_and_libgomp(module_so):
    dyn = _readelf(module_so, "-d")
    needed = set(re.findall(r"\(NEEDED\).*\[(.+?)\]", dyn))
    assert needed <= ALLOWED_NEEDED, f"unexpected shared libraries: {needed - ALLOWED_NEEDED}"
    assert "libc.so.6" in needed
    assert "RPATH" not in dyn and "RUNPATH" not in dyn, "a build-machine search path in the module"
    # the stable ABI: no libpython, and every Python symbol it imports is a function
    # of the limited API (abi3audit below checks them against 3.9's list)
    assert not [n for n in needed if n.startswith("libpython")]
    syms = _readelf(module_so, "--dyn-syms")
    exported = [line.split()[-1] for line in syms.splitlines()
                if " GLOBAL " in line and " UND " not in line and " FUNC " in line]
    assert exported == ["PyInit__C"], f"the module exports more than its init: {exported}"


def test_abi3audit(wheel):
    exe = shutil.which("abi3audit", path=os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("abi3audit not installed (it is in the test extra: pip install -e '.[test]')")
    p = subprocess.run([exe, "--strict", "--summary", "--assume-minimum-abi3", "3.9", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "0 ABI version mismatches and 0 ABI violations" in " ".join(out.split()), out


def test_auditwheel_only_libgomp_external(wheel):
    """auditwheel show, with torch's lib directory searched first (where the
    libgomp that gmpo_ext runs with lives): nothing external but libgomp."""
    exe = shutil.which("auditwheel", path=os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("auditwheel not installed (it is in the test extra: pip install -e '.[test]')")
    import torch

    ldpaths = [str(Path(torch.__file__).parent / "lib"), "/lib64", "/usr/lib64",
               f"/lib/{platform.machine()}-linux-gnu", f"/usr/lib/{platform.machine()}-linux-gnu"]
    p = subprocess.run([exe, "show", "--json", "--ldpaths", os.pathsep.join(ldpaths), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    libs = set()
    for entry in report.get("external_refs", {}).values():
        libs |= set(entry.get("libs", {}))
    non_policy = {lib for lib in libs if not lib.startswith(("libc.", "libm.", "libpthread", "libdl",
                                                             "librt", "ld-linux"))}
    assert non_policy <= {"libgomp.so.1"}, f"external libraries besides libgomp: {non_policy}"


def test_installs_without_compiler_in_fresh_venv(state):
    if state["torch_wheel"] is None:
        import torch

        pytest.skip(f"no local wheel file of torch {torch.__version__} (set GMPO_TEST_TORCH_WHEEL): "
                    "installing torch by name could pull a several-GB CUDA build")
    _step(state, "build")
    _step(state, "venv")
    env = state["env"]
    for tool in ("gcc", "cc", "c++", "g++", "clang", "nvcc"):
        assert shutil.which(tool, path=env["PATH"]) is None, f"{tool} reachable from the venv's PATH"
    assert env["CC"] == "false" and env["CXX"] == "false"
    out = _step(state, "install")
    assert "Successfully installed" in out and "gmpo_ext" in out, out[-3000:]
    assert "Building wheel" not in out, "pip built something from source:\n" + out[-3000:]


def test_smoke_in_fresh_venv(state):
    """The installed wheel under the pinned torch: loss forward/backward and the
    logits path against the float64 references (tests/wheel_smoke.py), from the
    venv, sharing torch's OpenMP runtime."""
    if state["torch_wheel"] is None:
        pytest.skip("no local torch wheel file (see test_installs_without_compiler_in_fresh_venv)")
    out = _step(state, "smoke")
    facts = json.loads(out.strip().splitlines()[-1])
    import torch

    prefix = str(state["work"] / "venv")
    assert facts["prefix"] == prefix or facts["prefix"].startswith(prefix), facts
    assert facts["torch"] == torch.__version__, "the venv's torch is not the pinned one"
    for key in ("torch_file", "gmpo_ext_file", "module_file"):
        assert Path(facts[key]).resolve().is_relative_to(Path(prefix).resolve()), \
            f"{key} from outside the venv: {facts[key]}"
    assert facts["module_file"].endswith("_C.abi3.so")
    assert facts["with_cuda"] is False and facts["cuda_versions"] is None
    assert facts["ops"] == ["loss_fwd", "loss_bwd", "logits_fwd"]
    # one OpenMP runtime in the process: torch's own libgomp, when torch ships one
    gomp = facts["libgomp"]
    assert gomp is not None and len(gomp) == 1, f"libgomp mapped {gomp}"
    torch_lib = Path(facts["torch_file"]).parent / "lib"
    if list(torch_lib.glob("libgomp*.so*")):
        assert Path(gomp[0]).parent == torch_lib, f"not torch's libgomp: {gomp}"


def _other_pythons():
    """CPython >= 3.9 interpreters here other than this one (pyenv's versions)."""
    found = {}
    roots = {Path(sys.base_prefix).parent}
    for root in roots:
        for exe in sorted(root.glob("3.*/bin/python3")):
            found[exe.resolve()] = exe
    for minor in range(9, 16):
        w = shutil.which(f"python3.{minor}")
        if w:
            found.setdefault(Path(w).resolve(), Path(w))
    out = []
    for exe in found.values():
        try:
            p = subprocess.run([str(exe), "-c", "import sys, sysconfig; print(sys.version_info[:2] >= (3, 9)"
                                " and not sysconfig.get_config_var('Py_GIL_DISABLED'), sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        if p.returncode == 0 and p.stdout.startswith("True") and \
                p.stdout.split(None, 1)[1].strip() != str(sys.version_info[:2]):
            out.append(str(exe))
    return out


LOAD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("gmpo_ext._C", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
assert m.WITH_CUDA == 0 and m.SIMT == 0 and m.ROW_STATS > 0 and m.METRICS > 0
assert m.cuda_versions() is None
try:
    m.forward()
except TypeError:
    pass
else:
    raise AssertionError("forward() without arguments did not raise")
print("ok", sys.version_info[:2])
"""


def test_module_loads_on_other_cpythons(module_so):
    """One abi3 module for every CPython >= 3.9: loaded directly (no torch
    there) under each other CPython found here."""
    pythons = _other_pythons()
    if not pythons:
        pytest.skip("no other CPython >= 3.9 found (pyenv's versions, python3.X on PATH)")
    for exe in pythons:
        p = subprocess.run([exe, "-c", LOAD, str(module_so)], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0 and p.stdout.startswith("ok"), f"{exe}: {p.stdout}{p.stderr}"


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "with_cuda"])
def test_module_c_compiles_on_the_limited_api(cuda):
    """csrc/module.c (with every csrc/*.inc it includes) against the 3.9 limited
    API, warnings as errors: an API outside it fails here in a second, before
    any wheel is built (setup.py's own build also makes implicit declarations
    errors)."""
    import sysconfig

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc or cc) on PATH")
    root = Path(__file__).resolve().parent.parent
    cmd = [cc, "-fsyntax-only", "-std=c11", "-Wall", "-Wextra", "-Werror",
           "-DPy_LIMITED_API=0x03090000", f"-I{root / 'csrc'}",
           f"-I{sysconfig.get_paths()['include']}", str(root / "csrc" / "module.c")]
    if cuda:
        cmd.insert(1, "-DGMPO_WITH_CUDA=1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
