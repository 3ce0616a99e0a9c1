/*
 * gmpo.h -- the C API of gmpo_ext: argument structs, status codes, CPU and CUDA
 * entry points for the fused GMPO loss (Geometric-Mean Policy Optimization,
 * arXiv 2507.20673), the GRPO baseline loss and TRL's whole GRPO family
 * (GMPO_ALGO_FAMILY: eight loss types, token or sequence level, with the
 * options of TRL's GRPOConfig), forward and backward.
 *
 * Shapes use fixed letters: B rows (sequences), T tokens per row.
 *   logp, old_logp, ref_logp, mask: (B,T)
 *   adv: (B,) or (B,T)         is_w: (B,) or (B,T)
 *   samp_logp, tok_mask: (B,T) (the family only)
 *   rows: (B+1, GMPO_ROW_STATS) fp64, written by forward, read by backward;
 *         row B holds the batch totals (sums of each statistic, max of mu)
 *   grad: (B,T) contiguous, in logp's dtype
 *
 * Every tensor is described by a gmpo_view: a data pointer, a dtype code,
 * element strides and its extent, so no caller ever has to copy a strided
 * tensor. A per-row tensor (B,) has stride_t == 0.
 *
 * Defence in depth: the extent of every buffer (the number of elements that
 * may be read or written from its pointer on) travels with it, and the entry
 * points check, before any access, that every element the shapes and strides
 * address lies inside it (GMPO_EINVAL naming the argument otherwise). The
 * Python layer validates first; these checks make a mistake there, or a
 * caller of the C API, an error instead of an out-of-bounds access.
 *
 * The library never exits the process: every entry point returns a gmpo_status
 * and, on failure, leaves a message naming the bad argument in args->err.
 * This header is plain C11 and CUDA C; it includes no Python or libtorch header.
 */
#ifndef GMPO_H
#define GMPO_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    GMPO_OK = 0,
    GMPO_EINVAL = 1,      /* a bad argument; args->err names it */
    GMPO_ENOMEM = 2,
    GMPO_ECUDA = 3,       /* a CUDA runtime error; args->err has its string */
    GMPO_ENOTBUILT = 4,   /* the CUDA kernels were not compiled into this build */
} gmpo_status;

/* dtype codes: the Python layer maps torch dtypes onto these */
typedef enum {
    GMPO_DT_NONE = 0,     /* absent optional tensor */
    GMPO_DT_F32 = 1,
    GMPO_DT_F64 = 2,
    GMPO_DT_F16 = 3,
    GMPO_DT_BF16 = 4,
    GMPO_DT_BOOL = 5,
    GMPO_DT_U8 = 6,
    GMPO_DT_I8 = 7,
    GMPO_DT_I32 = 8,
    GMPO_DT_I64 = 9,
} gmpo_dtype;

typedef enum { GMPO_CONV_TRL = 0, GMPO_CONV_VERL = 1 } gmpo_convention;

typedef enum {
    GMPO_ALGO_GMPO = 0,   /* geometric mean of clipped token ratios per row */
    GMPO_ALGO_GRPO = 1,   /* arithmetic-mean PPO-clip surrogate, TRL loss types */
    GMPO_ALGO_FAMILY = 2, /* TRL's GRPO family with its options (gmpo_family below):
                             every loss type, token or sequence level, delta, the
                             off-policy mask, the bias-corrected KL, token_mask */
} gmpo_algo;

typedef enum {
    GMPO_LT_GRPO = 0,     /* per-row token mean, then mean over rows */
    GMPO_LT_BNPO = 1,     /* sum / sum of mask */
    GMPO_LT_DR_GRPO = 2,  /* sum / (B * max_completion_length) */
    GMPO_LT_DAPO = 3,     /* sum / num_items_in_batch */
    /* GMPO_ALGO_FAMILY only: */
    GMPO_LT_CISPO = 4,    /* -sg(min(coef, eps_high)) A logp; normalised like dapo */
    GMPO_LT_SAPO = 5,     /* -(4/tau) sigmoid(tau (coef - 1)) A; normalised like grpo */
    GMPO_LT_LUSPO = 6,    /* the clip surrogate; mean over rows of the row's sum */
    GMPO_LT_VESPO = 7,    /* -sg(phi(w_seq)) A logp; normalised like dapo */
} gmpo_loss_type;

