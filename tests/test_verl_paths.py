"""verl's policy losses (grpo_loss with convention="verl": vanilla, gspo,
cispo, sapo) from logits and from hidden states: grpo_loss_from_logits and
grpo_loss_from_hidden with convention="verl", loss_agg_mode, clip_ratio_c and
global_batch_info.

The reference is gmpo_ext.grpo_loss(convention="verl") itself (whose verl
semantics tests/test_verl_family.py checks against a transcription and
against verl) on the log-probs plain torch computes in float64 from the same
(rounded) inputs: log_softmax and gather of the logits, or of the head's
h W^T + b; autograd through that float64 graph gives the reference gradients
of the logits, or of hidden, weight and bias. Inputs: logits of a trained
model's size (|z| up to about 30) divided by a temperature, a bias, per-token
advantages changing sign inside a row, a row with A = 0, an empty row, a
float mask, tokens past the clip range and the dual clip. And, where verl
imports, the fused head against verl's own registered losses.

Tolerances (the loss: relative to max(|loss|, 0.1), the loss's size without
cancellation, its terms being about |A| ~ 1; the gradients: elementwise,
relative to the largest reference element, as tests/test_hidden.py):
  fp64 (the head only; the logits kernels take fp32, bf16, fp16): the same
      arithmetic in float64: 1e-10.
  fp32: the logits read exactly (or the head's fp32 GEMMs, each logit of
      |z| ~ 30 rounded to about 2e-6 absolute), the log-probs and the loss
      accumulated in fp32: 1e-5 for the loss and every gradient (measured:
      at most 3.3e-6, the logits' gradient; the head's 2.8e-6).
  bf16 logits: read exactly, fp32 arithmetic, so the loss gets fp32's 1e-5;
      the gradient is written in bf16: 2^-8 of its scale (measured 3.6e-3).
  bf16 hidden states: the head's GEMM output (the logits) is rounded to
      bf16 before the fold, as in any bf16 LM head: at |z| ~ 30 that is up
      to 2^-9 * 32 = 0.06 absolute per logit, so the log-probs are off by up
      to about 0.1 and each ratio by up to 10%. Against the reference from
      the same inputs: the loss 5e-2, the gradients 0.15 (measured 0.018 and
      0.065). And, to hold the rest of the arithmetic to bf16's own
      precision, against the float64 reference on the logits rounded to
      bf16 as the head rounds them: the loss 1e-5 (fp32 arithmetic), the
      gradients 2^-6 (the logits' gradient is rounded to bf16 before the two
      backward GEMMs, which accumulate in fp32 and round their outputs to
      bf16; measured 5.4e-3).
"""

from __future__ import annotations

import math
import os
import socket
import sys
from types import SimpleNamespace

import pytest
import torch

import gmpo_ext

from _verl import VERL_MISSING, core_algos, needs_verl  # noqa: F401

GBI = {"dp_size": 2, "batch_num_tokens": 41, "global_batch_size": 9, "loss_scale_factor": 12}
TEMPERATURE = 0.7
EPS = dict(epsilon_low=0.2, epsilon_high=0.28)

