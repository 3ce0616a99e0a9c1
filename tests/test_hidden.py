"""GMPO from hidden states (the LM head fused): gmpo_ext.linear_logps,
gmpo_loss_from_hidden, grpo_loss_from_hidden against a float64 reference built
from the full logits (h W^T + b, TRL's transform, log_softmax), on the same
rounded inputs: loss, metrics, entropy, and the gradients of hidden, weight and
bias (and through the entropy).

Tolerances per dtype (relative to the largest reference value of each
quantity): fp64 runs the same tiled algorithm in float64 (tiles folded in
torch): 1e-10. fp32: the GEMMs in fp32 and the fold in fp32: 2e-4 for the
gradients (sums over V terms). bf16 / fp16: the GEMM outputs (the logits) are
rounded to the input dtype before the fold, as in any bf16 LM head: a logit of
size ~5 carries 2^-8 * 5 = 0.02 absolute error in bf16, 0.0025 in fp16; so
logps and entropy get 0.1 / 0.02 absolute, the gradients 5e-2 / 1e-2
relative to their scale.
"""

from __future__ import annotations

import math

import pytest
import torch

import gmpo_ext
from gmpo_ext import hidden as hd
from gmpo_ext.reference import gmpo_loss_reference, grpo_loss_reference

TOL = {  # dtype: (logp/entropy absolute, gradient relative to its scale)
    torch.float64: (1e-10, 1e-9),
    torch.float32: (5e-5, 2e-4),
    torch.bfloat16: (0.15, 6e-2),
    torch.float16: (0.03, 1.5e-2),
}


def ref_head(h, W, ids, b=None, temperature=1.0, scale=1.0, softcap=None):
    """float64 (logp, entropy) of ids from the full logits, TRL's transform order."""
    z = h.double() @ W.double().t()
    if b is not None:
        z = z + b.double()
    z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    lp = torch.log_softmax(z, -1)
    ent = -(lp.exp() * lp).sum(-1)
    return lp.gather(-1, ids.long()[..., None]).squeeze(-1), ent


def make(B, T, H, V, dtype, seed=0, bias=False, pad=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) * 1.5 / math.sqrt(H)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    if pad and T > 2:   # ragged rows, one of them empty when B > 2
        for i in range(B):
            mask[i, max(0, T - (i * 7) % T - 1 if i != 2 else 0):] = False
    old = -torch.rand(B, T, generator=g) * 3 - 6
    adv = torch.randn(B, generator=g)
    return h, W, b, ids, mask, old, adv


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def check_grads(ours, refs, tol):
    for name, a, b in zip(("hidden", "weight", "bias"), ours, refs):
        if b is None:
            continue
        assert a.grad is not None, name
        assert a.grad.dtype == a.dtype
        assert rel(a.grad, b.grad) <= tol, (name, rel(a.grad, b.grad))


# ----------------------------------------------------------------------------
# linear_logps

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(temperature=0.7, logit_scale=1.3, final_logit_softcapping=4.0, bias=True),
])
def test_linear_logps_matches_full_logits(backend, dtype, opts):
    """backend "c": the C kernels; "simt": the CUDA kernels under the SIMT emulation."""
    if backend == "simt" and dtype == torch.float64:
        pytest.skip("float64 tiles fold in torch on every backend")
    opts = dict(opts)
    use_bias = opts.pop("bias", False)
    V = 257 if dtype == torch.float64 else 1003          # not a multiple of the tile
    h, W, b, ids, mask, *_ = make(3, 21, 16, V, dtype, bias=use_bias)
    hl, Wl, bl = leaves(h, W, b)
    lp, ent = gmpo_ext.linear_logps(hl, Wl, ids, bias=bl, mask=mask, return_entropy=True,
                                    tile_tokens=8, tile_vocab=200, **opts)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    hr, Wr, br = leaves(h.double(), W.double(), None if b is None else b.double())
    rl, re = ref_head(hr, Wr, ids, br, opts.get("temperature", 1.0), opts.get("logit_scale", 1.0),
                      opts.get("final_logit_softcapping"))
    m = mask.double()
    rl, re = rl * m, re * m
    atol, gtol = TOL[dtype]
    assert (lp.double() - rl).abs().max() <= atol
    assert (ent.double() - re).abs().max() <= atol
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    gl = torch.randn(lp.shape, dtype=torch.float64)
    ge = torch.randn(lp.shape, dtype=torch.float64)
    (lp.double() * gl + ent.double() * ge).sum().backward()
    (rl * gl + re * ge).sum().backward()
    check_grads((hl, Wl, bl), (hr, Wr, br), gtol)
    # padding gets an exact zero gradient and was never projected
    assert (hl.grad[~mask] == 0).all()


def test_odd_vocab_default_tiles_and_packed_flat():
    """V = 50257 (GPT-2) with the default tiles; (N, H) hidden with (N,) ids."""
    h, W, b, ids, mask, *_ = make(1, 40, 8, 50257, torch.float32, pad=False)
    hl, Wl = leaves(h[0], W)
    lp = gmpo_ext.linear_logps(hl, Wl, ids[0])
    hr, Wr = leaves(h[0].double(), W.double())
    rl, _ = ref_head(hr, Wr, ids[0])
    assert (lp.double() - rl).abs().max() < 5e-5
    lp.sum().backward()
    rl.sum().backward()
    check_grads((hl, Wl), (hr, Wr), 2e-4)


def test_strided_hidden_slice_and_tied_weight():
    """hidden a slice of a (B, P + T, H) backbone output (a view, read in place);
    the head tied to the embedding: both gradients land in one leaf."""
    B, P, T, H, V = 2, 5, 9, 12, 301
    g = torch.Generator().manual_seed(3)
    full = torch.randn(B, P + T, H, generator=g)
    emb = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    backbone = (full @ torch.eye(H)).requires_grad_()
    x = backbone + emb[ids.clamp(max=V - 1)].sum() * 0   # tie: emb also feeds the "backbone"
    hs = x[:, P - 1:-1]                                  # position t predicts token t
    assert not hs.is_contiguous()
    lp = gmpo_ext.linear_logps(hs, emb, ids, tile_tokens=4, tile_vocab=64)
    lp.sum().backward()
    b2 = backbone.detach().clone().requires_grad_()
    e2 = emb.detach().clone().requires_grad_()
    rl, _ = ref_head((b2 + e2[ids].sum() * 0)[:, P - 1:-1], e2, ids)
    rl.sum().backward()
    assert (lp.double() - rl).abs().max() < 5e-5
    assert rel(backbone.grad, b2.grad) < 2e-4 and rel(emb.grad, e2.grad) < 2e-4


