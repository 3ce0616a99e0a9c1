"""Build gmpo_ext: the C core always, the CUDA kernels when nvcc is found.

No torch at build time: the extension is plain C (and CUDA C) behind the
CPython C API. Environment switches:

  GMPO_EXT_CUDA=auto|0|1   build the CUDA kernels: when nvcc is found (auto,
                           the default), never (0), or fail without nvcc (1)
  GMPO_EXT_CUDA_ARCHS      e.g. "80;90": the SM architectures (default
                           DEFAULT_ARCHS, 80;86;89;90;100;120), plus PTX for the
                           newest of them
  GMPO_EXT_NVCC            the nvcc to use (default: $CUDA_HOME/bin/nvcc or PATH)
  GMPO_EXT_CUDA_STRICT_ARCHS=1  fail if that nvcc lacks one of the architectures
                           asked for (by default those are skipped with a
                           warning). tools/build_wheels.sh always sets it; for a
                           toolkit older than DEFAULT_ARCHS (the cu12 flavour with
                           CUDA 12.4: no sm_100/sm_120) it asks for the subset that
                           nvcc has, so the wheel holds exactly what it says
  GMPO_EXT_OPENMP=0        build the CPU kernels without OpenMP
  GMPO_EXT_LOCAL_VERSION   a local version label for the wheel's flavour, e.g.
                           cu12 -> 0.1.0+cu12 (tools/build_wheels.sh sets it)
  GMPO_EXT_JOBS=N          compile N sources at a time (default: the CPUs this
                           process may use; MAX_JOBS is read too)

Sources: every csrc/*.c and csrc/cpu/*.c, every csrc/cuda/*.cu (globbed, so a
new file needs no edit here). The module is built on the stable ABI
(Py_LIMITED_API 3.9): one gmpo_ext-*-cp39-abi3-*.whl serves every CPython >= 3.9,
except free-threaded builds (3.13t+), which cannot load abi3 modules: there the
module is built against the full API (a cp313t wheel of its own).
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
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
# -g0 overrides the -g of Python's own CFLAGS: no debug info in the wheel (a
# quarter of the C compile time, most of the .so's size)
C_FLAGS = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fno-strict-aliasing", "-fno-trapping-math",
           "-fno-math-errno", "-g0",
           # a function outside the limited API must not compile into an import error
           "-Werror=implicit-function-declaration"]
# The stable ABI of CPython 3.9: the module uses only the limited API, so one
# abi3 wheel serves every CPython >= 3.9. Free-threaded CPython (3.13t, 3.14t)
# has no limited API (its headers refuse Py_LIMITED_API) and cannot load abi3
# modules: there the full API is used, and the wheel is tagged for that build.
LIMITED_API = "0x03090000"
ABI3_TAG = "cp39"
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def _env(name, default):
    return os.environ.get(name, default).strip()


def version():
    """gmpo_ext.__version__, plus +GMPO_EXT_LOCAL_VERSION when set."""
    text = (ROOT / "gmpo_ext" / "__init__.py").read_text()
    v = re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)
    label = _env("GMPO_EXT_LOCAL_VERSION", "")
    if label:
        if not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9]+)*", label):
            raise ValueError(f"GMPO_EXT_LOCAL_VERSION={label!r}: letters, digits and dots only")
        v += "+" + label
    return v


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


def build_jobs():
    """How many compilers run at once: GMPO_EXT_JOBS, else MAX_JOBS, else the CPUs."""
    for name in ("GMPO_EXT_JOBS", "MAX_JOBS"):
        v = _env(name, "")
        if v:
            return max(1, int(v))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def source_weight(path, depth=0):
    """Bytes of a source with its local includes, each counted as often as it
    is included (a header included once per instruction set weighs that many
    times): a rough compile cost, to start the longest compiles first."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return 0
    total = len(text)
    if depth < 8:
        for inc in _INCLUDE.findall(text):
            total += source_weight(Path(path).parent / inc, depth + 1)
    return total


def nvcc_supports(nvcc, arch):
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True)
    return out.returncode != 0 or f"compute_{arch}" in out.stdout


