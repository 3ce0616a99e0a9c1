/*
 * gmpo_cpu_impl.h -- the CPU row kernels, included twice by gmpo_cpu.c with
 * GMPO_T float (fp32, fp16, bf16 inputs) and double (fp64 inputs).
 *
 * A row is processed a tile of GMPO_TILE tokens at a time: each input's tile is
 * converted into a small GMPO_T array (any dtype, any token stride), then the
 * shared per-token math of gmpo_math.h runs over contiguous arrays.
 */

// tile of view v for row i, tokens [t0, t0+n) -> dst (GMPO_T)
static void GMPO_S(load_tile)(const gmpo_view *v, int64_t i, int64_t t0, int64_t n,
                              GMPO_T *restrict dst) {
    const int64_t st = v->stride_t;
    const int64_t off = i * v->stride_b + t0 * st;
    int64_t k;
    switch (v->dtype) {
    case GMPO_DT_F32: {
        const float *p = (const float *)v->data + off;
        if (st == 1) for (k = 0; k < n; k++) dst[k] = (GMPO_T)p[k];
        else for (k = 0; k < n; k++) dst[k] = (GMPO_T)p[k * st];
        break;
    }
    case GMPO_DT_F64: {
        const double *p = (const double *)v->data + off;
        for (k = 0; k < n; k++) dst[k] = (GMPO_T)p[k * st];
        break;
    }
    case GMPO_DT_BF16: {
        const uint16_t *p = (const uint16_t *)v->data + off;
        for (k = 0; k < n; k++) dst[k] = (GMPO_T)gmpo_bf16_to_f32(p[k * st]);
        break;
    }
    case GMPO_DT_F16: {
        const uint16_t *p = (const uint16_t *)v->data + off;
        for (k = 0; k < n; k++) dst[k] = (GMPO_T)gmpo_f16_to_f32(p[k * st]);
        break;
    }
    case GMPO_DT_BOOL:
    case GMPO_DT_U8: {
        const uint8_t *p = (const uint8_t *)v->data + off;
        for (k = 0; k < n; k++) dst[k] = (GMPO_T)p[k * st];
        break;
    }
    default:
        for (k = 0; k < n; k++) dst[k] = (GMPO_T)gmpo_load_d(v->data, v->dtype, off + k * st);
        break;
    }
}

// tile -> grad row (contiguous, dtype dt)
static void GMPO_S(store_tile)(void *grad, int32_t dt, int64_t off, int64_t n,
                               const GMPO_T *restrict src) {
    int64_t k;
    switch (dt) {
    case GMPO_DT_F32: { float *p = (float *)grad + off; for (k = 0; k < n; k++) p[k] = (float)src[k]; break; }
    case GMPO_DT_F64: { double *p = (double *)grad + off; for (k = 0; k < n; k++) p[k] = (double)src[k]; break; }
    case GMPO_DT_BF16: { uint16_t *p = (uint16_t *)grad + off; for (k = 0; k < n; k++) p[k] = gmpo_f32_to_bf16((float)src[k]); break; }
    case GMPO_DT_F16: { uint16_t *p = (uint16_t *)grad + off; for (k = 0; k < n; k++) p[k] = gmpo_f32_to_f16((float)src[k]); break; }
    default: break;
    }
}

// The tiles of row i the kernels need: logp, old_logp, mask always; the rest
// only when present and per token (a per-row value is read once per row).
typedef struct {
    GMPO_T lp[GMPO_TILE], olp[GMPO_TILE], m[GMPO_TILE];
    GMPO_T adv[GMPO_TILE], ref[GMPO_TILE], w[GMPO_TILE];
} GMPO_S(tiles);

static void GMPO_S(load_tiles)(const gmpo_args *a, int64_t i, int64_t t0, int64_t n,
                               GMPO_S(tiles) *tl, GMPO_T adv_row, GMPO_T w_row) {
    int64_t k;
    GMPO_S(load_tile)(&a->logp, i, t0, n, tl->lp);
    GMPO_S(load_tile)(&a->old_logp, i, t0, n, tl->olp);
    GMPO_S(load_tile)(&a->mask, i, t0, n, tl->m);
    if (a->adv.stride_t) GMPO_S(load_tile)(&a->adv, i, t0, n, tl->adv);
    else for (k = 0; k < n; k++) tl->adv[k] = adv_row;
    if (a->beta != 0) GMPO_S(load_tile)(&a->ref_logp, i, t0, n, tl->ref);
    if (a->is_w.data && a->is_w.stride_t) GMPO_S(load_tile)(&a->is_w, i, t0, n, tl->w);
    else for (k = 0; k < n; k++) tl->w[k] = w_row;
}