def test_only_requested_grads_and_no_grad():
    h, W, b, ids, mask, *_ = make(2, 6, 8, 97, torch.float32, bias=True)
    Wl = W.clone().requires_grad_()
    lp = gmpo_ext.linear_logps(h, Wl, ids, bias=b, mask=mask)
    lp.sum().backward()
    assert Wl.grad is not None and h.grad is None and b.grad is None
    with torch.no_grad():
        out = gmpo_ext.linear_logps(h, W, ids)
    assert not out.requires_grad


# ----------------------------------------------------------------------------
# gmpo_loss_from_hidden / grpo_loss_from_hidden

def ref_loss(h, W, ids, old, adv, mask, b=None, head=(), loss=gmpo_loss_reference, **kw):
    rl, re = ref_head(h, W, ids, b, *head)
    return loss(rl * mask, old.double(), adv.double(), mask, **kw), re


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [
    dict(),
    dict(convention="verl", epsilon_low=0.2, epsilon_high=0.3, log_ratio_clamp=20.0,
         normalizer=2.0),
    dict(beta=0.04, ref=True, is_weights=True),
])
def test_gmpo_loss_from_hidden_matches_reference(backend, dtype, kw):
    if backend == "simt" and (dtype != torch.float32 or kw):
        pytest.skip("the emulated CUDA kernels: one configuration suffices here")
    kw = dict(kw)
    use_ref, use_isw = kw.pop("ref", False), kw.pop("is_weights", False)
    h, W, b, ids, mask, old, adv = make(4, 13, 16, 777, dtype, bias=True)
    g = torch.Generator().manual_seed(9)
    ref_logps = (old + 0.1 * torch.randn(old.shape, generator=g)) if use_ref else None
    isw = torch.rand(4, 13, generator=g) + 0.5 if use_isw else None
    head = dict(temperature=0.9, logit_scale=1.1, final_logit_softcapping=6.0)
    # old_logps close to the current ones: some tokens clipped, most not
    with torch.no_grad():
        cur, _ = ref_head(h, W, ids, b, 0.9, 1.1, 6.0)
    old = (cur + 0.3 * torch.randn(cur.shape, generator=g)).float()
    hl, Wl, bl = leaves(h, W, b)
    loss, metrics, ent = gmpo_ext.gmpo_loss_from_hidden(
        hl, Wl, ids, old, adv, mask, bias=bl, ref_logps=ref_logps, is_weights=isw,
        return_metrics=True, return_entropy=True, tile_tokens=16, tile_vocab=256, **head, **kw)
    hr, Wr, br = leaves(h.double(), W.double(), b.double())
    (rloss, rmet), re = ref_loss(hr, Wr, ids, old, adv, mask.double(), br, (0.9, 1.1, 6.0),
                                 ref_logps=ref_logps, is_weights=isw, **kw)
    atol, gtol = TOL[dtype]
    scale = max(1.0, rloss.abs().item())
    assert abs(loss.item() - rloss.item()) <= (1e-5 if dtype == torch.float32 else 5e-2) * scale
    for k, v in rmet.items():
        if k == "gmpo/max_mean_log_ratio":
            assert abs(metrics[k].item() - v.item()) <= 10 * atol + 1e-5, k
        else:
            assert abs(metrics[k].item() - v.item()) <= (1e-5 if dtype == torch.float32 else 0.1), k
    m = mask.double()
    assert abs(metrics["entropy"].item() - ((re * m).sum() / m.sum()).item()) <= atol
    # the entropy bonus gets its gradient too
    (loss - 0.01 * (ent * mask).sum()).backward()
    (rloss - 0.01 * (re * m).sum()).backward()
    check_grads((hl, Wl, bl), (hr, Wr, br), gtol)


def test_grpo_loss_from_hidden_matches_reference():
    h, W, b, ids, mask, old, adv = make(3, 11, 8, 300, torch.float32)
    with torch.no_grad():
        cur, _ = ref_head(h, W, ids)
    old = (cur + 0.2 * torch.randn(cur.shape)).float()
    hl, Wl = leaves(h, W)
    loss = gmpo_ext.grpo_loss_from_hidden(hl, Wl, ids, old, adv, mask, loss_type="bnpo",
                                          tile_tokens=8, tile_vocab=100)
    hr, Wr = leaves(h.double(), W.double())
    (rloss, _), _ = ref_loss(hr, Wr, ids, old, adv, mask.double(), loss=grpo_loss_reference,
                             loss_type="bnpo")
    assert abs(loss.item() - rloss.item()) < 1e-5 * max(1, abs(rloss.item()))
    loss.backward()
    rloss.backward()
    check_grads((hl, Wl), (hr, Wr), 2e-4)


