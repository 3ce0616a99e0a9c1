/*
 * gmpo_hidden.h -- the C API of gmpo_ext's path from hidden states (the LM head
 * fused in): per-tile kernels that a caller runs between the GEMMs of
 * z = h W^T + b, so that the (N, V) logits never exist at once (GMPO,
 * arXiv 2507.20673; DESIGN.md sections 2b and 2c).
 *
 * The one primitive (DESIGN 2c): the FOLD of a vocabulary range [v0, v0 + vn)
 * of a token's logits into a mergeable state, and the MERGE of two states.
 * Token tiles fold their vocabulary tiles one after another into the same
 * state; vocab-parallel ranks fold their shard and merge states across
 * processes (max: all-reduce max, then the rescaled sums: all-reduce sum).
 *
 * Shapes use fixed letters: n tokens of a tile, vn vocabulary columns of the
 * tile, V the whole vocabulary, H the hidden size.
 *   tile:  (n, vn) row stride ld >= vn, unit stride on the vocabulary axis;
 *          y = h W^T + b of the tile's tokens and columns, fp32, bf16 or fp16
 *   ids:   (n,) int64 or int32, contiguous, each in [0, V)
 *   state: (n, GMPO_LSE_STATE) fp32, contiguous; see gmpo_lse_state below
 *   lse, entropy, logp, grad_logp, grad_entropy: (n,) fp32 contiguous
 *
 * Transform of a logit, in TRL's order (s logit_scale, c softcap, tau temperature):
 *   u = s * y;  z = c * tanh(u / c) if c > 0 else u;  x = z / tau
 * Per token: lse = log sum_v exp(x_v), logp = x_id - lse, H = lse - sum_v p_v x_v
 * with p_v = exp(x_v - lse). Backward, in place over the tile:
 *   dL/dx_v = G (1[v == id] - p_v) - Gh p_v (x_v - lse + H)
 *   dL/dy_v = dL/dx_v * s / tau * (1 - tanh^2(u_v / c))   (the factor is 1 without softcap)
 *
 * Every buffer comes with its extent: the number of elements addressable from
 * its pointer. Entry points check every extent, size, dtype code and id before
 * anything is read, and on failure return a status with a message naming the
 * argument in args->err; the library never exits.
 */
#ifndef GMPO_HIDDEN_H
#define GMPO_HIDDEN_H

#include <math.h>
#include <stdint.h>
#include "gmpo.h"
#include "gmpo_math.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The mergeable per-token state of a folded vocabulary range, fp32:
 *   [0] m    the largest x seen (-inf: nothing folded yet)
 *   [1] s    sum of exp(x - m)
 *   [2] w    sum of exp(x - m) (x - m)       (entropy term; 0 when not asked)
 *   [3] tgt  x of the token's id if the id lies in a folded range, else 0
 *            (so that merging sums it: exactly one range holds the id) */
#define GMPO_LSE_STATE 4

typedef struct {
    int64_t n;                /* tokens (rows of the tile) */
    int64_t vn;               /* columns of the tile */
    int64_t v0;               /* vocabulary id of the tile's first column */
    int64_t V;                /* the whole vocabulary: ids must lie in [0, V) */
    int64_t ld;               /* elements between tile rows, >= vn */
    int32_t dtype;            /* the tile's dtype: GMPO_DT_F32, _BF16 or _F16 */
    void *tile;               /* fold: read; grad: read, then overwritten in place */
    int64_t tile_extent;      /* elements addressable from tile */
    const void *ids;          /* (n,) int64 or int32 */
    int32_t ids_dtype;
    int64_t ids_extent;
    double logit_scale;       /* s, finite */
    double softcap;           /* c > 0, or 0: no softcap */
    double temperature;       /* tau > 0, finite */
    int32_t entropy;          /* fold: also accumulate w */
    int32_t num_threads;      /* CPU threads; <= 0: one */
    void *stream;             /* cudaStream_t for the CUDA entry points */
    char err[256];            /* filled on failure */
} gmpo_tile_args;

/* fold the tile into state (n x GMPO_LSE_STATE, in place; a fresh state is
 * gmpo_lse_init's: m = -inf, s = w = tgt = 0) */
gmpo_status gmpo_hidden_cpu_fold(gmpo_tile_args *a, float *state, int64_t state_extent);

/* the tile <- dL/dy (in the tile's dtype) from the finished lse and entropy and
 * the upstream gradients grad_logp G (may be NULL: 0) and grad_entropy Gh (may be
 * NULL: 0); a token with G = Gh = 0 gets a zero row without being read */
gmpo_status gmpo_hidden_cpu_grad(gmpo_tile_args *a, const float *lse, const float *entropy,
                                 const float *grad_logp, const float *grad_entropy,
                                 int64_t extent);

/* the same two on the GPU (device pointers, a->stream, no host sync); CUDA
 * builds check sizes and extents but not the ids' values (an id outside [0, V)
 * is never used as an address: its target logit stays 0, and logp is NaN) */
gmpo_status gmpo_hidden_cuda_fold(gmpo_tile_args *a, float *state, int64_t state_extent);
gmpo_status gmpo_hidden_cuda_grad(gmpo_tile_args *a, const float *lse, const float *entropy,
                                  const float *grad_logp, const float *grad_entropy,
                                  int64_t extent);

