/*
 * logits_cuda.cu -- the CUDA kernels of gmpo_ext's fused path from logits, with
 * the extern "C" entry points of csrc/gmpo_logits.h: per-token log-probability,
 * log-sum-exp and entropy in one read of the logits (forward), the gradient of
 * the logits in one read and one write (backward). The GMPO loss (arXiv
 * 2507.20673) between the two runs on the per-token values (gmpo_loss.cu).
 *
 * Shapes (B rows, T tokens, V vocabulary; TL = T or T + 1 positions of logits):
 *   logits: (B, TL, V), unit stride on V, any stride_b / stride_t; fp32, bf16, fp16
 *   ids, mask: (B, T)         logp, entropy, lse: (B, T) contiguous fp32
 *   grad: (B, TL, V) in the logits' dtype; may be the logits' own buffer
 *
 *   forward   lg_fwd_kernel<DT>  one block per token (rows on grid.x, a grid-stride
 *                                loop beyond 2^31 - 1): each thread keeps an online
 *                                (max, sum e^(x-max), sum e^(x-max)(x-max)) over its
 *                                16-byte vectors of the row; a deterministic
 *                                butterfly merges them (the same bits every run)
 *   backward  lg_bwd_kernel<DT>  one block per position: p = exp(x - lse) and
 *                                d = G (1[v == id] - p) - Gh p (x - lse + H), / tau
 *
 * x = z / tau. Masked tokens are never read (forward writes 0, backward a zero
 * row, as for the ignored position T and for G = Gh = 0). All offsets are
 * 64-bit. An id outside [0, V) is never used as an address: forward writes NaN
 * as its logp (the Python layer counts such tokens), backward leaves out the
 * 1[v == id] term. Launched on the caller's stream; no allocation, no host
 * synchronisation, no atomics.
 *
 * Loads and stores are 16 bytes wide (4 fp32 or 8 bf16/fp16 values) from the
 * first 16-byte aligned element of a row; the few elements before it and after
 * the last full vector are taken one at a time. In backward, a gradient row not
 * aligned like its logits row falls back to scalar loads and stores.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "launch.cuh"
#include "../gmpo_logits.h"
#include "../gmpo_math.h"

#define LG_THREADS 256
#define LG_WARPS (LG_THREADS / 32)
#define LG_FULL_MASK 0xffffffffu
#define LG_MAX_GRID GMPO_MAX_GRID_X   /* launch.cuh: 2^31 - 1 unless a test build lowers it */

// everything the kernels need, by value (no pointer to host memory)
struct lg_kargs {
    int64_t B, T, TL, V;
    const char *logits;
    int64_t lsb, lst;          // logits strides (elements)
    int64_t v0, vtot;          // a vocabulary shard: first id, vocabulary (vtot 0: none)
    gmpo_view ids, mask;
    float s;                   // 1 / tau
    // forward outputs
    float *logp, *entropy, *lse;
    // backward inputs and output
    const float *lse_in, *entropy_in;
    gmpo_view g, gh;           // d loss / d logp, d loss / d entropy (data may be NULL)
    char *grad;
    int64_t gsb, gst;
};

// ----------------------------------------------------------------------------
// element access

template <int DT> struct lg_dt;
template <> struct lg_dt<GMPO_DT_F32> { enum { size = 4, vec = 4 }; };
template <> struct lg_dt<GMPO_DT_BF16> { enum { size = 2, vec = 8 }; };
template <> struct lg_dt<GMPO_DT_F16> { enum { size = 2, vec = 8 }; };

template <int DT>
GMPO_DEV float lg_from_bits(uint32_t h) {
    if (DT == GMPO_DT_F32) return __uint_as_float(h);
    if (DT == GMPO_DT_BF16) return __uint_as_float(h << 16);
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half((unsigned short)h));
#else
    return gmpo_f16_to_f32((uint16_t)h);
#endif
}

