/*
 * hidden_cpu.c -- the CPU tile kernels of gmpo_ext's path from hidden states
 * (C11, OpenMP over the tile's tokens), with the entry points of
 * csrc/gmpo_hidden.h. The caller (gmpo_ext/hidden.py) runs the GEMMs of the LM
 * head (torch: MKL / oneDNN) tile by tile; these kernels do the rest:
 *
 *   fold: tile (n, vn) of y = h W^T + b, ids (n,) -> state (n, 4) updated in place:
 *         each token's vocabulary range folded into (max, sum exp, entropy term,
 *         target logit) and merged into what earlier tiles left there
 *   grad: tile (n, vn), lse, entropy, G, Gh (n,) -> the tile overwritten with
 *         dL/dy, the gradient the dH = dy W and dW += dy^T h GEMMs take
 *
 * The row loops are chunk_loops.h's (gmpo_cl_row_fold, gmpo_cl_row_grad), the
 * same ones the logits kernels run: each row of the tile is processed
 * GMPO_CL_CHUNK columns at a time, converted to fp32 and transformed (scale,
 * softcap, 1/tau) into a buffer that stays in L1, and the vector loops (max;
 * exp and sums; or exp and gradient) run over it. A chunk's sums are a state
 * of their own, merged into the row's with gmpo_lse_merge (gmpo_hidden.h, the
 * NaN / infinity rule set): chunks, tiles and vocab-parallel ranks combine the
 * same way. Sums run in fp32 vector lanes within a chunk, fp32 across chunks.
 *
 * The exp is gmpo_math.h's branch-free polynomial (gmpo_exp_f), the tanh of
 * the softcap gmpo_hidden.h's; gcc vectorises both at -O3. No fast-math: NaN
 * propagates. On x86-64 gcc the chunk loops are compiled for x86-64-v4
 * (AVX-512), x86-64-v3 (AVX2, FMA) and the baseline, picked at load time.
 */
#if defined(__GNUC__) && !defined(__clang__)
// FP exceptions are never trapped: gcc may if-convert the selects below, and
// a * b + c may become one fma (more accurate, not less). Not fast-math.
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
#endif
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include "../gmpo_hidden.h"
#include "chunk_loops.h"   // the row and chunk loops shared with logits_cpu.c

#define HD_CHUNK GMPO_CL_CHUNK
#define HD_ALIGN GMPO_CL_ALIGN

static gmpo_cl_xf hd_transform(const gmpo_tile_args *a) {
    return gmpo_cl_transform(a->logit_scale, a->softcap, a->temperature);
}

// ----------------------------------------------------------------------------
// row kernels

static int64_t hd_id(const gmpo_tile_args *a, int64_t r) {
    return a->ids_dtype == GMPO_DT_I64 ? ((const int64_t *)a->ids)[r]
                                       : (int64_t)((const int32_t *)a->ids)[r];
}

// ----------------------------------------------------------------------------
// checks and entry points

static gmpo_status hd_fail(gmpo_tile_args *a, const char *msg) {
    snprintf(a->err, sizeof a->err, "%s", msg);
    return GMPO_EINVAL;
}

gmpo_status gmpo_hidden_check_tile(gmpo_tile_args *a) {
    a->err[0] = 0;
    if (a->n < 0 || a->vn < 0 || a->v0 < 0 || a->V < 1)
        return hd_fail(a, "tile: negative size or an empty vocabulary");
    if (a->v0 > a->V || a->vn > a->V - a->v0)
        return hd_fail(a, "tile: the vocabulary range [v0, v0 + vn) is outside [0, V)");
    if (a->dtype != GMPO_DT_F32 && a->dtype != GMPO_DT_BF16 && a->dtype != GMPO_DT_F16)
        return hd_fail(a, "tile: must be float32, bfloat16 or float16");
    if (a->ids_dtype != GMPO_DT_I64 && a->ids_dtype != GMPO_DT_I32)
        return hd_fail(a, "ids: must be an int64 or int32 tensor");
    if (!(a->temperature > 0.0) || isinf(a->temperature))
        return hd_fail(a, "temperature: must be a finite number > 0");
    if (!(fabs(a->logit_scale) < INFINITY))
        return hd_fail(a, "logit_scale: must be finite");
    if (!(a->softcap >= 0.0) || isinf(a->softcap))
        return hd_fail(a, "final_logit_softcapping: must be a finite number > 0 (0: none)");
    if (a->n == 0 || a->vn == 0) return GMPO_OK;
    if (a->ld < a->vn) return hd_fail(a, "tile: the row stride ld is smaller than vn");
    // the last element read is (n - 1) * ld + vn - 1: no overflow since ld, n < 2^62 / ...
    if (a->n - 1 > (INT64_MAX - a->vn) / a->ld ||
        (a->n - 1) * a->ld + a->vn > a->tile_extent || !a->tile)
        return hd_fail(a, "tile: its extent is smaller than (n - 1) * ld + vn elements");
    if (!a->ids || a->ids_extent < a->n)
        return hd_fail(a, "ids: its extent is smaller than the n tokens of the tile");
    return GMPO_OK;
}

