/*
 * gmpo_math.h -- the scalar math of the GMPO and GRPO losses, written once and
 * shared by the C CPU kernels and the CUDA kernels (GMPO_HD is
 * __host__ __device__ under nvcc and nothing in C).
 *
 * GMPO (arXiv 2507.20673), per row i, tokens t, mask m, advantage A:
 *   l = logp - old_logp                  (optionally clamped to [-C, C])
 *   y = min(l, eps_high) if A > 0,  max(l, -eps_low) otherwise
 *       (verl: y = 0 where A == 0; min(l, clamp(l)) == min(l, eps_high))
 *   mu_i = sum_t m*y / D_i,  r_i = exp(mu_i),  L_i = -Ahat_i * r_i * w_i + beta*KL_i
 * and dL_i/dlogp_t = m * (g_t * (-Ahat_i r_i w_i / D_i) + beta/D_i * (1 - e^(ref-logp)))
 * with g_t = 1 where the token is not clipped (exactly on a bound counts as not
 * clipped, as PyTorch's min/clamp backward gives).
 *
 * The per-token and per-row functions exist for float (suffix _f) and double
 * (suffix _d) accumulation: gmpo_math_impl.h is included once for each.
 */
#ifndef GMPO_MATH_H
#define GMPO_MATH_H

#include <stdint.h>
#include <math.h>
#include "gmpo.h"

#if defined(__CUDACC__)
#define GMPO_HD __host__ __device__ __forceinline__
#else
#define GMPO_HD static inline
#endif

// ----------------------------------------------------------------------------
// half and bfloat16 as raw 16-bit patterns (no CUDA header needed, so the same
// code runs on the host, under the SIMT emulation and on the device)

typedef union { float f; uint32_t u; } gmpo_f32_bits;

GMPO_HD float gmpo_bf16_to_f32(uint16_t h) {
    gmpo_f32_bits b;
    b.u = (uint32_t)h << 16;
    return b.f;
}

// Branch-free (selects only), so that the CPU loops converting whole tiles
// vectorise; checked bit for bit over every half and bf16 pattern.

// fp32 -> bf16, round to nearest even; NaN stays a quiet NaN
GMPO_HD uint16_t gmpo_f32_to_bf16(float f) {
    gmpo_f32_bits b;
    b.f = f;
    uint32_t r = (b.u + 0x7fffu + ((b.u >> 16) & 1u)) >> 16;
    uint32_t q = (b.u >> 16) | 0x40u;
    return (uint16_t)((b.u & 0x7fffffffu) > 0x7f800000u ? q : r);
}

GMPO_HD float gmpo_f16_to_f32(uint16_t h) {
    gmpo_f32_bits m, o;
    m.u = (uint32_t)(h & 0x7fffu) << 13;
    o.f = m.f * 5.192296858534828e33f;           // 2^112 rebiases (subnormals too)
    uint32_t u = (h & 0x7c00u) == 0x7c00u ? (m.u | 0x7f800000u) : o.u;   // inf, NaN
    o.u = u | ((uint32_t)(h & 0x8000u) << 16);
    return o.f;
}

// fp32 -> fp16, round to nearest even, subnormals kept, overflow to inf
GMPO_HD uint16_t gmpo_f32_to_f16(float f) {
    gmpo_f32_bits b, s;
    b.f = f;
    uint32_t sign = (b.u >> 16) & 0x8000u;
    uint32_t a = b.u & 0x7fffffffu;
    uint32_t normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
    // |f| + 0.5 has an ulp of 2^-24, the half subnormal step, so the float
    // adder rounds to nearest even for us; the low bits are then the result
    s.u = a;
    s.f = s.f + 0.5f;
    uint32_t sub = s.u - 0x3f000000u;
    uint32_t r = a < 0x38800000u ? sub : normal;  // below 2^-14: subnormal
    r = a >= 0x477ff000u ? 0x7c00u : r;           // >= 65520: inf
    r = a > 0x7f800000u ? 0x7e00u : r;            // NaN
    return (uint16_t)(sign | r);
}

