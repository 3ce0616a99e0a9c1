/*
 * chunk_loops.h -- the fp32 row and chunk loops of the CPU kernels: the
 * hidden-state tile kernels (hidden_cpu.c) and the logits kernels
 * (logits_cpu.c), which are the same loops over a whole row with scale 1 and
 * no softcap (x = z / tau). A row is processed in chunks: each is converted to
 * fp32 and transformed into a buffer of GMPO_CL_CHUNK floats that stays in L1,
 * then the vector loops run over it.
 *
 *   gmpo_cl_row_fold  a row's columns folded into a gmpo_hidden.h state: each
 *                  chunk's own state merged with gmpo_lse_merge, so chunks,
 *                  tiles, rows of logits and vocab-parallel ranks combine one
 *                  way, under the one NaN / infinity rule set (gmpo_hidden.h)
 *   gmpo_cl_row_grad  a row's gradient dL/dy from the finished lse and entropy
 *   gmpo_cl_load   a chunk into fp32, transformed (and the softcap's chain factor)
 *   gmpo_cl_grad   the gradient of a chunk, in place
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
#include "../gmpo_hidden.h"   // the state, its merge (the rule set), the softcap's tanh
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

// ----------------------------------------------------------------------------
// the transform and the row loops (shared by the tile and the logits kernels)

// the transform's constants (gmpo_hidden.h: u = s y; z = c tanh(u / c) with a
// softcap; x = z / tau), computed once per call. The logits kernels use s = 1,
// no softcap: x = y * (1 / tau), as float(1 / tau) (the fused path's scale).
typedef struct {
    float s, c, inv_c, inv_t;
    int softcap;
} gmpo_cl_xf;

static inline gmpo_cl_xf gmpo_cl_transform(double scale, double softcap, double temperature) {
    gmpo_cl_xf f;
    f.s = (float)scale;
    f.softcap = softcap > 0.0;
    f.c = f.softcap ? (float)softcap : 1.0f;
    f.inv_c = 1.0f / f.c;
    f.inv_t = (float)(1.0 / temperature);
    return f;
}

// n values of a row from element off into x, transformed: x = f(y); with
// softcap also the chain factor k = s / tau (1 - t^2) into kf (kf may be NULL)
GMPO_CL_LOOP void gmpo_cl_load(const void *row, int32_t dt, int64_t off, int64_t n,
                               gmpo_cl_xf f, float *restrict x, float *restrict kf) {
    int64_t k;
    if (!f.softcap) {   // one pass: converted and scaled (s / tau) in the same loop
        float m = f.s * f.inv_t;
        if (dt == GMPO_DT_F32) {
            const float *p = (const float *)row + off;
            for (k = 0; k < n; k++) x[k] = p[k] * m;
        } else if (dt == GMPO_DT_BF16) {
            const uint16_t *p = (const uint16_t *)row + off;
            for (k = 0; k < n; k++) x[k] = gmpo_bf16_to_f32(p[k]) * m;
        } else {
            const uint16_t *p = (const uint16_t *)row + off;
            for (k = 0; k < n; k++) x[k] = gmpo_f16_to_f32(p[k]) * m;
        }
        return;
    }
    float y[GMPO_CL_CHUNK] GMPO_CL_ALIGN;
    if (dt == GMPO_DT_F32) {
        const float *p = (const float *)row + off;
        for (k = 0; k < n; k++) y[k] = p[k];
    } else if (dt == GMPO_DT_BF16) {
        const uint16_t *p = (const uint16_t *)row + off;
        for (k = 0; k < n; k++) y[k] = gmpo_bf16_to_f32(p[k]);
    } else {
        const uint16_t *p = (const uint16_t *)row + off;
        for (k = 0; k < n; k++) y[k] = gmpo_f16_to_f32(p[k]);
    }
    float ck = f.c * f.inv_t, dk = f.s * f.inv_t;
    if (kf) {
        for (k = 0; k < n; k++) {
            float t = gmpo_tanh_f(y[k] * f.s * f.inv_c);
            x[k] = ck * t;
            kf[k] = dk * (1.0f - t * t);
        }
    } else {
        for (k = 0; k < n; k++) x[k] = ck * gmpo_tanh_f(y[k] * f.s * f.inv_c);
    }
}

// x <- (-g p - gh p (x - lse + H)) * k with p = exp(x - lse), in place
// (k: the chain factor per element, kf, or the constant kc when kf is NULL).
// p = 0 (a -inf logit, or one that underflows): 0, never 0 * -inf.
GMPO_CL_LOOP void gmpo_cl_grad(float *restrict x, const float *restrict kf, float kc, int64_t n,
                               float lse, float g, float gh, float H) {
    int64_t k;
    float c = H - lse;
    if (kf) {
        for (k = 0; k < n; k++) {
            float p = gmpo_exp_f(x[k] - lse);
            float d = -p * (g + gh * (x[k] + c));
            x[k] = p == 0.0f ? 0.0f : d * kf[k];
        }
    } else if (gh == 0.0f) {
        float gk = -g * kc;
        for (k = 0; k < n; k++) x[k] = gk * gmpo_exp_f(x[k] - lse);
    } else {
        for (k = 0; k < n; k++) {
            float p = gmpo_exp_f(x[k] - lse);
            float d = -p * (g + gh * (x[k] + c));
            x[k] = p == 0.0f ? 0.0f : d * kc;
        }
    }
}

// fold the vn columns of a row into st (GMPO_LSE_STATE floats, merged into what
// is there); local: the target's column in this row (outside [0, vn): not
// here, st[3] unchanged); ent: also the entropy term; buf: GMPO_CL_CHUNK floats
static void gmpo_cl_row_fold(const void *row, int32_t dt, int64_t vn, gmpo_cl_xf f, int ent,
                             int64_t local, float *buf, float *st) {
    for (int64_t off = 0; off < vn; off += GMPO_CL_CHUNK) {
        int64_t n = vn - off < GMPO_CL_CHUNK ? vn - off : GMPO_CL_CHUNK;
        gmpo_cl_load(row, dt, off, n, f, buf, NULL);
        // the chunk's partial state; gmpo_lse_merge applies the rule set of
        // gmpo_hidden.h (NaN of either sign or +inf: NaN; -inf: probability 0)
        float ch[GMPO_LSE_STATE];
        gmpo_lse_init(ch);
        float cm = gmpo_cl_max(buf, n);
        if (cm == -INFINITY) {                   // all -inf adds nothing; a NaN the max
            if (gmpo_cl_any_nan(buf, n)) ch[0] = NAN;   // missed (sign bit set) poisons
        } else if (cm < INFINITY) {              // a NaN the max missed makes the sums NaN
            // summed at the row's max where that is larger: the merge then needs
            // no exp while the row's max stands (an exp per chunk is ~4% of the
            // fold at V = 32768); a NaN row max compares false: summed at cm
            float m = st[0] > cm ? st[0] : cm;
            gmpo_cl_sums(buf, n, m, ent, &ch[1], &ch[2]);
            ch[0] = m;
        } else {
            ch[0] = cm;                          // NaN or +inf: poisoned, no sums needed
        }
        if (local - off >= 0 && local - off < n) ch[3] = buf[local - off];
        gmpo_lse_merge(st, ch);
    }
}

// dst <- dL/dy of the vn columns of src (dst may be src: each chunk is read
// before it is written), from the finished lse and entropy H and the upstream
// G = dL/dlogp, Gh = dL/dH; local: the target's column (outside [0, vn): no
// one-hot term); buf, kbuf: GMPO_CL_CHUNK floats each (kbuf: softcap only)
static void gmpo_cl_row_grad(const void *src, void *dst, int32_t dt, int64_t vn, gmpo_cl_xf f,
                             int64_t local, float lse, float G, float Gh, float H, float *buf,
                             float *kbuf) {
    const float kc = f.s * f.inv_t;
    float *kf = f.softcap ? kbuf : NULL;
    for (int64_t off = 0; off < vn; off += GMPO_CL_CHUNK) {
        int64_t n = vn - off < GMPO_CL_CHUNK ? vn - off : GMPO_CL_CHUNK;
        gmpo_cl_load(src, dt, off, n, f, buf, kf);
        gmpo_cl_grad(buf, kf, kc, n, lse, G, Gh, H);
        if (local - off >= 0 && local - off < n) buf[local - off] += G * (kf ? kf[local - off] : kc);
        gmpo_cl_store(dst, dt, off, n, buf);
    }
}

#endif /* GMPO_CHUNK_LOOPS_H */
