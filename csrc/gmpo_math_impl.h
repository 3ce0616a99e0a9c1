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
        // a NaN ratio (old_logps or logps NaN) passes its NaN, as TRL's autograd
        int pass = ((adv > 0 ? rho <= o->eh : rho >= o->el) & (adv != 0)) | (rho != rho);
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

// ----------------------------------------------------------------------------
// GMPO_ALGO_FAMILY: TRL 1.16's GRPO loss types with their options, per token
// (the per-row finish is gmpo_family_row_finish in gmpo_math.h, in fp64).
// TRL's GRPOTrainer._compute_loss, with coef = exp(l) at token level:
//   clip types (grpo, bnpo, dr_grpo, dapo, luspo): P = -min(c1 A, c2 A),
//       c1 = coef (min(coef, delta) with delta), c2 = clamp(coef, 1-el, 1+eh)
//   cispo: P = -sg(min(coef, eh)) A logp      sapo: P = -(4/tau) sigmoid(tau (coef-1)) A
//   vespo: P = -sg(phi_i) A logp (phi_i the row's gamma weight)
// The token's sums go into the slots gmpo.h lists for the family (GMPO_SM_*).

typedef struct {
    int type;        // gmpo_loss_type
    int seq;         // sequence level
    int delta_on, opm, bc, beta_on, isw;
    GMPO_T lo, hi;   // 1 - eps_low, 1 + eps_high (clip types); cispo: hi = eps_high
    GMPO_T delta, tpos, tneg;
    int verl;        // convention verl (verl's vanilla, gspo, cispo, sapo)
    GMPO_T cc;       // verl vanilla's dual clip clip_ratio_c (0: none)
} GMPO_S(gmpo_fam_opts);

GMPO_HD GMPO_S(gmpo_fam_opts) GMPO_S(gmpo_fam_opts_make)(const gmpo_args *a) {
    GMPO_S(gmpo_fam_opts) o;
    o.type = a->loss_type;
    o.seq = a->fam.seq_level != 0;
    o.delta_on = a->fam.has_delta != 0;
    o.opm = a->fam.off_policy != 0;
    o.bc = a->fam.bias_corr_kl != 0;
    o.beta_on = a->beta != 0;
    o.isw = a->is_w.data != 0;
    o.lo = (GMPO_T)(1.0 - a->eps_low);
    o.verl = a->convention == GMPO_CONV_VERL;
    o.cc = (GMPO_T)(o.verl ? a->fam.clip_c : 0.0);
    // cispo: TRL caps the ratio at eps_high itself, verl clips it to [1-el, 1+eh]
    o.hi = (GMPO_T)(a->loss_type == GMPO_LT_CISPO && !o.verl ? a->eps_high : 1.0 + a->eps_high);
    o.delta = (GMPO_T)a->fam.delta;
    o.tpos = (GMPO_T)a->fam.sapo_tpos;
    o.tneg = (GMPO_T)a->fam.sapo_tneg;
    return o;
}

GMPO_HD int GMPO_S(gmpo_fam_clip_type)(int type) {
    return type <= GMPO_LT_DAPO || type == GMPO_LT_LUSPO;
}

// sigmoid(x) without overflow; and sigmoid'(x) * e^l = e^(l - |x|) / (1 + e^-|x|)^2,
// which stays finite (0) where e^l and |x| overflow together
GMPO_HD GMPO_T GMPO_S(gmpo_sigmoid)(GMPO_T x) {
    GMPO_T e = GMPO_EXP(-(x < 0 ? -x : x));
    return x >= 0 ? 1 / (1 + e) : e / (1 + e);
}

GMPO_HD GMPO_T GMPO_S(gmpo_dsigmoid_scaled)(GMPO_T x, GMPO_T l) {
    GMPO_T ax = x < 0 ? -x : x;
    GMPO_T e = GMPO_EXP(-ax);
    return GMPO_EXP(l - ax) / ((1 + e) * (1 + e));
}

