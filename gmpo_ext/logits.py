"""The fused path from logits: per-token log-probs (and entropy) straight from a
causal LM's (B, T, V) logits, and GMPO's loss on top of them.

Three custom ops over the C kernels of csrc/cpu/logits_cpu.c (and
csrc/cuda/logits_cuda.cu):

  gmpo_ext::logits_fwd(logits, ids, mask, temperature, entropy, inplace_backward)
      -> (logp, entropy, lse), each (B, T) float32
  gmpo_ext::logits_bwd(grad_logp, grad_entropy, logits, ids, mask, lse, entropy,
                       temperature) -> grad (B, TL, V) in the logits' dtype
  gmpo_ext::logits_bwd_(logits!, grad_logp, grad_entropy, ids, mask, lse, entropy,
                        temperature) -> ()   the same, written into the logits

Forward reads each row of logits once and keeps only per-token fp32 values;
backward reads it once more and writes the gradient once (in the logits' own
buffer with ``inplace_backward=True``). The GMPO part is gmpo_ext.gmpo_loss on
the per-token log-probs, so autograd chains the loss's backward (dL/dlogp,
(B, T)) into the logits backward.

Math per token (x = logits / temperature): lse = logsumexp(x), logp = x[id] -
lse, entropy = lse - sum softmax(x) * x; d/dx = G (onehot(id) - p) - Gh p
(log p + H), divided by the temperature for d/dlogits.
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op infers
# the schema from the annotation objects themselves and rejects strings
# ('Tensor'), so the op signatures' annotations must be evaluated.

import inspect
import math
import numbers
import re
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from . import loss as _loss
from .loss import _check_tensor

__all__ = ["gmpo_loss_from_logits", "grpo_loss_from_logits", "selective_logps"]

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int64, torch.int32)
_MASK_DTYPES = tuple(_backend.DTYPE_CODES)
INVALID_IDS = "gmpo/invalid_ids"
ENTROPY = "entropy"
# grpo_loss's TRL-only keywords (convention="verl" rejects them before the kernels run)
_TRL_ONLY = frozenset(inspect.signature(_loss._reject_trl_options).parameters)

# torch 2.4's AOTAutograd (torch.compile's training graphs) rejects a backward
# that writes into a graph input which requires grad ("Found a graph input that
# requires_grad and was mutated in the backward"); torch 2.5 traces it (pytorch
# PR 128409; 2.4.0 and 2.13.0 tested here). On older torch, inplace_backward
# under functionalization (the tensors are FunctionalTensors) takes the out of
# place backward instead: the same values in a new buffer, as for unsafe logits.
_TORCH_MINOR = tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
if _TORCH_MINOR < (2, 5):
    from torch._subclasses.functional_tensor import FunctionalTensor as _FunctionalTensor
else:
    _FunctionalTensor = ()   # isinstance(x, ()) is False: nothing to avoid


# ----------------------------------------------------------------------------
# views: (data_ptr, dtype code, stride_b, stride_t, extent), never a copy

def _view(t: Optional[Tensor]):
    if t is None:
        return _backend.ABSENT
    return (t.data_ptr(), _backend.DTYPE_CODES[t.dtype], t.stride(0), t.stride(1),
            _backend.span(t))


def _common(logits, ids, mask, temperature, ids_name="ids"):
    mod, code, stream = _backend.backend(logits.device)
    B, TL, V = logits.shape
    T = ids.shape[1]
    return mod, (code, stream, B, T, TL, V, _view(logits), _view(ids), _view(mask),
                 float(temperature), torch.get_num_threads(), ids_name)


def _runnable(logits):
    if logits.device.type not in ("cpu", "cuda"):
        raise ValueError(f"logits is on {logits.device}; the kernels run on cpu and cuda tensors")


def _forward_outputs(logits, ids, entropy):
    """The forward kernels' three (B, T) fp32 outputs on the logits' device; the
    entropy zeros when it is not computed."""
    f32 = dict(dtype=torch.float32, device=logits.device)
    shape = tuple(ids.shape)
    return (torch.empty(shape, **f32),
            torch.empty(shape, **f32) if entropy else torch.zeros(shape, **f32),
            torch.empty(shape, **f32))


def _forward(logits, ids, mask, temperature, entropy, ids_name="ids"):
    _check_logits(logits, ids, mask, ids_name)
    _runnable(logits)
    logits, mask = _backend.resolved(logits), _backend.resolved(mask)
    logp, ent, lse = _forward_outputs(logits, ids, entropy)
    mod, args = _common(logits, ids, mask, temperature, ids_name)
    with _backend._on_device(logits.device):
        mod.logits_forward(*args, _backend.buf(logp),
                           _backend.buf(ent) if entropy else (0, 0), _backend.buf(lse))
    return logp, ent, lse


def _forward_shard(logits, ids, mask, temperature, entropy, vocab_start, vocab_size,
                   ids_name="ids"):
    """A vocabulary shard's state (gmpo_logits.h): (ls_r = log sum exp(x - m_r),
    the entropy of the shard's softmax, m_r = the shard's max of x), each
    (B, T) float32; merged by distributed.py."""
    _check_logits(logits, ids, mask, ids_name)
    _runnable(logits)
    logits, mask = _backend.resolved(logits), _backend.resolved(mask)
    x, ent, lse = _forward_outputs(logits, ids, entropy)
    mod, args = _common(logits, ids, mask, temperature, ids_name)
    with _backend._on_device(logits.device):
        mod.logits_forward_shard(*args, _backend.buf(x),
                                 _backend.buf(ent) if entropy else (0, 0), _backend.buf(lse),
                                 int(vocab_start), int(vocab_size))
    return x, ent, lse


def _check_saved(name, t, B, T, dev):
    """lse / entropy: the forward's contiguous (B, T) float32 outputs."""
    _backend.check_tensor(name, t, (torch.float32,))
    if tuple(t.shape) != (B, T) or not t.is_contiguous():
        raise ValueError(f"{name} must be the forward's contiguous {(B, T)} float32 output, got "
                         f"shape {tuple(t.shape)}, strides {t.stride()}")
    _backend.check_device(name, t, dev, "logits")


