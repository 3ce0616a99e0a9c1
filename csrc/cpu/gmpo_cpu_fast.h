/*
 * gmpo_cpu_fast.h -- the CPU row kernel of the common case (float accumulation;
 * GCC or clang: it uses their vector types). gmpo_cpu.c includes it once per
 * instruction set, each time under `#pragma GCC target` with FAST_S(name)
 * adding a suffix: the vector operations must be compiled for the target in
 * every function that holds them (target_clones on the caller is not enough:
 * GCC then splits the comparisons of the inlined helpers into scalars).
 *
 * The common case: GMPO with one advantage per row, no KL term, no per-token
 * importance weights, log-probs (both the same dtype: fp32, bf16 or fp16) and
 * mask (bool, uint8 or fp32) contiguous along the row. There the advantage's
 * sign is a constant of the row, so the one-sided clip of gmpo_clip_y becomes
 * a clamp to the row's bounds (one of them infinite), and the clip metric a
 * test against another pair of row bounds: a handful of vector instructions
 * per GMPO_LANES tokens, reading each input straight from the tensor.
 *
 * The code is written on vectors of FAST_W floats (GCC/clang vector types),
 * the machine's register width: 16 for AVX-512, 8 for AVX2, 4 for SSE. Each
 * sum keeps GMPO_LANES / FAST_W vectors, so token t of a row always lands in
 * lane t % GMPO_LANES whatever the machine (wider-than-register vector types
 * would do the same, but GCC splits their comparisons into scalars). The
 * arithmetic is the generic kernel's, operation for operation (float selects
 * where it has ternaries), and the lanes are folded in the same order: the two
 * kernels give the same bits (tests/test_cpu_kernels.py checks it, for each
 * instruction set).
 *
 * With a gradient buffer (the fused forward + backward of
 * gmpo_cpu_forward_backward) the kernel also writes, per token, m where the
 * token passes the gradient and m*0 elsewhere; once the row's sums are known it
 * multiplies them by the row's factor while they are still in the cache. The
 * inputs are read once. A third mode is the backward alone (any grad_out).
 */

// this copy's vector types: FAST_W lanes (FAST_W and FAST_S set by the includer)
typedef float FAST_S(fv) __attribute__((vector_size(4 * FAST_W)));
typedef int32_t FAST_S(iv) __attribute__((vector_size(4 * FAST_W)));
typedef uint32_t FAST_S(uv) __attribute__((vector_size(4 * FAST_W)));
typedef uint16_t FAST_S(hv) __attribute__((vector_size(2 * FAST_W)));
typedef uint8_t FAST_S(bv) __attribute__((vector_size(FAST_W)));
#define FAST_NV (GMPO_LANES / FAST_W)   // vectors per GMPO_LANES tokens

#ifndef FAST_SEL
// c ? a : b per lane (c: all ones or all zeros, as vector comparisons give).
// Macros and out-parameters rather than vector arguments and results: GCC
// notes an ABI change for those, though every helper here is inlined.
#define FAST_SEL(c, a, b) ((FAST_S(fv))(((c) & (FAST_S(iv))(a)) | (~(c) & (FAST_S(iv))(b))))
#define FAST_SPLAT(x) ((FAST_S(fv)){0} + (float)(x))
#endif

// FAST_W elements of a contiguous row of dtype dt (a literal constant
// after inlining) from element k, as floats; the conversions are those of
// gmpo_math.h (gmpo_bf16_to_f32, gmpo_f16_to_f32) on vectors
GMPO_INLINE void FAST_S(fast_load)(FAST_S(fv) *out, const void *row, const int dt, int64_t k) {
    switch (dt) {
    case GMPO_DT_BF16: {
        FAST_S(hv) h;
        __builtin_memcpy(&h, (const uint16_t *)row + k, sizeof h);
        *out = (FAST_S(fv))(__builtin_convertvector(h, FAST_S(uv)) << 16);
        return;
    }
    case GMPO_DT_F16: {
        FAST_S(hv) h16;
        __builtin_memcpy(&h16, (const uint16_t *)row + k, sizeof h16);
        FAST_S(uv) h = __builtin_convertvector(h16, FAST_S(uv));
        FAST_S(uv) m = (h & 0x7fffu) << 13;
        FAST_S(fv) o = (FAST_S(fv))m * 5.192296858534828e33f;
        const FAST_S(uv) e = (FAST_S(uv)){0} + 0x7c00u;
        FAST_S(iv) special = (FAST_S(iv))((h & e) == e);
        FAST_S(fv) r = FAST_SEL(special, (FAST_S(fv))(m | 0x7f800000u), o);
        *out = (FAST_S(fv))((FAST_S(uv))r | ((h & 0x8000u) << 16));
        return;
    }
    case GMPO_DT_U8: {
#if defined(FAST_ZX_U8)
        // the instruction set's zero-extending load (one vpmovzxbd)
        FAST_ZX_U8(out, (const uint8_t *)row + k);
#else
        FAST_S(bv) b;
        __builtin_memcpy(&b, (const uint8_t *)row + k, sizeof b);
        // a step at a time (u8 -> u16 -> i32 -> f32): GCC splits a direct
        // conversion into scalars
        FAST_S(hv) h = __builtin_convertvector(b, FAST_S(hv));
        *out = __builtin_convertvector(__builtin_convertvector(h, FAST_S(iv)), FAST_S(fv));
#endif
        return;
    }
    default: {
        __builtin_memcpy(out, (const float *)row + k, sizeof *out);
        return;
    }
    }
}