// every id in [0, V), checked before any compute
static gmpo_status hd_check_ids(gmpo_tile_args *a) {
    for (int64_t r = 0; r < a->n; r++) {
        int64_t id = hd_id(a, r);
        if (id < 0 || id >= a->V) {
            snprintf(a->err, sizeof a->err, "ids: token id %lld at %lld is outside [0, %lld), "
                     "the vocabulary of the weight", (long long)id, (long long)r, (long long)a->V);
            return GMPO_EINVAL;
        }
    }
    return GMPO_OK;
}

static int hd_threads(const gmpo_tile_args *a) {
    if (a->num_threads <= 1 || a->n < 2) return 1;
    return a->n < a->num_threads ? (int)a->n : a->num_threads;
}

static size_t hd_esize(int32_t dt) { return dt == GMPO_DT_F32 ? 4 : 2; }

gmpo_status gmpo_hidden_cpu_fold(gmpo_tile_args *a, float *state, int64_t state_extent) {
    gmpo_status st = gmpo_hidden_check_tile(a);
    if (st) return st;
    if (a->n == 0) return GMPO_OK;
    if (!state || state_extent / GMPO_LSE_STATE < a->n)
        return hd_fail(a, "state: its extent is smaller than n x 4 floats");
    if (a->vn == 0) return GMPO_OK;
    if ((st = hd_check_ids(a))) return st;
    const gmpo_cl_xf f = hd_transform(a);
    const size_t es = hd_esize(a->dtype);
    int nt = hd_threads(a);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        float buf[HD_CHUNK] HD_ALIGN;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < a->n; r++) {
            const char *row = (const char *)a->tile + (size_t)(r * a->ld) * es;
            gmpo_cl_row_fold(row, a->dtype, a->vn, f, a->entropy, hd_id(a, r) - a->v0, buf,
                             state + r * GMPO_LSE_STATE);
        }
    }
    (void)nt;
    return GMPO_OK;
}

gmpo_status gmpo_hidden_cpu_grad(gmpo_tile_args *a, const float *lse, const float *entropy,
                                 const float *grad_logp, const float *grad_entropy,
                                 int64_t extent) {
    gmpo_status st = gmpo_hidden_check_tile(a);
    if (st) return st;
    if (a->n == 0 || a->vn == 0) return GMPO_OK;
    if (!lse || extent < a->n)
        return hd_fail(a, "lse: missing, or its extent is smaller than the n tokens");
    if (grad_entropy && !entropy)
        return hd_fail(a, "entropy: needed (the forward's) when grad_entropy is given");
    if ((st = hd_check_ids(a))) return st;
    const gmpo_cl_xf f = hd_transform(a);
    const size_t es = hd_esize(a->dtype);
    int nt = hd_threads(a);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        float buf[HD_CHUNK] HD_ALIGN, kbuf[HD_CHUNK] HD_ALIGN;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < a->n; r++) {
            char *row = (char *)a->tile + (size_t)(r * a->ld) * es;
            float G = grad_logp ? grad_logp[r] : 0.0f;
            float Gh = grad_entropy ? grad_entropy[r] : 0.0f;
            if (G == 0.0f && Gh == 0.0f) {      // no gradient: a zero row, not read
                memset(row, 0, (size_t)a->vn * es);
                continue;
            }
            gmpo_cl_row_grad(row, row, a->dtype, a->vn, f, hd_id(a, r) - a->v0, lse[r], G, Gh,
                             grad_entropy ? entropy[r] : 0.0f, buf, kbuf);
        }
    }
    (void)nt;
    return GMPO_OK;
}

// ----------------------------------------------------------------------------
// builds without the CUDA kernels: the CUDA entry points say so (weak on gcc /
// clang, so that csrc/cuda/hidden_cuda.cu's definitions replace them)

#if !defined(GMPO_WITH_CUDA) || defined(__GNUC__)
#if defined(__GNUC__)
#define HD_WEAK __attribute__((weak))
#else
#define HD_WEAK
#endif
HD_WEAK gmpo_status gmpo_hidden_cuda_fold(gmpo_tile_args *a, float *state, int64_t state_extent) {
    (void)state; (void)state_extent;
    snprintf(a->err, sizeof a->err, "gmpo_ext was built without its CUDA hidden-state kernels");
    return GMPO_ENOTBUILT;
}
HD_WEAK gmpo_status gmpo_hidden_cuda_grad(gmpo_tile_args *a, const float *lse,
                                          const float *entropy, const float *grad_logp,
                                          const float *grad_entropy, int64_t extent) {
    (void)lse; (void)entropy; (void)grad_logp; (void)grad_entropy; (void)extent;
    snprintf(a->err, sizeof a->err, "gmpo_ext was built without its CUDA hidden-state kernels");
    return GMPO_ENOTBUILT;
}
#endif
