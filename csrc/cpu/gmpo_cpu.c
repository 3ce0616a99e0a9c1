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

static void forward_rows(const gmpo_args *a, double *rows) {
    int nt = threads_for(a);
    int f64 = a->logp.dtype == GMPO_DT_F64;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
#endif
    for (int t = 0; t < nt; t++) {
        int64_t r0, r1;
        chunk(a->B, t, nt, &r0, &r1);
        if (f64) rows_forward_d(a, r0, r1, rows);
        else rows_forward_f(a, r0, r1, rows);
    }
}

static void backward_rows(const gmpo_args *a, const double *rows, double go, void *grad,
                          int32_t gdt) {
    int nt = threads_for(a);
    int f64 = a->logp.dtype == GMPO_DT_F64;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
#endif
    for (int t = 0; t < nt; t++) {
        int64_t r0, r1;
        chunk(a->B, t, nt, &r0, &r1);
        if (f64) rows_backward_d(a, r0, r1, rows, go, grad, gdt);
        else rows_backward_f(a, r0, r1, rows, go, grad, gdt);
    }
}

// ----------------------------------------------------------------------------
// entry points

gmpo_status gmpo_cpu_forward(gmpo_args *a, double *rows, void *out_loss,
                             void *out_metrics, int32_t out_dtype) {
    gmpo_status st = gmpo_check_forward(a, rows, out_loss, out_metrics, out_dtype);
    if (st) return st;
    forward_rows(a, rows);

    double *tot = rows + a->B * GMPO_ROW_STATS;
    gmpo_totals_init(tot);
    for (int64_t i = 0; i < a->B; i++) gmpo_totals_add_row(tot, rows + i * GMPO_ROW_STATS);
    gmpo_totals_close(tot);
    double out[GMPO_METRICS + 1];
    gmpo_finish_totals(a, tot, out);
    gmpo_store_d(out_loss, out_dtype, 0, out[0]);
    for (int k = 0; k < GMPO_METRICS; k++) gmpo_store_d(out_metrics, out_dtype, k, out[k + 1]);
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
