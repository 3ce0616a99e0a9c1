/*
 * gmpo_common.c -- argument checks shared by the CPU and CUDA entry points.
 * Each failure names the argument, so the Python layer can raise it verbatim.
 */
#include <math.h>
#include <stdio.h>
#include "gmpo.h"
#include "gmpo_math.h"

static gmpo_status fail(gmpo_args *a, const char *msg, const char *name) {
    snprintf(a->err, sizeof a->err, msg, name);
    return GMPO_EINVAL;
}

// v must be present (unless optional), of an allowed kind, and (B,T) or (B,) shaped
static gmpo_status check_view(gmpo_args *a, const gmpo_view *v, const char *name,
                              int optional, int float_only, int may_be_row) {
    if (!v->data) {
        if (optional) return GMPO_OK;
        if (a->B * a->T == 0) return GMPO_OK;   // empty tensors may have no storage
        return fail(a, "%s: missing data pointer", name);
    }
    if (v->dtype <= GMPO_DT_NONE || v->dtype > GMPO_DT_I64)
        return fail(a, "%s: unsupported dtype code", name);
    if (float_only && !gmpo_dtype_is_float(v->dtype))
        return fail(a, "%s: must be a floating-point tensor (float32, float64, float16 or bfloat16)", name);
    if (v->stride_t == 0 && !may_be_row && a->T > 1)
        return fail(a, "%s: must have one value per token, shape (B, T)", name);
    return GMPO_OK;
}

gmpo_status gmpo_check_args(gmpo_args *a) {
    gmpo_status st;
    a->err[0] = 0;
    if (a->B < 0 || a->T < 0) return fail(a, "%s: negative size", "logps");
    if (a->algo != GMPO_ALGO_GMPO && a->algo != GMPO_ALGO_GRPO)
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
    if (a->algo == GMPO_ALGO_GRPO && a->eps_low > 1.0)
        return fail(a, "%s: must be <= 1 for GRPO (the ratio's lower bound is 1 - epsilon_low)", "epsilon_low");
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
    if (a->loss_type < GMPO_LT_GRPO || a->loss_type > GMPO_LT_DAPO)
        return fail(a, "%s: must be one of 'grpo', 'bnpo', 'dr_grpo', 'dapo'", "loss_type");
    if (isnan(a->denom) || isinf(a->denom))
        return fail(a, "%s: must be a finite number", "denominator");
    return GMPO_OK;
}

gmpo_status gmpo_check_forward(gmpo_args *a, const double *rows, const void *out_loss,
                               const void *out_metrics, int32_t out_dtype) {
    gmpo_status st = gmpo_check_args(a);
    if (st) return st;
    if (!rows || !out_loss || !out_metrics) return fail(a, "%s: missing output buffer", "forward");
    if (out_dtype != GMPO_DT_F32 && out_dtype != GMPO_DT_F64)
        return fail(a, "%s: output dtype must be float32 or float64", "forward");
    return GMPO_OK;
}

gmpo_status gmpo_check_grad(gmpo_args *a, const void *grad, int32_t grad_dtype) {
    if (!gmpo_dtype_is_float(grad_dtype))
        return fail(a, "%s: must be a floating-point tensor", "grad");
    if (a->B * a->T != 0 && !grad) return fail(a, "%s: missing buffer", "grad");
    return GMPO_OK;
}

gmpo_status gmpo_check_backward(gmpo_args *a, const double *rows, const void *grad_out,
                                int32_t grad_out_dtype, const void *grad, int32_t grad_dtype) {
    gmpo_status st = gmpo_check_args(a);
    if (st) return st;
    if ((st = gmpo_check_grad(a, grad, grad_dtype))) return st;
    if (!gmpo_dtype_is_float(grad_out_dtype) || !grad_out)
        return fail(a, "%s: must be a floating-point scalar", "grad_output");
    if (a->B * a->T != 0 && !rows) return fail(a, "%s: missing buffer", "backward");
    return GMPO_OK;
}
