"""The CUDA kernels' grid-stride loops, run for real: a tiny-grid SIMT build.

On a GPU the launchers cap grid.x at 2^31 - 1 blocks (the logits kernels) and
grid.y at 65 535 (the loss backward's token chunks), and the kernels loop over
what the grid does not cover. No test shape reaches those caps, so the loops'
second pass never runs in the default build. The tiny-grid build
(simt_backend.TINY_GRID: -DGMPO_MAX_GRID_X=3 -DGMPO_MAX_GRID_Y=2, see
csrc/cuda/launch.cuh) makes every such loop take several passes, and a block
reuse its static shared memory for its next row. Its results must be the same
bits as the default build's (no kernel reduces across blocks, so the grid
never changes a value) and match the C core / a float64 reference.

Every kernel and dtype: loss forward + backward (fp32, bf16, fp16, fp64; GMPO
and GRPO; the GRPO family's backward in fp32, bf16, fp64), logits forward + backward (fp32, bf16, fp16; entropy on and off;
T + 1 positions with the ignored last one; masked tokens), the LM-head tile
kernels' fold and grad (fp32, bf16, fp16; strided tiles through the module's
entry points; in the driver: ids at every tile boundary and outside [0, V),
NaN and +-inf, also under TSan and ASan).

The whole suite runs against the tiny-grid build with SIMT_MAX_GRID=3,2
GMPO_TEST_BACKENDS=simt (slow: a developer run, not CI).
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from _helpers import make_case
from gmpo_ext import _backend

pytestmark = pytest.mark.simt

if shutil.which(os.environ.get("SIMT_CXX", "g++")) is None:
    pytest.skip("no C++ compiler for the SIMT emulation", allow_module_level=True)

import simt_backend  # noqa: E402
from test_simt_kernels import (FAMILY, GMPO, GRPO, _Counting, assert_matches_c, family_extras,  # noqa: E402
                               family_options, run)


@pytest.fixture(scope="module")
def default_mod():
    return _Counting(simt_backend.load_simt_module(max_grid=None))


@pytest.fixture(scope="module")
def tiny_mod():
    return _Counting(simt_backend.load_simt_module(max_grid=simt_backend.TINY_GRID))


def _bits(t):
    if t.dtype in (torch.float32, torch.int32):
        return t.view(torch.int32)
    if t.dtype in (torch.float64, torch.int64):
        return t.view(torch.int64)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t


def assert_same_bits(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    eq = _bits(a) == _bits(b)
    assert bool(eq.all()), f"{what}: tiny-grid build differs at {(~eq).nonzero()[:5].tolist()}"


# ----------------------------------------------------------------------------
# loss


# (dtype, B, T): T long enough that the backward wants 3+ chunks on grid.y
# (fp32: ceil(ceil(T/4) / 256); fp64: 2 tokens a vector), capped at 2
LOSS_CASES = [
    (torch.float32, 5, 2900),
    (torch.bfloat16, 4, 2300),
    (torch.float16, 3, 2200),
    (torch.float64, 4, 1700),
]


@pytest.mark.parametrize("algo", [GMPO, GRPO], ids=["gmpo", "grpo"])
@pytest.mark.parametrize("dtype,B,T", LOSS_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_loss_tiny_grid(default_mod, tiny_mod, algo, dtype, B, T):
    if algo == GRPO and dtype in (torch.float16, torch.float64):
        pytest.skip("GRPO runs the same kernels: fp32 and bf16 cover its path")
    case = make_case(B, T, dtype=dtype, seed=T + B, adv_shape="BT", ref=True, is_weights="BT",
                     mask_kind="int", spread=0.4)
    opts = dict(algo=algo, beta=0.04, normalizer=2.0)
    got = run(tiny_mod, case, **opts)
    want = run(default_mod, case, **opts)
    for a, b, what in zip(got, want, ("loss", "metrics", "rows", "grad")):
        assert_same_bits(a, b, what)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_matches_c(got, run(None, case, **opts), case, tol)


# (dtype, B, T, loss_type, level): B >= 3 rows, so that grid.x's size is not grid.y's
FAMILY_CASES = [
    (torch.float32, 5, 2900, "grpo", 0),
    (torch.bfloat16, 4, 2300, "sapo", 1),
    (torch.float64, 4, 1700, "cispo", 0),
]


@pytest.mark.parametrize("dtype,B,T,loss_type,level", FAMILY_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_family_tiny_grid(default_mod, tiny_mod, dtype, B, T, loss_type, level):
    """The GRPO family's backward (gmpo_fam_bwd_kernel) loops over its token
    chunks on grid.y like gmpo_bwd_kernel: on the tiny grid, 3+ chunks on 2
    blocks; every option on, per-token importance weights, token_mask and
    sampling_logps."""
    case = make_case(B, T, dtype=dtype, seed=T + B + 1, ref=True, is_weights="BT",
                     mask_kind="int", spread=0.4)
    slp, tm = family_extras(case, T)
    fam = dict(sampling_logps=slp, token_mask=tm, family=family_options(level))
    opts = dict(algo=FAMILY, loss_type=loss_type, eps_low=0.2,
                eps_high=2.0 if loss_type == "cispo" else 0.28, beta=0.04, normalizer=2.0,
                family=fam)
    got = run(tiny_mod, case, **opts)
    want = run(default_mod, case, **opts)
    for a, b, what in zip(got, want, ("loss", "metrics", "rows", "grad")):
        assert_same_bits(a, b, what)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_matches_c(got, run(None, case, **opts), case, tol)


def _finish(mod, case, **kw):
    """(loss, metrics, rows) from the row sums, the split-row path's finish kernel."""
    args = dict(algo=GMPO, logps=case.logps, old_logps=case.old_logps,
                advantages=case.advantages, mask=case.mask, ref_logps=case.ref_logps,
                is_weights=case.is_weights, convention=0, loss_type=0, eps_low=0.4,
                eps_high=0.4, beta=0.04, log_ratio_clamp=0.0, normalizer=1.0, denom=0.0)
    args.update(kw)
    _backend.set_simt_module(mod)
    try:
        sums = _backend.row_sums(**args)
        return _backend.finish_sums(sums, **args)
    finally:
        _backend.set_simt_module(None)