# (loss_type, loss_agg_mode, options): vanilla and gspo with all five
# aggregations (verl 0.9.1's gspo honours loss_agg_mode); sapo ignores it, as
# verl's does
CASES = [
    ("vanilla", "token-mean", dict()),
    ("vanilla", "token-sum", dict(isw=True)),
    ("vanilla", "seq-mean-token-sum", dict(gbi=True, clip_ratio_c=2.5)),
    ("vanilla", "seq-mean-token-mean", dict(isw=True, gbi=True)),
    ("vanilla", "seq-mean-token-sum-norm", dict(isw=True)),
    ("cispo", "token-mean", dict(isw=True, gbi=True)),
    ("cispo", "seq-mean-token-mean", dict()),
    ("cispo", "seq-mean-token-sum-norm", dict(gbi=True)),
    ("gspo", "seq-mean-token-mean", dict(isw=True, gbi=True)),
    ("gspo", None, dict()),   # verl's default for gspo: seq-mean-token-mean
    ("gspo", "token-mean", dict(isw=True)),
    ("gspo", "token-sum", dict(gbi=True)),
    ("gspo", "seq-mean-token-sum", dict(isw=True, gbi=True)),
    ("gspo", "seq-mean-token-sum-norm", dict()),
    ("sapo", None, dict(isw=True, sapo_temperature_pos=0.8, sapo_temperature_neg=1.3)),
    ("sapo", "token-sum", dict(gbi=True)),   # ignored: seq-mean-token-mean
]
CASE_IDS = [f"{lt}-{agg or 'default'}" for lt, agg, _ in CASES]

# ----------------------------------------------------------------------------
# inputs

def _shape_inputs(g, B, T, dtype, cur):
    """old log-probs near the current ones (cur, float64) with tokens past the
    clip range on both sides and past the dual clip; per-token advantages with
    a sign change inside a row and a row with A = 0; an empty row; a float
    mask; rollout importance weights."""
    old = cur + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64)
    old[0, 1] = cur[0, 1] - 1.5            # ratio e^1.5 > clip_ratio_c
    old[0, 2] = cur[0, 2] + 1.0            # ratio e^-1 < 1 - epsilon_low
    old[5] = cur[5] - 0.5                  # the row's ratio past 1 + epsilon_high (gspo)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    adv[0] = -adv[0].abs()                 # A < 0 where the ratio passes clip_ratio_c
    adv[2, ::2] *= -1.0                    # signs change inside a row
    adv[4] = 0.0                           # A = 0
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths[3] = 0                         # an empty row
    mask = (torch.arange(T) < lengths[:, None]).to(torch.float64)
    mask[1, :3] = 0.5                      # a float mask weighs tokens
    isw = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
    c = (lambda t: t.to(dtype if dtype != torch.bfloat16 else torch.float32))
    return c(old), c(adv), c(mask), c(isw)


def logits_inputs(seed, dtype, B=6, T=10, V=53):
    """logits (B, T + 1, V) of magnitude up to about 30 (TRL's logits_to_keep
    = T + 1: the last position is ignored)."""
    g = torch.Generator().manual_seed(seed)
    logits = (10.0 * torch.randn(B, T + 1, V, generator=g, dtype=torch.float64)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, :4] = logits[0, :4, :].double().argmax(-1)   # confident tokens too
    with torch.no_grad():
        cur = _ref_logps_from_logits(logits.double(), ids)
    old, adv, mask, isw = _shape_inputs(g, B, T, dtype, cur)
    return SimpleNamespace(logits=logits, ids=ids, old=old, adv=adv, mask=mask, isw=isw)


def hidden_inputs(seed, dtype, B=6, T=10, H=16, V=53):
    """hidden (B, T, H), weight (V, H) and bias (V,) whose logits h W^T + b
    reach about 30."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) * 8.0 / math.sqrt(H)).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 2.0).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        cur = _ref_logps_from_hidden(h.double(), W.double(), b.double(), ids)
    old, adv, mask, isw = _shape_inputs(g, B, T, dtype, cur)
    return SimpleNamespace(hidden=h, weight=W, bias=b, ids=ids, old=old, adv=adv, mask=mask,
                           isw=isw)


def _ref_logps_from_logits(logits64, ids):
    T = ids.shape[1]
    lp = torch.log_softmax(logits64[:, :T] / TEMPERATURE, -1)
    return lp.gather(-1, ids[..., None]).squeeze(-1)


def _ref_logps_from_hidden(h64, W64, b64, ids, round_to=None):
    z = h64 @ W64.t() + b64
    if round_to is not None:   # the logits rounded as a head in that dtype rounds them
        z = z.to(round_to).double()
    lp = torch.log_softmax(z / TEMPERATURE, -1)
    return lp.gather(-1, ids[..., None]).squeeze(-1)


def _ref_entropy(z64):
    lp = torch.log_softmax(z64 / TEMPERATURE, -1)
    return -(lp.exp() * lp).sum(-1)


def loss_kwargs(loss_type, agg, opts, d):
    kw = dict(convention="verl", loss_type=loss_type, loss_agg_mode=agg, **EPS)
    if opts.get("isw"):
        kw["is_weights"] = d.isw
    if opts.get("gbi"):
        kw["global_batch_info"] = dict(GBI)
    for k in ("clip_ratio_c", "sapo_temperature_pos", "sapo_temperature_neg"):
        if k in opts:
            kw[k] = opts[k]
    return kw


def _f64(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def grad_err(got, want):
    """max |got - want| relative to max |want| (the gradient's scale)."""
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))