class BuildExt(build_ext):
    """Adds OpenMP when the compiler has it, compiles csrc/cuda/*.cu with nvcc,
    and runs the compilers in parallel (GMPO_EXT_JOBS at a time, the longest
    first: the .c files and the .cu files together)."""

    def build_extensions(self):
        self._jobs = build_jobs()
        # no run-time search path: the module needs no library of the build
        # machine's (Python's own LDSHARED may carry -Wl,-rpath,<its prefix>/lib,
        # which would end up in the wheel)
        self.compiler.linker_so = [a for a in self.compiler.linker_so
                                   if not a.startswith(("-Wl,-rpath", "-Wl,-R"))]
        for ext in self.extensions:
            if _env("GMPO_EXT_OPENMP", "1") != "0" and self._has_openmp():
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
            else:
                # the `omp simd` loops still vectorise; no runtime library needed
                ext.extra_compile_args.append("-fopenmp-simd")
            ext._nvcc_jobs = []
            self._export_only_init(ext)
            try:
                self._maybe_cuda(ext)
            except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as e:
                self._cuda_failed(ext, e)
        super().build_extensions()

    def run(self):
        super().run()
        if not self.inplace:   # (pip install -e . and build_ext --inplace set it)
            return
        for ext in self.extensions:
            # a module of another ABI in the source tree (gmpo_ext/_C.cpython-311-*.so
            # from before the abi3 build) comes first in the import suffixes and
            # would shadow the new _C.abi3.so: remove it
            name = ext.name.rsplit(".", 1)[-1]
            keep = Path(self.get_ext_filename(ext.name)).name
            for old in (ROOT / Path(*ext.name.split(".")[:-1])).glob(name + ".*.so"):
                if old.name != keep:
                    print(f"gmpo_ext: removing {old}, which would shadow {keep}")
                    old.unlink()

    def _export_only_init(self, ext):
        """Export PyInit_<name> alone (GNU ld version script): the C core's and the
        static CUDA runtime's symbols stay inside the module, so they can neither
        clash with nor be interposed by another library's of the same name."""
        if not sys.platform.startswith("linux"):
            return
        script = Path(self.build_temp) / "gmpo_ext.map"
        script.parent.mkdir(parents=True, exist_ok=True)
        init = "PyInit_" + ext.name.rsplit(".", 1)[-1]
        script.write_text(f"{{ global: {init}; local: *; }};\n")
        ext.extra_link_args.append(f"-Wl,--version-script={script}")

    def _cuda_failed(self, ext, e):
        if _env("GMPO_EXT_CUDA", "auto").lower() != "auto":
            raise e
        print(f"gmpo_ext: WARNING: the CUDA build failed ({e}); building the CPU "
              "kernels only (GMPO_EXT_CUDA=1 makes this an error)")
        ext._nvcc_jobs = []

    def build_extension(self, ext):
        # compile() runs the extension's nvcc commands beside its C sources
        compile_c = self.compiler.compile

        def compile_all(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                        extra_preargs=None, extra_postargs=None, depends=None):
            return self._compile_parallel(ext, compile_c, sources, output_dir, macros,
                                          include_dirs, debug, extra_preargs,
                                          extra_postargs, depends)

        self.compiler.compile = compile_all
        try:
            super().build_extension(ext)
        finally:
            del self.compiler.compile   # back to the class's method

    def _compile_parallel(self, ext, compile_c, sources, output_dir, macros, include_dirs,
                          debug, extra_preargs, extra_postargs, depends):
        cc = self.compiler
        macros, objects, extra_postargs, pp_opts, build = cc._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = cc._get_cc_args(pp_opts, debug, extra_preargs)
        jobs = [(source_weight(src), "c", obj) for obj, (src, _) in build.items()]
        jobs += [(w, "cu", cmd) for w, cmd in getattr(ext, "_nvcc_jobs", [])]
        jobs.sort(key=lambda j: -j[0])

        def run(job):
            _, kind, what = job
            if kind == "c":
                src, src_ext = build[what]
                cc._compile(what, src, src_ext, cc_args, extra_postargs, pp_opts)
            else:
                print("gmpo_ext: " + " ".join(what), flush=True)
                subprocess.run(what, check=True)

        print(f"gmpo_ext: compiling {len(jobs)} sources, {self._jobs} at a time", flush=True)
        errors = {}
        with ThreadPoolExecutor(max_workers=self._jobs) as pool:
            futures = [(job, pool.submit(run, job)) for job in jobs]
            for job, fut in futures:
                try:
                    fut.result()
                except Exception as e:  # noqa: BLE001  (re-raised or reported below)
                    errors[job[1]] = errors.get(job[1]) or e
        if "c" in errors:
            raise errors["c"]
        if "cu" in errors:
            # GMPO_EXT_CUDA=auto: drop the CUDA kernels, rebuild the C without them
            self._cuda_failed(ext, errors["cu"])
            self._drop_cuda(ext)
            macros = [m for m in (macros or []) if m[0] != "GMPO_WITH_CUDA"]
            return compile_c(sources, output_dir=output_dir, macros=macros,
                             include_dirs=include_dirs, debug=debug,
                             extra_preargs=extra_preargs, extra_postargs=extra_postargs,
                             depends=depends)
        return objects

    def _drop_cuda(self, ext):
        cuda = getattr(ext, "_cuda_added", {})
        ext.extra_objects = [o for o in ext.extra_objects if o not in cuda.get("objects", ())]
        ext.define_macros = [m for m in ext.define_macros if m[0] != "GMPO_WITH_CUDA"]
        ext.library_dirs = [d for d in ext.library_dirs if d not in cuda.get("library_dirs", ())]
        ext.libraries = [lib for lib in ext.libraries if lib not in cuda.get("libraries", ())]
        ext.extra_link_args = [a for a in ext.extra_link_args if a != "-lstdc++"]

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
        """Queues the nvcc commands (run by _compile_parallel) and adds the CUDA
        runtime to the link."""
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
        wanted = [a.strip() for a in _env("GMPO_EXT_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a.strip()]
        archs = ";".join(a for a in wanted if nvcc_supports(nvcc, a.replace("sm_", "")))
        missing = [a for a in wanted if a not in archs.split(";")]
        if missing and _env("GMPO_EXT_CUDA_STRICT_ARCHS", "0") == "1":
            # release wheels (tools/build_wheels.sh): every architecture or none
            raise RuntimeError(f"{nvcc} cannot compile for sm {';'.join(missing)}")
        if missing:
            print(f"gmpo_ext: WARNING: {nvcc} cannot compile for sm {';'.join(missing)}: skipped")
        if not archs:
            raise RuntimeError(f"{nvcc} supports none of the architectures {_env('GMPO_EXT_CUDA_ARCHS', DEFAULT_ARCHS)}")
        cuda_home = cuda_toolkit_root(nvcc)
        libdirs = [cuda_home / "lib64", cuda_home / "lib", cuda_home / "targets" / "x86_64-linux" / "lib",
                   cuda_home / "targets" / "sbsa-linux" / "lib"]
        libdirs = [str(d) for d in libdirs if (d / "libcudart_static.a").exists()]
        if not libdirs:
            raise RuntimeError(f"libcudart_static.a not found under {cuda_home}; set CUDA_HOME")
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        gencode = cuda_arch_flags(archs)
        # nvcc compiles the -gencode targets of one file on up to this many threads
        threads = ["--threads", str(self._jobs)] if self._jobs > 1 else []
        objects = []
        for src in sources:
            obj = out_dir / (Path(src).stem + ".o")
            cmd = [nvcc, "-c", src, "-o", str(obj), *NVCC_FLAGS, "-I", str(ROOT / "csrc"),
                   *gencode, *threads]
            # device code once per target: weigh the source by the number of targets
            ext._nvcc_jobs.append((source_weight(src) * len(gencode), cmd))
            objects.append(str(obj))
        libraries = ["cudart_static", "rt", "dl", "pthread"]
        ext._cuda_added = {"objects": objects, "library_dirs": libdirs, "libraries": libraries}
        ext.extra_objects += objects
        ext.define_macros.append(("GMPO_WITH_CUDA", "1"))
        ext.library_dirs += libdirs
        # cudart linked statically: the module needs no CUDA runtime at import,
        # and loads the driver only on the first CUDA call
        ext.libraries += libraries
        ext.extra_link_args.append("-lstdc++")
        print(f"gmpo_ext: CUDA kernels for sm {archs} ({nvcc})")


def _sources(*patterns):
    return sorted(str(p.relative_to(ROOT)) for pat in patterns for p in ROOT.glob(pat))


ext = Extension(
    "gmpo_ext._C",
    # every C source: the module (csrc/module.c, which #includes csrc/*.inc),
    # the shared checks (csrc/*.c) and the CPU kernels (csrc/cpu/*.c)
    sources=_sources("csrc/*.c", "csrc/cpu/*.c"),
    include_dirs=["csrc"],
    # the CUDA objects are linked in as extra objects: list their sources too, so
    # that editing a .cu/.cuh file relinks the module
    depends=_sources("csrc/**/*.h", "csrc/**/*.inc", "csrc/**/*.cu", "csrc/**/*.cuh"),
    extra_compile_args=list(C_FLAGS),
    # no -lm: the C kernels' libm calls (exp, log, expf, logf) stay unversioned
    # and bind to the libm that python has loaded. Linked against this host's
    # libm they would take exp@GLIBC_2.29 and the CPU wheel manylinux_2_31
    # (tools/build_wheels.sh's CUDA flavours, linked by tools/glibc_link.sh, do
    # get libm, with glibc 2.28's versions)
    define_macros=[] if FREE_THREADED else [("Py_LIMITED_API", LIMITED_API)],
    py_limited_api=not FREE_THREADED,
)

if sys.argv[1:] == ["--print-nvcc-flags"]:
    # for .ci/nvcc_check.sh: line 1 the flags, line 2 DEFAULT_ARCHS; nothing built
    print(" ".join(NVCC_FLAGS))
    print(" ".join(a.strip() for a in DEFAULT_ARCHS.split(";") if a.strip()))
    sys.exit(0)

setup(version=version(), ext_modules=[ext], cmdclass={"build_ext": BuildExt},
      # the wheel's tag: cp39-abi3 (every CPython >= 3.9, one wheel per platform)
      options={} if FREE_THREADED else {"bdist_wheel": {"py_limited_api": ABI3_TAG}})
