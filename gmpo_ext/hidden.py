"""GMPO from hidden states: the LM head fused in, the (N, V) logits never held.

``linear_logps(hidden, weight, ids)`` is ``selective_logps(hidden @ weight.T,
ids)`` without the logits: the projection runs in torch GEMMs (MKL / oneDNN on
CPU, cuBLAS on GPU) on (tokens x vocabulary) tiles, and this project's kernels
(csrc/cpu/hidden_cpu.c, csrc/cuda/hidden_cuda.cu) fold each tile into a
mergeable per-token state (max, sum exp, entropy term, target logit; DESIGN
2c) and, in backward, turn the recomputed tile into dL/d(h W^T + b) in place
for the dH = dy W and dW += dy^T h GEMMs. ``gmpo_loss_from_hidden`` puts
:func:`gmpo_ext.gmpo_loss` on top (autograd chains dL/dlogp into the head's
backward); ``grpo_loss_from_hidden`` the GRPO baseline.

Two custom ops (validated in their implementations, not only here):

  gmpo_ext::hidden_fwd(hidden, weight, bias, ids, pos, logit_scale, softcap,
                       temperature, entropy, tile_n, tile_v)
      -> (logp, entropy, lse), each (M,) float32 (float64 for float64 inputs)
  gmpo_ext::hidden_bwd(grad_logp, grad_entropy, hidden, weight, bias, ids, pos,
                       lse, entropy, logit_scale, softcap, temperature, tile_n,
                       tile_v, need_hidden, need_weight, need_bias)
      -> (grad_hidden, grad_weight, grad_bias) (empty where not needed)

``pos`` (M,) int64 lists the tokens to score as flat positions of hidden's
token axes (b * T + t for (B, T, H), n for (N, H)): the tokens the mask counts,
so padding costs no GEMM (a position listed twice is scored twice, and its
hidden gradient is the sum of both entries'). Each token tile is gathered
from hidden (any strides: a slice of the backbone's output is read where it
lies, one tile at a time).

With ``entropy=False`` the entropy output is zeros and takes no gradient.
The int arguments pass the dispatcher, which hands a Python bool to the
implementation as an int (True as 1): the public functions reject bools as
tile sizes before the call; the raw ops cannot tell.

Memory beyond inputs, outputs and parameter gradients: one (tile_n, tile_v)
tile in the input dtype, the gathered (tile_n, H) hidden tile, a (tile_n, H)
fp32 dH accumulator (two with a vocabulary-sharded head: the previous one's
all-reduce in flight), and O(M) per-token statistics. For bf16/fp16 weights the
fp32 dW accumulator is (V, H) (cast to the weight's dtype at the end), as in
TRL. FLOPs: forward 1 GEMM, backward 3 (recompute, dH, dW).

Why token tiles + recompute is the default rather than whole rows held
(``mode="rows"``, 3 GEMMs): GMPO's G_t needs every logp of its row, so the
3-GEMM schedule must hold a whole row's T x V logits (T = 4096, V = 151936:
2.5 GB in fp32, 20x a default tile) or give up; it fits only short rows. Where
it fits it saves the recompute GEMM (measured in benchmarks/bench_hidden.py,
results/bench_hidden_rows_cpu.csv), but the default must hold for any row
length within one tile of memory, and the tiled path already beats TRL's by
the margins in results/bench_hidden_cpu.md.
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op infers
# the schema from the annotation objects themselves and rejects strings
# ('Tensor'), so the op signatures' annotations must be evaluated.

import contextlib
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from . import loss as _loss
from .loss import _check_tensor, _check_number, gmpo_loss, grpo_loss

__all__ = ["linear_logps", "gmpo_loss_from_hidden", "grpo_loss_from_hidden", "default_tiles"]

HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ID_DTYPES = (torch.int64, torch.int32)
_MASK_DTYPES = tuple(_backend.DTYPE_CODES)
LSE_STATE = 4
ENTROPY = "entropy"
TILE_BUDGET_BYTES = 128 << 20   # default tile: about 128 MiB (one fp32 tile of 2^25 logits)
VOCAB_TILE = 32768              # at most this many vocabulary columns per tile


def default_tiles(n_tokens: int, H: int, V: int, dtype: torch.dtype,
                  budget_bytes: int = TILE_BUDGET_BYTES) -> tuple[int, int]:
    """(tile_n, tile_v): V cut into equal tiles of at most VOCAB_TILE columns
    (a multiple of 128: no ragged last tile to speak of), then as many tokens
    as fit the budget together with their hidden-side buffers (the gathered
    (tile_n, H) tile and its fp32 dH accumulator), between 64 and 8192 and a
    multiple of 64, never more than the tokens there are."""
    es = torch.empty((), dtype=dtype).element_size()
    k = max(1, -(-V // VOCAB_TILE))
    tile_v = min(V, -(-(-(-V // k)) // 128) * 128)
    per_token = tile_v * es + H * (es + 4)
    tile_n = max(64, min(8192, budget_bytes // per_token) // 64 * 64)
    return max(1, min(tile_n, n_tokens)), max(1, tile_v)


# ----------------------------------------------------------------------------
# the tile kernels: C (CPU), CUDA (or its SIMT emulation); torch for float64

def _tile_spec(tile, v0, V):
    n, vn = tile.shape
    return (tile.data_ptr(), tile.numel(), _backend.DTYPE_CODES[tile.dtype], n, vn, v0, V,
            tile.stride(0))


def _ids_spec(ids):
    return (ids.data_ptr(), ids.numel(), _backend.DTYPE_CODES[ids.dtype])


def _xf_torch(y, scale, softcap, temperature):
    u = y * scale
    if softcap:
        t = torch.tanh(u / softcap)
        return softcap * t / temperature, scale * (1 - t * t) / temperature
    return u / temperature, None


def _fold(tile, ids, state, v0, V, scale, softcap, temperature, entropy):
    if tile.dtype == torch.float64:    # the same fold in torch, for float64 (gradcheck)
        x, _ = _xf_torch(tile, scale, softcap, temperature)
        m = torch.maximum(state[:, 0], x.amax(1))   # NaN of either sign propagates
        # the rule set of csrc/gmpo_hidden.h (gmpo_lse_merge): NaN or +inf -> NaN
        poisoned = ~(m < math.inf) | torch.isnan(state[:, 1])
        mf = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(x - mf[:, None])
        c = torch.exp(state[:, 0] - mf)
        state[:, 2] = c * (state[:, 2] + (state[:, 0] - mf) * state[:, 1]).nan_to_num(0.0) \
            + torch.where(e > 0, e * (x - mf[:, None]), torch.zeros_like(e)).sum(1)
        state[:, 1] = c * state[:, 1] + e.sum(1)
        state[:, 0] = m
        state[:, :3] = torch.where(poisoned[:, None], math.nan, state[:, :3])
        local = ids - v0
        inr = (local >= 0) & (local < tile.shape[1])
        state[:, 3] += torch.where(inr, x.gather(1, local.clamp(0, tile.shape[1] - 1)[:, None])[:, 0],
                                   torch.zeros_like(m))
        return
    mod, code, stream = _backend.backend(tile.device)
    with _backend._on_device(tile.device):
        mod.hidden_fold(code, stream, _tile_spec(tile, v0, V), _ids_spec(ids), float(scale),
                        float(softcap), float(temperature), int(entropy),
                        torch.get_num_threads(), (state.data_ptr(), state.numel()))


def _grad(tile, ids, v0, V, scale, softcap, temperature, lse, entropy, g, gh):
    if tile.dtype == torch.float64:
        x, k = _xf_torch(tile, scale, softcap, temperature)
        p = torch.exp(x - lse[:, None])
        d = torch.zeros_like(x)
        if g is not None:
            d -= g[:, None] * p
            local = ids - v0
            inr = (local >= 0) & (local < tile.shape[1])
            d.scatter_add_(1, local.clamp(0, tile.shape[1] - 1)[:, None],
                           torch.where(inr, g, torch.zeros_like(g))[:, None])
        if gh is not None:   # p = 0 (a -inf logit): no gradient, not 0 * -inf
            d -= torch.where(p == 0, torch.zeros_like(p),
                             gh[:, None] * p * (x - lse[:, None] + entropy[:, None]))
        tile.copy_(d * (k if k is not None else scale / temperature))
        return
    n = tile.shape[0]
    mod, code, stream = _backend.backend(tile.device)
    bufs = [b for b in (lse, entropy, g, gh) if b is not None]
    extent = min(b.numel() for b in bufs)
    with _backend._on_device(tile.device):
        mod.hidden_grad(code, stream, _tile_spec(tile, v0, V), _ids_spec(ids), float(scale),
                        float(softcap), float(temperature), 0, torch.get_num_threads(),
                        lse.data_ptr(), entropy.data_ptr() if gh is not None else 0,
                        g.data_ptr() if g is not None else 0,
                        gh.data_ptr() if gh is not None else 0, min(extent, n))


def _gather(hidden, p):
    """The (n, H) rows of hidden at flat token positions p (a copy of those rows only)."""
    if hidden.dim() == 3:
        T = hidden.shape[1]
        return hidden[torch.div(p, T, rounding_mode="floor"), p % T]
    return hidden.index_select(0, p)


def _tile_buffer(tile_n, tile_v, M, V, dtype, device):
    return torch.empty(min(tile_n, M) * min(tile_v, V), dtype=dtype, device=device)


def _project(buf, hc, weight, bias, v0, v1):
    """The contiguous (n, v1 - v0) tile of hc @ weight[v0:v1].T (+ bias) in buf."""
    tile = buf[: hc.shape[0] * (v1 - v0)].view(hc.shape[0], v1 - v0)
    w = weight[v0:v1]
    if bias is not None:
        torch.addmm(bias[v0:v1], hc, w.t(), out=tile)
    else:
        torch.mm(hc, w.t(), out=tile)
    return tile


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bad_ids_mask(ids, V, f64, shard):
    """The (M,) bool mask of ids outside [0, V), where it is needed: None, or
    the mask that _forward_impl turns into NaN logps (no host sync).
    float64 folds in torch, not in the C core, so its ids are checked here as
    the C core checks the others: on CPU an IndexError naming ids (then None),
    on CUDA NaN, as the CUDA kernels give. A vocabulary shard needs the mask on
    every backend: the CUDA kernels mark an invalid id's target NaN only in the
    tile at v0 = 0, and the merge reads a target from the shard holding the id
    alone (the C core has raised on such an id already: then none is set)."""
    if not (f64 or shard):
        return None
    bad = (ids < 0) | (ids >= V)
    if f64 and ids.device.type == "cpu":
        if ids.numel() and bool(bad.any()):
            r = int(torch.nonzero(bad)[0, 0])
            raise IndexError(f"ids: token id {int(ids[r])} at {r} is outside [0, {V}), the "
                             "vocabulary of the weight")
        return None
    return bad


def _forward_impl(hidden, weight, bias, ids, pos, scale, softcap, temperature, entropy,
                  tile_n, tile_v, vocab=None):
    """(logp, entropy, lse), each (M,). ``vocab``: None (weight is the whole
    vocabulary) or (vocab_start, vocab_size, group): weight holds the rows
    [vocab_start, vocab_start + V) of a vocab_size vocabulary sharded over
    ``group``; each token's folded state is merged over the group (two
    all-reduces of O(M) values, gmpo_ext.distributed.merge_states)."""
    M = pos.shape[0]
    V = weight.shape[0]
    v_base, V_all = (0, V) if vocab is None else vocab[:2]
    sd = _stat_dtype(hidden.dtype)
    dev = hidden.device
    bad = _bad_ids_mask(ids, V_all, hidden.dtype == torch.float64, vocab is not None)
    if M == 0:
        return (torch.empty(M, dtype=sd, device=dev), torch.zeros(M, dtype=sd, device=dev),
                torch.empty(M, dtype=sd, device=dev))
    buf = _tile_buffer(tile_n, tile_v, M, V, hidden.dtype, dev)
    # every token's state (O(M)): folded tile by tile, finished (or merged over
    # the vocabulary's ranks) at the end
    st = torch.zeros((M, LSE_STATE), dtype=sd, device=dev)
    st[:, 0] = -math.inf
    for lo in range(0, M, tile_n):
        hi = min(lo + tile_n, M)
        hc = _gather(hidden, pos[lo:hi])
        idc = ids[lo:hi]
        for v0 in range(0, V, tile_v):
            v1 = min(v0 + tile_v, V)
            tile = _project(buf, hc, weight, bias, v0, v1)
            _fold(tile, idc, st[lo:hi], v_base + v0, V_all, scale, softcap, temperature,
                  entropy)
    ls = torch.log(st[:, 1])
    if vocab is None:
        lse = st[:, 0] + ls
        logp = st[:, 3] - lse
        ent = ls - st[:, 2] / st[:, 1] if entropy else torch.zeros_like(lse)
    else:
        from . import distributed
        here = (ids >= v_base) & (ids < v_base + V)
        logp, ent, lse = distributed.merge_states(st[:, 0], ls, ls - st[:, 2] / st[:, 1],
                                                  st[:, 3], here, vocab[2], entropy, sd)
    if bad is not None:   # no host sync: an invalid id's logp is NaN
        logp = torch.where(bad, torch.full_like(logp, math.nan), logp)
    return logp, ent, lse


def _backward_impl(grad_logp, grad_entropy, hidden, weight, bias, ids, pos, lse, entropy,
                   scale, softcap, temperature, tile_n, tile_v, need_h, need_w, need_b,
                   vocab=None, grad_dtypes=None):
    """(grad_hidden, grad_weight, grad_bias). With ``vocab`` (a shard, as in
    _forward_impl) the weight and bias gradients are the shard's own, and each
    token tile's hidden gradient, a partial sum over the shard's columns, is
    summed over the group (one all-reduce of the fp32, fp64 for fp64 inputs,
    (tile_n, H) block per token tile, as the backward of Megatron's
    column-parallel head does; issued asynchronously, it is waited for after
    the next token tile's GEMMs)."""
    M = pos.shape[0]
    V, H = weight.shape
    v_base, V_all = (0, V) if vocab is None else vocab[:2]
    dev = hidden.device
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # grad_dtypes: the gradients' dtypes when the GEMMs ran on cast copies
    # (autocast: an fp32 master weight gets its fp32 accumulator, not a bf16
    # rounding of it); default the inputs' own
    dt_h, dt_w, dt_b = grad_dtypes or (hidden.dtype, weight.dtype,
                                       bias.dtype if bias is not None else None)
    gh_out = torch.zeros(hidden.shape, dtype=dt_h, device=dev) if need_h else None
    # fp32 accumulators: the parameter gradient itself for fp32, a (V, H) fp32 one else
    gw = torch.zeros((V, H), dtype=acc, device=dev) if need_w else None
    gb = torch.zeros((V,), dtype=acc, device=dev) if (need_b and bias is not None) else None
    sd = _stat_dtype(hidden.dtype)
    g = grad_logp.to(sd).contiguous() if grad_logp is not None else None
    gent = grad_entropy.to(sd).contiguous() if grad_entropy is not None else None
    if M > 0 and (g is not None or gent is not None) and (need_h or need_w or gb is not None):
        buf = _tile_buffer(tile_n, tile_v, M, V, hidden.dtype, dev)
        pending = None   # (all-reduce in flight, positions, dh) of the previous token tile
        for lo in range(0, M, tile_n):
            hi = min(lo + tile_n, M)
            p = pos[lo:hi]
            hc = _gather(hidden, p)
            dh = torch.zeros((hi - lo, H), dtype=acc, device=dev) if need_h else None
            args = (ids[lo:hi], lse[lo:hi], entropy[lo:hi],
                    g[lo:hi] if g is not None else None,
                    gent[lo:hi] if gent is not None else None)
            for v0 in range(0, V, tile_v):
                v1 = min(v0 + tile_v, V)
                tile = _project(buf, hc, weight, bias, v0, v1)
                _grad(tile, args[0], v_base + v0, V_all, scale, softcap, temperature,
                      *args[1:])
                if dh is not None:
                    _acc_mm(dh, tile, weight[v0:v1])
                if gw is not None and dev.type == "cpu":   # dW^T += h^T dy: faster on CPU
                    _acc_mm(gw[v0:v1].t(), hc.t(), tile)
                elif gw is not None:                      # cuBLAS, into a contiguous fp32 out
                    _acc_mm(gw[v0:v1], tile.t(), hc)
                if gb is not None:
                    gb[v0:v1] += tile.sum(0, dtype=acc)
            if dh is not None:
                if vocab is None:
                    _put_rows(gh_out, p, dh)
                else:   # the sum over the shards, overlapping the next tile's GEMMs
                    if pending is not None:
                        _put_rows(gh_out, *pending[1:], work=pending[0])
                    import torch.distributed as dist
                    pending = (dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=vocab[2],
                                               async_op=True), p, dh)
        if pending is not None:
            _put_rows(gh_out, *pending[1:], work=pending[0])
    return (gh_out if need_h else hidden.new_empty(0),
            gw.to(dt_w) if need_w else hidden.new_empty(0),
            gb.to(dt_b) if gb is not None else hidden.new_empty(0))