// one element, as fast_load converts it (the row's last, partial vector)
GMPO_INLINE float FAST_S(fast_load1)(const void *row, const int dt, int64_t k) {
    switch (dt) {
    case GMPO_DT_BF16: return gmpo_bf16_to_f32(((const uint16_t *)row)[k]);
    case GMPO_DT_F16: return gmpo_f16_to_f32(((const uint16_t *)row)[k]);
    case GMPO_DT_U8: return (float)((const uint8_t *)row)[k];
    default: return ((const float *)row)[k];
    }
}

GMPO_INLINE size_t FAST_S(fast_size)(const int dt) {
    return dt == GMPO_DT_F32 ? 4 : (dt == GMPO_DT_U8 ? 1 : 2);
}

// The per-token step on one vector of tokens. The row's constants: y =
// clamp(l, lo, hi); the clip metric counts a token where l < clo or l > chi
// (trl) or where !(-el <= l <= eh) (verl). WR 0 and 1 update the lane sums
// sy (m*y), sn (m), sc (clip count), sl (m*l, verl); WR 1 also stores (S) the
// gradient mark g: m where the token passes the gradient, m*0 elsewhere (0,
// or NaN for a NaN weight, as m*0 gives in gmpo_token_grad_o); WR 2 stores
// only the gradient itself, m * (pass ? pg : 0) as gmpo_token_grad_o has it.
#define FAST_STEP(V, S, SEL, sy, sn, sc, sl)                                           \
    {                                                                                  \
        V l = lr;                                                                      \
        if (clamp) l = SEL(lr < -C, -C, SEL(lr > C, C, lr));                           \
        if (WR != 2) {                                                                 \
            V y = SEL(l < lo, lo, SEL(l > hi, hi, l));                                 \
            sy += SEL(m != zero, m * y, zero);                                         \
            sn += m;                                                                   \
            if (verl) {                                                                \
                sc += SEL(l >= -el, SEL(l <= eh, zero, m), m);                         \
                sl += SEL(m != zero, -m * l, zero);                                    \
            } else {                                                                   \
                sc += SEL(l < clo, m, SEL(l > chi, m, zero));                          \
            }                                                                          \
        }                                                                              \
        if (WR) {                                                                      \
            V p_ = WR == 1 ? m : pgv, z_ = WR == 1 ? m * zero : zero;                  \
            V g = SEL(l >= lo, SEL(l <= hi, p_, z_), z_);                              \
            if (clamp) g = SEL(lr >= -C, SEL(lr <= C, g, z_), z_);                     \
            if (WR == 2) g = SEL(m != zero, m * g, zero);                              \
            S;                                                                         \
        }                                                                              \
    }
#define FAST_SCALAR_SEL(c, a, b) ((c) ? (a) : (b))