def loss_err(got, want):
    got, want = float(got.detach()), float(want.detach())
    return abs(got - want) / max(abs(want), 0.1)


# ----------------------------------------------------------------------------
# from logits

LOGITS_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 2.0 ** -8)}


def run_logits(loss_type, agg, opts, dtype, seed=0, **extra):
    d = logits_inputs(seed, dtype)
    kw = loss_kwargs(loss_type, agg, opts, d)
    x64 = d.logits.detach().double().requires_grad_()
    lp64 = _ref_logps_from_logits(x64, d.ids)
    want, want_m = gmpo_ext.grpo_loss(lp64, d.old.double(), d.adv.double(), d.mask.double(),
                                      return_metrics=True, **_f64(kw))
    want.backward()
    (x,) = leaves(d.logits)
    got, got_m = gmpo_ext.grpo_loss_from_logits(x, d.ids, d.old, d.adv, d.mask,
                                                temperature=TEMPERATURE, return_metrics=True,
                                                **kw, **extra)
    got.backward()
    return d, (got, got_m, x.grad), (want, want_m, x64.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_type,agg,opts", CASES, ids=CASE_IDS)
def test_from_logits_equals_grpo_loss(loss_type, agg, opts, dtype):
    d, (got, got_m, g), (want, want_m, g64) = run_logits(loss_type, agg, opts, dtype)
    ltol, gtol = LOGITS_TOL[dtype]
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert loss_err(got, want) <= ltol, (float(got), float(want))
    assert g.dtype == dtype
    assert grad_err(g, g64) <= gtol, grad_err(g, g64)
    T = d.ids.shape[1]
    assert (g[:, T:] == 0).all()                       # the ignored last position
    assert (g[3] == 0).all() and (g[4] == 0).all()     # the empty row, A = 0
    for k, v in want_m.items():
        assert abs(float(got_m[k]) - float(v)) <= 1e-5 * max(1.0, abs(float(v))), k
    m = d.mask.double()
    ent = _ref_entropy(d.logits.double()[:, :T])
    assert abs(float(got_m["entropy"]) - float((ent * m).sum() / m.sum())) <= 1e-4
    assert float(got_m["gmpo/invalid_ids"]) == 0


def test_from_logits_inplace_backward_and_validate():
    """inplace_backward and validate change nothing of the loss or gradient."""
    lt, agg, opts = CASES[3]
    _, (a, _, ga), _ = run_logits(lt, agg, opts, torch.float32, seed=1)
    _, (b, _, gb), _ = run_logits(lt, agg, opts, torch.float32, seed=1,
                                  inplace_backward=True, validate=True)
    assert float(a.detach()) == float(b.detach())
    assert torch.equal(ga, gb)


# ----------------------------------------------------------------------------
# from hidden states

HIDDEN_TOL = {  # loss, gradients (hidden, weight, bias)
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (5e-2, 0.15),
}
BF16_ROUNDED_TOL = (1e-5, 2.0 ** -6)   # against the reference on bf16-rounded logits


def run_hidden(loss_type, agg, opts, dtype, seed=0, round_to=None, **extra):
    d = hidden_inputs(seed, dtype)
    kw = loss_kwargs(loss_type, agg, opts, d)
    h64, W64, b64 = leaves(d.hidden.double(), d.weight.double(), d.bias.double())
    lp64 = _ref_logps_from_hidden(h64, W64, b64, d.ids, round_to=round_to)
    want, want_m = gmpo_ext.grpo_loss(lp64, d.old.double(), d.adv.double(), d.mask.double(),
                                      return_metrics=True, **_f64(kw))
    want.backward()
    h, W, b = leaves(d.hidden, d.weight, d.bias)
    got, got_m = gmpo_ext.grpo_loss_from_hidden(h, W, d.ids, d.old, d.adv, d.mask, bias=b,
                                                temperature=TEMPERATURE, return_metrics=True,
                                                tile_tokens=16, tile_vocab=20, **kw, **extra)
    got.backward()
    return d, (got, got_m, (h.grad, W.grad, b.grad)), (want, want_m,
                                                       (h64.grad, W64.grad, b64.grad))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("loss_type,agg,opts", CASES, ids=CASE_IDS)
def test_from_hidden_equals_grpo_loss(loss_type, agg, opts, dtype):
    d, (got, got_m, grads), (want, want_m, grads64) = run_hidden(loss_type, agg, opts, dtype)
    ltol, gtol = HIDDEN_TOL[dtype]
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss_err(got, want) <= ltol, (float(got), float(want))
    for name, g, g64 in zip(("hidden", "weight", "bias"), grads, grads64):
        assert g.dtype == dtype, name
        assert grad_err(g, g64) <= gtol, (name, grad_err(g, g64))
    assert (grads[0][3] == 0).all() and (grads[0][4] == 0).all()   # empty row, A = 0
    assert (grads[0][d.mask == 0] == 0).all()                       # padding never projected
    mtol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 0.1)
    for k, v in want_m.items():
        assert abs(float(got_m[k]) - float(v)) <= mtol * max(1.0, abs(float(v))), k
    with torch.no_grad():
        z = d.hidden.double() @ d.weight.double().t() + d.bias.double()
        m = d.mask.double()
        ent = float((_ref_entropy(z) * m).sum() / m.sum())
    # the entropy metric is float32 for every input dtype
    assert abs(float(got_m["entropy"]) - ent) <= (1e-6 if dtype == torch.float64 else
                                                 1e-4 if dtype == torch.float32 else 0.2)
    if dtype == torch.bfloat16:
        _, (got, _, grads), (want, _, grads64) = run_hidden(loss_type, agg, opts, dtype,
                                                            round_to=torch.bfloat16)
        ltol, gtol = BF16_ROUNDED_TOL
        assert loss_err(got, want) <= ltol, (float(got), float(want))
        for name, g, g64 in zip(("hidden", "weight", "bias"), grads, grads64):
            assert grad_err(g, g64) <= gtol, (name, grad_err(g, g64))


