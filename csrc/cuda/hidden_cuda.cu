/*
 * hidden_cuda.cu -- the CUDA tile kernels of gmpo_ext's path from hidden states
 * (the LM head fused; GMPO, arXiv 2507.20673), with the extern "C" entry points
 * of csrc/gmpo_hidden.h. cuBLAS (torch) computes each (n, vn) tile of
 * y = h W^T + b; these kernels fold it and turn it into its gradient.
 *
 * Shapes (n tokens of the tile, vn columns, V vocabulary):
 *   tile: (n, vn), row stride ld, fp32 / bf16 / fp16     ids: (n,) int64 / int32
 *   state: (n, 4) fp32 (max, sum exp, entropy term, target logit)
 *   lse, entropy, grad_logp, grad_entropy: (n,) fp32
 *
 *   hd_fold_kernel<DT>  one block per token (grid-stride over tokens): each
 *                       thread folds its columns online (max, sum e^(x-max),
 *                       sum e^(x-max)(x-max)); a warp butterfly and one pass over
 *                       the warps merge them with gmpo_lse_merge, the same
 *                       primitive that merges tiles (and vocab-parallel ranks)
 *   hd_grad_kernel<DT>  one block per token: x, p = exp(x - lse), dL/dx, times
 *                       the chain factor s/tau (1 - tanh^2), written in place
 *
 * The transform (scale, softcap, 1/tau) and the merge are gmpo_hidden.h's
 * GMPO_HD functions, shared with the C kernels. All offsets are 64-bit. An id
 * outside [0, V) is never used as an address: the fold of the tile that starts
 * at v0 = 0 stores NaN as its target logit (so logp is NaN), and the gradient
 * leaves out the 1[v == id] term. No allocation, no host sync, no atomics.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "launch.cuh"
#include "../gmpo_hidden.h"

#define HD_THREADS 256
#define HD_WARPS (HD_THREADS / 32)
#define HD_FULL_MASK 0xffffffffu

struct hd_kargs {
    int64_t n, vn, v0, V, ld;
    char *tile;
    const void *ids;
    int32_t ids_dtype;
    float s, c, inv_c, inv_t;
    int softcap, entropy;
    float *state;                                // fold
    const float *lse, *ent, *g, *gh;             // grad (g, gh may be NULL)
};

// ----------------------------------------------------------------------------
// element access

template <int DT>
GMPO_DEV float hd_ld(const char *row, int64_t k) {
    if (DT == GMPO_DT_F32) return reinterpret_cast<const float *>(row)[k];
    unsigned short h = reinterpret_cast<const unsigned short *>(row)[k];
    if (DT == GMPO_DT_BF16) return __uint_as_float((uint32_t)h << 16);
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    return gmpo_f16_to_f32(h);
#endif
}

template <int DT>
GMPO_DEV void hd_st(char *row, int64_t k, float v) {
    if (DT == GMPO_DT_F32) {
        reinterpret_cast<float *>(row)[k] = v;
        return;
    }
    unsigned short h;
#if defined(__CUDA_ARCH__)
    if (DT == GMPO_DT_BF16) h = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    else h = __half_as_ushort(__float2half_rn(v));
#else
    h = DT == GMPO_DT_BF16 ? gmpo_f32_to_bf16(v) : gmpo_f32_to_f16(v);
#endif
    reinterpret_cast<unsigned short *>(row)[k] = h;
}

GMPO_DEV int64_t hd_id(const hd_kargs &a, int64_t r) {
    return a.ids_dtype == GMPO_DT_I64 ? reinterpret_cast<const int64_t *>(a.ids)[r]
                                      : (int64_t)reinterpret_cast<const int32_t *>(a.ids)[r];
}

GMPO_DEV float hd_x(const hd_kargs &a, float y) {
    return gmpo_head_x(y, a.s, a.c, a.inv_c, a.inv_t, a.softcap);
}

// ----------------------------------------------------------------------------
// merging states across a block

GMPO_DEV void hd_warp_merge(float *st) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        float o[GMPO_LSE_STATE];
#pragma unroll
        for (int i = 0; i < GMPO_LSE_STATE; i++) o[i] = __shfl_xor_sync(HD_FULL_MASK, st[i], off);
        gmpo_lse_merge(st, o);
    }
}

// ----------------------------------------------------------------------------
// kernels

template <int DT>
__global__ void __launch_bounds__(HD_THREADS) hd_fold_kernel(const hd_kargs a) {
    __shared__ float part[HD_WARPS][GMPO_LSE_STATE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int64_t r = blockIdx.x; r < a.n; r += gridDim.x) {
        const char *row = a.tile + r * a.ld * (DT == GMPO_DT_F32 ? 4 : 2);
        float m = -INFINITY, s = 0.0f, w = 0.0f;
        bool nan = false;
        for (int64_t k = threadIdx.x; k < a.vn; k += blockDim.x) {
            float x = hd_x(a, hd_ld<DT>(row, k));
            nan |= x != x;
            if (x > m) {                         // rescale to the new max
                float d = m - x, c = __expf(d);
                w = s == 0.0f ? 0.0f : c * (w + d * s);
                s *= c;
                m = x;
            }
            if (m != -INFINITY) {
                float d = x - m, e = __expf(d);
                s += e;
                if (a.entropy) w += e == 0.0f ? 0.0f : e * d;
            }
        }
        float st[GMPO_LSE_STATE] = {nan ? NAN : m, s, w, 0.0f};
        hd_warp_merge(st);
        if (nwarps > 1) {
            if (lane == 0)
                for (int i = 0; i < GMPO_LSE_STATE; i++) part[warp][i] = st[i];
            __syncthreads();
            if (warp == 0) {
                if (lane < nwarps) {
                    for (int i = 0; i < GMPO_LSE_STATE; i++) st[i] = part[lane][i];
                } else {
                    gmpo_lse_init(st);
                }
                hd_warp_merge(st);
            }
            __syncthreads();                     // part is reused by the next row
        }
        if (threadIdx.x == 0) {
            const int64_t id = hd_id(a, r), local = id - a.v0;
            if (local >= 0 && local < a.vn) st[3] = hd_x(a, hd_ld<DT>(row, local));
            else if (a.v0 == 0 && (id < 0 || id >= a.V)) st[3] = NAN;
            gmpo_lse_merge(a.state + r * GMPO_LSE_STATE, st);
        }
    }
}

template <int DT>
__global__ void __launch_bounds__(HD_THREADS) hd_grad_kernel(const hd_kargs a) {
    for (int64_t r = blockIdx.x; r < a.n; r += gridDim.x) {
        char *row = a.tile + r * a.ld * (DT == GMPO_DT_F32 ? 4 : 2);
        const float G = a.g ? a.g[r] : 0.0f, Gh = a.gh ? a.gh[r] : 0.0f;
        if (G == 0.0f && Gh == 0.0f) {           // no gradient: a zero row, not read
            for (int64_t k = threadIdx.x; k < a.vn; k += blockDim.x) hd_st<DT>(row, k, 0.0f);
            continue;
        }
        const float lse = a.lse[r], c = a.gh ? a.ent[r] - lse : 0.0f;
        const int64_t local = hd_id(a, r) - a.v0;   // outside the tile: never matches
        for (int64_t k = threadIdx.x; k < a.vn; k += blockDim.x) {
            float u = hd_ld<DT>(row, k) * a.s, x, kf;
            if (a.softcap) {
                float t = gmpo_tanh_f(u * a.inv_c);
                x = a.c * t * a.inv_t;
                kf = a.s * a.inv_t * (1.0f - t * t);
            } else {
                x = u * a.inv_t;
                kf = a.s * a.inv_t;
            }
            float p = __expf(x - lse);
            float d = p == 0.0f ? 0.0f : -p * (G + Gh * (x + c));   // p = 0 where x = -inf
            if (k == local) d += G;
            hd_st<DT>(row, k, d * kf);
        }
    }
}

// ----------------------------------------------------------------------------
// launchers (extern "C" entry points of gmpo_hidden.h)

static hd_kargs hd_make(const gmpo_tile_args *a) {
    hd_kargs k;
    memset(&k, 0, sizeof k);
    k.n = a->n; k.vn = a->vn; k.v0 = a->v0; k.V = a->V; k.ld = a->ld;
    k.tile = (char *)a->tile;
    k.ids = a->ids; k.ids_dtype = a->ids_dtype;
    k.s = (float)a->logit_scale;
    k.softcap = a->softcap > 0.0;
    k.c = k.softcap ? (float)a->softcap : 1.0f;
    k.inv_c = 1.0f / k.c;
    k.inv_t = (float)(1.0 / a->temperature);
    k.entropy = a->entropy != 0;
    return k;
}

// blocks for n tokens: the kernels grid-stride over tokens, so the grid obeys
// launch.cuh's cap (a tiny-grid build makes every block take several tokens)
static unsigned hd_grid(int64_t n) { return (unsigned)(n < GMPO_MAX_GRID_X ? n : GMPO_MAX_GRID_X); }

// threads per block: a warp per 256 columns, 32 to HD_THREADS
static unsigned hd_block(int64_t vn) {
    int64_t w = (vn + 255) / 256;
    if (w < 1) w = 1;
    if (w > HD_WARPS) w = HD_WARPS;
    return (unsigned)(32 * w);
}

extern "C" gmpo_status gmpo_hidden_cuda_fold(gmpo_tile_args *a, float *state,
                                             int64_t state_extent) {
    gmpo_status st = gmpo_hidden_check_tile(a);
    if (st) return st;
    if (a->n == 0) return GMPO_OK;
    if (!state || state_extent / GMPO_LSE_STATE < a->n) {
        snprintf(a->err, sizeof a->err, "state: its extent is smaller than n x 4 floats");
        return GMPO_EINVAL;
    }
    if (a->vn == 0) return GMPO_OK;
    hd_kargs k = hd_make(a);
    k.state = state;
    cudaStream_t stream = (cudaStream_t)a->stream;
    unsigned grid = hd_grid(a->n), block = hd_block(a->vn);
    switch (a->dtype) {
    case GMPO_DT_F32: GMPO_LAUNCH(hd_fold_kernel<GMPO_DT_F32>, grid, block, 0, stream, k); break;
    case GMPO_DT_BF16: GMPO_LAUNCH(hd_fold_kernel<GMPO_DT_BF16>, grid, block, 0, stream, k); break;
    default: GMPO_LAUNCH(hd_fold_kernel<GMPO_DT_F16>, grid, block, 0, stream, k); break;
    }
    GMPO_CHECK_LAUNCH(a, "hd_fold_kernel");
    return GMPO_OK;
}

extern "C" gmpo_status gmpo_hidden_cuda_grad(gmpo_tile_args *a, const float *lse,
                                             const float *entropy, const float *grad_logp,
                                             const float *grad_entropy, int64_t extent) {
    gmpo_status st = gmpo_hidden_check_tile(a);
    if (st) return st;
    if (a->n == 0 || a->vn == 0) return GMPO_OK;
    if (!lse || extent < a->n) {
        snprintf(a->err, sizeof a->err, "lse: missing, or its extent is smaller than the n tokens");
        return GMPO_EINVAL;
    }
    if (grad_entropy && !entropy) {
        snprintf(a->err, sizeof a->err, "entropy: needed (the forward's) when grad_entropy is given");
        return GMPO_EINVAL;
    }
    hd_kargs k = hd_make(a);
    k.lse = lse; k.ent = entropy; k.g = grad_logp; k.gh = grad_entropy;
    cudaStream_t stream = (cudaStream_t)a->stream;
    unsigned grid = hd_grid(a->n), block = hd_block(a->vn);
    switch (a->dtype) {
    case GMPO_DT_F32: GMPO_LAUNCH(hd_grad_kernel<GMPO_DT_F32>, grid, block, 0, stream, k); break;
    case GMPO_DT_BF16: GMPO_LAUNCH(hd_grad_kernel<GMPO_DT_BF16>, grid, block, 0, stream, k); break;
    default: GMPO_LAUNCH(hd_grad_kernel<GMPO_DT_F16>, grid, block, 0, stream, k); break;
    }
    GMPO_CHECK_LAUNCH(a, "hd_grad_kernel");
    return GMPO_OK;
}