// exp(x) on the host for float accumulation: within 1 ulp of the correctly rounded value where the
// result is a normal float above 2^-125 (x >= -86.6); below that 0 (the exact value is under
// 2^-125, nothing beside the 1 that a softmax sum always holds); -inf gives 0,
// NaN gives NaN. x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6
// polynomial fitted to minimise the relative error on that interval
// (truncation 0.07 ulp), times 2^n built in the exponent bits. No branch and
// no select on floats: the loops calling it vectorise, and NaN flows through
// the arithmetic (NaN * anything is NaN).
GMPO_HD float gmpo_exp_f(float x) {
#if defined(__CUDA_ARCH__)
    return expf(x);   // the device's own exp
#else
    float xc = x < -104.0f ? -104.0f : x;        // -inf -> -104 (gives 0); NaN stays
    xc = xc > 88.8f ? 88.8f : xc;                // +inf and past 88.73 -> 2^128: inf
    float t = xc * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
    float n = t - 12582912.0f;
    float r = xc - n * 0.693145751953125f;       // ln 2 = hi + lo, n * hi exact
    r = r - n * 1.42860682028622680e-6f;
    float p = 1.3879415346309543e-3f;
    p = p * r + 8.369404822587967e-3f;
    p = p * r + 4.166724905371666e-2f;
    p = p * r + 1.666651517152786e-1f;
    p = p * r + 4.999999701976776e-1f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    gmpo_f32_bits tb, sb;
    tb.f = t;                                    // bits(t) = 0x4B400000 + n
    int32_t e = (int32_t)(tb.u - 0x4B400000u) + 127;
    e = e < 255 ? e : 255;                       // never into the sign bit
    // scale by 2^(n-1) * 2 so that n = 128 (x up to 88.72) still gives a
    // finite result when p < 1; 2^n at or below 2^-126 gives 0
    sb.u = e > 1 ? (uint32_t)(e - 1) << 23 : 0u;
    return p * sb.f * 2.0f;
#endif
}

// load element k of a tensor of any supported dtype as float / double
GMPO_HD float gmpo_load_f(const void *p, int32_t dt, int64_t k) {
    switch (dt) {
    case GMPO_DT_F32: return ((const float *)p)[k];
    case GMPO_DT_F64: return (float)((const double *)p)[k];
    case GMPO_DT_F16: return gmpo_f16_to_f32(((const uint16_t *)p)[k]);
    case GMPO_DT_BF16: return gmpo_bf16_to_f32(((const uint16_t *)p)[k]);
    case GMPO_DT_BOOL:
    case GMPO_DT_U8: return (float)((const uint8_t *)p)[k];
    case GMPO_DT_I8: return (float)((const int8_t *)p)[k];
    case GMPO_DT_I32: return (float)((const int32_t *)p)[k];
    case GMPO_DT_I64: return (float)((const int64_t *)p)[k];
    default: return 0.0f;
    }
}

GMPO_HD double gmpo_load_d(const void *p, int32_t dt, int64_t k) {
    switch (dt) {
    case GMPO_DT_F64: return ((const double *)p)[k];
    case GMPO_DT_I64: return (double)((const int64_t *)p)[k];
    default: return (double)gmpo_load_f(p, dt, k);
    }
}

// store a float / double into element k of a float tensor of dtype dt
GMPO_HD void gmpo_store_f(void *p, int32_t dt, int64_t k, float v) {
    switch (dt) {
    case GMPO_DT_F32: ((float *)p)[k] = v; break;
    case GMPO_DT_F64: ((double *)p)[k] = (double)v; break;
    case GMPO_DT_F16: ((uint16_t *)p)[k] = gmpo_f32_to_f16(v); break;
    case GMPO_DT_BF16: ((uint16_t *)p)[k] = gmpo_f32_to_bf16(v); break;
    default: break;
    }
}

