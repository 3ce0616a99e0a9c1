/*
 * gmpo_cpu_impl.h -- the CPU row kernels, included twice by gmpo_cpu.c with
 * GMPO_T float (fp32, fp16, bf16 inputs) and double (fp64 inputs).
 *
 * A row is processed a tile of GMPO_TILE tokens at a time. Each input's tile is
 * used in place when it is already contiguous GMPO_T, and converted into a small
 * array otherwise (any dtype, any token stride). The per-token math of
 * gmpo_math.h then runs over contiguous arrays in `omp simd` loops; the loops
 * are instantiated for constant option flags (convention, KL, token weights)
 * so that each compiles to straight-line vector code.
 */

// Option flags passed as literal constants down the inlined call chain.
#ifndef GMPO_FLAGS_DECL
#define GMPO_FLAGS_DECL const int f_verl, const int f_beta, const int f_iswt, const int f_grpo
#define GMPO_FLAGS_PASS f_verl, f_beta, f_iswt, f_grpo
#define GMPO_FLAGS_SET(oc) \
    ((oc).verl = f_verl, (oc).beta_on = f_beta, (oc).isw_tok = f_iswt, (oc).grpo = f_grpo)
#endif

// The tile of view v for row i, tokens [t0, t0+n): a pointer into the tensor
// when it is contiguous GMPO_T, else converted into buf.
static const GMPO_T *GMPO_S(tile)(const gmpo_view *v, int64_t i, int64_t t0, int64_t n,
                                  GMPO_T *restrict buf) {
    const int64_t st = v->stride_t;
    const int64_t off = i * v->stride_b + t0 * st;
    int64_t k;
    switch (v->dtype) {
    case GMPO_DT_F32: {
        const float *p = (const float *)v->data + off;
        if (st == 1 && sizeof(GMPO_T) == sizeof(float)) return (const GMPO_T *)p;
        for (k = 0; k < n; k++) buf[k] = (GMPO_T)p[k * st];
        break;
    }
    case GMPO_DT_F64: {
        const double *p = (const double *)v->data + off;
        if (st == 1 && sizeof(GMPO_T) == sizeof(double)) return (const GMPO_T *)p;
        for (k = 0; k < n; k++) buf[k] = (GMPO_T)p[k * st];
        break;
    }
    case GMPO_DT_BF16: {
        const uint16_t *p = (const uint16_t *)v->data + off;
        for (k = 0; k < n; k++) buf[k] = (GMPO_T)gmpo_bf16_to_f32(p[k * st]);
        break;
    }
    case GMPO_DT_F16: {
        const uint16_t *p = (const uint16_t *)v->data + off;
        for (k = 0; k < n; k++) buf[k] = (GMPO_T)gmpo_f16_to_f32(p[k * st]);
        break;
    }
    case GMPO_DT_BOOL:
    case GMPO_DT_U8: {
        const uint8_t *p = (const uint8_t *)v->data + off;
        for (k = 0; k < n; k++) buf[k] = (GMPO_T)p[k * st];
        break;
    }
    default:
        for (k = 0; k < n; k++) buf[k] = (GMPO_T)gmpo_load_d(v->data, v->dtype, off + k * st);
        break;
    }
    return buf;
}

static void GMPO_S(fill)(GMPO_T *restrict buf, int64_t n, GMPO_T v) {
    for (int64_t k = 0; k < n; k++) buf[k] = v;
}

// Scratch of one thread: conversion buffers and constant tiles.
typedef struct {
    GMPO_T lp[GMPO_TILE], olp[GMPO_TILE], m[GMPO_TILE];
    GMPO_T adv[GMPO_TILE], ref[GMPO_TILE], w[GMPO_TILE], out[GMPO_TILE];
} GMPO_S(scratch);

// The input tiles of row i the kernels read.
typedef struct {
    const GMPO_T *lp, *olp, *m, *adv, *ref, *w;
} GMPO_S(tiles);

GMPO_INLINE GMPO_S(tiles) GMPO_S(load_tiles)(const gmpo_args *a, const GMPO_S(gmpo_opts) *o,
                                                    int64_t i, int64_t t0, int64_t n,
                                                    GMPO_S(scratch) *sc) {
    GMPO_S(tiles) tl;
    tl.lp = GMPO_S(tile)(&a->logp, i, t0, n, sc->lp);
    tl.olp = GMPO_S(tile)(&a->old_logp, i, t0, n, sc->olp);
    tl.m = GMPO_S(tile)(&a->mask, i, t0, n, sc->m);
    tl.adv = a->adv.stride_t ? GMPO_S(tile)(&a->adv, i, t0, n, sc->adv) : sc->adv;
    tl.ref = o->beta_on ? GMPO_S(tile)(&a->ref_logp, i, t0, n, sc->ref) : sc->ref;
    tl.w = (o->isw && a->is_w.stride_t) ? GMPO_S(tile)(&a->is_w, i, t0, n, sc->w) : sc->w;
    return tl;
}

