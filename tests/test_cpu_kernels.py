"""The CPU kernels' two paths and the fused forward + backward.

The C core has a kernel for the common case (GMPO, one advantage per row, no
KL, no per-token weights, contiguous fp32/bf16/fp16 log-probs and a bool,
uint8 or fp32 mask) beside the generic one, and an entry point that computes
the gradient for an upstream gradient of 1 in the forward's pass. Each must
give the same bits as the generic forward and backward; these tests hold them
to it on inputs full of edge cases (every advantage sign, ties on the clip
bounds, NaN in real and in masked tokens, rows that are not a multiple of the
vector width, empty rows). The same paths serve every other CPU test through
gmpo_loss, so this file only checks what those cannot see: the path taken and
bit-identity.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import gmpo_ext
from gmpo_ext import _backend

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(T, dtype, mask_kind, seed=0, B=9):
    g = torch.Generator().manual_seed(seed)
    lp = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    # a few exact ties on the bounds (+-0.4 in log space) and huge log-ratios
    if T > 3:
        old[1, 0] = lp[1, 0] - 0.4
        old[2, 1] = lp[2, 1] + 0.4
        old[3, 2] = lp[3, 2] - 50.0
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0, 1.5, -0.5, 0.0, 2.0], dtype=torch.float64)[:B]
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths[5] = 0  # an empty row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp, old = lp.to(dtype), old.to(dtype)
    if T > 2:
        lp[6, T - 1] = float("nan")   # a NaN in a real token (row 6 is full length?)
        mask[6, T - 1] = True
        old[7, 0] = float("nan")      # and one in padding
        mask[7, 0] = False
    if mask_kind == "float":
        w = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
        mask = (mask * w).to(torch.float32)
    return lp, old, adv.to(dtype), mask


def _strided(t):
    """The same values with a token stride != 1 (where T > 1)."""
    return t.t().contiguous().t() if t.dim() == 2 and t.shape[1] > 1 else t


def _generic(lp, old, adv, mask):
    """The same values in a form only the generic kernel takes: a token stride
    != 1, and the mask as int32 (bool) or float64 (weights; exact)."""
    mask = mask.to(torch.int32 if mask.dtype == torch.bool else torch.float64)
    return tuple(_strided(t) for t in (lp, old, adv, mask))


def _opts(convention, clamp):
    return (_backend.ALGO_GMPO, _backend.CONVENTIONS[convention], 0, 0.4, 0.4, 0.0,
            float(clamp or 0.0), 1.0, 0.0)


def _call(fn, algo, lp, old, adv, mask, conv, lt, el, eh, beta, clamp, norm, denom, **kw):
    return fn(algo, lp, old, adv, mask, None, None, conv, lt, el, eh, beta, clamp, norm, denom,
              **kw)


def _same(a, b, what):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("T", [1, 15, 16, 97, 4097])
@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("convention", ["trl", "verl"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_kernel_gives_the_generic_kernels_bits(dtype, convention, mask_kind, clamp, T):
    lp, old, adv, mask = _inputs(T, dtype, mask_kind)
    algo, *opts = _opts(convention, clamp)
    fast_in = (lp, old, adv, mask)
    slow_in = _generic(*fast_in)
    assert _call(_backend.uses_fast_kernel, algo, *fast_in, *opts)
    assert not _call(_backend.uses_fast_kernel, algo, *slow_in, *opts)
    fast = _call(_backend.forward, algo, *fast_in, *opts)
    slow = _call(_backend.forward, algo, *slow_in, *opts)
    for name, x, y in zip(("loss", "metrics", "rows"), fast, slow):
        _same(x, y, name)
    # the fused entry point: the fast kernel for fp32 gradients, the generic
    # kernel's per-row forward + backward otherwise; the backward's bits either way
    grad_want = _backend.backward(torch.ones(()), slow[2], algo, *slow_in, None, None, *opts)
    for inp in (fast_in, slow_in):
        out = _call(_backend.forward_backward, algo, *inp, *opts)
        for name, x, y in zip(("loss", "metrics", "rows"), out[:3], slow):
            _same(x, y, f"forward_backward {name}")
        _same(out[3], grad_want, "forward_backward grad")
    assert _call(_backend.uses_fast_kernel, algo, *fast_in, *opts,
                 grad_dtype=lp.dtype) == (dtype == torch.float32)


@pytest.mark.parametrize("level", ["1", "3"])
def test_every_instruction_set_copy_gives_the_same_bits(level):
    """The fast kernel is compiled for AVX-512, AVX2 and the x86-64 baseline;
    the test above runs the best one this machine has. GMPO_EXT_CPU_LEVEL
    selects a lower one (never above the machine's), in a fresh process."""
    env = dict(os.environ, GMPO_EXT_CPU_LEVEL=level)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "fast_kernel_gives"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


@pytest.mark.parametrize("case", ["beta", "token_adv", "token_isw", "row_isw", "int_mask",
                                  "mixed_dtypes", "grpo_dapo", "grpo_grpo", "fp64"])
@pytest.mark.parametrize("convention", ["trl", "verl"])
def test_forward_backward_equals_forward_then_backward(case, convention):
    dtype = torch.float64 if case == "fp64" else torch.float32
    lp, old, adv, mask = _inputs(97, dtype, "bool", seed=3)
    B, T = lp.shape
    g = torch.Generator().manual_seed(5)
    ref, isw = None, None
    algo, conv, lt, el, eh, beta, clamp, norm, denom = _opts(convention, None)
    if case == "beta":
        ref, beta = lp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype), 0.05
    elif case == "token_adv":
        adv = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    elif case == "token_isw":
        isw = torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype) + 0.5
    elif case == "row_isw":
        isw = torch.rand(B, generator=g, dtype=torch.float64).to(dtype) + 0.5
    elif case == "int_mask":
        mask = mask.to(torch.int32)
    elif case == "mixed_dtypes":
        old = old.to(torch.bfloat16)
    elif case.startswith("grpo"):
        algo, conv, el, eh = _backend.ALGO_GRPO, 0, 0.2, 0.2
        lt = _backend.LOSS_TYPES[case.split("_")[1]]
    args = (algo, lp, old, adv, mask, ref, isw, conv, lt, el, eh, beta, clamp, norm, denom)
    loss, metrics, rows = _backend.forward(*args)
    grad = _backend.backward(torch.ones((), dtype=loss.dtype), rows, *args)
    out = _backend.forward_backward(*args)
    for name, x, y in zip(("loss", "metrics", "rows", "grad"), out, (loss, metrics, rows, grad)):
        _same(x, y, name)


