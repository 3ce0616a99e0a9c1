"""GMPO across processes: 2 and 4 ranks with gloo on loopback.

Each test spawns its ranks once (torch.multiprocessing.spawn) and runs several
scenarios in them (tests/_dist_worker.py): every rank compares its loss,
metrics and gradients with the single-process result on the whole batch,
within 1e-6 relative in fp32 (2e-6 for entropies, a difference of two fp32
log-sum-exps):

  seq    rows split over ranks (group=): contiguous and arbitrary token
         splits; trl and verl conventions, KL, row and token importance
         weights, token advantages, fp32 and fp64; GRPO loss types
  vocab  vocabulary-sharded logits (vocab_group=, vocab_start=):
         selective_logps (logp, entropy and their gradient) and
         gmpo_loss_from_logits with its metrics
  head   the LM head's vocabulary sharded (vocab_group= on linear_logps,
         gmpo_loss_from_hidden and grpo_loss_from_hidden): logp, entropy,
         loss, metrics; hidden, weight and bias gradients; fp32 and fp64;
         unequal shards
  head_agree  ranks that disagree on the fused head's collectives (mask,
         ids, token tile, H, dtype, entropy, requires_grad) all raise the
         same ValueError; unequal shards get vocab_size from the layout gather
  both   4 ranks, 2 sequence x 2 vocabulary shards, of the logits and of the
         head
  dp     data parallel, unequal micro-batches over ranks and accumulation
         steps, num_rows: summed losses and gradients equal the whole batch's

What these cannot test here: NCCL and the CUDA kernels on a GPU (the same
Python runs there; the kernels' row-sums / finish and shard paths run under
the SIMT emulation with the "simt" backend below, but the collectives then
are gloo's on CPU tensors).

Checks of the arguments (which need no second process) run in this process
with a one-rank gloo group.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

import gmpo_ext

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _dist_worker  # noqa: E402

pytestmark = pytest.mark.usefixtures("backend")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, backend, scenarios):
    mp.spawn(_dist_worker.run, args=(world, _free_port(), backend, scenarios), nprocs=world,
             join=True)


def test_two_ranks(backend):
    """Rows split, vocabulary split (logits and head) and data parallel over 2 ranks."""
    _spawn(2, backend, ["seq", "vocab", "head", "head_agree", "dp"])


def test_four_ranks(backend):
    """2 sequence x 2 vocabulary ranks at once (rows and vocabulary split);
    data parallel over 4 with unequal micro-batches."""
    if backend != "c":
        pytest.skip("the 4-rank scenarios run on the C core only (CI time); the SIMT "
                    "emulation runs the 2-rank ones")
    _spawn(4, backend, ["both", "dp"])


def _run_example(backend, name, args):
    """Runs examples/<name> in a subprocess (it raises when its split run differs
    from one process); returns its stdout."""
    if backend != "c":
        pytest.skip("the example runs the C core; the SIMT emulation runs its paths in "
                    "test_two_ranks")
    import subprocess
    script = os.path.join(HERE, os.pardir, "examples", name)
    r = subprocess.run([sys.executable, script] + args, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("head", ["logits", "fused"])
def test_example_verl_megatron_tp(backend, head):
    """examples/verl_megatron_tp.py (2 data x 2 tensor-parallel ranks) runs and
    its gradients match one process."""
    out = _run_example(backend, "verl_megatron_tp.py",
                       ["--fused-head"] if head == "fused" else [])
    assert out.count("largest gradient differences") == 4


@pytest.mark.parametrize("grads", ["average", "sum"])
def test_example_trl_context_parallel(backend, grads):
    """examples/trl_context_parallel.py (2 context-parallel ranks) runs and its
    loss and gradients match one process."""
    out = _run_example(backend, "trl_context_parallel.py",
                       ["--sum-grads"] if grads == "sum" else [])
    assert "largest gradient difference" in out


# ----------------------------------------------------------------------------
# one process: argument checks and the single-process equivalences

# one_rank: the one-process gloo group (conftest.py)


def _inputs(B=3, T=8):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, T, generator=g)
    return lp, lp + 0.1 * torch.randn(B, T, generator=g), torch.randn(B, generator=g), \
        torch.ones(B, T, dtype=torch.bool)


def test_one_rank_group_equals_no_group(one_rank):
    """A group of one rank gives the single-process loss, metrics and gradient."""
    lp, old, adv, mask = _inputs()
    for conv in ("trl", "verl"):
        a = lp.clone().requires_grad_(True)
        b = lp.clone().requires_grad_(True)
        la, ma = gmpo_ext.gmpo_loss(a, old, adv, mask, convention=conv, return_metrics=True)
        lb, mb = gmpo_ext.gmpo_loss(b, old, adv, mask, convention=conv, group=one_rank,
                                    return_metrics=True)
        la.backward()
        lb.backward()
        torch.testing.assert_close(lb, la, rtol=1e-6, atol=0)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-12)
        for k in ma:
            torch.testing.assert_close(mb[k], ma[k], rtol=1e-6, atol=1e-12)


def test_num_rows_is_a_sum_over_the_whole_batch():
    """num_rows: sum of row losses / num_rows, whatever the rows at hand."""
    lp, old, adv, mask = _inputs(B=5)
    full = gmpo_ext.gmpo_loss(lp, old, adv, mask)
    parts = gmpo_ext.gmpo_loss(lp[:2], old[:2], adv[:2], mask[:2], num_rows=5) + \
        gmpo_ext.gmpo_loss(lp[2:], old[2:], adv[2:], mask[2:], num_rows=5)
    torch.testing.assert_close(parts, full, rtol=1e-6, atol=0)
    # without num_rows the means of unequal parts do not add up to it
    means = gmpo_ext.gmpo_loss(lp[:2], old[:2], adv[:2], mask[:2]) * 2 / 5 + \
        gmpo_ext.gmpo_loss(lp[2:], old[2:], adv[2:], mask[2:]) * 3 / 5
    torch.testing.assert_close(means, full, rtol=1e-6, atol=0)
    assert not torch.allclose((gmpo_ext.gmpo_loss(lp[:2], old[:2], adv[:2], mask[:2])
                               + gmpo_ext.gmpo_loss(lp[2:], old[2:], adv[2:], mask[2:])) / 2,
                              full, rtol=1e-4)


def test_grpo_num_rows_is_a_sum_over_the_whole_batch():
    """grpo_loss's num_rows ("grpo", "dr_grpo"): micro-batches of unequal sizes,
    each padded to its own width, add up to the whole batch's loss and
    gradient; token-normalised loss types refuse it, naming the alternative,
    and dr_grpo asks for max_completion_length (its default is the width)."""
    lp, old, adv, mask = _inputs(B=7, T=9)
    mask[2] = False
    mask[:2, 6:] = False                         # rows 0 and 1: 6 tokens
    cuts = ((slice(0, 2), 6), (slice(2, 5), 9), (slice(5, 7), 9))   # (rows, own width)
    for lt in ("grpo", "dr_grpo"):
        kw = dict(loss_type=lt, beta=0.1, max_completion_length=9)
        x = lp.clone().requires_grad_(True)
        full = gmpo_ext.grpo_loss(x, old, adv, mask, ref_logps=old, **kw)
        (g_full,) = torch.autograd.grad(full, x)
        total, grads = 0.0, []
        for sl, w in cuts:
            y = lp[sl, :w].clone().requires_grad_(True)
            part = gmpo_ext.grpo_loss(y, old[sl, :w], adv[sl], mask[sl, :w],
                                      ref_logps=old[sl, :w], num_rows=7, **kw)
            g = torch.zeros(y.shape[0], 9, dtype=y.dtype)
            g[:, :w] = torch.autograd.grad(part, y)[0]
            grads.append(g)
            total = total + part.detach()
        torch.testing.assert_close(total, full.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.cat(grads), g_full, rtol=1e-6, atol=1e-9)
        mod = gmpo_ext.GRPOLoss(loss_type=lt, max_completion_length=9)
        torch.testing.assert_close(mod(lp[:3], old[:3], adv[:3], mask[:3], num_rows=7),
                                   gmpo_ext.grpo_loss(lp[:3], old[:3], adv[:3], mask[:3],
                                                      loss_type=lt, max_completion_length=9)
                                   * 3 / 7, rtol=1e-6, atol=0)
    for lt in ("bnpo", "dapo"):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            gmpo_ext.grpo_loss(lp, old, adv, mask, loss_type=lt, num_rows=7)
    with pytest.raises(ValueError, match="max_completion_length"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, loss_type="dr_grpo", num_rows=7)
    with pytest.raises(ValueError, match="num_rows"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, loss_type="grpo", num_rows=3)


def test_head_shard_of_one_rank_equals_whole_head(one_rank):
    """vocab_group of one rank on the fused head: the same logp, entropy,
    loss and gradients as without it (the merge of one state is exact up to
    one rounding)."""
    g = torch.Generator().manual_seed(2)
    B, T, H, V = 3, 11, 8, 29
    hid = torch.randn(B, T, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.4
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    old = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, generator=g)
    outs = []
    for kw in ({}, dict(vocab_group=one_rank)):
        h, w = hid.clone().requires_grad_(True), W.clone().requires_grad_(True)
        lp, ent = gmpo_ext.linear_logps(h, w, ids, mask=mask, return_entropy=True, **kw)
        loss = gmpo_ext.gmpo_loss_from_hidden(h, w, ids, old, adv, mask, **kw)
        outs.append((lp, ent, loss) + torch.autograd.grad(loss + (ent * 0.1).sum(), (h, w)))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-6)


def test_head_shard_bad_arguments(one_rank, backend):
    g = torch.Generator().manual_seed(3)
    hid = torch.randn(2, 5, 4, generator=g)
    W = torch.randn(6, 4, generator=g)
    ids = torch.randint(0, 6, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="vocab_group"):
        gmpo_ext.linear_logps(hid, W, ids, vocab_group="world")
    with pytest.raises(ValueError, match="vocab_start"):
        gmpo_ext.linear_logps(hid, W, ids, vocab_group=one_rank, vocab_start=1)
    with pytest.raises(ValueError, match="vocab_start"):
        gmpo_ext.linear_logps(hid, W, ids, vocab_group=one_rank, vocab_start=3, vocab_size=8)
    with pytest.raises(TypeError, match="vocab_size"):
        gmpo_ext.linear_logps(hid, W, ids, vocab_group=one_rank, vocab_size=6.0)
    # an id outside the vocabulary: IndexError naming it (C core), NaN (the
    # CUDA kernels, here emulated: no host sync)
    if backend == "c":
        with pytest.raises(IndexError, match="completion_ids"):
            gmpo_ext.gmpo_loss_from_hidden(hid, W, ids + 6, -torch.rand(2, 5), torch.randn(2),
                                           mask, vocab_group=one_rank)
    else:
        bad = ids.clone()
        bad[0, 0] = 6
        lp = gmpo_ext.linear_logps(hid, W, bad, vocab_group=one_rank)
        assert torch.isnan(lp[0, 0]) and torch.isfinite(lp.view(-1)[1:]).all()
    with pytest.raises(ValueError, match="vocab_group"):
        gmpo_ext.gmpo_loss_from_hidden(hid, W, ids, -torch.rand(2, 5), torch.randn(2), mask,
                                       vocab_group=one_rank, mode="rows")
    with pytest.raises(ValueError, match="meta"):
        gmpo_ext.linear_logps(hid.to("meta"), W.to("meta"), ids.to("meta"),
                              vocab_group=one_rank)
    with pytest.raises(ValueError, match="tile the vocabulary"):   # id 6 in no shard
        gmpo_ext.linear_logps(hid, W, ids, vocab_group=one_rank, vocab_size=7)
    h = hid.clone().requires_grad_(True)
    lp = gmpo_ext.linear_logps(h, W, ids, vocab_group=one_rank)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lp.sum(), h, create_graph=True)


def test_bad_arguments(one_rank):
    lp, old, adv, mask = _inputs()
    with pytest.raises(TypeError, match="group"):
        gmpo_ext.gmpo_loss(lp, old, adv, mask, group="world")
    with pytest.raises(TypeError, match="num_rows"):
        gmpo_ext.gmpo_loss(lp, old, adv, mask, num_rows=2.5)
    with pytest.raises(ValueError, match="num_rows"):
        gmpo_ext.gmpo_loss(lp, old, adv, mask, num_rows=2)   # fewer than B = 3
    logits = torch.randn(3, 9, 16)
    ids = torch.randint(0, 16, (3, 8))
    with pytest.raises(TypeError, match="vocab_group"):
        gmpo_ext.selective_logps(logits, ids, vocab_group=object())
    with pytest.raises(ValueError, match="vocab_start"):
        gmpo_ext.selective_logps(logits, ids, vocab_group=one_rank, vocab_start=4)
    with pytest.raises(TypeError, match="vocab_start"):
        gmpo_ext.selective_logps(logits, ids, vocab_group=one_rank, vocab_start=1.0)
    with pytest.raises(TypeError, match="grpo|group"):
        gmpo_ext.grpo_loss(lp, old, adv, mask, group=1)


def test_dr_grpo_group_needs_max_completion_length(one_rank):
    """dr_grpo divides by B * max_completion_length, by default the padded
    width T: with group= each rank holds its own part of every row, so the
    default would be each rank's local width (a wrong loss on every rank)."""
    lp, old, adv, mask = _inputs()
    for level in ("token", "sequence"):   # the GRPO kernels and the family's
        with pytest.raises(ValueError, match="max_completion_length"):
            gmpo_ext.grpo_loss(lp, old, adv, mask, loss_type="dr_grpo", group=one_rank,
                               importance_sampling_level=level)
        got = gmpo_ext.grpo_loss(lp, old, adv, mask, loss_type="dr_grpo", group=one_rank,
                                 importance_sampling_level=level, max_completion_length=8)
        want = gmpo_ext.grpo_loss(lp, old, adv, mask, loss_type="dr_grpo",
                                  importance_sampling_level=level)
        torch.testing.assert_close(got, want)


