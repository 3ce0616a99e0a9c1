"""grpo_loss (GRPO's arithmetic-mean PPO-clip surrogate, TRL's four loss types)
against the float64 oracle gmpo_ext.reference.grpo_loss_reference."""

from __future__ import annotations

import math

import pytest
import torch

import gmpo_ext
from gmpo_ext.reference import grpo_loss_reference

from _helpers import (DTYPE_IDS, DTYPES, TOLS, UPSTREAM, Case, assert_close_grad,
                      check_parity, make_case, run_fused, run_ref)

pytestmark = pytest.mark.usefixtures("backend")

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
SIZES = [(1, 1), (3, 97), (8, 4097), (8, 1), (1, 4097)]
MASKS = ["bool", "int", "float"]
ADVS = ["B", "B1", "BT"]


def parity(case, device, **kw):
    # the oracle has no gmpo/nonfinite_rows: compare the metrics it has
    loss, metrics, grad = check_parity(gmpo_ext.grpo_loss, grpo_loss_reference, case, device,
                                       exact_keys=False, **kw)
    assert "gmpo/nonfinite_rows" in metrics and "gmpo/max_mean_log_ratio" not in metrics
    return loss, metrics, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("B,T", SIZES, ids=[f"B{B}xT{T}" for B, T in SIZES])
def test_parity_grid(dtype, loss_type, B, T, device):
    j = SIZES.index((B, T))
    for k, mask_kind in enumerate(MASKS):
        case = make_case(B, T, dtype=dtype, mask_kind=mask_kind, adv_shape=ADVS[(k + j) % 3],
                         seed=500 + 10 * j + k, spread=0.2)
        parity(case, device, loss_type=loss_type)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("isw", [None, "B", "BT"])
def test_beta_and_is_weights(dtype, loss_type, isw, device):
    case = make_case(5, 97, dtype=dtype, ref=True, is_weights=isw, seed=51, spread=0.2)
    _, metrics, _ = parity(case, device, loss_type=loss_type, beta=0.04, epsilon_low=0.2,
                           epsilon_high=0.28, normalizer=2.0)
    assert float(metrics["kl"]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dr_grpo_max_completion_length_and_dapo_num_items(dtype, device):
    case = make_case(4, 60, dtype=dtype, seed=52, spread=0.2)
    a = parity(case, device, loss_type="dr_grpo", max_completion_length=128)
    b = parity(case, device, loss_type="dr_grpo")            # default: T
    assert float(a[0]) == pytest.approx(float(b[0]) * 60 / 128, rel=1e-6)
    c = parity(case, device, loss_type="dapo", num_items_in_batch=777)
    d = parity(case, device, loss_type="dapo")               # default: sum of the mask
    n = float(case.mask.sum())
    assert float(c[0]) == pytest.approx(float(d[0]) * n / 777, rel=1e-6)
    # a tensor item count (as TRL passes it) equals the number
    e = run_fused(gmpo_ext.grpo_loss, case, device, loss_type="dapo",
                  num_items_in_batch=torch.tensor(777.0))
    assert torch.equal(e[0], c[0]) and torch.equal(e[2], c[2])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps", [(0.2, None), (0.2, 0.28), (0.0, 0.0), (1.0, 3.0)])
def test_epsilons(loss_type, eps, device):
    case = make_case(6, 50, seed=53, spread=0.5, adv_shape="BT")
    parity(case, device, loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_rows_zero_advantages_and_all_masked(loss_type, device):
    case = make_case(5, 30, seed=54, ref=True)
    case.mask[3] = 0
    case.logps[3, ::2] = float("nan")  # padding of an all-masked row
    loss, metrics, grad = parity(case, device, loss_type=loss_type, beta=0.1)
    assert math.isfinite(float(loss)) and float(metrics["gmpo/nonfinite_rows"]) == 0
    assert (grad[1] == 0).all() and (grad[3] == 0).all()
    # a zero-advantage row gets only the KL gradient
    no_kl = run_fused(gmpo_ext.grpo_loss, case, device, loss_type=loss_type)
    assert (no_kl[2][2] == 0).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batch_of_zero_rows(loss_type, dtype, device):
    T = 5
    lp = torch.zeros(0, T, dtype=dtype, device=device, requires_grad=True)
    loss, metrics = gmpo_ext.grpo_loss(lp, lp.detach(), torch.zeros(0, device=device),
                                       torch.zeros(0, T, device=device), loss_type=loss_type,
                                       return_metrics=True)
    assert float(loss.detach()) == 0.0
    assert all(math.isfinite(float(v)) for v in metrics.values())
    (loss * UPSTREAM).backward()
    assert lp.grad.shape == (0, T)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nan_in_real_token_is_flagged_and_masked_nan_is_not(loss_type, device):
    case = make_case(4, 30, seed=55, empty_row=False, zero_adv=False)
    pad = case.mask == 0
    assert pad.any()
    masked = case.with_(logps=case.logps.clone(), old_logps=case.old_logps.clone())
    masked.logps[pad] = float("nan")
    masked.old_logps[pad] = float("inf")
    loss, metrics, _ = parity(masked, device, loss_type=loss_type)
    assert math.isfinite(float(loss)) and float(metrics["gmpo/nonfinite_rows"]) == 0
    case.old_logps[2, 0] = float("nan")
    loss, metrics, grad = run_fused(gmpo_ext.grpo_loss, case, device, loss_type=loss_type)
    assert math.isnan(float(loss)) and float(metrics["gmpo/nonfinite_rows"]) >= 1


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_inputs(dtype, device):
    B, T = 4, 45
    c = make_case(B, T, dtype=dtype, seed=56, ref=True, is_weights="BT", spread=0.2)
    s = Case(c.logps.t().contiguous().t(), torch.cat([c.old_logps, c.old_logps], 1)[:, :T],
             c.advantages[:, None].expand(B, T), c.mask.t().contiguous().t(),
             c.ref_logps.t().contiguous().t(), c.is_weights.t().contiguous().t())
    assert not s.old_logps.is_contiguous() and s.advantages.stride(1) == 0
    loss, _, grad = parity(s, device, loss_type="grpo", beta=0.05)
    dense = run_fused(gmpo_ext.grpo_loss, c, device, loss_type="grpo", beta=0.05)
    torch.testing.assert_close(loss, dense[0], rtol=TOLS[dtype].loss, atol=0)
    torch.testing.assert_close(grad, dense[2], rtol=0, atol=0)


def test_module_wrapper_matches_function(device):
    case = make_case(4, 33, seed=57, ref=True)
    mod = gmpo_ext.GRPOLoss(epsilon_low=0.2, epsilon_high=0.28, beta=0.02, loss_type="bnpo")
    args = [t.to(device) for t in (case.logps, case.old_logps, case.advantages, case.mask)]
    a = mod(*args, ref_logps=case.ref_logps.to(device))
    b = gmpo_ext.grpo_loss(*args, epsilon_low=0.2, epsilon_high=0.28, beta=0.02, loss_type="bnpo",
                           ref_logps=case.ref_logps.to(device))
    assert torch.equal(a, b)


def _gradcheck_inputs(seed, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 2 + 0.1)
    # ratio bounds 0.8 / 1.2 are log-ratios -0.223 / 0.182: keep |l| <= 0.1 or >= 0.35
    mag = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.1
    far = torch.rand(B, T, generator=g) < 0.3
    mag = torch.where(far, mag + 0.35, mag)
    sign = torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0).double()
    old = lp - sign * mag
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -2:] = False
    adv = torch.tensor([0.8, -1.2, 0.5], dtype=torch.float64)[:B]
    ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1
    isw = torch.exp(torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2)
    return lp, old, adv, mask, ref, isw


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_fp64(loss_type, device):
    lp, old, adv, mask, ref, isw = (t.to(device) for t in _gradcheck_inputs(61))

    def f(x):
        return gmpo_ext.grpo_loss(x, old, adv, mask, loss_type=loss_type, beta=0.1, ref_logps=ref,
                                  is_weights=isw, normalizer=1.5)

    x = lp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-9, rtol=1e-6)


