#!/usr/bin/env python
"""GMPO as verl runs it on Megatron: a vocabulary-parallel LM head (tensor
parallelism) and data parallelism with unequal micro-batches.

Runs on CPU with gloo, 4 processes = 2 data-parallel x 2 tensor-parallel ranks:

    python examples/verl_megatron_tp.py              # logits (B, T, V/2) per rank
    python examples/verl_megatron_tp.py --fused-head # the head fused: no logits held

Tensor parallelism. Megatron's ColumnParallelLinear LM head gives each tensor-
parallel rank the logits of its slice of the vocabulary, (B, T, V/2).
``gmpo_ext.selective_logps(..., vocab_group=tp_group, vocab_start=...)`` merges
the slices' softmax statistics over the group (an all-reduce MAX of B*T
floats and an all-reduce SUM of 2-3 B*T doubles) and returns every token's
log-prob on every tensor-parallel rank; its backward writes the exact
gradient of the rank's own slice of the logits, with no communication. (In
verl's Megatron actor, verl computes these log-probs itself with Megatron's
vocab-parallel cross-entropy; this is the fused equivalent.) The hidden
states' gradient is summed over the tensor-parallel ranks, as Megatron's
ColumnParallelLinear backward does.

With ``--fused-head`` the head is fused into the log-probs:
``gmpo_ext.linear_logps(hidden, weight_shard, ids, vocab_group=tp_group,
vocab_start=...)`` folds the shard's (tokens x vocabulary) tiles into the
same mergeable state, never holding the (B, T, V/2) logits, and sums the
hidden states' gradient over the tensor-parallel ranks itself (one
all-reduce per token tile in backward), so the caller does not.

Data parallelism. verl cuts each data-parallel rank's share of a mini-batch
into micro-batches (``use_dynamic_bsz``: of unequal sizes). verl's own
``geo_mean`` averages over each micro-batch's rows, so the accumulated
gradient depends on the cut. The plugin's ``gmpo_fused`` reads
``config.global_batch_info`` (``dp_size``, ``global_batch_size``: filled by the
actor's ``ppo_loss`` in verl's new engine) and divides the summed row losses
by the global row count, times dp_size to cancel the data-parallel averaging
of the gradients: the accumulated, averaged gradient is exactly the whole
mini-batch's. The script checks that against one process on the whole
mini-batch and prints the largest differences.

In a verl run: ``actor_rollout_ref.actor.policy_loss.loss_mode=gmpo_fused``
(examples/verl_gmpo.yaml) with the Megatron backend; nothing else to set.
With Ulysses sequence parallelism verl gathers the log-probs of whole rows
before the policy loss, so the plugin sees whole rows; gmpo_ext's ``group=``
(examples/trl_context_parallel.py) is for loops that keep rows split.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gmpo_ext
from gmpo_ext.verl import compute_policy_loss_gmpo_fused

GB, T, V, H = 10, 24, 96, 12       # mini-batch rows, tokens, vocabulary, hidden
DP, TP = 2, 2
# each data-parallel rank's rows, cut into micro-batches of unequal sizes
MICRO = {0: [[0, 1, 2], [3]], 1: [[4], [5, 6], [7, 8, 9]]}
CONFIG = dict(clip_ratio=0.4, clip_ratio_low=0.4, clip_ratio_high=0.4)


def make_batch():
    g = torch.Generator().manual_seed(0)
    prev = torch.randint(0, V, (GB, T), generator=g)
    ids = torch.randint(0, V, (GB, T), generator=g)
    mask = torch.rand(GB, T, generator=g) < 0.85
    mask[4, T // 2:] = False
    adv = torch.randn(GB, 1, generator=g).expand(GB, T).contiguous()   # verl: (B, T)
    old = -torch.rand(GB, T, generator=g) * 0.2 - 4.4
    return prev, ids, mask, adv, old


def weights():
    torch.manual_seed(0)
    return torch.nn.Embedding(V, H), torch.nn.Linear(H, V, bias=False)


def worker(rank, port, fused_head):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=DP * TP)
    dp_rank, tp_rank = rank // TP, rank % TP
    tp_groups = [dist.new_group([d * TP + t for t in range(TP)]) for d in range(DP)]
    dp_groups = [dist.new_group([d * TP + t for d in range(DP)]) for t in range(TP)]
    tp_group, dp_group = tp_groups[dp_rank], dp_groups[tp_rank]

    prev, ids, mask, adv, old = make_batch()
    embed, head = weights()
    lo, hi = V * tp_rank // TP, V * (tp_rank + 1) // TP
    head_shard = torch.nn.Parameter(head.weight.detach()[lo:hi].clone())   # ColumnParallel
    info = {"dp_size": DP, "global_batch_size": GB, "batch_num_tokens": None,
            "loss_scale_factor": None}
    for rows in MICRO[dp_rank]:
        r = torch.tensor(rows)
        h = torch.tanh(embed(prev[r]))
        if fused_head:                                                 # no logits held
            logp = gmpo_ext.linear_logps(h, head_shard, ids[r], mask=mask[r],
                                         vocab_group=tp_group, vocab_start=lo)
        else:
            logits = h @ head_shard.t()                                # (b, T, V/TP)
            logp = gmpo_ext.selective_logps(logits, ids[r], mask=mask[r],
                                            vocab_group=tp_group, vocab_start=lo)
        loss, metrics = compute_policy_loss_gmpo_fused(
            old[r], logp, adv[r], mask[r], config=dict(CONFIG, global_batch_info=info))
        loss.backward()                                                # accumulates
    # the hidden states' gradient sums over the tensor-parallel ranks (the
    # fused head has summed it in its backward)
    if not fused_head:
        dist.all_reduce(embed.weight.grad, group=tp_group)
    # data parallelism averages (DDP / FSDP / Megatron's DDP)
    # (a sum, then / DP: torch 2.4's gloo has no ReduceOp.AVG)
    for p in (embed.weight, head_shard):
        dist.all_reduce(p.grad, group=dp_group)
        p.grad /= DP

    # one process, whole mini-batch, whole head
    ref_embed, ref_head = weights()
    logp = gmpo_ext.selective_logps(ref_head(torch.tanh(ref_embed(prev))), ids, mask=mask)
    ref_loss, _ = compute_policy_loss_gmpo_fused(
        old, logp, adv, mask, config=dict(CONFIG, global_batch_info=dict(info, dp_size=1)))
    ref_loss.backward()
    d_embed = (embed.weight.grad - ref_embed.weight.grad).abs().max() / \
        ref_embed.weight.grad.abs().max()
    d_head = (head_shard.grad - ref_head.weight.grad[lo:hi]).abs().max() / \
        ref_head.weight.grad[lo:hi].abs().max()
    print(f"rank {rank} (dp {dp_rank}, tp {tp_rank}): largest gradient differences, relative "
          f"to the largest element: embedding {float(d_embed):.2e}, head shard "
          f"{float(d_head):.2e}")
    if max(d_embed, d_head) > 1e-5:
        raise AssertionError(f"rank {rank}: the split run's gradients differ from one "
                             "process's by more than 1e-5")
    dist.destroy_process_group()


def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, "--fused-head" in sys.argv[1:]), nprocs=DP * TP, join=True)


if __name__ == "__main__":
    main()
