#!/usr/bin/env bash
# glibc_link.sh -- link gmpo_ext's module against an older glibc's symbol versions.
#
# A drop-in for the `gcc -shared ...` that setuptools runs (tools/build_wheels.sh
# sets LDSHARED to this script for the CUDA flavours): the objects are still
# compiled by the host's gcc and nvcc; only the final link is done by zig's
# clang driver and ld.lld with `-target <arch>-linux-gnu.<GLIBC_LINK_TARGET>`,
# against the stub libc/libm/libpthread/libdl/librt that zig generates for that
# glibc version. The static CUDA runtime's pthread/sem/dl calls then bind to
# the versions that glibc has (GLIBC_2.2.5 ...) instead of the GLIBC_2.34 ones
# of this host's libc.so, and the wheel can carry the manylinux_2_28 tag.
#
#   LDSHARED=tools/glibc_link.sh GLIBC_LINK_ZIG="python -m ziglang" GLIBC_LINK_TARGET=2.28 pip wheel ...
#
# Rewritten arguments: -fopenmp becomes the host gcc's libgomp.so (the objects
# were compiled by that gcc: its GOMP_* entry points, the libgomp.so.1 that torch
# ships); -lstdc++ becomes that gcc's libstdc++.so, linked --as-needed (a
# NEEDED entry only if a symbol of it is used); the host gcc's own libgcc.a goes
# before zig's compiler-rt, so that gcc's target_clones resolvers get gcc's
# __cpu_model / __cpu_indicator_init, and then its libgcc_s.so.1 --as-needed,
# as gcc itself links (GCC_* symbol versions, e.g. the unwinder's
# _Unwind_Resume that CUDA 13's static runtime calls); -Wl,-rpath* is dropped.
#
# After the link the module's dynamic symbols are checked: every undefined
# GLIBC_ symbol must have a version <= GLIBC_LINK_TARGET, and every unversioned
# undefined symbol must be weak or a Python C-API one (the module is loaded
# into python, never linked against libpython). Exit status: the link's, or 1
# if that check fails (the output is removed).
#
# Environment:
#   GLIBC_LINK_ZIG     how to run zig (default `zig`; tools/build_wheels.sh passes
#                      its tool venv's `python -m ziglang`, PyPI's ziglang package)
#   GLIBC_LINK_TARGET  the glibc version (default 2.28)
#   GLIBC_LINK_HOST_CC the compiler that compiled the objects (default gcc)
set -u -o pipefail

TARGET="${GLIBC_LINK_TARGET:-2.28}"
read -r -a ZIG <<<"${GLIBC_LINK_ZIG:-zig}"
HOST_CC="${GLIBC_LINK_HOST_CC:-gcc}"
ARCH="$(uname -m)"
me="glibc_link"

# always a shared object (setuptools passes LDSHARED's words, then the objects)
args=(-shared) out="" omp=0 cxx=0 expect_out=0
for a in "$@"; do
    if [ $expect_out = 1 ]; then out=$a; expect_out=0; args+=("$a"); continue; fi
    case "$a" in
        -o) expect_out=1; args+=("$a") ;;
        -shared) ;;
        -fopenmp) omp=1 ;;
        -lstdc++) cxx=1 ;;
        -Wl,-rpath*|-Wl,-R*) ;;
        *) args+=("$a") ;;
    esac
done
if [ -z "$out" ]; then echo "$me: no -o in the link command: $*" >&2; exit 1; fi

libgcc="$("$HOST_CC" -print-libgcc-file-name)" && [ -f "$libgcc" ] ||
    { echo "$me: $HOST_CC -print-libgcc-file-name gave no libgcc.a" >&2; exit 1; }
gcc_s="$("$HOST_CC" -print-file-name=libgcc_s.so.1)"
[ -f "$gcc_s" ] || { echo "$me: $HOST_CC has no libgcc_s.so.1" >&2; exit 1; }
# as gcc links: libgcc.a, then libgcc_s.so.1 as needed (the unwinder: the static
# CUDA 13 runtime calls _Unwind_Resume)
extra=("$libgcc" -Wl,--as-needed "$gcc_s" -Wl,--no-as-needed)
if [ $omp = 1 ]; then
    gomp="$("$HOST_CC" -print-file-name=libgomp.so)"
    [ -f "$gomp" ] || { echo "$me: -fopenmp but $HOST_CC has no libgomp.so" >&2; exit 1; }
    extra+=("$gomp")
fi
if [ $cxx = 1 ]; then
    stdcxx="$("$HOST_CC" -print-file-name=libstdc++.so)"
    [ -f "$stdcxx" ] || { echo "$me: -lstdc++ but $HOST_CC has no libstdc++.so" >&2; exit 1; }
    extra+=(-Wl,--as-needed "$stdcxx" -Wl,--no-as-needed)
fi

"${ZIG[@]}" cc -target "$ARCH-linux-gnu.$TARGET" "${args[@]}" "${extra[@]}" || exit $?

# the check: GLIBC_x.y <= TARGET; unversioned undefined symbols only weak or Python's
bad="$(readelf --dyn-syms -W "$out" | awk -v target="$TARGET" '
    function newer(v, t,   a, b, n, m, i) {
        n = split(v, a, "."); m = split(t, b, ".")
        for (i = 1; i <= (n > m ? n : m); i++) {
            if ((a[i] + 0) > (b[i] + 0)) return 1
            if ((a[i] + 0) < (b[i] + 0)) return 0
        }
        return 0
    }
    $7 == "UND" && NF >= 8 {
        name = $8; ver = ""
        if (index(name, "@")) { ver = name; sub(/^[^@]*@+/, "", ver); sub(/@.*/, "", name) }
        if (ver ~ /^GLIBC_[0-9.]+$/) {
            v = ver; sub(/^GLIBC_/, "", v)
            if (newer(v, target)) print name "@" ver
        } else if (ver == "" && $5 != "WEAK" && name !~ /^_?Py/) {
            print name " (unversioned)"
        }
    }')"
if [ -n "$bad" ]; then
    echo "$me: $out needs symbols that glibc $TARGET lacks, or an unresolved non-Python symbol:" >&2
    echo "$bad" | sed 's/^/    /' >&2
    rm -f "$out"
    exit 1
fi
newest="$(readelf --dyn-syms -W "$out" | grep -o '@GLIBC_[0-9.]*' | sed 's/@GLIBC_//' | sort -t. -k1,1n -k2,2n -k3,3n -u | tail -1)"
echo "$me: linked $out with $("${ZIG[@]}" version 2>/dev/null | sed 's/^/zig /') for glibc $TARGET" \
     "(newest glibc symbol version it needs: ${newest:-none})"
