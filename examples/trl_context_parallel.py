#!/usr/bin/env python
"""GMPO with context parallelism: every rank holds a slice of every sequence.

Runs on CPU with gloo (2 processes by default):

    python examples/trl_context_parallel.py            # 2 context-parallel ranks
    python examples/trl_context_parallel.py --cp 4

What it shows. Under context parallelism (accelerate's ``parallelism_config``
``cp_size``, ring attention, Ulysses) each rank computes the logits of its
own slice of the completion tokens of every row. GMPO's geometric mean is
over the WHOLE row, so a per-rank loss would clip and exponentiate partial
means: a different objective. ``gmpo_loss_from_logits(..., group=cp_group)``
all-reduces the per-row sums once (B * 8 doubles, plus 3 for the metrics)
before the exp: every rank gets the whole batch's loss and metrics and the
exact gradient of its own tokens. The parameters' gradients are then the sum
over the context-parallel ranks of each rank's gradient; a framework that
AVERAGES gradients over a mesh that includes the cp ranks (FSDP over
dp x cp, as accelerate sets it up) needs the loss multiplied by cp_size,
which this script does with ``--average-grads`` (the default), as Megatron
does with ``context_parallel_size``.

The toy policy here scores each position from its own token (an embedding and
an LM head, no attention), so that slicing the sequence needs no ring
attention and the script can check the result against one process on the
whole batch: it prints the largest differences of loss and gradients.

TRL. TRL 1.16's GRPOTrainer (and the GMPO trainer built on it) refuses
``parallelism_config`` with ``cp_size > 1`` or ``sp_size > 1``: it builds the
model inputs after generation. When it allows it, the loss step of
``gmpo_ext.trl.GMPOTrainer`` becomes the call below with
``group=accelerator.torch_device_mesh["cp"].get_group()`` and the token
tensors (completion ids, old and reference log-probs, mask, importance
weights) sliced like the logits; the per-row advantages stay whole on every
rank.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gmpo_ext

B, T, V, H = 6, 48, 101, 16


class ToyPolicy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, tokens):                  # (B, n) -> (B, n, V)
        return self.head(torch.tanh(self.embed(tokens)))


def make_batch():
    g = torch.Generator().manual_seed(0)
    prev = torch.randint(0, V, (B, T), generator=g)        # the token before each position
    ids = torch.randint(0, V, (B, T), generator=g)         # the sampled completion tokens
    mask = torch.rand(B, T, generator=g) < 0.85
    mask[2, T // 3:] = False                               # a short completion
    adv = torch.randn(B, generator=g)                      # per row: whole on every rank
    with torch.no_grad():
        torch.manual_seed(0)
        lp = gmpo_ext.selective_logps(ToyPolicy()(prev), ids)
    old = lp + 0.2 * torch.randn(B, T, generator=g)
    ref = lp + 0.1 * torch.randn(B, T, generator=g)
    return prev, ids, mask, adv, old, ref


def loss_step(model, prev, ids, mask, adv, old, ref, group=None):
    logits = model(prev)
    return gmpo_ext.gmpo_loss_from_logits(
        logits, ids, old, adv, mask, beta=0.04, ref_logps=ref, return_metrics=True,
        group=group)


def worker(rank, cp, port, average):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=cp)
    cp_group = dist.group.WORLD        # with data parallelism too: dist.new_group(cp ranks)

    prev, ids, mask, adv, old, ref = make_batch()
    torch.manual_seed(0)
    model = ToyPolicy()                # same weights on every rank

    # this rank's slice of every row (contiguous; any split works, the mask says
    # which tokens count)
    lo, hi = T * rank // cp, T * (rank + 1) // cp
    cut = lambda t: t[:, lo:hi]        # noqa: E731
    loss, metrics = loss_step(model, cut(prev), cut(ids), cut(mask), adv, cut(old), cut(ref),
                              group=cp_group)
    (loss * cp if average else loss).backward()
    for p in model.parameters():       # what DDP / FSDP does over the cp ranks
        dist.all_reduce(p.grad, group=cp_group)
        if average:                    # (torch 2.4's gloo has no ReduceOp.AVG)
            p.grad /= cp

    if rank == 0:                      # the same step in one process, on whole rows
        torch.manual_seed(0)
        ref_model = ToyPolicy()
        ref_loss, ref_metrics = loss_step(ref_model, prev, ids, mask, adv, old, ref)
        ref_loss.backward()
        print(f"loss: {loss.item():.8f} (one process: {ref_loss.item():.8f})")
        for k in ("clip_ratio/region_mean", "kl", "entropy"):
            print(f"  {k}: {float(metrics[k]):.6g} (one process: {float(ref_metrics[k]):.6g})")
        worst = max(float((p.grad - q.grad).abs().max() / q.grad.abs().max())
                    for p, q in zip(model.parameters(), ref_model.parameters()))
        print(f"largest gradient difference, relative to the largest element: {worst:.2e}")
        loss_err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
        if not (worst <= 1e-5 and loss_err <= 1e-6):
            raise AssertionError("the context-parallel step differs from one process's")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cp", type=int, default=2, help="context-parallel ranks")
    ap.add_argument("--sum-grads", action="store_true",
                    help="sum the gradients over the cp ranks instead of averaging them "
                         "(then the loss is not multiplied by cp)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.cp, port, not args.sum_grads), nprocs=args.cp, join=True)


if __name__ == "__main__":
    main()