def test_reference_gradient_sanity():
    # the oracle itself: a grpo-type loss with A > 0 and every ratio in range has
    # d loss / d logp = -A * rho / (B * n) per token
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() - torch.tensor([[0.05, -0.05]], dtype=torch.float64)
    loss, _ = grpo_loss_reference(lp, old, torch.tensor([2.0], dtype=torch.float64),
                                  torch.ones(1, 2), loss_type="grpo")
    loss.backward()
    want = -2.0 * torch.exp(torch.tensor([[0.05, -0.05]], dtype=torch.float64)) / 2
    torch.testing.assert_close(lp.grad, want)
    _, _, g = run_ref(grpo_loss_reference, Case(lp.detach(), old, torch.tensor([2.0]), torch.ones(1, 2)),
                      loss_type="grpo")
    assert_close_grad(g, want * UPSTREAM, torch.float64, TOLS[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ties_at_ratio_one_with_zero_epsilons(dtype, loss_type, device):
    # old_logps == logps: every ratio is exactly 1 == 1 - 0 == 1 + 0, on both bounds;
    # on a bound the gradient passes (PyTorch's min/clamp backward gives the same)
    case = make_case(4, 19, dtype=dtype, seed=58)
    case = case.with_(old_logps=case.logps.clone())
    loss, metrics, grad = parity(case, device, loss_type=loss_type, epsilon_low=0.0,
                                 epsilon_high=0.0)
    assert float(metrics["clip_ratio/region_mean"]) == 0.0
    wide = run_fused(gmpo_ext.grpo_loss, case, device, loss_type=loss_type, epsilon_low=0.5,
                     epsilon_high=0.5)
    assert torch.equal(loss, wide[0]) and torch.equal(grad, wide[2])
    nonzero = (case.mask != 0) & (case.advantages[:, None] != 0)
    assert (grad[nonzero] != 0).all()