// Row i. dt: the log-probs' dtype, mdt: the mask's (GMPO_DT_U8 also for bool),
// verl, clamp: the convention and whether log_ratio_clamp is set. WR 0: the
// forward, into rows[i]; WR 1: and the gradient for grad_out = 1 into u (row
// i of the fp32 gradient); WR 2: only the gradient, with pg the row's factor
// (gmpo_row_grad_factors).
GMPO_INLINE void FAST_S(fast_row)(const gmpo_args *a, const gmpo_opts_f *o, const int dt,
                                  const int mdt, const int verl, const int clamp, const int WR,
                                  int64_t i, float adv_row, float w_row, float pg,
                                  float *restrict u, double *rows) {
    const int64_t T = a->T;
    const void *lpr = (const char *)a->logp.data + (size_t)(i * a->logp.stride_b) * FAST_S(fast_size)(dt);
    const void *olpr =
        (const char *)a->old_logp.data + (size_t)(i * a->old_logp.stride_b) * FAST_S(fast_size)(dt);
    const void *mr = (const char *)a->mask.data + (size_t)(i * a->mask.stride_b) * FAST_S(fast_size)(mdt);

    const int pos = adv_row > 0;
    const float fC = o->C, fel = o->el, feh = o->eh;
    const float flo = pos ? -INFINITY : -o->el, fhi = pos ? o->eh : INFINITY;
    // trl counts low clips of A < 0 rows and high clips of A > 0 rows; A == 0: none
    const float fclo = adv_row < 0 ? -o->el : -INFINITY, fchi = pos ? o->eh : INFINITY;

    float ly[GMPO_LANES], ln[GMPO_LANES], lc[GMPO_LANES], ll[GMPO_LANES];
    int64_t k0 = 0;
    {
        const FAST_S(fv) C = FAST_SPLAT(fC), el = FAST_SPLAT(fel), eh = FAST_SPLAT(feh);
        const FAST_S(fv) lo = FAST_SPLAT(flo), hi = FAST_SPLAT(fhi);
        const FAST_S(fv) clo = FAST_SPLAT(fclo), chi = FAST_SPLAT(fchi), zero = FAST_SPLAT(0);
        const FAST_S(fv) pgv = FAST_SPLAT(pg);
        FAST_S(fv) sy[FAST_NV], sn[FAST_NV], sc[FAST_NV], sl[FAST_NV];
        int c;
        for (c = 0; c < FAST_NV; c++) { sy[c] = zero; sn[c] = zero; sc[c] = zero; sl[c] = zero; }
        for (; k0 + GMPO_LANES <= T; k0 += GMPO_LANES) {
            for (c = 0; c < FAST_NV; c++) {
                const int64_t k = k0 + c * FAST_W;
                FAST_S(fv) m, lp, olp;
                FAST_S(fast_load)(&m, mr, mdt, k);
                FAST_S(fast_load)(&lp, lpr, dt, k);
                FAST_S(fast_load)(&olp, olpr, dt, k);
                FAST_S(fv) lr = lp - olp;
                FAST_STEP(FAST_S(fv), __builtin_memcpy(u + k, &g, sizeof g), FAST_SEL,
                          sy[c], sn[c], sc[c], sl[c])
            }
        }
        for (c = 0; c < FAST_NV; c++) {
            __builtin_memcpy(ly + c * FAST_W, &sy[c], sizeof sy[c]);
            __builtin_memcpy(ln + c * FAST_W, &sn[c], sizeof sn[c]);
            __builtin_memcpy(lc + c * FAST_W, &sc[c], sizeof sc[c]);
            __builtin_memcpy(ll + c * FAST_W, &sl[c], sizeof sl[c]);
        }
    }
    // the last T % GMPO_LANES tokens, one lane each, the same operations
    for (int j = 0; k0 + j < T; j++) {
        const float C = fC, el = fel, eh = feh, lo = flo, hi = fhi, clo = fclo, chi = fchi;
        const float zero = 0, pgv = pg;
        float m = FAST_S(fast_load1)(mr, mdt, k0 + j);
        float lr = FAST_S(fast_load1)(lpr, dt, k0 + j) - FAST_S(fast_load1)(olpr, dt, k0 + j);
        FAST_STEP(float, u[k0 + j] = g, FAST_SCALAR_SEL, ly[j], ln[j], lc[j], ll[j])
    }

    if (WR == 2) return;
    gmpo_acc_f acc;
    gmpo_acc_zero_f(&acc);
    for (int j = 0; j < GMPO_LANES; j++) {
        acc.my += ly[j];
        acc.n += ln[j];
        acc.m0 += lc[j];
        acc.m2 += ll[j];
    }
    // the count lands where the generic kernel's per-token metrics put it
    float cnt = acc.m0;
    if (verl) {
        acc.m0 = adv_row > 0 ? cnt : 0.0f;
        acc.m1 = adv_row < 0 ? cnt : 0.0f;
    } else {
        acc.m0 = adv_row < 0 ? cnt : 0.0f;
        acc.m1 = adv_row > 0 ? cnt : 0.0f;
        acc.m2 = cnt;   // low and high exclude each other within a row
    }
    gmpo_row_finish_f(a, &acc, adv_row, w_row, rows + i * GMPO_ROW_STATS);
    if (WR) {
        double pg_d, kl_d;
        gmpo_row_grad_factors(a, rows, i, 1.0, &pg_d, &kl_d);
        const float pg1 = (float)pg_d;
        // a select, never 0 * inf: tokens that pass nothing stay exactly 0
#pragma omp simd
        for (int64_t k = 0; k < T; k++) u[k] = u[k] != 0 ? u[k] * pg1 : 0.0f;
    }
}
#undef FAST_STEP
#undef FAST_SCALAR_SEL
#undef FAST_NV

