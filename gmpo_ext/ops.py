"""torch.library custom ops over the C core, with fake kernels and autograd.

Two ops per loss family, shared by GMPO and GRPO (``algo`` selects):

  gmpo_ext::loss_fwd(...) -> (loss 0-d, metrics (7,), rows (B+1, 10) fp64)
  gmpo_ext::loss_bwd(grad_loss, rows, ...) -> grad (B, T) in logps' dtype

Each op checks its arguments itself (shapes against each other, dtypes,
devices, layouts; the fake kernels the same, at trace time) before a pointer
reaches C, and the C core checks every buffer's extent again: the ops are
public (torch.ops.gmpo_ext.*), and a bad call must raise, never read or write
out of bounds.

TRL's GRPO family (algo ALGO_FAMILY) passes three more arguments, last and
optional: ``sampling_logps`` and ``token_mask`` ((B, T) or None) and
``family``, its 12 options as floats (_backend.FAMILY_OPTS; 14 with verl's two); the other
algorithms leave them None.

``rows`` carries the per-row statistics from forward to backward (B+1 rows
of 10 doubles: nothing per token). The backward reads grad_loss where it
lives (no host sync), so the pair is safe under CUDA graphs. Only ``logps``
receives a gradient; the other inputs are treated as constants, as in TRL and
verl, where they are detached.

``fused_loss`` is what the public functions call. In plain eager mode it runs
the same C calls through a torch.autograd.Function, which costs a fraction of
the custom-op dispatch (that overhead is comparable to the kernels at
training sizes); under torch.compile, export, make_fx and other dispatch modes,
jit tracing and tensor subclasses (FakeTensor, DTensor...) it goes through the
registered ops. torch.func transforms that differentiate (grad, jacrev) and
double backward are not supported and raise.
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op infers
# the schema from the annotation objects themselves and rejects strings
# ('Tensor'), so the op signatures' annotations must be evaluated.

from typing import Optional

import torch
from torch import Tensor

from . import _backend

_OPTS = ("algo", "convention", "loss_type", "eps_low", "eps_high", "beta", "log_ratio_clamp",
         "normalizer", "denom")


@torch.library.custom_op("gmpo_ext::loss_fwd", mutates_args=())
def loss_fwd(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Optional[Tensor],
    is_weights: Optional[Tensor],
    algo: int,
    convention: int,
    loss_type: int,
    eps_low: float,
    eps_high: float,
    beta: float,
    log_ratio_clamp: float,
    normalizer: float,
    denom: float,
    sampling_logps: Optional[Tensor] = None,
    token_mask: Optional[Tensor] = None,
    family: Optional[list[float]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backend.forward(algo, logps, old_logps, advantages, mask, ref_logps, is_weights,
                            convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp,
                            normalizer, denom, family=_family(sampling_logps, token_mask, family))


def _family(sampling_logps, token_mask, family):
    """The GRPO family's extra inputs as _backend takes them (None: not the family)."""
    if family is None and sampling_logps is None and token_mask is None:
        return None
    return (sampling_logps, token_mask, family)


@loss_fwd.register_fake
def _(logps, old_logps, advantages, mask, ref_logps, is_weights, algo, convention, loss_type,
      eps_low, eps_high, beta, log_ratio_clamp, normalizer, denom, sampling_logps=None,
      token_mask=None, family=None):
    _backend.check_loss_inputs(logps, old_logps, advantages, mask, ref_logps, is_weights, beta)
    _backend.check_family_inputs(logps, sampling_logps, token_mask)
    out_dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    B = logps.shape[0]
    return (
        logps.new_empty((), dtype=out_dtype),
        logps.new_empty((_backend.METRICS,), dtype=out_dtype),
        logps.new_empty((B + 1, _backend.ROW_STATS), dtype=torch.float64),
    )


@torch.library.custom_op("gmpo_ext::loss_bwd", mutates_args=())
def loss_bwd(
    grad_loss: Tensor,
    rows: Tensor,
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Optional[Tensor],
    is_weights: Optional[Tensor],
    algo: int,
    convention: int,
    loss_type: int,
    eps_low: float,
    eps_high: float,
    beta: float,
    log_ratio_clamp: float,
    normalizer: float,
    denom: float,
    sampling_logps: Optional[Tensor] = None,
    token_mask: Optional[Tensor] = None,
    family: Optional[list[float]] = None,
) -> Tensor:
    return _backend.backward(grad_loss, rows, algo, logps, old_logps, advantages, mask,
                             ref_logps, is_weights, convention, loss_type, eps_low, eps_high,
                             beta, log_ratio_clamp, normalizer, denom,
                             family=_family(sampling_logps, token_mask, family))


