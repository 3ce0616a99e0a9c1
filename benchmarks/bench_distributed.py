#!/usr/bin/env python
"""Communication cost of gmpo_ext's distributed paths, measured with gloo on loopback.

For each world size P (processes on this machine) and shape, one call of:

  rows      gmpo_loss(group=): rows split over the P ranks (T/P tokens each);
            one all-reduce of B * 8 float64 row sums
  vocab     selective_logps(vocab_group=, return_entropy=True): logits
            (B, T, V/P); an all_gather of the shard layout (3 int64 per rank),
            an all-reduce MAX of B*T float32, then an all-reduce SUM of
            3 * B*T float64 (2 * B*T without the entropy)
  head      linear_logps(vocab_group=, return_entropy=True): the LM head's
            weight (V/P, H) sharded, hidden (N, H) on every rank; forward as
            vocab (the layout, MAX of N float32, SUM of 3 N float64), backward
            one SUM of the fp32 (tile, H) hidden gradient per token tile
  local     the same loss with group=None on the rank's tokens (no collective),
            for the compute it adds to

Columns: collectives per call, bytes each rank sends into them (the payloads;
a ring all-reduce moves about 2 (P-1)/P of that per rank), the median time of
the call forward + backward and of the collectives alone (the same
all-reduce calls on tensors of those sizes). Loopback gloo on a shared
CPU is a pessimistic stand-in for NCCL on NVLink, where these payloads (kB)
take microseconds.

    python benchmarks/bench_distributed.py                     # P = 2, 4
    python benchmarks/bench_distributed.py --world 2 --out results/x.csv
    python benchmarks/bench_distributed.py --from-csv benchmarks/results/bench_distributed_cpu.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES_ROWS = [(8, 4096), (64, 1024), (256, 512)]          # (B, T)
SHAPES_VOCAB = [(1, 1024, 32768), (4, 512, 16384)]         # (B, T, V)
SHAPES_HEAD = [(1024, 512, 32768)]                         # (N, H, V)


def _median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _merge_collectives(n, world, group):
    """The forward's collectives of a vocabulary split over n tokens, on tensors
    of their sizes: the shard layout's all_gather (3 int64 per rank), the MAX of
    n float32, the SUM of 3 n float64 (with the entropy)."""
    lay = torch.zeros(3, dtype=torch.int64)
    lays = [torch.zeros(3, dtype=torch.int64) for _ in range(world)]
    m = torch.zeros(n)
    s3 = torch.zeros(3, n, dtype=torch.float64)

    def run():
        dist.all_gather(lays, lay, group=group)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(s3, group=group)
    return run


def _worker(rank, world, port, reps, out_rows):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import gmpo_ext

    g = torch.Generator().manual_seed(0)
    group = dist.group.WORLD
    rows = []
    for B, T in SHAPES_ROWS:
        t = T // world
        lp = -torch.rand(B, t, generator=g)
        old = lp + 0.1 * torch.randn(B, t, generator=g)
        adv = torch.randn(B, generator=g)
        mask = torch.ones(B, t, dtype=torch.bool)

        def step(grp):
            x = lp.clone().requires_grad_(True)
            gmpo_ext.gmpo_loss(x, old, adv, mask, group=grp).backward()

        buf = torch.zeros(B * 8, dtype=torch.float64)
        t_call = _median_time(lambda: step(group), reps)
        t_local = _median_time(lambda: step(None), reps)
        t_coll = _median_time(lambda: dist.all_reduce(buf, group=group), reps)
        rows.append(dict(path="rows", world=world, shape=f"{B}x{T}", collectives=1,
                         bytes_per_rank=B * 8 * 8, call_ms=t_call * 1e3,
                         local_ms=t_local * 1e3, collective_ms=t_coll * 1e3))
    for B, T, V in SHAPES_VOCAB:
        v = V // world
        logits = torch.randn(B, T, v, generator=g)
        ids = torch.randint(0, V, (B, T), generator=g)

        def step_v(grp):
            x = logits.clone().requires_grad_(True)
            if grp is None:
                lp, ent = gmpo_ext.selective_logps(x, ids.clamp(max=v - 1), return_entropy=True)
            else:
                lp, ent = gmpo_ext.selective_logps(x, ids, return_entropy=True,
                                                   vocab_group=grp, vocab_start=rank * v)
            (lp.sum() + ent.sum()).backward()

        n = B * T
        coll = _merge_collectives(n, world, group)
        t_call = _median_time(lambda: step_v(group), reps)
        t_local = _median_time(lambda: step_v(None), reps)
        t_coll = _median_time(coll, reps)
        rows.append(dict(path="vocab", world=world, shape=f"{B}x{T}x{V}", collectives=3,
                         bytes_per_rank=24 + n * (4 + 3 * 8), call_ms=t_call * 1e3,
                         local_ms=t_local * 1e3, collective_ms=t_coll * 1e3))
    for N, H, V in SHAPES_HEAD:
        v = V // world
        hid = torch.randn(N, H, generator=g)
        W = torch.randn(v, H, generator=g) / H ** 0.5
        ids = torch.randint(0, V, (N,), generator=g)

        def step_h(grp):
            h, w = hid.clone().requires_grad_(True), W.clone().requires_grad_(True)
            if grp is None:
                lp, ent = gmpo_ext.linear_logps(h, w, ids.clamp(max=v - 1),
                                                return_entropy=True)
            else:
                lp, ent = gmpo_ext.linear_logps(h, w, ids, return_entropy=True,
                                                vocab_group=grp, vocab_start=rank * v)
            (lp.sum() + ent.sum()).backward()

        from gmpo_ext.hidden import default_tiles
        tile_n = default_tiles(N, H, v, torch.float32)[0]
        pieces = [torch.zeros(min(tile_n, N - lo), H) for lo in range(0, N, tile_n)]
        merge = _merge_collectives(N, world, group)

        def coll_h():
            merge()
            for p in pieces:
                dist.all_reduce(p, group=group)

        t_call = _median_time(lambda: step_h(group), reps)
        t_local = _median_time(lambda: step_h(None), reps)
        t_coll = _median_time(coll_h, reps)
        rows.append(dict(path="head", world=world, shape=f"{N}x{H}x{V}",
                         collectives=3 + len(pieces),
                         bytes_per_rank=24 + N * (4 + 3 * 8 + 4 * H),
                         call_ms=t_call * 1e3, local_ms=t_local * 1e3,
                         collective_ms=t_coll * 1e3))
    if rank == 0:
        out_rows.extend(rows)
        with open(os.environ["GMPO_BENCH_OUT"] + f".{world}", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_table(path):
    """The markdown table of a results CSV (docs/distributed.md, through tools/gen_docs.py)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    out = ["| path | P | shape | collectives | bytes per rank | call (fwd+bwd) | same call, no "
           "collective | the collectives alone |",
           "| :--- | ---: | :--- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['path']} | {r['world']} | {r['shape']} | {r['collectives']} | "
                   f"{int(r['bytes_per_rank']):,} | {float(r['call_ms']):.2f} ms | "
                   f"{float(r['local_ms']):.2f} ms | {float(r['collective_ms']):.2f} ms |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "bench_distributed_cpu.csv"))
    ap.add_argument("--from-csv", help="print the docs' table of a results CSV and exit")
    args = ap.parse_args(argv)
    if args.from_csv:
        print(readme_table(args.from_csv))
        return 0
    os.environ["GMPO_BENCH_OUT"] = args.out
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    all_rows = []
    for world in args.world:
        mp.spawn(_worker, args=(world, _free_port(), args.reps, []), nprocs=world, join=True)
        with open(args.out + f".{world}") as f:
            all_rows.extend(csv.DictReader(f))
        os.remove(args.out + f".{world}")
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(all_rows[0]) + ["torch", "device"])
        w.writeheader()
        for r in all_rows:
            w.writerow(dict(r, torch=torch.__version__, device="cpu-gloo-loopback"))
    print(f"wrote {args.out}")
    for r in all_rows:
        print(f"{r['path']:6s} P={r['world']} {r['shape']:>16s} {r['collectives']} coll "
              f"{int(r['bytes_per_rank']):>9d} B  call {float(r['call_ms']):8.3f} ms  "
              f"local {float(r['local_ms']):8.3f} ms  coll {float(r['collective_ms']):8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