def _check_grad_out(name, t, B, T, dev):
    if t is None:
        return
    _backend.check_tensor(name, t, _backend.FLOAT_DTYPES)
    if tuple(t.shape) != (B, T):
        raise ValueError(f"{name} must have the shape of the ids {(B, T)}, got {tuple(t.shape)}")
    _backend.check_device(name, t, dev, "logits")


def _disjoint(t) -> bool:
    """No two elements of t share memory (the C core's test for a buffer that
    is written: ordered by stride, each axis steps past those below it)."""
    if t.numel() == 0:
        return True
    span = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride < span:
            return False
        span = size * stride
    return True


def _shares_memory(a, b) -> bool:
    if b is None or b.numel() == 0 or a.numel() == 0:
        return False
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except RuntimeError:
        # fake tensors while tracing have no memory: the op checks again when it runs
        return False


def _inplace_ok(logits, *read) -> bool:
    """Whether the gradient can be written into the logits' buffer: no pending
    negation, rows that do not overlap (an expand or as_strided view would have
    one row's gradient overwrite logits another row still reads), and no other
    input of the backward living in the same memory."""
    return (not logits.is_neg() and _disjoint(logits)
            and not any(_shares_memory(logits, t) for t in read))


def _backward(grad, grad_logp, grad_entropy, logits, ids, mask, lse, entropy, temperature,
              vocab=None):
    _check_logits(logits, ids, mask, "ids")
    _runnable(logits)
    B, T = ids.shape
    dev = logits.device
    _check_grad_out("grad_logp", grad_logp, B, T, dev)
    _check_grad_out("grad_entropy", grad_entropy, B, T, dev)
    _check_saved("lse", lse, B, T, dev)
    _check_saved("entropy", entropy, B, T, dev)
    if grad is logits:
        if not _inplace_ok(logits, grad_logp, grad_entropy, ids, mask, lse, entropy):
            raise ValueError("logits cannot receive its gradient in place: it has the negative "
                             "bit set, its positions overlap in memory (expand, as_strided), or "
                             "another argument shares its memory; use logits_bwd")
    else:
        logits = _backend.resolved(logits)
    mask, grad_logp, grad_entropy = (_backend.resolved(mask), _backend.resolved(grad_logp),
                                     _backend.resolved(grad_entropy))
    mod, args = _common(logits, ids, mask, temperature)
    if grad_logp is not None and grad_logp.dtype not in _backend.FLOAT_DTYPES:
        grad_logp = grad_logp.to(torch.float32)
    with _backend._on_device(logits.device):
        if vocab is None:
            mod.logits_backward(*args, _backend.buf(lse), _backend.buf(entropy),
                                _view(grad_logp), _view(grad_entropy), _view(grad))
        else:   # a vocabulary shard: lse and entropy are the merged ones
            mod.logits_backward_shard(*args, _backend.buf(lse), _backend.buf(entropy),
                                      _view(grad_logp), _view(grad_entropy), _view(grad),
                                      int(vocab[0]), int(vocab[1]))