static GMPO_T GMPO_S(row_value)(const gmpo_view *v, int64_t i, GMPO_T absent) {
    if (!v->data || v->stride_t) return absent;
    return (GMPO_T)gmpo_load_d(v->data, v->dtype, i * v->stride_b);
}

// per-row constants into the scratch tiles (advantage and weight of the row)
static void GMPO_S(row_constants)(const gmpo_args *a, int64_t i, GMPO_S(scratch) *sc,
                                  GMPO_T *adv_row, GMPO_T *w_row) {
    *adv_row = GMPO_S(row_value)(&a->adv, i, 0);
    *w_row = GMPO_S(row_value)(&a->is_w, i, 1);
    if (!a->adv.stride_t) GMPO_S(fill)(sc->adv, GMPO_TILE, *adv_row);
    if (!(a->is_w.data && a->is_w.stride_t)) GMPO_S(fill)(sc->w, GMPO_TILE, *w_row);
    if (a->beta == 0) GMPO_S(fill)(sc->ref, GMPO_TILE, 0);   // read by no formula, but defined
}

// ----------------------------------------------------------------------------
// forward

// The lane sums of a row: the tokens are spread over GMPO_LANES independent
// partial sums (a fixed order, so every run gives the same bits) that the
// compiler keeps in vector registers; they are folded once, at the row's end.
typedef struct {
    GMPO_T my[GMPO_LANES], nn[GMPO_LANES], am[GMPO_LANES], lw[GMPO_LANES], kk[GMPO_LANES];
    GMPO_T m0[GMPO_LANES], m1[GMPO_LANES], m2[GMPO_LANES];
} GMPO_S(lanes);

GMPO_INLINE void GMPO_S(lanes_zero)(GMPO_S(lanes) *L) {
    for (int j = 0; j < GMPO_LANES; j++) {
        L->my[j] = 0; L->nn[j] = 0; L->am[j] = 0; L->lw[j] = 0; L->kk[j] = 0;
        L->m0[j] = 0; L->m1[j] = 0; L->m2[j] = 0;
    }
}

GMPO_INLINE void GMPO_S(lanes_fold)(const GMPO_S(lanes) *L, GMPO_S(gmpo_acc) *acc) {
    for (int j = 0; j < GMPO_LANES; j++) {
        acc->my += L->my[j]; acc->n += L->nn[j]; acc->am += L->am[j]; acc->logw += L->lw[j];
        acc->k += L->kk[j]; acc->m0 += L->m0[j]; acc->m1 += L->m1[j]; acc->m2 += L->m2[j];
    }
}

// Sums of one tile into the lanes (n: a multiple of GMPO_LANES except at the
// row's end, so token t of the row always lands in lane t % GMPO_LANES).
GMPO_INLINE void GMPO_S(tile_forward)(const GMPO_S(gmpo_opts) *opts, GMPO_FLAGS_DECL, int64_t n,
                                      const GMPO_T *restrict m, const GMPO_T *restrict lp,
                                      const GMPO_T *restrict olp, const GMPO_T *restrict adv,
                                      const GMPO_T *restrict ref, const GMPO_T *restrict w,
                                      GMPO_S(lanes) *restrict L) {
    GMPO_S(gmpo_opts) oc = *opts;
    GMPO_FLAGS_SET(oc);
    const GMPO_S(gmpo_opts) *o = &oc;
    int j;
    for (int64_t k0 = 0; k0 < n; k0 += GMPO_LANES) {
        int lanes = n - k0 < GMPO_LANES ? (int)(n - k0) : GMPO_LANES;
        if (lanes == GMPO_LANES) {
#pragma omp simd
            for (j = 0; j < GMPO_LANES; j++) {
                int64_t k = k0 + j;
                GMPO_T mk = m[k];
                GMPO_S(gmpo_acc) c = GMPO_S(gmpo_token_contrib)(o, mk, lp[k], olp[k], adv[k],
                                                                ref[k], w[k]);
                // padding never enters the arithmetic: a select, not a product,
                // where a NaN or inf in a masked token could leak through
                // (n, and trl's clip counts, are exactly 0 when m is)
                int on = mk != 0;
                L->my[j] += on ? c.my : 0;
                L->nn[j] += c.n;
                L->am[j] += on ? c.am : 0;
                if (o->isw_tok) L->lw[j] += on ? c.logw : 0;
                if (o->beta_on) L->kk[j] += on ? c.k : 0;
                L->m0[j] += c.m0;
                L->m1[j] += c.m1;
                L->m2[j] += o->verl ? (on ? c.m2 : 0) : c.m2;
            }
        } else {
            for (j = 0; j < lanes; j++) {
                int64_t k = k0 + j;
                GMPO_T mk = m[k];
                if (mk == 0) continue;
                GMPO_S(gmpo_acc) c = GMPO_S(gmpo_token_contrib)(o, mk, lp[k], olp[k], adv[k],
                                                                ref[k], w[k]);
                L->my[j] += c.my; L->nn[j] += c.n; L->am[j] += c.am; L->lw[j] += c.logw;
                L->kk[j] += c.k; L->m0[j] += c.m0; L->m1[j] += c.m1; L->m2[j] += c.m2;
            }
        }
    }
}

