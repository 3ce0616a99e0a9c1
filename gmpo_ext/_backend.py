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
ABSENT = (0, 0, 0, 0, 0)

ALGO_GMPO, ALGO_GRPO, ALGO_FAMILY = 0, 1, 2
CONVENTIONS = {"trl": 0, "verl": 1}
LOSS_TYPES = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3}
# TRL 1.16's whole GRPO family (ALGO_FAMILY)
FAMILY_LOSS_TYPES = {**LOSS_TYPES, "cispo": 4, "sapo": 5, "luspo": 6, "vespo": 7}
IS_LEVELS = {"token": 0, "sequence": 1}
# the family's options as the C core takes them (gmpo.h's gmpo_family): seq_level,
# has_delta, off_policy, bias_corr_kl, delta, off_policy_threshold, sapo_tpos,
# sapo_tneg, vespo_kpos, vespo_lpos, vespo_kneg, vespo_lneg; and for
# convention="verl" two more: verl_agg (VERL_AGG_MODES) and clip_c
FAMILY_OPTS = 12
FAMILY_OPTS_VERL = 14
# the kernel's aggregations for verl's agg_loss modes (gmpo.h's GMPO_VA_*; loss.py
# maps verl 0.9's five onto these three)
VERL_AGG_MODES = {"token-mean": 0, "seq-mean-token-sum": 1, "seq-mean-token-mean": 2}
NO_FAMILY = None   # the other algorithms (the C module: family options all zero; algo 2 needs them)


_NOT_FAMILY = (ABSENT, ABSENT, NO_FAMILY)   # the family's arguments of the other algorithms


# the names of the four integer family options (family_tuple's messages)
_FAMILY_FLAGS = ("seq_level", "has_delta", "off_policy", "bias_corr_kl")


def family_tuple(fopts):
    """The 12 family options as the C module's tuple (4 ints, 8 floats), or 14
    with verl's two (an int, a float); None for the other algorithms."""
    if fopts is None:
        return NO_FAMILY
    if len(fopts) not in (FAMILY_OPTS, FAMILY_OPTS_VERL):
        raise ValueError(f"family options: {FAMILY_OPTS} or {FAMILY_OPTS_VERL} values "
                         f"expected, got {len(fopts)}")
    flags = []
    for name, x in zip(_FAMILY_FLAGS, fopts[:4]):
        x = float(x)
        if x != x or x in (float("inf"), -float("inf")) or x != int(x):
            raise ValueError(f"family options: {name} must be an integer, got {x}")
        flags.append(int(x))
    out = tuple(flags) + tuple(float(x) for x in fopts[4:12])
    if len(fopts) == FAMILY_OPTS_VERL:
        out += (int(fopts[12]), float(fopts[13]))
    return out

# Test hook: a module built from the same sources whose "CUDA" entry points run
# the CUDA kernels under the SIMT emulation (tests/simt). When set, CPU tensors
# go to it, so the whole test suite runs against the emulated CUDA kernels.
_simt_module = None


def set_simt_module(module):
    """Route CPU tensors to ``module``'s CUDA entry points (None: the C core)."""
    global _simt_module
    _simt_module = module


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def cuda_version_problem(built: int, driver: int, torch_cuda) -> str | None:
    """Why kernels built with CUDA ``built`` (CUDART_VERSION, e.g. 13000) cannot
    run under a driver supporting CUDA ``driver`` (0: none), or None when they
    can. The runtime is linked statically: within a major version (minor
    version compatibility) any driver of that major runs them."""
    if not built or driver // 1000 >= built // 1000:
        return None
    have = f"CUDA {_version(driver)}" if driver else "no CUDA at all (no driver found)"
    return (f"gmpo_ext's CUDA kernels were built with CUDA {_version(built)}, which needs an "
            f"NVIDIA driver for CUDA {built // 1000}.x or newer; this machine's driver supports "
            f"{have}; the installed torch is built for CUDA {torch_cuda}. Fix: install a "
            f"gmpo_ext built with a CUDA {max(driver // 1000, 12)} toolkit (e.g. GMPO_EXT_NVCC="
            f"/usr/local/cuda-{max(driver // 1000, 12)}/bin/nvcc pip install --no-build-isolation "
            "--force-reinstall gmpo_ext), or upgrade the NVIDIA driver.")


