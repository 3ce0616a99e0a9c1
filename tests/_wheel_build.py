"""The CPU wheel of tests/test_wheel.py: built, installed into a fresh venv and
smoke-tested in a background thread started at collection (conftest), so the C
compile (about 75 CPU seconds, nearly all of it csrc/cpu/gmpo_cpu.c) overlaps
with the rest of the suite; the tests only wait for the results.

Steps, each a subprocess whose (command, exit status, output) is kept:

  build    `pip wheel --no-deps --no-build-isolation` of a copy of the sources
           (csrc, gmpo_ext, setup.py, pyproject.toml, README.md), GMPO_EXT_CUDA=0;
           or the wheel in $GMPO_TEST_WHEEL (e.g. dist/ of tools/build_wheels.sh)
  venv     `python -m venv` (no --system-site-packages: nothing of this
           environment is visible in it)
  install  the venv's pip installs torch from a local wheel file of the running
           torch's exact version ($GMPO_TEST_TORCH_WHEEL, or pip's find-links)
           and the gmpo_ext wheel, binary only, with PATH holding only the venv's
           bin/ and CC=CXX=false: no compiler can run
  smoke    tests/wheel_smoke.py, copied out of the repository, run by the
           venv's python in an empty directory, under the same PATH
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["csrc", "gmpo_ext", "setup.py", "pyproject.toml", "README.md", "LICENSE"]
IGNORE = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "*.egg-info", "build", "dist")

_state: dict = {}
_lock = threading.Lock()


def torch_wheel_file():
    """A local wheel file of the running torch's exact version, or None. Never
    a name for pip to resolve: on PyPI plain `torch` is a several-GB CUDA build."""
    explicit = os.environ.get("GMPO_TEST_TORCH_WHEEL")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    import torch

    dirs = []
    for var in ("PIP_FIND_LINKS",):
        dirs += os.environ.get(var, "").split()
    try:
        cfg = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        cfg = ""
    for line in cfg.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            dirs += value.strip().strip("'\"").split()
    dirs = [d[len("file://"):] if d.startswith("file://") else d for d in dirs]
    pattern = f"torch-{torch.__version__}-*.whl"
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d, pattern)))
        if hits:
            return hits[0]
    return None


def clean_env(venv_bin: Path) -> dict:
    """The environment of the install and smoke steps: only the venv's bin/ on
    PATH, no compiler, pip's own settings kept (its index and find-links)."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith("PIP_") or k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE",
                                            "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY",
                                            "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")}
    env.update(PATH=str(venv_bin), CC="false", CXX="false", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONNOUSERSITE="1", OMP_NUM_THREADS="2")
    return env


def _run(name, cmd, **kw):
    if _state.get("stopping"):
        return False
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, **kw) as p:
            _state["proc"] = p
            try:
                out, _ = p.communicate(timeout=1200)
            except subprocess.TimeoutExpired:
                _kill(p)
                out, _ = p.communicate()
            res = (" ".join(map(str, cmd)), p.returncode, out)
    except OSError as e:
        res = (" ".join(map(str, cmd)), -1, repr(e))
    _state["steps"][name] = res
    return res[1] == 0


def _kill(p):
    """End a step and the compilers it started (its own process group)."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, 15)
        except OSError:
            pass


def _stop():
    """At exit (a run that never waited, e.g. -x stopped early): no compiler
    is left running and the work directory goes."""
    _state["stopping"] = True
    p = _state.get("proc")
    if p is not None:
        _kill(p)
    t = _state.get("thread")
    if t is not None:
        t.join(timeout=30)


def _pipeline(work: Path):
    steps = _state["steps"]
    wheel = os.environ.get("GMPO_TEST_WHEEL")
    if wheel:
        steps["build"] = ("$GMPO_TEST_WHEEL", 0 if Path(wheel).is_file() else 1, wheel)
        if not Path(wheel).is_file():
            return
    else:
        src = work / "src"
        src.mkdir()
        for name in SOURCES:
            p = ROOT / name
            if p.is_dir():
                shutil.copytree(p, src / name, ignore=IGNORE)
            elif p.exists():
                shutil.copy2(p, src / name)
        out = work / "wheelhouse"
        env = {**os.environ, "GMPO_EXT_CUDA": "0"}
        env.pop("GMPO_EXT_CUDA_ARCHS", None)
        if not _run("build", [sys.executable, "-m", "pip", "wheel", "--no-deps",
                              "--no-build-isolation", "-w", str(out), str(src)], env=env, cwd=work):
            return
        wheels = sorted(out.glob("gmpo_ext-*.whl"))
        if len(wheels) != 1:
            steps["build"] = (steps["build"][0], 1, f"expected one wheel in {out}: {wheels}")
            return
        wheel = str(wheels[0])
    _state["wheel"] = wheel

    torch_file = _state["torch_wheel"]
    if torch_file is None:
        return
    venv = work / "venv"
    if not _run("venv", [sys.executable, "-m", "venv", str(venv)]):
        return
    vbin = venv / "bin"
    env = clean_env(vbin)
    _state["env"] = env
    if not _run("install", [str(vbin / "python"), "-m", "pip", "install", "--no-cache-dir",
                            "--only-binary=:all:", torch_file, wheel], env=env, cwd=work):
        return
    run_dir = work / "run"
    run_dir.mkdir()
    shutil.copy2(ROOT / "tests" / "wheel_smoke.py", run_dir / "wheel_smoke.py")
    _run("smoke", [str(vbin / "python"), "wheel_smoke.py"], env=env, cwd=run_dir)


def start():
    """Start the pipeline in a background thread (once)."""
    with _lock:
        if "thread" in _state:
            return
        work = Path(tempfile.mkdtemp(prefix="gmpo_wheel_"))
        atexit.register(shutil.rmtree, work, True)
        atexit.register(_stop)   # runs first: atexit is last in, first out
        _state.update(work=work, steps={}, wheel=None, env=None,
                      torch_wheel=torch_wheel_file())
        t = threading.Thread(target=_pipeline, args=(work,), name="gmpo-wheel", daemon=True)
        _state["thread"] = t
        t.start()


def wait() -> dict:
    """The pipeline's state: work (dir), wheel (path or None), torch_wheel,
    env (of the venv steps), steps {name: (command, exit status, output)}."""
    start()
    _state["thread"].join(timeout=1800)
    return _state