def test_finish_sums_tiny_grid(default_mod, tiny_mod):
    """The finish of split rows (group=) over more row blocks than the tiny grid
    has (B = 520: 5 blocks of 128 against a cap of 3) takes a second grid-stride
    pass and gives the same bits (it capped its grid with its own 65 535)."""
    case = make_case(520, 3, dtype=torch.float32, seed=11, adv_shape="BT", ref=True,
                     is_weights="BT", mask_kind="int", spread=0.4)
    got, want = _finish(tiny_mod, case), _finish(default_mod, case)
    for a, b, what in zip(got, want, ("loss", "metrics", "rows")):
        assert_same_bits(a, b, what)
    for a, b in zip(got, _finish(None, case)):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6, equal_nan=True)


# ----------------------------------------------------------------------------
# logits


def _logits_case(dtype, B, T, TL, V, seed):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, TL, V, generator=g) * 3).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(torch.int64)
    mask[0, 0] = 1
    return z, ids, mask


def _reference(z, ids, mask, temperature):
    """float64 logp, entropy, lse of the first T positions (0 where masked)."""
    T = ids.shape[1]
    x = z[:, :T].double() / temperature
    lse = torch.logsumexp(x, dim=-1)
    p = torch.exp(x - lse[..., None])
    logp = x.gather(-1, ids[..., None]).squeeze(-1) - lse
    ent = lse - (p * x).sum(-1)
    m = mask != 0
    return [torch.where(m, v, torch.zeros_like(v)) for v in (logp, ent, lse)]


def _logits_run(mod, z, ids, mask, temperature, entropy, g, gh):
    _backend.set_simt_module(mod)
    try:
        logp, ent, lse = torch.ops.gmpo_ext.logits_fwd(z, ids, mask, temperature, entropy, False)
        grad = torch.ops.gmpo_ext.logits_bwd(g, gh if entropy else None, z, ids, mask, lse, ent,
                                             temperature)
    finally:
        _backend.set_simt_module(None)
    return logp, ent, lse, grad


