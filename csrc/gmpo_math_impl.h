/*
 * gmpo_math_impl.h -- included twice by gmpo_math.h, with GMPO_T = float and
 * GMPO_T = double (GMPO_S adds the suffix _f or _d). No include guard on purpose.
 */

// Per-row sums a kernel accumulates over the tokens of one row.
typedef struct {
    GMPO_T my;    // sum m*y            (gmpo) | sum m*loss_t (grpo)
    GMPO_T n;     // sum m
    GMPO_T am;    // sum m*A            (token-level advantages)
    GMPO_T logw;  // sum m*log(w+1e-10) (token-level importance weights, gmpo)
    GMPO_T k;     // sum m*k3
    GMPO_T m0, m1, m2;  // metric sums, see GMPO_MX_*
} GMPO_S(gmpo_acc);

GMPO_HD void GMPO_S(gmpo_acc_zero)(GMPO_S(gmpo_acc) *s) {
    s->my = 0; s->n = 0; s->am = 0; s->logw = 0; s->k = 0;
    s->m0 = 0; s->m1 = 0; s->m2 = 0;
}

GMPO_HD void GMPO_S(gmpo_acc_merge)(GMPO_S(gmpo_acc) *s, const GMPO_S(gmpo_acc) *o) {
    s->my += o->my; s->n += o->n; s->am += o->am; s->logw += o->logw; s->k += o->k;
    s->m0 += o->m0; s->m1 += o->m1; s->m2 += o->m2;
}

// the log-ratio after the optional safety clamp to [-C, C] (C <= 0: none)
GMPO_HD GMPO_T GMPO_S(gmpo_log_ratio)(GMPO_T lp, GMPO_T olp, GMPO_T C) {
    GMPO_T l = lp - olp;
    if (C > 0) l = l < -C ? -C : (l > C ? C : l);
    return l;
}

// 1 iff the safety clamp passes the gradient (-C <= l <= C; no clamp: 1; NaN: 0)
GMPO_HD int GMPO_S(gmpo_in_clamp)(GMPO_T lp, GMPO_T olp, GMPO_T C) {
    GMPO_T l = lp - olp;
    return C > 0 ? (l >= -C && l <= C) : (l == l);
}

// y: the token's one-sided clipped log-ratio (log-space clip, by advantage sign)
GMPO_HD GMPO_T GMPO_S(gmpo_clip_y)(GMPO_T l, GMPO_T A, GMPO_T el, GMPO_T eh, int verl) {
    if (verl && A == 0) return 0;
    if (A > 0) return l > eh ? eh : l;   // min(l, clamp(l)) == min(l, eps_high)
    return l < -el ? -el : l;            // max(l, clamp(l)) == max(l, -eps_low)
}

// g: 1 where y passes the gradient of l (not clipped; on the bound counts as not)
GMPO_HD int GMPO_S(gmpo_clip_gate)(GMPO_T l, GMPO_T A, GMPO_T el, GMPO_T eh, int verl) {
    if (verl && A == 0) return 0;
    if (A > 0) return l <= eh;
    return l >= -el;
}

// k3 KL estimator of the reference policy: e^d - d - 1 with d = ref - logp
GMPO_HD GMPO_T GMPO_S(gmpo_k3)(GMPO_T ref, GMPO_T lp) {
    GMPO_T d = ref - lp;
    return GMPO_EXP(d) - d - 1;
}

// Accumulate one GMPO token (m != 0) into the row sums.
// a: token advantage; ref, w: used only when the options ask for them.
GMPO_HD void GMPO_S(gmpo_token_fwd)(GMPO_S(gmpo_acc) *s, const gmpo_args *a,
                                    GMPO_T m, GMPO_T lp, GMPO_T olp, GMPO_T adv,
                                    GMPO_T ref, GMPO_T w) {
    GMPO_T el = (GMPO_T)a->eps_low, eh = (GMPO_T)a->eps_high;
    int verl = a->convention == GMPO_CONV_VERL;
    GMPO_T l = GMPO_S(gmpo_log_ratio)(lp, olp, (GMPO_T)a->log_ratio_clamp);
    s->my += m * GMPO_S(gmpo_clip_y)(l, adv, el, eh, verl);
    s->n += m;
    s->am += m * adv;
    if (a->is_w.data && a->is_w.stride_t) s->logw += m * GMPO_LOG(w + (GMPO_T)1e-10);
    if (a->beta != 0) s->k += m * GMPO_S(gmpo_k3)(ref, lp);
    if (verl) {
        int clipped = !(l >= -el && l <= eh);     // l != clamp(l); NaN counts
        s->m0 += (clipped && adv > 0) ? m : 0;
        s->m1 += (clipped && adv < 0) ? m : 0;
        s->m2 -= m * l;
    } else {
        int low = l < -el && adv < 0, high = l > eh && adv > 0;
        s->m0 += low ? m : 0;
        s->m1 += high ? m : 0;
        s->m2 += (low || high) ? m : 0;
    }
}