template <int DT>
GMPO_DEV uint32_t lg_to_bits(float f) {
    if (DT == GMPO_DT_F32) return __float_as_uint(f);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (DT == GMPO_DT_BF16) return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    if (DT == GMPO_DT_BF16) return gmpo_f32_to_bf16(f);
#endif
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(f));
#else
    return gmpo_f32_to_f16(f);
#endif
}

template <int DT>
GMPO_DEV float lg_ld1(const char *row, int64_t k) {
    if (DT == GMPO_DT_F32) return reinterpret_cast<const float *>(row)[k];
    return lg_from_bits<DT>(reinterpret_cast<const unsigned short *>(row)[k]);
}

template <int DT>
GMPO_DEV void lg_st1(char *row, int64_t k, float v) {
    if (DT == GMPO_DT_F32) reinterpret_cast<float *>(row)[k] = v;
    else reinterpret_cast<unsigned short *>(row)[k] = (unsigned short)lg_to_bits<DT>(v);
}

// one 16-byte vector at element k (16-byte aligned) -> x[vec]
template <int DT, bool RO>
GMPO_DEV void lg_ldv(const char *row, int64_t k, float *x) {
    const uint4 *p = reinterpret_cast<const uint4 *>(row + k * lg_dt<DT>::size);
    uint4 u = RO ? __ldg(p) : *p;
    uint32_t w[4] = {u.x, u.y, u.z, u.w};
    if (DT == GMPO_DT_F32) {
#pragma unroll
        for (int i = 0; i < 4; i++) x[i] = __uint_as_float(w[i]);
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) x[i] = lg_from_bits<DT>((w[i / 2] >> (16 * (i & 1))) & 0xffffu);
    }
}

template <int DT>
GMPO_DEV void lg_stv(char *row, int64_t k, const float *x) {
    uint32_t w[4];
    if (DT == GMPO_DT_F32) {
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = __float_as_uint(x[i]);
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = lg_to_bits<DT>(x[2 * i]) | (lg_to_bits<DT>(x[2 * i + 1]) << 16);
    }
    *reinterpret_cast<uint4 *>(row + k * lg_dt<DT>::size) = make_uint4(w[0], w[1], w[2], w[3]);
}

// elements before the first 16-byte aligned one (at most V)
template <int DT>
GMPO_DEV int64_t lg_head(const char *row, int64_t V) {
    int64_t mis = (int64_t)((uintptr_t)row & 15u);
    int64_t h = mis ? (16 - mis) / lg_dt<DT>::size : 0;
    return h < V ? h : V;
}

GMPO_DEV int64_t lg_id(const lg_kargs &a, int64_t b, int64_t t) {
    int64_t k = b * a.ids.stride_b + t * a.ids.stride_t;
    return a.ids.dtype == GMPO_DT_I64 ? reinterpret_cast<const int64_t *>(a.ids.data)[k]
                                      : (int64_t)reinterpret_cast<const int32_t *>(a.ids.data)[k];
}

GMPO_DEV bool lg_counts(const lg_kargs &a, int64_t b, int64_t t) {
    if (!a.mask.data) return true;
    return gmpo_load_f(a.mask.data, a.mask.dtype, b * a.mask.stride_b + t * a.mask.stride_t) != 0.0f;
}

// ----------------------------------------------------------------------------
// online softmax state and its merge

struct lg_state {
    float m;   // running max (never NaN)
    float s;   // sum of e^(x - m)        (NaN once a NaN was seen)
    float w;   // sum of e^(x - m) (x - m)
};

// fold n values into st (ent: also w)
GMPO_DEV void lg_fold(lg_state &st, const float *x, int n, bool ent) {
    float vm = -INFINITY;
    for (int i = 0; i < n; i++) vm = x[i] > vm ? x[i] : vm;
    if (vm > st.m) {                          // rescale what we have to the new max
        float d = st.m - vm;
        float c = __expf(d);
        st.w = st.s == 0.0f ? 0.0f : c * (st.w + d * st.s);
        st.s *= c;
        st.m = vm;
    }
    if (st.m == -INFINITY) {                  // nothing above -inf so far: only NaN counts
        for (int i = 0; i < n; i++)
            if (x[i] != x[i]) st.s = x[i];
        return;
    }
    for (int i = 0; i < n; i++) {
        float d = x[i] - st.m;
        float e = __expf(d);
        st.s += e;
        if (ent) st.w += e == 0.0f ? 0.0f : e * d;   // e = 0 where x = -inf
    }
}