def _put_rows(gh_out, p, dh, work=None):
    """hidden's gradient at flat token positions p += dh (after ``work``, an
    all-reduce of dh in flight, completes)."""
    if work is not None:
        work.wait()
    # added, not written: a position listed twice in pos (the raw ops allow
    # it) gets the sum of its entries' gradients. gh_out is the backward's own
    # contiguous zeros; index_add_ is deterministic on CUDA in deterministic mode
    gh_out.view(-1, gh_out.shape[-1]).index_add_(0, p, dh.to(gh_out.dtype))


def _addmm_has_out_dtype():
    """Whether this torch has addmm's out_dtype (aten::addmm.dtype_out, torch
    >= 2.8): asked of the op registry, not of the version string."""
    try:
        return "dtype_out" in torch.ops.aten.addmm.overloads()
    except (AttributeError, RuntimeError):
        return False


_ADDMM_OUT_DTYPE = _addmm_has_out_dtype()
_OUT_DTYPE_DEVICES = ("cuda",)   # where addmm.dtype_out has a kernel (CPU has none)


def _acc_mm(acc, a, b):
    """acc += a @ b with acc in fp32 (fp64): the GEMM in the inputs' dtype with
    fp32 accumulation inside. bf16/fp16: on CUDA with torch >= 2.8 addmm's
    out_dtype keeps it fp32 throughout; elsewhere (CPU: no fp32-out bf16 GEMM;
    CUDA on torch 2.4-2.7: no out_dtype) the product is rounded to the inputs'
    dtype once per (token tile, vocabulary tile) before it is added in fp32
    (no fp32 copy of the tile or of the weight, the GEMM stays a bf16 one)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _ADDMM_OUT_DTYPE and acc.device.type in _OUT_DTYPE_DEVICES:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += torch.mm(a, b)


# ----------------------------------------------------------------------------
# validation: the public functions and the ops' implementations both call it

def _check_hidden_op(hidden, weight, bias, ids, pos, scale, softcap, temperature, tile_n,
                     tile_v, fake=False):
    """The ops' arguments. ``fake``: the fake kernels' part (tensors' dtypes,
    shapes and devices; no data read, no scalar: they may be symbolic). The
    dispatcher picks the fake (meta) kernel when any tensor is on meta, so a
    meta weight beside CPU hidden reaches the fake kernel: it must raise there,
    not hand back uninitialised outputs."""
    _check_tensor("hidden", hidden, HIDDEN_DTYPES)
    _check_tensor("weight", weight, HIDDEN_DTYPES)
    _check_tensor("bias", bias, HIDDEN_DTYPES, optional=True)
    _check_tensor("ids", ids, ID_DTYPES)
    _check_tensor("pos", pos, (torch.int64,))
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape (B, T, H) or (N, H), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape (V, H) with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, H) with H = {hidden.shape[-1]} (hidden's "
                         f"last axis), got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}; the "
                            "LM head runs in one dtype")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    if ids.dim() != 1 or pos.dim() != 1 or ids.shape[0] != pos.shape[0]:
        raise ValueError(f"ids and pos must be (M,) vectors of one length, got "
                         f"{tuple(ids.shape)} and {tuple(pos.shape)}")
    dev = hidden.device
    if dev.type not in (("cpu", "cuda", "meta") if fake else ("cpu", "cuda")):
        raise ValueError(f"hidden is on {dev}; gmpo_ext runs on cpu and cuda tensors")
    _check_devices(dev, (("weight", weight), ("bias", bias), ("ids", ids), ("pos", pos)))
    if not ids.is_contiguous():
        raise ValueError("ids must be contiguous (an (M,) vector)")
    if fake:
        return
    ntok = hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
    if pos.numel() and dev.type == "cpu":
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0 or hi >= ntok:
            raise IndexError(f"pos: token position outside [0, {ntok})")
    for name, v in (("logit_scale", scale), ("temperature", temperature)):
        _check_number(name, v)
    if not temperature > 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not (softcap >= 0):
        raise ValueError(f"final_logit_softcapping must be > 0 or None, got {softcap}")
    _check_number("final_logit_softcapping", softcap)
    for name, v in (("tile_tokens", tile_n), ("tile_vocab", tile_v)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def _check_devices(dev, named):
    """Every (name, tensor) of ``named`` (None: absent) on ``dev`` (hidden's)."""
    for name, t in named:
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but hidden is on {dev}; all inputs "
                             "must be on the same device")