// nan_to_num(x, nan=0) as TRL's off-policy mask takes it (+-inf to the largest finite)
GMPO_HD GMPO_T GMPO_S(gmpo_nan0)(GMPO_T x) {
    const GMPO_T big = sizeof(GMPO_T) == 4 ? (GMPO_T)3.4028234663852886e38 : (GMPO_T)1.7976931348623157e308;
    return x != x ? (GMPO_T)0 : (x > big ? big : (x < -big ? -big : x));
}

// The token-level clip surrogate: the loss P and dP/dcoef (PyTorch's min
// backward splits a tie in halves; clamp passes the gradient at its bounds).
GMPO_HD GMPO_T GMPO_S(gmpo_fam_clip)(const GMPO_S(gmpo_fam_opts) *o, GMPO_T rho, GMPO_T A,
                                     GMPO_T *dP) {
    GMPO_T c1 = (o->delta_on && rho > o->delta) ? o->delta : rho;
    GMPO_T c2 = rho < o->lo ? o->lo : (rho > o->hi ? o->hi : rho);
    GMPO_T g1 = (o->delta_on && !(rho <= o->delta)) ? (GMPO_T)0 : (GMPO_T)1;
    GMPO_T g2 = (rho >= o->lo && rho <= o->hi) ? (GMPO_T)1 : (GMPO_T)0;
    GMPO_T v1 = c1 * A, v2 = c2 * A;
    GMPO_T d = v1 < v2 ? g1 : (v2 < v1 ? g2 : (g1 + g2) * (GMPO_T)0.5);
    *dP = -A * d;
    return -(v2 < v1 ? v2 : v1);
}

// verl's per-token maps (convention verl; core_algos of verl 0.6 to 0.9): l is
// clamped to [-20, 20] before exp (no gradient outside) in vanilla, cispo and
// sapo; vanilla's loss is the clip surrogate, for A < 0 capped at -A * clip_c
// (dual clip); cispo's is -sg(clamp(r, 1-el, 1+eh)) A logp; sapo's TRL's gate.
// gspo only sums here (its ratio is the row's, gmpo_verl_row_finish).
GMPO_HD GMPO_T GMPO_S(gmpo_verl_clamp20)(GMPO_T l) {
    return l < -20 ? (GMPO_T)-20 : (l > 20 ? (GMPO_T)20 : l);   // NaN stays NaN
}

// vanilla's loss at ratio rho: P and dP/drho (the dual clip's tie passes half)
GMPO_HD GMPO_T GMPO_S(gmpo_verl_vanilla)(const GMPO_S(gmpo_fam_opts) *o, GMPO_T rho, GMPO_T A,
                                         GMPO_T *dP, int *lower) {
    GMPO_T P = GMPO_S(gmpo_fam_clip)(o, rho, A, dP);
    *lower = 0;
    if (o->cc > 0 && A < 0) {
        GMPO_T P3 = -A * o->cc;
        *lower = P > P3;
        if (P > P3) { *dP = 0; P = P3; }
        else if (P == P3) *dP *= (GMPO_T)0.5;
    }
    return P;
}

GMPO_HD void GMPO_S(gmpo_verl_token)(const GMPO_S(gmpo_fam_opts) *o, GMPO_T m, GMPO_T l,
                                     GMPO_T lp, GMPO_T A, GMPO_T wt, GMPO_S(gmpo_acc) *c) {
    if (o->seq) {   // gspo
        c->my = m * l;
        c->am = A > 0 ? m * wt * A : (GMPO_T)0;
        c->m2 = A > 0 ? (GMPO_T)0 : m * wt * A;
        c->m0 = A > 0 ? m : (GMPO_T)0;
        c->m1 = A < 0 ? m : (GMPO_T)0;
        return;
    }
    GMPO_T lc = GMPO_S(gmpo_verl_clamp20)(l);
    GMPO_T rho = GMPO_EXP(lc);
    c->am = -m * lc;
    if (o->type == GMPO_LT_CISPO) {
        GMPO_T cr = rho < o->lo ? o->lo : (rho > o->hi ? o->hi : rho);
        c->my = m * wt * (-cr * A * lp);
        c->m0 = rho != cr ? m : (GMPO_T)0;
    } else if (o->type == GMPO_LT_SAPO) {
        GMPO_T tau = A > 0 ? o->tpos : o->tneg;
        c->my = m * wt * (-GMPO_S(gmpo_sigmoid)(tau * (rho - 1)) * 4 / tau * A);
    } else {
        GMPO_T dP, cr = rho < o->lo ? o->lo : (rho > o->hi ? o->hi : rho);
        int lower;
        GMPO_T P = GMPO_S(gmpo_verl_vanilla)(o, rho, A, &dP, &lower);
        c->my = m * wt * P;
        c->m0 = -A * cr > -A * rho ? m : (GMPO_T)0;   // verl: pg_losses2 > pg_losses1
        c->m1 = lower ? m : (GMPO_T)0;
    }
}

