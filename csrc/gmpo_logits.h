/*
 * gmpo_logits.h -- the C API of gmpo_ext's fused kernels from logits: per-token
 * log-probabilities, log-sum-exp and entropy of a (B, T, V) logits tensor in one
 * read (forward), and the gradient with respect to the logits in one read and
 * one write (backward). The GMPO loss itself (arXiv 2507.20673) runs on the
 * per-token values with the kernels of gmpo.h; autograd chains the two.
 *
 * Shapes use fixed letters: B rows (sequences), T tokens, V vocabulary.
 *   logits: (B, TL, V) with TL = T (aligned) or T + 1 (the causal LM's output
 *           with logits_to_keep = T + 1: position T is ignored in forward and
 *           gets a zero gradient row); unit stride on V, any stride_b, stride_t;
 *           fp32, bf16 or fp16
 *   ids:    (B, T) int64 or int32, the sampled token of each position
 *   mask:   (B, T) any dtype, optional; a token with mask == 0 is skipped
 *   logp, entropy, lse: (B, T) contiguous fp32, written by forward
 *   grad:   (B, TL, V) in the logits' dtype, unit stride on V; may be the
 *           logits' own buffer (in-place backward)
 *
 * Per token, with x = z / tau:
 *   lse = log sum_v exp(x_v),  logp = x_id - lse,  H = lse - sum_v p_v x_v
 *   dz_v = ( G (1[v == id] - p_v) - Gh p_v (x_v - lse + H) ) / tau
 * G = d loss / d logp, Gh = d loss / d H (optional), p_v = exp(x_v - lse).
 *
 * A masked token (mask == 0) is never read: forward writes 0 for its values and
 * backward writes a zero gradient row, as it does for a token whose upstream
 * gradients are both exactly 0 and for the ignored position T.
 *
 * Ids outside [0, V) of tokens that are not masked: the CPU entry points check
 * every id before any compute and fail with GMPO_EINVAL and bad_id set (the
 * module raises IndexError). The CUDA entry points never read out of bounds:
 * forward writes NaN as the token's logp; backward writes the -G p term only.
 */
#ifndef GMPO_LOGITS_H
#define GMPO_LOGITS_H

#include <stdint.h>
#include "gmpo.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t B, T;             /* ids, mask, logp...: (B, T) */
    int64_t TL;               /* positions in logits: T or T + 1 */
    int64_t V;                /* vocabulary size, 1 <= V */
    gmpo_view logits;         /* stride_b, stride_t in elements; V contiguous */
    gmpo_view ids;            /* int64 or int32 */
    gmpo_view mask;           /* data NULL: every token counts */
    /* extents (elements available) of the (B, T) fp32 buffers passed beside the
     * args: forward's outputs, backward's saved inputs; B * T needed for each
     * present one. Every view's extent is in the view. */
    int64_t logp_extent, entropy_extent, lse_extent;
    double temperature;       /* tau > 0 */
    int32_t num_threads;      /* CPU threads; <= 0: one */
    void *stream;             /* cudaStream_t for the CUDA entry points */
    int32_t bad_id;           /* out: 1 when the failure is an id outside [0, V) */
    char ids_name[32];        /* the ids argument's name for messages */
    char err[256];            /* filled on failure */
    /* The vocabulary split over processes (tensor parallelism): when
     * vocab_total > 0 the logits hold entries [vocab_start, vocab_start + V) of
     * a vocabulary of vocab_total, ids are global (checked against
     * [0, vocab_total)), and forward writes the shard's mergeable state instead
     * of the finished values: lse = the shard's max of x = z / tau, logp = log
     * sum exp(x - that max) over the shard (kept apart so that merging loses no
     * precision to a large lse), entropy = the entropy of the shard's own
     * softmax; the target's logit is read by the caller (one value per token,
     * on the rank whose shard holds the id). The caller merges the states
     * over the processes (gmpo_ext/distributed.py) into the global lse and H,
     * which backward then takes with the shard's logits: its gradient is exact
     * for the shard (the one-hot term only where id lies in it). vocab_total 0:
     * the whole vocabulary, as before. */
    int64_t vocab_start;
    int64_t vocab_total;
} gmpo_logits_args;

/* Forward: logp, lse (required) and entropy (NULL: not computed), each (B, T)
 * contiguous fp32. */
gmpo_status gmpo_logits_cpu_forward(gmpo_logits_args *a, float *logp, float *entropy,
                                    float *lse);

/* Backward: grad (B, TL, V) described by grad_view (data, dtype = the logits'
 * dtype, stride_b, stride_t) from grad_logp (B, T) and grad_entropy (B, T; data
 * NULL: zero), both any float dtype with any strides (0 allowed), and the
 * forward's lse and entropy (needed when grad_entropy is present). */
gmpo_status gmpo_logits_cpu_backward(gmpo_logits_args *a, const float *lse,
                                     const float *entropy, gmpo_view grad_logp,
                                     gmpo_view grad_entropy, gmpo_view grad);

/* The same on the GPU: device pointers, launched on a->stream, no host
 * synchronisation. GMPO_ENOTBUILT when built without the CUDA kernels. */
gmpo_status gmpo_logits_cuda_forward(gmpo_logits_args *a, float *logp, float *entropy,
                                     float *lse);
gmpo_status gmpo_logits_cuda_backward(gmpo_logits_args *a, const float *lse,
                                      const float *entropy, gmpo_view grad_logp,
                                      gmpo_view grad_entropy, gmpo_view grad);

/* Argument checks shared by both backends (dtype codes, sizes, extents,
 * temperature); the forward / backward ones add the checks of their buffers. */
gmpo_status gmpo_logits_check_args(gmpo_logits_args *a);
gmpo_status gmpo_logits_check_forward(gmpo_logits_args *a, const float *logp,
                                      const float *entropy, const float *lse);
gmpo_status gmpo_logits_check_backward(gmpo_logits_args *a, const float *lse,
                                       const float *entropy, gmpo_view grad_logp,
                                       gmpo_view grad_entropy, gmpo_view grad);

#ifdef __cplusplus
}
#endif

#endif /* GMPO_LOGITS_H */