def test_from_hidden_return_entropy_carries_its_gradient():
    """verl adds its entropy bonus outside the policy loss: return_entropy gives
    the per-token entropy with its gradient, as for TRL's convention."""
    d = hidden_inputs(2, torch.float64)
    kw = loss_kwargs("vanilla", "token-mean", {}, d)
    h, W, b = leaves(d.hidden, d.weight, d.bias)
    loss, ent = gmpo_ext.grpo_loss_from_hidden(h, W, d.ids, d.old, d.adv, d.mask, bias=b,
                                               temperature=TEMPERATURE, return_entropy=True,
                                               **kw)
    m = d.mask
    (loss - 0.01 * (ent * m).sum() / m.sum()).backward()
    h64, W64, b64 = leaves(d.hidden, d.weight, d.bias)
    z = h64 @ W64.t() + b64
    lp = torch.log_softmax(z / TEMPERATURE, -1).gather(-1, d.ids[..., None]).squeeze(-1)
    want = gmpo_ext.grpo_loss(lp, d.old, d.adv, m, **kw)
    (want - 0.01 * (_ref_entropy(z) * m).sum() / m.sum()).backward()
    for g, g64 in ((h.grad, h64.grad), (W.grad, W64.grad), (b.grad, b64.grad)):
        assert grad_err(g, g64) <= 1e-10