// d P_t / d logp of a verl token (times w; gspo: 0, its factor is the row's)
GMPO_HD GMPO_T GMPO_S(gmpo_verl_grad)(const GMPO_S(gmpo_fam_opts) *o, GMPO_T l, GMPO_T A) {
    GMPO_T lc = GMPO_S(gmpo_verl_clamp20)(l);
    GMPO_T rho = GMPO_EXP(lc);
    int pass = l >= -20 && l <= 20;   // clamp passes the gradient at its bounds
    if (o->type == GMPO_LT_CISPO) {
        GMPO_T cr = rho < o->lo ? o->lo : (rho > o->hi ? o->hi : rho);
        return -cr * A;   // the ratio is detached: the gradient is logp's own
    }
    // selects, no early return on the data: the CPU loops stay vector code
    GMPO_T d;
    if (o->type == GMPO_LT_SAPO) {
        GMPO_T tau = A > 0 ? o->tpos : o->tneg;
        d = -A * 4 * GMPO_S(gmpo_dsigmoid_scaled)(tau * (rho - 1), lc);
    } else {
        GMPO_T dP;
        int lower;
        GMPO_S(gmpo_verl_vanilla)(o, rho, A, &dP, &lower);
        d = dP == 0 ? (GMPO_T)0 : dP * rho;
    }
    return pass ? d : (GMPO_T)0;
}

// One masked token's sums (m != 0; the caller skips padding). tm: its token
// mask, slp: the sampler's log-prob, w: its importance weight (1 if none).
GMPO_HD GMPO_S(gmpo_acc) GMPO_S(gmpo_fam_token)(const GMPO_S(gmpo_fam_opts) *o, GMPO_T m,
                                                GMPO_T tm, GMPO_T lp, GMPO_T olp, GMPO_T slp,
                                                GMPO_T A, GMPO_T ref, GMPO_T w) {
    GMPO_S(gmpo_acc) c;
    GMPO_T l = lp - olp;
    GMPO_T rho = GMPO_EXP(l);
    c.n = m;
    c.am = o->opm ? m * GMPO_S(gmpo_nan0)(slp - lp) : (GMPO_T)0;
    c.logw = 0;
    c.k = 0;
    if (o->beta_on) {
        GMPO_T k3 = GMPO_S(gmpo_k3)(ref, lp);
        c.k = m * ((o->bc && !o->seq) ? k3 * rho : k3);
    }
    c.my = 0; c.m0 = 0; c.m1 = 0; c.m2 = 0;
    GMPO_T wt = o->isw ? w : (GMPO_T)1;
    if (o->verl) {
        GMPO_S(gmpo_verl_token)(o, m, l, lp, A, wt, &c);
        return c;
    }
    if (o->type == GMPO_LT_VESPO) {
        c.my = m * tm * lp;
        c.m0 = m * (l < -20 ? (GMPO_T)-20 : (l > 20 ? (GMPO_T)20 : l));
        c.m1 = m * l;
    } else if (o->seq) {
        c.my = m * l;
        c.m0 = m * tm * wt * (o->type == GMPO_LT_CISPO ? lp : (GMPO_T)1);
    } else if (o->type == GMPO_LT_CISPO) {
        c.my = m * tm * wt * (-(rho > o->hi ? o->hi : rho) * A * lp);
        c.m0 = (rho > o->hi && A > 0) ? m : (GMPO_T)0;
    } else if (o->type == GMPO_LT_SAPO) {
        GMPO_T tau = A > 0 ? o->tpos : o->tneg;
        c.my = m * tm * wt * (-GMPO_S(gmpo_sigmoid)(tau * (rho - 1)) * 4 / tau * A);
    } else {
        GMPO_T dP;
        GMPO_T P = GMPO_S(gmpo_fam_clip)(o, rho, A, &dP);
        GMPO_T c1 = (o->delta_on && rho > o->delta) ? o->delta : rho;
        c.my = m * tm * wt * P;
        c.m0 = (c1 < o->lo && A < 0) ? m : (GMPO_T)0;
        c.m1 = (c1 > o->hi && A > 0) ? m : (GMPO_T)0;
    }
    return c;
}

