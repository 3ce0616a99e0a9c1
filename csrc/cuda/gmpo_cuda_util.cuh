/*
 * gmpo_cuda_util.cuh -- device helpers of the loss kernels: vectorised loads and
 * stores of VEC consecutive tokens of any gmpo dtype, the float / double
 * dispatch onto the shared scalar math of gmpo_math.h, and deterministic warp and
 * block sums (fixed shuffle trees, no atomics).
 *
 * Everything here builds with nvcc and, unchanged, with a host C++ compiler under
 * the SIMT emulation (GMPO_SIMT): device-only intrinsics sit behind __CUDA_ARCH__.
 * Both targets are little-endian, which the word unpacking below relies on.
 */
#ifndef GMPO_CUDA_UTIL_CUH
#define GMPO_CUDA_UTIL_CUH

#include <stdint.h>
#include "launch.cuh"
#include "../gmpo.h"
#include "../gmpo_math.h"

#define GMPO_FULL_MASK 0xffffffffu

// ----------------------------------------------------------------------------
// dtypes

// bytes per element of a gmpo dtype (0 for GMPO_DT_NONE or an unknown code)
__host__ __device__ __forceinline__ int gmpo_dtype_size(int32_t dt) {
    switch (dt) {
    case GMPO_DT_F64: case GMPO_DT_I64: return 8;
    case GMPO_DT_F32: case GMPO_DT_I32: return 4;
    case GMPO_DT_F16: case GMPO_DT_BF16: return 2;
    case GMPO_DT_BOOL: case GMPO_DT_U8: case GMPO_DT_I8: return 1;
    default: return 0;
    }
}

// half <-> float: one cvt instruction on the device, the shared bit-exact
// converters of gmpo_math.h on the host (same values: the conversion is exact
// one way and round-to-nearest-even the other)
GMPO_DEV float gmpo_dev_f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    return gmpo_f16_to_f32(h);
#endif
}

GMPO_DEV uint16_t gmpo_dev_f32_to_f16(float f) {
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(f));
#else
    return gmpo_f32_to_f16(f);
#endif
}

GMPO_DEV uint16_t gmpo_dev_f32_to_bf16(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    return gmpo_f32_to_bf16(f);
#endif
}

// ----------------------------------------------------------------------------
// the shared math of gmpo_math.h, by accumulation type (float: fp32, fp16 and
// bf16 inputs; double: fp64 inputs, as on the CPU)

template <class Acc> struct gmpo_m;

template <> struct gmpo_m<float> {
    typedef gmpo_acc_f acc;
    typedef gmpo_opts_f opts;
    static GMPO_DEV opts make_opts(const gmpo_args *a) { return gmpo_opts_make_f(a); }
    static GMPO_DEV float load(const void *p, int32_t dt, int64_t k) { return gmpo_load_f(p, dt, k); }
    static GMPO_DEV void store(void *p, int32_t dt, int64_t k, float v) { gmpo_store_f(p, dt, k, v); }
    static GMPO_DEV void zero(acc *s) { gmpo_acc_zero_f(s); }
    static GMPO_DEV void merge(acc *s, const acc *o) { gmpo_acc_merge_f(s, o); }
    static GMPO_DEV void add_token(acc *s, const opts *o, float m, float lp, float olp, float adv,
                                   float ref, float w) {
        acc c = gmpo_token_contrib_f(o, m, lp, olp, adv, ref, w);
        gmpo_acc_merge_f(s, &c);
    }
    static GMPO_DEV void finish(const gmpo_args *a, const acc *s, float adv_row, float w_row,
                                double *rs) {
        gmpo_row_finish_f(a, s, adv_row, w_row, rs);
    }
    static GMPO_DEV float grad(const opts *o, float pg, float kl, float m, float lp, float olp,
                               float adv, float ref, float w) {
        return gmpo_token_grad_o_f(o, pg, kl, m, lp, olp, adv, ref, w);
    }
};