# ----------------------------------------------------------------------------
# packed rows (cu_seqlens)

def _pack(d):
    keep = d.mask != 0   # each row's tokens a prefix: packed rows are the kept tokens
    lens = keep.sum(1)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lens, 0)
    return keep, cu


@pytest.mark.parametrize("loss_type,agg", [
    ("vanilla", "token-mean"), ("vanilla", "token-sum"), ("cispo", "seq-mean-token-sum"),
    ("gspo", "seq-mean-token-mean"), ("sapo", None), ("vanilla", "seq-mean-token-sum-norm"),
    ("gspo", "seq-mean-token-sum-norm")])
def test_packed_equals_padded(loss_type, agg):
    """Packed (N, H) rows with cu_seqlens give the padded layout's loss, metrics
    and gradients (fp64): unpacked to (B, T_max) rows, which leave every
    aggregation unchanged; seq-mean-token-sum-norm with an explicit
    loss_scale_factor, here the padded width T (the padded call's default)."""
    d = hidden_inputs(3, torch.float64)
    # per-row advantages (packed advantages are one per row) and a bool mask,
    # so that the packed and padded calls see the same tokens
    adv = d.adv[:, 0].clone()
    keep, cu = _pack(d)
    mask = keep
    T = d.ids.shape[1]
    kw = dict(convention="verl", loss_type=loss_type, loss_agg_mode=agg, **EPS)
    if agg == "seq-mean-token-sum-norm":
        kw["global_batch_info"] = {"loss_scale_factor": T}
    h1, W1, b1 = leaves(d.hidden, d.weight, d.bias)
    l1, m1 = gmpo_ext.grpo_loss_from_hidden(h1, W1, d.ids, d.old, adv, mask, bias=b1,
                                            is_weights=d.isw, temperature=TEMPERATURE,
                                            return_metrics=True, **kw)
    l1.backward()
    h2, W2, b2 = leaves(d.hidden[keep], d.weight, d.bias)
    l2, m2 = gmpo_ext.grpo_loss_from_hidden(h2, W2, d.ids[keep], d.old[keep], adv,
                                            torch.ones(int(keep.sum()), dtype=torch.float64),
                                            bias=b2, is_weights=d.isw[keep], cu_seqlens=cu,
                                            temperature=TEMPERATURE, return_metrics=True, **kw)
    l2.backward()
    assert loss_err(l2, l1) <= 1e-12, (float(l1), float(l2))
    for k in m1:
        assert abs(float(m1[k]) - float(m2[k])) <= 1e-12, k
    assert grad_err(h2.grad, h1.grad[keep]) <= 1e-12
    assert grad_err(W2.grad, W1.grad) <= 1e-12 and grad_err(b2.grad, b1.grad) <= 1e-12


