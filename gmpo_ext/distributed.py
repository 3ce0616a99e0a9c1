"""GMPO across processes (torch.distributed): rows split over ranks, the
vocabulary split over ranks, and the batch-size-invariant normaliser.

Rows split over ranks (``group=``: context / sequence parallelism, Ulysses,
ring attention). Every rank holds the same B rows and some of each row's
tokens (any split: the mask says which tokens a rank holds). GMPO's row term
``exp(sum_t m*y / D_i)`` needs the whole row, so the forward runs in two
halves around ONE all-reduce (sum) of B * 8 float64 values:

    row_sums     (C / CUDA)  per row: sum m*y, sum m, sum m*A, sum m*log w,
                             sum m*k3, three clip/metric counts
    all_reduce   (group)     B * 8 doubles (+ a few scalars of metrics)
    finish_sums  (C / CUDA)  the geometric means, row coefficients, loss, metrics

Every rank then holds the same loss, metrics and per-row coefficients; the
backward is the ordinary one (no communication): each rank's gradient is
exact for the tokens it holds.

The vocabulary split over ranks (``vocab_group=``, ``vocab_start=``: Megatron
tensor parallelism, vocab-sharded logits (B, T, V/P)). Each rank folds its
shard of every token's logits into a mergeable state (the shard's max m_r of
x = z / tau and ls_r = log sum exp(x - m_r), the entropy H_r of the shard's
softmax, the target's x where the id falls in the shard), and two
all-reduces of O(B*T) values (float32, then float64) merge them:

    all_reduce MAX  (vocab_group)  m_r                          B*T float32
    all_reduce SUM  (vocab_group)  e_r = exp(m_r - M + ls_r),   B*T*2 float64
                                   x_id - M (0 off its shard)
                                   (+ e_r (H_r - log e_r)       + B*T with entropy)

(the merge runs in float64 so that each result carries one fp32 rounding, as
the single-process kernel's do: 20 bytes per token, 28 with the entropy).
Before them, check_vocab all-gathers each rank's (vocab_start, V, vocab_size)
and checks that the shards tile the vocabulary (24 bytes per rank, a host
read; vocab_size=None is the sum of the shards' sizes, equal or not); the
head's path adds to that gather what its collectives' sizes and participation
depend on (scored tokens, token tile, H, dtype, entropy, whether hidden
gets a gradient), so that ranks that differ all raise the same ValueError.

    S = sum_r e_r,  lse = M + log S,  logp = (x_id - M) - log S,
    H = log S + sum_r e_r (H_r - log e_r) / S

The backward needs only the global lse (and H): each rank writes the
gradient of its own shard, with the one-hot term where the id falls in it.

The LM head's vocabulary split over ranks (``vocab_group=`` on
linear_logps / gmpo_loss_from_hidden / grpo_loss_from_hidden: weight
(V/P, H) and bias (V/P,) of this rank's rows, hidden the same on every rank).
Each rank folds its rows' (tokens x vocabulary) tiles into the same state
(gmpo_ext/hidden.py) and merge_states merges it exactly as above. In
backward each rank recomputes its tiles, writes their dL/dy from the merged
lse and H, and accumulates its own dW and db; dH = sum_r dy_r W_r sums over
the ranks: one all-reduce (sum) of the fp32 (tile, H) block per token tile,
what the backward of Megatron's column-parallel head does for its input.

Gradients of parameters shared by the ranks of ``group`` (the whole model,
in context parallelism) are each rank's partial gradient: they must be SUMMED
over the group. Frameworks that AVERAGE gradients over a mesh including the
context-parallel ranks (FSDP over dp x cp) divide by the group's size:
multiply the loss by that size before backward, as Megatron does with
``context_parallel_size`` (see examples/trl_context_parallel.py).

Batch-size invariance: ``num_rows=`` (the number of rows of the whole batch
across data-parallel ranks and accumulation steps) divides the sum of the row
losses by it instead of averaging over the rows at hand, so that the
micro-batches' losses add up to the whole batch's loss and their gradients
to its gradient, however the batch is cut. (A framework that averages the
gradients over R data-parallel ranks needs ``normalizer=1/R`` as well: verl's
``dp_size``.)

Under torch.compile the distributed paths run eagerly (a graph break); the
single-process paths (group=None) keep their registered ops.
"""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist

from . import _backend

__all__ = ["check_group", "rows_normalizer", "group_loss", "shard_logits"]


# ----------------------------------------------------------------------------
# argument checks

