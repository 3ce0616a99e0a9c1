"""Shared fixtures: the backend every loss test runs against, and its device.

BACKENDS lists what the parity tests run on:

  "c"     the C core (gmpo_ext._C) on CPU tensors
  "simt"  the CUDA kernels run on the CPU under the SIMT emulation (tests/simt):
          CPU tensors are routed to a module built from the CUDA sources by
          ``simt_backend.load_simt_module()`` through
          ``gmpo_ext._backend.set_simt_module``
  "cuda"  the real CUDA kernels, when torch sees a GPU: tests create their
          tensors on the ``device`` fixture

GMPO_TEST_BACKENDS=c,simt selects backends for one run. Adding the emulated CUDA
backend for good is one line below (``BACKENDS.append("simt")``)
plus ``tests/simt_backend.py: load_simt_module()``, imported lazily here and
only when "simt" is listed, so a checkout without it still collects.

The loss test modules opt in with ``pytestmark = pytest.mark.usefixtures("backend")``
(or by taking ``device``), which parametrizes each test over BACKENDS.
"""

from __future__ import annotations

import os

import pytest
import torch

from gmpo_ext import _backend

BACKENDS = ["c"]
BACKENDS.append("simt")   # the CUDA kernels under the SIMT emulation (tests/simt_backend.py)
if torch.cuda.is_available():
    BACKENDS.append("cuda")
# GMPO_TEST_BACKENDS=c,simt (any comma-separated subset) overrides the list for one run
if os.environ.get("GMPO_TEST_BACKENDS"):
    BACKENDS = [b.strip() for b in os.environ["GMPO_TEST_BACKENDS"].split(",") if b.strip()]

# One intra-op thread for the suite: on the 2-core CI machine torch's threads
# cost more than they save on these small tensors, and when the cores are busy
# their spin-waits make single calls take seconds. The C core's multi-threaded
# path is exercised on purpose by the tests that call torch.set_num_threads(2)
# (same bits as one thread; large shapes).
torch.set_num_threads(1)

_MARKS = {"simt": [pytest.mark.simt], "cuda": [pytest.mark.cuda]}

_simt_cache = {}


def _simt_module():
    """Build (once per session) and return the SIMT-emulated CUDA module."""
    if "module" not in _simt_cache:
        from simt_backend import load_simt_module  # lazy: only when "simt" is in BACKENDS

        _simt_cache["module"] = load_simt_module()
    return _simt_cache["module"]


def backend_params():
    return [pytest.param(b, marks=_MARKS.get(b, []), id=b) for b in BACKENDS]


@pytest.hookimpl(trylast=True)   # after -k / -m deselection: build only for selected tests
def pytest_collection_modifyitems(session, config, items):
    """Run the sanitizer tests (the C core's, the fuzzer's ASan run) last and
    start their compiles now, so the (slow) builds overlap with the rest of the
    suite on the second core."""
    c_tests = [it for it in items if it.nodeid.split("::")[0].endswith("test_c_core_sanitizers.py")]
    if c_tests:
        items[:] = [it for it in items if it not in c_tests] + c_tests
        import _c_build

        _c_build.start()
    # the fuzzer's run against the ASan + UBSan build of gmpo_ext._C: same idea
    asan = [it for it in items if it.nodeid.endswith("test_fuzz.py::test_fuzz_under_asan")]
    if asan:
        items[:] = [it for it in items if it not in asan] + asan
        if not config.option.collectonly:
            import _asan_build

            _asan_build.start()
    # the wheel of test_wheel.py: built, installed into a fresh venv and
    # smoke-tested in the background from now on (tests/_wheel_build.py)
    wheel_tests = [it for it in items if it.nodeid.split("::")[0].endswith("test_wheel.py")]
    if wheel_tests:
        items[:] = [it for it in items if it not in wheel_tests] + wheel_tests
        if not config.option.collectonly:
            import _wheel_build

            _wheel_build.start()


@pytest.fixture(params=backend_params())
def backend(request):
    """The backend name; routes CPU tensors to the SIMT module for "simt"."""
    name = request.param
    _backend.set_simt_module(_simt_module() if name == "simt" else None)
    try:
        yield name
    finally:
        _backend.set_simt_module(None)


@pytest.fixture
def device(backend):
    """Where a test creates its tensors for the current backend."""
    return torch.device("cuda") if backend == "cuda" else torch.device("cpu")


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group (the distributed paths' arguments and
    single-process equivalences), or the group already initialised."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