# ----------------------------------------------------------------------------
# custom ops

@torch.library.custom_op("gmpo_ext::logits_fwd", mutates_args=())
def logits_fwd(
    logits: Tensor,
    ids: Tensor,
    mask: Optional[Tensor],
    temperature: float,
    entropy: bool,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(logits, ids, mask, temperature, entropy)


@logits_fwd.register_fake
def _(logits, ids, mask, temperature, entropy, inplace_backward):
    _check_logits(logits, ids, mask, "ids")
    shape = tuple(ids.shape)
    return (logits.new_empty(shape, dtype=torch.float32),
            logits.new_empty(shape, dtype=torch.float32),
            logits.new_empty(shape, dtype=torch.float32))


@torch.library.custom_op("gmpo_ext::logits_bwd", mutates_args=())
def logits_bwd(
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    logits: Tensor,
    ids: Tensor,
    mask: Optional[Tensor],
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
) -> Tensor:
    _check_logits(logits, ids, mask, "ids")
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward(grad, grad_logp, grad_entropy, logits, ids, mask, lse, entropy, temperature)
    return grad


@logits_bwd.register_fake
def _(grad_logp, grad_entropy, logits, ids, mask, lse, entropy, temperature):
    _check_logits(logits, ids, mask, "ids")
    return logits.new_empty(logits.shape)


@torch.library.custom_op("gmpo_ext::logits_bwd_", mutates_args=("logits",))
def logits_bwd_(
    logits: Tensor,
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    ids: Tensor,
    mask: Optional[Tensor],
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
) -> None:
    _backward(logits, grad_logp, grad_entropy, logits, ids, mask, lse, entropy, temperature)


@logits_bwd_.register_fake
def _(logits, grad_logp, grad_entropy, ids, mask, lse, entropy, temperature):
    _check_logits(logits, ids, mask, "ids")
    return None


def _setup_context(ctx, inputs, output):
    logits, ids, mask, temperature, _, inplace_backward = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, ids, mask, lse, entropy)
    ctx.temperature = temperature
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)   # an unused entropy stays None: no zeros to read


def _logits_backward(ctx, grad_logp, grad_entropy, grad_lse):
    if not ctx.needs_input_grad[0]:
        return (None,) * 6
    logits, ids, mask, lse, entropy = ctx.saved_tensors
    # in place only where it is safe (see _inplace_ok); otherwise out of place,
    # the same values in a new buffer
    if (ctx.inplace_backward and not isinstance(logits, _FunctionalTensor)
            and _inplace_ok(logits, grad_logp, grad_entropy, ids, mask)):
        logits_bwd_(logits, grad_logp, grad_entropy, ids, mask, lse, entropy, ctx.temperature)
        grad = logits
    else:
        grad = logits_bwd(grad_logp, grad_entropy, logits, ids, mask, lse, entropy,
                          ctx.temperature)
    return grad, None, None, None, None, None


