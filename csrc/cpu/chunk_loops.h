/*
 * chunk_loops.h -- the fp32 chunk loops that the logits kernels (logits_cpu.c)
 * and the hidden-state tile kernels (hidden_cpu.c) share: a chunk of a row is
 * converted to fp32 (and scaled or transformed) into a buffer of GMPO_CL_CHUNK
 * floats that stays in L1, then these loops run over it.
 *
 *   gmpo_cl_max    the largest float of the chunk (an integer max over keys;
 *                  blind to a NaN with its sign bit set, see there)
 *   gmpo_cl_any_nan
 *   gmpo_cl_sums   sum of exp(x - M) and of exp(x - M) (x - M), in
 *                  GMPO_CL_LANES fp32 lanes folded pairwise (a fixed order)
 *   gmpo_cl_store  the chunk back into a row of fp32, bf16 or fp16
 *
 * Each file that includes this header gets its own static copies, compiled
 * under its own pragmas (the includer sets no-trapping-math and fp-contract
 * before including it) and, on x86-64 gcc, its own target clones: AVX-512,
 * AVX2 and the baseline, picked once at load time. The loops are kept out of
 * line: inlined into the row loops, gcc stops if-converting some of them.
 * The exp is gmpo_math.h's branch-free polynomial (gmpo_exp_f); no fast-math,
 * NaN propagates.
 */
#ifndef GMPO_CHUNK_LOOPS_H
#define GMPO_CHUNK_LOOPS_H

#include <math.h>
#include <stdint.h>
#include "../gmpo.h"
#include "../gmpo_math.h"

#define GMPO_CL_CHUNK 2048   // fp32 elements per chunk: 8 KiB, in L1
#define GMPO_CL_LANES 16     // independent accumulators: one AVX-512 vector, two AVX2

#if defined(__GNUC__)
#define GMPO_CL_ALIGN __attribute__((aligned(64)))
#else
#define GMPO_CL_ALIGN
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__) && \
    !defined(GMPO_NO_TARGET_CLONES)
#define GMPO_CL_LOOP static __attribute__((noinline, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__)
#define GMPO_CL_LOOP static __attribute__((noinline))
#else
#define GMPO_CL_LOOP static
#endif

// the int32 key of a float: keys order as the floats do (-inf < ... < -0 < 0 <
// ... < inf), so an integer max, which gcc vectorises, finds the float max (a
// float max reduction it does not vectorise without fast-math). NaN with the
// sign bit clear sorts above inf, with it set below -inf. The map is its own
// inverse.
static inline int32_t gmpo_cl_key(int32_t s) {
    return s ^ (int32_t)((uint32_t)(s >> 31) >> 1);
}

// the largest of x[0..n): -inf when nothing is larger. A NaN with its sign bit
// clear is returned (it sorts above inf); one with it set (0/0 and inf - inf on
// x86) sorts below -inf and is NOT seen: callers find it in the sums (NaN:
// exp(NaN - M) is NaN) or, where the max is -inf, with gmpo_cl_any_nan. The
// rule set these serve is gmpo_hidden.h's (gmpo_lse_merge).
GMPO_CL_LOOP float gmpo_cl_max(const float *restrict x, int64_t n) {
    gmpo_f32_bits b;
    b.f = -INFINITY;
    int32_t m = gmpo_cl_key((int32_t)b.u);
    for (int64_t k = 0; k < n; k++) {
        b.f = x[k];
        int32_t v = gmpo_cl_key((int32_t)b.u);
        m = v > m ? v : m;
    }
    b.u = (uint32_t)gmpo_cl_key(m);
    return b.f;
}

// 1 if any of x[0..n) is NaN (only asked when a chunk's max is -inf)
static int gmpo_cl_any_nan(const float *x, int64_t n) {
    int any = 0;
    for (int64_t k = 0; k < n; k++) any |= x[k] != x[k];
    return any;
}

// sum of exp(x - M) into *s and, with ent, of exp(x - M) (x - M) into *w
GMPO_CL_LOOP void gmpo_cl_sums(const float *restrict x, int64_t n, float M, int ent, float *s,
                               float *w) {
    float sv[GMPO_CL_LANES] GMPO_CL_ALIGN, wv[GMPO_CL_LANES] GMPO_CL_ALIGN;
    int64_t j = 0;
    int l;
    for (l = 0; l < GMPO_CL_LANES; l++) sv[l] = wv[l] = 0.0f;
    if (ent) {
        for (; j + GMPO_CL_LANES <= n; j += GMPO_CL_LANES)
            for (l = 0; l < GMPO_CL_LANES; l++) {
                float d = x[j + l] - M;
                float e = gmpo_exp_f(d);
                float ed = e * d;
                sv[l] += e;
                wv[l] += e == 0.0f ? 0.0f : ed;      // e = 0 where d = -inf
            }
    } else {
        for (; j + GMPO_CL_LANES <= n; j += GMPO_CL_LANES)
            for (l = 0; l < GMPO_CL_LANES; l++) sv[l] += gmpo_exp_f(x[j + l] - M);
    }
    for (; j < n; j++) {
        float d = x[j] - M;
        float e = gmpo_exp_f(d);
        sv[0] += e;
        wv[0] += e == 0.0f ? 0.0f : e * d;
    }
    for (int h = GMPO_CL_LANES / 2; h > 0; h /= 2)   // pairwise: fixed order, deterministic
        for (l = 0; l < h; l++) { sv[l] += sv[l + h]; wv[l] += wv[l + h]; }
    *s = sv[0];
    *w = ent ? wv[0] : 0.0f;
}

// n values from x into a row of dtype dt from element off
GMPO_CL_LOOP void gmpo_cl_store(void *row, int32_t dt, int64_t off, int64_t n,
                                const float *restrict x) {
    int64_t k;
    if (dt == GMPO_DT_F32) {
        float *p = (float *)row + off;
        for (k = 0; k < n; k++) p[k] = x[k];
    } else if (dt == GMPO_DT_BF16) {
        uint16_t *p = (uint16_t *)row + off;
        for (k = 0; k < n; k++) p[k] = gmpo_f32_to_bf16(x[k]);
    } else {
        uint16_t *p = (uint16_t *)row + off;
        for (k = 0; k < n; k++) p[k] = gmpo_f32_to_f16(x[k]);
    }
}

#endif /* GMPO_CHUNK_LOOPS_H */
