"""Threads, on the CPU (the C core):

- the same bits with 1 and 2 OpenMP threads (the C core takes its thread count
  from torch.get_num_threads()) for the loss, through its fast kernel (per-row
  advantages, no KL) and its generic one (KL, per-token advantages), the GRPO
  loss, and the logits path (forward log-probs and entropy, backward), at shapes
  past the thresholds at which the C core splits the work (csrc/cpu/gmpo_cpu.c:
  B >= 2 and B*T >= 32768 tokens; csrc/cpu/logits_cpu.c: 2 token rows);
- 8 Python threads calling the ops at once on distinct inputs get the bits of
  serial calls; importing gmpo_ext does not turn the GIL back on in a
  free-threaded interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import gmpo_ext
from gmpo_ext import _backend

PARALLEL_MIN_TOKENS = 32768   # GMPO_PARALLEL_MIN_TOKENS of csrc/cpu/gmpo_cpu.c


def _with_threads(n, fn):
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        assert torch.get_num_threads() == n
        return fn()
    finally:
        torch.set_num_threads(prev)


def _same(a, b, what):
    assert type(a) is type(b), what
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _same(a[k], b[k], f"{what}[{k}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{what}[{i}]")
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _loss_inputs(B, T, dtype, seed, per_token_adv=False, ref=False):
    g = torch.Generator().manual_seed(seed)
    lp = (-2.0 + torch.randn(B, T, generator=g)).to(dtype)
    old = (lp.float() + 0.3 * torch.randn(B, T, generator=g)).to(dtype)
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    refl = (lp.float() + 0.1 * torch.randn(B, T, generator=g)).to(dtype) if ref else None
    return lp, old, adv, mask, refl


def _loss_step(fn, lp, old, adv, mask, refl, **kw):
    x = lp.detach().clone().requires_grad_(True)
    if refl is not None:
        kw.update(ref_logps=refl)
    loss, metrics = fn(x, old, adv, mask, return_metrics=True, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), metrics, grad


def _uses_fast_kernel(lp, old, adv, mask, refl, convention, beta):
    return _backend.uses_fast_kernel(_backend.ALGO_GMPO, lp, old, adv, mask, refl, None,
                                     _backend.CONVENTIONS[convention], 0, 0.4, 0.4, beta, 0.0,
                                     1.0, 0.0)


# (name, per-token advantages, KL, convention, fast kernel expected)
LOSS_CASES = [("fast", False, False, "trl", True),
              ("generic_kl", False, True, "trl", False),
              ("generic_token_adv", True, False, "verl", False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, tok, kl, convention, fast", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_loss_same_bits_with_1_and_2_threads(name, tok, kl, convention, fast, dtype):
    B, T = 6, 8191   # 49146 tokens: past the C core's threshold; odd T and B/2 rows a thread
    assert B * T >= PARALLEL_MIN_TOKENS
    lp, old, adv, mask, refl = _loss_inputs(B, T, dtype, seed=7, per_token_adv=tok, ref=kl)
    beta = 0.05 if kl else 0.0
    # the case takes the kernel it is named after (fp32; bf16 takes the generic one)
    if dtype == torch.float32:
        assert _uses_fast_kernel(lp, old, adv, mask, refl, convention, beta) == fast
    run = lambda: _loss_step(gmpo_ext.gmpo_loss, lp, old, adv, mask, refl,  # noqa: E731
                             beta=beta, convention=convention)
    one = _with_threads(1, run)
    two = _with_threads(2, run)
    _same(one, two, f"gmpo {name}: 1 vs 2 threads")
    assert one[2].abs().sum() > 0   # a gradient that is not all zeros


def test_grpo_loss_same_bits_with_1_and_2_threads():
    lp, old, adv, mask, refl = _loss_inputs(4, 8200, torch.float32, seed=8, ref=True)
    run = lambda: _loss_step(gmpo_ext.grpo_loss, lp, old, adv, mask, refl, beta=0.02,  # noqa: E731
                             loss_type="bnpo")
    _same(_with_threads(1, run), _with_threads(2, run), "grpo: 1 vs 2 threads")


def _logits_inputs(B, T, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(B, T + 1, V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    old = -5.0 + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor([T, T - 5])[:B, None]
    return logits, ids, old, adv, mask


def _logits_step(logits, ids, old, adv, mask):
    z = logits.detach().clone().requires_grad_(True)
    logp, ent = gmpo_ext.selective_logps(z[:, :-1], ids, 0.7, True)
    (g_ent,) = torch.autograd.grad(ent.sum(), z)
    z2 = logits.detach().clone().requires_grad_(True)
    loss = gmpo_ext.gmpo_loss_from_logits(z2, ids, old, adv, mask, temperature=0.7)
    (grad,) = torch.autograd.grad(loss, z2)
    return logp.detach(), ent.detach(), g_ent, loss.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_same_bits_with_1_and_2_threads(dtype):
    inputs = _logits_inputs(2, 63, 3001, dtype, seed=9)   # 126 token rows over 2 threads
    run = lambda: _logits_step(*inputs)  # noqa: E731
    one = _with_threads(1, run)
    two = _with_threads(2, run)
    _same(one, two, "logits: 1 vs 2 threads")
    assert one[4].abs().sum() > 0


# ----------------------------------------------------------------------------
# Python threads

N_THREADS = 8


def _job(k):
    """Thread k's work: the loss (forward + backward, its kernel alternating
    between fast and generic) and the loss from logits, on inputs of its own."""
    lp, old, adv, mask, refl = _loss_inputs(3, 257 + 16 * k, torch.float32, seed=100 + k,
                                            ref=k % 2 == 1)
    loss = _loss_step(gmpo_ext.gmpo_loss, lp, old, adv, mask, refl, beta=0.05 if k % 2 else 0.0)
    logits, ids, old2, adv2, mask2 = _logits_inputs(2, 17 + k, 513 + 64 * k, torch.float32,
                                                    seed=200 + k)
    z = logits.clone().requires_grad_(True)
    l2 = gmpo_ext.gmpo_loss_from_logits(z, ids, old2, adv2, mask2, temperature=0.9)
    (g2,) = torch.autograd.grad(l2, z)
    return loss, (l2.detach(), g2)


def test_concurrent_python_threads_get_the_serial_bits():
    serial = [_job(k) for k in range(N_THREADS)]
    results = [[None] * 3 for _ in range(N_THREADS)]
    errors = []
    start = threading.Barrier(N_THREADS)

    def worker(k):
        try:
            start.wait(timeout=60)
            for r in range(3):   # several rounds, so that calls overlap
                results[k][r] = _job(k)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((k, repr(e)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors
    for k in range(N_THREADS):
        for r in range(3):
            _same(results[k][r], serial[k], f"thread {k} round {r}")


def test_importing_gmpo_ext_keeps_the_gil_as_it_was():
    if not hasattr(sys, "_is_gil_enabled"):
        pytest.skip(f"Python {sys.version.split()[0]} has no sys._is_gil_enabled (3.13+)")
    code = ("import sys, torch; before = sys._is_gil_enabled(); import gmpo_ext; "
            "print(before, sys._is_gil_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    before, after = out[-2], out[-1]
    # a free-threaded interpreter (GIL off after torch) must keep it off after gmpo_ext
    assert after == before, f"the GIL was {before} before importing gmpo_ext and {after} after"
