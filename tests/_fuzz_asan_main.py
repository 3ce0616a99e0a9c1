"""Runs the properties (and reproducers) of tests/test_fuzz.py against the sanitized gmpo_ext._C.

    LD_PRELOAD=<libasan>:<libubsan> python tests/_fuzz_asan_main.py <built _C module> [test names]

(tests/_asan_build.run_env() gives the environment; test_fuzz.py's
test_fuzz_under_asan starts this). The module at the path given is installed
as sys.modules["gmpo_ext._C"] before gmpo_ext is imported, so every kernel call
of the run goes through the instrumented code. Each property runs under the
derandomized profile with GMPO_FUZZ_EXAMPLES examples; the process exits 0 when
all pass, 1 when one fails (its falsifying example printed), and with the
sanitizers' exit status at the first report.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv):
    path = Path(argv[1]).resolve()
    spec = importlib.util.spec_from_file_location("gmpo_ext._C", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gmpo_ext._C"] = mod
    spec.loader.exec_module(mod)

    maps = Path("/proc/self/maps").read_text()
    if "libasan" not in maps:
        print("the AddressSanitizer runtime is not loaded (LD_PRELOAD)", file=sys.stderr)
        return 2

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import torch
    torch.set_num_threads(1)
    import gmpo_ext
    import gmpo_ext._backend

    if gmpo_ext._backend._C is not mod:
        print(f"gmpo_ext uses {gmpo_ext._backend._C.__file__}, not {path}", file=sys.stderr)
        return 2
    import test_fuzz

    if not Path(gmpo_ext.__file__).resolve().is_relative_to(HERE.parent):
        print(f"gmpo_ext comes from {gmpo_ext.__file__}, not this checkout", file=sys.stderr)
        return 2

    # the properties, then the reproducers of what the fuzzer found (plain functions)
    names = argv[2:] or [n for n in dir(test_fuzz) if n.startswith("test_")
                         and hasattr(getattr(test_fuzz, n), "hypothesis")] + test_fuzz.REPROS
    failed = []
    for name in names:
        t0 = time.perf_counter()
        try:
            getattr(test_fuzz, name)()
            status = "passed"
        except BaseException:   # report each property's failure, then go on
            traceback.print_exc()
            status = "FAILED"
            failed.append(name)
        n = f", {test_fuzz.EXAMPLES} examples" if name.startswith("test_") else ""
        print(f"{name}: {status} ({time.perf_counter() - t0:.1f} s{n})", flush=True)
    print(f"module: {path}")
    print(f"{len(names) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
