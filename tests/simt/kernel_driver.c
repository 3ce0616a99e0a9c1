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
 *   kernel_driver offset   the loss backward's last rows of a (140000, 32768)
 *                          gradient: element offsets past 2^32. Every input is a
 *                          row broadcast to all rows (stride_b 0); the gradient
 *                          is a reserved, untouched mapping of 18 GB; only the
 *                          blocks of rows 0 and B-1 run (SIMT_ONLY_BLOCKS_X).
 *                          Row B-1 must be row 0's bits, at row B-1's place.
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
    gmpo_logits_args a;
    memset(&a, 0, sizeof a);
    a.B = B; a.T = T; a.TL = TL; a.V = V;
    a.logits = (gmpo_view){z, dt, TL * V, V, n};
    a.ids = (gmpo_view){ids, GMPO_DT_I64, T, 1, B * T};
    a.mask = (gmpo_view){mask, GMPO_DT_BOOL, T, 1, B * T};
    a.logp_extent = a.entropy_extent = a.lse_extent = B * T;
    a.temperature = 0.7;
    a.num_threads = 1;
    snprintf(a.ids_name, sizeof a.ids_name, "ids");
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
/* the backward's row offset past 2^32 elements */

static int offset_case(void) {
    const int64_t B = 140000, T = 32768;   /* (B - 1) * T = 4.59e9 > 2^32 */
    const int32_t dt = GMPO_DT_F32;
    const size_t gbytes = (size_t)B * (size_t)T * 4;
    void *grad = mmap(NULL, gbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (grad == MAP_FAILED) {
        printf("SKIP offset: cannot reserve %zu bytes of address space\n", gbytes);
        return 77;
    }
    g_T = T;
    /* one row of inputs, broadcast to every row (stride_b 0) */
    tensor lp = tens(1, T, dt, g_lp), olp = tens(1, T, dt, g_dr), mask = tens(1, T, GMPO_DT_BOOL, g_mask);
    for (int64_t k = 0; k < T; k++) gmpo_store_d(olp.p, dt, k, gmpo_load_d(lp.p, dt, k) - gmpo_load_d(olp.p, dt, k));
    ((uint8_t *)mask.p)[0] = 1;
    float adv1 = 0.8f;
    gmpo_args a;
    args_init(&a, GMPO_ALGO_GMPO, 2, T);
    a.beta = 0;
    a.logp = lp.v; a.old_logp = olp.v; a.mask = mask.v;
    a.logp.stride_b = a.old_logp.stride_b = a.mask.stride_b = 0;
    a.adv = (gmpo_view){&adv1, GMPO_DT_F32, 0, 0, 1};
    /* the per-row statistics of two such rows, then copied to every row */
    double small[3 * GMPO_ROW_STATS], loss, met[GMPO_METRICS];
    int rc = 0;
    char why[256] = "";
    gmpo_status st = gmpo_cuda_forward(&a, small, &loss, met, GMPO_DT_F64);
    double *rows = xalloc((size_t)(B + 1) * GMPO_ROW_STATS * 8);
    for (int64_t i = 0; i < B; i++) memcpy(rows + i * GMPO_ROW_STATS, small, GMPO_ROW_STATS * 8);
    memcpy(rows + B * GMPO_ROW_STATS, small + 2 * GMPO_ROW_STATS, GMPO_ROW_STATS * 8);
    a.B = B;
    a.rows_extent = (B + 1) * GMPO_ROW_STATS;
    a.grad_extent = B * T;
    float go = 1.0f;
    char only[64];
    snprintf(only, sizeof only, "0,%lld", (long long)(B - 1));
    setenv("SIMT_ONLY_BLOCKS_X", only, 1);
    if (!st) st = gmpo_cuda_backward(&a, rows, &go, GMPO_DT_F32, grad, dt);
    unsetenv("SIMT_ONLY_BLOCKS_X");
    if (st) {
        snprintf(why, sizeof why, "status %d: %s", st, a.err);
        rc = 2;
    }
    const float *g0 = (const float *)grad, *gl = (const float *)grad + (B - 1) * T;
    int64_t nonzero = 0;
    for (int64_t k = 0; k < T && !rc; k++) {
        nonzero += g0[k] != 0.0f;
        if (memcmp(&g0[k], &gl[k], 4) != 0) {
            snprintf(why, sizeof why, "row %lld token %lld: %.9g, row 0: %.9g (a 32-bit row offset?)",
                     (long long)(B - 1), (long long)k, gl[k], g0[k]);
            rc = 1;
        }
    }
    if (!rc && nonzero < T / 2) {
        snprintf(why, sizeof why, "row 0 has %lld nonzero gradients of %lld", (long long)nonzero, (long long)T);
        rc = 1;
    }
    result("loss backward, row offset past 2^32 elements", rc, why);
    munmap(grad, gbytes);
    free(rows); free(lp.p); free(olp.p); free(mask.p);
    return rc;
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
    } else if (!strcmp(what, "offset")) {
        rc = offset_case();
        if (rc == 77) return 77;
        RUN(rc);
    } else {
        fprintf(stderr, "usage: %s logits | loss | offset\n", argv[0]);
        return 64;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return worst;
}