// the sums of row i over its tokens (adv_row, w_row: its per-row values)
GMPO_INLINE void GMPO_S(row_sums_o)(const gmpo_args *a, const GMPO_S(gmpo_opts) *o,
                                    GMPO_FLAGS_DECL, int64_t i, GMPO_S(scratch) *sc,
                                    GMPO_S(gmpo_acc) *acc, GMPO_T *adv_row, GMPO_T *w_row) {
    GMPO_S(row_constants)(a, i, sc, adv_row, w_row);
    GMPO_S(lanes) L;
    GMPO_S(lanes_zero)(&L);
    for (int64_t t0 = 0; t0 < a->T; t0 += GMPO_TILE) {
        int64_t n = a->T - t0 < GMPO_TILE ? a->T - t0 : GMPO_TILE;
        GMPO_S(tiles) tl = GMPO_S(load_tiles)(a, o, i, t0, n, sc);
        GMPO_S(tile_forward)(o, GMPO_FLAGS_PASS, n, tl.m, tl.lp, tl.olp, tl.adv, tl.ref, tl.w,
                             &L);
    }
    GMPO_S(gmpo_acc_zero)(acc);
    GMPO_S(lanes_fold)(&L, acc);
}

GMPO_INLINE void GMPO_S(row_forward_o)(const gmpo_args *a, const GMPO_S(gmpo_opts) *o,
                                       GMPO_FLAGS_DECL, int64_t i, GMPO_S(scratch) *sc,
                                       double *rs) {
    GMPO_T adv_row, w_row;
    GMPO_S(gmpo_acc) acc;
    GMPO_S(row_sums_o)(a, o, GMPO_FLAGS_PASS, i, sc, &acc, &adv_row, &w_row);
    GMPO_S(gmpo_row_finish)(a, &acc, adv_row, w_row, rs);
}

// The row loops are instantiated once per combination of the option flags
// (convention, KL, token weights; GRPO apart), each a function of its own that
// receives the flags as literal constants, so that each compiles to
// straight-line vector code; GMPO_DISPATCH picks the instance once per call.
#define GMPO_INSTANCES(MAKE)                                                         \
    MAKE(0, 0, 0, 0, 0) MAKE(1, 0, 0, 1, 0) MAKE(2, 0, 1, 0, 0) MAKE(3, 0, 1, 1, 0)   \
    MAKE(4, 1, 0, 0, 0) MAKE(5, 1, 0, 1, 0) MAKE(6, 1, 1, 0, 0) MAKE(7, 1, 1, 1, 0)   \
    MAKE(8, 0, 0, 0, 1) MAKE(9, 0, 1, 0, 1)

static int GMPO_S(instance)(const GMPO_S(gmpo_opts) *o) {
    if (o->grpo) return 8 + o->beta_on;
    return (o->verl << 2) | (o->beta_on << 1) | o->isw_tok;
}

