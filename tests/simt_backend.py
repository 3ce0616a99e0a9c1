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
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
CSRC = REPO / "csrc"

_spec = importlib.util.spec_from_file_location("simt_build", HERE / "simt" / "build.py")
simt_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(simt_build)

MODULE_NAME = "_C_simt"
CU_SOURCES = sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
# the module, the shared argument checks and the C core (all of csrc/*.c, csrc/cpu/*.c)
C_SOURCES = sorted(str(p) for p in (*CSRC.glob("*.c"), *(CSRC / "cpu").glob("*.c")))
DEFINES = [f"GMPO_MODULE_NAME={MODULE_NAME}", "GMPO_WITH_CUDA", "GMPO_SIMT"]
# the C core's own flags (setup.py; OpenMP only for its simd pragmas: the C core
# is not what this module tests) plus warnings as errors: the kernels must
# build warning-free for the host compiler too
CFLAGS = ("-fno-strict-aliasing", "-fopenmp-simd", "-Werror")


def build_simt_module(sanitize: str | None = None, opt: str = "-O2") -> pathlib.Path:
    """Path of the built extension (built or taken from the cache)."""
    return simt_build.build_library(
        CU_SOURCES, c_sources=C_SOURCES, include_dirs=[CSRC], defines=DEFINES, sanitize=sanitize,
        opt=opt, python_extension=True, name=MODULE_NAME, extra_cflags=CFLAGS,
    )


_module = None


def load_simt_module():
    """The emulated-CUDA extension module, built and imported once per process."""
    global _module
    if _module is None:
        path = build_simt_module()
        spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.SIMT == 1 and mod.WITH_CUDA == 1, "the SIMT module was built without its CUDA kernels"
        _module = mod
    return _module