GMPO_HD void gmpo_store_d(void *p, int32_t dt, int64_t k, double v) {
    if (dt == GMPO_DT_F64) ((double *)p)[k] = v;
    else gmpo_store_f(p, dt, k, (float)v);
}

GMPO_HD int gmpo_dtype_is_float(int32_t dt) {
    return dt == GMPO_DT_F32 || dt == GMPO_DT_F64 || dt == GMPO_DT_F16 || dt == GMPO_DT_BF16;
}

// ----------------------------------------------------------------------------
// per-token and per-row math, for float and for double accumulation

// GMPO_EXP: per token, must vectorise (the polynomial above on the host);
// GMPO_EXP_ROW: once per row (r_i = exp(mu_i)), the libm exp: a loss whose rows
// nearly cancel (group-normalised advantages) shows every ulp of r_i.
#define GMPO_T float
#define GMPO_S(name) name##_f
#define GMPO_EXP gmpo_exp_f
#define GMPO_EXP_ROW expf
#define GMPO_LOG logf
#include "gmpo_math_impl.h"
#undef GMPO_T
#undef GMPO_S
#undef GMPO_EXP
#undef GMPO_EXP_ROW
#undef GMPO_LOG

#define GMPO_T double
#define GMPO_S(name) name##_d
#define GMPO_EXP exp
#define GMPO_EXP_ROW exp
#define GMPO_LOG log
#include "gmpo_math_impl.h"
#undef GMPO_T
#undef GMPO_S
#undef GMPO_EXP
#undef GMPO_EXP_ROW
#undef GMPO_LOG

// ----------------------------------------------------------------------------
// GMPO_ALGO_FAMILY: the per-row finish (fp64 whatever the inputs' dtype: once
// per row, and the sequence ratio's exp needs the range)

// 1 / (the loss type's divisor * normalizer) for a row with n tokens (n = 1:
// the batch divisor alone) of a batch with N tokens; TRL's normalisers: grpo,
// sapo: B * max(n, 1); bnpo: max(N, 1); dr_grpo: B * max_completion_length;
// dapo, cispo, vespo: num_items_in_batch (default max(N, 1)); luspo: B
// Convention verl: verl's agg_loss (R the batch's non-empty rows; n < 0: the
// loss's divisor, whose rows already hold seq-mean-token-mean's 1 / (n + 1e-8)).
// An all-empty batch gives 0 where verl's 0 / 0 is NaN.
GMPO_HD double gmpo_verl_row_weight(const gmpo_args *a, double n, double N, double R) {
    double d;
    switch (a->fam.verl_agg) {
    case GMPO_VA_TOKEN_MEAN: d = a->denom > 0 ? a->denom : N; break;
    case GMPO_VA_SEQ_MEAN_TOKEN_MEAN:
        d = (a->denom > 0 ? a->denom : R) * (n >= 0 ? n + 1e-8 : 1.0);
        break;
    default: d = a->denom > 0 ? a->denom : R; break;   // seq-mean-token-sum
    }
    return 1.0 / ((d != 0 ? d : 1.0) * a->normalizer);
}

GMPO_HD double gmpo_family_row_weight(const gmpo_args *a, double n, double N, double R) {
    double B = a->B > 1 ? (double)a->B : 1.0, d;
    if (a->convention == GMPO_CONV_VERL) return gmpo_verl_row_weight(a, n, N, R);
    switch (a->loss_type) {
    case GMPO_LT_GRPO:
    case GMPO_LT_SAPO: d = B * (n > 1.0 ? n : 1.0); break;
    case GMPO_LT_BNPO: d = N > 1.0 ? N : 1.0; break;
    case GMPO_LT_DR_GRPO: {
        double L = a->denom > 0 ? a->denom : (double)a->T;
        d = (double)a->B * L > 1.0 ? (double)a->B * L : 1.0;
        break;
    }
    case GMPO_LT_LUSPO: d = B; break;
    default: d = a->denom > 0 ? a->denom : (N > 1.0 ? N : 1.0); break;
    }
    return 1.0 / (d * a->normalizer);
}

