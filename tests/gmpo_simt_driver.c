/*
 * gmpo_simt_driver.c -- a standalone program that runs the CUDA loss kernels
 * (the csrc/cuda sources, built for the CPU under the SIMT emulation of tests/simt)
 * against the C core on small inputs, for the ASan+UBSan and TSan builds of
 * tests/test_simt_kernels.py (a sanitizer runtime is easier to load into a
 * program than into python).
 *
 * Every tensor is its own malloc of exactly the bytes its view spans, so a read
 * one element past a row or a tensor is a heap-buffer-overflow under ASan.
 * Cases cover every float dtype, mask dtypes, per-row and per-token advantages
 * and weights, strided and misaligned views, GMPO (trl, verl) and GRPO, empty
 * shapes and a row longer than a block.
 *
 * Prints one line per case and "N passed, M failed"; exit status 0 when all
 * pass, 1 when a result differs, 2 when an entry point returns an error.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gmpo.h"
#include "gmpo_math.h"

// ----------------------------------------------------------------------------
// inputs

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double urand(void) {   // uniform in [0, 1)
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) * (1.0 / 9007199254740992.0);
}

static double nrand(void) {   // roughly normal
    return (urand() + urand() + urand() + urand() - 2.0) * 1.7;
}

static size_t dt_size(int32_t dt) {
    switch (dt) {
    case GMPO_DT_F64: case GMPO_DT_I64: return 8;
    case GMPO_DT_F32: case GMPO_DT_I32: return 4;
    case GMPO_DT_F16: case GMPO_DT_BF16: return 2;
    default: return 1;
    }
}

static void put(void *p, int32_t dt, int64_t k, double v) {
    switch (dt) {
    case GMPO_DT_BOOL: case GMPO_DT_U8: ((uint8_t *)p)[k] = (uint8_t)v; break;
    case GMPO_DT_I8: ((int8_t *)p)[k] = (int8_t)v; break;
    case GMPO_DT_I32: ((int32_t *)p)[k] = (int32_t)v; break;
    case GMPO_DT_I64: ((int64_t *)p)[k] = (int64_t)v; break;
    default: gmpo_store_d(p, dt, k, v); break;
    }
}

// A view of B rows of T (or 1, per row) values: one allocation of exactly the
// span, data pointer `offset` elements into it.
typedef struct { void *base; gmpo_view v; } tensor;

static tensor make(int64_t B, int64_t T, int32_t dt, int64_t sb, int64_t st, int64_t offset) {
    tensor t;
    int64_t n = B == 0 || T == 0 ? 0 : offset + (B - 1) * sb + (T - 1) * st + 1;
    t.base = malloc((size_t)(n > 0 ? n : 1) * dt_size(dt));
    if (!t.base) { fprintf(stderr, "out of memory\n"); exit(2); }
    memset(t.base, 0xAB, (size_t)(n > 0 ? n : 1) * dt_size(dt));   // garbage between elements
    t.v.data = n > 0 ? (char *)t.base + offset * (int64_t)dt_size(dt) : NULL;
    t.v.dtype = dt;
    t.v.stride_b = sb;
    t.v.stride_t = T == 1 && st == 0 ? 0 : st;
    t.v.extent = n > 0 ? n - offset : 0;
    return t;
}

static void fill(tensor *t, int64_t B, int64_t T, double (*gen)(int64_t, int64_t)) {
    if (!t->v.data) return;
    int64_t st = t->v.stride_t;
    for (int64_t i = 0; i < B; i++)
        for (int64_t j = 0; j < (st ? T : 1); j++)
            put((void *)t->v.data, t->v.dtype, i * t->v.stride_b + j * st, gen(i, j));
}

static double g_logp(int64_t i, int64_t j) { (void)i; (void)j; return -(urand() * 3 + 0.05); }
static double g_ratio(int64_t i, int64_t j) { (void)i; (void)j; return 0.3 * nrand(); }
static double g_adv(int64_t i, int64_t j) { (void)j; return (i % 3 == 2) ? 0.0 : nrand(); }
static double g_w(int64_t i, int64_t j) { (void)i; (void)j; return exp(0.3 * nrand()); }
static int64_t g_T;
static double g_mask(int64_t i, int64_t j) {   // row 1 empty, random tails
    if (i == 1) return 0;
    return j < g_T - (int64_t)(urand() * 0.2 * (double)g_T) - (i % 2) * (g_T / 3);
}
static double g_fmask(int64_t i, int64_t j) { return g_mask(i, j) * (0.5 + urand()); }
static double g_tmask(int64_t i, int64_t j) { (void)i; (void)j; return urand() < 0.7; }

// ----------------------------------------------------------------------------
// cases

typedef struct {
    const char *name;
    int64_t B, T;
    int32_t algo, conv, loss_type;
    int32_t lp_dt, mask_dt, adv_dt;
    int adv_tok, isw;          // isw: 0 none, 1 per row, 2 per token
    double beta, clamp;
    int strided;               // 1: logp from a (B, T+1) buffer at +1, mask interleaved, adv per row stride 2
    int fam;                   // GMPO_ALGO_FAMILY: 1 token level, 2 sequence level (every option on);
                               // 3 verl's token-level modes, 4 verl's gspo (seq-mean-token-sum,
                               // the dual clip, the global batch's divisor)
} spec;

static const spec CASES[] = {
    {"fp32 trl bool", 5, 67, GMPO_ALGO_GMPO, GMPO_CONV_TRL, 0, GMPO_DT_F32, GMPO_DT_BOOL, GMPO_DT_F32, 0, 0, 0, 0, 0, 0},
    {"fp32 verl token-adv token-w kl", 6, 70, GMPO_ALGO_GMPO, GMPO_CONV_VERL, 0, GMPO_DT_F32, GMPO_DT_I64, GMPO_DT_F32, 1, 2, 0.05, 0, 0, 0},
    {"bf16 trl int64 mask row-w clamp", 4, 41, GMPO_ALGO_GMPO, GMPO_CONV_TRL, 0, GMPO_DT_BF16, GMPO_DT_I64, GMPO_DT_F32, 0, 1, 0.02, 0.25, 0, 0},
    {"fp16 verl strided", 5, 53, GMPO_ALGO_GMPO, GMPO_CONV_VERL, 0, GMPO_DT_F16, GMPO_DT_F32, GMPO_DT_F32, 0, 0, 0, 0, 1, 0},
    {"fp32 trl strided token-adv", 4, 38, GMPO_ALGO_GMPO, GMPO_CONV_TRL, 0, GMPO_DT_F32, GMPO_DT_U8, GMPO_DT_F64, 1, 2, 0.1, 0, 1, 0},
    {"fp64 trl float mask kl", 4, 33, GMPO_ALGO_GMPO, GMPO_CONV_TRL, 0, GMPO_DT_F64, GMPO_DT_F64, GMPO_DT_F64, 0, 1, 0.04, 0, 0, 0},
    {"fp64 verl strided", 3, 29, GMPO_ALGO_GMPO, GMPO_CONV_VERL, 0, GMPO_DT_F64, GMPO_DT_BOOL, GMPO_DT_F64, 1, 0, 0, 0, 1, 0},
    {"grpo fp32 grpo kl", 5, 45, GMPO_ALGO_GRPO, 0, GMPO_LT_GRPO, GMPO_DT_F32, GMPO_DT_BOOL, GMPO_DT_F32, 0, 0, 0.04, 0, 0, 0},
    {"grpo bf16 bnpo token-w", 4, 36, GMPO_ALGO_GRPO, 0, GMPO_LT_BNPO, GMPO_DT_BF16, GMPO_DT_I32, GMPO_DT_F32, 1, 2, 0, 0, 0, 0},
    {"grpo fp16 dr_grpo strided", 3, 31, GMPO_ALGO_GRPO, 0, GMPO_LT_DR_GRPO, GMPO_DT_F16, GMPO_DT_I8, GMPO_DT_F32, 0, 1, 0, 0, 1, 0},
    {"grpo fp64 dapo", 3, 27, GMPO_ALGO_GRPO, 0, GMPO_LT_DAPO, GMPO_DT_F64, GMPO_DT_BOOL, GMPO_DT_F64, 0, 0, 0.01, 0, 0, 0},
    {"fp32 row longer than a block", 2, 2600, GMPO_ALGO_GMPO, GMPO_CONV_TRL, 0, GMPO_DT_F32, GMPO_DT_BOOL, GMPO_DT_F32, 0, 0, 0, 0, 0, 0},
    {"bf16 T=1", 4, 1, GMPO_ALGO_GMPO, GMPO_CONV_TRL, 0, GMPO_DT_BF16, GMPO_DT_BOOL, GMPO_DT_F32, 0, 0, 0, 0, 0, 0},
    {"fp32 T=0", 3, 0, GMPO_ALGO_GMPO, GMPO_CONV_TRL, 0, GMPO_DT_F32, GMPO_DT_BOOL, GMPO_DT_F32, 0, 0, 0, 0, 0, 0},
    {"fp32 B=0", 0, 9, GMPO_ALGO_GMPO, GMPO_CONV_VERL, 0, GMPO_DT_F32, GMPO_DT_BOOL, GMPO_DT_F32, 0, 0, 0, 0, 0, 0},
    {"family fp32 dapo sequence strided kl", 5, 47, GMPO_ALGO_FAMILY, 0, GMPO_LT_DAPO, GMPO_DT_F32, GMPO_DT_BOOL, GMPO_DT_F32, 0, 2, 0.05, 0, 1, 2},
    {"family bf16 sapo token token-w", 4, 39, GMPO_ALGO_FAMILY, 0, GMPO_LT_SAPO, GMPO_DT_BF16, GMPO_DT_U8, GMPO_DT_F32, 0, 2, 0, 0, 0, 1},
    {"family fp64 vespo token token-w kl", 4, 33, GMPO_ALGO_FAMILY, 0, GMPO_LT_VESPO, GMPO_DT_F64, GMPO_DT_BOOL, GMPO_DT_F64, 0, 2, 0.04, 0, 0, 1},
    {"family fp32 cispo sequence row longer than a block", 2, 2600, GMPO_ALGO_FAMILY, 0, GMPO_LT_CISPO, GMPO_DT_F32, GMPO_DT_BOOL, GMPO_DT_F32, 0, 1, 0.02, 0, 0, 2},
    {"verl fp32 vanilla token-adv token-w", 5, 45, GMPO_ALGO_FAMILY, GMPO_CONV_VERL, GMPO_LT_GRPO, GMPO_DT_F32, GMPO_DT_BOOL, GMPO_DT_F32, 1, 2, 0, 0, 0, 3},
    {"verl fp32 gspo strided token-adv", 4, 41, GMPO_ALGO_FAMILY, GMPO_CONV_VERL, GMPO_LT_GRPO, GMPO_DT_F32, GMPO_DT_BOOL, GMPO_DT_F32, 1, 2, 0, 0, 1, 4},
    {"verl bf16 sapo token-w", 4, 39, GMPO_ALGO_FAMILY, GMPO_CONV_VERL, GMPO_LT_SAPO, GMPO_DT_BF16, GMPO_DT_U8, GMPO_DT_F32, 1, 2, 0, 0, 0, 3},
    {"verl fp64 cispo row longer than a block", 2, 2600, GMPO_ALGO_FAMILY, GMPO_CONV_VERL, GMPO_LT_CISPO, GMPO_DT_F64, GMPO_DT_BOOL, GMPO_DT_F64, 1, 1, 0, 0, 0, 3},
};

static int close_to(double got, double want, double tol, double scale) {
    if (isnan(want)) return isnan(got);
    if (isinf(want)) return got == want;
    return fabs(got - want) <= tol * (fabs(want) + scale);
}

// 0 pass, 1 mismatch, 2 error
static int run_case(const spec *c) {
    const int64_t B = c->B, T = c->T;
    const int strided = c->strided;
    g_T = T;
    int32_t fdt = c->lp_dt;
    tensor lp = strided ? make(B, T, fdt, T + 1, 1, 1) : make(B, T, fdt, T, 1, 0);
    tensor olp = strided ? make(B, T, fdt, 1, B, 0) : make(B, T, fdt, T, 1, 0);   // (T, B) transposed
    tensor mask = strided ? make(B, T, c->mask_dt, 2 * T, 2, 1) : make(B, T, c->mask_dt, T, 1, 0);
    tensor adv = c->adv_tok ? (strided ? make(B, T, c->adv_dt, T + 3, 1, 3) : make(B, T, c->adv_dt, T, 1, 0))
                            : make(B, 1, c->adv_dt, strided ? 2 : 1, 0, 0);
    tensor ref = make(B, T, fdt, T, 1, 0);
    tensor isw = c->isw == 2 ? make(B, T, fdt, T, 1, 0) : make(B, 1, fdt, 1, 0, 0);
    tensor slp = make(B, T, fdt, T, 1, 0), tm = make(B, T, GMPO_DT_BOOL, T, 1, 0);
    fill(&lp, B, T, g_logp);
    fill(&olp, B, T, g_ratio);
    // old_logp = logp - ratio
    for (int64_t i = 0; i < B; i++)
        for (int64_t j = 0; j < T; j++) {
            double l = gmpo_load_d(lp.v.data, fdt, i * lp.v.stride_b + j);
            double r = gmpo_load_d(olp.v.data, fdt, i * olp.v.stride_b + j * olp.v.stride_t);
            put((void *)olp.v.data, fdt, i * olp.v.stride_b + j * olp.v.stride_t, l - r);
        }
    fill(&mask, B, T, c->mask_dt == GMPO_DT_F32 || c->mask_dt == GMPO_DT_F64 ? g_fmask : g_mask);
    fill(&adv, B, T, g_adv);
    fill(&ref, B, T, g_logp);
    fill(&isw, B, T, g_w);
    fill(&slp, B, T, g_logp);
    fill(&tm, B, T, g_tmask);

    gmpo_args a;
    memset(&a, 0, sizeof a);
    a.algo = c->algo;
    a.B = B;
    a.T = T;
    a.logp = lp.v;
    a.old_logp = olp.v;
    a.adv = adv.v;
    a.mask = mask.v;
    if (c->beta != 0) a.ref_logp = ref.v;
    if (c->isw) a.is_w = isw.v;
    a.convention = c->conv;
    a.loss_type = c->loss_type;
    a.eps_low = c->algo != GMPO_ALGO_GMPO ? 0.2 : 0.4;
    a.eps_high = c->algo != GMPO_ALGO_GMPO ? 0.28 : 0.4;
    if (c->fam >= 3) {   // verl's modes
        a.fam.seq_level = c->fam == 4;
        a.fam.verl_agg = c->fam == 4 ? GMPO_VA_SEQ_MEAN_TOKEN_MEAN : GMPO_VA_SEQ_MEAN_TOKEN_SUM;
        a.fam.clip_c = c->loss_type == GMPO_LT_GRPO && c->fam == 3 ? 3.0 : 0.0;
        a.fam.sapo_tpos = 1.0; a.fam.sapo_tneg = 1.05;
    } else if (c->fam) {   // TRL's GRPO family, every option on
        a.samp_logp = slp.v;
        a.tok_mask = tm.v;
        a.fam.seq_level = c->fam == 2;
        a.fam.has_delta = 1; a.fam.delta = 1.4;
        a.fam.off_policy = 1; a.fam.off_policy_threshold = 0.5;
        a.fam.bias_corr_kl = 1;
        a.fam.sapo_tpos = 1.0; a.fam.sapo_tneg = 1.05;
        a.fam.vespo_kpos = 2.0; a.fam.vespo_lpos = 3.0; a.fam.vespo_kneg = 3.0; a.fam.vespo_lneg = 2.0;
        if (c->loss_type == GMPO_LT_CISPO) a.eps_high = 1.5;
    }
    a.beta = c->beta;
    a.log_ratio_clamp = c->clamp;
    a.normalizer = 2.0;
    a.denom = c->fam == 4 ? 11.0 : 0;   // verl: global_batch_size
    a.num_threads = 1;
    a.rows_extent = (B + 1) * GMPO_ROW_STATS;
    a.loss_extent = a.grad_out_extent = 1;
    a.metrics_extent = GMPO_METRICS;
    a.grad_extent = B * T;
    gmpo_args a2 = a;

    const int f64 = fdt == GMPO_DT_F64;
    const int32_t odt = f64 ? GMPO_DT_F64 : GMPO_DT_F32;
    size_t rows_n = (size_t)(B + 1) * GMPO_ROW_STATS;
    double *rows_c = malloc(rows_n * sizeof(double)), *rows_g = malloc(rows_n * sizeof(double));
    double out_c[1 + GMPO_METRICS], out_g[1 + GMPO_METRICS];   // as doubles for either dtype
    size_t gbytes = (size_t)(B * T > 0 ? B * T : 1) * dt_size(fdt);
    void *grad_c = malloc(gbytes), *grad_g = malloc(gbytes);
    void *loss_c = malloc(8), *loss_g = malloc(8), *met_c = malloc(8 * GMPO_METRICS),
         *met_g = malloc(8 * GMPO_METRICS);
    float go = 0.37f;
    int rc = 0;
    gmpo_status s1 = gmpo_cpu_forward(&a, rows_c, loss_c, met_c, odt);
    gmpo_status s2 = gmpo_cuda_forward(&a2, rows_g, loss_g, met_g, odt);
    if (s1 || s2) {
        printf("FAIL %s: forward status %d / %d: %s %s\n", c->name, s1, s2, a.err, a2.err);
        rc = 2;
        goto done;
    }
    s1 = gmpo_cpu_backward(&a, rows_c, &go, GMPO_DT_F32, grad_c, fdt);
    s2 = gmpo_cuda_backward(&a2, rows_g, &go, GMPO_DT_F32, grad_g, fdt);
    if (s1 || s2) {
        printf("FAIL %s: backward status %d / %d: %s %s\n", c->name, s1, s2, a.err, a2.err);
        rc = 2;
        goto done;
    }
    {
        double tol = f64 ? 1e-12 : 1e-5;
        out_c[0] = gmpo_load_d(loss_c, odt, 0);
        out_g[0] = gmpo_load_d(loss_g, odt, 0);
        for (int k = 0; k < GMPO_METRICS; k++) {
            out_c[1 + k] = gmpo_load_d(met_c, odt, k);
            out_g[1 + k] = gmpo_load_d(met_g, odt, k);
        }
        // scales: the mean |row loss| for the loss, 1 for the metrics and row stats
        double lscale = 0;
        for (int64_t i = 0; i < B; i++) lscale += fabs(rows_c[i * GMPO_ROW_STATS + GMPO_RS_LOSS]);
        lscale = lscale / (double)(B > 1 ? B : 1) + 1e-30;
        if (!close_to(out_g[0], out_c[0], tol, lscale)) {
            printf("FAIL %s: loss %.9g vs C %.9g\n", c->name, out_g[0], out_c[0]);
            rc = 1;
        }
        for (int k = 1; k <= GMPO_METRICS; k++)
            if (!close_to(out_g[k], out_c[k], tol, 1.0)) {
                printf("FAIL %s: metric %d %.9g vs C %.9g\n", c->name, k - 1, out_g[k], out_c[k]);
                rc = 1;
            }
        for (size_t k = 0; k < rows_n; k++)
            if (!close_to(rows_g[k], rows_c[k], tol, 1.0)) {
                printf("FAIL %s: rows[%zu][%zu] %.9g vs C %.9g\n", c->name, k / GMPO_ROW_STATS,
                       k % GMPO_ROW_STATS, rows_g[k], rows_c[k]);
                rc = 1;
                break;
            }
        double gmax = 0;
        for (int64_t k = 0; k < B * T; k++) gmax = fmax(gmax, fabs(gmpo_load_d(grad_c, fdt, k)));
        // 16-bit gradients: the fp32 values may round to neighbouring 16-bit values
        double gtol = fdt == GMPO_DT_BF16 ? 1.0 / 128 : (fdt == GMPO_DT_F16 ? 1.0 / 1024 : tol);
        for (int64_t k = 0; k < B * T; k++) {
            double x = gmpo_load_d(grad_g, fdt, k), y = gmpo_load_d(grad_c, fdt, k);
            if (!(fabs(x - y) <= gtol * fabs(y) + tol * gmax) && !(isnan(x) && isnan(y))) {
                printf("FAIL %s: grad[%lld] %.9g vs C %.9g\n", c->name, (long long)k, x, y);
                rc = 1;
                break;
            }
        }
    }
done:
    if (rc == 0) printf("ok   %s\n", c->name);
    free(rows_c); free(rows_g); free(grad_c); free(grad_g);
    free(loss_c); free(loss_g); free(met_c); free(met_g);
    free(lp.base); free(olp.base); free(mask.base); free(adv.base); free(ref.base); free(isw.base);
    free(slp.base); free(tm.base);
    return rc;
}

int main(int argc, char **argv) {
    int only = argc > 1 ? atoi(argv[1]) : -1;
    int n = (int)(sizeof CASES / sizeof CASES[0]), passed = 0, failed = 0, worst = 0;
    for (int k = 0; k < n; k++) {
        if (only >= 0 && k != only) continue;
        int rc = run_case(&CASES[k]);
        if (rc) failed++;
        else passed++;
        if (rc > worst) worst = rc;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return worst;
}
