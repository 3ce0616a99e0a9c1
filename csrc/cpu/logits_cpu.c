/*
 * logits_cpu.c -- the CPU kernels of gmpo_ext's fused path from logits (C11,
 * OpenMP over tokens): per-token log-probability, log-sum-exp and entropy of
 * the logits in one read of each row (forward), and the gradient with respect
 * to the logits in one read and one write of each row (backward). The GMPO
 * loss (arXiv 2507.20673) between the two runs on the per-token values.
 *
 *   forward : logits (B, TL, V), ids (B, T), mask (B, T) -> logp, entropy, lse (B, T) fp32
 *   backward: logits, ids, mask, lse, entropy, G = dL/dlogp, Gh = dL/dH (B, T)
 *             -> grad (B, TL, V) in the logits' dtype (possibly the logits' buffer)
 *
 * A row of logits is the hidden-state path's tile row with scale 1 and no
 * softcap (x = z / tau), and runs the same row loops (chunk_loops.h:
 * gmpo_cl_row_fold, gmpo_cl_row_grad): the row is processed GMPO_CL_CHUNK
 * elements at a time, converted to fp32 and divided by the temperature into a
 * buffer that stays in L1, then the vector loops (max, exp and sums; or exp and
 * gradient) run over it. Each chunk's state is merged into the row's with
 * gmpo_lse_merge (gmpo_hidden.h), which holds the one NaN / infinity rule set
 * of every fold; so each row is read from memory once per pass. Sums run in
 * fp32 vector lanes within a chunk and fp32 across chunks.
 *
 * The exp is gmpo_math.h's branchless polynomial (gmpo_exp_f) that gcc
 * vectorises at -O3; no fast-math: NaN propagates. On x86-64 gcc the chunk
 * loops are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA) and the
 * baseline, picked at load time (target_clones).
 */
#if defined(__GNUC__) && !defined(__clang__)
// FP exceptions are never trapped here: without this gcc will not if-convert
// the selects of the loops below; and a * b + c may become one fma where the
// instruction set has it (more accurate, not less). Neither is fast-math: NaN
// and inf propagate as IEEE says.
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
#endif
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include "../gmpo_hidden.h"   // the fold state and its merge
#include "../gmpo_logits.h"
#include "../gmpo_math.h"
#include "chunk_loops.h"   // the row and chunk loops shared with hidden_cpu.c

#define LG_CHUNK GMPO_CL_CHUNK
#define LG_ALIGN GMPO_CL_ALIGN

// the logits' transform: scale 1, no softcap, x = z * float(1 / tau)
static gmpo_cl_xf lg_transform(const gmpo_logits_args *a) {
    return gmpo_cl_transform(1.0, 0.0, a->temperature);
}

// ----------------------------------------------------------------------------
// argument checks and entry points

static gmpo_status lg_fail(gmpo_logits_args *a, const char *msg) {
    snprintf(a->err, sizeof a->err, "%s", msg);
    return GMPO_EINVAL;
}

static size_t lg_esize(int32_t dt) { return dt == GMPO_DT_F32 ? 4 : 2; }

// every element of a (B, T) view (strides may be 0) inside its extent
static int lg_view_fits(const gmpo_logits_args *a, const gmpo_view *v) {
    const int64_t sizes[2] = {a->B, a->T};
    const int64_t strides[2] = {v->stride_b, v->stride_t};
    return gmpo_span_fits(2, sizes, strides, v->extent);
}