def test_packed_sum_norm_needs_loss_scale_factor():
    d = hidden_inputs(3, torch.float64)
    keep, cu = _pack(d)
    args = (d.hidden[keep], d.weight, d.ids[keep], d.old[keep], d.adv[:, 0],
            torch.ones(int(keep.sum())))
    for lt in ("vanilla", "cispo"):
        with pytest.raises(ValueError, match=r"cu_seqlens.*loss_scale_factor"):
            gmpo_ext.grpo_loss_from_hidden(*args, cu_seqlens=cu, convention="verl",
                                           loss_type=lt, loss_agg_mode="seq-mean-token-sum-norm")
        with pytest.raises(ValueError, match=r"cu_seqlens.*loss_scale_factor"):
            gmpo_ext.grpo_loss_from_hidden(*args, cu_seqlens=cu, convention="verl",
                                           loss_type=lt, loss_agg_mode="seq-mean-token-sum-norm",
                                           global_batch_info={"dp_size": 2,
                                                              "global_batch_size": 12})
    # sapo ignores loss_agg_mode (seq-mean-token-mean): nothing to divide by
    gmpo_ext.grpo_loss_from_hidden(*args, cu_seqlens=cu, convention="verl", loss_type="sapo",
                                   loss_agg_mode="seq-mean-token-sum-norm")
    # a bad loss_scale_factor is named as in grpo_loss
    with pytest.raises(ValueError, match=r"global_batch_info\['loss_scale_factor'\]"):
        gmpo_ext.grpo_loss_from_hidden(*args, cu_seqlens=cu, convention="verl",
                                       loss_type="vanilla",
                                       loss_agg_mode="seq-mean-token-sum-norm",
                                       global_batch_info={"loss_scale_factor": 0})


# ----------------------------------------------------------------------------
# errors: TRL's options, group=, the verl options with TRL's convention

def _call(path, d, **kw):
    if path == "logits":
        return gmpo_ext.grpo_loss_from_logits(d.logits, d.ids, d.old, d.adv, d.mask, **kw)
    return gmpo_ext.grpo_loss_from_hidden(d.hidden, d.weight, d.ids, d.old, d.adv, d.mask,
                                          bias=d.bias, **kw)


# one_rank: the one-process gloo group (conftest.py)


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_errors_name_the_argument(path, one_rank):
    d = (logits_inputs if path == "logits" else hidden_inputs)(4, torch.float32)
    verl = dict(convention="verl", loss_type="vanilla")
    # group= (rows' tokens split over ranks) stays TRL's; the error says what verl uses
    with pytest.raises(ValueError, match=r"group.*convention='trl'.*global_batch_info"):
        _call(path, d, group=one_rank, **verl)
    trl_only = dict(beta=0.04, entropy_coef=0.01, num_items_in_batch=17, num_rows=6,
                    delta=2.0, max_completion_length=10, off_policy_mask_threshold=0.5,
                    importance_sampling_level="sequence", use_bias_correction_kl=True,
                    token_mask=torch.ones_like(d.mask), sampling_logps=d.old,
                    ref_logps=d.old)
    for name, value in trl_only.items():
        with pytest.raises(ValueError, match=rf"^{name} is an option of convention='trl'"):
            _call(path, d, **{name: value}, **verl)
    with pytest.raises(ValueError, match="global_batch_info\\['batch_num_tokens'\\]"):
        _call(path, d, num_items_in_batch=17, **verl)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        _call(path, d, loss_agg_mode="mean", **verl)
    with pytest.raises(ValueError, match="loss_type"):
        _call(path, d, convention="verl", loss_type="dapo")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        _call(path, d, convention="verl", loss_type="cispo", clip_ratio_c=2.0)
    with pytest.raises(TypeError, match="global_batch_info"):
        _call(path, d, global_batch_info=3, **verl)
    # verl's options with TRL's convention
    for name, value in (("loss_agg_mode", "token-mean"), ("clip_ratio_c", 3.0),
                        ("global_batch_info", {"dp_size": 2})):
        with pytest.raises(ValueError, match=f"{name}.*convention='verl'"):
            _call(path, d, loss_type="grpo", **{name: value})


def test_hidden_rows_mode_is_gmpo_only():
    d = hidden_inputs(4, torch.float32)
    with pytest.raises(ValueError, match="mode='rows'"):
        _call("hidden", d, convention="verl", loss_type="vanilla", mode="rows")