@loss_bwd.register_fake
def _(grad_loss, rows, logps, old_logps, advantages, mask, ref_logps, is_weights, algo,
      convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp, normalizer, denom,
      sampling_logps=None, token_mask=None, family=None):
    _backend.check_loss_inputs(logps, old_logps, advantages, mask, ref_logps, is_weights, beta)
    _backend.check_family_inputs(logps, sampling_logps, token_mask)
    _backend.check_rows(rows, logps.shape[0], logps.device)
    _backend.check_grad_loss(grad_loss, logps.device)
    return torch.empty_like(logps, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logps, old_logps, advantages, mask, ref_logps, is_weights, *opts = inputs
    opts += [None] * (len(_OPTS) + 3 - len(opts))   # the family's defaults
    slp, tm, fam = opts[len(_OPTS):]
    ctx.save_for_backward(logps, old_logps, advantages, mask, ref_logps, is_weights, output[2],
                          slp, tm)
    ctx.opts = opts[:len(_OPTS)]
    ctx.family_opts = fam
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, grad_metrics, grad_rows):
    logps, old_logps, advantages, mask, ref_logps, is_weights, rows, slp, tm = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = loss_bwd(grad_loss, rows, logps, old_logps, advantages, mask, ref_logps,
                        is_weights, *ctx.opts, slp, tm, ctx.family_opts)
    return (grad,) + (None,) * (5 + len(_OPTS) + 3)


loss_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoss(torch.autograd.Function):
    """The eager fast path: the same _backend calls as the ops, no dispatcher.

    On the CPU, when logps will get a gradient, the forward also computes it
    for an upstream gradient of 1 in the same pass over the inputs (the usual
    ``loss.backward()``) and keeps it until the backward, which then only
    hands it over; any other upstream gradient, or a second backward,
    recomputes it from the saved inputs as the op does.
    """

    # the options travel as one tuple: autograd.Function.apply costs per argument;
    # the family's (sampling_logps, token_mask, options), when given, is its last item
    @staticmethod
    def forward(ctx, logps, old_logps, advantages, mask, ref_logps, is_weights, opts, fuse):
        family = None
        if len(opts) > len(_OPTS):
            opts, family = opts[:len(_OPTS)], opts[len(_OPTS)]
        # fuse: grad mode was on and logps requires grad (inside forward grad
        # mode is off, and needs_input_grad ignores it)
        ctx.grad = None
        if fuse and _backend.fuses(logps.device):
            loss, metrics, rows, ctx.grad = _backend.forward_backward(
                opts[0], logps, old_logps, advantages, mask, ref_logps, is_weights, *opts[1:],
                checked=True, family=family)
        else:
            loss, metrics, rows = _backend.forward(opts[0], logps, old_logps, advantages, mask,
                                                   ref_logps, is_weights, *opts[1:], checked=True,
                                                   family=family)
        slp, tm = (family[0], family[1]) if family else (None, None)
        ctx.save_for_backward(logps, old_logps, advantages, mask, ref_logps, is_weights, rows,
                              slp, tm)
        ctx.opts = opts
        ctx.family_opts = family[2] if family else None
        ctx.mark_non_differentiable(metrics, rows)
        return loss, metrics, rows

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics, grad_rows):
        if torch.is_grad_enabled():
            # create_graph=True (double backward, Hessians): the kernels' gradient
            # is not itself differentiable; say so rather than return zeros
            raise RuntimeError("gmpo_ext: the fused loss supports one backward pass; double "
                               "backward (create_graph=True, Hessians) is not implemented")
        grad, ctx.grad = ctx.grad, None   # handed over once: autograd may keep it as .grad
        if grad is not None and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            return (grad,) + (None,) * 7
        logps, old_logps, advantages, mask, ref_logps, is_weights, rows, slp, tm = ctx.saved_tensors
        family = _family(slp, tm, ctx.family_opts)
        grad = None
        if ctx.needs_input_grad[0]:
            opts = ctx.opts
            grad = _backend.backward(grad_loss, rows, opts[0], logps, old_logps, advantages,
                                     mask, ref_logps, is_weights, *opts[1:], checked=True,
                                     family=family)
        return (grad,) + (None,) * 7


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


def _tracing():
    """True under torch.compile / export, make_fx or any TorchDispatchMode, and
    jit tracing: everything that must see the registered ops, not an opaque call."""
    return (torch.compiler.is_compiling() or _dispatch_modes() > 0 or torch.jit.is_tracing()
            or _functorch_active())


def _plain(t):
    return t is None or type(t) is torch.Tensor


def fused_loss(logps, old_logps, advantages, mask, ref_logps, is_weights, *opts, family=None):
    """(loss, metrics, rows) through the eager fast path or the custom op.

    family: the GRPO family's (sampling_logps, token_mask, options) for
    ALGO_FAMILY (options: the 12 numbers of _backend.FAMILY_OPTS, 14 with
    convention="verl"), else None.

    The inputs have passed _backend.check_loss_inputs (the public functions
    call it); the op checks them again itself. Meta tensors take the op (its
    fake kernel): shapes and dtypes out, no compute."""
    if (_tracing() or logps.device.type == "meta"
            or not (_plain(logps) and _plain(old_logps) and _plain(advantages) and _plain(mask)
                    and _plain(ref_logps) and _plain(is_weights)
                    and (family is None or (_plain(family[0]) and _plain(family[1]))))):
        if family is None:
            return loss_fwd(logps, old_logps, advantages, mask, ref_logps, is_weights, *opts)
        return loss_fwd(logps, old_logps, advantages, mask, ref_logps, is_weights, *opts,
                        family[0], family[1], [float(x) for x in family[2]])
    fuse = logps.requires_grad and torch.is_grad_enabled()
    if family is not None:
        opts = opts + (family,)
    return _EagerLoss.apply(logps, old_logps, advantages, mask, ref_logps, is_weights, opts, fuse)