template <> struct gmpo_m<double> {
    typedef gmpo_acc_d acc;
    typedef gmpo_opts_d opts;
    static GMPO_DEV opts make_opts(const gmpo_args *a) { return gmpo_opts_make_d(a); }
    static GMPO_DEV double load(const void *p, int32_t dt, int64_t k) { return gmpo_load_d(p, dt, k); }
    static GMPO_DEV void store(void *p, int32_t dt, int64_t k, double v) { gmpo_store_d(p, dt, k, v); }
    static GMPO_DEV void zero(acc *s) { gmpo_acc_zero_d(s); }
    static GMPO_DEV void merge(acc *s, const acc *o) { gmpo_acc_merge_d(s, o); }
    static GMPO_DEV void add_token(acc *s, const opts *o, double m, double lp, double olp,
                                   double adv, double ref, double w) {
        acc c = gmpo_token_contrib_d(o, m, lp, olp, adv, ref, w);
        gmpo_acc_merge_d(s, &c);
    }
    static GMPO_DEV void finish(const gmpo_args *a, const acc *s, double adv_row, double w_row,
                                double *rs) {
        gmpo_row_finish_d(a, s, adv_row, w_row, rs);
    }
    static GMPO_DEV double grad(const opts *o, double pg, double kl, double m, double lp,
                                double olp, double adv, double ref, double w) {
        return gmpo_token_grad_o_d(o, pg, kl, m, lp, olp, adv, ref, w);
    }
};

// the gmpo_acc fields as an array (for the shuffle trees) and back
#define GMPO_ACC_FIELDS 8
static_assert(sizeof(gmpo_acc_f) == GMPO_ACC_FIELDS * sizeof(float) &&
                  sizeof(gmpo_acc_d) == GMPO_ACC_FIELDS * sizeof(double),
              "gmpo_acc changed: update gmpo_acc_pack / gmpo_acc_unpack");

template <class Acc>
GMPO_DEV void gmpo_acc_pack(const typename gmpo_m<Acc>::acc &s, Acc (&v)[GMPO_ACC_FIELDS]) {
    v[0] = s.my; v[1] = s.n; v[2] = s.am; v[3] = s.logw;
    v[4] = s.k; v[5] = s.m0; v[6] = s.m1; v[7] = s.m2;
}

template <class Acc>
GMPO_DEV void gmpo_acc_unpack(const Acc (&v)[GMPO_ACC_FIELDS], typename gmpo_m<Acc>::acc &s) {
    s.my = v[0]; s.n = v[1]; s.am = v[2]; s.logw = v[3];
    s.k = v[4]; s.m0 = v[5]; s.m1 = v[6]; s.m2 = v[7];
}

// ----------------------------------------------------------------------------
// raw loads and stores of N bytes (N a power of two) as 32-bit words; p is
// aligned to min(N, 16) bytes. Inputs are read once per kernel: the read-only
// path (__ldg) keeps them out of the way of the few values that are reused.

template <int N>
GMPO_DEV void gmpo_ld_words(const char *p, uint32_t *w) {
    if constexpr (N >= 16) {
#pragma unroll
        for (int c = 0; c < N / 16; c++) {
            uint4 v = __ldg(reinterpret_cast<const uint4 *>(p) + c);
            w[4 * c] = v.x; w[4 * c + 1] = v.y; w[4 * c + 2] = v.z; w[4 * c + 3] = v.w;
        }
    } else if constexpr (N == 8) {
        uint2 v = __ldg(reinterpret_cast<const uint2 *>(p));
        w[0] = v.x; w[1] = v.y;
    } else if constexpr (N == 4) {
        w[0] = __ldg(reinterpret_cast<const unsigned int *>(p));
    } else if constexpr (N == 2) {
        w[0] = __ldg(reinterpret_cast<const unsigned short *>(p));
    } else {
        w[0] = __ldg(reinterpret_cast<const unsigned char *>(p));
    }
}