// TRL's get_gamma_weights for one row: slr the row's sum of clamp(l, -20, 20)
// plus the clamped log importance ratios; phi = e^(lam + k log w - lam w) with
// log w = clamp(slr, log 1e-8, 20), k and lam by the sign of A; NaN and +-inf -> 0
GMPO_HD double gmpo_vespo_phi(const gmpo_args *a, double slr, double A) {
    const double lo = -18.420680743952367;   // log(1e-8)
    double lw = slr < lo ? lo : (slr > 20.0 ? 20.0 : slr);
    if (slr != slr) lw = slr;
    int nonneg = A >= 0;
    double k = nonneg ? a->fam.vespo_kpos : a->fam.vespo_kneg;
    double lam = nonneg ? a->fam.vespo_lpos : a->fam.vespo_lneg;
    lam = lam < 1e-4 ? 1e-4 : lam;
    double phi = exp(lam + k * lw - lam * exp(lw));
    return (phi - phi == 0) ? phi : 0.0;   // nan_to_num(nan=0, posinf=0, neginf=0)
}

// The sequence-level clip surrogate in log space: s the row's mean log-ratio;
// returns P = -A * (the clipped ratio) and dP/ds. The bounds are compared with
// s as logs (log(1 - eps_low), log1p(eps_high), log(delta)), so exp(s) never
// has to be formed where it is clipped away: TRL's exp(s) overflows to inf
// there (fp32: s > 88.7) and its gradient is 0 * inf = NaN.
GMPO_HD double gmpo_family_seq_clip(const gmpo_args *a, double s, double A, double *dP) {
    double lo = log(1.0 - a->eps_low), hi = log1p(a->eps_high);
    int dl = a->fam.has_delta != 0;
    double ld = dl ? log(a->fam.delta) : INFINITY;
    double c1 = (dl && s > ld) ? ld : s;
    double c2 = s < lo ? lo : (s > hi ? hi : s);
    double g1 = (dl && !(s <= ld)) ? 0.0 : 1.0;
    double g2 = (s >= lo && s <= hi) ? 1.0 : 0.0;
    // -min(c1 A, c2 A) = -A * (A > 0 ? min : max)(c1, c2); a tie passes half each
    double y, g;
    if (A > 0) {
        y = c1 < c2 ? c1 : c2;
        g = c1 < c2 ? g1 : (c2 < c1 ? g2 : 0.5 * (g1 + g2));
    } else {
        y = c1 > c2 ? c1 : c2;
        g = c1 > c2 ? g1 : (c2 > c1 ? g2 : 0.5 * (g1 + g2));
    }
    if (s != s) y = s;
    if (A == 0 && y == y) { *dP = 0.0; return 0.0; }   // -0 * ratio, even an infinite one
    double r = exp(y);
    *dP = g == 0.0 ? 0.0 : -A * r * g;
    return -A * r;
}