logits_fwd.register_autograd(_logits_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# argument checks

def _check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def _check_logits(logits, ids, mask, ids_name):
    """Shapes, dtypes, devices, strides; returns (B, T)."""
    _check_tensor("logits", logits, LOGITS_DTYPES)
    _check_tensor(ids_name, ids, ID_DTYPES)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V) or (B, T + 1, V), got "
                         f"{tuple(logits.shape)}")
    if ids.dim() != 2:
        raise ValueError(f"{ids_name} must have shape (B, T), got {tuple(ids.shape)}")
    B, T = ids.shape
    if logits.shape[0] != B or logits.shape[1] not in (T, T + 1):
        raise ValueError(f"logits must have shape (B, T, V) or (B, T + 1, V) for {ids_name} of "
                         f"shape {(B, T)}, got {tuple(logits.shape)}")
    if logits.shape[2] < 1:
        raise ValueError("logits: the vocabulary axis is empty")
    if logits.stride(2) != 1 and logits.shape[2] > 1 and logits.numel() > 0:
        raise ValueError("logits must have unit stride on the vocabulary axis (it is never "
                         f"copied); got strides {tuple(logits.stride())}")
    if mask is not None:
        _check_tensor("mask", mask, _MASK_DTYPES)
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must have the shape of {ids_name} {(B, T)}, got "
                             f"{tuple(mask.shape)}")
    dev = logits.device
    if dev.type not in ("cpu", "cuda", "meta"):   # meta: shapes only (the fake kernels)
        raise ValueError(f"logits is on {dev}; gmpo_ext runs on cpu and cuda tensors")
    for name, t in ((ids_name, ids), ("mask", mask)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but logits is on {dev}; all inputs "
                             "must be on the same device")
    return B, T


def _invalid_ids(ids, mask, V):
    """Number of counted tokens whose id is outside [0, V) (a 0-d tensor, no sync)."""
    bad = (ids < 0) | (ids >= V)
    if mask is not None:
        bad = bad & (mask != 0)
    return bad.sum()


def _validate(ids, mask, V, ids_name):
    n = int(_invalid_ids(ids, mask, V))   # host sync: validate=True asks for it
    if n:
        raise IndexError(f"{ids_name}: {n} token id(s) outside [0, {V}), the vocabulary of "
                         "the logits")


# ----------------------------------------------------------------------------
# public API

def selective_logps(
    logits: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    mask: Optional[Tensor] = None,
    inplace_backward: bool = False,
    validate: bool = False,
    vocab_group=None,
    vocab_start: int = 0,
    vocab_size: Optional[int] = None,
):
    """Log-probabilities of ``ids`` under ``softmax(logits / temperature)``, fused.

    The same forward kernel as :func:`gmpo_loss_from_logits`: one read of the
    logits, nothing (B, T, V)-sized allocated. Use it under ``torch.no_grad()``
    for the old-policy and reference log-probs; it is differentiable as well
    (the gradient of the logits is written in one pass).

    Args:
        logits: (B, T, V), or (B, T + 1, V) as a causal LM returns them with
            ``logits_to_keep = T + 1`` (the last position is ignored and gets a
            zero gradient), or (N, V) with ids (N,). float32, bfloat16 or
            float16, unit stride on V, any other strides; never copied.
        ids: (B, T) (or (N,)) int64 or int32 token ids in [0, V).
        temperature: the logits are divided by it (> 0).
        return_entropy: also return the entropy of each position's
            distribution (differentiable too).
        mask: optional (B, T); tokens with mask == 0 are skipped (logp and
            entropy 0, zero gradient) and their ids are not checked.
        inplace_backward: write the gradient into the logits' buffer (see
            :func:`gmpo_loss_from_logits` for when that is safe).
        validate: check the ids against V before the kernels run, with a host
            sync, and raise IndexError (what the CPU kernels always do; on CUDA
            this turns the NaN flag into an error).
        vocab_group: a torch.distributed process group over which the
            vocabulary is split (tensor parallelism): ``logits`` (B, T, V/P)
            hold the entries [vocab_start, vocab_start + V/P) of a vocabulary
            of ``vocab_size`` (default: the sum of the shards' sizes, equal
            or not, gathered from the ranks); ids are
            global. Every rank gets the full log-probs (and entropy) after
            two all-reduces of O(B*T) float32 values, and the gradient of its
            own shard (see gmpo_ext.distributed).
        vocab_start, vocab_size: this rank's shard, with vocab_group.

    An id outside [0, V): IndexError on CPU, before any compute; on CUDA the
    token's logp is NaN (no out-of-bounds read).

    Returns:
        logps (B, T) float32, or ``(logps, entropy)``.
    """
    temperature = _check_temperature(temperature)
    flat = isinstance(logits, Tensor) and logits.dim() == 2
    if flat:
        if not isinstance(ids, Tensor) or ids.dim() != 1:
            raise ValueError("ids must have shape (N,) for logits of shape (N, V)")
        logits, ids = logits.unsqueeze(0), ids.unsqueeze(0)
        mask = mask.unsqueeze(0) if isinstance(mask, Tensor) and mask.dim() == 1 else mask
    _check_logits(logits, ids, mask, "ids")
    if vocab_group is not None:
        from . import distributed
        vocab_start, vocab_size = distributed.check_vocab(logits.shape[-1], vocab_group,
                                                          vocab_start, vocab_size,
                                                          device=logits.device)
        if validate:
            _validate(ids, mask, vocab_size, "ids")
        logp, ent, _ = distributed.shard_logits(logits, ids, mask, temperature,
                                                bool(return_entropy), bool(inplace_backward),
                                                vocab_start, vocab_size, vocab_group)
    else:
        if validate:
            _validate(ids, mask, logits.shape[2], "ids")
        logp, ent, _ = logits_fwd(logits, ids, mask, temperature, bool(return_entropy),
                                  bool(inplace_backward))
    if flat:
        logp, ent = logp.squeeze(0), ent.squeeze(0)
    return (logp, ent) if return_entropy else logp


