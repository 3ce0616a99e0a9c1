"""gmpo_loss against the float64 oracle (gmpo_ext.reference), the published
formulas (TRL's GMPOTrainer and verl's geo_mean loss) and finite differences.

GMPO: Geometric-Mean Policy Optimization, arXiv 2507.20673. Every test here
runs on each backend of conftest.BACKENDS (the C core; the CUDA kernels under
emulation or on a GPU when listed).
"""

from __future__ import annotations

import math

import pytest
import torch

import gmpo_ext
from gmpo_ext.reference import gmpo_loss_reference

from _helpers import (DTYPE_IDS, DTYPES, TOLS, UPSTREAM, Case, assert_close_grad,
                      assert_close_loss, check_parity, loss_scale,
                      make_case, run_fused, run_ref)

pytestmark = pytest.mark.usefixtures("backend")

CONVENTIONS = ["trl", "verl"]
SIZES = [(B, T) for T in (1, 97, 4097) for B in (1, 3, 8)]
MASKS = ["bool", "int", "float"]
ADVS = ["B", "B1", "BT"]


def parity(case, device, **kw):
    return check_parity(gmpo_ext.gmpo_loss, gmpo_loss_reference, case, device, **kw)


# ----------------------------------------------------------------------------
# the grid: every dtype, both conventions, awkward sizes, every mask and
# advantage kind (rotated so that the 9 sizes cover all 9 mask x advantage pairs)

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("B,T", SIZES, ids=[f"B{B}xT{T}" for B, T in SIZES])
def test_parity_grid(dtype, convention, B, T, device):
    j = SIZES.index((B, T))
    for k, mask_kind in enumerate(MASKS):
        adv_shape = ADVS[(k + j) % 3]
        case = make_case(B, T, dtype=dtype, mask_kind=mask_kind, adv_shape=adv_shape,
                         seed=1000 * j + k)
        parity(case, device, convention=convention)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_beta_kl_with_ref_logps(dtype, convention, device):
    case = make_case(5, 97, dtype=dtype, ref=True, seed=11)
    _, metrics, _ = parity(case, device, convention=convention, beta=0.04)
    assert "kl" in metrics and float(metrics["kl"]) > 0
    # ref_logps is ignored when beta == 0: same as not passing it
    l0 = gmpo_ext.gmpo_loss(case.logps.to(device), case.old_logps.to(device),
                            case.advantages.to(device), case.mask.to(device),
                            convention=convention)
    l1 = gmpo_ext.gmpo_loss(case.logps.to(device), case.old_logps.to(device),
                            case.advantages.to(device), case.mask.to(device),
                            ref_logps=case.ref_logps.to(device), convention=convention)
    assert torch.equal(l0, l1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("isw", ["B", "BT"])
def test_is_weights(dtype, convention, isw, device):
    case = make_case(6, 97, dtype=dtype, is_weights=isw, seed=12, adv_shape="BT" if isw == "BT" else "B")
    loss_w, _, _ = parity(case, device, convention=convention)
    loss_1, _, _ = run_fused(gmpo_ext.gmpo_loss, case.with_(is_weights=None), device,
                             convention=convention)
    assert float(loss_w) != float(loss_1)  # the weights do something


def test_is_weights_b1_is_per_row(device):
    case = make_case(5, 33, is_weights="B", seed=13)
    got = run_fused(gmpo_ext.gmpo_loss, case.with_(is_weights=case.is_weights[:, None]), device)
    ref = run_fused(gmpo_ext.gmpo_loss, case, device)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_log_ratio_clamp(dtype, convention, device):
    # log-ratios N(0, 2): many beyond the clamp of 1.5 on both sides
    case = make_case(6, 97, dtype=dtype, spread=2.0, seed=14)
    parity(case, device, convention=convention, log_ratio_clamp=1.5, epsilon_low=2.0,
           epsilon_high=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("eps", [(0.2, 0.28), (0.0, 0.0), (0.4, None), (1.0, 0.1)])
def test_epsilons_and_normalizer(dtype, convention, eps, device):
    case = make_case(7, 97, dtype=dtype, seed=15, adv_shape="BT")
    parity(case, device, convention=convention, epsilon_low=eps[0], epsilon_high=eps[1],
           normalizer=3.0)
    # the loss and gradient scale exactly as 1/normalizer
    l1, _, g1 = run_fused(gmpo_ext.gmpo_loss, case, device, convention=convention,
                          epsilon_low=eps[0], epsilon_high=eps[1])
    l4, _, g4 = run_fused(gmpo_ext.gmpo_loss, case, device, convention=convention,
                          epsilon_low=eps[0], epsilon_high=eps[1], normalizer=4.0)
    assert torch.equal(l4, l1 / 4) and torch.equal(g4, g1 / 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_mixed_input_dtypes(dtype, convention, device):
    case = make_case(4, 50, dtype=dtype, ref=True, is_weights="BT", seed=16, adv_shape="BT")
    case = case.with_(old_logps=case.old_logps.to(torch.bfloat16).to(torch.float32),
                      advantages=case.advantages.to(torch.float64),
                      mask=case.mask.to(torch.float64),
                      ref_logps=case.ref_logps.to(torch.float16),
                      is_weights=case.is_weights.to(torch.float64))
    _, _, grad = parity(case, device, convention=convention, beta=0.1)
    assert grad.dtype == dtype


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int8, torch.int32,
                                        torch.int64, torch.float16, torch.bfloat16,
                                        torch.float32, torch.float64])
def test_mask_dtypes(mask_dtype, device):
    case = make_case(5, 40, seed=17)
    parity(case.with_(mask=case.mask.to(mask_dtype)), device)


# ----------------------------------------------------------------------------
# exact ties on the clip bounds: exactly on a bound counts as not clipped

def _tie_case(dtype, el, eh, adv_shape):
    """Rows whose log-ratios sit exactly on +eps_high or -eps_low.

    logps are multiples of 1/4 in [-3, -0.5]: subtracting eps in {0.25, 0.5} is
    exact in every dtype, so l == eps bit for bit in the kernel and the oracle.
    """
    g = torch.Generator().manual_seed(3)
    B, T = 6, 12
    lp = -0.5 - torch.randint(0, 11, (B, T), generator=g).to(torch.float64) / 4
    l = torch.zeros(B, T, dtype=torch.float64)
    a = torch.tensor([1.0, -1.0, 0.7, -0.6, 1.3, -1.1], dtype=torch.float64)
    l[0] = eh        # A > 0, every token on the upper bound
    l[1] = -el       # A < 0, every token on the lower bound
    l[2, ::2] = eh   # half on the bound, half inside
    l[2, 1::2] = 0.25 * (torch.arange(6) % 2 - 0.5).to(torch.float64)
    l[3, ::2] = -el
    l[4] = -el       # on the bound that does not matter for the sign
    l[5] = eh
    old = lp - l
    assert torch.equal(lp - old, l)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[3, -3:] = False
    adv = a if adv_shape == "B" else a[:, None].expand(B, T).contiguous()
    return Case(lp.to(dtype), old.to(dtype), adv.to(torch.float32 if dtype != torch.float64 else dtype), mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("eps", [(0.5, 0.5), (0.25, 0.5), (0.5, 0.25)])
@pytest.mark.parametrize("adv_shape", ["B", "BT"])
def test_ties_on_clip_bounds(dtype, convention, eps, adv_shape, device):
    el, eh = eps
    case = _tie_case(dtype, el, eh, adv_shape)
    # the log-ratios sit exactly on the bounds, in fp64 and in the dtype itself
    for l in (case.logps.double() - case.old_logps.double(), (case.logps - case.old_logps).double()):
        assert (l[0] == eh).all() and (l[1] == -el).all() and (l[3, ::2] == -el).all()
    loss, metrics, grad = parity(case, device, convention=convention, epsilon_low=el,
                                 epsilon_high=eh)
    # nothing is strictly beyond a bound
    names = (("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
             if convention == "trl" else ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"))
    for k in names:
        assert float(metrics[k]) == 0.0, k
    # the gradient is the unclipped one, bit for bit: with eps = 10 nothing is clipped
    # and y == l gives the same mu
    wloss, _, wgrad = run_fused(gmpo_ext.gmpo_loss, case, device, convention=convention,
                                epsilon_low=10.0, epsilon_high=10.0)
    assert torch.equal(loss, wloss)
    assert torch.equal(grad, wgrad)
    assert (grad[case.mask] != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_one_ulp_beyond_the_bound_is_clipped(dtype, convention, device):
    # l = 0.5 + 2^-20 (exact in fp32 near 1.75) for A > 0 and -0.5 - 2^-20 for A < 0
    lp = torch.tensor([[-1.25, -1.25, -1.0], [-1.25, -1.25, -1.0]], dtype=torch.float64)
    d = 0.5 + 2.0 ** -20
    old = torch.tensor([[-1.25 - d, -1.75, -1.1], [-1.25 + d, -0.75, -0.9]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=dtype)
    mask = torch.ones(2, 3, dtype=torch.bool)
    case = Case(lp.to(dtype), old.to(dtype), adv, mask)
    loss, metrics, grad = parity(case, device, convention=convention, epsilon_low=0.5,
                                 epsilon_high=0.5)
    assert float(grad[0, 0]) == 0.0 and float(grad[1, 0]) == 0.0   # beyond: clipped
    assert float(grad[0, 1]) != 0.0 and float(grad[1, 1]) != 0.0   # on the bound: passes
    frac = 2.0 / 6.0
    if convention == "trl":
        assert float(metrics["clip_ratio/region_mean"]) == pytest.approx(frac, rel=1e-6)
    else:
        assert float(metrics["actor/pg_clipfrac"]) == pytest.approx(1 / 6, rel=1e-6)
        assert float(metrics["actor/pg_clipfrac_lower"]) == pytest.approx(1 / 6, rel=1e-6)


# ----------------------------------------------------------------------------
# huge ratios with negative advantages

def _huge_case(dtype):
    B, T = 4, 6
    lp = torch.full((B, T), -1.0, dtype=torch.float64)
    l = torch.zeros(B, T, dtype=torch.float64)
    l[0] = 100.0                                     # A < 0: mu = 100, e^100 > fp32 max
    l[1] = torch.tensor([0.1, -0.2, 0.3, 0.05, -0.5, 0.0])
    l[2] = 100.0                                     # A > 0: clipped to eps_high
    l[3] = torch.tensor([100.0, 100.0, 100.0, 0.125, 0.125, 0.125])  # A < 0: mu ~ 50
    old = lp - l
    adv = torch.tensor([-1.0, 0.5, 1.0, -0.7])
    if dtype == torch.float64:
        adv = adv.double()
    return Case(lp.to(dtype), old.to(dtype), adv, torch.ones(B, T, dtype=torch.bool))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_huge_ratio_negative_advantage_overflows_and_is_flagged(dtype, convention, device):
    case = _huge_case(dtype)
    loss, metrics, grad = run_fused(gmpo_ext.gmpo_loss, case, device, convention=convention)
    assert float(metrics["gmpo/max_mean_log_ratio"]) == pytest.approx(100.0, rel=1e-6)
    if dtype == torch.float64:
        # e^100 ~ 2.7e43 is finite in fp64: the plain oracle applies
        parity(case, device, convention=convention)
        assert float(metrics["gmpo/nonfinite_rows"]) == 0
        return
    # fp32 accumulation: exp(100) = inf, row 0's term is +inf
    assert math.isinf(float(loss)) and float(loss) > 0
    assert float(metrics["gmpo/nonfinite_rows"]) == 1.0
    # the other rows' gradients are untouched by row 0's overflow
    _, _, rgrad = run_ref(gmpo_loss_reference, case, convention=convention)
    rows = [1, 2] + ([3] if dtype != torch.float16 else [])  # row 3's gradient ~1e21: beyond fp16
    assert_close_grad(grad[rows], rgrad[rows], dtype, TOLS[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_huge_ratio_with_log_ratio_clamp_is_finite(dtype, convention, device):
    case = _huge_case(dtype)
    loss, metrics, grad = parity(case, device, convention=convention, log_ratio_clamp=20.0)
    assert math.isfinite(float(loss))
    assert float(metrics["gmpo/nonfinite_rows"]) == 0
    assert float(metrics["gmpo/max_mean_log_ratio"]) == pytest.approx(20.0, rel=1e-6)
    assert torch.isfinite(grad).all()
    # tokens beyond the clamp get no gradient; the in-range ones of row 3 do
    assert (grad[0] == 0).all() and (grad[3, :3] == 0).all() and (grad[3, 3:] != 0).all()


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_zero_advantage_row_contributes_nothing_even_when_exp_overflows(convention, device):
    lp = torch.full((2, 4), -1.0)
    old = lp - torch.tensor([[100.0] * 4, [0.1, 0.2, -0.1, 0.0]])
    adv = torch.tensor([0.0, 1.0])
    case = Case(lp, old, adv, torch.ones(2, 4, dtype=torch.bool))
    loss, metrics, grad = parity(case, device, convention=convention)
    assert math.isfinite(float(loss)) and float(metrics["gmpo/nonfinite_rows"]) == 0
    assert (grad[0] == 0).all()


# ----------------------------------------------------------------------------
# empty rows, zero advantages, B = 0, T = 0

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_empty_rows_and_zero_advantages(dtype, convention, device):
    case = make_case(5, 20, dtype=dtype, seed=21, ref=True, is_weights="BT")
    case.mask[3] = 0                      # a second empty row, with a negative advantage
    case.advantages[3] = -0.8
    case.advantages[4] = 0.0
    loss, metrics, grad = parity(case, device, convention=convention, beta=0.05)
    assert (grad[1] == 0).all() and (grad[3] == 0).all()
    assert torch.isfinite(grad).all()
    # trl: an empty row contributes -A_i; verl: nothing
    base = case.with_(mask=case.mask.clone())
    lo, _, _ = run_fused(gmpo_ext.gmpo_loss, base, device, convention=convention, beta=0.05)
    a3 = float(case.advantages[3])
    changed = case.with_(advantages=case.advantages.clone())
    changed.advantages[3] = a3 + 1.0
    l2, _, _ = run_fused(gmpo_ext.gmpo_loss, changed, device, convention=convention, beta=0.05)
    if convention == "trl":
        assert float(l2) - float(lo) == pytest.approx(-1.0 / 5, rel=1e-5)
    else:
        assert float(l2) == float(lo)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_all_masked_row_gives_finite_zero_gradient_row(dtype, convention, device):
    case = make_case(3, 64, dtype=dtype, seed=22, ref=True, empty_row=False)
    case.mask[1] = False
    # garbage in the padding of the empty row must not matter
    case.logps[1, ::3] = float("nan")
    case.old_logps[1, 1::3] = float("inf")
    loss, _, grad = parity(case, device, convention=convention, beta=0.1)
    assert math.isfinite(float(loss))
    assert (grad[1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("adv_shape", ["B", "BT"])
def test_batch_of_zero_rows(dtype, convention, adv_shape, device):
    T = 7
    lp = torch.zeros(0, T, dtype=dtype, device=device, requires_grad=True)
    adv = torch.zeros((0,) if adv_shape == "B" else (0, T), device=device)
    loss, metrics = gmpo_ext.gmpo_loss(lp, lp.detach(), adv, torch.zeros(0, T, dtype=torch.bool, device=device),
                                       convention=convention, return_metrics=True)
    assert loss.dim() == 0 and float(loss.detach()) == 0.0
    for k, v in metrics.items():
        assert math.isfinite(float(v)), k
    (loss * UPSTREAM).backward()
    assert lp.grad.shape == (0, T) and lp.grad.dtype == dtype


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("adv_shape", ["B", "BT"])
def test_zero_tokens_per_row(convention, adv_shape, device):
    # T = 0: every row is empty. trl: -mean(A) for per-row advantages, 0 for
    # token-level ones (their masked mean over no tokens is 0); verl: 0.
    B = 3
    lp = torch.zeros(B, 0, requires_grad=True)
    adv = torch.tensor([0.5, -1.0, 2.0]) if adv_shape == "B" else torch.zeros(B, 0)
    case = Case(lp.detach(), lp.detach(), adv, torch.zeros(B, 0, dtype=torch.bool))
    loss, _, grad = parity(case, device, convention=convention)
    assert grad.shape == (B, 0)
    expected = -0.5 if (convention == "trl" and adv_shape == "B") else 0.0
    assert float(loss) == pytest.approx(expected, abs=1e-7)


# ----------------------------------------------------------------------------
# NaN in, NaN out (and a flag); padding never enters

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("where", ["logps", "old_logps"])
def test_nan_in_a_real_token_gives_nan_and_is_counted(dtype, convention, where, device):
    case = make_case(4, 30, dtype=dtype, seed=23, empty_row=False, zero_adv=False)
    getattr(case, where)[0, 0] = float("nan")
    assert case.mask[0, 0]
    loss, metrics, grad = run_fused(gmpo_ext.gmpo_loss, case, device, convention=convention)
    assert math.isnan(float(loss))
    assert float(metrics["gmpo/nonfinite_rows"]) >= 1
    # the other rows' gradients are unaffected
    _, _, rgrad = run_ref(gmpo_loss_reference, case, convention=convention)
    assert_close_grad(grad[1:], rgrad[1:], dtype, TOLS[dtype], mask=case.mask[1:])


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_nan_in_a_real_token_of_a_zero_advantage_row_is_not_silent(convention, device):
    # "NaN in gives NaN out and a metric flag" (issue 2, item 6): a row whose
    # advantage is exactly 0 must not swallow a NaN in one of its real tokens.
    # TRL (-coef * 0 with coef NaN), verl (sign(0) * NaN) and the oracle all give NaN.
    case = make_case(4, 30, seed=24, empty_row=False, zero_adv=False)
    case.advantages[1] = 0.0
    case.logps[1, 3] = float("nan")
    assert case.mask[1, 3]
    rloss, _, _ = run_ref(gmpo_loss_reference, case, convention=convention)
    assert math.isnan(float(rloss))
    loss, metrics, _ = run_fused(gmpo_ext.gmpo_loss, case, device, convention=convention)
    assert math.isnan(float(loss)), f"NaN in a real token was dropped: loss {float(loss)}"
    assert float(metrics["gmpo/nonfinite_rows"]) >= 1


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_nan_in_masked_tokens_stays_finite(dtype, convention, device):
    case = make_case(4, 30, dtype=dtype, seed=25, ref=True, is_weights="BT", adv_shape="BT")
    pad = case.mask == 0
    assert pad.any()
    for t in (case.logps, case.old_logps, case.ref_logps, case.is_weights):
        t[pad] = float("nan")
    case.advantages[pad] = float("inf")
    loss, metrics, grad = parity(case, device, convention=convention, beta=0.05)
    assert math.isfinite(float(loss))
    assert float(metrics["gmpo/nonfinite_rows"]) == 0
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------
# strides: transposed storage, strided slices, expanded (stride 0) inputs

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_non_contiguous_inputs(dtype, convention, device):
    B, T = 5, 67
    c = make_case(B, T, dtype=dtype, seed=26, ref=True, is_weights="BT", adv_shape="B")
    lp_t = c.logps.t().contiguous().t()                                # transposed storage
    assert not lp_t.is_contiguous()
    old_s = torch.zeros(B, 2 * T, dtype=dtype)
    old_s[:, ::2] = c.old_logps
    old_s = old_s[:, ::2]                                             # stride 2 along T
    ref_s = torch.zeros(2 * B, T + 3, dtype=dtype)
    ref_s[::2, 3:] = c.ref_logps
    ref_s = ref_s[::2, 3:]                                            # row stride and offset
    isw_t = c.is_weights.t().contiguous().t()
    mask_t = c.mask.t().contiguous().t()
    adv_s = torch.zeros(3 * B, dtype=c.advantages.dtype)
    adv_s[::3] = c.advantages
    adv_s = adv_s[::3]                                                # strided per-row
    strided = Case(lp_t, old_s, adv_s, mask_t, ref_s, isw_t)
    for t in (strided.old_logps, strided.ref_logps, strided.advantages):
        assert not t.is_contiguous()
    loss, metrics, grad = parity(strided, device, convention=convention, beta=0.05)
    dense = run_fused(gmpo_ext.gmpo_loss, c, device, convention=convention, beta=0.05)
    assert torch.equal(loss, dense[0]) and torch.equal(grad, dense[2])

    # expanded advantages (B,1) -> (B,T): stride 0 along T (token-level, verl semantics)
    a_exp = c.advantages[:, None].expand(B, T)
    got = parity(c.with_(advantages=a_exp), device, convention=convention, beta=0.05)
    as_row = run_fused(gmpo_ext.gmpo_loss, c, device, convention=convention, beta=0.05)
    if convention == "verl":  # the masked mean of a constant row is the constant times n/D
        assert_close_loss(got[0], as_row[0], TOLS[dtype].loss, abs(float(as_row[0])) + 1e-6)
    # a mask shared by all rows: (1, T) expanded, stride 0 along B
    shared = c.mask[:1].expand(B, T)
    parity(c.with_(mask=shared), device, convention=convention, beta=0.05)
    # old_logps broadcast from one row
    parity(c.with_(old_logps=c.old_logps[:1].expand(B, T)), device, convention=convention,
           beta=0.05)


# ----------------------------------------------------------------------------
# the published formulas, transcribed in fp32 from DESIGN.md section 1

def trl_gmpo_fp32(logps, old_logps, advantages, mask, eps_low, eps_high, beta=0.0,
                  ref_logps=None, normalizer=1.0):
    """TRL's GMPOTrainer loss: log-space clip by the sign of A (A > 0 -> min, else
    max), D = max(n, 1), plain mean over rows, / gradient-accumulation steps;
    k3 KL per row with the same D. Metrics: token means over the mask."""
    m = mask.to(torch.float32)
    l = logps - old_logps
    lc = l.clamp(-eps_low, eps_high)
    a = advantages[:, None]
    y = torch.where(a > 0, torch.minimum(l, lc), torch.maximum(l, lc))
    d = m.sum(-1).clamp(min=1.0)
    row = -torch.exp((y * m).sum(-1) / d) * advantages
    if beta != 0.0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        row = row + beta * (kl * m).sum(-1) / d
    loss = row.mean() / normalizer
    cnt = m.sum().clamp(min=1.0)
    low = ((l < -eps_low) & (a < 0)).float()
    high = ((l > eps_high) & (a > 0)).float()
    metrics = {"clip_ratio/low_mean": (low * m).sum() / cnt,
               "clip_ratio/high_mean": (high * m).sum() / cnt,
               "clip_ratio/region_mean": (((low + high) > 0).float() * m).sum() / cnt}
    if beta != 0.0:
        metrics["kl"] = (kl * m).sum() / cnt
    return loss, metrics


def verl_geo_mean_fp32(logps, old_logps, advantages, mask, eps_low, eps_high):
    """verl's geo_mean loss: token advantages (B, T); y = s*min(s*l, s*clamp(l))
    with s = sign(A); D = n + 1e-8; multiplier = masked mean of A; plain mean
    over rows. Metrics: pg_clipfrac (A > 0), pg_clipfrac_lower (A < 0), ppo_kl."""
    m = mask.to(torch.float32)
    l = logps - old_logps
    lc = l.clamp(-eps_low, eps_high)
    s = torch.sign(advantages)
    y = s * torch.minimum(s * l, s * lc)
    d = m.sum(-1) + 1e-8
    r = torch.exp((y * m).sum(-1) / d)
    ahat = (advantages * m).sum(-1) / d
    loss = (-ahat * r).mean()
    cnt = m.sum() + 1e-8
    clipped = (l != lc).float()
    metrics = {"actor/pg_clipfrac": (clipped * (advantages > 0).float() * m).sum() / cnt,
               "actor/pg_clipfrac_lower": (clipped * (advantages < 0).float() * m).sum() / cnt,
               "actor/ppo_kl": (-l * m).sum() / cnt}
    return loss, metrics


def _realistic(seed, B=16, T=300, group=4):
    """GRPO-style batch: groups of `group` completions, binary rewards normalised
    per group (a group with equal rewards gets A = 0), zero-padded tails, one
    empty completion, small log-ratios with a few far ones."""
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(B // group, group, generator=g) < 0.5).float()
    rewards[0] = 1.0                                   # a group with zero advantages
    std = rewards.std(-1, keepdim=True)
    adv = ((rewards - rewards.mean(-1, keepdim=True)) / (std + 1e-4)).reshape(B)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    lengths[5] = 0
    mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.int64)
    logps = -torch.rand(B, T, generator=g) * 4
    lr = torch.randn(B, T, generator=g) * 0.1
    far = torch.rand(B, T, generator=g) < 0.05
    lr[far] = torch.randn(int(far.sum()), generator=g) * 1.5
    old = logps - lr
    ref = logps + torch.randn(B, T, generator=g) * 0.05
    return logps, old, adv, mask, ref


def _rel_check(got, want, scale, tol, what):
    err = abs(float(got) - float(want))
    assert err <= tol * scale, f"{what}: {float(got)!r} vs {float(want)!r} (|err| {err:.3g}, scale {scale:.3g})"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_published_trl_in_fp32(seed, beta, device):
    logps, old, adv, mask, ref = _realistic(seed)
    el, eh = 0.4, 0.4
    lp = logps.clone().requires_grad_(True)
    want, wmetrics = trl_gmpo_fp32(lp, old, adv, mask, el, eh, beta, ref, normalizer=2.0)
    (want * UPSTREAM).backward()
    case = Case(logps, old, adv, mask, ref)
    loss, metrics, grad = run_fused(gmpo_ext.gmpo_loss, case, device, convention="trl",
                                    epsilon_low=el, epsilon_high=eh, beta=beta, normalizer=2.0)
    # 1e-6 relative to the loss's size without cancellation between rows of
    # opposite sign (group-normalised advantages make the mean itself tiny)
    scale = max(abs(float(want.detach())), float(trl_gmpo_fp32(logps, old, adv.abs(), mask, el, eh, beta,
                                                      ref, 2.0)[0].abs()))
    _rel_check(loss, want.detach(), scale, 1e-6, "loss")
    # metrics: within 1e-6 of TRL's fp32 formula, or no further from the float64
    # truth than twice that formula's own error (the k3 term exp(d) - d - 1
    # cancels in fp32: both sides carry ~1e-6 relative error on the kl metric)
    _, truth = gmpo_loss_reference(logps.double(), old.double(), adv.double(), mask,
                                   epsilon_low=el, epsilon_high=eh, beta=beta,
                                   ref_logps=ref.double(), normalizer=2.0)
    for k, v in wmetrics.items():
        v = float(v.detach())
        ours, exact = float(metrics[k]), float(truth[k])
        assert (abs(ours - v) <= 1e-6 * max(abs(v), 1e-3)
                or abs(ours - exact) <= 2 * abs(v - exact)), (k, ours, v, exact)
    wg = lp.grad
    assert (grad - wg).abs().max() <= 1e-6 * wg.abs().max(), "grad differs from TRL's formula"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("token_level", [False, True])
def test_matches_published_verl_in_fp32(seed, token_level, device):
    logps, old, adv, mask, _ = _realistic(seed)
    B, T = logps.shape
    adv_bt = adv[:, None].expand(B, T).contiguous()
    if token_level:   # per-token advantages, some exactly 0
        g = torch.Generator().manual_seed(100 + seed)
        adv_bt = adv_bt + 0.3 * torch.randn(B, T, generator=g)
        adv_bt[torch.rand(B, T, generator=g) < 0.1] = 0.0
    el, eh = 0.2, 0.28
    lp = logps.clone().requires_grad_(True)
    want, wmetrics = verl_geo_mean_fp32(lp, old, adv_bt, mask, el, eh)
    (want * UPSTREAM).backward()
    ours = adv_bt if token_level else adv
    case = Case(logps, old, ours, mask)
    loss, metrics, grad = run_fused(gmpo_ext.gmpo_loss, case, device, convention="verl",
                                    epsilon_low=el, epsilon_high=eh)
    scale = max(abs(float(want.detach())),
                float(verl_geo_mean_fp32(logps, old, adv_bt.abs(), mask, el, eh)[0].abs()))
    _rel_check(loss, want.detach(), scale, 1e-6, "loss")
    for k, v in wmetrics.items():
        v = v.detach()
        # ppo_kl is a mean of log-ratios of both signs: relative to the mean |l|
        s = float((old - logps).abs().mul(mask).sum() / mask.sum()) if k == "actor/ppo_kl" else 1e-3
        _rel_check(metrics[k], v, max(abs(float(v)), s), 1e-6, k)
    wg = lp.grad
    assert (grad - wg).abs().max() <= 1e-6 * wg.abs().max(), "grad differs from verl's formula"


# ----------------------------------------------------------------------------
# gradcheck in fp64, inputs away from the clip bounds and the clamp

def _gradcheck_inputs(seed, B=3, T=6, adv_shape="B"):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 2 + 0.1)
    # |l| in [0, 0.3] (inside eps = 0.4) or [0.6, 0.9] (clipped): >= 0.1 from any bound
    mag = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.3
    far = torch.rand(B, T, generator=g) < 0.3
    mag = torch.where(far, mag + 0.6, mag)
    sign = torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0).double()
    old = lp - sign * mag
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -2:] = False
    adv = torch.tensor([0.8, -1.2, 0.0], dtype=torch.float64)[:B]
    if adv_shape == "BT":
        adv = adv[:, None] + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1
    isw = torch.exp(torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2)
    return lp, old, adv, mask, ref, isw


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("adv_shape", ["B", "BT"])
@pytest.mark.parametrize("extras", ["plain", "beta_isw_clamp"])
def test_gradcheck_fp64(convention, adv_shape, extras, device):
    lp, old, adv, mask, ref, isw = (t.to(device) for t in _gradcheck_inputs(31, adv_shape=adv_shape))
    kw = dict(convention=convention, normalizer=1.5)
    if extras != "plain":
        kw.update(beta=0.1, ref_logps=ref, is_weights=isw, log_ratio_clamp=5.0)

    def f(x):
        return gmpo_ext.gmpo_loss(x, old, adv, mask, **kw)

    x = lp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-9, rtol=1e-6)


# ----------------------------------------------------------------------------
# housekeeping: module wrapper, metric placement, determinism

def test_module_wrapper_matches_function(device):
    case = make_case(4, 33, seed=41, ref=True)
    mod = gmpo_ext.GMPOLoss(epsilon_low=0.3, epsilon_high=0.5, beta=0.02, convention="verl",
                            return_metrics=True)
    a = mod(case.logps.to(device), case.old_logps.to(device), case.advantages.to(device),
            case.mask.to(device), ref_logps=case.ref_logps.to(device))
    b = gmpo_ext.gmpo_loss(case.logps.to(device), case.old_logps.to(device),
                           case.advantages.to(device), case.mask.to(device), epsilon_low=0.3,
                           epsilon_high=0.5, beta=0.02, convention="verl",
                           ref_logps=case.ref_logps.to(device), return_metrics=True)
    assert torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys()
    assert "convention='verl'" in repr(mod)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_metrics_are_0d_on_the_input_device(convention, device):
    case = make_case(3, 10, seed=42, ref=True)
    loss, metrics = gmpo_ext.gmpo_loss(case.logps.to(device), case.old_logps.to(device),
                                       case.advantages.to(device), case.mask.to(device),
                                       beta=0.1, ref_logps=case.ref_logps.to(device),
                                       convention=convention, return_metrics=True)
    names = {"trl": {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"},
             "verl": {"actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"}}[convention]
    assert set(metrics) == names | {"kl", "gmpo/max_mean_log_ratio", "gmpo/nonfinite_rows"}
    for v in list(metrics.values()) + [loss]:
        assert v.dim() == 0 and v.device.type == device.type and v.dtype == torch.float32
    assert not any(v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_same_bits_for_any_thread_count(dtype, device):
    case = make_case(8, 4097, dtype=dtype, seed=43, ref=True, is_weights="BT")  # parallel path
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_fused(gmpo_ext.gmpo_loss, case, device, beta=0.03)
        torch.set_num_threads(max(2, prev))
        many = run_fused(gmpo_ext.gmpo_loss, case, device, beta=0.03)
        again = run_fused(gmpo_ext.gmpo_loss, case, device, beta=0.03)
    finally:
        torch.set_num_threads(prev)
    for x, y in ((one, many), (many, again)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[2], y[2])
        assert all(torch.equal(x[1][k], y[1][k]) for k in x[1])


def test_upstream_gradient_tensor_is_read(device):
    case = make_case(3, 20, seed=44)
    lp = case.logps.to(device).requires_grad_(True)
    loss = gmpo_ext.gmpo_loss(lp, case.old_logps.to(device), case.advantages.to(device),
                              case.mask.to(device))
    loss.backward(torch.tensor(-2.5, device=device))
    g = lp.grad.clone()
    _, _, ref = run_ref(gmpo_loss_reference, case, upstream=-2.5)
    assert_close_grad(g.cpu(), ref, torch.float32, TOLS[torch.float32], mask=case.mask)


def test_scale_helper_is_not_degenerate():
    # the tolerance scale must be of the size of the row terms, not ~0
    case = make_case(8, 97, seed=45)
    assert loss_scale(gmpo_loss_reference, case) > 0.1


def test_no_grad_and_inference_mode(device):
    case = make_case(3, 10, seed=46)
    args = [t.to(device) for t in (case.logps, case.old_logps, case.advantages, case.mask)]
    want = gmpo_ext.gmpo_loss(*args)
    with torch.no_grad():
        lp = args[0].clone().requires_grad_(True)
        got = gmpo_ext.gmpo_loss(lp, *args[1:])
        assert not got.requires_grad and torch.equal(got, want)
    with torch.inference_mode():
        assert torch.equal(gmpo_ext.gmpo_loss(*args), want)
