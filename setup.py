"""Build gmpo_ext: the C core always, the CUDA kernels when nvcc is found.

No torch at build time: the extension is plain C (and CUDA C) behind the
CPython C API. Environment switches:

  GMPO_EXT_CUDA=auto|0|1   build the CUDA kernels: when nvcc is found (auto,
                           the default), never (0), or fail without nvcc (1)
  GMPO_EXT_CUDA_ARCHS      e.g. "80;90": the SM architectures (default
                           80;86;89;90;100;120, plus PTX for the newest)
  GMPO_EXT_NVCC            the nvcc to use (default: $CUDA_HOME/bin/nvcc or PATH)
  GMPO_EXT_OPENMP=0        build the CPU kernels without OpenMP
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "80;86;89;90;100;120"
# nvcc's flags for csrc/cuda/*.cu, before -I csrc and the -gencode list. .ci/nvcc_check.sh
# compiles with exactly these (`python setup.py --print-nvcc-flags`), so change them here.
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-DGMPO_WITH_CUDA"]
# -fno-trapping-math lets gcc turn the clip selects into vector blends (we never
# read FP exception flags); NaN and inf semantics are kept (no -ffast-math).
C_FLAGS = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fno-strict-aliasing", "-fno-trapping-math",
           "-fno-math-errno"]


def _env(name, default):
    return os.environ.get(name, default).strip()


def find_nvcc():
    explicit = _env("GMPO_EXT_NVCC", "")
    if explicit:
        return explicit
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_toolkit_root(nvcc):
    """The toolkit directory of this nvcc (which may be a wrapper script):
    CUDA_HOME if set, else what nvcc reports as its TOP in a dry run."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return Path(home)
    out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
                         capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return Path(line.split("=", 1)[1].strip()).resolve()
    return Path(nvcc).resolve().parent.parent


def cuda_arch_flags(archs):
    flags = []
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in archs.split(";") if a.strip()]
    for a in archs:
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    newest = max(archs, key=int)
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def nvcc_supports(nvcc, arch):
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True)
    return out.returncode != 0 or f"compute_{arch}" in out.stdout


class BuildExt(build_ext):
    """Adds OpenMP when the compiler has it and compiles csrc/cuda/*.cu with nvcc."""

    def build_extensions(self):
        for ext in self.extensions:
            if _env("GMPO_EXT_OPENMP", "1") != "0" and self._has_openmp():
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
            else:
                # the `omp simd` loops still vectorise; no runtime library needed
                ext.extra_compile_args.append("-fopenmp-simd")
            try:
                self._maybe_cuda(ext)
            except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as e:
                if _env("GMPO_EXT_CUDA", "auto").lower() != "auto":
                    raise
                print(f"gmpo_ext: WARNING: the CUDA build failed ({e}); building the CPU "
                      "kernels only (GMPO_EXT_CUDA=1 makes this an error)")
        super().build_extensions()

    def _has_openmp(self):
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "omp.c"
            src.write_text("#include <omp.h>\nint main(void){return omp_get_max_threads()<1;}\n")
            try:
                objs = self.compiler.compile([str(src)], output_dir=d, extra_postargs=["-fopenmp"])
                self.compiler.link_executable(objs, str(Path(d) / "omp"), extra_postargs=["-fopenmp"])
                return True
            except Exception:
                print("gmpo_ext: the C compiler has no OpenMP; the CPU kernels run on one thread")
                return False

    def _maybe_cuda(self, ext):
        mode = _env("GMPO_EXT_CUDA", "auto").lower()
        sources = sorted(str(p) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        if mode in ("0", "off", "false", "no") or not sources:
            print("gmpo_ext: building the CPU kernels only (GMPO_EXT_CUDA=0 or no .cu sources)")
            return
        nvcc = find_nvcc()
        if not nvcc:
            if mode in ("1", "on", "true", "yes"):
                raise RuntimeError("GMPO_EXT_CUDA=1 but nvcc was not found (set CUDA_HOME or GMPO_EXT_NVCC)")
            print("gmpo_ext: WARNING: nvcc not found, building the CPU kernels only")
            return
        archs = _env("GMPO_EXT_CUDA_ARCHS", DEFAULT_ARCHS)
        archs = ";".join(a for a in archs.split(";") if a.strip() and nvcc_supports(nvcc, a.strip().replace("sm_", "")))
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in sources:
            obj = out_dir / (Path(src).stem + ".o")
            cmd = [nvcc, "-c", src, "-o", str(obj), *NVCC_FLAGS, "-I", str(ROOT / "csrc")]
            cmd += cuda_arch_flags(archs)
            print("gmpo_ext: " + " ".join(cmd))
            subprocess.run(cmd, check=True)
            objects.append(str(obj))
        cuda_home = cuda_toolkit_root(nvcc)
        libdirs = [cuda_home / "lib64", cuda_home / "lib", cuda_home / "targets" / "x86_64-linux" / "lib",
                   cuda_home / "targets" / "sbsa-linux" / "lib"]
        libdirs = [d for d in libdirs if (d / "libcudart_static.a").exists()]
        if not libdirs:
            raise RuntimeError(f"libcudart_static.a not found under {cuda_home}; set CUDA_HOME")
        ext.extra_objects += objects
        ext.define_macros.append(("GMPO_WITH_CUDA", "1"))
        ext.library_dirs += [str(d) for d in libdirs]
        # cudart linked statically: the module needs no CUDA runtime at import,
        # and loads the driver only on the first CUDA call
        ext.libraries += ["cudart_static", "rt", "dl", "pthread"]
        ext.extra_link_args.append("-lstdc++")
        print(f"gmpo_ext: CUDA kernels built for sm {archs}")


ext = Extension(
    "gmpo_ext._C",
    sources=["csrc/module.c", "csrc/gmpo_common.c", "csrc/cpu/gmpo_cpu.c",
             "csrc/cpu/logits_cpu.c", "csrc/cpu/hidden_cpu.c"],
    include_dirs=["csrc"],
    # the CUDA objects are linked in as extra objects: list their sources too, so
    # that editing a .cu/.cuh file relinks the module
    depends=[str(p.relative_to(ROOT)) for pat in ("*.h", "*.cu", "*.cuh")
             for p in (ROOT / "csrc").rglob(pat)],
    extra_compile_args=list(C_FLAGS),
)

if sys.argv[1:] == ["--print-nvcc-flags"]:
    # for .ci/nvcc_check.sh: line 1 the flags, line 2 DEFAULT_ARCHS; nothing built
    print(" ".join(NVCC_FLAGS))
    print(" ".join(a.strip() for a in DEFAULT_ARCHS.split(";") if a.strip()))
    sys.exit(0)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