def _loss_inputs(logits, completion_ids, mask, temperature, vocab_group, vocab_start,
                 vocab_size, validate):
    """The checks the loss-from-logits functions share: (temperature, B, T, V,
    vocab_start), V the whole vocabulary when the logits are a vocab_group shard."""
    temperature = _check_temperature(temperature)
    B, T = _check_logits(logits, completion_ids, mask, "completion_ids")
    if mask is None:
        raise TypeError("mask must be a torch.Tensor, got None")
    V = logits.shape[2]
    if vocab_group is not None:
        from . import distributed
        vocab_start, V = distributed.check_vocab(V, vocab_group, vocab_start, vocab_size,
                                                 device=logits.device)
    if validate:
        _validate(completion_ids, mask, V, "completion_ids")
    return temperature, B, T, V, vocab_start


def gmpo_loss_from_logits(
    logits: Tensor,
    completion_ids: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    epsilon_low: float = 0.4,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    ref_logps: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    convention: str = "trl",
    log_ratio_clamp: Optional[float] = None,
    normalizer: float = 1.0,
    num_rows: Optional[int] = None,
    inplace_backward: bool = False,
    validate: bool = False,
    group=None,
    vocab_group=None,
    vocab_start: int = 0,
    vocab_size: Optional[int] = None,
    return_metrics: bool = False,
):
    """GMPO's loss (arXiv 2507.20673) straight from the policy's logits, fused.

    ``gmpo_loss(selective_logps(logits, completion_ids, temperature), ...)``
    without ever materialising anything of size (B, T, V) but the gradient:
    forward reads the logits once (log-sum-exp, target logit and entropy in
    one pass) and keeps per-token float32 values; backward reads them once
    more and writes the gradient once. Masked tokens are never read: their
    gradient rows are written as zeros.

    Args:
        logits: the policy's logits for the completion: (B, T + 1, V) as TRL
            gets them with ``logits_to_keep = T + 1`` (pass the model's tensor
            itself: its last position is ignored and gets a zero gradient row;
            a slice view would make autograd allocate a second full-size
            buffer), or (B, T, V) already aligned. float32, bfloat16 or
            float16; unit stride on V, any other strides; never copied.
        completion_ids: (B, T) int64 or int32, the sampled tokens.
        old_logps, advantages, mask: as in :func:`gmpo_ext.gmpo_loss`
            (old_logps (B, T) computed with the same temperature).
        temperature: the logits are divided by it (TRL's sampling temperature).
        epsilon_low, epsilon_high, beta, ref_logps, is_weights, convention,
            log_ratio_clamp, normalizer, num_rows, group: as in
            :func:`gmpo_ext.gmpo_loss` (group: rows split over ranks; the
            entropy and invalid-id metrics ride on the same all-reduce).
        vocab_group, vocab_start, vocab_size: the vocabulary split over ranks,
            as in :func:`selective_logps` (may be combined with group).
        inplace_backward: write the gradient into the logits' buffer instead of
            a new one (peak memory about the logits alone). Safe when nothing
            else reads the logits after this loss's backward: true of a plain
            ``lm_head`` (a linear layer's backward needs its input and weight,
            not its output) with the logits used by this loss only. Not safe
            when another loss or metric holds the same logits for its own
            backward (autograd raises: the saved tensor was modified), nor
            when you read the logits after ``backward()``: they hold the
            gradient then. Logits whose positions overlap in memory
            (``expand``, ``as_strided``), with a pending negation, or
            sharing memory with the ids or mask get the gradient out of place
            (same values, a new buffer).
        validate: check the ids against V before the kernels run, with a host
            sync, and raise IndexError (the CPU kernels always check, before any
            compute; on CUDA this turns the NaN flag into an error). Not for
            torch.compile(fullgraph=True): the sync breaks the graph.
        return_metrics: also return the metrics of :func:`gmpo_ext.gmpo_loss`
            plus ``entropy`` (mean entropy of the counted tokens, weighted by
            the mask, divided by max(sum of mask, 1)) and
            ``gmpo/invalid_ids`` (counted tokens whose id is outside [0, V):
            on CUDA such a token's logp is NaN and its row's loss non-finite).

    Returns:
        The 0-d loss (float32), or ``(loss, metrics)``.
    """
    temperature, B, T, V, vocab_start = _loss_inputs(
        logits, completion_ids, mask, temperature, vocab_group, vocab_start, vocab_size, validate)
    try:
        if vocab_group is not None:
            from . import distributed
            logps, entropy, _ = distributed.shard_logits(
                logits, completion_ids, mask, temperature, bool(return_metrics),
                bool(inplace_backward), vocab_start, V, vocab_group, "completion_ids")
        else:
            logps, entropy, _ = logits_fwd(logits, completion_ids, mask, temperature,
                                           bool(return_metrics), bool(inplace_backward))
    except IndexError as e:   # the kernel names its argument "ids"
        msg = str(e)
        raise IndexError("completion_ids" + msg[3:] if msg.startswith("ids:") else msg) from None
    extra = None
    if return_metrics:
        with torch.no_grad():
            m = mask.to(torch.float32)
            ent = entropy.detach()
            # sums, so that with group= they ride on the row sums' all-reduce
            extra = torch.stack([
                torch.where(m != 0, ent * m, torch.zeros_like(ent)).sum().to(torch.float64),
                m.sum().to(torch.float64),
                _invalid_ids(completion_ids, mask, V).to(torch.float64)])
    loss, metrics, extra = _loss._gmpo(logps, old_logps, advantages, mask, epsilon_low,
                                       epsilon_high, beta, ref_logps, is_weights, convention,
                                       log_ratio_clamp, normalizer, num_rows, group, extra)
    if not return_metrics:
        return loss
    metrics = _loss._metrics_dict(metrics, _loss._METRIC_NAMES[convention], beta, gmpo=True)
    metrics[ENTROPY] = (extra[0] / extra[1].clamp(min=1.0)).to(torch.float32)
    metrics[INVALID_IDS] = extra[2].to(torch.float32)
    return loss, metrics