// Rows [r0, r1) through instance K (dtype DT, mask MDT, convention V, clamp
// CL): rows_K the forward (u: the fp32 gradient (B, T) for grad_out = 1, or
// NULL), bwd_K the backward (grad: the fp32 gradient, grad_out go). verl's
// zero-advantage rows (all their tokens dropped) go to the generic kernel.
#define FAST_MAKE(K, DT, MDT, V, CL)                                                   \
    static void FAST_S(rows_##K)(const gmpo_args *a, int64_t r0, int64_t r1, double *rows, \
                                 float *u) {                                           \
        gmpo_opts_f o = gmpo_opts_make_f(a);                                           \
        for (int64_t i = r0; i < r1; i++) {                                            \
            float adv_row = row_value_f(&a->adv, i, 0), w_row = row_value_f(&a->is_w, i, 1); \
            if (V && adv_row == 0) {                                                   \
                if (u) rows_fused_f(a, i, i + 1, rows, u, GMPO_DT_F32);                \
                else rows_forward_f(a, i, i + 1, rows);                                \
                continue;                                                              \
            }                                                                          \
            if (u) FAST_S(fast_row)(a, &o, DT, MDT, V, CL, 1, i, adv_row, w_row, 0, u + i * a->T, rows); \
            else FAST_S(fast_row)(a, &o, DT, MDT, V, CL, 0, i, adv_row, w_row, 0, 0, rows); \
        }                                                                              \
    }                                                                                  \
    static void FAST_S(bwd_##K)(const gmpo_args *a, int64_t r0, int64_t r1,            \
                                const double *rows, double go, float *grad) {          \
        gmpo_opts_f o = gmpo_opts_make_f(a);                                           \
        for (int64_t i = r0; i < r1; i++) {                                            \
            float adv_row = row_value_f(&a->adv, i, 0);                                \
            if (V && adv_row == 0) {                                                   \
                rows_backward_f(a, i, i + 1, rows, go, grad, GMPO_DT_F32);             \
                continue;                                                              \
            }                                                                          \
            double pg, kl;                                                             \
            gmpo_row_grad_factors(a, rows, i, go, &pg, &kl);                           \
            FAST_S(fast_row)(a, &o, DT, MDT, V, CL, 2, i, adv_row, 1, (float)pg,       \
                             grad + i * a->T, 0);                                      \
        }                                                                              \
    }
#define FAST_CL(K, CL)                                                                 \
    FAST_MAKE(K##_0, GMPO_DT_F32, GMPO_DT_U8, 0, CL)                                   \
    FAST_MAKE(K##_1, GMPO_DT_F32, GMPO_DT_U8, 1, CL)                                   \
    FAST_MAKE(K##_2, GMPO_DT_F32, GMPO_DT_F32, 0, CL)                                  \
    FAST_MAKE(K##_3, GMPO_DT_F32, GMPO_DT_F32, 1, CL)                                  \
    FAST_MAKE(K##_4, GMPO_DT_BF16, GMPO_DT_U8, 0, CL)                                  \
    FAST_MAKE(K##_5, GMPO_DT_BF16, GMPO_DT_U8, 1, CL)                                  \
    FAST_MAKE(K##_6, GMPO_DT_BF16, GMPO_DT_F32, 0, CL)                                 \
    FAST_MAKE(K##_7, GMPO_DT_BF16, GMPO_DT_F32, 1, CL)                                 \
    FAST_MAKE(K##_8, GMPO_DT_F16, GMPO_DT_U8, 0, CL)                                   \
    FAST_MAKE(K##_9, GMPO_DT_F16, GMPO_DT_U8, 1, CL)                                   \
    FAST_MAKE(K##_10, GMPO_DT_F16, GMPO_DT_F32, 0, CL)                                 \
    FAST_MAKE(K##_11, GMPO_DT_F16, GMPO_DT_F32, 1, CL)
FAST_CL(n, 0)
FAST_CL(c, 1)
#undef FAST_CL
#undef FAST_MAKE

// this copy's instances, in the order of fast_instance() (gmpo_cpu.c)
#define FAST_FWD_ENTRY(k) FAST_S(rows_##k),
#define FAST_BWD_ENTRY(k) FAST_S(bwd_##k),
static const fast_kernels FAST_S(kernels) = {
    {FAST_INSTANCE_NAMES(FAST_FWD_ENTRY)},
    {FAST_INSTANCE_NAMES(FAST_BWD_ENTRY)},
};
#undef FAST_FWD_ENTRY
#undef FAST_BWD_ENTRY