def test_shard_of_one_rank_equals_whole_vocabulary(one_rank):
    """vocab_group of one rank (the whole vocabulary as one shard): the same
    logp, entropy and gradient as the plain path."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 40, generator=g) * 3
    ids = torch.randint(0, 40, (3, 8), generator=g)
    mask = torch.rand(3, 8, generator=g) < 0.7
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    lpa, ea = gmpo_ext.selective_logps(a, ids, 0.9, return_entropy=True, mask=mask)
    lpb, eb = gmpo_ext.selective_logps(b, ids, 0.9, return_entropy=True, mask=mask,
                                       vocab_group=one_rank)
    w = torch.randn(3, 8, generator=g)
    ((lpa + ea) * w).sum().backward()
    ((lpb + eb) * w).sum().backward()
    torch.testing.assert_close(lpb, lpa, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eb, ea, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


def test_verl_plugin_reads_global_batch_info():
    """gmpo_fused with verl's config.global_batch_info: micro-batches of any
    sizes sum to the whole mini-batch's loss and gradient (dp_size cancels the
    ranks' gradient averaging); without it, geo_mean's per-micro-batch mean."""
    from gmpo_ext.verl import compute_policy_loss_gmpo_fused as fused

    g = torch.Generator().manual_seed(3)
    B, T = 7, 12
    lp = -torch.rand(B, T, generator=g)
    old = lp + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    mask = torch.rand(B, T, generator=g) < 0.8

    def run(rows, info):
        cfg = {"clip_ratio": 0.4, "clip_ratio_low": 0.4, "clip_ratio_high": 0.4,
               "global_batch_info": info}
        x = lp[rows].clone().requires_grad_(True)
        loss, _ = fused(old[rows], x, adv[rows], mask[rows], config=cfg)
        loss.backward()
        return loss.detach(), x.grad

    whole, g_whole = run(slice(None), {})
    cuts = [slice(0, 1), slice(1, 5), slice(5, 7)]
    info = {"dp_size": 1, "global_batch_size": B, "batch_num_tokens": None,
            "loss_scale_factor": None}
    parts = [run(c, info) for c in cuts]
    torch.testing.assert_close(sum(p[0] for p in parts), whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), g_whole, rtol=1e-6, atol=1e-9)
    # dp_size 2: each rank's loss is doubled (FSDP then averages over the 2 ranks)
    two = run(slice(0, 3), dict(info, dp_size=2))
    one = run(slice(0, 3), info)
    torch.testing.assert_close(two[0], 2 * one[0], rtol=1e-6, atol=0)
    # no global batch size: the mean over the micro-batch's rows (geo_mean's),
    # and a warning once micro-batches of two sizes have been seen
    import gmpo_ext.verl as gv
    gv._seen_sizes.clear()
    local, _ = run(slice(1, 5), {"global_batch_size": None})
    torch.testing.assert_close(local, parts[1][0] * B / 4, rtol=1e-6, atol=1e-7)
    with pytest.warns(UserWarning, match="global_batch_size"):
        run(slice(0, 2), {"global_batch_size": None})
    with pytest.raises(TypeError, match="global_batch_size"):
        run(slice(0, 2), {"global_batch_size": 2.5})


def test_module_forwards_group_and_num_rows(one_rank):
    lp, old, adv, mask = _inputs(B=4)
    mod = gmpo_ext.GMPOLoss(convention="verl", group=one_rank)
    full = gmpo_ext.gmpo_loss(lp, old, adv, mask, convention="verl")
    half = mod(lp[:1], old[:1], adv[:1], mask[:1], num_rows=4) + \
        mod(lp[1:], old[1:], adv[1:], mask[1:], num_rows=4)
    torch.testing.assert_close(half, full, rtol=1e-6, atol=1e-8)
    with pytest.raises(TypeError, match="group"):
        gmpo_ext.GMPOLoss(group=3)