// Convention verl: a row's sums (gmpo.h's verl slots) -> its statistics.
// gspo (verl's compute_policy_loss_gspo): s = exp(min(mu, 10)), mu = sum m l /
// max(n, 1); every token's ratio is s with the gradient of its own logp
// (sg[s] * p / sg[p]), none past the clamp (mu > 10); the token's loss
// max(-A s, -A clamp(s, 1-el, 1+eh)), so the row's sum is -Wpos * min(s, c) -
// Wneg * max(s, c) (Wpos, Wneg: sum m*w*A over A > 0, over A <= 0).
GMPO_HD void gmpo_verl_row_finish(const gmpo_args *a, const double *sm, double *rs) {
    const double n = sm[GMPO_SM_N];
    double L, c1 = 1.0, c2 = 0.0, m0 = sm[GMPO_SM_M0], m1 = sm[GMPO_SM_M1];
    double kl = sm[GMPO_SM_AM], mu = 0.0;
    if (a->fam.seq_level) {
        mu = sm[GMPO_SM_MY] / (n > 1.0 ? n : 1.0);
        double lsc = mu > 10.0 ? 10.0 : mu;   // NaN stays NaN
        double s = exp(lsc), lo = 1.0 - a->eps_low, hi = 1.0 + a->eps_high;
        double cs = s < lo ? lo : (s > hi ? hi : s);
        double wp = sm[GMPO_SM_AM], wn = sm[GMPO_SM_M2];
        double pol = (wp == 0.0 ? 0.0 : -wp * (s < cs ? s : cs))
                     + (wn == 0.0 ? 0.0 : -wn * (s > cs ? s : cs));
        int gate = mu <= 10.0;
        c1 = (gate && s <= hi) ? s : 0.0;   // A > 0: min(s, c) follows s up to 1+eh
        c2 = (gate && s >= lo) ? s : 0.0;   // A < 0: max(s, c) follows s down to 1-el
        m0 = (s > hi ? sm[GMPO_SM_M0] : 0.0) + (s < lo ? sm[GMPO_SM_M1] : 0.0);
        m1 = 0.0;
        kl = -sm[GMPO_SM_MY];   // ppo_kl of the unclamped l
        L = pol;
    } else {
        L = sm[GMPO_SM_MY];
    }
    if (a->fam.verl_agg == GMPO_VA_SEQ_MEAN_TOKEN_MEAN) L /= n + 1e-8;
    rs[GMPO_RS_COEF_PG] = c1;
    rs[GMPO_RS_COEF_KL] = kl;
    rs[GMPO_RS_LOSS] = L;
    rs[GMPO_RS_MU] = mu;
    rs[GMPO_RS_N] = n;
    rs[GMPO_RS_M0] = m0;
    rs[GMPO_RS_M1] = m1;
    rs[GMPO_RS_M2] = c2;
    rs[GMPO_RS_KL] = n > 0 ? 1.0 : 0.0;
    rs[GMPO_RS_BAD] = (L - L == 0) ? 0.0 : 1.0;
}