@pytest.mark.parametrize("entropy", [True, False], ids=["entropy", "no_entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_logits_tiny_grid(default_mod, tiny_mod, dtype, entropy):
    # 2 x 7 tokens on 3 blocks: each block takes 4-5 rows; T + 1 positions (the
    # last one ignored, a zero gradient row); V = 601: 3 warps (the block merge's
    # shared partials and barriers), an unaligned tail
    B, T, V, tau = 2, 7, 601, 0.7
    z, ids, mask = _logits_case(dtype, B, T, T + 1, V, seed=V + int(entropy))
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(B, T, generator=gen)
    gh = torch.randn(B, T, generator=gen)
    got = _logits_run(tiny_mod, z, ids, mask, tau, entropy, g, gh)
    want = _logits_run(default_mod, z, ids, mask, tau, entropy, g, gh)
    for a, b, what in zip(got, want, ("logp", "entropy", "lse", "grad")):
        if what == "entropy" and not entropy:
            continue
        assert_same_bits(a, b, what)
    # and right: against float64 (every row written, none from another row)
    rlogp, rent, rlse = _reference(z, ids, mask, tau)
    logp, ent, lse, grad = got
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logp.double(), rlogp, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), rlse, atol=tol, rtol=tol)
    if entropy:
        torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=tol)
    # the gradient through autograd of the float64 reference
    zr = z.double().requires_grad_(True)
    x = zr[:, :T] / tau
    lse64 = torch.logsumexp(x, dim=-1)
    lp64 = x.gather(-1, ids[..., None]).squeeze(-1) - lse64
    m = (mask != 0).double()
    obj = (lp64 * g * m).sum()
    if entropy:
        p = torch.exp(x - lse64[..., None])
        obj = obj + ((lse64 - (p * x).sum(-1)) * gh * m).sum()
    (rgrad,) = torch.autograd.grad(obj, zr)
    scale = float(rgrad.abs().max())
    torch.testing.assert_close(grad.double(), rgrad, atol=tol * scale, rtol=tol)
    assert bool((grad[:, T] == 0).all()), "the ignored position T must get a zero gradient row"


# ----------------------------------------------------------------------------
# the LM-head tile kernels (hidden_cuda.cu) through the module's entry points
# (hidden_fold / hidden_grad): strided tiles, ld > vn, which the Python layer
# never passes (its tiles are contiguous)