def _check_bwd_tensors(grad_logp, grad_entropy, hidden, lse, entropy, M):
    sd = (_stat_dtype(hidden.dtype),)
    _check_floats("grad_logp", grad_logp, M)
    _check_floats("grad_entropy", grad_entropy, M)
    _check_floats("lse", lse, M, sd)
    _check_floats("entropy", entropy, M, sd)
    _check_devices(hidden.device, (("grad_logp", grad_logp), ("grad_entropy", grad_entropy),
                                   ("lse", lse), ("entropy", entropy)))


def _check_tiles(tile_tokens, tile_vocab):
    """The public tile options, None or an int >= 1, checked before the op:
    the dispatcher hands the op's implementation a bool as an int (True as 1),
    so its own check cannot see one."""
    for name, v in (("tile_tokens", tile_tokens), ("tile_vocab", tile_vocab)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)
                              or v < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")


def _check_floats(name, t, M, dtypes=_backend.FLOAT_DTYPES):
    if t is None:
        return
    _check_tensor(name, t, dtypes)
    if tuple(t.shape) != (M,):
        raise ValueError(f"{name} must have shape ({M},), got {tuple(t.shape)}")


# ----------------------------------------------------------------------------
# custom ops

@torch.library.custom_op("gmpo_ext::hidden_fwd", mutates_args=())
def hidden_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, pos: Tensor,
    logit_scale: float, softcap: float, temperature: float, entropy: bool, tile_n: int,
    tile_v: int,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_hidden_op(hidden, weight, bias, ids, pos, logit_scale, softcap, temperature,
                     tile_n, tile_v)
    return _forward_impl(hidden, weight, bias, ids, pos, logit_scale, softcap, temperature,
                         entropy, tile_n, tile_v)


@hidden_fwd.register_fake
def _(hidden, weight, bias, ids, pos, logit_scale, softcap, temperature, entropy, tile_n,
      tile_v):
    _check_hidden_op(hidden, weight, bias, ids, pos, logit_scale, softcap, temperature,
                     tile_n, tile_v, fake=True)
    sd = _stat_dtype(hidden.dtype)
    M = pos.shape[0]
    return tuple(hidden.new_empty((M,), dtype=sd) for _ in range(3))


@torch.library.custom_op("gmpo_ext::hidden_bwd", mutates_args=())
def hidden_bwd(
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor,
    weight: Tensor, bias: Optional[Tensor], ids: Tensor, pos: Tensor, lse: Tensor,
    entropy: Tensor, logit_scale: float, softcap: float, temperature: float, tile_n: int,
    tile_v: int, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_hidden_op(hidden, weight, bias, ids, pos, logit_scale, softcap, temperature,
                     tile_n, tile_v)
    _check_bwd_tensors(grad_logp, grad_entropy, hidden, lse, entropy, pos.shape[0])
    return _backward_impl(grad_logp, grad_entropy, hidden, weight, bias, ids, pos,
                          lse.contiguous(), entropy.contiguous(), logit_scale, softcap,
                          temperature, tile_n, tile_v, need_hidden, need_weight, need_bias)


@hidden_bwd.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, ids, pos, lse, entropy, logit_scale,
      softcap, temperature, tile_n, tile_v, need_hidden, need_weight, need_bias):
    _check_hidden_op(hidden, weight, bias, ids, pos, logit_scale, softcap, temperature,
                     tile_n, tile_v, fake=True)
    _check_bwd_tensors(grad_logp, grad_entropy, hidden, lse, entropy, pos.shape[0])
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            hidden.new_empty(bias.shape if (need_bias and bias is not None) else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, ids, pos, scale, softcap, temperature, want_ent, tile_n, tile_v = \
        inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, ids, pos, lse, entropy)
    ctx.opts = (scale, softcap, temperature, tile_n, tile_v)
    # entropy=False: the entropy output is zeros, not the entropy: no gradient
    ctx.mark_non_differentiable(*((lse,) if want_ent else (lse, entropy)))
    ctx.set_materialize_grads(False)   # an unused entropy stays None: no zeros read