def test_trl_convention_unchanged():
    """The new keywords' defaults leave TRL's convention as it was (the
    logits' entropy still feeds grpo_loss's own entropy metric)."""
    d = logits_inputs(5, torch.float32)
    lp = gmpo_ext.selective_logps(d.logits, d.ids, TEMPERATURE, mask=d.mask)
    want = gmpo_ext.grpo_loss(lp, d.old, d.adv[:, 0], d.mask, loss_type="grpo")
    got, m = gmpo_ext.grpo_loss_from_logits(d.logits, d.ids, d.old, d.adv[:, 0], d.mask,
                                            temperature=TEMPERATURE, loss_type="grpo",
                                            return_metrics=True)
    assert abs(float(got) - float(want)) <= 1e-6 * max(abs(float(want)), 0.1)
    assert "clip_ratio/region_mean" in m and "entropy" in m


# ----------------------------------------------------------------------------
# verl itself, through its registry

@needs_verl
@pytest.mark.parametrize("loss_type,agg", [
    ("vanilla", "token-mean"), ("vanilla", "seq-mean-token-sum-norm"),
    ("cispo", "seq-mean-token-sum"), ("gspo", "seq-mean-token-mean"), ("gspo", "token-mean"),
    ("sapo", "seq-mean-token-mean")])
def test_from_hidden_against_verl(loss_type, agg):
    """grpo_loss_from_hidden(convention="verl") against verl's own registered
    loss (core_algos.get_policy_loss_fn) on the float64 torch log-probs of the
    same head: loss, metrics and the gradients of hidden, weight and bias."""
    from verl.workers.config import ActorConfig   # gspo, sapo, cispo assert an ActorConfig

    d = hidden_inputs(6, torch.float64)
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                      clip_ratio=0.2, clip_ratio_low=EPS["epsilon_low"],
                      clip_ratio_high=EPS["epsilon_high"], clip_ratio_c=2.5, tau_pos=0.9,
                      tau_neg=1.2)
    cfg.global_batch_info.update(GBI)
    theirs = core_algos.get_policy_loss_fn(loss_type)
    h64, W64, b64 = leaves(d.hidden, d.weight, d.bias)
    lp = _ref_logps_from_hidden(h64, W64, b64, d.ids)
    want, want_m = theirs(d.old, lp, d.adv, d.mask, agg, cfg, d.isw)
    want.backward()
    kw = dict(convention="verl", loss_type=loss_type, loss_agg_mode=agg,
              global_batch_info=dict(GBI), is_weights=d.isw, **EPS)
    if loss_type == "vanilla":
        kw["clip_ratio_c"] = 2.5
    if loss_type == "sapo":
        kw.update(sapo_temperature_pos=0.9, sapo_temperature_neg=1.2)
    h, W, b = leaves(d.hidden, d.weight, d.bias)
    got, got_m = gmpo_ext.grpo_loss_from_hidden(h, W, d.ids, d.old, d.adv, d.mask, bias=b,
                                                temperature=TEMPERATURE, return_metrics=True,
                                                tile_tokens=16, tile_vocab=20, **kw)
    got.backward()
    assert loss_err(got, want) <= 1e-10, (float(got), float(want))
    for g, g64 in ((h.grad, h64.grad), (W.grad, W64.grad), (b.grad, b64.grad)):
        assert grad_err(g, g64) <= 1e-10
    for k in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert abs(float(got_m[k]) - float(want_m[k])) <= 1e-10, k


# ----------------------------------------------------------------------------
# the vocabulary split over 2 ranks (vocab_group=): tests/_dist_worker.py's
# "verl" scenario

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_group_two_ranks():
    """grpo_loss_from_logits and grpo_loss_from_hidden with convention="verl"
    and the vocabulary sharded over 2 gloo ranks: every rank's loss, metrics
    and shard gradients equal the single process's (C core only)."""
    import torch.multiprocessing as mp

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import _dist_worker

    mp.spawn(_dist_worker.run, args=(2, _free_port(), "c", ["verl"]), nprocs=2, join=True)