def grpo_loss_from_logits(
    logits: Tensor,
    completion_ids: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    validate: bool = False,
    vocab_group=None,
    vocab_start: int = 0,
    vocab_size: Optional[int] = None,
    return_metrics: bool = False,
    convention: str = "trl",
    loss_agg_mode: Optional[str] = None,
    clip_ratio_c: Optional[float] = None,
    global_batch_info=None,
    **loss_kwargs,
):
    """TRL's GRPO loss family (:func:`gmpo_ext.grpo_loss`) straight from the
    policy's logits, fused.

    ``grpo_loss(selective_logps(logits, completion_ids, temperature), ...)``:
    the logits are read once forward and once backward as in
    :func:`gmpo_loss_from_logits` (same shapes: logits (B, T, V) or (B, T+1, V),
    completion_ids (B, T); same ``temperature``, ``inplace_backward``,
    ``validate``, ``vocab_group`` / ``vocab_start`` / ``vocab_size``). Every
    keyword of :func:`gmpo_ext.grpo_loss` passes through ``loss_kwargs``
    (loss_type, importance_sampling_level, delta, off_policy_mask_threshold,
    sampling_logps, use_bias_correction_kl, token_mask, the sapo and vespo
    parameters, entropy_coef, group, ...) except ``entropies``: with
    ``entropy_coef != 0`` the fused logits kernel computes the per-token
    entropy in the same pass, and the entropy bonus's gradient flows into the
    logits through the same backward. ``return_metrics`` adds ``entropy`` and
    ``gmpo/invalid_ids`` to grpo_loss's metrics.

    ``convention="verl"`` with ``loss_agg_mode``, ``clip_ratio_c`` and
    ``global_batch_info``: verl's policy losses (``loss_type`` "vanilla",
    "gspo", "cispo", "sapo"), exactly as :func:`gmpo_ext.grpo_loss` with
    ``convention="verl"`` on the log-probs of these logits (padded rows,
    verl's layout: the horizon of "seq-mean-token-sum-norm" is T).
    ``vocab_group`` works with it as with TRL's convention. TRL's options
    (``beta``, ``entropy_coef``, ``num_items_in_batch``, ``num_rows``,
    ``group``, ...) raise before the logits are read, naming the argument:
    verl's data parallelism goes through ``global_batch_info``.
    ``return_metrics``: verl's metrics plus ``entropy`` (the mask-weighted
    mean entropy of the counted tokens) and ``gmpo/invalid_ids``.
    """
    if "entropies" in loss_kwargs:
        raise TypeError("grpo_loss_from_logits computes the entropies from the logits; "
                        "do not pass entropies")
    verl = convention == "verl"
    if verl:   # before the logits are read: TRL's options raise, naming the argument
        _loss._reject_trl_options(**{k: v for k, v in loss_kwargs.items() if k in _TRL_ONLY})
    temperature, B, T, V, vocab_start = _loss_inputs(
        logits, completion_ids, mask, temperature, vocab_group, vocab_start, vocab_size, validate)
    coef = loss_kwargs.get("entropy_coef", 0.0)
    want_entropy = bool(return_metrics) or (not isinstance(coef, bool) and coef != 0)
    try:
        if vocab_group is not None:
            from . import distributed
            logps, entropy, _ = distributed.shard_logits(
                logits, completion_ids, mask, temperature, want_entropy,
                bool(inplace_backward), vocab_start, V, vocab_group, "completion_ids")
        else:
            logps, entropy, _ = logits_fwd(logits, completion_ids, mask, temperature,
                                           want_entropy, bool(inplace_backward))
    except IndexError as e:   # the kernel names its argument "ids"
        msg = str(e)
        raise IndexError("completion_ids" + msg[3:] if msg.startswith("ids:") else msg) from None
    out = _loss.grpo_loss(logps, old_logps, advantages, mask,
                          entropies=entropy if want_entropy and not verl else None,
                          return_metrics=return_metrics, convention=convention,
                          loss_agg_mode=loss_agg_mode, clip_ratio_c=clip_ratio_c,
                          global_batch_info=global_batch_info, **loss_kwargs)
    if not return_metrics:
        return out
    loss, metrics = out
    if verl:   # grpo_loss's entropy metric comes with TRL's entropy bonus only
        with torch.no_grad():
            m = mask.to(torch.float32)
            e = torch.where(m != 0, entropy.detach() * m, torch.zeros_like(m))
            metrics[ENTROPY] = e.sum() / m.sum().clamp(min=1.0)
    metrics[INVALID_IDS] = _invalid_ids(completion_ids, mask, V).to(torch.float32)
    return loss, metrics