/* The options of GMPO_ALGO_FAMILY (TRL 1.16's GRPOConfig), plain values. */
typedef struct {
    int32_t seq_level;        /* importance_sampling_level: 0 token, 1 sequence */
    int32_t has_delta;        /* delta given: coef_1 clamped at max=delta (clip types) */
    int32_t off_policy;       /* off_policy_mask_threshold given (needs samp_logp) */
    int32_t bias_corr_kl;     /* use_bias_correction_kl: k3 times coef_1 */
    double delta, off_policy_threshold;
    double sapo_tpos, sapo_tneg;                    /* sapo temperatures */
    double vespo_kpos, vespo_lpos, vespo_kneg, vespo_lneg;   /* vespo k, lambda */
    /* convention GMPO_CONV_VERL (verl's core_algos policy losses: loss_type
     * GRPO = vanilla, GRPO at sequence level = gspo, CISPO, SAPO; see
     * gmpo_verl_row_finish in gmpo_math.h): */
    int32_t verl_agg;         /* GMPO_VA_*: verl's loss_agg_mode */
    double clip_c;            /* vanilla's dual clip (clip_ratio_c > 1); 0: none */
} gmpo_family;

/* verl's agg_loss aggregations (convention verl). denom: token-mean
 * batch_num_tokens, seq-mean-* global_batch_size (<= 0: the default: the
 * mask's sum, the non-empty rows); normalizer: the caller's divisor (1 /
 * dp_size, ...). verl 0.9's other two modes are these with the caller's
 * numbers (gmpo_ext.grpo_loss): token-sum is token-mean with denom 1,
 * seq-mean-token-sum-norm seq-mean-token-sum with loss_scale_factor in the
 * normalizer. */
enum {
    GMPO_VA_TOKEN_MEAN = 0,
    GMPO_VA_SEQ_MEAN_TOKEN_SUM = 1,
    GMPO_VA_SEQ_MEAN_TOKEN_MEAN = 2,
};

typedef struct {
    const void *data;     /* NULL when the tensor is absent */
    int32_t dtype;        /* gmpo_dtype */
    int64_t stride_b;     /* elements between rows */
    int64_t stride_t;     /* elements between tokens; 0 for a per-row (B,) tensor */
    int64_t extent;       /* elements available from data on (>= 0) */
} gmpo_view;

/* Per-row statistics written by forward (fp64, GMPO_ROW_STATS per row), and in
 * the extra row B the batch totals of each (GMPO_RS_MU: the max over non-empty
 * rows instead of a sum). */
#define GMPO_ROW_STATS 10
enum {
    GMPO_RS_COEF_PG = 0,  /* gmpo: -Ahat*r*w/D  (grpo: unused) */
    GMPO_RS_COEF_KL = 1,  /* gmpo: beta/D       (grpo: unused) */
    GMPO_RS_LOSS = 2,     /* gmpo: row loss L_i; grpo: sum_t m*loss_t, divided
                             by max(n_i,1) for loss type grpo */
    GMPO_RS_MU = 3,       /* gmpo: mean clipped log-ratio mu_i */
    GMPO_RS_N = 4,        /* sum of the mask */
    GMPO_RS_M0 = 5,       /* metric sums, see GMPO_MX_* */
    GMPO_RS_M1 = 6,
    GMPO_RS_M2 = 7,
    GMPO_RS_KL = 8,       /* sum_t m*k3 */
    GMPO_RS_BAD = 9,      /* 1 if the row's loss is not finite */
};

/* The metrics vector (GMPO_METRICS entries, in the output dtype).
 * trl (and grpo): M0 low clip fraction, M1 high, M2 region.
 * verl:           M0 pg_clipfrac (A>0), M1 pg_clipfrac_lower (A<0), M2 ppo_kl. */
#define GMPO_METRICS 7
enum {
    GMPO_MX_M0 = 0, GMPO_MX_M1 = 1, GMPO_MX_M2 = 2,
    GMPO_MX_KL = 3,         /* masked token mean of k3 (beta != 0) */
    GMPO_MX_MAX_MU = 4,     /* largest mu_i over non-empty rows (gmpo) */
    GMPO_MX_NONFINITE = 5,  /* rows whose loss is NaN or inf */
    GMPO_MX_TOKENS = 6,     /* sum of the mask */
};

