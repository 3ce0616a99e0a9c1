/*
 * test_core.c -- a standalone C11 test of the fused GMPO / GRPO core: calls
 * gmpo_cpu_forward / gmpo_cpu_backward directly and checks them against a
 * plain double-precision transcription of the formulas (GMPO: arXiv 2507.20673)
 * and against finite differences of the forward itself.
 *
 * Build (tests/test_c_core_sanitizers.py does this, with and without ASan/UBSan):
 *   gcc -std=c11 -Icsrc -fopenmp tests/csrc/test_core.c csrc/gmpo_common.c \
 *       csrc/cpu/gmpo_cpu.c -lm -o test_core
 * Run: ./test_core               -> prints "N passed, M failed", exit 1 on failure
 *      ./test_core convert IN OUT -> IN: raw float32 values; OUT: for each, its
 *                                   fp16 bits then its bf16 bits (uint16 pairs),
 *                                   from the converters of gmpo_math.h
 *
 * Shapes: B rows, T tokens; logp, old_logp, mask, ref_logp: (B,T);
 * adv, is_w: (B,) or (B,T); grad (B,T) contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gmpo.h"
#include "gmpo_math.h"

// ----------------------------------------------------------------------------
// bookkeeping: a case passes when every one of its checks does

static int n_passed, n_failed, case_failures;
static double grad_floor;   // absolute floor of the gradient tolerance (fp16 subnormals)
static const char *case_name;

#define CHECK(cond, ...)                                                         \
    do {                                                                         \
        if (!(cond)) {                                                           \
            if (case_failures < 8) {                                             \
                fprintf(stderr, "FAIL [%s] %s:%d: ", case_name, __FILE__, __LINE__); \
                fprintf(stderr, __VA_ARGS__);                                    \
                fputc('\n', stderr);                                             \
            }                                                                    \
            case_failures++;                                                     \
        }                                                                        \
    } while (0)

static void begin(const char *name) { case_name = name; case_failures = 0; }
static void end(void) {
    if (case_failures) {
        n_failed++;
        printf("FAILED: %s\n", case_name);
    } else {
        n_passed++;
    }
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(2); }
    return p;
}

// deterministic uniform numbers in [0, 1)
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static double urand(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

// independent decoders for the gradients the kernels write in 16 bits
static double bf16_bits_to_double(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static double f16_bits_to_double(uint16_t h) {
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v = e == 0 ? ldexp(m, -24) : (e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25));
    return (h & 0x8000) ? -v : v;
}

// ----------------------------------------------------------------------------
// a test problem, held in double, and written into buffers of any dtype

typedef struct {
    int64_t B, T;
    double *lp, *olp, *m, *ref, *w;  // (B,T) (w: (B,T) or (B,))
    double *adv;                     // (B,) or (B,T)
    int adv_tok, w_tok, has_ref, has_w;
} problem;

static problem make_problem(int64_t B, int64_t T, int adv_tok, int has_ref, int has_w, int w_tok,
                            int exact16) {
    problem p;
    memset(&p, 0, sizeof p);
    p.B = B; p.T = T; p.adv_tok = adv_tok; p.has_ref = has_ref; p.has_w = has_w; p.w_tok = w_tok;
    size_t n = (size_t)(B * T);
    p.lp = xcalloc(n, sizeof(double)); p.olp = xcalloc(n, sizeof(double));
    p.m = xcalloc(n, sizeof(double)); p.ref = xcalloc(n, sizeof(double));
    p.w = xcalloc(w_tok ? n : (size_t)B, sizeof(double));
    p.adv = xcalloc(adv_tok ? n : (size_t)B, sizeof(double));
    for (int64_t i = 0; i < B; i++) {
        int64_t len = (int64_t)(urand() * (double)T) + 1;
        if (i == 1 && B >= 3) len = 0;                          // an empty row
        double a = urand() * 2 - 1;
        if (i == 0) a = fabs(a) + 0.1;
        if (i == B - 1 && B >= 2) a = -fabs(a) - 0.1;
        if (i == 2) a = 0;                                       // a zero advantage
        if (!adv_tok) p.adv[i] = a;
        if (has_w && !w_tok) p.w[i] = 0.5 + urand();
        for (int64_t t = 0; t < T; t++) {
            int64_t k = i * T + t;
            double lp, l;
            if (exact16) {
                // multiples of 1/32 with at most 8 significant bits: exact in bf16 and fp16
                lp = -(double)(1 + (int)(urand() * 96)) / 32;
                l = (double)((int)(urand() * 33) - 16) / 32;    // |l| <= 0.5
            } else {
                lp = -(urand() * 3 + 0.05);
                l = (urand() * 2 - 1) * 0.7;
            }
            p.lp[k] = lp;
            p.olp[k] = lp - l;
            p.m[k] = t < len ? 1.0 : 0.0;
            p.ref[k] = exact16 ? lp + (double)((int)(urand() * 9) - 4) / 32 : lp + (urand() - 0.5) * 0.3;
            if (has_w && w_tok) p.w[k] = exact16 ? 0.75 + (double)(int)(urand() * 16) / 32 : 0.5 + urand();
            if (adv_tok) p.adv[k] = (urand() < 0.1) ? 0.0 : a + (urand() - 0.5);
        }
    }
    return p;
}

static void free_problem(problem *p) {
    free(p->lp); free(p->olp); free(p->m); free(p->ref); free(p->w); free(p->adv);
}

// a tensor of dtype dt laid out with strides (sb, st), from n doubles at src[(i,t)]
typedef struct { void *data; gmpo_view v; } buffer;

static size_t dtype_size(int32_t dt) {
    switch (dt) {
    case GMPO_DT_F64: case GMPO_DT_I64: return 8;
    case GMPO_DT_F32: case GMPO_DT_I32: return 4;
    case GMPO_DT_F16: case GMPO_DT_BF16: return 2;
    default: return 1;
    }
}

static void put(void *data, int32_t dt, int64_t k, double x) {
    switch (dt) {
    case GMPO_DT_F64: ((double *)data)[k] = x; break;
    case GMPO_DT_F32: ((float *)data)[k] = (float)x; break;
    case GMPO_DT_F16: ((uint16_t *)data)[k] = gmpo_f32_to_f16((float)x); break;
    case GMPO_DT_BF16: ((uint16_t *)data)[k] = gmpo_f32_to_bf16((float)x); break;
    case GMPO_DT_BOOL: case GMPO_DT_U8: ((uint8_t *)data)[k] = (uint8_t)x; break;
    case GMPO_DT_I8: ((int8_t *)data)[k] = (int8_t)x; break;
    case GMPO_DT_I32: ((int32_t *)data)[k] = (int32_t)x; break;
    case GMPO_DT_I64: ((int64_t *)data)[k] = (int64_t)x; break;
    default: break;
    }
}

// rows x cols values (cols == 1: a per-row tensor), stored with element strides
// (sb, st); the allocation is exactly the extent the strides need, so ASan sees
// any read past it
static buffer make_buffer(const double *src, int64_t rows, int64_t cols, int32_t dt,
                          int64_t sb, int64_t st) {
    buffer b;
    int64_t extent = rows == 0 ? 0 : (rows - 1) * sb + (cols - 1) * st + 1;
    b.data = xcalloc((size_t)extent, dtype_size(dt));
    for (int64_t i = 0; i < rows; i++)
        for (int64_t t = 0; t < cols; t++) put(b.data, dt, i * sb + t * st, src[i * cols + t]);
    b.v.data = b.data;
    b.v.dtype = dt;
    b.v.stride_b = sb;
    b.v.stride_t = cols == 1 && st == 0 ? 0 : st;
    b.v.extent = extent;
    return b;
}

static double get(const void *data, int32_t dt, int64_t k) {
    switch (dt) {
    case GMPO_DT_F64: return ((const double *)data)[k];
    case GMPO_DT_F32: return ((const float *)data)[k];
    case GMPO_DT_F16: return f16_bits_to_double(((const uint16_t *)data)[k]);
    case GMPO_DT_BF16: return bf16_bits_to_double(((const uint16_t *)data)[k]);
    default: return NAN;
    }
}

// ----------------------------------------------------------------------------
// the reference: the formulas of DESIGN.md section 1, in double, token by token

typedef struct {
    int algo, verl, loss_type;
    double el, eh, beta, C, norm, denom;
} options;

// loss, metrics[GMPO_METRICS], grad (B*T) for upstream gradient go
static double reference(const problem *p, const options *o, double go, double *metrics,
                        double *grad) {
    int64_t B = p->B, T = p->T;
    double total = 0, N = 0, m0 = 0, m1 = 0, m2 = 0, ksum = 0, maxmu = -INFINITY, bad = 0;
    for (int64_t i = 0; i < B; i++) {
        double n = 0;
        for (int64_t t = 0; t < T; t++) n += p->m[i * T + t];
        N += n;
    }
    for (int64_t i = 0; i < B; i++) {
        double n = 0, sy = 0, sa = 0, slw = 0, sk = 0, sloss = 0;
        for (int64_t t = 0; t < T; t++) n += p->m[i * T + t];
        double D = o->verl ? n + 1e-8 : (n > 1 ? n : 1);
        for (int64_t t = 0; t < T; t++) {
            int64_t k = i * T + t;
            double m = p->m[k];
            if (m == 0) continue;
            double A = p->adv_tok ? p->adv[k] : p->adv[i];
            double l = p->lp[k] - p->olp[k];
            double d = p->ref[k] - p->lp[k], k3 = o->beta != 0 ? exp(d) - d - 1 : 0;
            if (o->algo == GMPO_ALGO_GMPO) {
                if (o->C > 0) l = l < -o->C ? -o->C : (l > o->C ? o->C : l);
                double y = (o->verl && A == 0) ? 0 : (A > 0 ? fmin(l, o->eh) : fmax(l, -o->el));
                sy += m * y;
                sa += m * A;
                if (p->has_w && p->w_tok) slw += m * log(p->w[k] + 1e-10);
                if (o->verl) {
                    int clipped = l < -o->el || l > o->eh;
                    m0 += (clipped && A > 0) ? m : 0;
                    m1 += (clipped && A < 0) ? m : 0;
                    m2 -= m * l;
                } else {
                    int lo = l < -o->el && A < 0, hi = l > o->eh && A > 0;
                    m0 += lo ? m : 0; m1 += hi ? m : 0; m2 += (lo || hi) ? m : 0;
                }
            } else {
                double rho = exp(l), lo = 1 - o->el, hi = 1 + o->eh;
                double rc = rho < lo ? lo : (rho > hi ? hi : rho);
                double ls = -fmin(rho * A, rc * A);
                if (p->has_w) ls *= p->w_tok ? p->w[k] : p->w[i];
                ls += o->beta * k3;
                sloss += m * ls;
                int clo = rho < lo && A < 0, chi = rho > hi && A > 0;
                m0 += clo ? m : 0; m1 += chi ? m : 0; m2 += (clo || chi) ? m : 0;
            }
            if (o->beta != 0) sk += m * k3;   // the KL is computed only when it is used
        }
        ksum += sk;
        if (o->algo == GMPO_ALGO_GMPO) {
            double mu = sy / D, r = exp(mu);
            double ahat = p->adv_tok ? sa / D : (o->verl ? p->adv[i] * n / D : p->adv[i]);
            double w = !p->has_w ? 1 : (p->w_tok ? exp(slw / D) : p->w[i]);
            double L = -ahat * r * w + o->beta * sk / D;
            if (n != 0 && mu > maxmu) maxmu = mu;
            bad += isfinite(L) ? 0 : 1;
            total += L;
            double s = go / ((B > 1 ? (double)B : 1) * o->norm);
            for (int64_t t = 0; t < T; t++) {
                int64_t k = i * T + t;
                double m = p->m[k], g = 0;
                if (m != 0) {
                    double A = p->adv_tok ? p->adv[k] : p->adv[i];
                    double l = p->lp[k] - p->olp[k];
                    int pass = o->C > 0 ? (l >= -o->C && l <= o->C) : 1;
                    if (o->C > 0) l = l < -o->C ? -o->C : (l > o->C ? o->C : l);
                    if (o->verl && A == 0) pass = 0;
                    else if (A > 0) pass = pass && l <= o->eh;
                    else pass = pass && l >= -o->el;
                    g = (pass ? -ahat * r * w / D : 0) + o->beta * (1 - exp(p->ref[k] - p->lp[k])) / D;
                }
                grad[k] = m * g * s;
            }
        } else {
            double c;
            switch (o->loss_type) {
            case GMPO_LT_GRPO: c = 1.0 / ((B > 1 ? B : 1) * (n > 1 ? n : 1)); break;
            case GMPO_LT_BNPO: c = 1.0 / (N > 1 ? N : 1); break;
            case GMPO_LT_DR_GRPO: c = 1.0 / (double)(B * (o->denom > 0 ? o->denom : T)); break;
            default: c = 1.0 / (o->denom > 0 ? o->denom : (N > 1 ? N : 1)); break;
            }
            c /= o->norm;
            total += sloss * c;
            bad += isfinite(sloss) ? 0 : 1;
            for (int64_t t = 0; t < T; t++) {
                int64_t k = i * T + t;
                double m = p->m[k], g = 0;
                if (m != 0) {
                    double A = p->adv_tok ? p->adv[k] : p->adv[i];
                    double rho = exp(p->lp[k] - p->olp[k]);
                    int pass = A > 0 ? rho <= 1 + o->eh : rho >= 1 - o->el;
                    double w = !p->has_w ? 1 : (p->w_tok ? p->w[k] : p->w[i]);
                    g = (A != 0 && pass ? -A * rho * w : 0) + o->beta * (1 - exp(p->ref[k] - p->lp[k]));
                }
                grad[k] = m * g * c * go;
            }
        }
    }
    double cnt = (o->algo == GMPO_ALGO_GMPO && o->verl) ? N + 1e-8 : (N > 1 ? N : 1);
    metrics[GMPO_MX_M0] = m0 / cnt;
    metrics[GMPO_MX_M1] = m1 / cnt;
    metrics[GMPO_MX_M2] = m2 / cnt;
    metrics[GMPO_MX_KL] = ksum / cnt;
    metrics[GMPO_MX_MAX_MU] = maxmu == -INFINITY ? 0 : maxmu;
    metrics[GMPO_MX_NONFINITE] = bad;
    metrics[GMPO_MX_TOKENS] = N;
    if (o->algo == GMPO_ALGO_GMPO) return total / (B > 1 ? (double)B : 1) / o->norm;
    return total;
}

// ----------------------------------------------------------------------------
// running the core on a problem

typedef struct {
    int32_t dt_lp, dt_olp, dt_m, dt_adv, dt_ref, dt_w;
    int transposed;    // logp stored (T,B): stride_b = 1, stride_t = B
    int spread;        // old_logp with stride_t 2, per-row tensors with stride 3
    int threads;
} layout;

typedef struct {
    buffer lp, olp, m, adv, ref, w;
    gmpo_args a;
} call;

static call make_call(const problem *p, const options *o, const layout *ly) {
    call c;
    memset(&c, 0, sizeof c);
    int64_t B = p->B, T = p->T;
    int64_t rs = ly->spread ? 3 : 1;
    if (ly->transposed) c.lp = make_buffer(p->lp, B, T, ly->dt_lp, 1, B);
    else c.lp = make_buffer(p->lp, B, T, ly->dt_lp, T, 1);
    c.olp = ly->spread ? make_buffer(p->olp, B, T, ly->dt_olp, 2 * T, 2)
                       : make_buffer(p->olp, B, T, ly->dt_olp, T, 1);
    c.m = make_buffer(p->m, B, T, ly->dt_m, T, 1);
    c.adv = p->adv_tok ? make_buffer(p->adv, B, T, ly->dt_adv, T, 1)
                       : make_buffer(p->adv, B, 1, ly->dt_adv, rs, 0);
    if (p->has_ref) c.ref = make_buffer(p->ref, B, T, ly->dt_ref, T, 1);
    if (p->has_w)
        c.w = p->w_tok ? make_buffer(p->w, B, T, ly->dt_w, T, 1) : make_buffer(p->w, B, 1, ly->dt_w, rs, 0);
    c.a.algo = o->algo;
    c.a.B = B; c.a.T = T;
    c.a.logp = c.lp.v; c.a.old_logp = c.olp.v; c.a.mask = c.m.v; c.a.adv = c.adv.v;
    if (p->has_ref) c.a.ref_logp = c.ref.v;
    if (p->has_w) c.a.is_w = c.w.v;
    c.a.convention = o->verl ? GMPO_CONV_VERL : GMPO_CONV_TRL;
    c.a.loss_type = o->loss_type;
    c.a.eps_low = o->el; c.a.eps_high = o->eh; c.a.beta = o->beta;
    c.a.log_ratio_clamp = o->C; c.a.normalizer = o->norm; c.a.denom = o->denom;
    c.a.num_threads = ly->threads;
    // the output buffers the tests pass are exactly this big
    c.a.rows_extent = (B + 1) * GMPO_ROW_STATS;
    c.a.loss_extent = c.a.grad_out_extent = 1;
    c.a.metrics_extent = GMPO_METRICS;
    c.a.grad_extent = B * T;
    return c;
}

static void free_call(call *c) {
    free(c->lp.data); free(c->olp.data); free(c->m.data); free(c->adv.data);
    if (c->ref.data) free(c->ref.data);
    if (c->w.data) free(c->w.data);
}

typedef struct {
    double loss, metrics[GMPO_METRICS];
    double *grad;   // B*T doubles, decoded from the kernel's dtype
    gmpo_status st_f, st_b;
} result;

static result run(call *c, int32_t grad_dt, double go) {
    result r;
    memset(&r, 0, sizeof r);
    int64_t B = c->a.B, T = c->a.T;
    int32_t out_dt = c->a.logp.dtype == GMPO_DT_F64 ? GMPO_DT_F64 : GMPO_DT_F32;
    double *rows = xcalloc((size_t)(B + 1) * GMPO_ROW_STATS, sizeof(double));
    double out8[1 + GMPO_METRICS];
    float out4[1 + GMPO_METRICS];
    void *loss = out_dt == GMPO_DT_F64 ? (void *)out8 : (void *)out4;
    void *metrics = out_dt == GMPO_DT_F64 ? (void *)(out8 + 1) : (void *)(out4 + 1);
    r.st_f = gmpo_cpu_forward(&c->a, rows, loss, metrics, out_dt);
    r.loss = get(loss, out_dt, 0);
    for (int k = 0; k < GMPO_METRICS; k++) r.metrics[k] = get(metrics, out_dt, k);
    void *g = xcalloc((size_t)(B * T), dtype_size(grad_dt));
    float go32 = (float)go;
    double go64 = go;
    r.st_b = gmpo_cpu_backward(&c->a, rows, out_dt == GMPO_DT_F64 ? (void *)&go64 : (void *)&go32,
                               out_dt, B * T != 0 ? g : NULL, grad_dt);
    r.grad = xcalloc((size_t)(B * T), sizeof(double));
    for (int64_t k = 0; k < B * T; k++) r.grad[k] = get(g, grad_dt, k);
    if (go == 1.0) {
        // the fused entry point: the forward's outputs and the backward's gradient, bit for bit
        double *rows2 = xcalloc((size_t)(B + 1) * GMPO_ROW_STATS, sizeof(double));
        double o8[1 + GMPO_METRICS];
        float o4[1 + GMPO_METRICS];
        void *loss2 = out_dt == GMPO_DT_F64 ? (void *)o8 : (void *)o4;
        void *metrics2 = out_dt == GMPO_DT_F64 ? (void *)(o8 + 1) : (void *)(o4 + 1);
        void *g2 = xcalloc((size_t)(B * T), dtype_size(grad_dt));
        gmpo_status st = gmpo_cpu_forward_backward(&c->a, rows2, loss2, metrics2, out_dt,
                                                   B * T != 0 ? g2 : NULL, grad_dt);
        CHECK(st == (r.st_f ? r.st_f : r.st_b), "forward_backward status %d", st);
        if (st == GMPO_OK) {
            size_t osz = (size_t)(1 + GMPO_METRICS) * (out_dt == GMPO_DT_F64 ? 8 : 4);
            CHECK(memcmp(loss2, loss, osz) == 0, "forward_backward: loss or metrics differ");
            CHECK(memcmp(rows2, rows, (size_t)(B + 1) * GMPO_ROW_STATS * sizeof(double)) == 0,
                  "forward_backward: row statistics differ");
            CHECK(memcmp(g2, g, (size_t)(B * T) * dtype_size(grad_dt)) == 0,
                  "forward_backward: gradient differs from the backward's");
        }
        free(g2);
        free(rows2);
    }
    free(g);
    free(rows);
    return r;
}

// ----------------------------------------------------------------------------
// comparisons

// |got - want| <= tol * scale, for the loss: scale = sum of |row terms|
static void check_close(double got, double want, double tol, double scale, const char *what) {
    CHECK(fabs(got - want) <= tol * scale || (isnan(got) && isnan(want)),
          "%s: got %.17g, want %.17g (tol %.3g * %.3g)", what, got, want, tol, scale);
}

static void check_result(const problem *p, const options *o, const result *r, double go,
                         double tol_loss, double tol_grad_rel, double tol_grad_scale) {
    int64_t n = p->B * p->T;
    double metrics[GMPO_METRICS];
    double *grad = xcalloc((size_t)n, sizeof(double));
    double want = reference(p, o, go, metrics, grad);
    CHECK(r->st_f == GMPO_OK && r->st_b == GMPO_OK, "status %d / %d", r->st_f, r->st_b);
    // the loss's size without cancellation: the same problem with |A|
    problem q = *p;
    int64_t na = p->adv_tok ? n : p->B;
    q.adv = xcalloc((size_t)na, sizeof(double));
    for (int64_t k = 0; k < na; k++) q.adv[k] = fabs(p->adv[k]);
    double mq[GMPO_METRICS];
    double *gq = xcalloc((size_t)n, sizeof(double));
    double scale = fmax(fabs(reference(&q, o, go, mq, gq)), fabs(want)) + 1e-300;
    free(gq);
    free(q.adv);
    check_close(r->loss, want, tol_loss, scale, "loss");
    static const char *names[GMPO_METRICS] = {"m0", "m1", "m2", "kl", "max_mu", "nonfinite", "tokens"};
    for (int k = 0; k < GMPO_METRICS; k++) check_close(r->metrics[k], metrics[k], tol_loss, 1 + fabs(metrics[k]), names[k]);
    double gmax = 0;
    for (int64_t k = 0; k < n; k++) gmax = fmax(gmax, fabs(grad[k]));
    for (int64_t k = 0; k < n; k++) {
        double bound = tol_grad_rel * fabs(grad[k]) + tol_grad_scale * gmax + grad_floor;
        CHECK(fabs(r->grad[k] - grad[k]) <= bound, "grad[%lld]: got %.10g, want %.10g",
              (long long)k, r->grad[k], grad[k]);
        if (p->m[k] == 0) CHECK(r->grad[k] == 0, "grad[%lld] of a masked token is %g", (long long)k, r->grad[k]);
    }
    free(grad);
}

static void free_result(result *r) { free(r->grad); }

static const layout DENSE32 = {GMPO_DT_F32, GMPO_DT_F32, GMPO_DT_BOOL, GMPO_DT_F32, GMPO_DT_F32, GMPO_DT_F32, 0, 0, 1};

// ----------------------------------------------------------------------------
// cases

static void case_dtype(const char *name, int32_t dt, int verl, int adv_tok, int with_extras,
                       double tol_loss, double tol_grad_rel, double tol_grad_scale) {
    begin(name);
    int exact16 = dt == GMPO_DT_F16 || dt == GMPO_DT_BF16;
    problem p = make_problem(5, 37, adv_tok, with_extras, with_extras, with_extras, exact16);
    options o = {GMPO_ALGO_GMPO, verl, 0, 0.4, 0.28, with_extras ? 0.05 : 0.0, 0, 1.0, 0};
    layout ly = DENSE32;
    ly.dt_lp = ly.dt_olp = ly.dt_ref = ly.dt_w = dt;
    ly.dt_m = dt == GMPO_DT_F16 ? GMPO_DT_U8 : (dt == GMPO_DT_F64 ? GMPO_DT_F64 : GMPO_DT_I32);
    ly.dt_adv = dt == GMPO_DT_F64 ? GMPO_DT_F64 : GMPO_DT_F32;
    call c = make_call(&p, &o, &ly);
    result r = run(&c, dt, 0.37);
    grad_floor = dt == GMPO_DT_F16 ? ldexp(1.0, -24) : 0.0;
    check_result(&p, &o, &r, 0.37, tol_loss, tol_grad_rel, tol_grad_scale);
    grad_floor = 0.0;
    free_result(&r);
    free_call(&c);
    free_problem(&p);
    end();
}

static void case_fp64_finite_differences(int verl) {
    begin(verl ? "fp64 finite differences (verl, beta, is_w, clamp)" : "fp64 finite differences (trl, beta, is_w, clamp)");
    // log-ratios in [-0.7, 0.7], away from the bounds 0.4 / 0.28 by a margin
    problem p = make_problem(4, 9, 0, 1, 1, 1, 0);
    for (int64_t k = 0; k < p.B * p.T; k++) {
        double l = p.lp[k] - p.olp[k];
        if (fabs(l - 0.28) < 0.02 || fabs(l + 0.4) < 0.02 || fabs(l - 0.5) < 0.02 || fabs(l + 0.5) < 0.02)
            p.olp[k] = p.lp[k] - (l + 0.05);
    }
    options o = {GMPO_ALGO_GMPO, verl, 0, 0.4, 0.28, 0.05, 0.5, 2.0, 0};
    layout ly = {GMPO_DT_F64, GMPO_DT_F64, GMPO_DT_F64, GMPO_DT_F64, GMPO_DT_F64, GMPO_DT_F64, 0, 0, 1};
    call c = make_call(&p, &o, &ly);
    result r = run(&c, GMPO_DT_F64, 1.0);
    check_result(&p, &o, &r, 1.0, 1e-12, 1e-12, 1e-12);
    double *lp = (double *)c.lp.data;
    double rows[(4 + 1) * GMPO_ROW_STATS], out[1 + GMPO_METRICS];
    for (int64_t k = 0; k < p.B * p.T; k++) {
        double h = 1e-6, x = lp[k], fp, fm;
        lp[k] = x + h;
        gmpo_cpu_forward(&c.a, rows, out, out + 1, GMPO_DT_F64);
        fp = out[0];
        lp[k] = x - h;
        gmpo_cpu_forward(&c.a, rows, out, out + 1, GMPO_DT_F64);
        fm = out[0];
        lp[k] = x;
        double fd = (fp - fm) / (2 * h);
        CHECK(fabs(fd - r.grad[k]) <= 1e-6 * fmax(1e-3, fabs(r.grad[k])), "d/dlogp[%lld]: backward %.12g, finite difference %.12g",
              (long long)k, r.grad[k], fd);
    }
    free_result(&r);
    free_call(&c);
    free_problem(&p);
    end();
}

static void case_strided(int32_t dt) {
    begin(dt == GMPO_DT_F64 ? "strided fp64 (transposed logp, stride-2 old_logp, stride-3 rows)" : "strided fp32 (transposed logp, stride-2 old_logp, stride-3 rows)");
    problem p = make_problem(6, 29, 0, 1, 1, 0, 0);
    options o = {GMPO_ALGO_GMPO, 0, 0, 0.3, 0.3, 0.02, 0, 1.0, 0};
    layout dense = {dt, dt, GMPO_DT_BOOL, dt, dt, dt, 0, 0, 1};
    layout odd = dense;
    odd.transposed = 1;
    odd.spread = 1;
    call c1 = make_call(&p, &o, &dense), c2 = make_call(&p, &o, &odd);
    result r1 = run(&c1, dt, 0.5), r2 = run(&c2, dt, 0.5);
    check_result(&p, &o, &r2, 0.5, dt == GMPO_DT_F64 ? 1e-12 : 1e-5, dt == GMPO_DT_F64 ? 1e-12 : 1e-5, dt == GMPO_DT_F64 ? 1e-12 : 1e-5);
    CHECK(r1.loss == r2.loss, "strided loss %.17g differs from dense %.17g", r2.loss, r1.loss);
    for (int64_t k = 0; k < p.B * p.T; k++) CHECK(r1.grad[k] == r2.grad[k], "strided grad[%lld] differs", (long long)k);
    free_result(&r1); free_result(&r2);
    free_call(&c1); free_call(&c2);
    free_problem(&p);
    end();
}

static void case_empty_rows(int verl) {
    begin(verl ? "empty rows (verl)" : "empty rows (trl)");
    problem p = make_problem(4, 8, 0, 0, 0, 0, 0);
    for (int t = 0; t < 8; t++) { p.m[1 * 8 + t] = 0; p.m[3 * 8 + t] = 0; }
    p.adv[3] = -2.0;
    p.lp[1 * 8 + 2] = NAN;               // garbage in padding must not matter
    p.olp[3 * 8 + 5] = INFINITY;
    options o = {GMPO_ALGO_GMPO, verl, 0, 0.4, 0.4, 0, 0, 1.0, 0};
    call c = make_call(&p, &o, &DENSE32);
    result r = run(&c, GMPO_DT_F32, 1.0);
    check_result(&p, &o, &r, 1.0, 1e-5, 1e-5, 1e-5);
    for (int t = 0; t < 8; t++) CHECK(r.grad[1 * 8 + t] == 0 && r.grad[3 * 8 + t] == 0, "empty row gradient");
    CHECK(isfinite(r.loss), "loss %g", r.loss);
    free_result(&r);
    free_call(&c);
    free_problem(&p);
    end();
}

static void case_zero_rows(void) {
    begin("B = 0 and T = 0");
    for (int which = 0; which < 2; which++) {
        gmpo_args a;
        memset(&a, 0, sizeof a);
        a.B = which ? 3 : 0;
        a.T = which ? 0 : 5;
        double adv[3] = {0.5, -1.0, 2.0};
        a.logp.dtype = a.old_logp.dtype = a.adv.dtype = GMPO_DT_F32;   // no storage: NULL data
        a.logp.stride_t = a.old_logp.stride_t = a.mask.stride_t = 1;
        a.mask.dtype = GMPO_DT_BOOL;
        if (which) { a.adv.data = adv; a.adv.dtype = GMPO_DT_F64; a.adv.stride_b = 1; a.adv.extent = 3; }
        a.rows_extent = 4 * GMPO_ROW_STATS;
        a.loss_extent = a.grad_out_extent = 1;
        a.metrics_extent = GMPO_METRICS;
        a.eps_low = a.eps_high = 0.4;
        a.normalizer = 1.0;
        double rows[4 * GMPO_ROW_STATS];
        float out[1 + GMPO_METRICS];
        gmpo_status st = gmpo_cpu_forward(&a, rows, out, out + 1, GMPO_DT_F32);
        CHECK(st == GMPO_OK, "forward status %d: %s", st, a.err);
        // trl: an empty row contributes -A_i, so T = 0 gives -mean(A)
        double want = which ? -(0.5 - 1.0 + 2.0) / 3 : 0.0;
        CHECK(fabs(out[0] - want) < 1e-7, "loss %g, want %g", out[0], want);
        for (int k = 0; k < GMPO_METRICS; k++) CHECK(isfinite(out[1 + k]), "metric %d = %g", k, out[1 + k]);
        float go = 1.0f;
        st = gmpo_cpu_backward(&a, rows, &go, GMPO_DT_F32, NULL, GMPO_DT_F32);
        CHECK(st == GMPO_OK, "backward status %d: %s", st, a.err);
    }
    end();
}

static void case_nan(void) {
    begin("NaN in a real token gives NaN and a flag");
    problem p = make_problem(3, 10, 0, 0, 0, 0, 0);
    p.adv[2] = 0.7;
    p.lp[0 * 10 + 0] = NAN;               // row 0, token 0 is real (every row has >= 1 token)
    options o = {GMPO_ALGO_GMPO, 0, 0, 0.4, 0.4, 0, 0, 1.0, 0};
    call c = make_call(&p, &o, &DENSE32);
    result r = run(&c, GMPO_DT_F32, 1.0);
    CHECK(isnan(r.loss), "loss %g is not NaN", r.loss);
    CHECK(r.metrics[GMPO_MX_NONFINITE] == 1, "nonfinite rows %g", r.metrics[GMPO_MX_NONFINITE]);
    CHECK(isfinite(r.metrics[GMPO_MX_MAX_MU]), "max mu %g", r.metrics[GMPO_MX_MAX_MU]);
    for (int t = 0; t < 10; t++) CHECK(isfinite(r.grad[2 * 10 + t]), "row 2 gradient poisoned");
    free_result(&r);
    free_call(&c);
    free_problem(&p);
    end();
}

static void case_grpo(int loss_type) {
    static const char *names[] = {"grpo loss_type grpo", "grpo loss_type bnpo", "grpo loss_type dr_grpo", "grpo loss_type dapo"};
    begin(names[loss_type]);
    problem p = make_problem(5, 23, loss_type == GMPO_LT_BNPO, 1, 1, loss_type != GMPO_LT_DAPO, 0);
    options o = {GMPO_ALGO_GRPO, 0, loss_type, 0.2, 0.28, 0.04, 0, 1.5, loss_type == GMPO_LT_DAPO ? 50.0 : 0.0};
    call c = make_call(&p, &o, &DENSE32);
    result r = run(&c, GMPO_DT_F32, 0.37);
    check_result(&p, &o, &r, 0.37, 1e-5, 1e-5, 1e-5);
    free_result(&r);
    free_call(&c);
    free_problem(&p);
    end();
}

static void case_threads(void) {
    begin("same bits with 1 and 2 threads (B=8, T=4096)");
    problem p = make_problem(8, 4096, 1, 1, 1, 1, 0);
    options o = {GMPO_ALGO_GMPO, 1, 0, 0.4, 0.4, 0.01, 0, 1.0, 0};
    layout one = DENSE32, two = DENSE32;
    two.threads = 2;
    call c1 = make_call(&p, &o, &one), c2 = make_call(&p, &o, &two);
    result r1 = run(&c1, GMPO_DT_F32, 1.0), r2 = run(&c2, GMPO_DT_F32, 1.0);
    check_result(&p, &o, &r2, 1.0, 1e-5, 1e-5, 1e-5);
    CHECK(r1.loss == r2.loss, "loss differs: %.9g vs %.9g", r1.loss, r2.loss);
    for (int k = 0; k < GMPO_METRICS; k++) CHECK(r1.metrics[k] == r2.metrics[k], "metric %d differs", k);
    for (int64_t k = 0; k < p.B * p.T; k++) CHECK(r1.grad[k] == r2.grad[k], "grad[%lld] differs", (long long)k);
    free_result(&r1); free_result(&r2);
    free_call(&c1); free_call(&c2);
    free_problem(&p);
    end();
}

// every bad argument: GMPO_EINVAL and a message that names it
static void case_bad_args(void) {
    begin("bad arguments return GMPO_EINVAL naming the argument");
    problem p = make_problem(3, 4, 0, 1, 1, 1, 0);
    options o = {GMPO_ALGO_GMPO, 0, 0, 0.4, 0.4, 0.1, 0, 1.0, 0};
    double rows[4 * GMPO_ROW_STATS];
    float out[1 + GMPO_METRICS], grad[12], go = 1.0f;
    for (int which = 0; which < 31; which++) {
        call c = make_call(&p, &o, &DENSE32);
        gmpo_args *a = &c.a;
        const char *name = NULL;
        int backward = 0, out_dt = GMPO_DT_F32, grad_dt = GMPO_DT_F32, go_dt = GMPO_DT_F32;
        void *rows_p = rows, *grad_p = grad, *go_p = &go;
        switch (which) {
        case 0: a->logp.dtype = 42; name = "logps"; break;
        case 1: a->logp.dtype = GMPO_DT_BOOL; name = "logps"; break;
        case 2: a->logp.data = NULL; name = "logps"; break;
        case 3: a->old_logp.dtype = GMPO_DT_I32; name = "old_logps"; break;
        case 4: a->adv.data = NULL; name = "advantages"; break;
        case 5: a->mask.dtype = GMPO_DT_I64 + 1; name = "mask"; break;
        case 6: a->ref_logp.data = NULL; name = "ref_logps"; break;   // beta != 0
        case 7: a->is_w.dtype = GMPO_DT_I64; name = "is_weights"; break;
        case 8: a->eps_low = -0.1; name = "epsilon_low"; break;
        case 9: a->eps_high = NAN; name = "epsilon_high"; break;
        case 10: a->normalizer = 0; name = "normalizer"; break;
        case 11: a->beta = INFINITY; name = "beta"; break;
        case 12: a->convention = 3; name = "convention"; break;
        case 13: a->loss_type = -1; name = "loss_type"; break;
        case 14: a->algo = 9; name = "algo"; break;
        case 15: a->log_ratio_clamp = NAN; name = "log_ratio_clamp"; break;
        case 16: a->B = -2; name = "logps"; break;
        case 17: a->mask.stride_t = 0; name = "mask"; break;
        case 18: out_dt = GMPO_DT_BF16; name = "output dtype"; break;
        case 19: rows_p = NULL; name = "output buffer"; break;
        case 20: backward = 1; grad_dt = GMPO_DT_I32; name = "grad"; break;
        case 21: backward = 1; go_p = NULL; name = "grad_output"; break;
        case 22: backward = 1; go_dt = GMPO_DT_BOOL; name = "grad_output"; break;
        case 23: backward = 1; grad_p = NULL; name = "buffer"; break;
        // extents: a buffer smaller than its shape and strides address
        case 24: a->logp.extent -= 1; name = "logps"; break;
        case 25: a->old_logp.stride_t = -1; name = "old_logps"; break;
        case 26: a->adv.extent = 2; name = "advantages"; break;
        case 27: a->mask.stride_b = 5; name = "mask"; break;
        case 28: a->rows_extent = 3 * GMPO_ROW_STATS; name = "rows"; break;
        case 29: backward = 1; a->grad_extent = 11; name = "grad"; break;
        case 30: backward = 1; a->rows_extent = 2 * GMPO_ROW_STATS; name = "rows"; break;
        }
        for (int k = 0; k < 12; k++) grad[k] = 7.0f;
        gmpo_status st;
        if (backward)
            st = gmpo_cpu_backward(a, rows_p, go_p, go_dt, grad_p, grad_dt);
        else
            st = gmpo_cpu_forward(a, rows_p, out, out + 1, out_dt);
        CHECK(st == GMPO_EINVAL, "case %d: status %d, want GMPO_EINVAL", which, st);
        CHECK(strstr(a->err, name) != NULL, "case %d: message '%s' does not name '%s'", which, a->err, name);
        for (int k = 0; k < 12; k++) CHECK(grad[k] == 7.0f, "case %d: grad written on failure", which);
        if (which < 18) {  // the same bad argument fails backward too
            gmpo_args b = *a;
            st = gmpo_cpu_backward(&b, rows, &go, GMPO_DT_F32, grad, GMPO_DT_F32);
            CHECK(st == GMPO_EINVAL && strstr(b.err, name), "case %d backward: %d '%s'", which, st, b.err);
            for (int k = 0; k < 12; k++) CHECK(grad[k] == 7.0f, "case %d: grad written on failure", which);
        }
        free_call(&c);
    }
    free_problem(&p);
    end();
}

// a negative dtype code is as invalid as one past the last: each tensor argument
// must be rejected, not read as zeros through the loaders' default branch
static void case_negative_dtype_codes(void) {
    begin("negative dtype codes are rejected");
    problem p = make_problem(3, 4, 0, 1, 1, 1, 0);
    options o = {GMPO_ALGO_GMPO, 0, 0, 0.4, 0.4, 0.1, 0, 1.0, 0};
    static const char *names[6] = {"logps", "old_logps", "advantages", "mask", "ref_logps", "is_weights"};
    double rows[4 * GMPO_ROW_STATS];
    float out[1 + GMPO_METRICS];
    for (int which = 0; which < 6; which++) {
        call c = make_call(&p, &o, &DENSE32);
        gmpo_view *v[6] = {&c.a.logp, &c.a.old_logp, &c.a.adv, &c.a.mask, &c.a.ref_logp, &c.a.is_w};
        v[which]->dtype = -1;
        gmpo_status st = gmpo_cpu_forward(&c.a, rows, out, out + 1, GMPO_DT_F32);
        CHECK(st == GMPO_EINVAL && strstr(c.a.err, names[which]) != NULL,
              "%s dtype -1: status %d, message '%s'", names[which], st, c.a.err);
        free_call(&c);
    }
    free_problem(&p);
    end();
}

// all 65536 half and bf16 patterns: to float and back is the identity (NaN stays NaN)
static void case_conversions_roundtrip(void) {
    begin("fp16 / bf16 bit patterns round-trip through float");
    for (uint32_t h = 0; h < 65536; h++) {
        float f = gmpo_f16_to_f32((uint16_t)h);
        int nan = ((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff);
        CHECK(nan ? isnan(f) : (double)f == f16_bits_to_double((uint16_t)h), "f16 %04x -> %g", h, f);
        uint16_t back = gmpo_f32_to_f16(f);
        if (nan) CHECK(((back >> 10) & 0x1f) == 0x1f && (back & 0x3ff), "f16 NaN %04x -> %04x", h, back);
        else CHECK(back == h, "f16 %04x -> %g -> %04x", h, f, back);
        float g = gmpo_bf16_to_f32((uint16_t)h);
        int bnan = ((h >> 7) & 0xff) == 0xff && (h & 0x7f);
        CHECK(bnan ? isnan(g) : (double)g == bf16_bits_to_double((uint16_t)h), "bf16 %04x -> %g", h, g);
        uint16_t bback = gmpo_f32_to_bf16(g);
        if (bnan) CHECK(((bback >> 7) & 0xff) == 0xff && (bback & 0x7f), "bf16 NaN %04x -> %04x", h, bback);
        else CHECK(bback == h, "bf16 %04x -> %g -> %04x", h, g, bback);
    }
    end();
}

// The GRPO family (GMPO_ALGO_FAMILY) under the sanitizers: every loss type at
// both levels with every option on (delta, off-policy mask with a NaN sampler
// token, the bias-corrected KL, token_mask, per-token weights), fp64 and fp32;
// forward_backward against forward + backward bit for bit (run()), the rows
// split in two halves of the tokens (row_sums twice, summed, finish_sums)
// against forward, masked tokens' gradient exactly 0, and the fp64 gradient
// against finite differences for the types whose coefficients carry it.
static void case_family(int32_t dt) {
    begin(dt == GMPO_DT_F64 ? "family fp64 (8 types x 2 levels, every option)"
                            : "family fp32 (8 types x 2 levels, every option)");
    const int64_t B = 5, T = 11;
    for (int lt = GMPO_LT_GRPO; lt <= GMPO_LT_VESPO; lt++) {
        for (int seq = 0; seq <= 1; seq++) {
            problem p = make_problem(B, T, 0, 1, 1, 1, 0);
            double *slp = xcalloc((size_t)(B * T), sizeof(double));
            double *tm = xcalloc((size_t)(B * T), sizeof(double));
            for (int64_t k = 0; k < B * T; k++) {
                slp[k] = p.olp[k] + (urand() - 0.5) * 0.4;
                tm[k] = urand() < 0.7 ? 1.0 : 0.0;
            }
            slp[3] = NAN;   // a token the sampler could not score
            options o = {GMPO_ALGO_FAMILY, 0, lt, 0.2, lt == GMPO_LT_CISPO ? 1.1 : 0.28, 0.05, 0, 2.0, 0};
            layout ly = {dt, dt, GMPO_DT_BOOL, dt, dt, dt, 0, 0, 1};
            call c = make_call(&p, &o, &ly);
            buffer bs = make_buffer(slp, B, T, dt, T, 1), bt = make_buffer(tm, B, T, GMPO_DT_U8, T, 1);
            c.a.samp_logp = bs.v;
            c.a.tok_mask = bt.v;
            c.a.fam.seq_level = seq;
            c.a.fam.has_delta = 1; c.a.fam.delta = 1.3;
            c.a.fam.off_policy = 1; c.a.fam.off_policy_threshold = 0.01;
            c.a.fam.bias_corr_kl = 1;
            c.a.fam.sapo_tpos = 1.0; c.a.fam.sapo_tneg = 1.05;
            c.a.fam.vespo_kpos = 2.0; c.a.fam.vespo_lpos = 3.0;
            c.a.fam.vespo_kneg = 3.0; c.a.fam.vespo_lneg = 2.0;
            result r = run(&c, dt, 1.0);
            CHECK(r.st_f == GMPO_OK && r.st_b == GMPO_OK, "type %d seq %d: status %d / %d: %s",
                  lt, seq, r.st_f, r.st_b, c.a.err);
            CHECK(isfinite(r.loss), "type %d seq %d: loss %g", lt, seq, r.loss);
            for (int64_t k = 0; k < B * T; k++)
                if (p.m[k] == 0) CHECK(r.grad[k] == 0, "type %d: masked grad[%lld] = %g", lt, (long long)k, r.grad[k]);
            // the rows split over two "processes": tokens [0, 6) and [6, T)
            double *sums = xcalloc((size_t)(2 * B * GMPO_SUM_STATS), sizeof(double));
            gmpo_args h = c.a;
            h.T = 6;
            CHECK(gmpo_cpu_row_sums(&h, sums, B * GMPO_SUM_STATS) == GMPO_OK, "row_sums: %s", h.err);
            size_t es = dtype_size(dt);
            h.T = T - 6;
            h.logp.data = (const char *)c.a.logp.data + 6 * es;
            h.old_logp.data = (const char *)c.a.old_logp.data + 6 * es;
            h.mask.data = (const char *)c.a.mask.data + 6;
            h.ref_logp.data = (const char *)c.a.ref_logp.data + 6 * es;
            h.is_w.data = (const char *)c.a.is_w.data + 6 * es;
            h.samp_logp.data = (const char *)c.a.samp_logp.data + 6 * es;
            h.tok_mask.data = (const char *)c.a.tok_mask.data + 6;
            h.logp.extent -= 6; h.old_logp.extent -= 6; h.mask.extent -= 6; h.ref_logp.extent -= 6;
            h.is_w.extent -= 6; h.samp_logp.extent -= 6; h.tok_mask.extent -= 6;
            CHECK(gmpo_cpu_row_sums(&h, sums + B * GMPO_SUM_STATS, B * GMPO_SUM_STATS) == GMPO_OK,
                  "row_sums: %s", h.err);
            for (int64_t k = 0; k < B * GMPO_SUM_STATS; k++) sums[k] += sums[B * GMPO_SUM_STATS + k];
            double rows[(5 + 1) * GMPO_ROW_STATS], out8[1 + GMPO_METRICS];
            float out4[1 + GMPO_METRICS];
            int32_t odt = dt == GMPO_DT_F64 ? GMPO_DT_F64 : GMPO_DT_F32;
            void *ob = odt == GMPO_DT_F64 ? (void *)out8 : (void *)out4;
            void *mb = odt == GMPO_DT_F64 ? (void *)(out8 + 1) : (void *)(out4 + 1);
            CHECK(gmpo_cpu_finish_sums(&c.a, sums, B * GMPO_SUM_STATS, rows, ob, mb, odt) == GMPO_OK,
                  "finish_sums: %s", c.a.err);
            double split = get(ob, odt, 0);
            CHECK(fabs(split - r.loss) <= (dt == GMPO_DT_F64 ? 1e-12 : 2e-6) * fmax(1.0, fabs(r.loss)),
                  "type %d seq %d: split loss %.12g, whole %.12g", lt, seq, split, r.loss);
            free(sums);
            if (dt == GMPO_DT_F64 && lt != GMPO_LT_CISPO && lt != GMPO_LT_VESPO) {
                // the keep of the off-policy mask is piecewise constant: finite
                // differences see the same rows kept
                double *lp = (double *)c.lp.data;
                for (int64_t k = 0; k < B * T; k++) {
                    double hh = 1e-6, x = lp[k], fp, fm;
                    lp[k] = x + hh;
                    gmpo_cpu_forward(&c.a, rows, out8, out8 + 1, GMPO_DT_F64);
                    fp = out8[0];
                    lp[k] = x - hh;
                    gmpo_cpu_forward(&c.a, rows, out8, out8 + 1, GMPO_DT_F64);
                    fm = out8[0];
                    lp[k] = x;
                    double fd = (fp - fm) / (2 * hh);
                    CHECK(fabs(fd - r.grad[k]) <= 1e-6 * fmax(1e-3, fabs(r.grad[k])),
                          "type %d seq %d: d/dlogp[%lld]: backward %.12g, finite difference %.12g",
                          lt, seq, (long long)k, r.grad[k], fd);
                }
            }
            free_result(&r);
            free(bs.data);
            free(bt.data);
            free_call(&c);
            free_problem(&p);
            free(slp);
            free(tm);
        }
    }
    end();
}

// verl's policy losses (convention verl): vanilla (with the dual clip), gspo,
// cispo, sapo, each aggregation mode vanilla and cispo take, with and without
// the global batch's divisor; token-level advantages of mixed signs, per-token
// weights, tokens past the +-20 clamp. forward_backward against forward +
// backward bit for bit (run()), the rows split in two halves against forward,
// masked gradients exactly 0, and the fp64 gradient against finite differences
// where it is the loss's own derivative (vanilla, sapo; cispo's and gspo's
// carry verl's stop-gradients).
static void case_verl(int32_t dt) {
    begin(dt == GMPO_DT_F64 ? "verl family fp64 (vanilla, gspo, cispo, sapo x aggregation)"
                            : "verl family fp32 (vanilla, gspo, cispo, sapo x aggregation)");
    const int64_t B = 5, T = 11;
    for (int mode = 0; mode < 4; mode++) {
        int lt = mode == 2 ? GMPO_LT_CISPO : mode == 3 ? GMPO_LT_SAPO : GMPO_LT_GRPO;
        int seq = mode == 1;
        for (int agg = 0; agg < 3; agg++) {
            if (mode == 3 && agg != GMPO_VA_SEQ_MEAN_TOKEN_MEAN) continue;
            for (int gb = 0; gb <= 1; gb++) {
                problem p = make_problem(B, T, 1, 0, 1, 1, 0);
                p.lp[0] = p.olp[0] + 25.0;    // past the clamp (row 0 is never empty)
                p.lp[1] = p.olp[1] - 23.0;
                options o = {GMPO_ALGO_FAMILY, 1, lt, 0.2, 0.28, 0.0, 0, 0.5, gb ? 37.0 : 0.0};
                layout ly = {dt, dt, GMPO_DT_BOOL, dt, dt, dt, 0, 0, 1};
                call c = make_call(&p, &o, &ly);
                c.a.fam.seq_level = seq;
                c.a.fam.verl_agg = agg;
                c.a.fam.clip_c = mode == 0 ? 3.0 : 0.0;
                c.a.fam.sapo_tpos = 1.0; c.a.fam.sapo_tneg = 1.05;
                result r = run(&c, dt, 1.0);
                CHECK(r.st_f == GMPO_OK && r.st_b == GMPO_OK, "mode %d agg %d: status %d / %d: %s",
                      mode, agg, r.st_f, r.st_b, c.a.err);
                CHECK(isfinite(r.loss) && r.loss != 0, "mode %d agg %d: loss %g", mode, agg, r.loss);
                for (int64_t k = 0; k < B * T; k++)
                    if (p.m[k] == 0) CHECK(r.grad[k] == 0, "mode %d: masked grad[%lld] = %g", mode,
                                           (long long)k, r.grad[k]);
                if (mode == 0 || mode == 3)
                    CHECK(r.grad[0] == 0 && r.grad[1] == 0, "mode %d: past the clamp: %g %g", mode,
                          r.grad[0], r.grad[1]);
                double *sums = xcalloc((size_t)(2 * B * GMPO_SUM_STATS), sizeof(double));
                gmpo_args h = c.a;
                h.T = 6;
                CHECK(gmpo_cpu_row_sums(&h, sums, B * GMPO_SUM_STATS) == GMPO_OK, "row_sums: %s", h.err);
                size_t es = dtype_size(dt);
                h.T = T - 6;
                h.logp.data = (const char *)c.a.logp.data + 6 * es;
                h.old_logp.data = (const char *)c.a.old_logp.data + 6 * es;
                h.mask.data = (const char *)c.a.mask.data + 6;
                h.adv.data = (const char *)c.a.adv.data + 6 * es;
                h.is_w.data = (const char *)c.a.is_w.data + 6 * es;
                h.logp.extent -= 6; h.old_logp.extent -= 6; h.mask.extent -= 6; h.adv.extent -= 6;
                h.is_w.extent -= 6;
                CHECK(gmpo_cpu_row_sums(&h, sums + B * GMPO_SUM_STATS, B * GMPO_SUM_STATS) == GMPO_OK,
                      "row_sums: %s", h.err);
                for (int64_t k = 0; k < B * GMPO_SUM_STATS; k++) sums[k] += sums[B * GMPO_SUM_STATS + k];
                double rows[(5 + 1) * GMPO_ROW_STATS], out8[1 + GMPO_METRICS];
                float out4[1 + GMPO_METRICS];
                int32_t odt = dt == GMPO_DT_F64 ? GMPO_DT_F64 : GMPO_DT_F32;
                void *ob = odt == GMPO_DT_F64 ? (void *)out8 : (void *)out4;
                void *mb = odt == GMPO_DT_F64 ? (void *)(out8 + 1) : (void *)(out4 + 1);
                CHECK(gmpo_cpu_finish_sums(&c.a, sums, B * GMPO_SUM_STATS, rows, ob, mb, odt) == GMPO_OK,
                      "finish_sums: %s", c.a.err);
                double split = get(ob, odt, 0);
                CHECK(fabs(split - r.loss) <= (dt == GMPO_DT_F64 ? 1e-12 : 2e-6) * fmax(1.0, fabs(r.loss)),
                      "mode %d agg %d: split loss %.12g, whole %.12g", mode, agg, split, r.loss);
                free(sums);
                if (dt == GMPO_DT_F64 && (mode == 0 || mode == 3)) {
                    double *lp = (double *)c.lp.data;
                    for (int64_t k = 0; k < B * T; k++) {
                        double hh = 1e-6, x = lp[k], fp, fm;
                        lp[k] = x + hh;
                        gmpo_cpu_forward(&c.a, rows, out8, out8 + 1, GMPO_DT_F64);
                        fp = out8[0];
                        lp[k] = x - hh;
                        gmpo_cpu_forward(&c.a, rows, out8, out8 + 1, GMPO_DT_F64);
                        fm = out8[0];
                        lp[k] = x;
                        double fd = (fp - fm) / (2 * hh);
                        CHECK(fabs(fd - r.grad[k]) <= 1e-6 * fmax(1e-3, fabs(r.grad[k])),
                              "mode %d agg %d: d/dlogp[%lld]: backward %.12g, finite difference %.12g",
                              mode, agg, (long long)k, r.grad[k], fd);
                    }
                }
                // a bad option is a status and a message, never an exit
                c.a.fam.verl_agg = 9;
                CHECK(gmpo_cpu_forward(&c.a, rows, out8, out8 + 1, GMPO_DT_F64) == GMPO_EINVAL &&
                      strstr(c.a.err, "loss_agg_mode"), "verl_agg 9: %s", c.a.err);
                free_result(&r);
                free_call(&c);
                free_problem(&p);
            }
        }
    }
    end();
}

static int convert_file(const char *in, const char *out) {
    FILE *fi = fopen(in, "rb"), *fo = fopen(out, "wb");
    if (!fi || !fo) { fprintf(stderr, "cannot open %s or %s\n", in, out); return 2; }
    float f;
    while (fread(&f, sizeof f, 1, fi) == 1) {
        uint16_t pair[2] = {gmpo_f32_to_f16(f), gmpo_f32_to_bf16(f)};
        if (fwrite(pair, sizeof pair, 1, fo) != 1) { fclose(fi); fclose(fo); return 2; }
    }
    fclose(fi);
    fclose(fo);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "convert") == 0) return convert_file(argv[2], argv[3]);
    // fp32: fp32 accumulation, ~1e-7 relative in practice; bf16/fp16 gradients
    // carry their dtype's rounding (2^-8, 2^-11 relative; fp16 subnormals 2^-24)
    case_dtype("fp32 trl", GMPO_DT_F32, 0, 0, 0, 1e-5, 1e-5, 1e-5);
    case_dtype("fp32 verl token advantages, beta, is_w", GMPO_DT_F32, 1, 1, 1, 1e-5, 1e-5, 1e-5);
    case_dtype("bf16 trl, beta, is_w", GMPO_DT_BF16, 0, 0, 1, 1e-5, 1.0 / 256 + 1e-5, 1e-5);
    case_dtype("bf16 verl", GMPO_DT_BF16, 1, 1, 0, 1e-5, 1.0 / 256 + 1e-5, 1e-5);
    case_dtype("fp16 trl token advantages, beta, is_w", GMPO_DT_F16, 0, 1, 1, 1e-5, 1.0 / 2048 + 1e-5, 1e-5);
    case_dtype("fp16 verl", GMPO_DT_F16, 1, 0, 0, 1e-5, 1.0 / 2048 + 1e-5, 1e-5);
    case_dtype("fp64 trl, beta, is_w", GMPO_DT_F64, 0, 0, 1, 1e-12, 1e-12, 1e-12);
    case_dtype("fp64 verl token advantages", GMPO_DT_F64, 1, 1, 0, 1e-12, 1e-12, 1e-12);
    case_fp64_finite_differences(0);
    case_fp64_finite_differences(1);
    case_strided(GMPO_DT_F32);
    case_strided(GMPO_DT_F64);
    case_empty_rows(0);
    case_empty_rows(1);
    case_zero_rows();
    case_nan();
    for (int lt = 0; lt < 4; lt++) case_grpo(lt);
    case_threads();
    case_family(GMPO_DT_F64);
    case_family(GMPO_DT_F32);
    case_verl(GMPO_DT_F64);
    case_verl(GMPO_DT_F32);
    case_bad_args();
    case_negative_dtype_codes();
    case_conversions_roundtrip();
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