// Accumulate one GRPO token (m != 0): ratio-space PPO clip, TRL's formula.
GMPO_HD void GMPO_S(grpo_token_fwd)(GMPO_S(gmpo_acc) *s, const gmpo_args *a,
                                    GMPO_T m, GMPO_T lp, GMPO_T olp, GMPO_T adv,
                                    GMPO_T ref, GMPO_T w) {
    GMPO_T lo = (GMPO_T)(1.0 - a->eps_low), hi = (GMPO_T)(1.0 + a->eps_high);
    GMPO_T rho = GMPO_EXP(lp - olp);
    GMPO_T rc = rho < lo ? lo : (rho > hi ? hi : rho);
    GMPO_T t1 = rho * adv, t2 = rc * adv;
    GMPO_T loss = -(t2 < t1 ? t2 : t1);
    if (a->is_w.data) loss *= w;
    if (a->beta != 0) {
        GMPO_T k = GMPO_S(gmpo_k3)(ref, lp);
        loss += (GMPO_T)a->beta * k;
        s->k += m * k;
    }
    s->my += m * loss;
    s->n += m;
    int low = rho < lo && adv < 0, high = rho > hi && adv > 0;
    s->m0 += low ? m : 0;
    s->m1 += high ? m : 0;
    s->m2 += (low || high) ? m : 0;
}

// Row sums -> the row's statistics (GMPO_ROW_STATS doubles).
// adv_row / w_row: the row's advantage and importance weight when they are per row.
GMPO_HD void GMPO_S(gmpo_row_finish)(const gmpo_args *a, const GMPO_S(gmpo_acc) *s,
                                     GMPO_T adv_row, GMPO_T w_row, double *rs) {
    GMPO_T n = s->n;
    rs[GMPO_RS_N] = (double)n;
    rs[GMPO_RS_M0] = (double)s->m0;
    rs[GMPO_RS_M1] = (double)s->m1;
    rs[GMPO_RS_M2] = (double)s->m2;
    rs[GMPO_RS_KL] = (double)s->k;
    if (a->algo == GMPO_ALGO_GRPO) {
        GMPO_T L = s->my;
        if (a->loss_type == GMPO_LT_GRPO) L = L / (n > 1 ? n : (GMPO_T)1);
        rs[GMPO_RS_COEF_PG] = 0.0;
        rs[GMPO_RS_COEF_KL] = 0.0;
        rs[GMPO_RS_LOSS] = (double)L;
        rs[GMPO_RS_MU] = 0.0;
        rs[GMPO_RS_BAD] = (L - L == 0) ? 0.0 : 1.0;
        return;
    }
    int verl = a->convention == GMPO_CONV_VERL;
    GMPO_T D = verl ? n + (GMPO_T)1e-8 : (n > 1 ? n : (GMPO_T)1);
    GMPO_T mu = s->my / D;
    GMPO_T r = GMPO_EXP(mu);
    GMPO_T ahat;
    if (a->adv.stride_t) ahat = s->am / D;
    else ahat = verl ? adv_row * n / D : adv_row;
    GMPO_T w = 1;
    if (a->is_w.data) w = a->is_w.stride_t ? GMPO_EXP(s->logw / D) : w_row;
    // a zero advantage contributes exactly nothing, even when r overflowed
    GMPO_T pg = ahat == 0 ? (GMPO_T)0 : -ahat * r * w;
    GMPO_T beta = (GMPO_T)a->beta;
    GMPO_T L = pg + (a->beta != 0 ? beta * s->k / D : (GMPO_T)0);
    rs[GMPO_RS_COEF_PG] = (double)(pg / D);
    rs[GMPO_RS_COEF_KL] = (double)(beta / D);
    rs[GMPO_RS_LOSS] = (double)L;
    rs[GMPO_RS_MU] = (double)mu;
    rs[GMPO_RS_BAD] = (L - L == 0) ? 0.0 : 1.0;
}

// d loss / d logp for one token (m != 0), before the factor grad_out.
// gmpo: pg = go*coef_pg/(B*norm), kl = go*coef_kl/(B*norm);
// grpo: pg = go*c_i (c_i the row's token weight), kl = beta*pg.
GMPO_HD GMPO_T GMPO_S(gmpo_token_grad)(const gmpo_args *a, GMPO_T pg, GMPO_T kl,
                                       GMPO_T m, GMPO_T lp, GMPO_T olp, GMPO_T adv,
                                       GMPO_T ref, GMPO_T w) {
    GMPO_T g = 0;
    if (a->algo == GMPO_ALGO_GMPO) {
        GMPO_T C = (GMPO_T)a->log_ratio_clamp;
        GMPO_T l = GMPO_S(gmpo_log_ratio)(lp, olp, C);
        int pass = GMPO_S(gmpo_in_clamp)(lp, olp, C) &&
                   GMPO_S(gmpo_clip_gate)(l, adv, (GMPO_T)a->eps_low, (GMPO_T)a->eps_high,
                                          a->convention == GMPO_CONV_VERL);
        if (pass) g = pg;
    } else if (adv != 0) {
        GMPO_T lo = (GMPO_T)(1.0 - a->eps_low), hi = (GMPO_T)(1.0 + a->eps_high);
        GMPO_T rho = GMPO_EXP(lp - olp);
        int pass = adv > 0 ? rho <= hi : rho >= lo;
        if (pass) {
            g = -adv * rho * pg;
            if (a->is_w.data) g *= w;
        }
    }
    if (a->beta != 0) g += kl * (1 - GMPO_EXP(ref - lp));
    return m * g;
}