_cuda_ok = False


def check_cuda_runtime():
    """At the first CUDA call: refuse a build whose CUDA the driver cannot run,
    with a message naming the three versions, instead of a launch failure."""
    global _cuda_ok
    if _cuda_ok:
        return
    versions = _C.cuda_versions()
    if versions is not None:   # None: no CUDA kernels; the entry points say so
        built, _runtime, driver = versions
        problem = cuda_version_problem(built, driver, torch.version.cuda)
        if problem:
            raise RuntimeError(problem)
    _cuda_ok = True


def backend(device: torch.device):
    """(module, device code, stream handle) for tensors on ``device``."""
    if device.type == "cuda":
        check_cuda_runtime()
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


def span(t) -> int:
    """Elements the tensor covers from its data pointer on (its extent for the
    C core: every element its own sizes and strides address; 0 when empty).
    PyTorch guarantees a tensor's span lies inside its storage."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        n += (size - 1) * stride
    return n


def buf(t):
    """(data_ptr, extent) of an output or saved buffer."""
    return (t.data_ptr(), span(t))


def view(t, per_token: bool):
    """(data_ptr, dtype code, stride_b, stride_t, extent) of a (B, T), (B,) or
    (B, 1) tensor.

    A per-row tensor gets stride_t 0; a per-token one never does (the C core
    reads stride_t 0 as "one value per row"), so a broadcast token axis of a
    (B, T) tensor is materialised: the only case in which anything is copied.
    """
    if t is None:
        return ABSENT, None
    if not per_token:
        return (t.data_ptr(), DTYPE_CODES[t.dtype], t.stride(0), 0, span(t)), t
    sb, st = t.stride()
    if st == 0:
        if t.shape[1] > 1:
            t = t.contiguous()
            sb, st = t.stride()
        else:
            st = 1
    return (t.data_ptr(), DTYPE_CODES[t.dtype], sb, st, span(t)), t


# ----------------------------------------------------------------------------
# argument checks: every call into the C core passes them first, whether it
# comes from the public functions, the eager path or the registered ops (which
# are public too: torch.ops.gmpo_ext.*, compiled and exported graphs)

def dtype_names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name, t, dtypes, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {dtype_names(dtypes)}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_device(name, t, dev, what="logps"):
    if t is not None and t.device != dev:
        raise ValueError(f"{name} is on {t.device} but {what} is on {dev}; all inputs "
                         "must be on the same device")


def check_loss_inputs(logps, old_logps, advantages, mask, ref_logps, is_weights, beta):
    """Shapes, dtypes, devices and layouts of the loss's tensors (no data read:
    runs on fake tensors at trace time too)."""
    check_tensor("logps", logps, FLOAT_DTYPES)
    if logps.dim() != 2:
        raise ValueError(f"logps must have shape (B, T), got {tuple(logps.shape)}")
    B, T = logps.shape
    check_tensor("old_logps", old_logps, FLOAT_DTYPES)
    check_tensor("advantages", advantages, FLOAT_DTYPES)
    check_tensor("mask", mask, tuple(DTYPE_CODES))
    check_tensor("ref_logps", ref_logps, FLOAT_DTYPES, optional=True)
    check_tensor("is_weights", is_weights, FLOAT_DTYPES, optional=True)
    for name, t in (("old_logps", old_logps), ("mask", mask), ("ref_logps", ref_logps)):
        if t is not None and tuple(t.shape) != (B, T):
            raise ValueError(f"{name} must have the shape of logps {(B, T)}, got {tuple(t.shape)}")
    if tuple(advantages.shape) not in ((B,), (B, 1), (B, T)):
        raise ValueError(f"advantages must have shape (B,), (B, 1) or (B, T) = {(B,)}, {(B, 1)} "
                         f"or {(B, T)}, got {tuple(advantages.shape)}")
    if is_weights is not None and tuple(is_weights.shape) not in ((B,), (B, 1), (B, T)):
        raise ValueError(f"is_weights must have shape (B,), (B, 1) or (B, T) = {(B,)}, {(B, 1)} "
                         f"or {(B, T)}, got {tuple(is_weights.shape)}")
    dev = logps.device
    if dev.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"logps is on {dev}; gmpo_ext runs on cpu and cuda tensors")
    for name, t in (("old_logps", old_logps), ("advantages", advantages), ("mask", mask),
                    ("ref_logps", ref_logps), ("is_weights", is_weights)):
        check_device(name, t, dev)
    if beta != 0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta != 0 (the KL term needs the "
                         "reference model's log-probs)")


def check_family_inputs(logps, sampling_logps, token_mask):
    """sampling_logps and token_mask: (B, T) like logps, on its device."""
    check_tensor("sampling_logps", sampling_logps, FLOAT_DTYPES, optional=True)
    check_tensor("token_mask", token_mask, tuple(DTYPE_CODES), optional=True)
    for name, t in (("sampling_logps", sampling_logps), ("token_mask", token_mask)):
        if t is not None:
            if tuple(t.shape) != tuple(logps.shape):
                raise ValueError(f"{name} must have the shape of logps {tuple(logps.shape)}, "
                                 f"got {tuple(t.shape)}")
            check_device(name, t, logps.device)


def resolved(t):
    """t without a pending negation (a neg view such as ``z.conj().imag``, whose
    bit the raw data pointer does not show): a copy only in that case."""
    if t is not None and t.is_neg():
        return t.resolve_neg()
    return t


def _runnable(dev):
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"logps is on {dev}; the kernels run on cpu and cuda tensors")


def check_rows(rows, B, dev):
    """The per-row statistics forward wrote: (B + 1, ROW_STATS) float64."""
    check_tensor("rows", rows, (torch.float64,))
    if tuple(rows.shape) != (B + 1, ROW_STATS) or not rows.is_contiguous():
        raise ValueError(f"rows must be the forward's contiguous ({B + 1}, {ROW_STATS}) float64 "
                         f"statistics, got shape {tuple(rows.shape)}, strides {rows.stride()}")
    check_device("rows", rows, dev)


def check_grad_loss(grad_loss, dev):
    check_tensor("grad_loss", grad_loss, FLOAT_DTYPES + tuple(DTYPE_CODES))
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must hold one value (the loss is 0-d), got shape "
                         f"{tuple(grad_loss.shape)}")
    check_device("grad_loss", grad_loss, dev)


def _args(algo, logps, old_logps, advantages, mask, ref_logps, is_weights, convention,
          loss_type, eps_low, eps_high, beta, log_ratio_clamp, normalizer, denom, family=None):
    B, T = logps.shape
    keep = []  # tensors materialised by view() must outlive the call

    def v(t, per_token):
        spec, held = view(resolved(t), per_token)
        keep.append(held)
        return spec

    # (B,) and (B, 1) are per row; (B, T) with T != 1 per token (also T = 0)
    adv_token = advantages.dim() == 2 and advantages.shape[1] != 1
    isw_token = is_weights is not None and is_weights.dim() == 2 and is_weights.shape[1] != 1
    args = (
        algo, B, T,
        v(logps, True), v(old_logps, True), v(advantages, adv_token), v(mask, True),
        v(ref_logps, True), v(is_weights, isw_token),
        *((v(family[0], True), v(family[1], True), family_tuple(family[2])) if family
          else _NOT_FAMILY),
        convention, loss_type, float(eps_low), float(eps_high), float(beta),
        float(log_ratio_clamp), float(normalizer), float(denom), torch.get_num_threads(),
    )
    return args, keep


def _checked(checked, logps, old_logps, advantages, mask, ref_logps, is_weights, beta,
             family=None):
    if not checked:
        check_loss_inputs(logps, old_logps, advantages, mask, ref_logps, is_weights, beta)
        if family:
            check_family_inputs(logps, family[0], family[1])
    _runnable(logps.device)


def _loss_outputs(logps):
    """(out_dtype, rows, loss, metrics): the forward's outputs, on logps' device
    (explicitly: never the default device): fp32, or fp64 for fp64 logps; rows
    the (B + 1, ROW_STATS) fp64 statistics."""
    dev = logps.device
    out_dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    rows = torch.empty((logps.shape[0] + 1, ROW_STATS), dtype=torch.float64, device=dev)
    loss = torch.empty((), dtype=out_dtype, device=dev)
    metrics = torch.empty((METRICS,), dtype=out_dtype, device=dev)
    return out_dtype, rows, loss, metrics


def forward(algo, logps, old_logps, advantages, mask, ref_logps, is_weights, convention,
            loss_type, eps_low, eps_high, beta, log_ratio_clamp, normalizer, denom,
            checked=False, family=None):
    """(loss, metrics, rows). checked=True: the caller ran check_loss_inputs."""
    _checked(checked, logps, old_logps, advantages, mask, ref_logps, is_weights, beta, family)
    B, T = logps.shape
    dev = logps.device
    out_dtype, rows, loss, metrics = _loss_outputs(logps)
    mod, code, stream = backend(dev)
    (algo, B, T, *rest), keep = _args(algo, logps, old_logps, advantages, mask, ref_logps,
                                      is_weights, convention, loss_type, eps_low, eps_high,
                                      beta, log_ratio_clamp, normalizer, denom, family)
    with _on_device(dev):
        mod.forward(algo, code, stream, B, T, *rest, buf(rows), buf(loss), buf(metrics),
                    DTYPE_CODES[out_dtype])
    del keep
    return loss, metrics, rows


def fuses(device: torch.device) -> bool:
    """Whether forward_backward runs for tensors on ``device`` (the C core's CPU
    kernels; not CUDA, not the SIMT emulation of the CUDA kernels)."""
    return device.type == "cpu" and _simt_module is None


def forward_backward(algo, logps, old_logps, advantages, mask, ref_logps, is_weights,
                     convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp,
                     normalizer, denom, checked=False, family=None):
    """forward(), plus the gradient for an upstream gradient of 1, computed in
    the same pass over the inputs (CPU only: see fuses())."""
    _checked(checked, logps, old_logps, advantages, mask, ref_logps, is_weights, beta, family)
    if not fuses(logps.device):
        raise ValueError(f"forward_backward runs on the C core's CPU kernels; logps is on "
                         f"{logps.device}")
    B, T = logps.shape
    dev = logps.device   # explicit: never the default device (set_default_device)
    out_dtype, rows, loss, metrics = _loss_outputs(logps)
    grad = torch.empty((B, T), dtype=logps.dtype, device=dev)
    (algo, B, T, *rest), keep = _args(algo, logps, old_logps, advantages, mask, ref_logps,
                                      is_weights, convention, loss_type, eps_low, eps_high,
                                      beta, log_ratio_clamp, normalizer, denom, family)
    _C.forward_backward(algo, 0, 0, B, T, *rest, buf(rows), buf(loss), buf(metrics),
                        DTYPE_CODES[out_dtype], buf(grad), DTYPE_CODES[grad.dtype])
    del keep
    return loss, metrics, rows, grad


def uses_fast_kernel(algo, logps, old_logps, advantages, mask, ref_logps, is_weights,
                     convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp,
                     normalizer, denom, grad_dtype=None, family=None):
    """Whether the C core takes its common case's kernel for these CPU inputs
    (grad_dtype: that of forward_backward's gradient; None: forward)."""
    _checked(False, logps, old_logps, advantages, mask, ref_logps, is_weights, beta, family)
    (algo, B, T, *rest), keep = _args(algo, logps, old_logps, advantages, mask, ref_logps,
                                      is_weights, convention, loss_type, eps_low, eps_high,
                                      beta, log_ratio_clamp, normalizer, denom, family)
    code = -1 if grad_dtype is None else DTYPE_CODES[grad_dtype]
    return _C.uses_fast_kernel(algo, 0, 0, B, T, *rest, code)


def backward(grad_loss, rows, algo, logps, old_logps, advantages, mask, ref_logps, is_weights,
             convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp, normalizer, denom,
             checked=False, family=None):
    """d loss / d logps times grad_loss, from forward's rows."""
    _checked(checked, logps, old_logps, advantages, mask, ref_logps, is_weights, beta, family)
    dev = logps.device
    check_rows(rows, logps.shape[0], dev)
    check_grad_loss(grad_loss, dev)
    grad = torch.empty(logps.shape, dtype=logps.dtype, device=dev)
    if grad_loss.dtype not in FLOAT_DTYPES:
        grad_loss = grad_loss.to(torch.float32)
    grad_loss = resolved(grad_loss)
    mod, code, stream = backend(dev)
    (algo, B, T, *rest), keep = _args(algo, logps, old_logps, advantages, mask, ref_logps,
                                      is_weights, convention, loss_type, eps_low, eps_high,
                                      beta, log_ratio_clamp, normalizer, denom, family)
    with _on_device(dev):
        mod.backward(algo, code, stream, B, T, *rest, buf(rows), buf(grad_loss),
                     DTYPE_CODES[grad_loss.dtype], buf(grad), DTYPE_CODES[grad.dtype])
    del keep
    return grad


# ----------------------------------------------------------------------------
# rows split over processes (gmpo_ext.distributed): the forward in two halves
# around the caller's all-reduce of the row sums

SUM_STATS = getattr(_C, "SUM_STATS", 8)


def row_sums(algo, logps, old_logps, advantages, mask, ref_logps, is_weights, convention,
             loss_type, eps_low, eps_high, beta, log_ratio_clamp, normalizer, denom,
             out=None, checked=False, family=None):
    """Each row's raw sums over the tokens given: (B, SUM_STATS) float64,
    written into ``out`` (a contiguous (B, SUM_STATS) float64 tensor) when given."""
    _checked(checked, logps, old_logps, advantages, mask, ref_logps, is_weights, beta, family)
    B, T = logps.shape
    dev = logps.device
    if out is None:
        out = torch.empty((B, SUM_STATS), dtype=torch.float64, device=dev)
    check_sums(out, B, dev)
    mod, code, stream = backend(dev)
    (algo, B, T, *rest), keep = _args(algo, logps, old_logps, advantages, mask, ref_logps,
                                      is_weights, convention, loss_type, eps_low, eps_high,
                                      beta, log_ratio_clamp, normalizer, denom, family)
    with _on_device(dev):
        mod.row_sums(algo, code, stream, B, T, *rest, buf(out))
    del keep
    return out


def finish_sums(sums, algo, logps, old_logps, advantages, mask, ref_logps, is_weights,
                convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp, normalizer,
                denom, checked=False, family=None):
    """(loss, metrics, rows) from the row sums added up over the processes."""
    _checked(checked, logps, old_logps, advantages, mask, ref_logps, is_weights, beta, family)
    B, T = logps.shape
    dev = logps.device
    check_sums(sums, B, dev)
    out_dtype, rows, loss, metrics = _loss_outputs(logps)
    mod, code, stream = backend(dev)
    (algo, B, T, *rest), keep = _args(algo, logps, old_logps, advantages, mask, ref_logps,
                                      is_weights, convention, loss_type, eps_low, eps_high,
                                      beta, log_ratio_clamp, normalizer, denom, family)
    with _on_device(dev):
        mod.finish_sums(algo, code, stream, B, T, *rest, buf(sums), buf(rows), buf(loss),
                        buf(metrics), DTYPE_CODES[out_dtype])
    del keep
    return loss, metrics, rows


def check_sums(sums, B, dev):
    """The row sums: a contiguous (B, SUM_STATS) float64 tensor."""
    check_tensor("sums", sums, (torch.float64,))
    if tuple(sums.shape) != (B, SUM_STATS) or not sums.is_contiguous():
        raise ValueError(f"sums must be a contiguous ({B}, {SUM_STATS}) float64 tensor, got "
                         f"shape {tuple(sums.shape)}, strides {sums.stride()}")
    check_device("sums", sums, dev)