#define GMPO_DISPATCH(FN, ...)                                                       \
    switch (GMPO_S(instance)(&o_)) {                                                 \
    case 0: GMPO_S(FN##_0)(__VA_ARGS__); break;                                      \
    case 1: GMPO_S(FN##_1)(__VA_ARGS__); break;                                      \
    case 2: GMPO_S(FN##_2)(__VA_ARGS__); break;                                      \
    case 3: GMPO_S(FN##_3)(__VA_ARGS__); break;                                      \
    case 4: GMPO_S(FN##_4)(__VA_ARGS__); break;                                      \
    case 5: GMPO_S(FN##_5)(__VA_ARGS__); break;                                      \
    case 6: GMPO_S(FN##_6)(__VA_ARGS__); break;                                      \
    case 7: GMPO_S(FN##_7)(__VA_ARGS__); break;                                      \
    case 8: GMPO_S(FN##_8)(__VA_ARGS__); break;                                      \
    default: GMPO_S(FN##_9)(__VA_ARGS__); break;                                     \
    }

// forward of rows [r0, r1): one call per thread chunk, dispatched per ISA
#define GMPO_MAKE_ROWS_FORWARD(K, V, B, W, G)                                        \
    GMPO_CLONES static void GMPO_S(rows_forward_##K)(const gmpo_args *a,             \
                                                     const GMPO_S(gmpo_opts) *o,     \
                                                     int64_t r0, int64_t r1, double *rows) { \
        GMPO_S(scratch) sc;                                                          \
        for (int64_t i = r0; i < r1; i++)                                            \
            GMPO_S(row_forward_o)(a, o, V, B, W, G, i, &sc, rows + i * GMPO_ROW_STATS); \
    }
GMPO_INSTANCES(GMPO_MAKE_ROWS_FORWARD)

static void GMPO_S(rows_forward)(const gmpo_args *a, int64_t r0, int64_t r1, double *rows) {
    GMPO_S(gmpo_opts) o_ = GMPO_S(gmpo_opts_make)(a);
    GMPO_DISPATCH(rows_forward, a, &o_, r0, r1, rows)
}

// row sums of rows [r0, r1) into sums (GMPO_SUM_STATS each): the first half of
// forward, for rows split over processes
#define GMPO_MAKE_ROWS_SUMS(K, V, B, W, G)                                           \
    GMPO_CLONES static void GMPO_S(rows_sums_##K)(const gmpo_args *a,                \
                                                  const GMPO_S(gmpo_opts) *o,        \
                                                  int64_t r0, int64_t r1, double *sums) { \
        GMPO_S(scratch) sc;                                                          \
        GMPO_T adv_row, w_row;                                                       \
        GMPO_S(gmpo_acc) acc;                                                        \
        for (int64_t i = r0; i < r1; i++) {                                          \
            GMPO_S(row_sums_o)(a, o, V, B, W, G, i, &sc, &acc, &adv_row, &w_row);    \
            GMPO_S(gmpo_acc_store)(&acc, sums + i * GMPO_SUM_STATS);                 \
        }                                                                            \
    }
GMPO_INSTANCES(GMPO_MAKE_ROWS_SUMS)

static void GMPO_S(rows_sums)(const gmpo_args *a, int64_t r0, int64_t r1, double *sums) {
    GMPO_S(gmpo_opts) o_ = GMPO_S(gmpo_opts_make)(a);
    GMPO_DISPATCH(rows_sums, a, &o_, r0, r1, sums)
}

// the second half: summed row sums -> the rows' statistics (cheap: O(B))
static void GMPO_S(rows_finish_sums)(const gmpo_args *a, const double *sums, double *rows) {
    for (int64_t i = 0; i < a->B; i++) {
        GMPO_S(gmpo_acc) acc;
        GMPO_S(gmpo_acc_load)(sums + i * GMPO_SUM_STATS, &acc);
        GMPO_T adv_row = GMPO_S(row_value)(&a->adv, i, 0);
        GMPO_T w_row = GMPO_S(row_value)(&a->is_w, i, 1);
        GMPO_S(gmpo_row_finish)(a, &acc, adv_row, w_row, rows + i * GMPO_ROW_STATS);
    }
}

// ----------------------------------------------------------------------------
// backward

GMPO_INLINE void GMPO_S(row_backward_o)(const gmpo_args *a, const GMPO_S(gmpo_opts) *opts,
                                        GMPO_FLAGS_DECL, int64_t i, GMPO_S(scratch) *sc,
                                        const double *rows, double go, void *grad,
                                        int32_t gdt) {
    GMPO_S(gmpo_opts) oc = *opts;
    GMPO_FLAGS_SET(oc);
    const GMPO_S(gmpo_opts) *o = &oc;
    double pg_d, kl_d;
    gmpo_row_grad_factors(a, rows, i, go, &pg_d, &kl_d);
    const GMPO_T pg = (GMPO_T)pg_d, kl = (GMPO_T)kl_d;
    GMPO_T adv_row, w_row;
    GMPO_S(row_constants)(a, i, sc, &adv_row, &w_row);
    const int direct = gdt == (sizeof(GMPO_T) == sizeof(float) ? GMPO_DT_F32 : GMPO_DT_F64);
    for (int64_t t0 = 0; t0 < a->T; t0 += GMPO_TILE) {
        int64_t n = a->T - t0 < GMPO_TILE ? a->T - t0 : GMPO_TILE;
        GMPO_S(tiles) tl = GMPO_S(load_tiles)(a, o, i, t0, n, sc);
        GMPO_T *restrict out = direct ? (GMPO_T *)grad + i * a->T + t0 : sc->out;
#pragma omp simd
        for (int64_t k = 0; k < n; k++)
            out[k] = GMPO_S(gmpo_token_grad_o)(o, pg, kl, tl.m[k], tl.lp[k], tl.olp[k],
                                               tl.adv[k], tl.ref[k], tl.w[k]);
        if (!direct) {
            int64_t off = i * a->T + t0, k;
            if (gdt == GMPO_DT_BF16) {
                uint16_t *p = (uint16_t *)grad + off;
                for (k = 0; k < n; k++) p[k] = gmpo_f32_to_bf16((float)out[k]);
            } else if (gdt == GMPO_DT_F16) {
                uint16_t *p = (uint16_t *)grad + off;
                for (k = 0; k < n; k++) p[k] = gmpo_f32_to_f16((float)out[k]);
            } else {
                for (k = 0; k < n; k++) gmpo_store_d(grad, gdt, off + k, (double)out[k]);
            }
        }
    }
}

#define GMPO_MAKE_ROWS_BACKWARD(K, V, B, W, G)                                       \
    GMPO_CLONES static void GMPO_S(rows_backward_##K)(                               \
        const gmpo_args *a, const GMPO_S(gmpo_opts) *o, int64_t r0, int64_t r1,      \
        const double *rows, double go, void *grad, int32_t gdt) {                    \
        GMPO_S(scratch) sc;                                                          \
        for (int64_t i = r0; i < r1; i++)                                            \
            GMPO_S(row_backward_o)(a, o, V, B, W, G, i, &sc, rows, go, grad, gdt);   \
    }
GMPO_INSTANCES(GMPO_MAKE_ROWS_BACKWARD)

// forward and backward (grad_out = 1) of each row in turn, while its inputs
// are still in the cache (gmpo only: a row's gradient needs only its own sums)
#define GMPO_MAKE_ROWS_FUSED(K, V, B, W, G)                                          \
    GMPO_CLONES static void GMPO_S(rows_fused_##K)(                                  \
        const gmpo_args *a, const GMPO_S(gmpo_opts) *o, int64_t r0, int64_t r1,      \
        double *rows, void *grad, int32_t gdt) {                                     \
        GMPO_S(scratch) sc;                                                          \
        for (int64_t i = r0; i < r1; i++) {                                          \
            GMPO_S(row_forward_o)(a, o, V, B, W, G, i, &sc, rows + i * GMPO_ROW_STATS); \
            GMPO_S(row_backward_o)(a, o, V, B, W, G, i, &sc, rows, 1.0, grad, gdt);  \
        }                                                                            \
    }
GMPO_INSTANCES(GMPO_MAKE_ROWS_FUSED)

static void GMPO_S(rows_fused)(const gmpo_args *a, int64_t r0, int64_t r1, double *rows,
                               void *grad, int32_t gdt) {
    GMPO_S(gmpo_opts) o_ = GMPO_S(gmpo_opts_make)(a);
    GMPO_DISPATCH(rows_fused, a, &o_, r0, r1, rows, grad, gdt)
}

static void GMPO_S(rows_backward)(const gmpo_args *a, int64_t r0, int64_t r1,
                                  const double *rows, double go, void *grad, int32_t gdt) {
    GMPO_S(gmpo_opts) o_ = GMPO_S(gmpo_opts_make)(a);
    GMPO_DISPATCH(rows_backward, a, &o_, r0, r1, rows, go, grad, gdt)
}

// ----------------------------------------------------------------------------
// GMPO_ALGO_FAMILY (TRL's GRPO family with its options): the per-token math of
// gmpo_math_impl.h (gmpo_fam_token, gmpo_fam_grad) over tiles, the row finish
// in fp64 (gmpo_family_row_finish). The tile loops are instantiated for literal
// constants of the kind of loss (0 the clip types, 1 cispo, 2 sapo, 3 vespo),
// the level and the KL, so that each compiles to straight-line vector code
// (the other options are loop-invariant selects); the sums go to
// GMPO_LANES lanes in a fixed order, as in the GMPO / GRPO kernels above.

typedef struct {
    GMPO_S(scratch) sc;
    GMPO_T slp[GMPO_TILE], tm[GMPO_TILE], ones[GMPO_TILE];
} GMPO_S(fam_scratch);

#define GMPO_FAM_FLAGS_DECL const int f_kind, const int f_seq, const int f_beta, const int f_verl
#define GMPO_FAM_FLAGS_PASS f_kind, f_seq, f_beta, f_verl
// the options with the literal flags set (the loss type stands for its kind)
#define GMPO_FAM_FLAGS_SET(fo)                                                         \
    ((fo).type = f_kind == 0 ? GMPO_LT_DAPO                                            \
                 : f_kind == 1 ? GMPO_LT_CISPO : f_kind == 2 ? GMPO_LT_SAPO : GMPO_LT_VESPO, \
     (fo).seq = f_seq, (fo).beta_on = f_beta, (fo).verl = f_verl)

static int GMPO_S(fam_kind)(int type) {
    return type == GMPO_LT_CISPO ? 1 : type == GMPO_LT_SAPO ? 2 : type == GMPO_LT_VESPO ? 3 : 0;
}

// one tile's sums into the lanes (token t of the row in lane t % GMPO_LANES)
GMPO_INLINE void GMPO_S(fam_tile_sums)(const GMPO_S(gmpo_fam_opts) *fo0, GMPO_FAM_FLAGS_DECL,
                                       int64_t n, const GMPO_T *restrict m,
                                       const GMPO_T *restrict tm, const GMPO_T *restrict lp,
                                       const GMPO_T *restrict olp, const GMPO_T *restrict slp,
                                       const GMPO_T *restrict adv, const GMPO_T *restrict ref,
                                       const GMPO_T *restrict w, GMPO_S(lanes) *restrict L) {
    GMPO_S(gmpo_fam_opts) foc = *fo0;
    GMPO_FAM_FLAGS_SET(foc);
    const GMPO_S(gmpo_fam_opts) *fo = &foc;
    const int f_verl_seq = f_verl && f_seq;
    int j;
    for (int64_t k0 = 0; k0 < n; k0 += GMPO_LANES) {
        int lanes = n - k0 < GMPO_LANES ? (int)(n - k0) : GMPO_LANES;
        if (lanes == GMPO_LANES) {
#pragma omp simd
            for (j = 0; j < GMPO_LANES; j++) {
                int64_t k = k0 + j;
                GMPO_T mk = m[k];
                GMPO_S(gmpo_acc) c = GMPO_S(gmpo_fam_token)(fo, mk, tm[k], lp[k], olp[k], slp[k],
                                                            adv[k], ref[k], w[k]);
                // padding never enters the arithmetic: selects, never products
                int on = mk != 0;
                L->my[j] += on ? c.my : 0;
                L->nn[j] += c.n;
                L->am[j] += on ? c.am : 0;
                if (f_beta) L->kk[j] += on ? c.k : 0;
                L->m0[j] += on ? c.m0 : 0;
                L->m1[j] += on ? c.m1 : 0;
                if (f_verl_seq) L->m2[j] += on ? c.m2 : 0;   // verl's gspo only
            }
        } else {
            for (j = 0; j < lanes; j++) {
                int64_t k = k0 + j;
                GMPO_T mk = m[k];
                if (mk == 0) continue;
                GMPO_S(gmpo_acc) c = GMPO_S(gmpo_fam_token)(fo, mk, tm[k], lp[k], olp[k], slp[k],
                                                            adv[k], ref[k], w[k]);
                L->my[j] += c.my; L->nn[j] += c.n; L->am[j] += c.am; L->kk[j] += c.k;
                L->m0[j] += c.m0; L->m1[j] += c.m1; L->m2[j] += c.m2;
            }
        }
    }
}

// the sums of row i (gmpo.h's family slots) into sm (GMPO_SUM_STATS doubles)
GMPO_INLINE void GMPO_S(fam_row_sums_o)(const gmpo_args *a, const GMPO_S(gmpo_opts) *o,
                                        const GMPO_S(gmpo_fam_opts) *fo, GMPO_FAM_FLAGS_DECL,
                                        int64_t i, GMPO_S(fam_scratch) *fs, double *sm) {
    GMPO_T adv_row, w_row;
    GMPO_S(row_constants)(a, i, &fs->sc, &adv_row, &w_row);
    const int vw = f_kind == 3 && a->is_w.data && a->is_w.stride_t;
    GMPO_S(lanes) L;
    GMPO_S(lanes_zero)(&L);
    GMPO_T logw = 0;
    for (int64_t t0 = 0; t0 < a->T; t0 += GMPO_TILE) {
        int64_t n = a->T - t0 < GMPO_TILE ? a->T - t0 : GMPO_TILE;
        GMPO_S(tiles) tl = GMPO_S(load_tiles)(a, o, i, t0, n, &fs->sc);
        const GMPO_T *slp = fo->opm ? GMPO_S(tile)(&a->samp_logp, i, t0, n, fs->slp) : tl.lp;
        const GMPO_T *tm = a->tok_mask.data ? GMPO_S(tile)(&a->tok_mask, i, t0, n, fs->tm) : fs->ones;
        // vespo: TRL sums the clamped log importance ratios over every token
        if (vw)
            for (int64_t k = 0; k < n; k++) logw += GMPO_S(gmpo_fam_logis)(tl.w[k]);
        GMPO_S(fam_tile_sums)(fo, GMPO_FAM_FLAGS_PASS, n, tl.m, tm, tl.lp, tl.olp, slp, tl.adv,
                              tl.ref, tl.w, &L);
    }
    GMPO_S(gmpo_acc) acc;
    GMPO_S(gmpo_acc_zero)(&acc);
    GMPO_S(lanes_fold)(&L, &acc);
    acc.logw = logw;
    GMPO_S(gmpo_acc_store)(&acc, sm);
}

GMPO_INLINE void GMPO_S(fam_row_backward_o)(const gmpo_args *a, const GMPO_S(gmpo_opts) *o,
                                            const GMPO_S(gmpo_fam_opts) *fo0,
                                            GMPO_FAM_FLAGS_DECL, int64_t i,
                                            GMPO_S(fam_scratch) *fs, const double *rows,
                                            double go, void *grad, int32_t gdt) {
    GMPO_S(gmpo_fam_opts) foc = *fo0;
    GMPO_FAM_FLAGS_SET(foc);
    const GMPO_S(gmpo_fam_opts) *fo = &foc;
    double pg1_d, pc_d, kl_d;
    gmpo_family_grad_factors(a, rows, i, go, &pg1_d, &pc_d, &kl_d);
    const GMPO_T pg1 = (GMPO_T)pg1_d, pc = (GMPO_T)pc_d, kl = (GMPO_T)kl_d;
    GMPO_T adv_row, w_row;
    GMPO_S(row_constants)(a, i, &fs->sc, &adv_row, &w_row);
    const int direct = gdt == (sizeof(GMPO_T) == sizeof(float) ? GMPO_DT_F32 : GMPO_DT_F64);
    for (int64_t t0 = 0; t0 < a->T; t0 += GMPO_TILE) {
        int64_t n = a->T - t0 < GMPO_TILE ? a->T - t0 : GMPO_TILE;
        GMPO_S(tiles) tl = GMPO_S(load_tiles)(a, o, i, t0, n, &fs->sc);
        const GMPO_T *tm = a->tok_mask.data ? GMPO_S(tile)(&a->tok_mask, i, t0, n, fs->tm) : fs->ones;
        GMPO_T *restrict out = direct ? (GMPO_T *)grad + i * a->T + t0 : fs->sc.out;
#pragma omp simd
        for (int64_t k = 0; k < n; k++)
            out[k] = GMPO_S(gmpo_fam_grad)(fo, pg1, pc, kl, tl.m[k], tm[k], tl.lp[k], tl.olp[k],
                                           tl.adv[k], tl.ref[k], tl.w[k]);
        if (!direct) {
            int64_t off = i * a->T + t0, k;
            if (gdt == GMPO_DT_BF16) {
                uint16_t *p = (uint16_t *)grad + off;
                for (k = 0; k < n; k++) p[k] = gmpo_f32_to_bf16((float)out[k]);
            } else if (gdt == GMPO_DT_F16) {
                uint16_t *p = (uint16_t *)grad + off;
                for (k = 0; k < n; k++) p[k] = gmpo_f32_to_f16((float)out[k]);
            } else {
                for (k = 0; k < n; k++) gmpo_store_d(grad, gdt, off + k, (double)out[k]);
            }
        }
    }
}

static void GMPO_S(fam_opts_pair)(const gmpo_args *a, GMPO_S(gmpo_opts) *o,
                                  GMPO_S(gmpo_fam_opts) *fo, GMPO_S(fam_scratch) *fs) {
    *o = GMPO_S(gmpo_opts_make)(a);
    o->isw = a->is_w.data != 0;      // load_tiles reads the per-token weights
    *fo = GMPO_S(gmpo_fam_opts_make)(a);
    GMPO_S(fill)(fs->ones, GMPO_TILE, 1);
}

// the instances: TRL's kind (4) x level (2) x KL (2), then verl's (convention
// verl, a literal flag too, so that TRL's loops carry none of verl's branches):
// vanilla, gspo, cispo, sapo
#define GMPO_FAM_INSTANCES(MAKE)                                                      \
    MAKE(0, 0, 0, 0, 0) MAKE(1, 0, 0, 1, 0) MAKE(2, 0, 1, 0, 0) MAKE(3, 0, 1, 1, 0)    \
    MAKE(4, 1, 0, 0, 0) MAKE(5, 1, 0, 1, 0) MAKE(6, 1, 1, 0, 0) MAKE(7, 1, 1, 1, 0)    \
    MAKE(8, 2, 0, 0, 0) MAKE(9, 2, 0, 1, 0) MAKE(10, 2, 1, 0, 0) MAKE(11, 2, 1, 1, 0)  \
    MAKE(12, 3, 0, 0, 0) MAKE(13, 3, 0, 1, 0) MAKE(14, 3, 1, 0, 0) MAKE(15, 3, 1, 1, 0)\
    MAKE(16, 0, 0, 0, 1) MAKE(17, 0, 1, 0, 1) MAKE(18, 1, 0, 0, 1) MAKE(19, 2, 0, 0, 1)
#define GMPO_FAM_N_INSTANCES 20

static int GMPO_S(fam_instance)(const gmpo_args *a) {
    int kind = GMPO_S(fam_kind)(a->loss_type);
    if (a->convention == GMPO_CONV_VERL)   // (checked: kinds 0-2, the level for kind 0 only)
        return 16 + (kind == 0 ? (a->fam.seq_level != 0) : kind + 1);
    return 4 * kind + 2 * (a->fam.seq_level != 0) + (a->beta != 0);
}

#define GMPO_FAM_MAKE(K, KIND, SEQ, BETA, VERL)                                        \
    GMPO_CLONES static void GMPO_S(fam_sums_##K)(const gmpo_args *a, int64_t r0, int64_t r1, \
                                                 double *sums) {                       \
        GMPO_S(gmpo_opts) o;                                                           \
        GMPO_S(gmpo_fam_opts) fo;                                                      \
        GMPO_S(fam_scratch) fs;                                                        \
        GMPO_S(fam_opts_pair)(a, &o, &fo, &fs);                                        \
        for (int64_t i = r0; i < r1; i++)                                              \
            GMPO_S(fam_row_sums_o)(a, &o, &fo, KIND, SEQ, BETA, VERL, i, &fs,          \
                                   sums + (i - r0) * GMPO_SUM_STATS);                  \
    }                                                                                  \
    GMPO_CLONES static void GMPO_S(fam_bwd_##K)(const gmpo_args *a, int64_t r0, int64_t r1, \
                                                const double *rows, double go, void *grad, \
                                                int32_t gdt) {                         \
        GMPO_S(gmpo_opts) o;                                                           \
        GMPO_S(gmpo_fam_opts) fo;                                                      \
        GMPO_S(fam_scratch) fs;                                                        \
        GMPO_S(fam_opts_pair)(a, &o, &fo, &fs);                                        \
        for (int64_t i = r0; i < r1; i++)                                              \
            GMPO_S(fam_row_backward_o)(a, &o, &fo, KIND, SEQ, BETA, VERL, i, &fs, rows,\
                                       go,                                             \
                                       grad, gdt);                                     \
    }
GMPO_FAM_INSTANCES(GMPO_FAM_MAKE)
#undef GMPO_FAM_MAKE

typedef void (*GMPO_S(fam_sums_fn))(const gmpo_args *, int64_t, int64_t, double *);
typedef void (*GMPO_S(fam_bwd_fn))(const gmpo_args *, int64_t, int64_t, const double *, double,
                                   void *, int32_t);
#define GMPO_FAM_SUMS_ENTRY(K, KIND, SEQ, BETA, VERL) GMPO_S(fam_sums_##K),
#define GMPO_FAM_BWD_ENTRY(K, KIND, SEQ, BETA, VERL) GMPO_S(fam_bwd_##K),
static const GMPO_S(fam_sums_fn) GMPO_S(fam_sums_table)[GMPO_FAM_N_INSTANCES] = {
    GMPO_FAM_INSTANCES(GMPO_FAM_SUMS_ENTRY)};
static const GMPO_S(fam_bwd_fn) GMPO_S(fam_bwd_table)[GMPO_FAM_N_INSTANCES] = {
    GMPO_FAM_INSTANCES(GMPO_FAM_BWD_ENTRY)};
#undef GMPO_FAM_SUMS_ENTRY
#undef GMPO_FAM_BWD_ENTRY

// row sums of rows [r0, r1) into sums (B rows; the first half of forward, for
// rows split over processes). The instances write row r0's sums at their
// pointer.
static void GMPO_S(fam_rows_sums)(const gmpo_args *a, int64_t r0, int64_t r1, double *sums) {
    GMPO_S(fam_sums_table)[GMPO_S(fam_instance)(a)](a, r0, r1, sums + r0 * GMPO_SUM_STATS);
}

// the forward of rows [r0, r1): their sums (rounded to GMPO_T, as they would be
// handed over), then the fp64 finish
static void GMPO_S(fam_rows_forward)(const gmpo_args *a, int64_t r0, int64_t r1, double *rows) {
    const GMPO_S(fam_sums_fn) sums_of = GMPO_S(fam_sums_table)[GMPO_S(fam_instance)(a)];
    for (int64_t i = r0; i < r1; i++) {
        double sm[GMPO_SUM_STATS];
        sums_of(a, i, i + 1, sm);
        gmpo_family_row_finish(a, sm, (double)GMPO_S(row_value)(&a->adv, i, 0),
                               (double)GMPO_S(row_value)(&a->is_w, i, 1),
                               rows + i * GMPO_ROW_STATS);
    }
}

static void GMPO_S(fam_rows_finish_sums)(const gmpo_args *a, const double *sums, double *rows) {
    for (int64_t i = 0; i < a->B; i++)
        gmpo_family_row_finish(a, sums + i * GMPO_SUM_STATS,
                               (double)GMPO_S(row_value)(&a->adv, i, 0),
                               (double)GMPO_S(row_value)(&a->is_w, i, 1),
                               rows + i * GMPO_ROW_STATS);
}

static void GMPO_S(fam_rows_backward)(const gmpo_args *a, int64_t r0, int64_t r1,
                                      const double *rows, double go, void *grad, int32_t gdt) {
    GMPO_S(fam_bwd_table)[GMPO_S(fam_instance)(a)](a, r0, r1, rows, go, grad, gdt);
}