typedef struct {
    int32_t algo;             /* gmpo_algo */
    int64_t B, T;
    gmpo_view logp, old_logp, adv, mask, ref_logp, is_w;
    gmpo_view samp_logp;      /* family: (B,T) sampler log-probs for the off-policy mask */
    gmpo_view tok_mask;       /* family: (B,T) multiplier of the policy term (absent: 1) */
    gmpo_family fam;          /* family options (GMPO_ALGO_FAMILY only) */
    int32_t convention;       /* gmpo_convention (gmpo; the family: verl's modes) */
    int32_t loss_type;        /* gmpo_loss_type (grpo only) */
    double eps_low, eps_high; /* gmpo: log space; grpo: ratio space */
    double beta;              /* k3 KL coefficient; needs ref_logp when != 0 */
    double log_ratio_clamp;   /* safety clamp of l to [-C, C]; <= 0 or inf: none */
    double normalizer;        /* the loss is divided by it (gradient accumulation) */
    double denom;             /* grpo: dr_grpo length or dapo item count; <= 0: default */
    /* extents (elements available) of the buffers passed beside the args */
    int64_t rows_extent;      /* rows: (B+1) * GMPO_ROW_STATS needed */
    int64_t loss_extent;      /* out_loss: 1 needed */
    int64_t metrics_extent;   /* out_metrics: GMPO_METRICS needed */
    int64_t grad_out_extent;  /* grad_out: 1 needed */
    int64_t grad_extent;      /* grad: B * T needed */
    int32_t num_threads;      /* CPU threads; <= 0: one */
    void *stream;             /* cudaStream_t for the CUDA entry points */
    char err[256];            /* filled on failure */
} gmpo_args;

/* Forward: writes rows ((B+1) x GMPO_ROW_STATS fp64), the 0-d loss and the metrics
 * vector, both in out_dtype (GMPO_DT_F32 or GMPO_DT_F64). Nothing per token. */
gmpo_status gmpo_cpu_forward(gmpo_args *a, double *rows, void *out_loss,
                             void *out_metrics, int32_t out_dtype);

/* Backward: grad (B,T contiguous, dtype grad_dtype) = d loss / d logp times the
 * upstream gradient read from grad_out (a scalar of dtype grad_out_dtype). */
gmpo_status gmpo_cpu_backward(gmpo_args *a, const double *rows,
                              const void *grad_out, int32_t grad_out_dtype,
                              void *grad, int32_t grad_dtype);

/* Forward and, in the same pass over the inputs, the backward for grad_out = 1:
 * what gmpo_cpu_forward writes, plus grad (B,T contiguous, dtype grad_dtype) =
 * d loss / d logp. For training steps whose upstream gradient is 1, it reads
 * each input once instead of twice. (GRPO: two passes inside, same result.) */
gmpo_status gmpo_cpu_forward_backward(gmpo_args *a, double *rows, void *out_loss,
                                      void *out_metrics, int32_t out_dtype, void *grad,
                                      int32_t grad_dtype);

/* ---- rows split over ranks (sequence / context parallelism) ----
 * The forward in two steps around a collective: row_sums writes each row's raw
 * sums over the tokens this process holds (GMPO_SUM_STATS fp64 per row, see
 * GMPO_SM_*; every statistic of a row is a sum over its tokens), the caller
 * adds them up over the processes that share the rows (one all-reduce of
 * B * GMPO_SUM_STATS doubles), and finish_sums turns the summed rows into what
 * forward writes (rows, loss, metrics): the geometric mean, the row
 * coefficients and the totals. backward is unchanged given those rows.
 * Per-row inputs (adv (B,), is_w (B,)) must be the same in every process.
 *   sums: (B, GMPO_SUM_STATS) fp64 contiguous, sums_extent elements available */
#define GMPO_SUM_STATS 8
enum {
    GMPO_SM_MY = 0,    /* sum m*y (gmpo) | sum m*loss_t (grpo) */
    GMPO_SM_N = 1,     /* sum m */
    GMPO_SM_AM = 2,    /* sum m*A (token-level advantages) */
    GMPO_SM_LOGW = 3,  /* sum m*log(w + 1e-10) (token-level importance weights) */
    GMPO_SM_K = 4,     /* sum m*k3 */
    GMPO_SM_M0 = 5, GMPO_SM_M1 = 6, GMPO_SM_M2 = 7,   /* metric sums */
};
/* GMPO_ALGO_FAMILY puts its own sums in the same GMPO_SUM_STATS slots (m the
 * mask, tm the token mask, w the importance weight, l = logp - old_logp,
 * P_t the token's policy loss; a sum over the row's masked tokens unless said):
 *   MY   token level: sum m*tm*w*P_t | sequence level: sum m*l | vespo: sum m*tm*logp
 *   N    sum m
 *   AM   sum m*nan_to_num(samp_logp - logp)         (off-policy mask)
 *   LOGW vespo, per-token is_w: sum over ALL tokens of clamp(log w, log 1e-8, 20)
 *        (TRL's get_gamma_weights sums it unmasked)
 *   K    sum m*k3, times exp(l) per token at token level with use_bias_correction_kl
 *   M0   token level: low-clip count (clip types), cispo clip count
 *        sequence level: sum m*tm*w (clip types, sapo) | sum m*tm*w*logp (cispo)
 *        vespo: sum m*clamp(l, -20, 20)
 *   M1   token level: high-clip count (clip types) | vespo: sum m*l
 *   M2   unused
 * The family's rows (GMPO_RS_*): COEF_PG the row factor of the per-token policy
 * gradient, COEF_KL beta (times exp(s) for the sequence-level bias-corrected
 * KL), M2 the gradient every masked token of the row gets (the sequence
 * ratio's), M0 and M1 the row's metric values, MU the sequence log-ratio s (0
 * at token level); the metric M2 (region) is M0 + M1.
 * Convention verl (fam.verl_agg, clip_c; every token's l clamped to [-20, 20]
 * except gspo's):
 *   token level (vanilla, cispo, sapo): MY sum m*w*P_t, AM sum m*(-clamp(l)),
 *     M0 pg_clipfrac count, M1 pg_clipfrac_lower count (vanilla)
 *   gspo: MY sum m*l, AM sum m*w*A over A > 0, M2 sum m*w*A over A <= 0,
 *     M0 sum m over A > 0, M1 sum m over A < 0
 *   rows: COEF_PG the gradient factor (gspo: of the A > 0 tokens; M2 of the
 *   others), COEF_KL the ppo_kl sum, M0 / M1 the metric sums, KL 1 for a
 *   non-empty row (the totals count them for verl's seq-mean modes). */
