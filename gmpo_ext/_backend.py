"""Glue between torch tensors and the C module: dtype codes, strided views, the
backend for a device, and the two calls (forward, backward).

Everything here runs inside the custom ops' implementations, never at trace
time, so torch.compile sees only the ops.
"""

from __future__ import annotations

import contextlib

import torch

from . import _C

DTYPE_CODES = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.bool: 5,
    torch.uint8: 6,
    torch.int8: 7,
    torch.int32: 8,
    torch.int64: 9,
}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ROW_STATS = _C.ROW_STATS
METRICS = _C.METRICS
ABSENT = (0, 0, 0, 0)

ALGO_GMPO, ALGO_GRPO = 0, 1
CONVENTIONS = {"trl": 0, "verl": 1}
LOSS_TYPES = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3}

# Test hook: a module built from the same sources whose "CUDA" entry points run
# the CUDA kernels under the SIMT emulation (tests/simt). When set, CPU tensors
# go to it, so the whole test suite runs against the emulated CUDA kernels.
_simt_module = None


def set_simt_module(module):
    """Route CPU tensors to ``module``'s CUDA entry points (None: the C core)."""
    global _simt_module
    _simt_module = module


def backend(device: torch.device):
    """(module, device code, stream handle) for tensors on ``device``."""
    if device.type == "cuda":
        return _C, 1, torch.cuda.current_stream(device).cuda_stream
    if _simt_module is not None:
        return _simt_module, 1, 0
    return _C, 0, 0


def _on_device(device: torch.device):
    """The kernels launch on the current CUDA device: make it the tensors' one
    (tensors on cuda:1 would otherwise meet cuda:0's stream)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def view(t, per_token: bool):
    """(data_ptr, dtype code, stride_b, stride_t) of a (B, T), (B,) or (B, 1) tensor.

    A per-row tensor gets stride_t 0; a per-token one never does (the C core
    reads stride_t 0 as "one value per row"), so a broadcast token axis of a
    (B, T) tensor is materialised: the only case in which anything is copied.
    """
    if t is None:
        return ABSENT, None
    if not per_token:
        return (t.data_ptr(), DTYPE_CODES[t.dtype], t.stride(0), 0), t
    sb, st = t.stride()
    if st == 0:
        if t.shape[1] > 1:
            t = t.contiguous()
            sb, st = t.stride()
        else:
            st = 1
    return (t.data_ptr(), DTYPE_CODES[t.dtype], sb, st), t


def _args(algo, logps, old_logps, advantages, mask, ref_logps, is_weights, convention,
          loss_type, eps_low, eps_high, beta, log_ratio_clamp, normalizer, denom):
    B, T = logps.shape
    keep = []  # tensors materialised by view() must outlive the call

    def v(t, per_token):
        spec, held = view(t, per_token)
        keep.append(held)
        return spec

    # (B,) and (B, 1) are per row; (B, T) with T > 1 per token
    adv_token = advantages.dim() == 2 and advantages.shape[1] > 1
    isw_token = is_weights is not None and is_weights.dim() == 2 and is_weights.shape[1] > 1
    args = (
        algo, B, T,
        v(logps, True), v(old_logps, True), v(advantages, adv_token), v(mask, True),
        v(ref_logps, True), v(is_weights, isw_token),
        convention, loss_type, float(eps_low), float(eps_high), float(beta),
        float(log_ratio_clamp), float(normalizer), float(denom), torch.get_num_threads(),
    )
    return args, keep


def forward(algo, logps, old_logps, advantages, mask, ref_logps, is_weights, convention,
            loss_type, eps_low, eps_high, beta, log_ratio_clamp, normalizer, denom):
    B, T = logps.shape
    dev = logps.device
    out_dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    rows = torch.empty((B + 1, ROW_STATS), dtype=torch.float64, device=dev)
    loss = torch.empty((), dtype=out_dtype, device=dev)
    metrics = torch.empty((METRICS,), dtype=out_dtype, device=dev)
    mod, code, stream = backend(dev)
    (algo, B, T, *rest), keep = _args(algo, logps, old_logps, advantages, mask, ref_logps,
                                      is_weights, convention, loss_type, eps_low, eps_high,
                                      beta, log_ratio_clamp, normalizer, denom)
    with _on_device(dev):
        mod.forward(algo, code, stream, B, T, *rest, rows.data_ptr(), loss.data_ptr(),
                    metrics.data_ptr(), DTYPE_CODES[out_dtype])
    del keep
    return loss, metrics, rows


def fuses(device: torch.device) -> bool:
    """Whether forward_backward runs for tensors on ``device`` (the C core's CPU
    kernels; not CUDA, not the SIMT emulation of the CUDA kernels)."""
    return device.type == "cpu" and _simt_module is None


def forward_backward(algo, logps, old_logps, advantages, mask, ref_logps, is_weights,
                     convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp,
                     normalizer, denom):
    """forward(), plus the gradient for an upstream gradient of 1, computed in
    the same pass over the inputs (CPU only: see fuses())."""
    B, T = logps.shape
    out_dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    rows = torch.empty((B + 1, ROW_STATS), dtype=torch.float64)
    loss = torch.empty((), dtype=out_dtype)
    metrics = torch.empty((METRICS,), dtype=out_dtype)
    grad = torch.empty((B, T), dtype=logps.dtype)
    (algo, B, T, *rest), keep = _args(algo, logps, old_logps, advantages, mask, ref_logps,
                                      is_weights, convention, loss_type, eps_low, eps_high,
                                      beta, log_ratio_clamp, normalizer, denom)
    _C.forward_backward(algo, 0, 0, B, T, *rest, rows.data_ptr(), loss.data_ptr(),
                        metrics.data_ptr(), DTYPE_CODES[out_dtype], grad.data_ptr(),
                        DTYPE_CODES[grad.dtype])
    del keep
    return loss, metrics, rows, grad


def uses_fast_kernel(algo, logps, old_logps, advantages, mask, ref_logps, is_weights,
                     convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp,
                     normalizer, denom, grad_dtype=None):
    """Whether the C core takes its common case's kernel for these CPU inputs
    (grad_dtype: that of forward_backward's gradient; None: forward)."""
    (algo, B, T, *rest), keep = _args(algo, logps, old_logps, advantages, mask, ref_logps,
                                      is_weights, convention, loss_type, eps_low, eps_high,
                                      beta, log_ratio_clamp, normalizer, denom)
    code = -1 if grad_dtype is None else DTYPE_CODES[grad_dtype]
    return _C.uses_fast_kernel(algo, 0, 0, B, T, *rest, code)


def backward(grad_loss, rows, algo, logps, old_logps, advantages, mask, ref_logps, is_weights,
             convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp, normalizer, denom):
    grad = torch.empty(logps.shape, dtype=logps.dtype, device=logps.device)
    if grad_loss.dtype not in FLOAT_DTYPES:
        grad_loss = grad_loss.to(torch.float32)
    mod, code, stream = backend(logps.device)
    (algo, B, T, *rest), keep = _args(algo, logps, old_logps, advantages, mask, ref_logps,
                                      is_weights, convention, loss_type, eps_low, eps_high,
                                      beta, log_ratio_clamp, normalizer, denom)
    with _on_device(logps.device):
        mod.backward(algo, code, stream, B, T, *rest, rows.data_ptr(), grad_loss.data_ptr(),
                     DTYPE_CODES[grad_loss.dtype], grad.data_ptr(), DTYPE_CODES[grad.dtype])
    del keep
    return grad