def _op_path_grad(lp, old, adv, mask, upstream, **kw):
    """The gradient through the registered custom ops (forward, then a backward
    that recomputes from the saved inputs): the reference for the eager path."""
    x = lp.detach().clone().requires_grad_()
    out = gmpo_ext.ops.loss_fwd(x, old, adv, mask, None, None, _backend.ALGO_GMPO,
                                _backend.CONVENTIONS[kw.get("convention", "trl")], 0, 0.4, 0.4,
                                0.0, 0.0, 1.0, 0.0)
    (out[0] * upstream).backward()
    return x.grad


@pytest.mark.parametrize("convention", ["trl", "verl"])
def test_eager_backward_hands_over_the_fused_gradient(convention):
    lp, old, adv, mask = _inputs(300, torch.float32, "bool", seed=7)
    x = lp.clone().requires_grad_()
    gmpo_ext.gmpo_loss(x, old, adv, mask, convention=convention).backward()
    _same(x.grad, _op_path_grad(lp, old, adv, mask, 1.0, convention=convention), "grad")


def test_eager_backward_with_another_upstream_gradient_recomputes():
    lp, old, adv, mask = _inputs(300, torch.float32, "bool", seed=8)
    x = lp.clone().requires_grad_()
    (3.0 * gmpo_ext.gmpo_loss(x, old, adv, mask)).backward()
    _same(x.grad, _op_path_grad(lp, old, adv, mask, 3.0), "grad")


def test_second_backward_recomputes_and_accumulates():
    lp, old, adv, mask = _inputs(300, torch.float32, "bool", seed=9)
    x = lp.clone().requires_grad_()
    loss = gmpo_ext.gmpo_loss(x, old, adv, mask)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    _same(first, _op_path_grad(lp, old, adv, mask, 1.0), "first backward")
    _same(x.grad, 2 * first, "accumulated")
    # and a fresh step accumulates into the same .grad, leaving the first intact
    gmpo_ext.gmpo_loss(x, old, adv, mask).backward()
    _same(x.grad, 3 * first, "third step")


def test_autograd_grad_and_non_leaf_logps():
    lp, old, adv, mask = _inputs(300, torch.float32, "bool", seed=10)
    lp = torch.nan_to_num(lp, nan=-1.0)   # finite, so that d/dw is
    w = torch.tensor(2.0, requires_grad=True)
    x = lp.clone().requires_grad_()
    y = x * w   # a non-leaf: the gradient flows on through the multiplication
    (gx, gw) = torch.autograd.grad(gmpo_ext.gmpo_loss(y, old, adv, mask), (x, w))
    gy = _op_path_grad(2 * lp, old, adv, mask, 1.0)
    _same(gx, 2 * gy, "d/dx")
    torch.testing.assert_close(gw, (gy * lp).sum(), rtol=1e-5, atol=1e-6)


def test_forward_computes_the_gradient_only_when_it_will_be_needed(monkeypatch):
    calls = {"forward_backward": 0, "backward": 0}
    for name in calls:
        real = getattr(_backend, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(_backend, name, counted)
    lp, old, adv, mask = _inputs(50, torch.float32, "bool", seed=11)
    x = lp.clone().requires_grad_()
    with torch.no_grad():
        gmpo_ext.gmpo_loss(x, old, adv, mask)
    gmpo_ext.gmpo_loss(lp, old, adv, mask)           # nothing requires grad
    with torch.inference_mode():
        gmpo_ext.gmpo_loss(x, old, adv, mask)
    assert calls == {"forward_backward": 0, "backward": 0}
    gmpo_ext.gmpo_loss(x, old, adv, mask).backward()  # one pass, nothing recomputed
    assert calls == {"forward_backward": 1, "backward": 0}
