#!/usr/bin/env bash
# nvcc_check.sh -- static checks of the CUDA kernels that need no GPU.
#
# Compiles every csrc/cuda/*.cu with exactly setup.py's nvcc flags
# (`python setup.py --print-nvcc-flags`: NVCC_FLAGS, then -I csrc) for every
# architecture of setup.py's DEFAULT_ARCHS, one -gencode=arch=compute_X,code=sm_X
# at a time as the build does, plus ptxas' verbose report, its spill and
# local-memory warnings and all warnings (nvcc's, ptxas', the host compiler's) as
# errors. Fails on any spill, any stack frame (local memory) or any warning.
# Writes, per file and arch, the ptxas log and the PTX (kept from the same
# compilation) into OUT_DIR, and prints registers, spills, stack and shared
# memory per kernel.
#
#   .ci/nvcc_check.sh [OUT_DIR]                 (default build/nvcc_check)
#   NVCC=... ARCHS="80 90" CU_SOURCES="a.cu b.cu" JOBS=2 PYTHON=... .ci/nvcc_check.sh
#
# ARCHS overrides the architectures (default: setup.py's). The flags always come
# from setup.py.
#
# Exit status: 0 clean; 1 a compile error, a warning, a spill or a stack frame,
# or setup.py's flags could not be read; 77 no nvcc.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/build/nvcc_check}"
NVCC="${NVCC:-${GMPO_EXT_NVCC:-}}"
if [ -z "$NVCC" ]; then
    if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC="$CUDA_HOME/bin/nvcc"
    else NVCC="$(command -v nvcc || true)"; fi
fi
if [ -z "$NVCC" ]; then
    echo "nvcc_check: nvcc not found (set NVCC, GMPO_EXT_NVCC or CUDA_HOME)" >&2
    exit 77
fi

PYTHON="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [ -z "$PYTHON" ] || ! CONFIG="$(cd "$ROOT" && "$PYTHON" setup.py --print-nvcc-flags)" ||
        [ "$(printf '%s\n' "$CONFIG" | wc -l)" -ne 2 ]; then
    echo "nvcc_check: could not read the nvcc flags from setup.py --print-nvcc-flags" >&2
    exit 1
fi
read -r -a SETUP_FLAGS <<<"$(printf '%s\n' "$CONFIG" | sed -n 1p)"
ARCHS="${ARCHS:-$(printf '%s\n' "$CONFIG" | sed -n 2p)}"
JOBS="${JOBS:-2}"
mkdir -p "$OUT"

FLAGS=("${SETUP_FLAGS[@]}" -I "$ROOT/csrc")
CHECKS=(-Xptxas -v,-warn-spills,-warn-lmem-usage -Werror all-warnings --resource-usage
        -Xcompiler -Wall,-Wextra,-Werror)
echo "nvcc_check: $("$NVCC" --version | tail -1)"
echo "nvcc_check: flags ${FLAGS[*]}; archs $ARCHS"

shopt -s nullglob
if [ -n "${CU_SOURCES:-}" ]; then read -r -a SOURCES <<<"$CU_SOURCES"
else SOURCES=("$ROOT"/csrc/cuda/*.cu); fi
if [ ${#SOURCES[@]} -eq 0 ]; then
    echo "nvcc_check: no csrc/cuda/*.cu" >&2
    exit 1
fi

# one compilation: the object with the ptxas report, and its PTX (-keep; searched
# by tests/test_cuda_build.py)
compile() {
    local src="$1" arch="$2" stem base keep
    stem="$(basename "$1" .cu)"
    base="$OUT/$stem.sm_$arch"
    keep="$OUT/keep.$stem.sm_$arch"
    rm -rf "$keep" && mkdir -p "$keep" || return 1
    "$NVCC" -c "$src" -o "$base.o" "-gencode=arch=compute_$arch,code=sm_$arch" "${FLAGS[@]}" \
        "${CHECKS[@]}" -keep -keep-dir "$keep" >"$base.log" 2>&1
    local rc=$?
    if [ -f "$keep/$stem.ptx" ]; then mv "$keep/$stem.ptx" "$base.ptx"; fi
    rm -rf "$keep"
    return $rc
}

status=0
pids=()
for src in "${SOURCES[@]}"; do
    for arch in $ARCHS; do
        compile "$src" "$arch" &
        pids+=($!)
        if [ ${#pids[@]} -ge "$JOBS" ]; then wait "${pids[0]}" || status=1; pids=("${pids[@]:1}"); fi
    done
done
for p in "${pids[@]}"; do wait "$p" || status=1; done

printf '%-7s %-44s %5s %8s %8s %6s %6s\n' arch kernel regs spill_st spill_ld stack smem
for src in "${SOURCES[@]}"; do
    stem="$(basename "$src" .cu)"
    for arch in $ARCHS; do
        log="$OUT/$stem.sm_$arch.log"
        # ptxas -v: "Compiling entry function 'K'", "N bytes stack frame, S bytes spill
        # stores, L bytes spill loads", "Used R registers, ..., M bytes smem"
        awk '
            /Compiling entry function/ { k = $0; sub(/.*function \047/, "", k); sub(/\047.*/, "", k) }
            /bytes stack frame/ { st = $1; ss = $5; sl = $9 }
            /Used [0-9]+ registers/ {
                r = $0; sub(/.*Used /, "", r); sub(/ registers.*/, "", r)
                sm = 0; if (match($0, /[0-9]+ bytes smem/)) { sm = substr($0, RSTART, RLENGTH); sub(/ .*/, "", sm) }
                print k, r, ss, sl, st, sm
            }' "$log" | while read -r k r ss sl st sm; do
            name="$(echo "$k" | c++filt | sed 's/(.*//; s/^void //')"
            printf '%-7s %-44s %5s %8s %8s %6s %6s\n' "sm_$arch" "$name" "$r" "$ss" "$sl" "$st" "$sm"
        done
        # a file with kernels must have their report (a host-only .cu has none)
        if grep -q '__global__' "$src" && ! grep -q 'Used [0-9]* registers' "$log"; then
            echo "nvcc_check: no ptxas report for $stem on sm_$arch" >&2
            cat "$log" >&2
            status=1
        fi
        if grep -E -q '[1-9][0-9]* bytes spill' "$log"; then
            echo "nvcc_check: spills in $stem for sm_$arch" >&2
            status=1
        fi
        if grep -E -q '[1-9][0-9]* bytes stack frame' "$log"; then
            echo "nvcc_check: a stack frame (local memory) in $stem for sm_$arch" >&2
            status=1
        fi
        if grep -E -q -i '(warning|error)' "$log"; then
            grep -E -i '(warning|error)' "$log" >&2
            status=1
        fi
    done
done
if [ $status -eq 0 ]; then
    echo "nvcc_check: OK, no spill, no local memory, no warning (logs and PTX in $OUT)"
else
    echo "nvcc_check: FAILED (logs in $OUT)" >&2
fi
exit $status
