/*
 * gmpo_math_impl.h -- included twice by gmpo_math.h, with GMPO_T = float and
 * GMPO_T = double (GMPO_S adds the suffix _f or _d). No include guard on purpose.
 *
 * The per-token functions are branch-free selects over plain scalars and take
 * their options as a small struct of plain values (gmpo_opts), so that a CPU
 * loop specialised on constant flags vectorises, and a CUDA thread keeps them
 * in registers.
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

// The options of gmpo_args the per-token math needs, as plain values.
typedef struct {
    int grpo;      // algorithm: 0 gmpo, 1 grpo
    int verl;      // gmpo convention verl (A == 0 drops the token; other metrics)
    int beta_on;   // beta != 0: the k3 KL term
    int isw;       // importance weights present (per row or per token)
    int isw_tok;   // ... and per token
    GMPO_T el, eh; // gmpo: log-space clip bounds; grpo: 1 - eps_low, 1 + eps_high
    GMPO_T C;      // safety clamp of l to [-C, C] (inf: none), gmpo only
    GMPO_T beta;
} GMPO_S(gmpo_opts);

GMPO_HD GMPO_S(gmpo_opts) GMPO_S(gmpo_opts_make)(const gmpo_args *a) {
    GMPO_S(gmpo_opts) o;
    o.grpo = a->algo == GMPO_ALGO_GRPO;
    o.verl = !o.grpo && a->convention == GMPO_CONV_VERL;
    o.beta_on = a->beta != 0;
    o.isw = a->is_w.data != 0;
    o.isw_tok = o.isw && a->is_w.stride_t != 0;
    o.el = (GMPO_T)(o.grpo ? 1.0 - a->eps_low : a->eps_low);
    o.eh = (GMPO_T)(o.grpo ? 1.0 + a->eps_high : a->eps_high);
    // no clamp is a clamp to [-inf, inf]: the same two selects, no branch
    o.C = (!o.grpo && a->log_ratio_clamp > 0) ? (GMPO_T)a->log_ratio_clamp : (GMPO_T)INFINITY;
    o.beta = (GMPO_T)a->beta;
    return o;
}

GMPO_HD void GMPO_S(gmpo_acc_zero)(GMPO_S(gmpo_acc) *s) {
    s->my = 0; s->n = 0; s->am = 0; s->logw = 0; s->k = 0;
    s->m0 = 0; s->m1 = 0; s->m2 = 0;
}

GMPO_HD void GMPO_S(gmpo_acc_merge)(GMPO_S(gmpo_acc) *s, const GMPO_S(gmpo_acc) *o) {
    s->my += o->my; s->n += o->n; s->am += o->am; s->logw += o->logw; s->k += o->k;
    s->m0 += o->m0; s->m1 += o->m1; s->m2 += o->m2;
}

// a row's sums to and from the GMPO_SUM_STATS fp64 values that processes
// sharing the row add up (rows split over ranks; gmpo.h, GMPO_SM_*)
GMPO_HD void GMPO_S(gmpo_acc_store)(const GMPO_S(gmpo_acc) *s, double *out) {
    out[GMPO_SM_MY] = (double)s->my; out[GMPO_SM_N] = (double)s->n;
    out[GMPO_SM_AM] = (double)s->am; out[GMPO_SM_LOGW] = (double)s->logw;
    out[GMPO_SM_K] = (double)s->k; out[GMPO_SM_M0] = (double)s->m0;
    out[GMPO_SM_M1] = (double)s->m1; out[GMPO_SM_M2] = (double)s->m2;
}

GMPO_HD void GMPO_S(gmpo_acc_load)(const double *in, GMPO_S(gmpo_acc) *s) {
    s->my = (GMPO_T)in[GMPO_SM_MY]; s->n = (GMPO_T)in[GMPO_SM_N];
    s->am = (GMPO_T)in[GMPO_SM_AM]; s->logw = (GMPO_T)in[GMPO_SM_LOGW];
    s->k = (GMPO_T)in[GMPO_SM_K]; s->m0 = (GMPO_T)in[GMPO_SM_M0];
    s->m1 = (GMPO_T)in[GMPO_SM_M1]; s->m2 = (GMPO_T)in[GMPO_SM_M2];
}

// the log-ratio after the safety clamp to [-C, C] (C = inf: none; NaN stays NaN)
GMPO_HD GMPO_T GMPO_S(gmpo_log_ratio)(GMPO_T lp, GMPO_T olp, GMPO_T C) {
    GMPO_T l = lp - olp;
    return l < -C ? -C : (l > C ? C : l);
}

// 1 iff the safety clamp passes the gradient: -C <= l <= C (NaN: 0)
GMPO_HD int GMPO_S(gmpo_in_clamp)(GMPO_T lp, GMPO_T olp, GMPO_T C) {
    GMPO_T l = lp - olp;
    return (l >= -C) & (l <= C);
}

// y: the token's one-sided clipped log-ratio (log-space clip, by advantage sign)
GMPO_HD GMPO_T GMPO_S(gmpo_clip_y)(GMPO_T l, GMPO_T A, GMPO_T el, GMPO_T eh, int verl) {
    GMPO_T up = l > eh ? eh : l;         // min(l, clamp(l)) == min(l, eps_high)
    GMPO_T down = l < -el ? -el : l;     // max(l, clamp(l)) == max(l, -eps_low)
    GMPO_T y = A > 0 ? up : down;
    // verl: sign(A) * min(sign(A) * l, ...) is 0 * l where A == 0: 0, or NaN
    // for a NaN or inf log-ratio, which must come out as NaN
    return (verl & (A == 0)) ? l * (GMPO_T)0 : y;
}

// g: 1 where y passes the gradient of l (not clipped; on the bound counts as not)
GMPO_HD int GMPO_S(gmpo_clip_gate)(GMPO_T l, GMPO_T A, GMPO_T el, GMPO_T eh, int verl) {
    int g = A > 0 ? (l <= eh) : (l >= -el);
    return (verl & (A == 0)) ? 0 : g;
}

// k3 KL estimator of the reference policy: e^d - d - 1 with d = ref - logp
GMPO_HD GMPO_T GMPO_S(gmpo_k3)(GMPO_T ref, GMPO_T lp) {
    GMPO_T d = ref - lp;
    return GMPO_EXP(d) - d - 1;
}

// The contributions of one token with mask value m (the caller drops tokens
// with m == 0 so that padding never enters the arithmetic). ref and w are read
// only when the options ask for them; w is the token's (or row's) weight.
GMPO_HD GMPO_S(gmpo_acc) GMPO_S(gmpo_token_contrib)(const GMPO_S(gmpo_opts) *o, GMPO_T m,
                                                    GMPO_T lp, GMPO_T olp, GMPO_T adv,
                                                    GMPO_T ref, GMPO_T w) {
    GMPO_S(gmpo_acc) c;
    c.n = m;
    c.am = m * adv;
    c.logw = 0;
    GMPO_T k3 = o->beta_on ? GMPO_S(gmpo_k3)(ref, lp) : (GMPO_T)0;
    c.k = m * k3;
    if (o->grpo) {
        // ratio-space PPO clip, TRL's formula: -min(rho*A, clamp(rho)*A)
        GMPO_T rho = GMPO_EXP(lp - olp);
        GMPO_T rc = rho < o->el ? o->el : (rho > o->eh ? o->eh : rho);
        GMPO_T t1 = rho * adv, t2 = rc * adv;
        GMPO_T loss = -(t2 < t1 ? t2 : t1);
        if (o->isw) loss *= w;
        if (o->beta_on) loss += o->beta * k3;
        c.my = m * loss;
        c.m0 = rho < o->el ? (adv < 0 ? m : (GMPO_T)0) : (GMPO_T)0;
        c.m1 = rho > o->eh ? (adv > 0 ? m : (GMPO_T)0) : (GMPO_T)0;
        c.m2 = c.m0 + c.m1;
        return c;
    }
    GMPO_T l = GMPO_S(gmpo_log_ratio)(lp, olp, o->C);
    c.my = m * GMPO_S(gmpo_clip_y)(l, adv, o->el, o->eh, o->verl);
    if (o->isw_tok) c.logw = m * GMPO_LOG(w + (GMPO_T)1e-10);
    // metrics as float selects (nested, not boolean algebra: it vectorises)
    if (o->verl) {
        // clipped: l != clamp(l); a NaN counts as clipped, as torch.ne says
        GMPO_T clipped = l >= -o->el ? (l <= o->eh ? (GMPO_T)0 : m) : m;
        c.m0 = adv > 0 ? clipped : (GMPO_T)0;
        c.m1 = adv < 0 ? clipped : (GMPO_T)0;
        c.m2 = -m * l;
    } else {
        c.m0 = l < -o->el ? (adv < 0 ? m : (GMPO_T)0) : (GMPO_T)0;
        c.m1 = l > o->eh ? (adv > 0 ? m : (GMPO_T)0) : (GMPO_T)0;
        c.m2 = c.m0 + c.m1;   // low and high exclude each other (sign of A)
    }
    return c;
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
    GMPO_T r = GMPO_EXP_ROW(mu);
    GMPO_T ahat;
    if (a->adv.stride_t) ahat = s->am / D;
    else ahat = verl ? adv_row * n / D : adv_row;
    GMPO_T w = 1;
    if (a->is_w.data) w = a->is_w.stride_t ? GMPO_EXP_ROW(s->logw / D) : w_row;
    // a zero advantage contributes exactly nothing, even when r overflowed to
    // inf (0 * inf); a NaN r (NaN among the row's tokens) stays NaN
    GMPO_T pg = (ahat == 0 && r == r) ? (GMPO_T)0 : -ahat * r * w;
    GMPO_T beta = (GMPO_T)a->beta;
    GMPO_T L = pg + (a->beta != 0 ? beta * s->k / D : (GMPO_T)0);
    rs[GMPO_RS_COEF_PG] = (double)(pg / D);
    rs[GMPO_RS_COEF_KL] = (double)(beta / D);
    rs[GMPO_RS_LOSS] = (double)L;
    rs[GMPO_RS_MU] = (double)mu;
    rs[GMPO_RS_BAD] = (L - L == 0) ? 0.0 : 1.0;
}

// d loss / d logp of one token with mask value m (0 gives exactly 0), already
// multiplied by grad_out. gmpo: pg = go*coef_pg/(B*norm), kl = go*coef_kl/(B*norm);
// grpo: pg = go*c_i (c_i the row's token weight), kl = beta*pg.
GMPO_HD GMPO_T GMPO_S(gmpo_token_grad_o)(const GMPO_S(gmpo_opts) *o, GMPO_T pg, GMPO_T kl,
                                         GMPO_T m, GMPO_T lp, GMPO_T olp, GMPO_T adv,
                                         GMPO_T ref, GMPO_T w) {
    GMPO_T g;
    if (o->grpo) {
        GMPO_T rho = GMPO_EXP(lp - olp);
        int pass = (adv > 0 ? rho <= o->eh : rho >= o->el) & (adv != 0);
        GMPO_T v = -adv * rho * pg;
        if (o->isw) v *= w;
        g = pass ? v : (GMPO_T)0;
    } else {
        GMPO_T l = GMPO_S(gmpo_log_ratio)(lp, olp, o->C);
        int pass = GMPO_S(gmpo_in_clamp)(lp, olp, o->C) &
                   GMPO_S(gmpo_clip_gate)(l, adv, o->el, o->eh, o->verl);
        g = pass ? pg : (GMPO_T)0;   // select, never 0 * inf
    }
    if (o->beta_on) g += kl * (1 - GMPO_EXP(ref - lp));
    return m != 0 ? m * g : (GMPO_T)0;
}
