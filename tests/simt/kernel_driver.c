/*
 * kernel_driver.c -- the CUDA kernels of csrc/cuda under the SIMT emulation,
 * against the C core, in a standalone program (a sanitizer runtime is easier to
 * load into a program than into python). Built by tests/test_simt_grid.py,
 * plain and with TSan, usually with tiny grid caps (-DGMPO_MAX_GRID_X=3
 * -DGMPO_MAX_GRID_Y=2), so that a block loops over rows and reuses its shared
 * memory: what TSan must watch.
 *
 *   kernel_driver logits   the logits kernels, forward and backward, fp32 /
 *                          bf16 / fp16, entropy on and off, T + 1 positions,
 *                          masked tokens, V over 2 warps' worth (several warps
 *                          merge through shared memory)
 *   kernel_driver loss     the loss kernels with 40 and 70 rows (the totals
 *                          kernel's block has 2 and 3 warps), GMPO and GRPO,
 *                          and a row long enough for 3 chunks on grid.y
 *   kernel_driver tiles    the LM-head tile kernels (hidden_cuda.cu) against
 *                          the C ones (hidden_cpu.c): a vocabulary folded in
 *                          tiles of 1-3 warps, contiguous (ld = vn, buffers of
 *                          their exact extent: ASan sees a read one past the
 *                          end) and strided (ld > vn, NaN padding that must stay
 *                          untouched), 7-9 tokens, ids at -1, 0, v0 - 1, v0,
 *                          v0 + vn - 1, v0 + vn and V, NaN and +-inf at chosen
 *                          positions, every dtype, softcap, int32 ids
 *   kernel_driver offset   element offsets past 2^32 in every kernel that
 *                          computes one, on reserved, mostly untouched mappings
 *                          (only the rows used are touched):
 *                          - the loss forward and backward (GMPO's kernels and
 *                            the GRPO family's) over (140000, 32768)
 *                            inputs with a real row stride and an 18 GB
 *                            gradient; only the blocks of rows 0 and B-1 run
 *                            (SIMT_ONLY_BLOCKS_X). Row B-1 holds row 0's values:
 *                            its statistics and gradient must be row 0's bits,
 *                            read and written at row B-1's place;
 *                          - the logits kernels with stride_b 2^32 + 4096;
 *                          - the tile kernels with ld 2^31 + 64 (3 rows: the
 *                            last one past 2^32), against the C kernels.
 *
 * Prints a line per case and "N passed, M failed"; exit status 0 all passed,
 * 1 a result differs, 2 an entry point failed, 77 the offset case cannot map
 * its memory here.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "gmpo.h"
#include "gmpo_hidden.h"
#include "gmpo_logits.h"
#include "gmpo_math.h"

static uint64_t rng = 0x2545f4914f6cdd1dull;
static double urand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) * (1.0 / 9007199254740992.0);
}
static double nrand(void) { return (urand() + urand() + urand() + urand() - 2.0) * 1.7; }

static size_t dt_size(int32_t dt) {
    return dt == GMPO_DT_F64 || dt == GMPO_DT_I64 ? 8 : dt == GMPO_DT_F16 || dt == GMPO_DT_BF16 ? 2 : dt == GMPO_DT_BOOL ? 1 : 4;
}

static void *xalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(2); }
    memset(p, 0xAB, n ? n : 1);
    return p;
}

static int close_to(double got, double want, double tol, double scale) {
    if (isnan(want)) return isnan(got);
    if (isinf(want)) return got == want;
    return fabs(got - want) <= tol * (fabs(want) + scale);
}

static int passed, failed;
static void result(const char *name, int rc, const char *why) {
    if (rc) failed++;
    else passed++;
    printf("%s %s%s%s\n", rc ? "FAIL" : "ok  ", name, why[0] ? ": " : "", why);
}

/* ------------------------------------------------------------------------- */
/* logits */

/* the arguments every logits run here shares: (B, TL, V) logits as given, ids
 * (B, T) int64, temperature 0.7, one thread, no mask */
static gmpo_logits_args logits_args(int64_t B, int64_t T, int64_t TL, int64_t V,
                                    gmpo_view logits, int64_t *ids) {
    gmpo_logits_args a;
    memset(&a, 0, sizeof a);
    a.B = B; a.T = T; a.TL = TL; a.V = V;
    a.logits = logits;
    a.ids = (gmpo_view){ids, GMPO_DT_I64, T, 1, B * T};
    a.logp_extent = a.entropy_extent = a.lse_extent = B * T;
    a.temperature = 0.7;
    a.num_threads = 1;
    snprintf(a.ids_name, sizeof a.ids_name, "ids");
    return a;
}