// vespo's unmasked sum over every token of clamp(log w, log 1e-8, 20)
GMPO_HD GMPO_T GMPO_S(gmpo_fam_logis)(GMPO_T w) {
    GMPO_T lw = GMPO_LOG(w);
    const GMPO_T lo = (GMPO_T)-18.420680743952367;   // log(1e-8)
    return lw < lo ? lo : (lw > 20 ? (GMPO_T)20 : lw);   // NaN stays NaN
}

// d loss / d logp of one token (0 where m == 0; branch-free, so that a CPU loop
// over tokens vectorises). pg1: the row's factor of the
// per-token policy gradient (go * token weight * COEF_PG), pc: every masked
// token's term (go * token weight * the row's M2), kl: go * token weight * COEF_KL.
GMPO_HD GMPO_T GMPO_S(gmpo_fam_grad)(const GMPO_S(gmpo_fam_opts) *o, GMPO_T pg1, GMPO_T pc,
                                     GMPO_T kl, GMPO_T m, GMPO_T tm, GMPO_T lp, GMPO_T olp,
                                     GMPO_T A, GMPO_T ref, GMPO_T w) {
    GMPO_T l = lp - olp;
    GMPO_T wt = o->isw ? w : (GMPO_T)1;
    GMPO_T t = 0;   // d P_t / d logp, times tm (and w)
    if (o->verl) {
        // gspo: the row's factor by the sign of A (pg1 for A > 0, pc otherwise)
        GMPO_T f = o->seq ? (A > 0 ? pg1 : pc) : pg1;
        t = o->seq ? -A : GMPO_S(gmpo_verl_grad)(o, l, A);
        GMPO_T gv = (t == 0 || f == 0) ? (GMPO_T)0 : f * t * wt;
        return m != 0 ? m * gv : (GMPO_T)0;
    }
    if (o->type == GMPO_LT_VESPO) {
        t = -A * tm;
    } else if (o->seq) {
        t = o->type == GMPO_LT_CISPO ? -A * tm * wt : (GMPO_T)0;
    } else {
        GMPO_T rho = GMPO_EXP(l);
        if (o->type == GMPO_LT_CISPO) {
            t = -(rho > o->hi ? o->hi : rho) * A;
        } else if (o->type == GMPO_LT_SAPO) {
            GMPO_T tau = A > 0 ? o->tpos : o->tneg;
            t = -A * 4 * GMPO_S(gmpo_dsigmoid_scaled)(tau * (rho - 1), l);
        } else {
            GMPO_T dP;
            GMPO_S(gmpo_fam_clip)(o, rho, A, &dP);
            t = dP == 0 ? (GMPO_T)0 : dP * rho;   // a clipped token passes 0, never 0 * inf
        }
        t = t == 0 ? (GMPO_T)0 : t * tm * wt;
    }
    GMPO_T g = pc + (t == 0 ? (GMPO_T)0 : pg1 * t);
    if (o->beta_on) {
        GMPO_T d = ref - lp;
        GMPO_T dk = (o->bc && !o->seq) ? GMPO_EXP(l) * (lp - ref) : 1 - GMPO_EXP(d);
        g += kl * dk;
    }
    return m != 0 ? m * g : (GMPO_T)0;   // a select: padding's values never leak
}