// a (+) b; commutative bit for bit, so a butterfly leaves every lane the same value
GMPO_DEV lg_state lg_merge(const lg_state &a, const lg_state &b) {
    float M = a.m > b.m ? a.m : b.m;
    if (M == -INFINITY) return lg_state{M, a.s + b.s, a.w + b.w};
    float da = a.m - M, db = b.m - M;
    float ca = __expf(da), cb = __expf(db);
    float wa = a.s == 0.0f ? 0.0f : ca * (a.w + da * a.s);
    float wb = b.s == 0.0f ? 0.0f : cb * (b.w + db * b.s);
    return lg_state{M, a.s * ca + b.s * cb, wa + wb};
}

GMPO_DEV lg_state lg_warp_merge(lg_state st) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        lg_state o;
        o.m = __shfl_xor_sync(LG_FULL_MASK, st.m, off);
        o.s = __shfl_xor_sync(LG_FULL_MASK, st.s, off);
        o.w = __shfl_xor_sync(LG_FULL_MASK, st.w, off);
        st = lg_merge(st, o);
    }
    return st;
}

// the block's merged state, valid in thread 0
__device__ lg_state lg_block_merge(lg_state st, lg_state *part) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    st = lg_warp_merge(st);
    if (nwarps == 1) return st;
    if (lane == 0) part[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < nwarps ? part[lane] : lg_state{-INFINITY, 0.0f, 0.0f};
        st = lg_warp_merge(st);
    }
    __syncthreads();                           // part is reused by the next row
    return st;
}

// ----------------------------------------------------------------------------
// kernels

template <int DT>
__global__ void __launch_bounds__(LG_THREADS) lg_fwd_kernel(const lg_kargs a, int ent) {
    __shared__ lg_state part[LG_WARPS];
    const int E = lg_dt<DT>::vec;
    const int64_t rows = a.B * a.T;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t b = r / a.T, t = r % a.T;
        if (!lg_counts(a, b, t)) {             // uniform across the block
            if (threadIdx.x == 0) {
                a.logp[r] = 0.0f;
                a.lse[r] = 0.0f;
                if (ent) a.entropy[r] = 0.0f;
            }
            continue;
        }
        const char *row = a.logits + (b * a.lsb + t * a.lst) * lg_dt<DT>::size;
        const int64_t V = a.V, head = lg_head<DT>(row, V);
        const int64_t nvec = (V - head) / E, tail0 = head + nvec * E;
        lg_state st{-INFINITY, 0.0f, 0.0f};
        float x[E];
        for (int64_t k = threadIdx.x; k < head; k += blockDim.x) {
            x[0] = lg_ld1<DT>(row, k) * a.s;
            lg_fold(st, x, 1, ent);
        }
        for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
            lg_ldv<DT, true>(row, head + v * E, x);
#pragma unroll
            for (int i = 0; i < E; i++) x[i] *= a.s;
            lg_fold(st, x, E, ent);
        }
        for (int64_t k = tail0 + threadIdx.x; k < V; k += blockDim.x) {
            x[0] = lg_ld1<DT>(row, k) * a.s;
            lg_fold(st, x, 1, ent);
        }
        st = lg_block_merge(st, part);
        if (threadIdx.x == 0) {
            float ls = __logf(st.s);           // all -inf: log 0 = -inf, then NaN
            float lse = st.m + ls;
            const int64_t id = lg_id(a, b, t);
            if (a.vtot > 0) {                  // a shard's state: its max and log-sum apart
                const bool ok = id >= 0 && id < a.vtot;
                a.logp[r] = ok ? ls : __int_as_float(0x7fc00000);
                a.lse[r] = st.m;
            } else {
                const bool ok = id >= 0 && id < V;
                a.logp[r] = ok ? lg_ld1<DT>(row, ok ? id : 0) * a.s - lse : __int_as_float(0x7fc00000);
                a.lse[r] = lse;
            }
            if (ent) a.entropy[r] = ls - st.w / st.s;
        }
    }
}