template <int N>
GMPO_DEV void gmpo_st_words(char *p, const uint32_t *w) {
    if constexpr (N >= 16) {
#pragma unroll
        for (int c = 0; c < N / 16; c++)
            reinterpret_cast<uint4 *>(p)[c] = make_uint4(w[4 * c], w[4 * c + 1], w[4 * c + 2], w[4 * c + 3]);
    } else if constexpr (N == 8) {
        *reinterpret_cast<uint2 *>(p) = make_uint2(w[0], w[1]);
    } else if constexpr (N == 4) {
        *reinterpret_cast<unsigned int *>(p) = w[0];
    } else if constexpr (N == 2) {
        *reinterpret_cast<unsigned short *>(p) = (unsigned short)w[0];
    } else {
        *reinterpret_cast<unsigned char *>(p) = (unsigned char)w[0];
    }
}

// the alignment (bytes) a VEC-token load of dtype dt needs
template <int VEC>
__host__ __device__ __forceinline__ int gmpo_vec_align(int32_t dt) {
    int b = VEC * gmpo_dtype_size(dt);
    return b < 16 ? b : 16;
}

// VEC consecutive elements k0..k0+VEC-1 of a contiguous row p of dtype dt, as
// Acc, with the conversions of gmpo_load_f / gmpo_load_d (so the values are
// the CPU's, bit for bit). The address of element k0 is gmpo_vec_align aligned.
template <class Acc, int VEC>
GMPO_DEV void gmpo_load_vec(const char *p, int32_t dt, int64_t k0, Acc *out) {
    switch (dt) {
    case GMPO_DT_F32: {
        uint32_t w[VEC];
        gmpo_ld_words<4 * VEC>(p + 4 * k0, w);
#pragma unroll
        for (int k = 0; k < VEC; k++) out[k] = (Acc)__uint_as_float(w[k]);
        break;
    }
    case GMPO_DT_F64: {
        uint32_t w[2 * VEC];
        gmpo_ld_words<8 * VEC>(p + 8 * k0, w);
#pragma unroll
        for (int k = 0; k < VEC; k++)
            out[k] = (Acc)__longlong_as_double((long long)(((uint64_t)w[2 * k + 1] << 32) | w[2 * k]));
        break;
    }
    case GMPO_DT_F16:
    case GMPO_DT_BF16: {
        uint32_t w[(VEC + 1) / 2];
        gmpo_ld_words<2 * VEC>(p + 2 * k0, w);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            uint16_t h = (uint16_t)(w[k / 2] >> (16 * (k & 1)));
            out[k] = (Acc)(dt == GMPO_DT_F16 ? gmpo_dev_f16_to_f32(h) : gmpo_bf16_to_f32(h));
        }
        break;
    }
    case GMPO_DT_BOOL:
    case GMPO_DT_U8:
    case GMPO_DT_I8: {
        uint32_t w[(VEC + 3) / 4];
        gmpo_ld_words<VEC>(p + k0, w);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            uint32_t b = (w[k / 4] >> (8 * (k & 3))) & 0xffu;
            out[k] = dt == GMPO_DT_I8 ? (Acc)(float)(int8_t)b : (Acc)(float)b;
        }
        break;
    }
    case GMPO_DT_I32: {
        uint32_t w[VEC];
        gmpo_ld_words<4 * VEC>(p + 4 * k0, w);
#pragma unroll
        for (int k = 0; k < VEC; k++) out[k] = (Acc)(float)(int32_t)w[k];  // via float, as gmpo_load_d
        break;
    }
    case GMPO_DT_I64: {
        uint32_t w[2 * VEC];
        gmpo_ld_words<8 * VEC>(p + 8 * k0, w);
#pragma unroll
        for (int k = 0; k < VEC; k++)
            out[k] = (Acc)(int64_t)(((uint64_t)w[2 * k + 1] << 32) | w[2 * k]);
        break;
    }
    default:
#pragma unroll
        for (int k = 0; k < VEC; k++) out[k] = 0;
        break;
    }
}

