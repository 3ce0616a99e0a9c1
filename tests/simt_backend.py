"""The CUDA kernels of gmpo_ext run on the CPU under the SIMT emulation.

``load_simt_module()`` builds csrc/module.c, the C core and every csrc/cuda/*.cu
into a CPython extension ``_C_simt`` with tests/simt/build.py (the .cu files
compiled by the host C++ compiler with tests/simt/simt.h force-included), and
imports it. Its ``device=1`` entry points are gmpo_cuda_forward / backward, the
same CUDA source nvcc compiles, so

    gmpo_ext._backend.set_simt_module(load_simt_module())

sends CPU tensors through the emulated CUDA kernels (tests/conftest.py's "simt"
backend). The build is cached under build/simt/ (or $SIMT_BUILD_DIR).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
CSRC = REPO / "csrc"

_spec = importlib.util.spec_from_file_location("simt_build", HERE / "simt" / "build.py")
simt_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(simt_build)

MODULE_NAME = "_C_simt"
# $SIMT_CUDA_DIR: build the kernels of another copy of csrc/cuda (tests/simt/plant_bugs.py)
CUDA_DIR = pathlib.Path(os.environ.get("SIMT_CUDA_DIR") or CSRC / "cuda")
CU_SOURCES = sorted(str(p) for p in CUDA_DIR.glob("*.cu"))
# the module, the shared argument checks and the C core (all of csrc/*.c, csrc/cpu/*.c)
C_SOURCES = sorted(str(p) for p in (*CSRC.glob("*.c"), *(CSRC / "cpu").glob("*.c")))
DEFINES = [f"GMPO_MODULE_NAME={MODULE_NAME}", "GMPO_WITH_CUDA", "GMPO_SIMT"]
# the C core's own flags (setup.py; OpenMP only for its simd pragmas: the C core
# is not what this module tests) plus warnings as errors: the kernels must
# build warning-free for the host compiler too
CFLAGS = ("-fno-strict-aliasing", "-fopenmp-simd", "-Werror")


# The tiny-grid build: every launcher caps grid.x at 3 and grid.y at 2 blocks
# where its kernel has a grid-stride loop (csrc/cuda/launch.cuh), so each such
# loop takes several passes and a block reuses its shared memory for the next row.
TINY_GRID = (3, 2)


def max_grid_from_env() -> tuple[int, int] | None:
    """$SIMT_MAX_GRID ("X,Y", e.g. "3,2"): the grid caps of load_simt_module()'s
    default build, to run a whole suite against a tiny-grid build."""
    env = os.environ.get("SIMT_MAX_GRID", "").strip()
    if not env:
        return None
    x, _, y = env.partition(",")
    return int(x), int(y or 65535)


def grid_defines(max_grid: tuple[int, int] | None) -> list[str]:
    if max_grid is None:
        return []
    return [f"GMPO_MAX_GRID_X={int(max_grid[0])}", f"GMPO_MAX_GRID_Y={int(max_grid[1])}"]


def build_simt_module(sanitize: str | None = None, opt: str = "-O2",
                      max_grid: tuple[int, int] | None = None) -> pathlib.Path:
    """Path of the built extension (built or taken from the cache); max_grid:
    (x, y) caps on the grid-stride launches (None: CUDA's limits)."""
    # the same module name and C objects for every caps: only the .cu objects differ
    # (the outputs land in different cache directories)
    return simt_build.build_library(
        CU_SOURCES, c_sources=C_SOURCES, include_dirs=[CSRC], defines=DEFINES, sanitize=sanitize,
        opt=opt, python_extension=True, name=MODULE_NAME, extra_cflags=CFLAGS, cu_defines=grid_defines(max_grid),
    )


_modules: dict = {}
_DEFAULT = object()


def load_simt_module(max_grid=_DEFAULT):
    """The emulated-CUDA extension module, built and imported once per process
    and grid caps (default: $SIMT_MAX_GRID, else CUDA's limits)."""
    if max_grid is _DEFAULT:
        max_grid = max_grid_from_env()
    key = None if max_grid is None else tuple(max_grid)
    if key not in _modules:
        path = build_simt_module(max_grid=key)
        spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.SIMT == 1 and mod.WITH_CUDA == 1, "the SIMT module was built without its CUDA kernels"
        _modules[key] = mod
    return _modules[key]
