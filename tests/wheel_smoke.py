"""Smoke tests of an installed gmpo_ext, run INSIDE the environment under test.

tests/test_wheel.py runs this with the python of a fresh venv into which it
installed a built wheel and torch (no compiler on PATH); tools/build_wheels.sh
can run it against any environment. It needs only torch and gmpo_ext, checks
the loss forward and backward (GMPO fast and generic kernels, verl's convention,
GRPO) and the logits path against the float64 references of gmpo_ext.reference,
the OpenMP path (2 threads, same bits as 1), and prints one JSON line of facts
(where gmpo_ext and torch were imported from, which OpenMP runtimes are mapped)
for the caller to check. Exit status 0: every check passed.

    python tests/wheel_smoke.py            (from any directory but the repo root)
"""

from __future__ import annotations

import json
import os
import sys

import torch

import gmpo_ext
from gmpo_ext import _C
from gmpo_ext.reference import gmpo_loss_reference, grpo_loss_reference

F64 = torch.float64


def close(got, ref, rtol, atol, what):
    got, ref = got.detach().to(F64), ref.detach().to(F64)
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    bound = atol + rtol * ref.abs().max().item() if ref.numel() else atol
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: not finite"
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"
    return err


def loss_inputs(B, T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=F64) * 3).to(dtype)
    old = (logp.to(F64) - 0.3 * torch.randn(B, T, generator=g, dtype=F64)).to(dtype)
    adv = torch.randn(B, generator=g)
    adv[0], adv[1] = adv[0].abs() + 0.1, -adv[1].abs() - 0.1
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logp, old, adv, mask


def check_loss(dtype, convention, fast, grpo=False):
    # convention: "trl" / "verl" for gmpo, the loss_type for grpo
    """Fused loss and gradient against the float64 reference (fast: the inputs
    the C core's fast kernel takes; else the KL term sends them to the generic one)."""
    logp, old, adv, mask = loss_inputs(6, 45, dtype, seed=3)
    kw = dict(epsilon_low=0.2, epsilon_high=0.28)
    kw.update(loss_type=convention) if grpo else kw.update(convention=convention)
    if not fast and not grpo:
        kw["beta"] = 0.04                      # the KL term: the generic kernel
        kw["ref_logps"] = old.clone()
    x = logp.clone().requires_grad_(True)
    fused = gmpo_ext.grpo_loss if grpo else gmpo_ext.gmpo_loss
    loss = fused(x, old, adv, mask, **kw)
    (g,) = torch.autograd.grad(loss * 1.5, x)

    x64 = logp.detach().to(F64).requires_grad_(True)
    reference = grpo_loss_reference if grpo else gmpo_loss_reference
    kw64 = {k: (v.to(F64) if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref, _ = reference(x64, old.to(F64), adv.to(F64), mask, **kw64)
    (g64,) = torch.autograd.grad(ref * 1.5, x64)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, F64: 1e-10}[dtype]
    what = f"{'grpo' if grpo else 'gmpo'} {dtype} {convention}"
    close(loss, ref, tol, tol, what + " loss")
    assert g.dtype == dtype, f"{what}: gradient dtype {g.dtype}"
    close(g, g64, tol, tol * 1e-2, what + " grad")


def check_logits():
    """gmpo_loss_from_logits: loss and d/dlogits against log_softmax + gather in float64."""
    g = torch.Generator().manual_seed(7)
    B, T, V, temp = 3, 11, 97, 0.7
    z = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    old = (torch.log_softmax(z.to(F64) / temp, -1).gather(-1, ids[..., None])[..., 0]
           - 0.2 * torch.randn(B, T, generator=g, dtype=F64)).float()
    adv = torch.tensor([0.7, -1.2, 0.4])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 6:] = False
    leaf = z.clone().requires_grad_(True)
    loss = gmpo_ext.gmpo_loss_from_logits(leaf, ids, old, adv, mask, temperature=temp)
    (gz,) = torch.autograd.grad(loss, leaf)

    z64 = z.to(F64).requires_grad_(True)
    logp = torch.log_softmax(z64 / temp, -1).gather(-1, ids[..., None])[..., 0]
    ref, _ = gmpo_loss_reference(logp, old.to(F64), adv.to(F64), mask)
    (gz64,) = torch.autograd.grad(ref, z64)
    close(loss, ref, 2e-5, 2e-6, "logits loss")
    close(gz, gz64, 2e-5, 1e-7, "logits grad")
    lp = gmpo_ext.selective_logps(z, ids, temp)
    close(lp, logp, 2e-6, 2e-5, "selective_logps")


def check_threads():
    """Past the C core's split threshold with 2 threads (OpenMP, the runtime torch
    loaded): the same bits as 1 thread."""
    logp, old, adv, mask = loss_inputs(64, 1024, torch.float32, seed=5)
    out = []
    for n in (1, 2):
        torch.set_num_threads(n)
        x = logp.clone().requires_grad_(True)
        loss = gmpo_ext.gmpo_loss(x, old, adv, mask)
        (g,) = torch.autograd.grad(loss, x)
        out.append((loss, g))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1]), \
        "2 threads gave other bits than 1"


def mapped(name):
    """Paths of the mapped shared objects whose file name contains ``name``."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f
                           if len(line.split()) >= 6 and name in os.path.basename(line.split()[-1])})
    except OSError:
        return None


def main():
    for dtype in (torch.float32, torch.bfloat16):
        check_loss(dtype, "trl", fast=True)
    check_loss(torch.float32, "verl", fast=True)
    check_loss(torch.float32, "trl", fast=False)
    check_loss(F64, "verl", fast=False)
    check_loss(torch.float32, "bnpo", fast=False, grpo=True)
    check_logits()
    check_threads()
    ops = [name for name in ("loss_fwd", "loss_bwd", "logits_fwd")
           if hasattr(torch.ops.gmpo_ext, name)]
    print(json.dumps({
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "prefix": sys.prefix,
        "torch": torch.__version__,
        "torch_file": torch.__file__,
        "gmpo_ext_file": gmpo_ext.__file__,
        "module_file": _C.__file__,
        "with_cuda": bool(gmpo_ext.WITH_CUDA),
        "cuda_versions": _C.cuda_versions(),
        "ops": ops,
        "libgomp": mapped("libgomp"),
    }))


if __name__ == "__main__":
    main()