def _head_backward(ctx, grad_logp, grad_entropy, n_inputs, run=None):
    """The gradients of hidden_fwd's (or _Head's) inputs, None for the other
    n_inputs - 3: ``run(args)`` (default the op hidden_bwd) computes them
    from hidden_bwd's arguments."""
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if (grad_logp is None and grad_entropy is None) or not (need_h or need_w or need_b):
        return (None,) * n_inputs
    hidden, weight, bias, ids, pos, lse, entropy = ctx.saved_tensors
    scale, softcap, temperature, tile_n, tile_v = ctx.opts[:5]
    args = (grad_logp, grad_entropy, hidden, weight, bias, ids, pos, lse, entropy, scale,
            softcap, temperature, tile_n, tile_v, bool(need_h), bool(need_w), bool(need_b))
    dh, dw, db = (run or (lambda a: hidden_bwd(*a)))(args)
    return ((dh if need_h else None), (dw if need_w else None),
            (db if need_b and bias is not None else None)) + (None,) * (n_inputs - 3)


def _hidden_backward(ctx, grad_logp, grad_entropy, grad_lse):
    return _head_backward(ctx, grad_logp, grad_entropy, 11)


hidden_fwd.register_autograd(_hidden_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# the public layer: layouts (padded, packed), options

def _head_opts(temperature, logit_scale, final_logit_softcapping):
    for name, v in (("temperature", temperature), ("logit_scale", logit_scale)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    if not temperature > 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    c = final_logit_softcapping
    if c is None:
        c = 0.0
    elif isinstance(c, bool) or not isinstance(c, numbers.Real) or not (math.isfinite(c) and c > 0):
        raise ValueError(f"final_logit_softcapping must be a finite number > 0 or None, got {c!r}")
    return float(temperature), float(logit_scale), float(c)


def _token_shape(hidden, ids, mask, cu_seqlens):
    """Check the layout; returns the token shape: (B, T) padded or (N,) packed."""
    _check_tensor("hidden", hidden, HIDDEN_DTYPES)
    _check_tensor("ids", ids, ID_DTYPES)
    if hidden.dim() == 3:
        shape = tuple(hidden.shape[:2])
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is for packed inputs: hidden (N, H), ids (N,)")
    elif hidden.dim() == 2:
        shape = (hidden.shape[0],)
    else:
        raise ValueError(f"hidden must have shape (B, T, H) or (N, H) (packed), got "
                         f"{tuple(hidden.shape)}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"ids must have hidden's token shape {shape}, got {tuple(ids.shape)}")
    if mask is not None:
        _check_tensor("mask", mask, _MASK_DTYPES)
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask must have hidden's token shape {shape}, got "
                             f"{tuple(mask.shape)}")
        if mask.device != hidden.device:
            raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")
    if ids.device != hidden.device:
        raise ValueError(f"ids is on {ids.device} but hidden is on {hidden.device}")
    return shape


def _positions(mask, shape, device):
    n = math.prod(shape)
    if mask is None:
        return torch.arange(n, device=device)
    return torch.nonzero(mask.reshape(-1) != 0).reshape(-1)


def _scatter(vals, pos, shape):
    """(M,) values at flat positions -> a zero-filled tensor of the token shape
    (differentiable; the gradient of the zeros goes nowhere)."""
    out = vals.new_zeros(math.prod(shape))
    return out.index_put((pos,), vals).view(shape)


class _Head(torch.autograd.Function):
    """linear_logps where the custom op does not fit: _forward_impl /
    _backward_impl with any of
      ``vocab``   the head's vocabulary sharded over a process group (the
                  fold, merge and tile gradient of the single-process ops,
                  plus the collectives);
      ``cd``      a compute dtype (autocast): the GEMMs run on copies of
                  hidden, weight and bias cast to it, made in forward and
                  again in backward (none is kept), the fold and every
                  accumulation in fp32, each gradient returned in its own
                  input's dtype (an fp32 master weight gets its fp32
                  accumulator);
      ``zero3``   a DeepSpeed ZeRO-3 head, gathered by the caller for the
                  forward: the backward gathers it again while it runs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, pos, opts, entropy, vocab, cd, zero3):
        scale, softcap, temperature, tile_n, tile_v = opts
        h, w, b = (_cast(t, cd) for t in (hidden, weight, bias))
        _check_hidden_op(h, w, b, ids, pos, scale, softcap, temperature, tile_n, tile_v)
        logp, ent, lse = _forward_impl(h, w, b, ids, pos, scale, softcap, temperature,
                                       entropy, tile_n, tile_v, vocab)
        del h, w, b
        ctx.save_for_backward(hidden, weight, bias, ids, pos, lse, ent)
        ctx.opts, ctx.vocab, ctx.cd, ctx.zero3 = opts, vocab, cd, zero3
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)   # an unused entropy stays None: no zeros read
        return logp, ent, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_lse):
        if torch.is_grad_enabled():   # create_graph=True: say so, on every rank
            raise RuntimeError("gmpo_ext: the fused LM head supports one backward pass; "
                               "double backward (create_graph=True, Hessians) is not "
                               "implemented")
        def run(args):   # the GEMMs on cast copies of the (re-gathered) head
            hidden, weight, bias = args[2:5]
            dts = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
            with _zero3_gathered(weight, bias) if ctx.zero3 else contextlib.nullcontext():
                cast = tuple(_cast(t, ctx.cd) for t in (hidden, weight, bias))
                return _backward_impl(*args[:2], *cast, *args[5:], ctx.vocab, dts)
        return _head_backward(ctx, grad_logp, grad_entropy, 10, run)


def _cast(t, dtype):
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


# ----------------------------------------------------------------------------
# the head's weight as the training engines leave it (DESIGN 2e)

def _autocast_dtype(hidden, weight, bias):
    """The dtype the head's GEMMs run in under autocast, as torch.nn.Linear's
    would (None: no autocast, or nothing to cast): autocast casts fp32, bf16
    and fp16 operands of a matmul to its dtype and leaves fp64 alone."""
    dev = hidden.device.type
    if dev not in ("cpu", "cuda"):
        return None
    try:
        on = torch.is_autocast_enabled(dev)
        cd = torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError):   # before the device-type forms
        on = torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled()
        cd = torch.get_autocast_cpu_dtype() if dev == "cpu" else torch.get_autocast_gpu_dtype()
    if not on:
        return None
    ts = [t for t in (hidden, weight, bias) if t is not None]
    if any(t.dtype == torch.float64 for t in ts) or all(t.dtype == cd for t in ts):
        return None
    return cd


def _is_dtensor(t):
    for mod in ("torch.distributed.tensor", "torch.distributed._tensor"):
        try:
            cls = getattr(__import__(mod, fromlist=["DTensor"]), "DTensor")
        except (ImportError, AttributeError):
            continue
        if isinstance(t, cls):
            return True
    return False


def _is_zero3(t):
    """A DeepSpeed ZeRO-3 parameter (partitioned outside its module's forward)."""
    return t is not None and hasattr(t, "ds_id") and hasattr(t, "ds_status")


def _zero3_available(t):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    return t.ds_status == ZeroParamStatus.AVAILABLE


def _zero3_gathered(*params):
    """Gather the ZeRO-3 parameters of ``params`` that are partitioned now
    (each once: a tied head may be passed twice) for the with-block."""
    todo = {id(p): p for p in params if _is_zero3(p) and not _zero3_available(p)}
    if not todo:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(todo.values()))


_WHOLE_HEAD = ("linear_logps needs the whole (V, H) head on this rank (or a vocabulary "
               "shard with vocab_group=)")


def _check_head_weight(weight, bias):
    """Refuse a head weight a training engine has sharded, saying what to do
    (it would be read as a wrong-shaped weight); returns whether the head is
    a gathered ZeRO-3 one (its backward must gather it again)."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if _is_dtensor(t):
            raise TypeError(
                f"{name} is a DTensor (an FSDP2 shard or a tensor-parallel placement), "
                f"local shape {tuple(t.to_local().shape)} of {tuple(t.shape)}; "
                f"{_WHOLE_HEAD}. Call it inside the FSDP-wrapped model's forward, where "
                "fully_shard has unsharded the head's parameters into plain tensors (as "
                "gmpo_ext.trl does), or pass weight.full_tensor(); for a vocabulary-parallel "
                "head pass weight.to_local() with vocab_group=.")
        if _is_zero3(t) and not _zero3_available(t):
            raise ValueError(
                f"{name} is a DeepSpeed ZeRO-3 partition (local shape {tuple(t.shape)}, full "
                f"shape {tuple(t.ds_shape)}); {_WHOLE_HEAD}. Gather it for the call inside the "
                "engine's forward, where ZeRO-3's hooks reduce its gradient: "
                "`with deepspeed.zero.GatheredParameters([weight, bias]): linear_logps(...)` "
                "(the backward gathers it again by itself), as gmpo_ext.trl does.")
        if getattr(t, "_fsdp_flattened", False) and t.dim() != (2 if name == "weight" else 1):
            raise ValueError(
                f"{name} is this rank's FSDP1 flat-parameter shard (shape {tuple(t.shape)}), not "
                f"the head; {_WHOLE_HEAD}. Call it inside the FSDP-wrapped model's forward "
                "(the head's unit unsharded) or within FSDP.summon_full_params(model).")
    return _is_zero3(weight) or _is_zero3(bias)


def _scored(hidden, weight, ids, mask, bias, temperature, logit_scale, softcap, entropy,
            tile_tokens, tile_vocab, ids_name, vocab_group=None, vocab_start=0,
            vocab_size=None):
    """(logps, entropy) in the token shape, the heads' fused op underneath (the
    shard's autograd.Function with ``vocab_group``)."""
    shape = _token_shape(hidden, ids, mask, None)
    _check_tiles(tile_tokens, tile_vocab)
    _check_tensor("weight", weight, HIDDEN_DTYPES)
    _check_tensor("bias", bias, HIDDEN_DTYPES, optional=True)
    zero3 = _check_head_weight(weight, bias)
    cd = _autocast_dtype(hidden, weight, bias)
    pos = _positions(mask, shape, hidden.device)
    ids_sel = ids.reshape(-1).index_select(0, pos).contiguous()
    V, H = weight.shape if weight.dim() == 2 else (1, 1)
    tn, tv = default_tiles(max(pos.numel(), 1), H, V, cd or hidden.dtype)
    vocab = None
    if vocab_group is not None and weight.dim() == 2:   # else hidden_fwd names weight
        from . import distributed
        vocab_start, vocab_size = distributed.check_vocab(V, vocab_group, vocab_start,
                                                          vocab_size, "the weight's rows",
                                                          hidden.device,
                                                          _shard_agree(hidden, pos, ids_sel,
                                                                       entropy, tile_tokens))
        vocab = (vocab_start, vocab_size, vocab_group)
        # the token tile must be the same on every rank (the backward's hidden
        # gradient is all-reduced tile by tile): sized for an equal shard
        P = torch.distributed.get_world_size(vocab_group)
        tn = default_tiles(max(pos.numel(), 1), H, -(-vocab_size // P), hidden.dtype)[0]
    tn = tile_tokens if tile_tokens is not None else tn
    tv = tile_vocab if tile_vocab is not None else tv
    try:
        if vocab is None and cd is None and not zero3:   # the custom op (compile, opcheck)
            logp, ent, _ = hidden_fwd(hidden, weight, bias, ids_sel, pos, logit_scale, softcap,
                                      temperature, bool(entropy), tn, tv)
        else:
            if hidden.device.type == "meta":
                raise ValueError("hidden: vocab_group=, autocast and ZeRO-3 heads need real "
                                 "tensors (meta tensors cannot be folded)")
            logp, ent, _ = _head(hidden, weight, bias, ids_sel, pos,
                                 (logit_scale, softcap, temperature, tn, tv), bool(entropy),
                                 vocab, cd, zero3)
    except IndexError as e:
        msg = str(e)
        if not msg.startswith("ids:"):
            raise
        # the kernels name the id's index among the scored tokens: say where it
        # is in the caller's ids instead (the error path only: a host read)
        V_all = vocab[1] if vocab is not None else V
        bad = torch.nonzero((ids_sel < 0) | (ids_sel >= V_all)).reshape(-1)
        if bad.numel() == 0:
            raise IndexError(ids_name + msg[3:]) from None
        r = int(bad[0])
        flat = int(pos[r])
        where = list(divmod(flat, shape[1])) if len(shape) == 2 else [flat]
        raise IndexError(f"{ids_name}: token id {int(ids_sel[r])} at {where} is outside "
                         f"[0, {V_all}), the vocabulary of the "
                         f"{'head (vocab_size)' if vocab is not None else 'weight'}") from None
    return _scatter(logp, pos, shape), (_scatter(ent, pos, shape) if entropy else None)


def _shard_agree(hidden, pos, ids_sel, entropy, tile_tokens):
    """What every rank of vocab_group must hold equal for the head's
    collectives (checked in the layout gather): their sizes (the scored
    tokens, the token tile, H, the statistics' dtype, the entropy's extra
    row) and whether the backward all-reduces the hidden gradient at all;
    and sums of the scored positions and ids (computed on the device), which
    catch a mask or ids that differ with the same count (wrong log-probs)."""
    return (("the number of scored tokens (mask != 0)", pos.numel()),
            ("mask (the sum of the scored positions)", pos.sum()),
            ("ids (the sum of the scored ids)", ids_sel.sum(dtype=torch.int64)),
            ("tile_tokens (0: the default)", 0 if tile_tokens is None else tile_tokens),
            ("hidden's size H", hidden.shape[-1]),
            ("hidden's dtype (0 fp32, 1 bf16, 2 fp16, 3 fp64)",
             HIDDEN_DTYPES.index(hidden.dtype)),
            ("return_entropy", int(bool(entropy))),
            ("hidden.requires_grad (with grad mode)",
             int(hidden.requires_grad and torch.is_grad_enabled())))


@torch.compiler.disable
def _head(hidden, weight, bias, ids, pos, opts, entropy, vocab, cd, zero3):
    return _Head.apply(hidden, weight, bias, ids, pos, opts, entropy, vocab, cd, zero3)


def linear_logps(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: Optional[float] = None,
    return_entropy: bool = False,
    mask: Optional[Tensor] = None,
    tile_tokens: Optional[int] = None,
    tile_vocab: Optional[int] = None,
    vocab_group=None,
    vocab_start: int = 0,
    vocab_size: Optional[int] = None,
):
    """Log-probs of ``ids`` under the LM head ``hidden @ weight.T (+ bias)``, fused.

    ``log_softmax(z)[ids]`` with z = logit_scale * (hidden @ weight.T + bias),
    softcapped (z = c * tanh(z / c)) when ``final_logit_softcapping = c``, then
    divided by the temperature (TRL's order), without ever holding the (N, V)
    logits: (tokens x vocabulary) tiles are projected and folded one at a
    time; backward recomputes them. Differentiable in hidden, weight and bias
    (each only when it requires grad), entropy included.

    Args:
        hidden: (B, T, H) aligned with ids (position t predicts ids[:, t]; any
            strides, e.g. ``last_hidden_state[:, P - 1:-1]``: read in place) or
            (N, H) with ids (N,). float32, bfloat16, float16 or float64.
        weight: (V, H) the LM head (tied embeddings too), hidden's dtype. Under
            autocast (cpu or cuda) hidden, weight and bias may differ in dtype:
            the GEMMs then run in the autocast dtype, as torch.nn.Linear's
            would, on copies cast per call (the fold and every accumulation in
            fp32; each gradient in its input's dtype, an fp32 master weight's
            unrounded). A head a training engine has sharded (an FSDP2
            DTensor, an FSDP1 flat shard, a partitioned ZeRO-3 parameter)
            raises, saying what to do; a ZeRO-3 head gathered by the caller
            (``deepspeed.zero.GatheredParameters``) is gathered again for
            the backward.
        ids: (B, T) or (N,) int64 / int32 token ids in [0, V).
        bias: optional (V,).
        temperature, logit_scale, final_logit_softcapping: the transform above.
        return_entropy: also return each position's entropy (differentiable).
        mask: optional, hidden's token shape: only tokens with mask != 0 are
            projected (padding costs no GEMM); the others get 0.
        tile_tokens, tile_vocab: the tile, default :func:`default_tiles`.
        vocab_group: a torch.distributed process group over which the head's
            vocabulary is sharded (Megatron's column-parallel output layer):
            this rank's ``weight`` (and ``bias``) hold the rows
            [vocab_start, vocab_start + V) of a vocabulary of ``vocab_size``
            (default: the sum of the shards' sizes, equal or not, gathered
            from the ranks); hidden, ids and mask are the same on every rank
            of the group (the number of scored tokens, H, the dtype,
            tile_tokens, return_entropy and whether hidden requires grad are
            checked to agree: ValueError on every rank otherwise). Each token's fold is merged over
            the group (two all-reduces of O(tokens) values); every rank gets
            the whole vocabulary's logp and entropy; the weight and bias
            gradients are this shard's, the hidden gradient is summed over the
            group in backward (one all-reduce per token tile). ids are in
            [0, vocab_size). tile_tokens, when given, must be the same on
            every rank.
        vocab_start, vocab_size: this rank's shard, with vocab_group.

    Returns:
        logps in ids' shape (float32; float64 for float64 inputs), or
        ``(logps, entropy)``. An id outside [0, V) of a scored token raises
        IndexError (CPU).
    """
    temperature, logit_scale, softcap = _head_opts(temperature, logit_scale,
                                                   final_logit_softcapping)
    logp, ent = _scored(hidden, weight, ids, mask, bias, temperature, logit_scale, softcap,
                        return_entropy, tile_tokens, tile_vocab, "ids", vocab_group,
                        vocab_start, vocab_size)
    return (logp, ent) if return_entropy else logp


# ----------------------------------------------------------------------------
# packed rows (cu_seqlens) <-> padded (B, T_max) for the loss

def _packed_index(cu_seqlens, N, device):
    _check_tensor("cu_seqlens", cu_seqlens, (torch.int32, torch.int64))
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must have shape (B + 1,), got {tuple(cu_seqlens.shape)}")
    cu = [int(x) for x in cu_seqlens.tolist()]   # host sync: the padded width is needed
    if cu[0] != 0 or cu[-1] != N or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at N = {N}; "
                         f"got {cu[:8]}{'...' if len(cu) > 8 else ''}")
    lens = [b - a for a, b in zip(cu, cu[1:])]
    Tm = max(lens, default=0)
    c = torch.tensor(cu, dtype=torch.int64, device=device)
    ar = torch.arange(Tm, device=device)
    valid = ar[None, :] < (c[1:] - c[:-1])[:, None]
    idx = torch.where(valid, c[:-1, None] + ar[None, :], torch.full_like(valid, N, dtype=torch.int64))
    return idx, valid


def _pad(x, idx, fill=0.0):
    """(N,) -> (B, T_max), ``fill`` where idx == N (differentiable)."""
    if x is None:
        return None
    ext = torch.cat([x, x.new_full((1,) + tuple(x.shape[1:]), fill)])
    return ext[idx]


def _packed_is_weights(isw, idx, N):
    """Packed is_weights: (N,) per token -> (B, T_max); (B, 1) per row as it is.
    A (B,) vector is refused: it once read as per row, except when N == B, where
    the same shape read as per token; one shape, one meaning."""
    if isw is None:
        return None
    _check_tensor("is_weights", isw, _backend.FLOAT_DTYPES)
    B = idx.shape[0]
    if tuple(isw.shape) == (N,):
        # padded with 1: vespo sums log w over every token of the (B, T_max)
        # layout (as TRL's get_gamma_weights does), where the padding must add 0
        return _pad(isw, idx, 1.0)
    if tuple(isw.shape) == (B, 1):
        return isw
    raise ValueError(f"is_weights: with packed inputs (cu_seqlens) pass per-token weights as "
                     f"(N,) = ({N},) or per-row weights as (B, 1) = ({B}, 1), got "
                     f"{tuple(isw.shape)}" + (" (a per-row (B,) vector is ambiguous with "
                                              "per-token (N,): reshape it to (B, 1))"
                                              if tuple(isw.shape) == (B,) else ""))


def _from_hidden(algo_loss, hidden, weight, completion_ids, old_logps, advantages, mask, bias,
                 temperature, logit_scale, final_logit_softcapping, cu_seqlens, ref_logps,
                 is_weights, return_metrics, return_entropy, tile_tokens, tile_vocab, mode,
                 loss_kwargs, rows_budget=None, vocab=(None, 0, None)):
    temperature, logit_scale, softcap = _head_opts(temperature, logit_scale,
                                                   final_logit_softcapping)
    if mask is None:
        raise TypeError("mask must be a torch.Tensor, got None")
    if mode == "auto":
        mode = "tiles"   # see the module doc and benchmarks/bench_hidden.py
    if mode not in ("tiles", "rows"):
        raise ValueError(f"mode must be one of 'auto', 'tiles', 'rows'; got {mode!r}")
    packed = isinstance(hidden, Tensor) and hidden.dim() == 2
    if packed and cu_seqlens is None:
        raise ValueError("hidden of shape (N, H) is packed: pass cu_seqlens (B + 1,)")
    _token_shape(hidden, completion_ids, mask, cu_seqlens)
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None:
            _check_tensor(name, t, _backend.FLOAT_DTYPES)
            if tuple(t.shape) != tuple(completion_ids.shape):
                raise ValueError(f"{name} must have the shape of completion_ids "
                                 f"{tuple(completion_ids.shape)}, got {tuple(t.shape)}")
    if old_logps is None:
        raise TypeError("old_logps must be a torch.Tensor, got None")
    budget = 2 * TILE_BUDGET_BYTES if rows_budget is None else int(rows_budget)
    if mode == "rows" and (loss_kwargs.get("group") is not None
                           or loss_kwargs.get("num_rows") is not None
                           or vocab[0] is not None):
        raise ValueError("mode='rows' finishes each block of rows on its own: group=, "
                         "num_rows= and vocab_group= need mode='tiles' (the default)")
    if mode == "rows" and (algo_loss is not gmpo_loss or return_entropy or
                           not _rows_fit(hidden, weight, mask, budget)):
        raise ValueError("mode='rows' needs gmpo_loss_from_hidden, padded (B, T, H) hidden, "
                         "return_entropy=False and every row's tokens x V within rows_budget")
    if mode == "rows":
        if _check_head_weight(weight, bias) or _autocast_dtype(hidden, weight, bias):
            raise ValueError("mode='rows' runs the head in its inputs' dtype on plain tensors: "
                             "under autocast or with a ZeRO-3 head use mode='tiles' (the "
                             "default)")
        _check_hidden_op(hidden, weight, bias, completion_ids.reshape(-1),
                         torch.arange(completion_ids.numel(), device=hidden.device),
                         logit_scale, softcap, temperature, 1, 1)
        _check_tensor("advantages", advantages, _backend.FLOAT_DTYPES)
        loss, logp_all, ent = _RowsGMPO.apply(
            hidden, weight, bias, completion_ids, old_logps, advantages, mask, ref_logps,
            is_weights, (temperature, logit_scale, softcap), loss_kwargs, budget,
            bool(return_metrics), torch.is_grad_enabled())
        if not return_metrics:
            return loss
        with torch.no_grad():
            _, metrics = gmpo_loss(logp_all, old_logps, advantages, mask, ref_logps=ref_logps,
                                   is_weights=is_weights, return_metrics=True, **loss_kwargs)
            mf = mask.to(torch.float32)
            metrics[ENTROPY] = (ent.float() * mf).sum() / mf.sum().clamp(min=1.0)
        return loss, metrics
    # the GRPO family's per-token tensors (packed like old_logps) and its
    # entropy bonus, which takes the fused head's entropy with its gradient
    fam = {k: loss_kwargs.pop(k) for k in ("sampling_logps", "token_mask")
           if loss_kwargs.get(k) is not None}
    coef = loss_kwargs.get("entropy_coef", 0.0)
    bonus = algo_loss is grpo_loss and coef != 0
    logps, ent = _scored(hidden, weight, completion_ids, mask, bias, temperature, logit_scale,
                         softcap, return_entropy or return_metrics or bonus, tile_tokens,
                         tile_vocab, "completion_ids", *vocab)
    m, old, ref, isw, lp = mask, old_logps, ref_logps, is_weights, logps
    if bonus:
        fam["entropies"] = ent
    if packed:
        idx, _ = _packed_index(cu_seqlens, hidden.shape[0], hidden.device)
        m, old, ref, lp = _pad(mask, idx), _pad(old_logps, idx), _pad(ref_logps, idx), _pad(logps, idx)
        isw = _packed_is_weights(isw, idx, hidden.shape[0])
        fam = {k: _pad(v, idx) for k, v in fam.items()}
    loss_kwargs = dict(loss_kwargs, **fam)
    if return_metrics and loss_kwargs.get("group") is not None and algo_loss is gmpo_loss:
        # rows split over ranks: the entropy metric's two sums ride on the row
        # statistics' all-reduce (one collective in all), as in the logits path
        from . import loss as _loss
        with torch.no_grad():
            mf = mask.to(torch.float32)
            e = ent.detach().to(torch.float32)
            extra = torch.stack([torch.where(mf != 0, e * mf, torch.zeros_like(e)).sum(),
                                 mf.sum()]).to(torch.float64)
        kw = loss_kwargs
        loss, metrics, extra = _loss._gmpo(
            lp, old, advantages, m, kw["epsilon_low"], kw["epsilon_high"], kw["beta"], ref, isw,
            kw["convention"], kw["log_ratio_clamp"], kw["normalizer"], kw.get("num_rows"),
            kw["group"], extra)
        metrics = _loss._metrics_dict(metrics, _loss._METRIC_NAMES[kw["convention"]], kw["beta"],
                                      gmpo=True)
        metrics[ENTROPY] = (extra[0] / extra[1].clamp(min=1.0)).to(torch.float32)
        res = [loss, metrics]
    else:
        out = algo_loss(lp, old, advantages, m, ref_logps=ref, is_weights=isw,
                        return_metrics=return_metrics, **loss_kwargs)
        res = list(out) if return_metrics else [out]
        if return_metrics:
            with torch.no_grad():
                mf = mask.to(torch.float32)
                e = ent.detach().to(torch.float32)
                sums = torch.stack([torch.where(mf != 0, e * mf, torch.zeros_like(e)).sum(),
                                    mf.sum()])
                if loss_kwargs.get("group") is not None:   # GRPO's rows split: the
                    import torch.distributed as dist     # metric over every rank's tokens
                    sums = sums.to(torch.float64)
                    dist.all_reduce(sums, group=loss_kwargs["group"])
                res[1][ENTROPY] = (sums[0] / sums[1].clamp(min=1.0)).to(torch.float32)
    if return_entropy:
        res.append(ent)
    return res[0] if len(res) == 1 else tuple(res)


# ----------------------------------------------------------------------------
# whole-row mode: 3 GEMMs, a row block's logits held

class _RowsGMPO(torch.autograd.Function):
    """GMPO with whole rows held: per block of rows (at most ``budget`` bytes of
    logits), project the block's counted tokens over the whole vocabulary
    (1 GEMM), fold, finish the rows' log-probs, get the rows' dL/dlogp from the
    loss on those rows alone (GMPO's gradient of a row depends on that row
    only, and the batch mean scales it by rows / B), turn the held logits into
    dL/dy in place, then dH and dW (2 GEMMs). Forward does all of it; backward
    scales the stored gradients by the upstream one. The loss and metrics come
    from the whole batch's log-probs.

    ``grad``: whether grad mode was on at the call (inside forward it is off,
    and needs_input_grad ignores it): under torch.no_grad() no gradient GEMM
    runs and no (V, H) accumulator is allocated. The gradients are saved with
    save_for_backward: a second backward (retain_graph=True) reads them again,
    and autograd frees them after a backward that does not retain the graph
    (not when the loss tensor dies). Double backward raises."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, old, adv, mask, ref, isw, head, kw, budget,
                entropy, grad):
        temperature, scale, softcap = head
        B, T, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        need_h, need_w, need_b = ctx.needs_input_grad[:3] if grad else (False,) * 3
        need_b = need_b and bias is not None
        need_g = need_h or need_w or need_b
        gH = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
        gW = torch.zeros((V, H), dtype=acc, device=dev) if need_w else None
        gb = torch.zeros((V,), dtype=acc, device=dev) if need_b else None
        sd = _stat_dtype(hidden.dtype)
        logp_all = torch.zeros((B, T), dtype=sd, device=dev)
        ent_all = torch.zeros((B, T), dtype=sd, device=dev)
        counts = (mask != 0).sum(1).tolist()
        es = hidden.element_size()
        per_row_max = max(counts, default=0)
        buf = torch.empty(max(1, min(budget // (V * es), B * T) if per_row_max else 1) * V,
                          dtype=hidden.dtype, device=dev) if per_row_max else None
        cap = buf.numel() // V if buf is not None else 0
        r0 = 0
        flat_mask = mask.reshape(-1) != 0
        while r0 < B:
            r1, n = r0, 0
            while r1 < B and (r1 == r0 or n + counts[r1] <= cap):
                n += counts[r1]
                r1 += 1
            pos = torch.nonzero(flat_mask[r0 * T:r1 * T]).reshape(-1) + r0 * T
            M = pos.numel()
            if M:
                hc = _gather(hidden, pos)
                idc = ids.reshape(-1).index_select(0, pos).contiguous()
                tile = _project(buf, hc, weight, bias, 0, V)
                st = torch.zeros((M, LSE_STATE), dtype=sd, device=dev)
                st[:, 0] = -math.inf
                _fold(tile, idc, st, 0, V, scale, softcap, temperature, entropy)
                ls = torch.log(st[:, 1])
                lse = st[:, 0] + ls
                logp_all.view(-1)[pos] = st[:, 3] - lse
                ent = ls - st[:, 2] / st[:, 1]
                if entropy:
                    ent_all.view(-1)[pos] = ent
                if not need_g:
                    r0 = r1
                    continue
                # the rows' dL/dlogp from the loss on those rows alone
                lp = logp_all[r0:r1].detach().requires_grad_()
                sl = slice(r0, r1)
                with torch.enable_grad():
                    part = gmpo_loss(lp, old[sl], adv[sl], mask[sl],
                                     ref_logps=None if ref is None else ref[sl],
                                     is_weights=None if isw is None else isw[sl],
                                     **dict(kw, normalizer=kw["normalizer"] * B / (r1 - r0)))
                    (G,) = torch.autograd.grad(part, lp)
                g = G.reshape(-1).index_select(0, pos - r0 * T).to(sd).contiguous()
                _grad(tile, idc, 0, V, scale, softcap, temperature, lse, ent, g, None)
                if gH is not None:
                    dh = torch.zeros((M, H), dtype=acc, device=dev)
                    _acc_mm(dh, tile, weight)
                    gH[torch.div(pos, T, rounding_mode="floor"), pos % T] = dh.to(hidden.dtype)
                if gW is not None:
                    if dev.type == "cpu":
                        _acc_mm(gW.t(), hc.t(), tile)
                    else:
                        _acc_mm(gW, tile.t(), hc)
                if gb is not None:
                    gb += tile.sum(0, dtype=acc)
            r0 = r1
        with torch.no_grad():
            loss = gmpo_loss(logp_all, old, adv, mask, ref_logps=ref, is_weights=isw, **kw)
        ctx.save_for_backward(gH, None if gW is None else gW.to(weight.dtype),
                              None if gb is None else gb.to(bias.dtype))
        ctx.mark_non_differentiable(logp_all, ent_all)
        return loss, logp_all, ent_all

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_ent):
        if torch.is_grad_enabled():   # create_graph=True: say so (as _ShardHead)
            raise RuntimeError("gmpo_ext: mode='rows' supports one backward pass; double "
                               "backward (create_graph=True, Hessians) is not implemented")
        grads = ctx.saved_tensors
        if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            # loss.backward(): the saved gradients themselves, no second (V, H)
            # copy (autograd takes them over once it has freed the saved ones)
            return (*grads,) + (None,) * 11
        return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads) \
            + (None,) * 11


def _rows_fit(hidden, weight, mask, budget):
    """Whether every row's counted tokens fit the whole-row budget."""
    if hidden.dim() != 3:
        return False
    longest = int((mask != 0).sum(1).max()) if mask.numel() else 0
    return longest * weight.shape[0] * hidden.element_size() <= budget


def gmpo_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: Optional[float] = None,
    epsilon_low: float = 0.4,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    ref_logps: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    convention: str = "trl",
    log_ratio_clamp: Optional[float] = None,
    normalizer: float = 1.0,
    cu_seqlens: Optional[Tensor] = None,
    return_metrics: bool = False,
    return_entropy: bool = False,
    tile_tokens: Optional[int] = None,
    tile_vocab: Optional[int] = None,
    mode: str = "auto",
    num_rows: Optional[int] = None,
    group=None,
    vocab_group=None,
    vocab_start: int = 0,
    vocab_size: Optional[int] = None,
):
    """GMPO's loss (arXiv 2507.20673) from the policy's last hidden states, the LM head fused.

    ``gmpo_loss(linear_logps(hidden, weight, completion_ids, ...), ...)``: the
    (N, V) logits are never held (see :func:`linear_logps`); only the tokens
    the mask counts are projected. Gradients flow to hidden, weight and bias
    (each only when it requires grad).

    Args:
        hidden: (B, T, H) aligned with completion_ids (position t predicts
            token t; any strides: a slice of the backbone's (B, P + T, H)
            output is read in place), or packed (N, H) with completion_ids,
            old_logps, mask (N,), advantages (B,) and ``cu_seqlens`` (B + 1,).
        weight: (V, H) LM head weight (tied or not); bias: optional (V,).
        completion_ids: (B, T) or (N,) int64 / int32.
        old_logps, advantages, mask, epsilon_low, epsilon_high, beta, ref_logps,
            is_weights, convention, log_ratio_clamp, normalizer: as in
            :func:`gmpo_ext.gmpo_loss` (packed: per-token tensors (N,),
            advantages (B,); is_weights per token as (N,) or per row as
            (B, 1) only: a (B,) is_weights raises, since it would read per
            token whenever N == B).
        temperature, logit_scale, final_logit_softcapping: TRL's transform of
            the logits: z = s (h W^T + b); z = c tanh(z / c); z / temperature.
        return_metrics: also return gmpo_loss's metrics plus ``entropy`` (the
            mask-weighted mean entropy of the counted tokens).
        return_entropy: also return the per-token entropy (token shape,
            differentiable: an entropy bonus gets its gradient).
        tile_tokens, tile_vocab: the tile (default :func:`default_tiles`).
        num_rows, group: as in :func:`gmpo_ext.gmpo_loss` (the whole batch's
            row count; rows split over the ranks of a process group, one
            all-reduce of the row statistics). Tiles mode only.
        vocab_group, vocab_start, vocab_size: the head's vocabulary sharded
            over the ranks of a process group, as in :func:`linear_logps`
            (weight (V, H) and bias (V,) are this rank's rows; every rank
            gets the whole vocabulary's loss). With ``group`` too: rows split
            over one group, the vocabulary over another. Tiles mode only.
        mode: "tiles" (token tiles, backward recomputes: 4 GEMMs, one tile of
            memory; the default, "auto") or "rows" (whole rows held: each
            block of rows' T x V logits projected once, its G_t finished, dH
            and dW at once: 3 GEMMs, all in forward; needs padded (B, T, H)
            hidden, no entropy gradient, and every row's counted tokens x V
            within two default tiles (256 MiB); see the module doc for why it
            is not the default).

    Returns:
        loss, then metrics (``return_metrics``), then entropy
        (``return_entropy``): a tuple when more than the loss is asked for.
    """
    return _from_hidden(
        gmpo_loss, hidden, weight, completion_ids, old_logps, advantages, mask, bias,
        temperature, logit_scale, final_logit_softcapping, cu_seqlens, ref_logps, is_weights,
        return_metrics, return_entropy, tile_tokens, tile_vocab, mode,
        dict(epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
             convention=convention, log_ratio_clamp=log_ratio_clamp, normalizer=normalizer,
             **({} if num_rows is None else dict(num_rows=num_rows)),
             **({} if group is None else dict(group=group))),
        vocab=(vocab_group, vocab_start, vocab_size))


def grpo_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: Optional[float] = None,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    ref_logps: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    loss_type: str = "dapo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    normalizer: float = 1.0,
    cu_seqlens: Optional[Tensor] = None,
    return_metrics: bool = False,
    return_entropy: bool = False,
    tile_tokens: Optional[int] = None,
    tile_vocab: Optional[int] = None,
    mode: str = "auto",
    num_rows: Optional[int] = None,
    group=None,
    vocab_group=None,
    vocab_start: int = 0,
    vocab_size: Optional[int] = None,
    importance_sampling_level: str = "token",
    delta: Optional[float] = None,
    off_policy_mask_threshold: Optional[float] = None,
    sampling_logps: Optional[Tensor] = None,
    use_bias_correction_kl: bool = False,
    token_mask: Optional[Tensor] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    entropy_coef: float = 0.0,
    convention: str = "trl",
    loss_agg_mode: Optional[str] = None,
    clip_ratio_c: Optional[float] = None,
    global_batch_info=None,
):
    """TRL's GRPO loss family (:func:`gmpo_ext.grpo_loss`, every loss type and
    option) from hidden states, the LM head fused, for A/B runs against
    :func:`gmpo_loss_from_hidden` (same layouts, head options, returns,
    ``group``, ``num_rows`` and ``vocab_group``). ``sampling_logps`` and
    ``token_mask`` are laid out like ``old_logps`` (packed (N,) with
    ``cu_seqlens``); with ``entropy_coef != 0`` the entropy bonus uses the
    fused head's per-token entropy, its gradient flowing into hidden, weight
    and bias.

    ``convention="verl"`` with ``loss_agg_mode``, ``clip_ratio_c`` and
    ``global_batch_info``: verl's policy losses (``loss_type`` "vanilla",
    "gspo", "cispo", "sapo"), exactly as :func:`gmpo_ext.grpo_loss` with
    ``convention="verl"`` on the fused head's log-probs; ``vocab_group``
    works with it as with TRL's convention. Packed rows (``cu_seqlens``) are
    unpacked to (B, T_max) padded rows for the loss, which every aggregation
    but one leaves unchanged; "seq-mean-token-sum-norm" divides by verl's
    horizon (``mask.shape[-1]`` of padded rows), which packed rows do not
    have: there ``global_batch_info["loss_scale_factor"]`` is required.
    Packed advantages are one per row, (B,) or (B, 1). TRL's options
    (``beta``, ``entropy_coef``, ``num_items_in_batch``, ``num_rows``,
    ``group``, ...) raise, naming the argument: verl's data parallelism goes
    through ``global_batch_info``. ``return_metrics``: verl's metrics plus
    ``entropy``; ``return_entropy`` gives the per-token entropy with its
    gradient, for verl's entropy bonus outside the policy loss."""
    if convention == "verl":
        # before the head projects anything: the options verl does not take
        # raise, naming the argument, and packed rows need an explicit horizon
        _loss._reject_trl_options(
            beta=beta, ref_logps=ref_logps, importance_sampling_level=importance_sampling_level,
            delta=delta, off_policy_mask_threshold=off_policy_mask_threshold,
            sampling_logps=sampling_logps, use_bias_correction_kl=use_bias_correction_kl,
            token_mask=token_mask, entropy_coef=entropy_coef,
            max_completion_length=max_completion_length,
            num_items_in_batch=num_items_in_batch, num_rows=num_rows, group=group)
        _loss._check_gbi_kind(global_batch_info)
        if (cu_seqlens is not None
                and _loss._verl_agg_mode(loss_type, loss_agg_mode) == "seq-mean-token-sum-norm"
                and _loss._gbi_value(global_batch_info, "loss_scale_factor") is None):
            raise ValueError("cu_seqlens with convention='verl' and loss_agg_mode="
                             "'seq-mean-token-sum-norm' needs global_batch_info"
                             "['loss_scale_factor']: its default, verl's horizon "
                             "mask.shape[-1], does not exist for packed rows (pass the padded "
                             "width verl would use, e.g. the maximum response length)")
    return _from_hidden(
        grpo_loss, hidden, weight, completion_ids, old_logps, advantages, mask, bias,
        temperature, logit_scale, final_logit_softcapping, cu_seqlens, ref_logps, is_weights,
        return_metrics, return_entropy, tile_tokens, tile_vocab, mode,
        dict(epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
             loss_type=loss_type, max_completion_length=max_completion_length,
             num_items_in_batch=num_items_in_batch, normalizer=normalizer,
             importance_sampling_level=importance_sampling_level, delta=delta,
             off_policy_mask_threshold=off_policy_mask_threshold, sampling_logps=sampling_logps,
             use_bias_correction_kl=use_bias_correction_kl, token_mask=token_mask,
             sapo_temperature_pos=sapo_temperature_pos,
             sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos,
             vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
             vespo_lambda_neg=vespo_lambda_neg, entropy_coef=entropy_coef,
             **({} if num_rows is None else dict(num_rows=num_rows)),
             **({} if group is None else dict(group=group)),
             convention=convention, loss_agg_mode=loss_agg_mode, clip_ratio_c=clip_ratio_c,
             global_batch_info=global_batch_info),
        vocab=(vocab_group, vocab_start, vocab_size))