// VEC values into elements k0.. of a contiguous float row p of dtype dt, with the
// rounding of gmpo_store_f / gmpo_store_d (double -> float first for 16-bit types)
template <class Acc, int VEC>
GMPO_DEV void gmpo_store_vec(char *p, int32_t dt, int64_t k0, const Acc *v) {
    switch (dt) {
    case GMPO_DT_F32: {
        uint32_t w[VEC];
#pragma unroll
        for (int k = 0; k < VEC; k++) w[k] = __float_as_uint((float)v[k]);
        gmpo_st_words<4 * VEC>(p + 4 * k0, w);
        break;
    }
    case GMPO_DT_F64: {
        uint32_t w[2 * VEC];
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            uint64_t b = (uint64_t)__double_as_longlong((double)v[k]);
            w[2 * k] = (uint32_t)b;
            w[2 * k + 1] = (uint32_t)(b >> 32);
        }
        gmpo_st_words<8 * VEC>(p + 8 * k0, w);
        break;
    }
    case GMPO_DT_F16:
    case GMPO_DT_BF16: {
        uint32_t w[(VEC + 1) / 2];
#pragma unroll
        for (int k = 0; k < (VEC + 1) / 2; k++) w[k] = 0;
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            float f = (float)v[k];
            uint32_t h = dt == GMPO_DT_F16 ? gmpo_dev_f32_to_f16(f) : gmpo_dev_f32_to_bf16(f);
            w[k / 2] |= h << (16 * (k & 1));
        }
        gmpo_st_words<2 * VEC>(p + 2 * k0, w);
        break;
    }
    default:
        break;
    }
}

// ----------------------------------------------------------------------------
// deterministic reductions (fixed shuffle trees, no atomics): the same bits on
// every run. blockDim.x must be a multiple of 32.

// Sum of v over the 32 lanes (a full xor butterfly: every lane gets the same bits).
template <class Acc, int N>
GMPO_DEV void gmpo_warp_sum(Acc (&v)[N]) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
        for (int k = 0; k < N; k++) v[k] += __shfl_xor_sync(GMPO_FULL_MASK, v[k], off);
    }
}

// Warp sum of 8 values by reduce-scatter: at each of the first three butterfly
// steps a lane keeps half of its values and trades the other half with its
// partner, then two plain steps finish. 4+2+1+1+1 = 9 shuffles instead of 8*5.
// Returns the warp's total of value (lane >> 2) (lanes 4f..4f+3 hold value f,
// with the same bits).
template <class Acc>
GMPO_DEV Acc gmpo_warp_sum8_scatter(const Acc (&v)[8]) {
    const int lane = threadIdx.x & 31;
    const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4;
    Acc u[4], w[2];
#pragma unroll
    for (int k = 0; k < 4; k++) {          // keep values 4*b4.., send the others
        Acc keep = b4 ? v[4 + k] : v[k], send = b4 ? v[k] : v[4 + k];
        u[k] = keep + __shfl_xor_sync(GMPO_FULL_MASK, send, 16);
    }
#pragma unroll
    for (int k = 0; k < 2; k++) {          // keep 2*b3.. of those
        Acc keep = b3 ? u[2 + k] : u[k], send = b3 ? u[k] : u[2 + k];
        w[k] = keep + __shfl_xor_sync(GMPO_FULL_MASK, send, 8);
    }
    Acc keep = b2 ? w[1] : w[0], send = b2 ? w[0] : w[1];
    Acc x = keep + __shfl_xor_sync(GMPO_FULL_MASK, send, 4);
    x += __shfl_xor_sync(GMPO_FULL_MASK, x, 2);
    x += __shfl_xor_sync(GMPO_FULL_MASK, x, 1);
    return x;
}

// The block's sum of 8 values per thread, returned in v of thread 0 (other
// threads' v are left undefined). Warp totals by reduce-scatter, the warps'
// partials through shared memory, summed by warp 0 in warp order.
template <class Acc>
__device__ void gmpo_block_sum8(Acc (&v)[8]) {
    __shared__ Acc part[32][8];
    __shared__ Acc total[8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    Acc x = gmpo_warp_sum8_scatter(v);
    if (nwarps > 1) {
        if ((lane & 3) == 0) part[warp][lane >> 2] = x;
        __syncthreads();
        if (warp != 0) return;
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = lane < nwarps ? part[lane][k] : (Acc)0;
        x = gmpo_warp_sum8_scatter(v);
    }
    if (warp != 0) return;
    if ((lane & 3) == 0) total[lane >> 2] = x;
    __syncwarp();
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = total[k];
    }
}

#endif /* GMPO_CUDA_UTIL_CUH */