static int logits_case(int32_t dt, int ent, int64_t B, int64_t T, int64_t V) {
    const int64_t TL = T + 1, n = B * TL * V;
    void *z = xalloc((size_t)n * dt_size(dt));
    for (int64_t k = 0; k < n; k++) gmpo_store_d(z, dt, k, 3.0 * nrand());
    int64_t *ids = xalloc((size_t)(B * T) * 8);
    uint8_t *mask = xalloc((size_t)(B * T));
    float *g = xalloc((size_t)(B * T) * 4), *gh = xalloc((size_t)(B * T) * 4);
    for (int64_t k = 0; k < B * T; k++) {
        ids[k] = (int64_t)(urand() * (double)V);
        mask[k] = k == 0 || urand() > 0.25;
        g[k] = (float)nrand();
        gh[k] = (float)nrand();
    }
    gmpo_logits_args a = logits_args(B, T, TL, V, (gmpo_view){z, dt, TL * V, V, n}, ids);
    a.mask = (gmpo_view){mask, GMPO_DT_BOOL, T, 1, B * T};
    gmpo_logits_args a2 = a;
    float *out[2][3];
    void *grad[2];
    int rc = 0;
    char why[256] = "";
    for (int s = 0; s < 2; s++) {
        for (int k = 0; k < 3; k++) out[s][k] = xalloc((size_t)(B * T) * 4);
        grad[s] = xalloc((size_t)n * dt_size(dt));
    }
    gmpo_view gv = {g, GMPO_DT_F32, T, 1, B * T}, ghv = {ent ? gh : NULL, GMPO_DT_F32, T, 1, B * T},
              none = {0};
    if (!ent) ghv = none;
    gmpo_status s1 = gmpo_logits_cpu_forward(&a, out[0][0], ent ? out[0][1] : NULL, out[0][2]);
    gmpo_status s2 = gmpo_logits_cuda_forward(&a2, out[1][0], ent ? out[1][1] : NULL, out[1][2]);
    if (!s1 && !s2) {
        s1 = gmpo_logits_cpu_backward(&a, out[0][2], out[0][1], gv, ghv,
                                      (gmpo_view){grad[0], dt, TL * V, V, n});
        s2 = gmpo_logits_cuda_backward(&a2, out[0][2], out[0][1], gv, ghv,
                                       (gmpo_view){grad[1], dt, TL * V, V, n});
    }
    if (s1 || s2) {
        snprintf(why, sizeof why, "status %d / %d: %s %s", s1, s2, a.err, a2.err);
        rc = 2;
    }
    for (int k = 0; k < 3 && !rc; k++) {
        if (k == 1 && !ent) continue;
        for (int64_t i = 0; i < B * T && !rc; i++)
            if (!close_to(out[1][k][i], out[0][k][i], 2e-5, 1.0)) {
                snprintf(why, sizeof why, "output %d token %lld: %.9g vs C %.9g", k, (long long)i,
                         out[1][k][i], out[0][k][i]);
                rc = 1;
            }
    }
    double tol = dt == GMPO_DT_F32 ? 2e-5 : 1e-2, gmax = 0;
    for (int64_t k = 0; k < n; k++) gmax = fmax(gmax, fabs(gmpo_load_d(grad[0], dt, k)));
    for (int64_t k = 0; k < n && !rc; k++) {
        double x = gmpo_load_d(grad[1], dt, k), y = gmpo_load_d(grad[0], dt, k);
        if (!close_to(x, y, tol, gmax)) {
            snprintf(why, sizeof why, "grad element %lld: %.9g vs C %.9g", (long long)k, x, y);
            rc = 1;
        }
    }
    char name[96];
    snprintf(name, sizeof name, "logits %s entropy=%d B=%lld T=%lld V=%lld",
             dt == GMPO_DT_F32 ? "fp32" : dt == GMPO_DT_BF16 ? "bf16" : "fp16", ent, (long long)B,
             (long long)T, (long long)V);
    result(name, rc, why);
    for (int s = 0; s < 2; s++) {
        for (int k = 0; k < 3; k++) free(out[s][k]);
        free(grad[s]);
    }
    free(z); free(ids); free(mask); free(g); free(gh);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* loss */

typedef struct { void *p; gmpo_view v; } tensor;

static tensor tens(int64_t B, int64_t T, int32_t dt, double (*gen)(int64_t, int64_t)) {
    tensor t;
    t.p = xalloc((size_t)(B * T) * dt_size(dt));
    t.v = (gmpo_view){t.p, dt, T, T == 1 ? 0 : 1, B * T};
    for (int64_t i = 0; i < B; i++)
        for (int64_t j = 0; j < T; j++) {
            double x = gen(i, j);
            if (dt == GMPO_DT_BOOL) ((uint8_t *)t.p)[i * T + j] = x != 0;
            else gmpo_store_d(t.p, dt, i * T + j, x);
        }
    return t;
}
static double g_lp(int64_t i, int64_t j) { (void)i; (void)j; return -(urand() * 3 + 0.05); }
static double g_dr(int64_t i, int64_t j) { (void)i; (void)j; return 0.3 * nrand(); }
static double g_adv(int64_t i, int64_t j) { (void)j; return i % 5 == 3 ? 0.0 : nrand(); }
static int64_t g_T;
static double g_mask(int64_t i, int64_t j) { return i % 7 == 1 ? 0 : j < g_T - (i % 3) * (g_T / 4); }

static void args_init(gmpo_args *a, int32_t algo, int64_t B, int64_t T) {
    memset(a, 0, sizeof *a);
    a->algo = algo;
    a->B = B;
    a->T = T;
    a->convention = GMPO_CONV_TRL;
    a->loss_type = GMPO_LT_BNPO;
    a->eps_low = algo == GMPO_ALGO_GRPO ? 0.2 : 0.4;
    a->eps_high = algo == GMPO_ALGO_GRPO ? 0.28 : 0.4;
    a->beta = 0.04;
    a->normalizer = 2.0;
    a->num_threads = 1;
    /* the extents of the output buffers the cases pass */
    a->rows_extent = (B + 1) * GMPO_ROW_STATS;
    a->loss_extent = a->grad_out_extent = 1;
    a->metrics_extent = GMPO_METRICS;
    a->grad_extent = B * T;
}

static int loss_case(int32_t algo, int32_t dt, int64_t B, int64_t T) {
    g_T = T;
    tensor lp = tens(B, T, dt, g_lp), olp = tens(B, T, dt, g_dr), ref = tens(B, T, dt, g_lp);
    for (int64_t k = 0; k < B * T; k++)
        gmpo_store_d(olp.p, dt, k, gmpo_load_d(lp.p, dt, k) - gmpo_load_d(olp.p, dt, k));
    tensor mask = tens(B, T, GMPO_DT_BOOL, g_mask), adv = tens(B, 1, GMPO_DT_F32, g_adv);
    gmpo_args a, a2;
    args_init(&a, algo, B, T);
    a.logp = lp.v; a.old_logp = olp.v; a.ref_logp = ref.v; a.mask = mask.v; a.adv = adv.v;
    a2 = a;
    const int32_t odt = dt == GMPO_DT_F64 ? GMPO_DT_F64 : GMPO_DT_F32;
    double *rows[2], out[2][1 + GMPO_METRICS];
    void *grad[2];
    for (int s = 0; s < 2; s++) {
        rows[s] = xalloc((size_t)(B + 1) * GMPO_ROW_STATS * 8);
        grad[s] = xalloc((size_t)(B * T) * dt_size(dt));
    }
    void *loss[2] = {xalloc(8), xalloc(8)}, *met[2] = {xalloc(8 * GMPO_METRICS), xalloc(8 * GMPO_METRICS)};
    float go = 0.37f;
    int rc = 0;
    char why[256] = "";
    gmpo_status s1 = gmpo_cpu_forward(&a, rows[0], loss[0], met[0], odt);
    gmpo_status s2 = gmpo_cuda_forward(&a2, rows[1], loss[1], met[1], odt);
    if (!s1 && !s2) {
        s1 = gmpo_cpu_backward(&a, rows[0], &go, GMPO_DT_F32, grad[0], dt);
        s2 = gmpo_cuda_backward(&a2, rows[1], &go, GMPO_DT_F32, grad[1], dt);
    }
    if (s1 || s2) {
        snprintf(why, sizeof why, "status %d / %d: %s %s", s1, s2, a.err, a2.err);
        rc = 2;
    }
    const double tol = dt == GMPO_DT_F64 ? 1e-12 : 1e-5;
    for (int s = 0; s < 2 && !rc; s++) {
        out[s][0] = gmpo_load_d(loss[s], odt, 0);
        for (int k = 0; k < GMPO_METRICS; k++) out[s][k + 1] = gmpo_load_d(met[s], odt, k);
    }
    for (int64_t k = 0; k < (B + 1) * GMPO_ROW_STATS && !rc; k++)
        if (!close_to(rows[1][k], rows[0][k], tol, 1.0)) {
            snprintf(why, sizeof why, "rows[%lld][%lld]: %.17g vs C %.17g", (long long)(k / GMPO_ROW_STATS),
                     (long long)(k % GMPO_ROW_STATS), rows[1][k], rows[0][k]);
            rc = 1;
        }
    for (int k = 0; k < 1 + GMPO_METRICS && !rc; k++)
        if (!close_to(out[1][k], out[0][k], tol, 1.0)) {
            snprintf(why, sizeof why, "loss/metric %d: %.17g vs C %.17g", k, out[1][k], out[0][k]);
            rc = 1;
        }
    double gmax = 0, gtol = dt == GMPO_DT_F64 ? 1e-12 : dt == GMPO_DT_F32 ? 1e-5 : 1e-2;
    for (int64_t k = 0; k < B * T; k++) gmax = fmax(gmax, fabs(gmpo_load_d(grad[0], dt, k)));
    for (int64_t k = 0; k < B * T && !rc; k++) {
        double x = gmpo_load_d(grad[1], dt, k), y = gmpo_load_d(grad[0], dt, k);
        if (!close_to(x, y, gtol, gmax)) {
            snprintf(why, sizeof why, "grad[%lld][%lld]: %.9g vs C %.9g", (long long)(k / T), (long long)(k % T), x, y);
            rc = 1;
        }
    }
    char name[96];
    snprintf(name, sizeof name, "loss %s %s B=%lld T=%lld", algo == GMPO_ALGO_GRPO ? "grpo" : "gmpo",
             dt == GMPO_DT_F32 ? "fp32" : dt == GMPO_DT_F64 ? "fp64" : dt == GMPO_DT_BF16 ? "bf16" : "fp16",
             (long long)B, (long long)T);
    result(name, rc, why);
    for (int s = 0; s < 2; s++) { free(rows[s]); free(grad[s]); free(loss[s]); free(met[s]); }
    free(lp.p); free(olp.p); free(ref.p); free(mask.p); free(adv.p);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* tiles: the LM-head tile kernels, CUDA against C */

typedef struct { int64_t row, col; double v; } special;   /* a value put at y[row, col] */

static const uint32_t PAD_F32 = 0x7fc0beefu;   /* NaN bits in the padding of a strided tile */
static const uint16_t PAD_16 = 0x7ebfu;

static int is_pad(const void *t, int32_t dt, int64_t k) {
    return dt == GMPO_DT_F32 ? ((const uint32_t *)t)[k] == PAD_F32 : ((const uint16_t *)t)[k] == PAD_16;
}

/* an (n, vn) tile of y (n, V) at columns [v0, v0 + vn), row stride ld, in a
 * buffer of exactly its extent (n - 1) * ld + vn; the padding holds PAD */
static void *tile_from(const double *y, int64_t n, int64_t V, int64_t v0, int64_t vn, int64_t ld, int32_t dt) {
    const int64_t ext = (n - 1) * ld + vn;
    void *t = xalloc((size_t)ext * dt_size(dt));
    for (int64_t k = 0; k < ext; k++) {
        if (dt == GMPO_DT_F32) ((uint32_t *)t)[k] = PAD_F32;
        else ((uint16_t *)t)[k] = PAD_16;
    }
    for (int64_t r = 0; r < n; r++)
        for (int64_t k = 0; k < vn; k++) gmpo_store_d(t, dt, r * ld + k, y[r * V + v0 + k]);
    return t;
}

static void tile_args(gmpo_tile_args *a, int32_t dt, int64_t n, int64_t vn, int64_t v0, int64_t V, int64_t ld,
                      void *tile, const void *ids, int32_t ids_dt, double softcap, int entropy) {
    memset(a, 0, sizeof *a);
    a->n = n; a->vn = vn; a->v0 = v0; a->V = V; a->ld = ld; a->dtype = dt;
    a->tile = tile; a->tile_extent = (n - 1) * ld + vn;
    a->ids = ids; a->ids_dtype = ids_dt; a->ids_extent = n;
    a->logit_scale = 1.25; a->softcap = softcap; a->temperature = 0.7;
    a->entropy = entropy; a->num_threads = 1;
}

/* Fold the vocabulary [0, V) of n tokens in the tiles [cuts[j], cuts[j + 1]) with
 * the CUDA and the C kernels, then overwrite each tile with its gradient. The C
 * kernels refuse ids outside [0, V): they get, per tile, an id outside the tile
 * instead (the same gradient there; only the target logit differs). Expected:
 * a token whose id is outside [0, V) or whose logits hold a NaN or +inf has a
 * NaN logp; the others the C kernels' state (its entropy term w only when
 * entropy is asked: otherwise neither kernel's w means anything); every
 * gradient the C one, and the padding of a strided tile (pad > 0) untouched. */
static int tile_case(const char *name, int32_t dt, int32_t ids_dt, int64_t n, int64_t V, const int64_t *cuts,
                     int ntiles, int64_t pad, double softcap, int entropy, const int64_t *ids,
                     const special *sp, int nsp) {
    double *y = xalloc((size_t)(n * V) * 8);
    for (int64_t k = 0; k < n * V; k++) y[k] = 3.0 * nrand();
    int *poison = xalloc((size_t)n * sizeof(int)), *bad_id = xalloc((size_t)n * sizeof(int));
    for (int64_t r = 0; r < n; r++) {
        bad_id[r] = ids[r] < 0 || ids[r] >= V;
        poison[r] = 0;
    }
    for (int i = 0; i < nsp; i++) {
        y[sp[i].row * V + sp[i].col] = sp[i].v;
        if (!(sp[i].v < INFINITY)) poison[sp[i].row] = 1;   /* NaN or +inf */
    }
    void *id_g = xalloc((size_t)n * 8), *id_c = xalloc((size_t)n * 8);
    for (int64_t r = 0; r < n; r++) {
        if (ids_dt == GMPO_DT_I64) ((int64_t *)id_g)[r] = ids[r];
        else ((int32_t *)id_g)[r] = (int32_t)ids[r];
    }
    float *sc = xalloc((size_t)n * 16), *sg = xalloc((size_t)n * 16);
    for (int64_t r = 0; r < n; r++) { gmpo_lse_init(sc + 4 * r); gmpo_lse_init(sg + 4 * r); }
    float *lse = xalloc((size_t)n * 4), *ent = xalloc((size_t)n * 4), *g = xalloc((size_t)n * 4),
          *gh = xalloc((size_t)n * 4);
    int rc = 0;
    char why[256] = "";
    gmpo_tile_args a, a2;
    /* fold, tile after tile */
    for (int j = 0; j < ntiles && !rc; j++) {
        const int64_t v0 = cuts[j], vn = cuts[j + 1] - v0, ld = vn + pad;
        for (int64_t r = 0; r < n; r++) {   /* C: an invalid id moved outside this tile */
            int64_t id = bad_id[r] ? (v0 > 0 ? 0 : V - 1) : ids[r];
            if (ids_dt == GMPO_DT_I64) ((int64_t *)id_c)[r] = id;
            else ((int32_t *)id_c)[r] = (int32_t)id;
        }
        void *t = tile_from(y, n, V, v0, vn, ld, dt);
        tile_args(&a, dt, n, vn, v0, V, ld, t, id_c, ids_dt, softcap, entropy);
        a2 = a;
        a2.ids = id_g;
        gmpo_status s1 = gmpo_hidden_cpu_fold(&a, sc, n * 4), s2 = gmpo_hidden_cuda_fold(&a2, sg, n * 4);
        if (s1 || s2) {
            snprintf(why, sizeof why, "fold of tile %d: status %d / %d: %s %s", j, s1, s2, a.err, a2.err);
            rc = 2;
        }
        free(t);
    }
    /* the states */
    for (int64_t r = 0; r < n && !rc; r++) {
        float l, lp, h;
        gmpo_lse_finish(sg + 4 * r, &l, &lp, &h);
        if (poison[r] || bad_id[r]) {
            if (!isnan(lp)) {
                snprintf(why, sizeof why, "token %lld (id %lld%s): logp %.9g, not NaN", (long long)r,
                         (long long)ids[r], poison[r] ? ", NaN or +inf in its logits" : "", lp);
                rc = 1;
            }
            if (poison[r]) continue;   /* the C core's NaN rule is its own */
        }
        for (int k = 0; k < (bad_id[r] ? 3 : 4) && !rc; k++)
            if ((k != 2 || entropy) && !close_to(sg[4 * r + k], sc[4 * r + k], 2e-5, 1.0)) {
                snprintf(why, sizeof why, "token %lld (id %lld) state[%d]: %.9g vs C %.9g", (long long)r,
                         (long long)ids[r], k, sg[4 * r + k], sc[4 * r + k]);
                rc = 1;
            }
    }
    /* the gradient, from the C kernels' lse and entropy: a token with
     * G = Gh = 0 (token 2) gets a zero row; token 3 only G */
    for (int64_t r = 0; r < n; r++) {
        float lp;
        gmpo_lse_finish(sc + 4 * r, &lse[r], &lp, &ent[r]);
        g[r] = r == 2 ? 0.0f : (float)nrand();
        gh[r] = r == 2 || r == 3 ? 0.0f : (float)nrand();
    }
    const double tol = dt == GMPO_DT_F32 ? 2e-5 : 1e-2;
    for (int j = 0; j < ntiles && !rc; j++) {
        const int64_t v0 = cuts[j], vn = cuts[j + 1] - v0, ld = vn + pad, ext = (n - 1) * ld + vn;
        for (int64_t r = 0; r < n; r++) {
            int64_t id = bad_id[r] ? (v0 > 0 ? 0 : V - 1) : ids[r];
            if (ids_dt == GMPO_DT_I64) ((int64_t *)id_c)[r] = id;
            else ((int32_t *)id_c)[r] = (int32_t)id;
        }
        void *tc = tile_from(y, n, V, v0, vn, ld, dt), *tg = tile_from(y, n, V, v0, vn, ld, dt);
        tile_args(&a, dt, n, vn, v0, V, ld, tc, id_c, ids_dt, softcap, entropy);
        a2 = a;
        a2.ids = id_g;
        a2.tile = tg;
        gmpo_status s1 = gmpo_hidden_cpu_grad(&a, lse, ent, g, entropy ? gh : NULL, n);
        gmpo_status s2 = gmpo_hidden_cuda_grad(&a2, lse, ent, g, entropy ? gh : NULL, n);
        if (s1 || s2) {
            snprintf(why, sizeof why, "grad of tile %d: status %d / %d: %s %s", j, s1, s2, a.err, a2.err);
            rc = 2;
        }
        double gmax = 0;
        for (int64_t k = 0; k < ext; k++)
            if (k % ld < vn && isfinite(gmpo_load_d(tc, dt, k))) gmax = fmax(gmax, fabs(gmpo_load_d(tc, dt, k)));
        for (int64_t k = 0; k < ext && !rc; k++) {
            const int64_t r = k / ld, c = k % ld;
            if (c >= vn) {
                if (!is_pad(tg, dt, k)) {
                    snprintf(why, sizeof why, "tile %d: the padding at row %lld column %lld was written",
                             j, (long long)r, (long long)c);
                    rc = 1;
                }
                continue;
            }
            double x = gmpo_load_d(tg, dt, k), w = gmpo_load_d(tc, dt, k);
            if (!close_to(x, w, tol, gmax) || (r == 2 && x != 0.0)) {
                snprintf(why, sizeof why, "grad of tile %d [v0 %lld] token %lld (id %lld) column %lld: %.9g vs C %.9g",
                         j, (long long)v0, (long long)r, (long long)ids[r], (long long)c, x, w);
                rc = 1;
            }
        }
        free(tc);
        free(tg);
    }
    char full[160];
    snprintf(full, sizeof full, "tiles %s %s n=%lld V=%lld tiles=%d pad=%lld", name,
             dt == GMPO_DT_F32 ? "fp32" : dt == GMPO_DT_BF16 ? "bf16" : "fp16", (long long)n, (long long)V,
             ntiles, (long long)pad);
    result(full, rc, why);
    free(y); free(poison); free(bad_id); free(id_g); free(id_c); free(sc); free(sg);
    free(lse); free(ent); free(g); free(gh);
    return rc;
}

static int tile_cases(void) {
    int worst = 0, rc;
    {   /* a 7 x 700 tile (3 warps) in the middle of V = 1500, contiguous (exact
         * extents), ids at every boundary of it; NaN at the first column a thread
         * folds and mid-tile, +inf at the last column of V, -inf at a target */
        const int64_t cuts[] = {0, 700, 1400, 1500};
        const int64_t ids[] = {-1, 0, 699, 700, 1399, 1400, 1500};
        const special sp[] = {{1, 700, NAN}, {5, 1450, NAN}, {3, 1499, INFINITY}, {4, 1399, -INFINITY},
                              {2, 1, -INFINITY}, {2, 700, -INFINITY}};
        rc = tile_case("boundary ids, NaN and inf", GMPO_DT_F32, GMPO_DT_I64, 7, 1500, cuts, 3, 0, 0.0, 1,
                       ids, sp, 6);
        if (rc > worst) worst = rc;
    }
    {   /* strided (ld = vn + 13), softcap, int32 ids at the boundaries of both tiles */
        const int64_t cuts[] = {0, 333, 1000};
        const int64_t ids[] = {-1, 0, 332, 333, 999, 1000, 5, 500, 998};
        rc = tile_case("strided softcap", GMPO_DT_BF16, GMPO_DT_I32, 9, 1000, cuts, 2, 13, 5.0, 1, ids, NULL, 0);
        if (rc > worst) worst = rc;
    }
    {   /* a one-column tile, then 1099 columns (5 warps); no entropy (Gh absent) */
        const int64_t cuts[] = {0, 1, 1100, 1150};
        const int64_t ids[] = {0, 1, 1099, 1100, 1149, 7, 600, 1148};
        const special sp[] = {{7, 0, NAN}, {6, 1149, -INFINITY}};
        rc = tile_case("one-column tile", GMPO_DT_F16, GMPO_DT_I64, 8, 1150, cuts, 3, 3, 0.0, 0, ids, sp, 2);
        if (rc > worst) worst = rc;
    }
    return worst;
}

/* ------------------------------------------------------------------------- */
/* element offsets past 2^32: reserved mappings, only the rows used touched */

/* n bytes of address space, no swap reserved; untouched pages cost nothing */
static void *reserve(size_t n) {
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* The loss kernels over (140000, 32768) inputs with row stride T: row B-1
 * (element offset 4.59e9) holds row 0's values, and only the blocks of rows 0
 * and B-1 run. Its statistics (forward: input offsets) and its gradient
 * (backward: input and gradient offsets) must be row 0's bits. algo: GMPO's
 * kernels or the GRPO family's (gmpo_fam_fwd_kernel / gmpo_fam_bwd_kernel, sapo
 * at token level: every token's gradient depends on its own values). */
static int loss_offset_case(int32_t algo) {
    const int64_t B = 140000, T = 32768;   /* (B - 1) * T = 4.59e9 > 2^32 */
    const int32_t dt = GMPO_DT_F32;
    const size_t fbytes = (size_t)B * (size_t)T * 4;
    void *lpm = reserve(fbytes), *olpm = reserve(fbytes), *grad = reserve(fbytes);
    uint8_t *maskm = reserve((size_t)B * (size_t)T);
    if (!lpm || !olpm || !grad || !maskm) {
        printf("SKIP offset: cannot reserve 4 x %zu bytes of address space\n", fbytes);
        return 77;
    }
    g_T = T;
    /* one row of inputs, at rows 0 and B-1 of the mappings */
    tensor lp = tens(1, T, dt, g_lp), olp = tens(1, T, dt, g_dr), mask = tens(1, T, GMPO_DT_BOOL, g_mask);
    for (int64_t k = 0; k < T; k++) gmpo_store_d(olp.p, dt, k, gmpo_load_d(lp.p, dt, k) - gmpo_load_d(olp.p, dt, k));
    ((uint8_t *)mask.p)[0] = 1;
    const int64_t last = (B - 1) * T;
    memcpy(lpm, lp.p, (size_t)T * 4);
    memcpy((float *)lpm + last, lp.p, (size_t)T * 4);
    memcpy(olpm, olp.p, (size_t)T * 4);
    memcpy((float *)olpm + last, olp.p, (size_t)T * 4);
    memcpy(maskm, mask.p, (size_t)T);
    memcpy(maskm + last, mask.p, (size_t)T);
    float adv1 = 0.8f;
    gmpo_args a;
    args_init(&a, algo, 2, T);
    a.beta = 0;
    if (algo == GMPO_ALGO_FAMILY) {
        a.loss_type = GMPO_LT_SAPO;
        a.fam.sapo_tpos = 1.0;
        a.fam.sapo_tneg = 1.05;
    }
    a.adv = (gmpo_view){&adv1, GMPO_DT_F32, 0, 0, 1};
    /* the per-row statistics of two such rows (broadcast: stride_b 0), copied to every row */
    a.logp = lp.v; a.old_logp = olp.v; a.mask = mask.v;
    a.logp.stride_b = a.old_logp.stride_b = a.mask.stride_b = 0;
    double small[3 * GMPO_ROW_STATS], loss, met[GMPO_METRICS];
    int rc = 0;
    char why[256] = "";
    gmpo_status st = gmpo_cuda_forward(&a, small, &loss, met, GMPO_DT_F64);
    /* then the real layout: B rows of stride T */
    a.B = B;
    a.logp = (gmpo_view){lpm, dt, T, 1, B * T};
    a.old_logp = (gmpo_view){olpm, dt, T, 1, B * T};
    a.mask = (gmpo_view){maskm, GMPO_DT_BOOL, T, 1, B * T};
    a.rows_extent = (B + 1) * GMPO_ROW_STATS;
    a.grad_extent = B * T;
    double *rows = xalloc((size_t)(B + 1) * GMPO_ROW_STATS * 8);
    char only[64];
    snprintf(only, sizeof only, "0,%lld", (long long)(B - 1));
    setenv("SIMT_ONLY_BLOCKS_X", only, 1);
    /* forward: rows 0 and B-1 only (the totals of the other, unwritten rows are not looked at) */
    if (!st) st = gmpo_cuda_forward(&a, rows, &loss, met, GMPO_DT_F64);
    for (int k = 0; k < GMPO_ROW_STATS && !st && !rc; k++)
        if (memcmp(&rows[k], &rows[(B - 1) * GMPO_ROW_STATS + k], 8) != 0 || !close_to(rows[k], small[k], 1e-9, 1.0)) {
            snprintf(why, sizeof why, "forward row statistic %d: row %lld %.17g, row 0 %.17g, broadcast %.17g "
                     "(a 32-bit input row offset?)", k, (long long)(B - 1), rows[(B - 1) * GMPO_ROW_STATS + k],
                     rows[k], small[k]);
            rc = 1;
        }
    for (int64_t i = 0; i < B; i++) memcpy(rows + i * GMPO_ROW_STATS, small, GMPO_ROW_STATS * 8);
    memcpy(rows + B * GMPO_ROW_STATS, small + 2 * GMPO_ROW_STATS, GMPO_ROW_STATS * 8);
    float go = 1.0f;
    if (!st && !rc) st = gmpo_cuda_backward(&a, rows, &go, GMPO_DT_F32, grad, dt);
    unsetenv("SIMT_ONLY_BLOCKS_X");
    if (st) {
        snprintf(why, sizeof why, "status %d: %s", st, a.err);
        rc = 2;
    }
    const float *g0 = (const float *)grad, *gl = (const float *)grad + last;
    int64_t nonzero = 0;
    for (int64_t k = 0; k < T && !rc; k++) {
        nonzero += g0[k] != 0.0f;
        if (memcmp(&g0[k], &gl[k], 4) != 0) {
            snprintf(why, sizeof why, "grad row %lld token %lld: %.9g, row 0: %.9g (a 32-bit row offset?)",
                     (long long)(B - 1), (long long)k, gl[k], g0[k]);
            rc = 1;
        }
    }
    if (!rc && nonzero < T / 2) {
        snprintf(why, sizeof why, "row 0 has %lld nonzero gradients of %lld", (long long)nonzero, (long long)T);
        rc = 1;
    }
    result(algo == GMPO_ALGO_FAMILY ? "loss (GRPO family) forward and backward, row offsets past 2^32 elements"
                                    : "loss forward and backward, row offsets past 2^32 elements", rc, why);
    munmap(lpm, fbytes); munmap(olpm, fbytes); munmap(grad, fbytes); munmap(maskm, (size_t)B * (size_t)T);
    free(rows); free(lp.p); free(olp.p); free(mask.p);
    return rc;
}

/* The logits kernels, (2, 2, 700) logits with stride_b 2^32 + 4096 elements (16 GB
 * apart; 16-byte aligned rows: the vector path), against the C kernels; the
 * gradients in two more such mappings. */
static int logits_offset_case(void) {
    const int64_t B = 2, T = 2, TL = 2, V = 700, sb = ((int64_t)1 << 32) + 4096, n = sb + TL * V;
    const int32_t dt = GMPO_DT_F32;
    const size_t bytes = (size_t)n * 4;
    float *z = reserve(bytes), *gc = reserve(bytes), *gg = reserve(bytes);
    if (!z || !gc || !gg) {
        printf("SKIP offset: cannot reserve 3 x %zu bytes of address space\n", bytes);
        return 77;
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t k = 0; k < TL * V; k++) z[b * sb + k] = (float)(3.0 * nrand());
    int64_t ids[4] = {3, 699, 0, 350};
    float g[4], gh[4], out[2][3][4];
    for (int k = 0; k < 4; k++) { g[k] = (float)nrand(); gh[k] = (float)nrand(); }
    gmpo_logits_args a = logits_args(B, T, TL, V, (gmpo_view){z, dt, sb, V, n}, ids);
    gmpo_logits_args a2 = a;
    gmpo_view gv = {g, GMPO_DT_F32, T, 1, B * T}, ghv = {gh, GMPO_DT_F32, T, 1, B * T};
    int rc = 0;
    char why[256] = "";
    gmpo_status s1 = gmpo_logits_cpu_forward(&a, out[0][0], out[0][1], out[0][2]);
    gmpo_status s2 = gmpo_logits_cuda_forward(&a2, out[1][0], out[1][1], out[1][2]);
    if (!s1 && !s2) {
        s1 = gmpo_logits_cpu_backward(&a, out[0][2], out[0][1], gv, ghv, (gmpo_view){gc, dt, sb, V, n});
        s2 = gmpo_logits_cuda_backward(&a2, out[0][2], out[0][1], gv, ghv, (gmpo_view){gg, dt, sb, V, n});
    }
    if (s1 || s2) {
        snprintf(why, sizeof why, "status %d / %d: %s %s", s1, s2, a.err, a2.err);
        rc = 2;
    }
    for (int k = 0; k < 3 && !rc; k++)
        for (int i = 0; i < 4 && !rc; i++)
            if (!close_to(out[1][k][i], out[0][k][i], 2e-5, 1.0)) {
                snprintf(why, sizeof why, "output %d token %d: %.9g vs C %.9g", k, i, out[1][k][i], out[0][k][i]);
                rc = 1;
            }
    for (int64_t b = 0; b < B; b++)
        for (int64_t k = 0; k < TL * V && !rc; k++)
            if (!close_to(gg[b * sb + k], gc[b * sb + k], 2e-5, 1.0) || (b && gg[b * sb + k] == 0.0f)) {
                snprintf(why, sizeof why, "grad [%lld][%lld][%lld]: %.9g vs C %.9g", (long long)b,
                         (long long)(k / V), (long long)(k % V), gg[b * sb + k], gc[b * sb + k]);
                rc = 1;
            }
    result("logits forward and backward, row offsets past 2^32 elements", rc, why);
    munmap(z, bytes); munmap(gc, bytes); munmap(gg, bytes);
    return rc;
}

/* The tile kernels, a (3, 700) tile with ld 2^31 + 64 (rows at 0, 2^31 + 64 and
 * 2^32 + 128 elements: past a 32-bit row offset, signed or not), against the C
 * kernels; the gradient overwrites a second such mapping. */
static int tile_offset_case(void) {
    const int64_t n = 3, vn = 700, V = 700, ld = ((int64_t)1 << 31) + 64, ext = (n - 1) * ld + vn;
    const size_t bytes = (size_t)ext * 4;
    float *tc = reserve(bytes), *tg = reserve(bytes);
    if (!tc || !tg) {
        printf("SKIP offset: cannot reserve 2 x %zu bytes of address space\n", bytes);
        return 77;
    }
    for (int64_t r = 0; r < n; r++)
        for (int64_t k = 0; k < vn; k++) tc[r * ld + k] = tg[r * ld + k] = (float)(3.0 * nrand());
    int64_t ids[3] = {5, 699, 350};
    float sc[12], sg[12], lse[3], ent[3], g[3] = {0.7f, -1.1f, 0.4f}, gh[3] = {0.3f, 0.2f, -0.9f};
    for (int r = 0; r < 3; r++) { gmpo_lse_init(sc + 4 * r); gmpo_lse_init(sg + 4 * r); }
    gmpo_tile_args a, a2;
    tile_args(&a, GMPO_DT_F32, n, vn, 0, V, ld, tc, ids, GMPO_DT_I64, 0.0, 1);
    a2 = a;
    a2.tile = tg;
    int rc = 0;
    char why[256] = "";
    gmpo_status s1 = gmpo_hidden_cpu_fold(&a, sc, 12), s2 = gmpo_hidden_cuda_fold(&a2, sg, 12);
    for (int k = 0; k < 12 && !s1 && !s2 && !rc; k++)
        if (!close_to(sg[k], sc[k], 2e-5, 1.0)) {
            snprintf(why, sizeof why, "fold: token %d state[%d]: %.9g vs C %.9g (a 32-bit row offset?)", k / 4,
                     k % 4, sg[k], sc[k]);
            rc = 1;
        }
    if (!s1 && !s2 && !rc) {
        for (int r = 0; r < 3; r++) {
            float lp;
            gmpo_lse_finish(sc + 4 * r, &lse[r], &lp, &ent[r]);
        }
        s1 = gmpo_hidden_cpu_grad(&a, lse, ent, g, gh, 3);
        s2 = gmpo_hidden_cuda_grad(&a2, lse, ent, g, gh, 3);
    }
    if (s1 || s2) {
        snprintf(why, sizeof why, "status %d / %d: %s %s", s1, s2, a.err, a2.err);
        rc = 2;
    }
    for (int64_t r = 0; r < n && !rc; r++)
        for (int64_t k = 0; k < vn && !rc; k++)
            if (!close_to(tg[r * ld + k], tc[r * ld + k], 2e-5, 1.0)) {
                snprintf(why, sizeof why, "grad token %lld column %lld: %.9g vs C %.9g (a 32-bit row offset?)",
                         (long long)r, (long long)k, tg[r * ld + k], tc[r * ld + k]);
                rc = 1;
            }
    result("tile fold and grad, row offsets past 2^32 elements", rc, why);
    munmap(tc, bytes); munmap(tg, bytes);
    return rc;
}

static int offset_cases(void) {
    int rc[4] = {loss_offset_case(GMPO_ALGO_GMPO), loss_offset_case(GMPO_ALGO_FAMILY), logits_offset_case(),
                 tile_offset_case()}, worst = 0;
    for (int k = 0; k < 4; k++) {
        if (rc[k] == 77) return 77;
        if (rc[k] > worst) worst = rc[k];
    }
    return worst;
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "";
    int worst = 0, rc;
#define RUN(x) do { rc = (x); if (rc > worst) worst = rc; } while (0)
    if (!strcmp(what, "logits")) {
        const int32_t dts[3] = {GMPO_DT_F32, GMPO_DT_BF16, GMPO_DT_F16};
        for (int d = 0; d < 3; d++)
            for (int ent = 0; ent < 2; ent++) RUN(logits_case(dts[d], ent, 2, 4, 601));
    } else if (!strcmp(what, "loss")) {
        RUN(loss_case(GMPO_ALGO_GMPO, GMPO_DT_F32, 40, 37));
        RUN(loss_case(GMPO_ALGO_GRPO, GMPO_DT_BF16, 70, 21));
        RUN(loss_case(GMPO_ALGO_GMPO, GMPO_DT_F64, 36, 19));
        RUN(loss_case(GMPO_ALGO_GMPO, GMPO_DT_F16, 2, 2100));   /* 3 chunks wanted on grid.y */
    } else if (!strcmp(what, "tiles")) {
        RUN(tile_cases());
    } else if (!strcmp(what, "offset")) {
        rc = offset_cases();
        if (rc == 77) return 77;
        RUN(rc);
    } else {
        fprintf(stderr, "usage: %s logits | loss | tiles | offset\n", argv[0]);
        return 64;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return worst;
}
