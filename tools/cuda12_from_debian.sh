#!/usr/bin/env bash
# cuda12_from_debian.sh -- a CUDA 12.4 nvcc for the cu12 wheel flavour, unpacked
# (never installed) from Debian trixie's packages of NVIDIA's toolkit.
#
#   tools/cuda12_from_debian.sh DEST        (e.g. /opt/cuda12; about 3 GB unpacked)
#   NVCC_CU12=DEST/cuda-12.4/bin/nvcc tools/build_wheels.sh cu12
#
# PyPI has no CUDA 12 nvcc driver (nvidia-cuda-nvcc-cu12 holds ptxas and libnvvm
# only). Debian trixie's non-free section repackages NVIDIA's CUDA 12.4.1
# binaries: nvidia-cuda-toolkit (nvcc, cicc, ptxas, fatbinary, nvlink, cudafe++,
# cuobjdump, libdevice), nvidia-cuda-dev (the headers, crt/ included, and
# libcudart_static.a; ~930 MB, as it carries every CUDA library), libnvvm4,
# libcudart12; the CCCL headers that cuda_fp16.h includes (<nv/target>) are in
# main's libcu++-dev. This script reads the two Packages indexes, downloads those
# five .debs from the pool (sha256 checked against the index; kept in DEST/debs
# and reused), extracts them with dpkg-deb -x into DEST/root, and makes
# DEST/cuda-12.4, a CUDA_HOME-style tree of symlinks into it (bin/, nvvm/,
# include/, lib64/) with an nvcc.profile of its own (Debian's points at /usr).
# Nothing is installed into the system; the host compiler is the system's gcc
# (CUDA 12.4 supports gcc up to 13).
#
# Environment: MIRROR (default http://deb.debian.org/debian), SUITE (trixie).
# Exit status: 0 and DEST/cuda-12.4/bin/nvcc --version printed; 1 otherwise.
set -u -o pipefail

DEST="${1:?usage: cuda12_from_debian.sh DEST}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SUITE="${SUITE:-trixie}"
NONFREE=(nvidia-cuda-toolkit nvidia-cuda-dev libnvvm4 libcudart12)
MAIN=(libcu++-dev)
log() { echo "cuda12_from_debian: $*"; }

command -v dpkg-deb > /dev/null || { log "dpkg-deb not found"; exit 1; }
mkdir -p "$DEST/debs" "$DEST/root" || exit 1
DEST="$(cd "$DEST" && pwd)"

# "Filename SHA256 Version" of a package in an uncompressed Packages index
entry() {
    awk -v p="$2" '
        $0 == "Package: " p { f = 1; next }
        f && /^Version: / { v = $2 } f && /^Filename: / { fn = $2 } f && /^SHA256: / { h = $2 }
        f && /^$/ { print fn, h, v; exit }' "$1"
}

fetch_debs() {   # component package...
    local comp=$1; shift
    local index="$DEST/debs/Packages.$comp"
    if [ ! -s "$index" ]; then
        log "index $SUITE/$comp"
        curl -fsS "$MIRROR/dists/$SUITE/$comp/binary-amd64/Packages.xz" | xz -dc > "$index" ||
            { rm -f "$index"; log "could not read $MIRROR/dists/$SUITE/$comp"; return 1; }
    fi
    local p fn h v deb
    for p in "$@"; do
        read -r fn h v <<<"$(entry "$index" "$p")"
        [ -n "${fn:-}" ] || { log "$p not in $SUITE/$comp"; return 1; }
        deb="$DEST/debs/$(basename "$fn")"
        if [ ! -f "$deb" ] || ! echo "$h  $deb" | sha256sum -c --status; then
            log "$p $v ($fn)"
            curl -fsS -o "$deb" "$MIRROR/$fn" || { log "download of $fn failed"; return 1; }
            echo "$h  $deb" | sha256sum -c --status || { log "$deb: sha256 mismatch"; return 1; }
        fi
        dpkg-deb -x "$deb" "$DEST/root" || return 1
    done
}

fetch_debs non-free "${NONFREE[@]}" && fetch_debs main "${MAIN[@]}" || exit 1

R="$DEST/root"
H="$DEST/cuda-12.4"
rm -rf "$H" && mkdir -p "$H/bin" "$H/nvvm/bin" "$H/nvvm/lib64" "$H/lib64" || exit 1
ln -s "$R/usr/lib/nvidia-cuda-toolkit/bin/nvcc" "$H/bin/nvcc"      # the real nvcc (usr/bin/nvcc is Debian's wrapper)
ln -s "$R/usr/lib/nvidia-cuda-toolkit/bin/crt" "$H/bin/crt"        # link.stub, prelink.stub
for t in ptxas fatbinary nvlink cudafe++ bin2c cuobjdump nvdisasm nvprune cu++filt; do
    ln -s "$R/usr/bin/$t" "$H/bin/$t"
done
ln -s "$R/usr/lib/nvidia-cuda-toolkit/bin/cicc" "$H/nvvm/bin/cicc"
ln -s "$R/usr/lib/nvidia-cuda-toolkit/libdevice" "$H/nvvm/libdevice"
ln -s "$R/usr/lib/x86_64-linux-gnu/libnvvm.so.4" "$H/nvvm/lib64/libnvvm.so.4"
ln -s "$R/usr/include" "$H/include"
for l in libcudart_static.a libcudadevrt.a libculibos.a; do
    ln -s "$R/usr/lib/x86_64-linux-gnu/$l" "$H/lib64/$l"
done
cat > "$H/bin/nvcc.profile" <<'EOF'
# written by gmpo_ext's tools/cuda12_from_debian.sh: this toolkit's own paths
TOP                = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH              += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES          += "-I$(TOP)/include" $(_SPACE_)
LIBRARIES          =+ $(_SPACE_) "-L$(TOP)/lib64"
EOF

# a smoke compile: host and device code, the static runtime
t="$(mktemp -d)"
printf '#include <cuda_runtime.h>\n#include <cuda_bf16.h>\n__global__ void k(float *x) { x[threadIdx.x] *= 2.f; }\nint main(void) { int v = 0; cudaRuntimeGetVersion(&v); return v == 0; }\n' > "$t/k.cu"
if ! "$H/bin/nvcc" -gencode=arch=compute_80,code=sm_80 -cudart static "$t/k.cu" -o "$t/k" > "$t/log" 2>&1; then
    log "the test compile failed:"; cat "$t/log"; rm -rf "$t"; exit 1
fi
rm -rf "$t"
"$H/bin/nvcc" --version | tail -2
log "NVCC_CU12=$H/bin/nvcc"