// Row sums (GMPO_SUM_STATS fp64, the family's slots of gmpo.h) -> the row's
// statistics. adv_row, w_row: the row's advantage and importance weight when
// they are per row (w_row 1 without weights).
GMPO_HD void gmpo_family_row_finish(const gmpo_args *a, const double *sm, double adv_row,
                                    double w_row, double *rs) {
    if (a->convention == GMPO_CONV_VERL) {
        gmpo_verl_row_finish(a, sm, rs);
        return;
    }
    const int type = a->loss_type, seq = a->fam.seq_level != 0;
    const double n = sm[GMPO_SM_N], D = n > 1.0 ? n : 1.0, A = adv_row;
    const double beta = a->beta;
    double keep = 1.0;
    if (a->fam.off_policy) {
        double kl = sm[GMPO_SM_AM] / D;
        keep = (A >= 0 || kl <= a->fam.off_policy_threshold) ? 1.0 : 0.0;
    }
    const double s = sm[GMPO_SM_MY] / D;          // sequence level (not vespo)
    double policy, c1 = keep, c2 = 0.0, m0 = 0.0, m1 = 0.0;
    double klsum = sm[GMPO_SM_K], klf = beta;
    if (type == GMPO_LT_VESPO) {
        double slr = sm[GMPO_SM_M0];
        if (a->is_w.data) {
            if (a->is_w.stride_t) slr += sm[GMPO_SM_LOGW];
            else {
                double lw = log(w_row);
                const double lo = -18.420680743952367;
                slr += lw < lo ? lo : (lw > 20.0 ? 20.0 : lw);
            }
        }
        double phi = gmpo_vespo_phi(a, slr, A);
        // the exact-0 shortcut only for a finite sum: 0 * NaN / inf is NaN (TRL's too)
        double my = sm[GMPO_SM_MY];
        policy = keep * ((phi == 0.0 && my - my == 0) ? 0.0 : -phi * A * my);
        c1 = keep * phi;
        m0 = phi;
        if (seq && a->fam.bias_corr_kl) {
            double sv = sm[GMPO_SM_M1] / D, e = exp(sv);
            klf = beta * e;
            c2 = beta * e * klsum / D;
            klsum *= e;
        }
    } else if (!seq) {
        policy = keep * sm[GMPO_SM_MY];
        m0 = sm[GMPO_SM_M0];
        m1 = sm[GMPO_SM_M1];
    } else {
        double W = sm[GMPO_SM_M0];
        if (type == GMPO_LT_CISPO) {
            double lh = log(a->eps_high);
            double c = exp(s < lh ? s : lh);
            if (s != s) c = s;
            c1 = keep * c;
            double cw = c1 * W;   // finite unless c1 (s NaN) or W (a logp) is not
            policy = ((c1 == 0.0 || A == 0.0) && cw - cw == 0) ? 0.0 : -c1 * A * W;
            m0 = (s > lh && A > 0) ? 1.0 : 0.0;
        } else if (type == GMPO_LT_SAPO) {
            double tau = A > 0 ? a->fam.sapo_tpos : a->fam.sapo_tneg;
            double e = exp(s), x = tau * (e - 1.0), ax = x < 0 ? -x : x, ex = exp(-ax);
            double sg = x >= 0 ? 1.0 / (1.0 + ex) : ex / (1.0 + ex);
            double dsg = exp(s - ax) / ((1.0 + ex) * (1.0 + ex));   // sigmoid'(x) e^s
            policy = keep * (-sg * 4.0 / tau * A) * W;
            c2 = keep * (A == 0.0 ? 0.0 : -A * 4.0 * dsg * W / D);
            c1 = 0.0;
        } else {
            double dP;
            double P = gmpo_family_seq_clip(a, s, A, &dP);
            policy = keep * P * W;
            c2 = (keep == 0.0 || dP == 0.0) ? 0.0 : keep * dP * W / D;
            c1 = 0.0;
            double lo = log(1.0 - a->eps_low), hi = log1p(a->eps_high);
            double lc1 = (a->fam.has_delta && s > log(a->fam.delta)) ? log(a->fam.delta) : s;
            m0 = (lc1 < lo && A < 0) ? 1.0 : 0.0;
            m1 = (lc1 > hi && A > 0) ? 1.0 : 0.0;
        }
        if (a->fam.bias_corr_kl && beta != 0) {
            double e = exp(s);
            klf = beta * e;
            c2 += beta * e * klsum / D;
            klsum *= e;
        }
    }
    double L = policy + (beta != 0 ? beta * klsum : 0.0);
    if (type == GMPO_LT_GRPO || type == GMPO_LT_SAPO) L /= D;
    rs[GMPO_RS_COEF_PG] = c1;
    rs[GMPO_RS_COEF_KL] = beta != 0 ? klf : 0.0;
    rs[GMPO_RS_LOSS] = L;
    rs[GMPO_RS_MU] = seq && type != GMPO_LT_VESPO ? s : 0.0;
    rs[GMPO_RS_N] = n;
    rs[GMPO_RS_M0] = m0;
    rs[GMPO_RS_M1] = m1;
    rs[GMPO_RS_M2] = c2;
    rs[GMPO_RS_KL] = klsum;
    rs[GMPO_RS_BAD] = (L - L == 0) ? 0.0 : 1.0;
}