def _tiles_run(mod, device, y, ids, cuts, pad, softcap, g, gh):
    """Fold y (n, V) in the column tiles [cuts[j], cuts[j + 1]) of one (n, V + pad)
    buffer (each tile a view with row stride ld = V + pad > vn, its extent
    (n - 1) * ld + vn), then overwrite each tile with its gradient; the state
    and the buffer. mod: the C core (device 0) or a SIMT module (device 1)."""
    n, V = y.shape
    buf = torch.full((n, V + pad), float("nan"), dtype=y.dtype)
    buf[:, :V] = y
    ld, es = buf.stride(0), buf.element_size()
    st = torch.zeros(n, 4)
    st[:, 0] = -math.inf
    ids_spec = (ids.data_ptr(), ids.numel(), _backend.DTYPE_CODES[ids.dtype])

    def spec(lo, hi):
        return (buf.data_ptr() + lo * es, (n - 1) * ld + hi - lo, _backend.DTYPE_CODES[buf.dtype], n, hi - lo,
                lo, V, ld)

    for lo, hi in zip(cuts, cuts[1:]):
        mod.hidden_fold(device, 0, spec(lo, hi), ids_spec, 1.25, softcap, 0.7, 1, 1, (st.data_ptr(), st.numel()))
    lse = st[:, 0] + torch.log(st[:, 1])
    ent = torch.log(st[:, 1]) - st[:, 2] / st[:, 1]
    for lo, hi in zip(cuts, cuts[1:]):
        mod.hidden_grad(device, 0, spec(lo, hi), ids_spec, 1.25, softcap, 0.7, 0, 1, lse.data_ptr(),
                        ent.data_ptr(), g.data_ptr(), gh.data_ptr(), n)
    return st, buf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_tiles_tiny_grid_strided(default_mod, tiny_mod, dtype):
    # 7 tokens on 3 blocks (each block folds 2-3 tokens, reusing its shared
    # partials); tiles of 700 (3 warps), 1 and 299 columns of V = 1000 in a
    # (7, 1013) buffer; ids at 0, v0 - 1, v0, v0 + vn - 1, v0 + vn, V - 1 of the
    # 700-column tile [1, 701)
    n, V, cuts, pad = 7, 1000, [0, 1, 701, 1000], 13
    gen = torch.Generator().manual_seed(19)
    y = (torch.randn(n, V, generator=gen) * 3).to(dtype)
    ids = torch.tensor([0, 1, 700, 701, 999, 0, 350])
    g = torch.randn(n, generator=gen)
    gh = torch.randn(n, generator=gen)
    softcap = 5.0 if dtype == torch.bfloat16 else 0.0
    st, buf = _tiles_run(tiny_mod, 1, y, ids, cuts, pad, softcap, g, gh)
    st_d, buf_d = _tiles_run(default_mod, 1, y, ids, cuts, pad, softcap, g, gh)
    assert_same_bits(st, st_d, "state")
    assert_same_bits(buf, buf_d, "grad")
    st_c, buf_c = _tiles_run(_backend._C, 0, y, ids, cuts, pad, softcap, g, gh)
    torch.testing.assert_close(st, st_c, rtol=2e-5, atol=2e-5)
    # the padding untouched (NaN), every tile's columns the C gradient
    assert bool(torch.isnan(buf[:, V:]).all()), "the grad wrote into the padding between rows"
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    scale = float(buf_c[:, :V].double().abs().max())
    torch.testing.assert_close(buf[:, :V].double(), buf_c[:, :V].double(), atol=tol * scale, rtol=tol)
    # and right: logp against float64 log_softmax of the transformed logits
    u = y.double() * 1.25
    x = (softcap * torch.tanh(u / softcap) if softcap else u) / 0.7
    ref = torch.log_softmax(x, -1).gather(1, ids[:, None])[:, 0]
    logp = st[:, 3] - (st[:, 0] + torch.log(st[:, 1]))
    torch.testing.assert_close(logp.double(), ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------
# a standalone driver (tests/simt/kernel_driver.c): the logits, loss and tile
# kernels over tiny grids, plain and under TSan; the tile kernels under ASan;
# row offsets past 2^32 elements in every kernel

DRIVER = simt_backend.HERE / "simt" / "kernel_driver.c"
DRIVER_DEFINES = ["GMPO_WITH_CUDA", "GMPO_SIMT", "GMPO_NO_CLONES", "GMPO_NO_TARGET_CLONES"]


def build_kernel_driver(sanitize=None, max_grid=simt_backend.TINY_GRID, cuda_dir=None, out_dir=None):
    """The driver over the kernels of cuda_dir (default csrc/cuda) and the C core."""
    import pathlib

    csrc = simt_backend.CSRC
    cuda_dir = pathlib.Path(cuda_dir or simt_backend.CUDA_DIR)
    if sanitize:
        reason = simt_backend.simt_build.sanitizer_works(sanitize)
        if reason:
            pytest.skip(f"{sanitize} runtime unusable here: {reason}")
    tag = f"{sanitize or 'plain'}" + (f"_g{max_grid[0]}x{max_grid[1]}" if max_grid else "")
    return simt_backend.simt_build.build_library(
        sorted(str(p) for p in cuda_dir.glob("*.cu")),
        c_sources=[str(DRIVER), str(csrc / "gmpo_common.c"), *sorted(str(p) for p in (csrc / "cpu").glob("*.c"))],
        include_dirs=[csrc], defines=DRIVER_DEFINES, cu_defines=simt_backend.grid_defines(max_grid),
        sanitize=sanitize, opt="-O1", executable=True, name=f"kernel_driver_{tag}",
        extra_cflags=("-fno-strict-aliasing", "-fopenmp-simd"), out_dir=out_dir,
    )


def run_kernel_driver(exe, sanitize, what, timeout=600):
    import subprocess

    env = simt_backend.simt_build.sanitizer_env(sanitize)
    env.setdefault("SIMT_WORKERS", "2")
    return subprocess.run([str(exe), what], capture_output=True, text=True, env=env, timeout=timeout)


def _assert_clean(proc):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " 0 failed" in proc.stdout, out[-6000:]
    for marker in simt_backend.simt_build.SANITIZER_MARKERS:
        assert marker not in out, out[-6000:]


@pytest.mark.parametrize("what", ["logits", "loss", "tiles"])
def test_driver_tiny_grid_matches_c(what):
    _assert_clean(run_kernel_driver(build_kernel_driver(), None, what))


@pytest.mark.parametrize("what", ["logits", "loss", "tiles"])
def test_tsan_tiny_grid_runs_clean(what):
    # blocks loop over rows: a missing barrier before the next row's reuse of
    # shared memory is a data race TSan names
    _assert_clean(run_kernel_driver(build_kernel_driver("tsan"), "tsan", what))


def test_asan_tiles_run_clean():
    # the tile kernels on buffers of exactly their extents: a read or write one
    # past a tile (an id at v0 + vn taken as a column) is a heap-buffer-overflow.
    # CUDA's grid caps: the .cu and C objects are the ASan driver's of
    # test_simt_kernels.py (same flags), only this driver is compiled
    _assert_clean(run_kernel_driver(build_kernel_driver("asan", max_grid=None), "asan", "tiles"))


def test_row_offsets_past_2_32():
    # the loss (GMPO's and the GRPO family's), logits and tile kernels with element
    # offsets past 2^32 (inputs and outputs) on reserved, mostly untouched mappings
    proc = run_kernel_driver(build_kernel_driver(max_grid=None), None, "offset")
    if proc.returncode == 77:
        pytest.skip(f"no room to reserve the mappings: {proc.stdout.strip()}")
    _assert_clean(proc)