gmpo_status gmpo_logits_check_args(gmpo_logits_args *a) {
    a->err[0] = 0;
    a->bad_id = 0;
    if (!a->ids_name[0]) snprintf(a->ids_name, sizeof a->ids_name, "ids");
    if (a->B < 0 || a->T < 0) return lg_fail(a, "logits: negative size");
    if (a->TL != a->T && a->TL != a->T + 1)
        return lg_fail(a, "logits: must have T or T + 1 positions for (B, T) ids");
    if (a->V < 1) return lg_fail(a, "logits: the vocabulary axis is empty");
    if (a->logits.dtype != GMPO_DT_F32 && a->logits.dtype != GMPO_DT_BF16 &&
        a->logits.dtype != GMPO_DT_F16)
        return lg_fail(a, "logits: must be float32, bfloat16 or float16");
    if (a->ids.dtype != GMPO_DT_I64 && a->ids.dtype != GMPO_DT_I32) {
        snprintf(a->err, sizeof a->err, "%s: must be an int64 or int32 tensor", a->ids_name);
        return GMPO_EINVAL;
    }
    if (a->mask.data && (a->mask.dtype <= GMPO_DT_NONE || a->mask.dtype > GMPO_DT_I64))
        return lg_fail(a, "mask: unsupported dtype code");
    if (!(a->temperature > 0.0) || isinf(a->temperature))
        return lg_fail(a, "temperature: must be a finite number > 0");
    if (a->B * a->TL > 0 && (!a->logits.data || (a->B * a->T > 0 && !a->ids.data)))
        return lg_fail(a, "logits: missing data pointer");
    {
        const int64_t sizes[3] = {a->B, a->TL, a->V};
        const int64_t strides[3] = {a->logits.stride_b, a->logits.stride_t, 1};
        if (a->logits.data && !gmpo_span_fits(3, sizes, strides, a->logits.extent))
            return lg_fail(a, "logits: its shape and strides address memory outside the tensor");
    }
    if (a->ids.data && !lg_view_fits(a, &a->ids)) {
        snprintf(a->err, sizeof a->err, "%s: its shape and strides address memory outside the "
                 "tensor (fewer elements than (B, T))", a->ids_name);
        return GMPO_EINVAL;
    }
    if (a->vocab_total < 0 || a->vocab_start < 0 ||
        (a->vocab_total > 0 && a->vocab_start > a->vocab_total - a->V))
        return lg_fail(a, "vocab_start: the shard [vocab_start, vocab_start + V) must lie in "
                          "[0, vocab_total)");
    if (a->vocab_total == 0 && a->vocab_start != 0)
        return lg_fail(a, "vocab_start: must be 0 without a vocab_total");
    if (a->mask.data && !lg_view_fits(a, &a->mask))
        return lg_fail(a, "mask: its shape and strides address memory outside the tensor "
                          "(fewer elements than (B, T))");
    return GMPO_OK;
}

// a (B, T) fp32 buffer of `extent` elements: present and big enough
static gmpo_status lg_buffer(gmpo_logits_args *a, const float *p, int64_t extent, const char *msg) {
    if (!p || extent < a->B * a->T) return lg_fail(a, msg);
    return GMPO_OK;
}

gmpo_status gmpo_logits_check_forward(gmpo_logits_args *a, const float *logp,
                                      const float *entropy, const float *lse) {
    gmpo_status st = gmpo_logits_check_args(a);
    if (st || a->B * a->T == 0) return st;
    if ((st = lg_buffer(a, logp, a->logp_extent, "logp: missing or too small an output buffer")))
        return st;
    if ((st = lg_buffer(a, lse, a->lse_extent, "lse: missing or too small an output buffer")))
        return st;
    if (entropy)
        return lg_buffer(a, entropy, a->entropy_extent,
                         "entropy: too small an output buffer");
    return GMPO_OK;
}