def check_group(name, group):
    """``group`` must be a torch.distributed process group of an initialised
    default group; returns it."""
    if not dist.is_available():
        raise RuntimeError(f"{name}: torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError(f"{name}: torch.distributed is not initialised (call "
                           "torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD or one from new_group), got "
                        f"{type(group).__name__}")
    return group


def rows_normalizer(name, num_rows, B, normalizer):
    """The normaliser that makes the C core's mean over the B rows at hand a
    sum over them divided by ``num_rows`` (the whole batch's row count)."""
    if num_rows is None:
        return normalizer
    if isinstance(num_rows, bool) or not isinstance(num_rows, numbers.Integral):
        raise TypeError(f"{name} must be an int (the number of rows of the whole batch), got "
                        f"{type(num_rows).__name__}")
    if num_rows < 1:
        raise ValueError(f"{name} must be >= 1, got {num_rows}")
    if num_rows < B:
        raise ValueError(f"{name} ({num_rows}) is smaller than the rows at hand (B = {B}): it "
                         "counts the rows of the whole batch across ranks and accumulation "
                         "steps")
    # mean over B / (normalizer * num_rows / B) = sum / (num_rows * normalizer)
    return normalizer * num_rows / B if B > 0 else normalizer


# ----------------------------------------------------------------------------
# rows split over ranks

class _GroupLoss(torch.autograd.Function):
    """Forward: row sums, one all-reduce, finish; backward: the ordinary one."""

    @staticmethod
    def forward(ctx, logps, old_logps, advantages, mask, ref_logps, is_weights, opts, group,
                extra, family):
        B = logps.shape[0]
        S = _backend.SUM_STATS
        n_extra = 0 if extra is None else extra.numel()
        flat = torch.empty(B * S + n_extra, dtype=torch.float64, device=logps.device)
        sums = flat[:B * S].view(B, S)
        _backend.row_sums(opts[0], logps, old_logps, advantages, mask, ref_logps, is_weights,
                          *opts[1:], out=sums, checked=True, family=family)
        if n_extra:
            flat[B * S:] = extra.to(torch.float64)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)   # the one collective
        loss, metrics, rows = _backend.finish_sums(sums, opts[0], logps, old_logps, advantages,
                                                   mask, ref_logps, is_weights, *opts[1:],
                                                   checked=True, family=family)
        slp, tm = (family[0], family[1]) if family else (None, None)
        ctx.save_for_backward(logps, old_logps, advantages, mask, ref_logps, is_weights, rows,
                              slp, tm)
        ctx.opts = opts
        ctx.family_opts = family[2] if family else None
        reduced = flat[B * S:].clone()
        ctx.mark_non_differentiable(metrics, rows, reduced)
        return loss, metrics, rows, reduced

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics, grad_rows, grad_extra):
        if torch.is_grad_enabled():
            raise RuntimeError("gmpo_ext: the fused loss supports one backward pass; double "
                               "backward (create_graph=True, Hessians) is not implemented")
        logps, old_logps, advantages, mask, ref_logps, is_weights, rows, slp, tm = ctx.saved_tensors
        family = None if ctx.family_opts is None else (slp, tm, ctx.family_opts)
        grad = None
        if ctx.needs_input_grad[0]:
            opts = ctx.opts
            grad = _backend.backward(grad_loss, rows, opts[0], logps, old_logps, advantages,
                                     mask, ref_logps, is_weights, *opts[1:], checked=True,
                                     family=family)
        return (grad,) + (None,) * 9


@torch.compiler.disable
def group_loss(logps, old_logps, advantages, mask, ref_logps, is_weights, opts, group,
               extra=None, family=None):
    """(loss, metrics, rows, reduced_extra) of the loss whose rows are split over
    ``group``; ``extra``: a 1-D tensor of further sums (metrics) reduced in the
    same collective; ``family``: the GRPO family's (sampling_logps, token_mask,
    options), as ops.fused_loss takes it. The inputs have passed
    _backend.check_loss_inputs."""
    if logps.device.type == "meta":
        raise ValueError("logps: group= needs real tensors (meta tensors cannot be all-reduced)")
    return _GroupLoss.apply(logps, old_logps, advantages, mask, ref_logps, is_weights,
                            tuple(opts), group, extra, family)


# ----------------------------------------------------------------------------
# the vocabulary split over ranks

