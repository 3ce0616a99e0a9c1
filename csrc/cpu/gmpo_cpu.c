/*
 * gmpo_cpu.c -- the CPU entry points of the fused GMPO / GRPO loss (C11, OpenMP
 * over rows). GMPO: Geometric-Mean Policy Optimization, arXiv 2507.20673.
 *
 *   forward : logp, old_logp, mask: (B,T); adv, is_w: (B,) or (B,T); ref_logp: (B,T)
 *             -> rows ((B+1) x GMPO_ROW_STATS fp64), loss (0-d), metrics (GMPO_METRICS)
 *   backward: rows, grad_out (0-d) -> grad (B,T) in logp's dtype
 *
 * fp32, fp16 and bf16 inputs accumulate in fp32; fp64 inputs stay fp64.
 * Rows are spread over a->num_threads OpenMP threads (the caller passes the
 * number torch is set to use), one row per thread at a time, statically, so
 * every run gives the same bits.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include "../gmpo.h"
#include "../gmpo_math.h"

#define GMPO_TILE 256
#define GMPO_LANES 16

#if defined(__GNUC__) || defined(__clang__)
#define GMPO_INLINE static inline __attribute__((always_inline))
#else
#define GMPO_INLINE static inline
#endif

// One build runs at the best vector width of the machine it runs on: the row
// loops are compiled for AVX-512, AVX2 and the baseline, chosen at load time.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(GMPO_NO_CLONES) && !defined(__SANITIZE_ADDRESS__)
#define GMPO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define GMPO_CLONES_ON 1
#else
#define GMPO_CLONES
#endif

// ----------------------------------------------------------------------------
// row kernels, for float and double accumulation

#define GMPO_T float
#define GMPO_S(name) name##_f
#include "gmpo_cpu_impl.h"
#undef GMPO_T
#undef GMPO_S

#define GMPO_T double
#define GMPO_S(name) name##_d
#include "gmpo_cpu_impl.h"
#undef GMPO_T
#undef GMPO_S

// ----------------------------------------------------------------------------
// the common case's row kernel (see gmpo_cpu_fast.h)

// The fast kernel's entry points for rows [r0, r1): forward (with the fp32
// gradient for grad_out = 1 when the last argument is not NULL) and backward,
// 24 instances each, in the order of fast_instance().
typedef void (*fast_fn)(const gmpo_args *, int64_t, int64_t, double *, float *);
typedef void (*fast_bwd_fn)(const gmpo_args *, int64_t, int64_t, const double *, double,
                            float *);
typedef struct {
    fast_fn fwd[24];
    fast_bwd_fn bwd[24];
} fast_kernels;
#define FAST_INSTANCE_NAMES(X)                                                        \
    X(n_0) X(n_1) X(n_2) X(n_3) X(n_4) X(n_5) X(n_6) X(n_7) X(n_8) X(n_9) X(n_10)    \
    X(n_11) X(c_0) X(c_1) X(c_2) X(c_3) X(c_4) X(c_5) X(c_6) X(c_7) X(c_8) X(c_9)    \
    X(c_10) X(c_11)

#if defined(__GNUC__) || defined(__clang__)
#define GMPO_HAVE_FAST 1

// one copy per instruction set where GMPO_CLONES applies (see gmpo_cpu_fast.h)
#if defined(GMPO_CLONES_ON) && !defined(__clang__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define FAST_S(name) name##_v4
#define FAST_W 16
#define FAST_ZX_U8(out, p) \
    (*(out) = (fv_v4)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))))
#include "gmpo_cpu_fast.h"
#undef FAST_ZX_U8
#undef FAST_W
#undef FAST_S
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define FAST_S(name) name##_v3
#define FAST_W 8
#define FAST_ZX_U8(out, p) \
    (*(out) = (fv_v3)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))))
#include "gmpo_cpu_fast.h"
#undef FAST_ZX_U8
#undef FAST_W
#undef FAST_S
#pragma GCC pop_options
#endif
#define FAST_S(name) name##_v1
#define FAST_W 4
#include "gmpo_cpu_fast.h"
#undef FAST_W
#undef FAST_S

// The fast instances for the machine this runs on: the best of x86-64-v4
// (AVX-512), v3 (AVX2) and the baseline, or the level in the environment
// variable GMPO_EXT_CPU_LEVEL (1, 3 or 4: for tests; never above the machine's).
static int fast_level(void) {
    static _Atomic int level = 0;   // 0: not chosen yet (idempotent: a race is harmless)
    int lv = level;
    if (!lv) {
        lv = 1;
#if defined(GMPO_CLONES_ON) && !defined(__clang__)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("x86-64-v4")) lv = 4;
        else if (__builtin_cpu_supports("x86-64-v3")) lv = 3;
#endif
        const char *env = getenv("GMPO_EXT_CPU_LEVEL");
        if (env && (env[0] == '1' || env[0] == '3') && env[0] - '0' < lv) lv = env[0] - '0';
        level = lv;
    }
    return lv;
}

static const fast_kernels *fast_kernels_here(void) {
    int lv = fast_level();
#if defined(GMPO_CLONES_ON) && !defined(__clang__)
    if (lv == 4) return &kernels_v4;
    if (lv == 3) return &kernels_v3;
#endif
    (void)lv;
    return &kernels_v1;
}
#else
#define GMPO_HAVE_FAST 0
static const fast_kernels *fast_kernels_here(void) { return NULL; }
#endif

// The fast kernel's instance for a call, or -1 where the generic one runs:
// 4 * log-prob dtype (f32, bf16, f16) + 2 * (mask f32) + verl, plus 12 with the
// safety clamp. With a gradient buffer (grad_dtype >= 0), only fp32 gradients.
static int fast_instance(const gmpo_args *a, int32_t grad_dtype) {
    if (!GMPO_HAVE_FAST || a->T == 0) return -1;   // T == 0: the data may be NULL
    if (a->algo != GMPO_ALGO_GMPO || a->beta != 0 || a->adv.stride_t != 0) return -1;
    if (a->is_w.data && a->is_w.stride_t != 0) return -1;
    int32_t dt = a->logp.dtype, mdt = a->mask.dtype;
    if (a->old_logp.dtype != dt) return -1;
    if (a->T > 1 && (a->logp.stride_t != 1 || a->old_logp.stride_t != 1 || a->mask.stride_t != 1))
        return -1;
    if (grad_dtype >= 0 && grad_dtype != GMPO_DT_F32) return -1;
    int d = dt == GMPO_DT_F32 ? 0 : dt == GMPO_DT_BF16 ? 1 : dt == GMPO_DT_F16 ? 2 : -1;
    int m = (mdt == GMPO_DT_BOOL || mdt == GMPO_DT_U8) ? 0 : mdt == GMPO_DT_F32 ? 1 : -1;
    if (d < 0 || m < 0) return -1;
    return 12 * (a->log_ratio_clamp > 0) + 4 * d + 2 * m + (a->convention == GMPO_CONV_VERL);
}

// ----------------------------------------------------------------------------
// threading: rows in contiguous static chunks, one per thread

// below this many tokens one thread is faster than waking the others
#define GMPO_PARALLEL_MIN_TOKENS 32768

static int threads_for(const gmpo_args *a) {
    if (a->num_threads <= 1 || a->B < 2 || a->B * a->T < GMPO_PARALLEL_MIN_TOKENS) return 1;
    return a->B < a->num_threads ? (int)a->B : a->num_threads;
}

// rows [r0, r1) of thread t out of nt
static void chunk(int64_t B, int t, int nt, int64_t *r0, int64_t *r1) {
    *r0 = B * t / nt;
    *r1 = B * (t + 1) / nt;
}

// forward of every row; with grad (grad_dtype >= 0) also the gradient for
// grad_out = 1, row by row (gmpo only)
static void forward_rows(const gmpo_args *a, double *rows, void *grad, int32_t grad_dtype) {
    int nt = threads_for(a);
    int f64 = a->logp.dtype == GMPO_DT_F64;
    int fast = f64 ? -1 : fast_instance(a, grad ? grad_dtype : -1);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
#endif
    for (int t = 0; t < nt; t++) {
        int64_t r0, r1;
        chunk(a->B, t, nt, &r0, &r1);
        if (a->algo == GMPO_ALGO_FAMILY) {
            if (f64) fam_rows_forward_d(a, r0, r1, rows);
            else fam_rows_forward_f(a, r0, r1, rows);
        } else if (fast >= 0) fast_kernels_here()->fwd[fast](a, r0, r1, rows, (float *)grad);
        else if (grad && f64) rows_fused_d(a, r0, r1, rows, grad, grad_dtype);
        else if (grad) rows_fused_f(a, r0, r1, rows, grad, grad_dtype);
        else if (f64) rows_forward_d(a, r0, r1, rows);
        else rows_forward_f(a, r0, r1, rows);
    }
}

static void backward_rows(const gmpo_args *a, const double *rows, double go, void *grad,
                          int32_t gdt) {
    int nt = threads_for(a);
    int f64 = a->logp.dtype == GMPO_DT_F64;
    int fast = f64 ? -1 : fast_instance(a, gdt);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
#endif
    for (int t = 0; t < nt; t++) {
        int64_t r0, r1;
        chunk(a->B, t, nt, &r0, &r1);
        if (a->algo == GMPO_ALGO_FAMILY) {
            if (f64) fam_rows_backward_d(a, r0, r1, rows, go, grad, gdt);
            else fam_rows_backward_f(a, r0, r1, rows, go, grad, gdt);
        } else if (fast >= 0) fast_kernels_here()->bwd[fast](a, r0, r1, rows, go, (float *)grad);
        else if (f64) rows_backward_d(a, r0, r1, rows, go, grad, gdt);
        else rows_backward_f(a, r0, r1, rows, go, grad, gdt);
    }
}

// ----------------------------------------------------------------------------
// entry points

// the batch totals into row B of rows, the loss and the metrics
static void finish(gmpo_args *a, double *rows, void *out_loss, void *out_metrics,
                   int32_t out_dtype) {
    double *tot = rows + a->B * GMPO_ROW_STATS;
    gmpo_totals_init(tot);
    for (int64_t i = 0; i < a->B; i++) gmpo_totals_add_row(tot, rows + i * GMPO_ROW_STATS);
    gmpo_totals_close(tot);
    double out[GMPO_METRICS + 1];
    gmpo_finish_totals(a, tot, out);
    gmpo_store_d(out_loss, out_dtype, 0, out[0]);
    for (int k = 0; k < GMPO_METRICS; k++) gmpo_store_d(out_metrics, out_dtype, k, out[k + 1]);
}

gmpo_status gmpo_cpu_forward(gmpo_args *a, double *rows, void *out_loss,
                             void *out_metrics, int32_t out_dtype) {
    gmpo_status st = gmpo_check_forward(a, rows, out_loss, out_metrics, out_dtype);
    if (st) return st;
    forward_rows(a, rows, NULL, -1);
    finish(a, rows, out_loss, out_metrics, out_dtype);
    return GMPO_OK;
}

int gmpo_cpu_uses_fast_kernel(const gmpo_args *a, int32_t grad_dtype) {
    return a->logp.dtype != GMPO_DT_F64 && fast_instance(a, grad_dtype) >= 0;
}

gmpo_status gmpo_cpu_forward_backward(gmpo_args *a, double *rows, void *out_loss,
                                      void *out_metrics, int32_t out_dtype, void *grad,
                                      int32_t grad_dtype) {
    gmpo_status st = gmpo_check_forward(a, rows, out_loss, out_metrics, out_dtype);
    if (st) return st;
    if ((st = gmpo_check_grad(a, grad, grad_dtype))) return st;
    if (a->algo != GMPO_ALGO_GMPO) {
        // grpo's token weights may need the whole batch's mask sum: two passes
        forward_rows(a, rows, NULL, -1);
        finish(a, rows, out_loss, out_metrics, out_dtype);
        if (a->B * a->T != 0) backward_rows(a, rows, 1.0, grad, grad_dtype);
        return GMPO_OK;
    }
    forward_rows(a, rows, a->B * a->T != 0 ? grad : NULL, grad_dtype);
    finish(a, rows, out_loss, out_metrics, out_dtype);
    return GMPO_OK;
}

gmpo_status gmpo_cpu_backward(gmpo_args *a, const double *rows, const void *grad_out,
                              int32_t grad_out_dtype, void *grad, int32_t grad_dtype) {
    gmpo_status st = gmpo_check_backward(a, rows, grad_out, grad_out_dtype, grad, grad_dtype);
    if (st) return st;
    if (a->B * a->T == 0) return GMPO_OK;
    double go = gmpo_load_d(grad_out, grad_out_dtype, 0);
    backward_rows(a, rows, go, grad, grad_dtype);
    return GMPO_OK;
}

// ----------------------------------------------------------------------------
// rows split over processes (gmpo.h): row sums, then the finish of summed ones

gmpo_status gmpo_cpu_row_sums(gmpo_args *a, double *sums, int64_t sums_extent) {
    gmpo_status st = gmpo_check_sums(a, sums, sums_extent);
    if (st) return st;
    int nt = threads_for(a);
    int f64 = a->logp.dtype == GMPO_DT_F64;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
#endif
    for (int t = 0; t < nt; t++) {
        int64_t r0, r1;
        chunk(a->B, t, nt, &r0, &r1);
        if (a->algo == GMPO_ALGO_FAMILY) {
            if (f64) fam_rows_sums_d(a, r0, r1, sums);
            else fam_rows_sums_f(a, r0, r1, sums);
        } else if (f64) rows_sums_d(a, r0, r1, sums);
        else rows_sums_f(a, r0, r1, sums);
    }
    return GMPO_OK;
}

gmpo_status gmpo_cpu_finish_sums(gmpo_args *a, const double *sums, int64_t sums_extent,
                                 double *rows, void *out_loss, void *out_metrics,
                                 int32_t out_dtype) {
    gmpo_status st = gmpo_check_forward(a, rows, out_loss, out_metrics, out_dtype);
    if (st) return st;
    if ((st = gmpo_check_sums(a, sums, sums_extent))) return st;
    if (a->algo == GMPO_ALGO_FAMILY) {
        if (a->logp.dtype == GMPO_DT_F64) fam_rows_finish_sums_d(a, sums, rows);
        else fam_rows_finish_sums_f(a, sums, rows);
    }
    else if (a->logp.dtype == GMPO_DT_F64) rows_finish_sums_d(a, sums, rows);
    else rows_finish_sums_f(a, sums, rows);
    finish(a, rows, out_loss, out_metrics, out_dtype);
    return GMPO_OK;
}

// builds without the CUDA kernels: the CUDA entry points say so (weak on
// gcc/clang, as in logits_cpu.c: gmpo_loss.cu's definitions replace them)
#if !defined(GMPO_WITH_CUDA) || defined(__GNUC__)
#if defined(__GNUC__)
#define GMPO_WEAK __attribute__((weak))
#else
#define GMPO_WEAK
#endif
GMPO_WEAK gmpo_status gmpo_cuda_row_sums(gmpo_args *a, double *sums, int64_t sums_extent) {
    (void)sums; (void)sums_extent;
    snprintf(a->err, sizeof a->err, "gmpo_ext was built without its CUDA kernels");
    return GMPO_ENOTBUILT;
}
GMPO_WEAK gmpo_status gmpo_cuda_finish_sums(gmpo_args *a, const double *sums,
                                            int64_t sums_extent, double *rows, void *out_loss,
                                            void *out_metrics, int32_t out_dtype) {
    (void)sums; (void)sums_extent; (void)rows; (void)out_loss; (void)out_metrics;
    (void)out_dtype;
    snprintf(a->err, sizeof a->err, "gmpo_ext was built without its CUDA kernels");
    return GMPO_ENOTBUILT;
}
#endif