gmpo_status gmpo_logits_check_backward(gmpo_logits_args *a, const float *lse,
                                       const float *entropy, gmpo_view grad_logp,
                                       gmpo_view grad_entropy, gmpo_view grad) {
    gmpo_status st = gmpo_logits_check_args(a);
    if (st || a->B * a->TL == 0) return st;
    if (!grad.data || grad.dtype != a->logits.dtype)
        return lg_fail(a, "grad: missing, or not of the logits' dtype");
    {
        const int64_t sizes[3] = {a->B, a->TL, a->V};
        const int64_t strides[3] = {grad.stride_b, grad.stride_t, 1};
        if (!gmpo_span_fits(3, sizes, strides, grad.extent))
            return lg_fail(a, "grad: its shape and strides address memory outside the buffer");
        // rows written concurrently must not share memory (an expanded or
        // as_strided buffer written in place would race with itself)
        if (!gmpo_span_disjoint(3, sizes, strides))
            return lg_fail(a, "grad: its positions overlap in memory (an expanded or "
                              "as_strided tensor cannot receive the gradient in place)");
    }
    if ((grad_logp.data && !gmpo_dtype_is_float(grad_logp.dtype)) ||
        (grad_entropy.data && !gmpo_dtype_is_float(grad_entropy.dtype)))
        return lg_fail(a, "grad_output: must be floating-point tensors");
    if (grad_logp.data && !lg_view_fits(a, &grad_logp))
        return lg_fail(a, "grad_logp: its shape and strides address memory outside the tensor");
    if (grad_entropy.data && !lg_view_fits(a, &grad_entropy))
        return lg_fail(a, "grad_entropy: its shape and strides address memory outside the tensor");
    if (a->B * a->T == 0) return GMPO_OK;
    if ((st = lg_buffer(a, lse, a->lse_extent, "lse: missing or too small a saved buffer")))
        return st;
    if (grad_entropy.data)
        return lg_buffer(a, entropy, a->entropy_extent,
                         "entropy: missing or too small a saved buffer");
    return GMPO_OK;
}

static int64_t lg_id(const gmpo_logits_args *a, int64_t b, int64_t t) {
    int64_t k = b * a->ids.stride_b + t * a->ids.stride_t;
    return a->ids.dtype == GMPO_DT_I64 ? ((const int64_t *)a->ids.data)[k]
                                       : (int64_t)((const int32_t *)a->ids.data)[k];
}

static int lg_counts(const gmpo_logits_args *a, int64_t b, int64_t t) {
    if (!a->mask.data) return 1;
    return gmpo_load_f(a->mask.data, a->mask.dtype, b * a->mask.stride_b + t * a->mask.stride_t) != 0.0f;
}

// every id of a token that counts must lie in [0, V): checked before any compute
static gmpo_status lg_check_ids(gmpo_logits_args *a) {
    for (int64_t b = 0; b < a->B; b++)
        for (int64_t t = 0; t < a->T; t++) {
            int64_t id = lg_id(a, b, t);
            int64_t vtot = a->vocab_total > 0 ? a->vocab_total : a->V;
            if ((id < 0 || id >= vtot) && lg_counts(a, b, t)) {
                a->bad_id = 1;
                snprintf(a->err, sizeof a->err,
                         "%s: token id %lld at [%lld, %lld] is outside [0, %lld), the "
                         "vocabulary of the logits", a->ids_name, (long long)id,
                         (long long)b, (long long)t, (long long)vtot);
                return GMPO_EINVAL;
            }
        }
    return GMPO_OK;
}

static int lg_threads(const gmpo_logits_args *a, int64_t rows) {
    if (a->num_threads <= 1 || rows < 2) return 1;
    return rows < a->num_threads ? (int)rows : a->num_threads;
}

gmpo_status gmpo_logits_cpu_forward(gmpo_logits_args *a, float *logp, float *entropy,
                                    float *lse) {
    gmpo_status st = gmpo_logits_check_forward(a, logp, entropy, lse);
    if (st) return st;
    const int64_t T = a->T, rows = a->B * a->T;
    if (rows == 0) return GMPO_OK;
    if ((st = lg_check_ids(a))) return st;
    const gmpo_cl_xf f = lg_transform(a);
    const int32_t dt = a->logits.dtype;
    const size_t es = lg_esize(dt);
    const int ent = entropy != NULL;
    int nt = lg_threads(a, rows);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        float buf[LG_CHUNK] LG_ALIGN;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
        for (int64_t r = 0; r < rows; r++) {
            int64_t b = r / T, t = r % T;
            if (!lg_counts(a, b, t)) {
                logp[r] = lse[r] = 0.0f;
                if (ent) entropy[r] = 0.0f;
                continue;
            }
            const char *row = (const char *)a->logits.data +
                              (size_t)(b * a->logits.stride_b + t * a->logits.stride_t) * es;
            float st[GMPO_LSE_STATE], l, lp, h;
            gmpo_lse_init(st);
            // a shard's target may lie on another rank: its column is then outside
            // [0, V) and the state's target stays 0 (unused: logp is merged later)
            gmpo_cl_row_fold(row, dt, a->V, f, ent, lg_id(a, b, t) - a->vocab_start, buf, st);
            gmpo_lse_finish(st, &l, &lp, &h);
            if (ent) entropy[r] = h;
            if (a->vocab_total > 0) {   // a shard's state: its max and log-sum apart
                lse[r] = st[0];
                logp[r] = logf(st[1]);   // log sum exp(x - max); all -inf: -inf
                continue;
            }
            logp[r] = lp;
            lse[r] = l;
        }
    }
    (void)nt;
    return GMPO_OK;
}

