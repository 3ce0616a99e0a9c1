/*
 * gmpo_common.c -- argument checks shared by the CPU and CUDA entry points.
 * Each failure names the argument, so the Python layer can raise it verbatim.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include "gmpo.h"
#include "gmpo_math.h"

static gmpo_status fail(gmpo_args *a, const char *msg, const char *name) {
    snprintf(a->err, sizeof a->err, msg, name);
    return GMPO_EINVAL;
}

int gmpo_span_fits(int ndim, const int64_t *sizes, const int64_t *strides, int64_t extent) {
    int64_t last = 0;   // the largest element offset the view addresses
    for (int d = 0; d < ndim; d++) {
        if (sizes[d] < 0) return 0;
        if (sizes[d] == 0) return 1;
    }
    for (int d = 0; d < ndim; d++) {
        if (sizes[d] == 1) continue;
        if (strides[d] < 0) return 0;
        if (strides[d] > 0 && strides[d] > (INT64_MAX - last) / (sizes[d] - 1)) return 0;
        last += (sizes[d] - 1) * strides[d];
    }
    return last < extent;
}

int gmpo_span_disjoint(int ndim, const int64_t *sizes, const int64_t *strides) {
    int64_t sz[8], sd[8];
    int n = 0;
    if (ndim > 8) return 0;
    for (int d = 0; d < ndim; d++) {
        if (sizes[d] == 0) return 1;   // nothing is written
        if (sizes[d] == 1) continue;
        if (strides[d] <= 0) return 0;
        // insertion by stride
        int i = n++;
        while (i > 0 && sd[i - 1] > strides[d]) { sd[i] = sd[i - 1]; sz[i] = sz[i - 1]; i--; }
        sd[i] = strides[d];
        sz[i] = sizes[d];
    }
    int64_t span = 1;   // elements covered by the axes below (1: one element)
    for (int i = 0; i < n; i++) {
        if (sd[i] < span) return 0;
        if (sz[i] > INT64_MAX / sd[i]) return 0;
        span = sz[i] * sd[i];
    }
    return 1;
}

// v must be present (unless optional), of an allowed kind, (B,T) or (B,) shaped,
// and every element it addresses inside its extent
static gmpo_status check_view(gmpo_args *a, const gmpo_view *v, const char *name,
                              int optional, int float_only, int may_be_row) {
    if (!v->data) {
        if (optional) return GMPO_OK;
        if (a->B == 0 || a->T == 0) return GMPO_OK;   // empty tensors may have no storage
        return fail(a, "%s: missing data pointer", name);
    }
    if (v->dtype <= GMPO_DT_NONE || v->dtype > GMPO_DT_I64)
        return fail(a, "%s: unsupported dtype code", name);
    if (float_only && !gmpo_dtype_is_float(v->dtype))
        return fail(a, "%s: must be a floating-point tensor (float32, float64, float16 or bfloat16)", name);
    if (v->stride_t == 0 && !may_be_row && a->T > 1)
        return fail(a, "%s: must have one value per token, shape (B, T)", name);
    const int64_t sizes[2] = {a->B, v->stride_t == 0 ? 1 : a->T};
    const int64_t strides[2] = {v->stride_b, v->stride_t};
    if (!gmpo_span_fits(2, sizes, strides, v->extent))
        return fail(a, "%s: its shape and strides address memory outside the tensor "
                       "(too few elements for B rows and T tokens, or a negative stride)", name);
    return GMPO_OK;
}

// a contiguous buffer of `need` elements at p: present (or not needed) and big enough
static gmpo_status check_buffer(gmpo_args *a, const void *p, int64_t extent, int64_t need,
                                const char *name) {
    if (need == 0) return GMPO_OK;
    if (!p) return fail(a, "%s: missing buffer", name);
    if (extent < need) return fail(a, "%s: buffer too small for the shapes of the inputs", name);
    return GMPO_OK;
}

// the options of GMPO_ALGO_FAMILY (a->fam) and its two extra tensors
static gmpo_status check_family(gmpo_args *a) {
    gmpo_status st;
    const gmpo_family *f = &a->fam;
    if (a->loss_type < GMPO_LT_GRPO || a->loss_type > GMPO_LT_VESPO)
        return fail(a, "%s: must be one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo', "
                       "'luspo', 'vespo'", "loss_type");
    if (f->seq_level != 0 && f->seq_level != 1)
        return fail(a, "%s: must be 'token' or 'sequence'", "importance_sampling_level");
    if (a->convention == GMPO_CONV_VERL) {   // verl's vanilla, gspo, cispo, sapo
        if (a->loss_type != GMPO_LT_GRPO && a->loss_type != GMPO_LT_CISPO &&
            a->loss_type != GMPO_LT_SAPO)
            return fail(a, "%s: convention 'verl' has 'vanilla' and 'gspo' (code 0), 'cispo', "
                           "'sapo'", "loss_type");
        if (f->seq_level && a->loss_type != GMPO_LT_GRPO)
            return fail(a, "%s: the sequence level is verl's gspo (loss type code 0) only",
                        "importance_sampling_level");
        if (f->verl_agg < GMPO_VA_TOKEN_MEAN || f->verl_agg > GMPO_VA_SEQ_MEAN_TOKEN_MEAN)
            return fail(a, "%s: the kernel's code must be 0 (token-mean), 1 "
                           "(seq-mean-token-sum) or 2 (seq-mean-token-mean)", "loss_agg_mode");
        if (f->clip_c != 0 && !(f->clip_c > 1 && isfinite(f->clip_c)))
            return fail(a, "%s: must be a finite number > 1 (verl's dual clip)", "clip_ratio_c");
        if (f->has_delta || f->off_policy || f->bias_corr_kl || a->beta != 0 || a->tok_mask.data)
            return fail(a, "%s: verl's policy losses take no delta, off-policy mask, KL or "
                           "token mask", "convention");
    } else if (a->convention != GMPO_CONV_TRL) {
        return fail(a, "%s: must be 'trl' or 'verl'", "convention");
    } else if (f->verl_agg != 0 || f->clip_c != 0) {
        return fail(a, "%s: loss_agg_mode and clip_ratio_c are verl's ('verl')", "convention");
    }
    if (a->log_ratio_clamp != 0)
        return fail(a, "%s: not an option of the GRPO family", "log_ratio_clamp");
    if (f->has_delta && !(f->delta > 0 && isfinite(f->delta)))
        return fail(a, "%s: must be a finite number > 0 or None", "delta");
    if (f->off_policy && !(f->off_policy_threshold == f->off_policy_threshold))
        return fail(a, "%s: must be a number or None", "off_policy_mask_threshold");
    if (!(f->sapo_tpos > 0) || isinf(f->sapo_tpos))
        return fail(a, "%s: must be a finite number > 0", "sapo_temperature_pos");
    if (!(f->sapo_tneg > 0) || isinf(f->sapo_tneg))
        return fail(a, "%s: must be a finite number > 0", "sapo_temperature_neg");
    if (!isfinite(f->vespo_kpos)) return fail(a, "%s: must be finite", "vespo_k_pos");
    if (!isfinite(f->vespo_lpos)) return fail(a, "%s: must be finite", "vespo_lambda_pos");
    if (!isfinite(f->vespo_kneg)) return fail(a, "%s: must be finite", "vespo_k_neg");
    if (!isfinite(f->vespo_lneg)) return fail(a, "%s: must be finite", "vespo_lambda_neg");
    // a row quantity decides the row's loss: the advantage must be one per row
    if (a->adv.stride_t != 0 && a->T > 1 && a->convention == GMPO_CONV_TRL &&
        (f->seq_level || f->off_policy || a->loss_type == GMPO_LT_VESPO))
        return fail(a, "%s: must be one per row, (B,) or (B, 1), with importance_sampling_level="
                       "'sequence', off_policy_mask_threshold or loss_type 'vespo'", "advantages");
    if (f->off_policy && !a->samp_logp.data && a->B * a->T > 0)
        return fail(a, "%s: off_policy_mask_threshold needs the sampler's log-probs", "sampling_logps");
    if ((st = check_view(a, &a->samp_logp, "sampling_logps", 1, 1, 0))) return st;
    if ((st = check_view(a, &a->tok_mask, "token_mask", 1, 0, 0))) return st;
    return GMPO_OK;
}

gmpo_status gmpo_check_args(gmpo_args *a) {
    gmpo_status st;
    a->err[0] = 0;
    if (a->B < 0 || a->T < 0) return fail(a, "%s: negative size", "logps");
    if (a->T > 0 && a->B > (INT64_MAX / GMPO_ROW_STATS - 1) / a->T)
        return fail(a, "%s: too many elements", "logps");
    if (a->algo != GMPO_ALGO_GMPO && a->algo != GMPO_ALGO_GRPO && a->algo != GMPO_ALGO_FAMILY)
        return fail(a, "%s: unknown algorithm code", "algo");
    if ((st = check_view(a, &a->logp, "logps", 0, 1, 0))) return st;
    if ((st = check_view(a, &a->old_logp, "old_logps", 0, 1, 0))) return st;
    if ((st = check_view(a, &a->adv, "advantages", 0, 1, 1))) return st;
    if ((st = check_view(a, &a->mask, "mask", 0, 0, 0))) return st;
    if ((st = check_view(a, &a->ref_logp, "ref_logps", 1, 1, 0))) return st;
    if ((st = check_view(a, &a->is_w, "is_weights", 1, 1, 1))) return st;
    if (!(a->eps_low >= 0) || isinf(a->eps_low))
        return fail(a, "%s: must be a finite number >= 0", "epsilon_low");
    if (!(a->eps_high >= 0) || isinf(a->eps_high))
        return fail(a, "%s: must be a finite number >= 0", "epsilon_high");
    // the clip types' lower bound 1 - epsilon_low; cispo, sapo, vespo do not use it (as TRL)
    if (a->eps_low > 1.0 &&
        (a->algo == GMPO_ALGO_GRPO ||
         (a->algo == GMPO_ALGO_FAMILY && (a->loss_type <= GMPO_LT_DAPO || a->loss_type == GMPO_LT_LUSPO))))
        return fail(a, "%s: must be <= 1 for the clip types (the ratio's lower bound is "
                       "1 - epsilon_low)", "epsilon_low");
    if (!isfinite(a->beta)) return fail(a, "%s: must be finite", "beta");
    if (a->beta != 0 && !a->ref_logp.data && a->B * a->T > 0)
        return fail(a, "%s: beta != 0 needs ref_logps", "ref_logps");
    // 0 means no clamp (what the Python layer passes for None); +inf too
    if (isnan(a->log_ratio_clamp) || a->log_ratio_clamp < 0)
        return fail(a, "%s: must be a number > 0 or None", "log_ratio_clamp");
    if (isinf(a->log_ratio_clamp)) a->log_ratio_clamp = 0;
    if (!(a->normalizer != 0) || !isfinite(a->normalizer))
        return fail(a, "%s: must be a finite non-zero number", "normalizer");
    if (a->convention != GMPO_CONV_TRL && a->convention != GMPO_CONV_VERL)
        return fail(a, "%s: must be 'trl' or 'verl'", "convention");
    if (a->algo == GMPO_ALGO_FAMILY) {
        if ((st = check_family(a))) return st;
    } else {
        if (a->loss_type < GMPO_LT_GRPO || a->loss_type > GMPO_LT_DAPO)
            return fail(a, "%s: must be one of 'grpo', 'bnpo', 'dr_grpo', 'dapo'", "loss_type");
        if (a->samp_logp.data || a->tok_mask.data)
            return fail(a, "%s: only the GRPO family (algo 2) takes sampling_logps and token_mask",
                        a->samp_logp.data ? "sampling_logps" : "token_mask");
    }
    // 0: the loss type's default (the Python layer's None); no other value < 0
    if (!(a->denom >= 0) || isinf(a->denom))
        return fail(a, "%s: must be a finite number >= 0 (0: the default)", "denominator");
    return GMPO_OK;
}

gmpo_status gmpo_check_forward(gmpo_args *a, const double *rows, const void *out_loss,
                               const void *out_metrics, int32_t out_dtype) {
    gmpo_status st = gmpo_check_args(a);
    if (st) return st;
    if (!rows || !out_loss || !out_metrics) return fail(a, "%s: missing output buffer", "forward");
    if (out_dtype != GMPO_DT_F32 && out_dtype != GMPO_DT_F64)
        return fail(a, "%s: output dtype must be float32 or float64", "forward");
    if ((st = check_buffer(a, rows, a->rows_extent, (a->B + 1) * GMPO_ROW_STATS, "rows"))) return st;
    if ((st = check_buffer(a, out_loss, a->loss_extent, 1, "loss"))) return st;
    return check_buffer(a, out_metrics, a->metrics_extent, GMPO_METRICS, "metrics");
}

gmpo_status gmpo_check_grad(gmpo_args *a, const void *grad, int32_t grad_dtype) {
    if (!gmpo_dtype_is_float(grad_dtype))
        return fail(a, "%s: must be a floating-point tensor", "grad");
    return check_buffer(a, grad, a->grad_extent, a->B * a->T, "grad");
}

gmpo_status gmpo_check_backward(gmpo_args *a, const double *rows, const void *grad_out,
                                int32_t grad_out_dtype, const void *grad, int32_t grad_dtype) {
    gmpo_status st = gmpo_check_args(a);
    if (st) return st;
    if ((st = gmpo_check_grad(a, grad, grad_dtype))) return st;
    if (!gmpo_dtype_is_float(grad_out_dtype) || !grad_out)
        return fail(a, "%s: must be a floating-point scalar", "grad_output");
    if ((st = check_buffer(a, grad_out, a->grad_out_extent, 1, "grad_output"))) return st;
    // backward reads the per-row statistics of every row and the totals row
    return check_buffer(a, rows, a->rows_extent,
                        (a->B > 0 && a->T > 0) ? (a->B + 1) * GMPO_ROW_STATS : 0,
                        "rows");
}

// rows split over ranks: the (B, GMPO_SUM_STATS) fp64 row sums, written by
// row_sums and read by finish_sums (the arguments checked as for forward)
gmpo_status gmpo_check_sums(gmpo_args *a, const double *sums, int64_t sums_extent) {
    gmpo_status st = gmpo_check_args(a);
    if (st) return st;
    return check_buffer(a, sums, sums_extent, a->B * GMPO_SUM_STATS, "sums");
}