// zero a gradient row without reading anything
template <int DT>
GMPO_DEV void lg_zero_row(char *grow, int64_t V) {
    const int E = lg_dt<DT>::vec;
    const int64_t head = lg_head<DT>(grow, V), nvec = (V - head) / E, tail0 = head + nvec * E;
    float z[E];
#pragma unroll
    for (int i = 0; i < E; i++) z[i] = 0.0f;
    for (int64_t k = threadIdx.x; k < head; k += blockDim.x) lg_st1<DT>(grow, k, 0.0f);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) lg_stv<DT>(grow, head + v * E, z);
    for (int64_t k = tail0 + threadIdx.x; k < V; k += blockDim.x) lg_st1<DT>(grow, k, 0.0f);
}

// the gradient of one element: x = z / tau; c = H - lse
GMPO_DEV float lg_dz(float x, float lse, float g, float gh, float c) {
    float p = __expf(x - lse);
    float d = -p * (g + gh * (x + c));
    return p == 0.0f ? 0.0f : d;               // p = 0 where x = -inf
}

template <int DT>
__global__ void __launch_bounds__(LG_THREADS) lg_bwd_kernel(const lg_kargs a) {
    const int E = lg_dt<DT>::vec;
    const int64_t rows = a.B * a.TL;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t b = r / a.TL, t = r % a.TL, V = a.V;
        char *grow = a.grad + (b * a.gsb + t * a.gst) * lg_dt<DT>::size;
        float G = 0.0f, Gh = 0.0f;
        if (t < a.T && lg_counts(a, b, t)) {
            if (a.g.data)
                G = gmpo_load_f(a.g.data, a.g.dtype, b * a.g.stride_b + t * a.g.stride_t);
            if (a.gh.data)
                Gh = gmpo_load_f(a.gh.data, a.gh.dtype, b * a.gh.stride_b + t * a.gh.stride_t);
        }
        if (G == 0.0f && Gh == 0.0f) {         // masked, ignored or no gradient: not read
            lg_zero_row<DT>(grow, V);
            continue;
        }
        const char *row = a.logits + (b * a.lsb + t * a.lst) * lg_dt<DT>::size;
        const int64_t k = b * a.T + t;
        const float lse = a.lse_in[k];
        const float g = G * a.s, gh = Gh * a.s;
        const float c = a.gh.data ? a.entropy_in[k] - lse : 0.0f;
        const int64_t id = lg_id(a, b, t) - a.v0;   // outside [0, V): never matches below
        const int64_t head = lg_head<DT>(row, V);
        const bool vec = head == lg_head<DT>(grow, V);
        const int64_t nvec = vec ? (V - head) / E : 0, tail0 = vec ? head + nvec * E : 0;
        float x[E];
        if (vec) {
            for (int64_t j = threadIdx.x; j < head; j += blockDim.x) {
                float d = lg_dz(lg_ld1<DT>(row, j) * a.s, lse, g, gh, c);
                lg_st1<DT>(grow, j, j == id ? d + g : d);
            }
            for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
                const int64_t k0 = head + v * E;
                lg_ldv<DT, false>(row, k0, x);   // may alias grow: plain loads
#pragma unroll
                for (int i = 0; i < E; i++) {
                    float d = lg_dz(x[i] * a.s, lse, g, gh, c);
                    x[i] = k0 + i == id ? d + g : d;
                }
                lg_stv<DT>(grow, k0, x);
            }
        }
        for (int64_t j = tail0 + threadIdx.x; j < V; j += blockDim.x) {
            float d = lg_dz(lg_ld1<DT>(row, j) * a.s, lse, g, gh, c);
            lg_st1<DT>(grow, j, j == id ? d + g : d);
        }
    }
}