static GMPO_T GMPO_S(row_value)(const gmpo_view *v, int64_t i) {
    if (!v->data || v->stride_t) return 1;
    return (GMPO_T)gmpo_load_d(v->data, v->dtype, i * v->stride_b);
}

// forward of row i: its statistics into rs (GMPO_ROW_STATS doubles)
static void GMPO_S(row_forward)(const gmpo_args *a, int64_t i, GMPO_S(tiles) *tl, double *rs) {
    GMPO_S(gmpo_acc) acc;
    GMPO_S(gmpo_acc_zero)(&acc);
    GMPO_T adv_row = GMPO_S(row_value)(&a->adv, i);
    GMPO_T w_row = GMPO_S(row_value)(&a->is_w, i);
    int grpo = a->algo == GMPO_ALGO_GRPO;
    for (int64_t t0 = 0; t0 < a->T; t0 += GMPO_TILE) {
        int64_t n = a->T - t0 < GMPO_TILE ? a->T - t0 : GMPO_TILE;
        GMPO_S(load_tiles)(a, i, t0, n, tl, adv_row, w_row);
        for (int64_t k = 0; k < n; k++) {
            GMPO_T m = tl->m[k];
            if (m == 0) continue;   // padding never enters the arithmetic
            if (grpo) GMPO_S(grpo_token_fwd)(&acc, a, m, tl->lp[k], tl->olp[k], tl->adv[k], tl->ref[k], tl->w[k]);
            else GMPO_S(gmpo_token_fwd)(&acc, a, m, tl->lp[k], tl->olp[k], tl->adv[k], tl->ref[k], tl->w[k]);
        }
    }
    GMPO_S(gmpo_row_finish)(a, &acc, adv_row, w_row, rs);
}

// backward of row i into grad (contiguous (B,T) of dtype gdt); go: upstream grad
static void GMPO_S(row_backward)(const gmpo_args *a, int64_t i, GMPO_S(tiles) *tl,
                                 const double *rows, double go, void *grad, int32_t gdt) {
    const double *rs = rows + i * GMPO_ROW_STATS;
    const double *tot = rows + a->B * GMPO_ROW_STATS;
    GMPO_T pg, kl;
    if (a->algo == GMPO_ALGO_GMPO) {
        double scale = go / ((a->B > 1 ? (double)a->B : 1.0) * a->normalizer);
        pg = (GMPO_T)(rs[GMPO_RS_COEF_PG] * scale);
        kl = (GMPO_T)(rs[GMPO_RS_COEF_KL] * scale);
    } else {
        double c = go * gmpo_grpo_token_weight(a, rs, tot);
        pg = (GMPO_T)c;
        kl = (GMPO_T)(c * a->beta);
    }
    GMPO_T adv_row = GMPO_S(row_value)(&a->adv, i);
    GMPO_T w_row = GMPO_S(row_value)(&a->is_w, i);
    GMPO_T out[GMPO_TILE];
    for (int64_t t0 = 0; t0 < a->T; t0 += GMPO_TILE) {
        int64_t n = a->T - t0 < GMPO_TILE ? a->T - t0 : GMPO_TILE;
        GMPO_S(load_tiles)(a, i, t0, n, tl, adv_row, w_row);
        for (int64_t k = 0; k < n; k++) {
            GMPO_T m = tl->m[k];
            out[k] = m == 0 ? (GMPO_T)0
                            : GMPO_S(gmpo_token_grad)(a, pg, kl, m, tl->lp[k], tl->olp[k],
                                                      tl->adv[k], tl->ref[k], tl->w[k]);
        }
        GMPO_S(store_tile)(grad, gdt, i * a->T + t0, n, out);
    }
}

static void GMPO_S(cpu_forward_rows)(const gmpo_args *a, double *rows, int nt) {
    int64_t B = a->B;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        GMPO_S(tiles) tl;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t i = 0; i < B; i++) GMPO_S(row_forward)(a, i, &tl, rows + i * GMPO_ROW_STATS);
    }
    (void)nt;
}

static void GMPO_S(cpu_backward_rows)(const gmpo_args *a, const double *rows, double go,
                                      void *grad, int32_t gdt, int nt) {
    int64_t B = a->B;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        GMPO_S(tiles) tl;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t i = 0; i < B; i++) GMPO_S(row_backward)(a, i, &tl, rows, go, grad, gdt);
    }
    (void)nt;
}