def merge_states(m_r, ls_r, ent_r, x, here, group, entropy, out_dtype=torch.float32):
    """Per-token states of the shards' vocabulary ranges -> the whole
    vocabulary's (logp, entropy, lse), each in ``out_dtype``; the one merge of
    the logits shards and the head shards. Per token: this rank's max m_r of
    x = z / tau, ls_r = log sum exp(x - m_r), the shard's entropy ent_r, the
    target's x (read only where ``here``: the id lies in this rank's shard).
    Two all-reduces over ``group``: MAX of m_r, then SUM (float64) of
    e_r = exp(m_r - M + ls_r), of the target's x - M (from the rank holding the
    id) and, with entropy, of e_r (ent_r - log e_r). Every term is a difference
    of nearby numbers or small: no precision is lost to a large log-sum-exp.
    lse = M + log S, logp = (x_id - M) - log S, H = log S + sum_r e_r (H_r - log e_r) / S."""
    M = m_r.clone()
    dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)   # exact: a max of floats
    # the merge in float64 (O(N) values): lse, logp and H then carry one
    # rounding each, as the single-process kernels' do
    Md = M.to(torch.float64)
    log_e = (m_r.to(torch.float64) - Md) + ls_r.to(torch.float64)   # <= 0
    e = torch.exp(log_e)                        # a shard of only -inf logits: 0
    zero = torch.zeros_like(e)
    parts = [e, torch.where(here, x.to(torch.float64) - Md, zero)]
    if entropy:
        parts.append(torch.where(e > 0, e * (ent_r.to(torch.float64) - log_e), zero))
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    S = stacked[0]
    log_s = torch.log(S)
    lse = (Md + log_s).to(out_dtype)
    logp = (stacked[1] - log_s).to(out_dtype)
    ent = (log_s + stacked[2] / S).to(out_dtype) if entropy else torch.zeros_like(lse)
    return logp, ent, lse


def merge_shards(logits, ids, mask, temperature, m_r, ls_r, ent_r, vocab_start, group,
                 entropy):
    """The logits shards' states -> (logp, entropy, lse), each (B, T) float32
    (merge_states), masked tokens 0."""
    T = ids.shape[1]
    V = logits.shape[2]
    # the target's logit, on the rank whose shard holds it (T tokens of the
    # (B, T or T + 1, V) logits: a gather of B*T values, no copy of the logits)
    local = ids.to(torch.int64) - vocab_start
    here = (local >= 0) & (local < V)
    if mask is not None:
        here = here & (mask != 0)
    x = logits[:, :T].gather(2, local.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    # as the kernels scale it: in fp32, by float(1 / tau) (a Python scalar takes
    # the tensor's dtype: no host-to-device copy)
    x = x.to(torch.float32) * (1.0 / temperature)
    logp, ent, lse = merge_states(m_r, ls_r, ent_r, x, here, group, entropy)
    zero = torch.zeros_like(lse)
    if mask is not None:                        # masked tokens: 0, as without shards
        keep = mask != 0
        lse, logp, ent = (torch.where(keep, lse, zero), torch.where(keep, logp, zero),
                          torch.where(keep, ent, zero))
    return logp.contiguous(), ent.contiguous(), lse.contiguous()


class _ShardLogits(torch.autograd.Function):
    """Per-token logp (and entropy) of vocabulary-sharded logits."""

    @staticmethod
    def forward(ctx, logits, ids, mask, temperature, entropy, inplace_backward, vocab_start,
                vocab_size, group, ids_name):
        from . import logits as lg
        ls_r, ent_r, m_r = lg._forward_shard(logits, ids, mask, temperature, entropy,
                                             vocab_start, vocab_size, ids_name)
        logp, ent, lse = merge_shards(logits, ids, mask, temperature, m_r, ls_r, ent_r,
                                      vocab_start, group, entropy)
        ctx.save_for_backward(logits, ids, mask, lse, ent)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        ctx.vocab = (vocab_start, vocab_size)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logp, ent, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_lse):
        from . import logits as lg
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        logits, ids, mask, lse, ent = ctx.saved_tensors
        if ctx.inplace_backward and lg._inplace_ok(logits, grad_logp, grad_entropy, ids, mask):
            grad = logits
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        lg._backward(grad, grad_logp, grad_entropy, logits, ids, mask, lse, ent,
                     ctx.temperature, vocab=ctx.vocab)
        return (grad,) + (None,) * 9


@torch.compiler.disable
def shard_logits(logits, ids, mask, temperature, entropy, inplace_backward, vocab_start,
                 vocab_size, group, ids_name="ids"):
    """(logp, entropy, lse) of logits holding the vocabulary entries
    [vocab_start, vocab_start + V) of vocab_size, merged over ``group``."""
    return _ShardLogits.apply(logits, ids, mask, temperature, entropy, inplace_backward,
                              vocab_start, vocab_size, group, ids_name)