// The family's per-token gradient factors of row i (gmpo_fam_grad): pg1 (the
// policy term's), pc (every masked token's), kl (the KL's), times go.
GMPO_HD void gmpo_family_grad_factors(const gmpo_args *a, const double *rows, int64_t i,
                                      double go, double *pg1, double *pc, double *kl) {
    const double *rs = rows + i * GMPO_ROW_STATS;
    const double *tot = rows + a->B * GMPO_ROW_STATS;
    double c = go * gmpo_family_row_weight(a, rs[GMPO_RS_N], tot[GMPO_RS_N], tot[GMPO_RS_KL]);
    *pg1 = c * rs[GMPO_RS_COEF_PG];
    *pc = rs[GMPO_RS_M2] == 0.0 ? 0.0 : c * rs[GMPO_RS_M2];
    *kl = c * rs[GMPO_RS_COEF_KL];
}

// ----------------------------------------------------------------------------
// batch totals -> loss and metrics (fp64, shared by every backend)

// tot: the totals row (GMPO_ROW_STATS doubles); out: [loss, metrics...]
GMPO_HD void gmpo_finish_totals(const gmpo_args *a, const double *tot, double *out) {
    double B = (double)a->B;
    double N = tot[GMPO_RS_N];
    double norm = a->normalizer;
    double cnt = (a->algo == GMPO_ALGO_GMPO && a->convention == GMPO_CONV_VERL)
                     ? N + 1e-8 : (N > 1.0 ? N : 1.0);
    double *mx = out + 1;
    if (a->algo == GMPO_ALGO_GMPO) {
        out[0] = tot[GMPO_RS_LOSS] / (B > 1.0 ? B : 1.0) / norm;
    } else if (a->algo == GMPO_ALGO_FAMILY) {
        const int verl = a->convention == GMPO_CONV_VERL;
        out[0] = tot[GMPO_RS_LOSS] * gmpo_family_row_weight(a, verl ? -1.0 : 1.0, N,
                                                            tot[GMPO_RS_KL]);
    } else {
        double S = tot[GMPO_RS_LOSS];
        switch (a->loss_type) {
        case GMPO_LT_GRPO: out[0] = S / (B > 1.0 ? B : 1.0) / norm; break;
        case GMPO_LT_BNPO: out[0] = S / (N > 1.0 ? N : 1.0) / norm; break;
        case GMPO_LT_DR_GRPO: {
            double L = a->denom > 0 ? a->denom : (double)a->T;
            double d = B * L;
            out[0] = S / (d > 1.0 ? d : 1.0) / norm;
            break;
        }
        default: {
            double d = a->denom > 0 ? a->denom : (N > 1.0 ? N : 1.0);
            out[0] = S / d / norm;
            break;
        }
        }
    }
    if (a->algo == GMPO_ALGO_FAMILY && a->convention == GMPO_CONV_VERL) {
        // verl's masked_mean: / (sum of mask + 1e-8); M2 = ppo_kl
        cnt = N + 1e-8;
        mx[GMPO_MX_M0] = tot[GMPO_RS_M0] / cnt;
        mx[GMPO_MX_M1] = tot[GMPO_RS_M1] / cnt;
        mx[GMPO_MX_M2] = tot[GMPO_RS_COEF_KL] / cnt;
        mx[GMPO_MX_KL] = 0.0;
        mx[GMPO_MX_MAX_MU] = tot[GMPO_RS_MU];
        mx[GMPO_MX_NONFINITE] = tot[GMPO_RS_BAD];
        mx[GMPO_MX_TOKENS] = N;
        return;
    }
    if (a->algo == GMPO_ALGO_FAMILY) {
        // TRL's global_masked_mean: over tokens, or over rows where the metric
        // is one value per row (the sequence level, vespo's phi)
        if (a->fam.seq_level || a->loss_type == GMPO_LT_VESPO) cnt = B > 1.0 ? B : 1.0;
        mx[GMPO_MX_M0] = tot[GMPO_RS_M0] / cnt;
        mx[GMPO_MX_M1] = tot[GMPO_RS_M1] / cnt;
        mx[GMPO_MX_M2] = (tot[GMPO_RS_M0] + tot[GMPO_RS_M1]) / cnt;
        cnt = N > 1.0 ? N : 1.0;
    } else {
        mx[GMPO_MX_M0] = tot[GMPO_RS_M0] / cnt;
        mx[GMPO_MX_M1] = tot[GMPO_RS_M1] / cnt;
        mx[GMPO_MX_M2] = tot[GMPO_RS_M2] / cnt;
    }
    mx[GMPO_MX_KL] = tot[GMPO_RS_KL] / cnt;
    mx[GMPO_MX_MAX_MU] = tot[GMPO_RS_MU];
    mx[GMPO_MX_NONFINITE] = tot[GMPO_RS_BAD];
    mx[GMPO_MX_TOKENS] = N;
}