gmpo_status gmpo_cpu_row_sums(gmpo_args *a, double *sums, int64_t sums_extent);
gmpo_status gmpo_cpu_finish_sums(gmpo_args *a, const double *sums, int64_t sums_extent,
                                 double *rows, void *out_loss, void *out_metrics,
                                 int32_t out_dtype);
gmpo_status gmpo_cuda_row_sums(gmpo_args *a, double *sums, int64_t sums_extent);
gmpo_status gmpo_cuda_finish_sums(gmpo_args *a, const double *sums, int64_t sums_extent,
                                  double *rows, void *out_loss, void *out_metrics,
                                  int32_t out_dtype);
gmpo_status gmpo_check_sums(gmpo_args *a, const double *sums, int64_t sums_extent);

/* 1 when the CPU entry points run the common case's kernel for these
 * arguments (grad_dtype: the gradient's dtype for forward_backward, -1 for
 * forward), 0 when the generic one: for tests and benchmarks. */
int gmpo_cpu_uses_fast_kernel(const gmpo_args *a, int32_t grad_dtype);

/* The same on the GPU: every pointer is device memory, launched on a->stream,
 * no host synchronisation. Return GMPO_ENOTBUILT when built without CUDA. */
gmpo_status gmpo_cuda_forward(gmpo_args *a, double *rows, void *out_loss,
                              void *out_metrics, int32_t out_dtype);
gmpo_status gmpo_cuda_backward(gmpo_args *a, const double *rows,
                               const void *grad_out, int32_t grad_out_dtype,
                               void *grad, int32_t grad_dtype);

/* 1 when every element of an n-dimensional strided view (sizes, element
 * strides) lies in [0, extent) from its pointer, 0 otherwise (a negative
 * stride of an axis longer than 1, an overflowing span, or past the end).
 * An empty view always fits. */
int gmpo_span_fits(int ndim, const int64_t *sizes, const int64_t *strides, int64_t extent);

/* 1 when no two elements of the view share an address: ordered by stride, each
 * axis longer than 1 steps past the whole span of the axes below it (the usual
 * sufficient test; at most 8 axes). Used for buffers that are written. */
int gmpo_span_disjoint(int ndim, const int64_t *sizes, const int64_t *strides);

/* The CUDA version the kernels were built with (CUDART_VERSION, e.g. 13000),
 * the runtime's and the driver's (the newest CUDA it supports; 0 without a
 * driver). All 0 under the SIMT emulation. GMPO_ENOTBUILT without CUDA. */
gmpo_status gmpo_cuda_versions(int *built, int *runtime, int *driver);

/* Shared argument checks (dtype codes, sizes, extents, options); used by both backends.
 * The forward / backward ones add the checks of their buffers. */
gmpo_status gmpo_check_args(gmpo_args *a);
gmpo_status gmpo_check_forward(gmpo_args *a, const double *rows, const void *out_loss,
                               const void *out_metrics, int32_t out_dtype);
gmpo_status gmpo_check_backward(gmpo_args *a, const double *rows, const void *grad_out,
                                int32_t grad_out_dtype, const void *grad, int32_t grad_dtype);
gmpo_status gmpo_check_grad(gmpo_args *a, const void *grad, int32_t grad_dtype);


#ifdef __cplusplus
}
#endif

#endif /* GMPO_H */