gmpo_status gmpo_logits_cpu_backward(gmpo_logits_args *a, const float *lse,
                                     const float *entropy, gmpo_view grad_logp,
                                     gmpo_view grad_entropy, gmpo_view grad) {
    gmpo_status st = gmpo_logits_check_backward(a, lse, entropy, grad_logp, grad_entropy, grad);
    if (st) return st;
    const int64_t T = a->T, TL = a->TL, rows = a->B * a->TL;
    if (rows == 0) return GMPO_OK;
    const gmpo_cl_xf f = lg_transform(a);
    const int32_t dt = a->logits.dtype;
    const size_t es = lg_esize(dt);
    int nt = lg_threads(a, rows);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        float buf[LG_CHUNK] LG_ALIGN;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
        for (int64_t r = 0; r < rows; r++) {
            int64_t b = r / TL, t = r % TL;
            char *grow = (char *)grad.data + (size_t)(b * grad.stride_b + t * grad.stride_t) * es;
            float G = 0.0f, Gh = 0.0f;
            if (t < T && lg_counts(a, b, t)) {
                if (grad_logp.data)
                    G = gmpo_load_f(grad_logp.data, grad_logp.dtype,
                                    b * grad_logp.stride_b + t * grad_logp.stride_t);
                if (grad_entropy.data)
                    Gh = gmpo_load_f(grad_entropy.data, grad_entropy.dtype,
                                     b * grad_entropy.stride_b + t * grad_entropy.stride_t);
            }
            if (G == 0.0f && Gh == 0.0f) {        // masked, ignored or no gradient: not read
                memset(grow, 0, (size_t)a->V * es);
                continue;
            }
            const char *row = (const char *)a->logits.data +
                              (size_t)(b * a->logits.stride_b + t * a->logits.stride_t) * es;
            int64_t k = b * T + t;
            gmpo_cl_row_grad(row, grow, dt, a->V, f, lg_id(a, b, t) - a->vocab_start, lse[k],
                             G, Gh, grad_entropy.data ? entropy[k] : 0.0f, buf,
                             NULL);   // an id outside the shard [0, V): no one-hot term
        }
    }
    (void)nt;
    return GMPO_OK;
}

// ----------------------------------------------------------------------------
// builds without the CUDA kernels: the CUDA entry points say so. Where
// csrc/cuda/logits_cuda.cu is linked, its definitions replace these (weak on
// gcc/clang: a build whose .cu set lacks that file still links and imports, and
// an object of this file left over from a CPU-only build never clashes).

#if !defined(GMPO_WITH_CUDA) || defined(__GNUC__)
#if defined(__GNUC__)
#define LG_WEAK __attribute__((weak))
#else
#define LG_WEAK
#endif
LG_WEAK gmpo_status gmpo_logits_cuda_forward(gmpo_logits_args *a, float *logp, float *entropy,
                                             float *lse) {
    (void)logp; (void)entropy; (void)lse;
    snprintf(a->err, sizeof a->err, "gmpo_ext was built without its CUDA logits kernels");
    return GMPO_ENOTBUILT;
}
LG_WEAK gmpo_status gmpo_logits_cuda_backward(gmpo_logits_args *a, const float *lse,
                                              const float *entropy, gmpo_view grad_logp,
                                              gmpo_view grad_entropy, gmpo_view grad) {
    (void)lse; (void)entropy; (void)grad_logp; (void)grad_entropy; (void)grad;
    snprintf(a->err, sizeof a->err, "gmpo_ext was built without its CUDA logits kernels");
    return GMPO_ENOTBUILT;
}
#endif