// fold one row's statistics into the running totals (fixed order = deterministic)
GMPO_HD void gmpo_totals_init(double *tot) {
    for (int k = 0; k < GMPO_ROW_STATS; k++) tot[k] = 0.0;
    tot[GMPO_RS_MU] = -INFINITY;
}

GMPO_HD void gmpo_totals_add_row(double *tot, const double *row) {
    for (int k = 0; k < GMPO_ROW_STATS; k++) {
        if (k == GMPO_RS_MU) {
            double mu = row[k];
            // max over non-empty rows, NaN ignored (the non-finite count flags it)
            if (row[GMPO_RS_N] != 0.0 && mu > tot[k]) tot[k] = mu;
        } else {
            tot[k] += row[k];
        }
    }
}

// combine two partial totals (for tree reductions)
GMPO_HD void gmpo_totals_merge(double *tot, const double *other) {
    for (int k = 0; k < GMPO_ROW_STATS; k++) {
        if (k == GMPO_RS_MU) { if (other[k] > tot[k]) tot[k] = other[k]; }
        else tot[k] += other[k];
    }
}

GMPO_HD void gmpo_totals_close(double *tot) {
    if (tot[GMPO_RS_MU] == -INFINITY) tot[GMPO_RS_MU] = 0.0;  // no non-empty row
}

// grpo: the weight of each token of row i in the loss (its backward factor)
GMPO_HD double gmpo_grpo_token_weight(const gmpo_args *a, const double *row, const double *tot) {
    double B = (double)a->B, N = tot[GMPO_RS_N], n = row[GMPO_RS_N];
    double d;
    switch (a->loss_type) {
    case GMPO_LT_GRPO: d = (B > 1.0 ? B : 1.0) * (n > 1.0 ? n : 1.0); break;
    case GMPO_LT_BNPO: d = N > 1.0 ? N : 1.0; break;
    case GMPO_LT_DR_GRPO: {
        double L = a->denom > 0 ? a->denom : (double)a->T;
        d = B * L > 1.0 ? B * L : 1.0;
        break;
    }
    default: d = a->denom > 0 ? a->denom : (N > 1.0 ? N : 1.0); break;
    }
    return 1.0 / (d * a->normalizer);
}

// The factors of row i's token gradients (fp64; the kernels cast them to their
// accumulation type): gmpo: pg = go*coef_pg/(B*norm), kl = go*coef_kl/(B*norm);
// grpo: pg = go*c_i (the row's token weight), kl = beta*pg. go: the upstream
// gradient; rows: the forward's (B+1) x GMPO_ROW_STATS statistics.
GMPO_HD void gmpo_row_grad_factors(const gmpo_args *a, const double *rows, int64_t i,
                                   double go, double *pg, double *kl) {
    const double *rs = rows + i * GMPO_ROW_STATS;
    if (a->algo == GMPO_ALGO_GMPO) {
        double scale = go / ((a->B > 1 ? (double)a->B : 1.0) * a->normalizer);
        *pg = rs[GMPO_RS_COEF_PG] * scale;
        *kl = rs[GMPO_RS_COEF_KL] * scale;
    } else {
        double c = go * gmpo_grpo_token_weight(a, rs, rows + a->B * GMPO_ROW_STATS);
        *pg = c;
        *kl = c * a->beta;
    }
}

#endif /* GMPO_MATH_H */