def check_vocab(V, vocab_group, vocab_start, vocab_size, what="the logits", device=None,
                agree=()):
    """Validates a shard of V vocabulary entries (the logits' last axis, or the
    head's weight rows) across the group; returns (vocab_start, vocab_size).

    One all_gather of 3 + len(agree) integers per rank (on ``device``) and a
    host read of them, before anything is raised, so that every rank raises
    the same error: every rank must come to the same vocab_size and the
    shards must tile [0, vocab_size) exactly, each id in one rank's shard.
    vocab_size=None (on any rank) is the sum of the shards' sizes, which the
    gather knows: equal or unequal shards need no vocab_size as long as they
    tile [0, sum) exactly. Overlapping or missing ranges, or ranks that name
    different sizes, would otherwise give wrong log-probs silently, or
    collectives of mismatched sizes.

    ``agree``: (name, value) pairs, an int or a 0-d integer tensor on
    ``device``, that every rank must hold equal, checked in the same gather: what sizes the collectives that follow (the number of
    scored tokens, the token tile, H, the dtype, the entropy) or decides
    whether a rank enters them at all (the hidden gradient's all-reduce in
    backward). A rank that differs would abort gloo or hang NCCL; now every
    rank raises the same ValueError naming it.

    It runs on every call: a per-rank cache of checked layouts could let one
    rank skip the collective that another, whose layout is new, enters. Meta
    tensors (shapes only) check this rank's bounds without a collective
    (vocab_size=None: V times the group's size)."""
    check_group("vocab_group", vocab_group)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral):
        raise TypeError(f"vocab_start must be an int, got {type(vocab_start).__name__}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or
                                   not isinstance(vocab_size, numbers.Integral)):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1 or None, got {vocab_size}")
    P = dist.get_world_size(vocab_group)
    if device is not None and device.type == "meta":
        size = int(vocab_size) if vocab_size is not None else V * P
        _check_layout([(int(vocab_start), int(V), size)], what, tiling=False)
        return int(vocab_start), size
    # Python ints in one host-to-device copy, then the 0-d tensors (sums
    # computed on the device: no extra host sync before the gather)
    order = ([k for k, (_, v) in enumerate(agree) if not isinstance(v, torch.Tensor)]
             + [k for k, (_, v) in enumerate(agree) if isinstance(v, torch.Tensor)])
    n_int = sum(not isinstance(v, torch.Tensor) for _, v in agree)
    mine = torch.tensor([int(vocab_start), int(V), -1 if vocab_size is None else int(vocab_size)]
                        + [int(agree[k][1]) for k in order[:n_int]], dtype=torch.int64,
                        device=device or "cpu")
    if n_int < len(agree):
        mine = torch.cat([mine] + [agree[k][1].reshape(1).to(mine) for k in order[n_int:]])
    everyone = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(everyone, mine, group=vocab_group)
    rows = [[int(v) for v in t.tolist()] for t in everyone]
    for j, k in sorted(enumerate(order), key=lambda jk: jk[1]):
        name = agree[k][0]
        vals = [r[3 + j] for r in rows]
        if len(set(vals)) > 1:
            raise ValueError(f"{name} must be the same on every rank of vocab_group (its "
                             f"collectives depend on it), got {vals} by rank")
    total = sum(r[1] for r in rows)   # vocab_size=None: the shards' sum
    shards = [(a, n, total if size < 0 else size) for a, n, size, *_ in rows]
    _check_layout(shards, what)
    return int(vocab_start), shards[dist.get_rank(vocab_group)][2]


def _check_layout(shards, what, tiling=True):
    """shards: every rank's (vocab_start, V, vocab_size), by rank (the same list
    on every rank: the same verdict); tiling=False: this rank's alone (meta
    tensors: no collective), its bounds only."""
    sizes = sorted({s[2] for s in shards})
    if len(sizes) > 1:
        raise ValueError(f"vocab_size: the ranks of vocab_group come to different vocabulary "
                         f"sizes {sizes} (None stands for the sum of the shards' sizes, "
                         f"{sum(s[1] for s in shards)}: pass the same vocab_size on every "
                         "rank, or None on every rank)")
    S = sizes[0]
    ranges = [(a, a + n) for a, n, _ in shards]
    for a, b in ranges:
        if not (0 <= a and b <= S):
            raise ValueError(f"vocab_start: the shard [{a}, {b}) of {what} must lie in the "
                             f"vocabulary [0, {S}) (vocab_size)")
    if not tiling:
        return
    end = 0
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if a != end:
            break
        end = b
    if end != S or sum(b - a for a, b in ranges) != S:
        raise ValueError(f"vocab_start: the shards of {what} over the ranks of vocab_group, "
                         f"{ranges} by rank, do not tile the vocabulary [0, {S}) exactly: "
                         "each id must lie in exactly one rank's shard")