/* argument and extent checks of the tile kernels, shared by both backends */
gmpo_status gmpo_hidden_check_tile(gmpo_tile_args *a);

/* ----------------------------------------------------------------------------
 * scalar math shared by the C and CUDA kernels (GMPO_HD) */

/* tanh without libm, branch-free: odd polynomial near 0 (no cancellation),
 * (1 - e) / (1 + e) with e = exp(-2|a|) elsewhere; NaN stays NaN, +-inf -> +-1 */
GMPO_HD float gmpo_tanh_f(float a) {
    float aa = fabsf(a);
    float e = gmpo_exp_f(-2.0f * aa);
    float big = (1.0f - e) / (1.0f + e);
    float a2 = aa * aa;
    float small = aa * (1.0f + a2 * (-0.333333343f + a2 * (0.133333340f + a2 * -0.0539682549f)));
    float r = aa < 0.125f ? small : big;
    return copysignf(r, a);
}

/* x from a projected value y: s * y, softcap c (c > 0) and 1 / tau (inv_t) */
GMPO_HD float gmpo_head_x(float y, float s, float c, float inv_c, float inv_t, int softcap) {
    float u = y * s;
    return softcap ? c * gmpo_tanh_f(u * inv_c) * inv_t : u * inv_t;
}

/* a fresh state */
GMPO_HD void gmpo_lse_init(float *st) {
    st[0] = -INFINITY;
    st[1] = 0.0f;
    st[2] = 0.0f;
    st[3] = 0.0f;
}

/* NaN AND INFINITY: THE RULE SET. Every fold of logits into states follows it
 * (the C tile and logits kernels, the CUDA tile kernel, hidden.py's float64
 * torch fold); it is decided here, in the merge, which every fold's partial
 * states (a chunk, a thread, a tile, a rank) go through. The reference is
 * torch.log_softmax of the full logits, per token over x (the transformed
 * logits of the whole vocabulary):
 *   a NaN of either sign anywhere -> lse, logp and entropy NaN (log_softmax: NaN
 *                                    everywhere). A NaN with its sign bit set is
 *                                    what 0/0 and inf - inf give on x86.
 *   +inf anywhere                 -> lse, logp and entropy NaN (log_softmax: x -
 *                                    max is inf - inf = NaN for the whole row)
 *   a -inf logit                  -> probability 0: adds nothing to lse or to
 *                                    the entropy (p log p = 0), its gradient is 0
 *                                    (the gradient kernels give p = 0 a zero, never
 *                                    0 * -inf); logp = -inf where it is the target
 *   every logit -inf              -> lse -inf, logp and entropy NaN (-inf - -inf)
 * A softcap maps +-inf to +-c first (tanh): those tokens are finite.
 * In the state: m is NaN for a poisoned token (s = w = NaN too); m = -inf with
 * s = w = 0 for nothing but -inf seen; else m finite, at least the largest x
 * folded (a fold may sum at a larger m it already holds), and s >= 0. A fold may
 * hand the merge a partial state with m = +inf, or with a NaN sum s or w and a
 * finite m (a NaN the fold's max did not see: the C chunk max orders a sign-bit
 * NaN below -inf); the merge turns each into the poisoned state, on either side.
 * The target logit (tgt) is summed regardless: it only decides logp where the
 * rest is finite. */

/* 1 if a partial state carries a NaN or +inf logit (see the rule set above) */
GMPO_HD int gmpo_lse_poisoned(const float *st) {
    return !(st[0] < INFINITY) || st[1] != st[1] || st[2] != st[2];
}

/* add a side's (max m, sum of exp sm, entropy term wm) rescaled to the max M >= m
 * into (s, w); an empty side (sm = 0) adds 0. The side at M is added as it is:
 * what exp(0) = 1 would give, without an exp per merge. */
GMPO_HD void gmpo_lse_add_at(float m, float sm, float wm, float M, float *s, float *w) {
    if (!(sm > 0.0f))
        return;
    if (m == M) {
        *s += sm;
        *w += wm;
    } else {
        float d = m - M, c = expf(d);
        *s += c * sm;
        *w += c * (wm + d * sm);
    }
}

/* merge state b into a (commutative up to rounding; exact in the max) */
GMPO_HD void gmpo_lse_merge(float *a, const float *b) {
    if (gmpo_lse_poisoned(a) || gmpo_lse_poisoned(b)) {   // the rule set: NaN or +inf
        a[0] = a[1] = a[2] = NAN;
        a[3] += b[3];
        return;
    }
    float ma = a[0], mb = b[0];
    float M = ma > mb ? ma : mb;
    float s = 0.0f, w = 0.0f;
    if (M != -INFINITY) {                        // rescale each side to M; an empty side adds 0
        gmpo_lse_add_at(ma, a[1], a[2], M, &s, &w);
        gmpo_lse_add_at(mb, b[1], b[2], M, &s, &w);
    }
    a[0] = M;
    a[1] = s;
    a[2] = w;
    a[3] += b[3];
}

/* lse, logp and entropy of a finished state */
GMPO_HD void gmpo_lse_finish(const float *st, float *lse, float *logp, float *entropy) {
    float ls = logf(st[1]);
    *lse = st[0] + ls;
    *logp = st[3] - *lse;
    *entropy = ls - st[2] / st[1];
}

#ifdef __cplusplus
}
#endif

#endif /* GMPO_HIDDEN_H */