// ----------------------------------------------------------------------------
// launchers (extern "C" entry points of gmpo_logits.h)

static lg_kargs lg_make_kargs(const gmpo_logits_args *a) {
    lg_kargs k;
    memset(&k, 0, sizeof k);
    k.B = a->B; k.T = a->T; k.TL = a->TL; k.V = a->V;
    k.logits = (const char *)a->logits.data;
    k.lsb = a->logits.stride_b; k.lst = a->logits.stride_t;
    k.ids = a->ids; k.mask = a->mask;
    k.v0 = a->vocab_start; k.vtot = a->vocab_total;
    k.s = (float)(1.0 / a->temperature);
    return k;
}

static unsigned lg_grid(int64_t rows) {
    return (unsigned)(rows < LG_MAX_GRID ? rows : LG_MAX_GRID);
}

// threads per block: a warp per 256 elements of the row, 32 to LG_THREADS
static unsigned lg_block(int64_t V) {
    int64_t w = (V + 255) / 256;
    if (w < 1) w = 1;
    if (w > LG_WARPS) w = LG_WARPS;
    return (unsigned)(32 * w);
}

extern "C" gmpo_status gmpo_logits_cuda_forward(gmpo_logits_args *a, float *logp,
                                                float *entropy, float *lse) {
    gmpo_status st = gmpo_logits_check_forward(a, logp, entropy, lse);
    if (st) return st;
    if (a->B * a->T == 0) return GMPO_OK;
    lg_kargs k = lg_make_kargs(a);
    k.logp = logp; k.entropy = entropy; k.lse = lse;
    cudaStream_t stream = (cudaStream_t)a->stream;
    unsigned grid = lg_grid(a->B * a->T), block = lg_block(a->V);
    int ent = entropy != NULL;
    switch (a->logits.dtype) {
    case GMPO_DT_F32: GMPO_LAUNCH(lg_fwd_kernel<GMPO_DT_F32>, grid, block, 0, stream, k, ent); break;
    case GMPO_DT_BF16: GMPO_LAUNCH(lg_fwd_kernel<GMPO_DT_BF16>, grid, block, 0, stream, k, ent); break;
    default: GMPO_LAUNCH(lg_fwd_kernel<GMPO_DT_F16>, grid, block, 0, stream, k, ent); break;
    }
    GMPO_CHECK_LAUNCH(a, "lg_fwd_kernel");
    return GMPO_OK;
}

extern "C" gmpo_status gmpo_logits_cuda_backward(gmpo_logits_args *a, const float *lse,
                                                 const float *entropy, gmpo_view grad_logp,
                                                 gmpo_view grad_entropy, gmpo_view grad) {
    gmpo_status st = gmpo_logits_check_backward(a, lse, entropy, grad_logp, grad_entropy, grad);
    if (st) return st;
    if (a->B * a->TL == 0) return GMPO_OK;
    lg_kargs k = lg_make_kargs(a);
    k.lse_in = lse; k.entropy_in = entropy;
    k.g = grad_logp; k.gh = grad_entropy;
    k.grad = (char *)grad.data; k.gsb = grad.stride_b; k.gst = grad.stride_t;
    cudaStream_t stream = (cudaStream_t)a->stream;
    unsigned grid = lg_grid(a->B * a->TL), block = lg_block(a->V);
    switch (a->logits.dtype) {
    case GMPO_DT_F32: GMPO_LAUNCH(lg_bwd_kernel<GMPO_DT_F32>, grid, block, 0, stream, k); break;
    case GMPO_DT_BF16: GMPO_LAUNCH(lg_bwd_kernel<GMPO_DT_BF16>, grid, block, 0, stream, k); break;
    default: GMPO_LAUNCH(lg_bwd_kernel<GMPO_DT_F16>, grid, block, 0, stream, k); break;
    }
    GMPO_CHECK_LAUNCH(a, "lg_bwd_kernel");
    return GMPO_OK;
}