def test_packed_equals_padded():
    """Packed (N, H) rows with cu_seqlens give the padded layout's loss and gradients."""
    h, W, b, ids, mask, old, adv = make(4, 10, 8, 211, torch.float32)
    lens = mask.sum(1)
    cu = torch.zeros(5, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    hp, idp, oldp = h[mask], ids[mask], old[mask]
    mp = torch.ones(hp.shape[0], dtype=torch.float32)
    h1, W1 = leaves(h, W)
    l1, m1 = gmpo_ext.gmpo_loss_from_hidden(h1, W1, ids, old, adv, mask, return_metrics=True,
                                            tile_tokens=8, tile_vocab=64)
    h2, W2 = leaves(hp, W)
    l2, m2 = gmpo_ext.gmpo_loss_from_hidden(h2, W2, idp, oldp, adv, mp, cu_seqlens=cu,
                                            return_metrics=True, tile_tokens=8, tile_vocab=64)
    assert abs(l1.item() - l2.item()) < 1e-6
    for k in m1:
        assert abs(m1[k].item() - m2[k].item()) < 1e-6, k
    l1.backward()
    l2.backward()
    assert rel(h2.grad, h1.grad[mask]) < 1e-5 and rel(W2.grad, W1.grad) < 1e-5


def test_all_masked_batch_is_a_differentiable_zero():
    h, W, b, ids, mask, old, adv = make(2, 5, 8, 50, torch.float32)
    mask = torch.zeros_like(mask)
    adv = torch.zeros(2)
    hl, Wl = leaves(h, W)
    loss = gmpo_ext.gmpo_loss_from_hidden(hl, Wl, ids, old, adv, mask)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (hl.grad == 0).all() and (Wl.grad == 0).all()
    # empty batch
    loss = gmpo_ext.gmpo_loss_from_hidden(hl[:0], Wl, ids[:0], old[:0], adv[:0], mask[:0])
    loss.backward()


def test_gradcheck_fp64():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(11, 4, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (2, 3))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)

    def f(h, W, b):
        lp, ent = gmpo_ext.linear_logps(h, W, ids, bias=b, mask=mask, return_entropy=True,
                                        temperature=0.8, final_logit_softcapping=3.0,
                                        tile_tokens=2, tile_vocab=4)
        return lp, ent

    assert torch.autograd.gradcheck(f, (h, W, b), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# tile sizes, the fold primitive, bad inputs

def test_default_tiles():
    tn, tv = hd.default_tiles(100_000, 896, 151936, torch.float32)
    assert tv <= hd.VOCAB_TILE and tv % 128 == 0 and -(-151936 // tv) == 5
    assert tn * tv * 4 <= hd.TILE_BUDGET_BYTES and tn % 64 == 0
    assert hd.default_tiles(10, 256, 32768, torch.bfloat16) == (10, 32768)


def test_fold_merge_is_the_primitive(backend):
    """Folding [0, V) at once or in two ranges merged gives the same state (DESIGN 2c)."""
    n, V = 5, 700
    y = torch.randn(n, V) * 3
    ids = torch.randint(0, V, (n,))

    def fold(lo, hi):
        st = torch.zeros(n, 4)
        st[:, 0] = -math.inf
        hd._fold(y[:, lo:hi].contiguous(), ids, st, lo, V, 1.0, 0.0, 1.0, True)
        return st

    whole = fold(0, V)
    a, b = fold(0, 333), fold(333, V)
    M = torch.maximum(a[:, 0], b[:, 0])
    ca, cb = torch.exp(a[:, 0] - M), torch.exp(b[:, 0] - M)
    s = ca * a[:, 1] + cb * b[:, 1]
    w = ca * (a[:, 2] + (a[:, 0] - M) * a[:, 1]) + cb * (b[:, 2] + (b[:, 0] - M) * b[:, 1])
    assert torch.allclose(whole[:, 0], M)
    assert torch.allclose(whole[:, 1], s, rtol=1e-5)
    assert torch.allclose(whole[:, 2], w, rtol=1e-4, atol=1e-4)
    assert torch.allclose(whole[:, 3], a[:, 3] + b[:, 3])


@pytest.mark.parametrize("case, exc, name", [
    ("ids_range", IndexError, "completion_ids"),
    ("weight_H", ValueError, "weight"),
    ("weight_dtype", TypeError, "weight"),
    ("bias_shape", ValueError, "bias"),
    ("mask_shape", ValueError, "mask"),
    ("ids_dtype", TypeError, "ids"),
    ("temperature", ValueError, "temperature"),
    ("softcap", ValueError, "final_logit_softcapping"),
    ("cu_seqlens", ValueError, "cu_seqlens"),
    ("hidden_dim", ValueError, "hidden"),
    ("tile", ValueError, "tile_tokens"),
])
def test_bad_inputs_name_the_argument(case, exc, name):
    h, W, b, ids, mask, old, adv = make(2, 4, 8, 30, torch.float32, bias=True)
    kw = {}
    if case == "ids_range":
        ids = ids.clone()
        ids[0, 0] = 30
        mask[0, 0] = True
    elif case == "weight_H":
        W = W[:, :7]
    elif case == "weight_dtype":
        W = W.double()
    elif case == "bias_shape":
        kw["bias"] = b[:-1]
    elif case == "mask_shape":
        mask = mask[:, :3]
    elif case == "ids_dtype":
        ids = ids.float()
    elif case == "temperature":
        kw["temperature"] = 0.0
    elif case == "softcap":
        kw["final_logit_softcapping"] = -1.0
    elif case == "cu_seqlens":
        h, ids, old, mask = h[0], ids[0], old[0], mask[0]
        kw["cu_seqlens"] = torch.tensor([0, 3, 2], dtype=torch.int32)
    elif case == "hidden_dim":
        h = h[0, 0]
    elif case == "tile":
        kw["tile_tokens"] = 0
    with pytest.raises(exc, match=name):
        gmpo_ext.gmpo_loss_from_hidden(h, W, ids, old, adv, mask, **kw)


@pytest.mark.parametrize("bad_id", [30, -1])
def test_float64_ids_are_checked(bad_id):
    """float64 (gradcheck's dtype) folds in torch, not in the C core: its ids
    are checked all the same (an id outside [0, V) once gave the logp of a
    target logit of 0, silently)."""
    h, W, b, ids, mask, old, adv = make(2, 4, 8, 30, torch.float64, bias=True)
    ids = ids.clone()
    ids[1, 2] = bad_id
    with pytest.raises(IndexError, match=rf"ids: token id {bad_id} at \[1, 2\]"):
        gmpo_ext.linear_logps(h, W, ids, bias=b)
    mask = mask.clone()
    mask[1, 2] = True
    with pytest.raises(IndexError, match="completion_ids"):
        gmpo_ext.gmpo_loss_from_hidden(h, W, ids, old, adv, mask, bias=b)
    mask[1, 2] = False   # a token the mask does not count is never scored
    gmpo_ext.gmpo_loss_from_hidden(h, W, ids, old, adv, mask, bias=b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_invalid_id_error_names_its_position(dtype):
    """The kernels see only the scored tokens: the error names the id's place
    in the caller's ids ((b, t), or n when packed), not its index among them."""
    h, W, _, ids, _, _, _ = make(7, 9, 8, 20, dtype)
    ids = ids.clone()
    ids[5, 6] = 20
    m = torch.zeros(7, 9, dtype=torch.bool)
    m[3, 4] = m[5, 6] = True
    with pytest.raises(IndexError, match=r"ids: token id 20 at \[5, 6\] is outside \[0, 20\)"):
        gmpo_ext.linear_logps(h, W, ids, mask=m)
    with pytest.raises(IndexError, match=r"ids: token id 20 at \[51\]"):
        gmpo_ext.linear_logps(h.reshape(63, 8), W, ids.reshape(63), mask=m.reshape(63))


def test_ops_validate_in_their_implementation():
    """The registered ops check what they are given, not only the public wrappers,
    and the C kernels check extents and ids before any read."""
    h = torch.randn(4, 8)
    W = torch.randn(30, 8)
    with pytest.raises(IndexError, match="pos"):
        torch.ops.gmpo_ext.hidden_fwd(h, W, None, torch.zeros(2, dtype=torch.int64),
                                      torch.tensor([0, 4]), 1.0, 0.0, 1.0, False, 2, 8)
    with pytest.raises(ValueError, match="ids and pos"):
        torch.ops.gmpo_ext.hidden_fwd(h, W, None, torch.zeros(3, dtype=torch.int64),
                                      torch.tensor([0, 1]), 1.0, 0.0, 1.0, False, 2, 8)
    with pytest.raises(IndexError, match="ids"):
        torch.ops.gmpo_ext.hidden_fwd(h, W, None, torch.tensor([0, 30]),
                                      torch.tensor([0, 1]), 1.0, 0.0, 1.0, False, 2, 8)
    # the C entry point itself: a tile extent too small, a state too small
    tile = torch.randn(3, 10)
    ids = torch.zeros(3, dtype=torch.int64)
    st = torch.zeros(3, 4)
    C = gmpo_ext._C
    with pytest.raises(ValueError, match="tile"):
        C.hidden_fold(0, 0, (tile.data_ptr(), 29, 1, 3, 10, 0, 10, 10), (ids.data_ptr(), 3, 9),
                      1.0, 0.0, 1.0, 0, 1, (st.data_ptr(), 12))
    with pytest.raises(ValueError, match="state"):
        C.hidden_fold(0, 0, (tile.data_ptr(), 30, 1, 3, 10, 0, 10, 10), (ids.data_ptr(), 3, 9),
                      1.0, 0.0, 1.0, 0, 1, (st.data_ptr(), 11))
    with pytest.raises(ValueError, match="ids"):
        C.hidden_fold(0, 0, (tile.data_ptr(), 30, 1, 3, 10, 0, 10, 10), (ids.data_ptr(), 2, 9),
                      1.0, 0.0, 1.0, 0, 1, (st.data_ptr(), 12))
    with pytest.raises(ValueError, match="vocabulary range"):
        C.hidden_fold(0, 0, (tile.data_ptr(), 30, 1, 3, 10, 5, 10, 10), (ids.data_ptr(), 3, 9),
                      1.0, 0.0, 1.0, 0, 1, (st.data_ptr(), 12))
    with pytest.raises(ValueError, match="lse"):
        C.hidden_grad(0, 0, (tile.data_ptr(), 30, 1, 3, 10, 0, 10, 10), (ids.data_ptr(), 3, 9),
                      1.0, 0.0, 1.0, 0, 1, st.data_ptr(), 0, st.data_ptr(), 0, 2)


def test_cuda_kernels_never_read_out_of_bounds_ids(backend):
    """CUDA (here its emulation): no id check on the host; an id outside [0, V)
    gives NaN as that token's logp and is never used as an address."""
    if backend != "simt":
        pytest.skip("the CPU kernels raise instead (test_bad_inputs_name_the_argument)")
    n, V = 4, 50
    y = torch.randn(n, V)
    ids = torch.tensor([0, V, 7, -1])   # invalid on both sides of [0, V)
    st = torch.zeros(n, 4)
    st[:, 0] = -math.inf
    hd._fold(y, ids, st, 0, V, 1.0, 0.0, 1.0, False)
    lp = st[:, 3] - (st[:, 0] + torch.log(st[:, 1]))
    assert torch.isnan(lp[[1, 3]]).all() and torch.isfinite(lp[[0, 2]]).all()
    ref = torch.log_softmax(y.double(), -1)
    assert (lp[[0, 2]].double() - ref[[0, 2], ids[[0, 2]]]).abs().max() < 1e-5


def test_memory_is_one_tile():
    """Nothing (N, V)-sized is allocated: the largest allocation of a step is the
    tile (or the (V, H) weight gradient), however many tokens there are."""
    from torch.profiler import ProfilerActivity, profile
    B, T, H, V = 2, 256, 16, 4096
    h, W, b, ids, mask, old, adv = make(B, T, H, V, torch.float32, pad=False)
    hl, Wl = leaves(h, W)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = gmpo_ext.gmpo_loss_from_hidden(hl, Wl, ids, old, adv, mask, tile_tokens=64,
                                              tile_vocab=1024)
        loss.backward()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert max(sizes) <= max(64 * 1024 * 4, V * H * 4)
    assert max(sizes) < B * T * V * 4 / 4


@pytest.mark.parametrize("kw", [dict(), dict(convention="verl", normalizer=3.0)])
def test_rows_mode_equals_tiles(kw):
    """The whole-row variant (3 GEMMs) gives the tiled path's loss, metrics and
    gradients, row blocks of any size (rows_budget small: one row per block)."""
    h, W, b, ids, mask, old, adv = make(5, 9, 8, 120, torch.float32, bias=True)
    h1, W1, b1 = leaves(h, W, b)
    l1, m1 = gmpo_ext.gmpo_loss_from_hidden(h1, W1, ids, old, adv, mask, bias=b1,
                                            return_metrics=True, temperature=0.8, **kw)
    l1.backward()
    for budget in (9 * 120 * 4, 10 ** 7):
        h2, W2, b2 = leaves(h, W, b)
        l2, m2 = hd._from_hidden(
            gmpo_ext.gmpo_loss, h2, W2, ids, old, adv, mask, b2, 0.8, 1.0, None, None, None,
            None, True, False, None, None, "rows",
            dict(dict(epsilon_low=0.4, epsilon_high=None, beta=0.0, convention="trl",
                      log_ratio_clamp=None, normalizer=1.0), **kw), rows_budget=budget)
        assert abs(l1.item() - l2.item()) < 1e-6
        for k in m1:
            assert abs(m1[k].item() - m2[k].item()) < 1e-5, k
        (l2 * 2).backward()
        for a, c in ((h1, h2), (W1, W2), (b1, b2)):
            assert rel(c.grad, 2 * a.grad) < 1e-5


def test_opcheck():
    """torch.library.opcheck: schemas, fake kernels, autograd registration."""
    h = torch.randn(2, 3, 8, requires_grad=True)
    W = torch.randn(40, 8, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    ids = torch.randint(0, 40, (5,))
    pos = torch.tensor([0, 1, 2, 4, 5])
    args = (h, W, b, ids, pos, 1.0, 0.0, 1.0, True, 2, 16)
    torch.library.opcheck(hd.hidden_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                           "test_autograd_registration"))


ASAN_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gmpo_hidden.h"
/* every buffer malloc'd to its exact extent: ASan reports any read or write past it */
static int run(int32_t dt, int64_t n, int64_t vn, int64_t ld, int64_t v0, int64_t V, double cap) {
    size_t es = dt == GMPO_DT_F32 ? 4 : 2;
    int64_t ext = (n - 1) * ld + vn;
    unsigned char *tile = malloc((size_t)ext * es);
    for (int64_t k = 0; k < ext * (int64_t)es; k++) tile[k] = (unsigned char)(k * 37 % 61);
    if (dt == GMPO_DT_F32) for (int64_t k = 0; k < ext; k++) ((float *)tile)[k] = (float)(k % 13) * 0.3f;
    int64_t *ids = malloc((size_t)n * 8);
    for (int64_t r = 0; r < n; r++) ids[r] = (r * 7919) % V;
    float *st = malloc((size_t)n * 16), *lse = malloc((size_t)n * 4), *ent = malloc((size_t)n * 4);
    float *g = malloc((size_t)n * 4), *gh = malloc((size_t)n * 4);
    for (int64_t r = 0; r < n; r++) { gmpo_lse_init(st + 4 * r); g[r] = r % 3 ? 0.5f : 0.0f; gh[r] = 0.25f; }
    gmpo_tile_args a;
    memset(&a, 0, sizeof a);
    a.n = n; a.vn = vn; a.v0 = v0; a.V = V; a.ld = ld; a.dtype = dt; a.tile = tile;
    a.tile_extent = ext; a.ids = ids; a.ids_dtype = GMPO_DT_I64; a.ids_extent = n;
    a.logit_scale = 1.5; a.softcap = cap; a.temperature = 0.7; a.entropy = 1; a.num_threads = 2;
    if (gmpo_hidden_cpu_fold(&a, st, n * 4)) { printf("fold: %s\n", a.err); return 1; }
    for (int64_t r = 0; r < n; r++) { lse[r] = st[4 * r] + logf(st[4 * r + 1]); ent[r] = 1.0f; }
    if (gmpo_hidden_cpu_grad(&a, lse, ent, g, gh, n)) { printf("grad: %s\n", a.err); return 1; }
    a.tile_extent = ext - 1;   /* one element short: refused before any read */
    if (gmpo_hidden_cpu_fold(&a, st, n * 4) != GMPO_EINVAL) { printf("extent not checked\n"); return 1; }
    free(tile); free(ids); free(st); free(lse); free(ent); free(g); free(gh);
    return 0;
}
int main(void) {
    int bad = 0;
    bad |= run(GMPO_DT_F32, 5, 2049, 2049, 0, 4100, 0.0);
    bad |= run(GMPO_DT_F32, 3, 4100 - 2049, 2100, 2049, 4100, 0.0);
    bad |= run(GMPO_DT_BF16, 4, 33, 40, 0, 33, 5.0);
    bad |= run(GMPO_DT_F16, 7, 1, 1, 32, 33, 5.0);
    bad |= run(GMPO_DT_F16, 1, 4097, 4097, 0, 4097, 0.0);
    printf(bad ? "FAIL\n" : "OK\n");
    return bad;
}
"""


def test_c_tile_kernels_under_asan(tmp_path):
    """The C tile kernels, built with AddressSanitizer, on buffers of exactly their
    extents (odd sizes, chunk edges, ld > vn, every dtype, softcap): no read or
    write outside them, and a short extent refused before any read."""
    import shutil
    import subprocess
    from pathlib import Path
    if not shutil.which("gcc"):
        pytest.skip("no gcc")
    root = Path(__file__).resolve().parent.parent / "csrc"
    src = tmp_path / "drv.c"
    src.write_text(ASAN_DRIVER)
    exe = tmp_path / "drv"
    r = subprocess.run(["gcc", "-std=c11", "-O1", "-g", "-fsanitize=address,undefined",
                        "-fno-sanitize-recover=all", "-fopenmp", "-Wall", "-Wextra", "-Werror",
                        "-DGMPO_NO_TARGET_CLONES", f"-I{root}", str(src),
                        str(root / "cpu" / "hidden_cpu.c"), "-o", str(exe), "-lm"],
                       capture_output=True, text=True)
    if r.returncode and "sanitize" in r.stderr and "cannot find" in r.stderr:
        pytest.skip("no ASan runtime")
    assert r.returncode == 0, r.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True,
                         env={"ASAN_OPTIONS": "detect_leaks=1", "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr


# ----------------------------------------------------------------------------
# mixed devices, autograd edges, layouts (review findings)

_META_ARGS = ["weight", "bias", "ids"]


@pytest.mark.parametrize("entry", ["linear_logps", "gmpo_tiles", "gmpo_rows", "grpo"])
@pytest.mark.parametrize("bad", _META_ARGS)
def test_meta_tensor_beside_cpu_hidden_raises(entry, bad):
    """A meta weight, bias or ids beside CPU hidden: the dispatcher picks the
    ops' fake kernel for a call with any meta tensor, which once handed back
    uninitialised CPU memory as log-probs; it must raise, naming the argument."""
    h, W, b, ids, mask, old, adv = make(2, 4, 8, 30, torch.float32, bias=True)
    args = dict(weight=W, bias=b, ids=ids)
    args[bad] = args[bad].to("meta")
    W, b, ids = args["weight"], args["bias"], args["ids"]
    with pytest.raises(ValueError, match=rf"{bad} is on meta but hidden is on cpu"):
        if entry == "linear_logps":
            gmpo_ext.linear_logps(h, W, ids, bias=b, mask=mask)
        elif entry == "grpo":
            gmpo_ext.grpo_loss_from_hidden(h, W, ids, old, adv, mask, bias=b)
        else:
            gmpo_ext.gmpo_loss_from_hidden(h, W, ids, old, adv, mask, bias=b,
                                           mode=entry.split("_")[1])


@pytest.mark.parametrize("bad", _META_ARGS + ["pos", "hidden"])
def test_meta_tensor_in_raw_hidden_ops_raises(bad):
    """The raw ops too (torch.ops.gmpo_ext.hidden_fwd / hidden_bwd): their fake
    kernels check devices, not only shapes. All-meta inputs still give shapes."""
    h, W, b, ids, *_ = make(2, 3, 8, 30, torch.float32, bias=True)
    args = dict(hidden=h, weight=W, bias=b, ids=ids.reshape(-1), pos=torch.arange(6))
    lp, ent, lse = torch.ops.gmpo_ext.hidden_fwd(*args.values(), 1.0, 0.0, 1.0, True, 4, 16)
    good = dict(args)
    args[bad] = args[bad].to("meta")
    name = "weight" if bad == "hidden" else bad   # hidden on meta: the others are "wrong"
    with pytest.raises(ValueError, match=rf"{name} is on (meta|cpu) but hidden"):
        torch.ops.gmpo_ext.hidden_fwd(*args.values(), 1.0, 0.0, 1.0, True, 4, 16)
    with pytest.raises(ValueError, match=rf"{name} is on (meta|cpu) but hidden"):
        torch.ops.gmpo_ext.hidden_bwd(torch.ones(6), None, *args.values(), lse, ent, 1.0, 0.0,
                                      1.0, 4, 16, True, True, True)
    with pytest.raises(ValueError, match="lse is on meta but hidden is on cpu"):
        torch.ops.gmpo_ext.hidden_bwd(torch.ones(6), None, *good.values(), lse.to("meta"), ent,
                                      1.0, 0.0, 1.0, 4, 16, True, True, True)
    meta = [t.to("meta") for t in good.values()]
    out = torch.ops.gmpo_ext.hidden_fwd(*meta, 1.0, 0.0, 1.0, True, 4, 16)
    assert all(t.device.type == "meta" and t.shape == (6,) for t in out)


def _near_old(h, W, b, ids, mask, seed=1):
    """old_logps within the clip range of the current ones (gradients not all 0)."""
    g = torch.Generator().manual_seed(seed)
    lp = gmpo_ext.linear_logps(h.detach(), W.detach(), ids,
                               bias=None if b is None else b.detach(), mask=mask)
    return lp + 0.1 * torch.randn(lp.shape, generator=g)


def _rows_loss(h, W, b, ids, mask, old, adv, **kw):
    return gmpo_ext.gmpo_loss_from_hidden(h, W, ids, old, adv, mask, bias=b, mode="rows", **kw)


def test_rows_mode_second_backward_and_upstream_scale():
    """mode="rows" computes its gradients in forward: a second backward
    (retain_graph=True) once raised TypeError (the stored gradients were
    dropped by the first); an upstream gradient other than 1 scales them; the
    gradients handed out are not the saved ones (zeroing .grad in place
    between the two backwards leaves the second one right)."""
    h, W, b, ids, mask, old, adv = make(3, 6, 8, 40, torch.float32, bias=True)
    old = _near_old(h, W, b, ids, mask)
    hl, Wl, bl = leaves(h, W, b)
    loss = _rows_loss(hl, Wl, bl, ids, mask, old, adv)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (hl, Wl, bl)]
    assert all(g.abs().sum() > 0 for g in first)
    for t in (hl, Wl, bl):
        t.grad.zero_()
    loss.backward(retain_graph=True)
    assert all(torch.equal(t.grad, g) for t, g in zip((hl, Wl, bl), first))
    (loss * -2.5).backward()
    assert all(torch.allclose(t.grad, -1.5 * g) for t, g in zip((hl, Wl, bl), first))
    # without retain_graph the saved gradients are freed: torch's own error
    loss = _rows_loss(hl, Wl, bl, ids, mask, old, adv)
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_rows_mode_double_backward_raises():
    """create_graph=True once returned a gradient without a graph, silently;
    it raises as the tiles path's vocabulary shard does."""
    h, W, b, ids, mask, old, adv = make(2, 5, 8, 30, torch.float32)
    hl, Wl = leaves(h, W)
    loss = _rows_loss(hl, Wl, None, ids, mask, old, adv)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, (hl, Wl), create_graph=True)


def test_rows_mode_under_no_grad_runs_no_gradient_gemm(monkeypatch):
    """Under torch.no_grad() mode="rows" ran the dH / dW GEMMs and allocated
    the (V, H) accumulator all the same; now only the forward GEMM runs, and
    the loss is the same."""
    h, W, b, ids, mask, old, adv = make(2, 5, 8, 30, torch.float32, bias=True)
    old = _near_old(h, W, b, ids, mask)
    hl, Wl, bl = leaves(h, W, b)
    want = _rows_loss(hl, Wl, bl, ids, mask, old, adv)
    calls, zeros = [], []
    monkeypatch.setattr(hd, "_acc_mm", lambda *a: calls.append(a))
    real_zeros = torch.zeros

    def spy_zeros(*a, **k):
        zeros.append(tuple(a[0]) if a and isinstance(a[0], (tuple, list, torch.Size)) else a)
        return real_zeros(*a, **k)

    monkeypatch.setattr(torch, "zeros", spy_zeros)
    with torch.no_grad():
        got = _rows_loss(hl, Wl, bl, ids, mask, old, adv)
    monkeypatch.undo()
    assert not calls
    assert tuple(W.shape) not in zeros and tuple(h.shape) not in zeros
    assert not got.requires_grad and torch.equal(got, want.detach())


@pytest.mark.parametrize("algo", ["gmpo", "grpo"])
def test_packed_is_weights_shapes_have_one_meaning(algo):
    """Packed input: per-token is_weights (N,) were read as per-row when N == B
    (rows of lengths 2, 0, 1: N = B = 3); now (N,) is per token always, (B, 1)
    per row, and a (B,) vector with N != B raises (it read as per row)."""
    fn = gmpo_ext.gmpo_loss_from_hidden if algo == "gmpo" else gmpo_ext.grpo_loss_from_hidden
    h, W, _, ids, _, _, adv = make(3, 2, 8, 30, torch.float32)
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    old = _near_old(h, W, None, ids, mask)
    cu = torch.tensor([0, 2, 2, 3], dtype=torch.int32)
    hp, idp, oldp = h[mask], ids[mask], old[mask]
    mp = torch.ones(3)
    w_tok = torch.tensor([0.5, 2.0, 1.5])
    padded_w = torch.zeros(3, 2)
    padded_w[mask] = w_tok
    got = fn(hp, W, idp, oldp, adv, mp, cu_seqlens=cu, is_weights=w_tok)
    want = fn(h, W, ids, old, adv, mask, is_weights=padded_w)
    assert torch.allclose(got, want, atol=1e-6), (got, want)
    per_row = fn(h, W, ids, old, adv, mask, is_weights=w_tok[:, None])
    assert not torch.allclose(per_row, want, atol=1e-4)   # the two readings differ here
    got_row = fn(hp, W, idp, oldp, adv, mp, cu_seqlens=cu, is_weights=w_tok[:, None])
    assert torch.allclose(got_row, per_row, atol=1e-6)
    # N != B: a (B,) vector is refused, naming is_weights and the (B, 1) form
    cu2 = torch.tensor([0, 2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"is_weights.*\(B, 1\)"):
        fn(hp, W, idp, oldp, adv[:2], mp, cu_seqlens=cu2, is_weights=w_tok[:2])
    with pytest.raises(ValueError, match="is_weights"):
        fn(hp, W, idp, oldp, adv[:2], mp, cu_seqlens=cu2, is_weights=torch.ones(3, 1))


@pytest.mark.parametrize("flat", [False, True])
def test_raw_op_duplicate_positions_add_their_gradients(flat):
    """pos listing a token twice: its hidden gradient is the sum of both
    entries' (it was overwritten by the last one)."""
    h, W, b, ids, *_ = make(2, 3, 8, 30, torch.float64, bias=True)
    if flat:
        h = h.reshape(6, 8)
    pos = torch.tensor([0, 4, 4, 5, 4, 0])
    idp = ids.reshape(-1)[torch.tensor([0, 4, 4, 5, 4, 0])].contiguous()
    idp[2] = (idp[2] + 1) % 30   # one of the repeats scores another id
    hl, Wl, bl = leaves(h, W, b)
    lp, _, _ = torch.ops.gmpo_ext.hidden_fwd(hl, Wl, bl, idp, pos, 1.0, 0.0, 1.0, False, 4, 16)
    g = torch.randn(6, dtype=torch.float64)
    (lp * g).sum().backward()
    hr, Wr, br = leaves(h, W, b)
    rows = hr.reshape(6, 8)[pos]
    rl = torch.log_softmax(rows @ Wr.t() + br, -1).gather(1, idp[:, None])[:, 0]
    assert torch.allclose(lp, rl, atol=1e-10)
    (rl * g).sum().backward()
    check_grads((hl, Wl, bl), (hr, Wr, br), 1e-9)


def test_raw_op_without_entropy_gives_it_no_gradient():
    """entropy=False: the entropy output is zeros, not the entropy; a loss that
    reads it once got a wrong hidden / weight gradient (the entropy's chain
    applied to a zero entropy). It is non-differentiable now."""
    h, W, _, ids, *_ = make(2, 3, 8, 30, torch.float32)
    pos = torch.arange(6)
    ids = ids.reshape(-1).contiguous()
    hl, Wl = leaves(h, W)
    lp, ent, _ = torch.ops.gmpo_ext.hidden_fwd(hl, Wl, None, ids, pos, 1.0, 0.0, 1.0, False, 4,
                                               16)
    (lp.sum() + ent.sum()).backward()
    hr, Wr = leaves(h, W)
    lp2, _, _ = torch.ops.gmpo_ext.hidden_fwd(hr, Wr, None, ids, pos, 1.0, 0.0, 1.0, False, 4,
                                              16)
    lp2.sum().backward()
    assert torch.equal(hl.grad, hr.grad) and torch.equal(Wl.grad, Wr.grad)
    assert (ent == 0).all() and not ent.requires_grad


@pytest.mark.parametrize("name", ["tile_tokens", "tile_vocab"])
def test_bool_tile_sizes_are_refused(name):
    """The dispatcher turns a bool into an int before the op's own check runs
    (tile_vocab=True became a 1-column tile): the public functions refuse it."""
    h, W, _, ids, mask, old, adv = make(2, 3, 8, 30, torch.float32)
    with pytest.raises(ValueError, match=name):
        gmpo_ext.linear_logps(h, W, ids, **{name: True})
    with pytest.raises(ValueError, match=name):
        gmpo_ext.gmpo_loss_from_hidden(h, W, ids, old, adv, mask, **{name: False})
    with pytest.raises(ValueError, match=name):
        gmpo_ext.grpo_loss_from_hidden(h, W, ids, old, adv, mask, **{name: 2.0})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_acc_mm_without_addmm_out_dtype(monkeypatch, dtype):
    """addmm's out_dtype (the fp32-out bf16 GEMM of the fused head's backward
    on CUDA) exists from torch 2.8 on; on 2.4-2.7 the CUDA bf16/fp16 backward
    failed with TypeError. Which GEMM runs is chosen by feature
    (_ADDMM_OUT_DTYPE, from the op registry) and device (_OUT_DTYPE_DEVICES):
    here CPU stands in for CUDA and torch.addmm answers out_dtype as torch
    2.7 does; the backward still runs and is right."""
    real = torch.addmm

    def addmm_2_7(*a, **k):
        if "out_dtype" in k:
            raise TypeError("addmm() got an unexpected keyword argument 'out_dtype'")
        return real(*a, **k)

    assert hd._ADDMM_OUT_DTYPE == ("dtype_out" in torch.ops.aten.addmm.overloads())
    monkeypatch.setattr(hd, "_OUT_DTYPE_DEVICES", ("cpu",))
    monkeypatch.setattr(torch, "addmm", addmm_2_7)
    h, W, b, ids, mask, *_ = make(2, 9, 16, 300, dtype, bias=True)

    def run():
        hl, Wl, bl = leaves(h, W, b)
        lp = gmpo_ext.linear_logps(hl, Wl, ids, bias=bl, mask=mask, tile_tokens=4,
                                   tile_vocab=128)
        lp.sum().backward()
        return hl, Wl, bl

    monkeypatch.setattr(hd, "_ADDMM_OUT_DTYPE", True)   # the emulation is reached
    with pytest.raises(TypeError, match="out_dtype"):
        run()
    monkeypatch.setattr(hd, "_ADDMM_OUT_DTYPE", False)  # torch 2.4-2.7: the fallback
    ours = run()
    hr, Wr, br = leaves(h.double(), W.double(), b.double())
    ref_head(hr, Wr, ids, br)[0].mul(mask).sum().backward()
    check_grads(ours, (hr, Wr, br), TOL[dtype][1])


# ----------------------------------------------------------------------------
# autocast: the head's GEMMs in the autocast dtype, as torch.nn.Linear's

@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_the_gemms_in_the_autocast_dtype(cd, hidden_dtype):
    """Under torch.autocast (fp32 master weight and bias; hidden fp32, or already in
    a low precision as an autocast backbone leaves it) linear_logps equals the call
    on copies cast to the autocast dtype, bit for bit (the same GEMMs, the same
    tiles); each gradient comes back in its own input's dtype, the fp32 weight's
    and bias's from their fp32 accumulators (not a bf16 rounding of them), within
    the low-precision tolerance of the fp64 reference; outside autocast mixed
    dtypes still raise."""
    B, T, H, V = 3, 9, 24, 301
    h, W, b, ids, mask, *_ = make(B, T, H, V, torch.float32, seed=4, bias=True)
    h = h.to(hidden_dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (h, W, b)]
    with torch.autocast("cpu", dtype=cd):
        lp, ent = gmpo_ext.linear_logps(leaves[0], leaves[1], ids, bias=leaves[2], mask=mask,
                                        return_entropy=True, tile_vocab=128)
    cast = [t.detach().to(cd).requires_grad_() for t in (h, W, b)]
    lp_c, ent_c = gmpo_ext.linear_logps(cast[0], cast[1], ids, bias=cast[2], mask=mask,
                                        return_entropy=True, tile_vocab=128)
    assert torch.equal(lp, lp_c) and torch.equal(ent, ent_c)
    g = torch.Generator().manual_seed(5)
    up, up_e = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    ((lp * up).sum() + (ent * up_e).sum()).backward()
    ((lp_c * up).sum() + (ent_c * up_e).sum()).backward()
    for t, c in zip(leaves, cast):
        assert t.grad.dtype == t.dtype
        if t.dtype in (torch.float32, cd):   # the same fp32 sums, the cast call's rounded to cd
            assert torch.equal(t.grad.to(cd), c.grad)
    ref = [t.detach().double().requires_grad_() for t in (h, W, b)]
    rl, re_ = ref_head(ref[0].to(cd).double(), ref[1].to(cd).double(), ids, ref[2].to(cd).double())
    m = mask.double()
    ((rl * m * up).sum() + (re_ * m * up_e).sum()).backward()
    tol = TOL[cd][1]
    for t, r in zip(leaves, ref):
        assert _rel(t.grad.double(), r.grad) <= tol, _rel(t.grad.double(), r.grad)
    with pytest.raises(TypeError, match="dtype"):
        gmpo_ext.linear_logps(h.to(cd), W, ids)


def _rel(a, b):
    scale = b.double().abs().max()
    return float((a.double() - b.double()).abs().max() / scale) if scale > 0 else \
        float(a.double().abs().max())


def test_autocast_leaves_float64_alone():
    """fp64 operands are not cast by autocast (as torch's matmul): the custom op runs."""
    h, W, b, ids, mask, *_ = make(2, 5, 8, 50, torch.float64, seed=6, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = gmpo_ext.linear_logps(h, W, ids, bias=b, mask=mask)
    rl, _ = ref_head(h, W, ids, b)
    assert lp.dtype == torch.float64
    assert float((lp - rl * mask).abs().max()) <= TOL[torch.float64][0]


def test_sharded_head_weights_are_refused_with_what_to_do():
    """A head weight a training engine has sharded is refused before any pointer
    reaches C (it read as a (0,)- or flat-shaped weight: a size mismatch or worse):
    a partitioned ZeRO-3 parameter, an FSDP1 flat shard. (The real engines: the
    ``errors`` checks of tests/_trl_engine_worker.py, DTensor included.)"""
    h, W, b, ids, mask, *_ = make(2, 5, 8, 50, torch.float32, seed=7)
    # a partitioned parameter as ZeRO-3 leaves it outside its module's forward
    z3 = torch.nn.Parameter(torch.empty(0))
    z3.ds_id, z3.ds_shape = 7, W.shape
    ds = pytest.importorskip("deepspeed.runtime.zero.partition_parameters",
                             reason="deepspeed is not installed (the test extra has it)")
    z3.ds_status = ds.ZeroParamStatus.NOT_AVAILABLE
    with pytest.raises(ValueError, match="ZeRO-3 partition.*GatheredParameters"):
        gmpo_ext.linear_logps(h, z3, ids)
    with pytest.raises(ValueError, match="ZeRO-3 partition"):
        gmpo_ext.gmpo_loss_from_hidden(h, z3, ids, torch.zeros(2, 5), torch.ones(2), mask)
    flat = torch.nn.Parameter(W.reshape(-1)[:100].clone())
    flat._fsdp_flattened = True
    with pytest.raises(ValueError, match="FSDP1 flat-parameter shard"):
        gmpo_ext.linear_logps(h, flat, ids)
