"""The CUDA loss kernels (csrc/cuda) run on the CPU under the SIMT emulation.

What the shared parity suite (tests/conftest.py's "simt" backend) does not
check: the emulated kernels against the C core directly, rows included (fp32
within 1e-5 relative); the same bits on every run, however the blocks are spread
over the emulation's worker threads; more rows than a grid's y dimension
allows (65 535); a row longer than a block; misaligned and strided views that
take the scalar loads (the GRPO family's too, its sampling_logps and
token_mask laid out unlike logps and the mask); the family with per-token
advantages; and a standalone driver (tests/gmpo_simt_driver.c) built
with ASan+UBSan and with TSan, which must run clean and which catches a bug
planted in a copy of the kernels.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import torch

from _helpers import make_case
from gmpo_ext import _backend

pytestmark = pytest.mark.simt

if shutil.which(os.environ.get("SIMT_CXX", "g++")) is None:
    pytest.skip("no C++ compiler for the SIMT emulation", allow_module_level=True)

import simt_backend  # noqa: E402  (after the skip: it loads tests/simt/build.py)

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
DRIVER = HERE / "gmpo_simt_driver.c"
simt_build = simt_backend.simt_build

GMPO, GRPO = 0, 1
CONV = {"trl": 0, "verl": 1}
LOSS_TYPES = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3}
RS_LOSS = 2


class _Counting:
    """Wraps the SIMT module and counts its calls, to prove the routing."""

    def __init__(self, mod):
        self.mod, self.calls = mod, 0

    def __getattr__(self, name):
        attr = getattr(self.mod, name)
        if name in ("forward", "backward"):
            def call(*args):
                self.calls += 1
                return attr(*args)
            return call
        return attr


@pytest.fixture(scope="module")
def simt():
    return _Counting(simt_backend.load_simt_module())


def run(mod, case, algo=GMPO, convention="trl", loss_type="grpo", eps_low=None, eps_high=None,
        beta=0.0, log_ratio_clamp=0.0, normalizer=1.0, denom=0.0, upstream=0.37, family=None):
    """(loss, metrics, rows, grad) of the custom ops on `mod` (None: the C core);
    family: the GRPO family's dict(sampling_logps=, token_mask=, family=[12 options])."""
    if eps_low is None:
        eps_low = 0.4 if algo == GMPO else 0.2
    if eps_high is None:
        eps_high = 0.4 if algo == GMPO else 0.28
    kw = dict(logps=case.logps, old_logps=case.old_logps, advantages=case.advantages,
              mask=case.mask, ref_logps=case.ref_logps if beta else None,
              is_weights=case.is_weights, algo=algo, convention=CONV[convention],
              loss_type=(FAMILY_TYPES if algo == FAMILY else LOSS_TYPES)[loss_type], eps_low=eps_low, eps_high=eps_high, beta=beta,
              log_ratio_clamp=log_ratio_clamp, normalizer=normalizer, denom=denom)
    if family is not None:
        kw.update(family)
    _backend.set_simt_module(mod)
    try:
        calls = getattr(mod, "calls", 0)
        loss, metrics, rows = torch.ops.gmpo_ext.loss_fwd(**kw)
        grad_loss = torch.tensor(upstream, dtype=loss.dtype)
        grad = torch.ops.gmpo_ext.loss_bwd(grad_loss, rows, **kw)
        if mod is not None:
            assert mod.calls == calls + 2, "the ops did not reach the SIMT module"
    finally:
        _backend.set_simt_module(None)
    return loss, metrics, rows, grad


def _bad(got, want, bound):
    got, want = got.double(), want.double()
    same_nan = torch.isnan(got) & torch.isnan(want)
    same_inf = torch.isinf(want) & (got == want)
    return ~((got - want).abs() <= bound) & ~same_nan & ~same_inf


def assert_matches_c(got, want, case, tol=1e-5):
    """fp32 within `tol` relative: each quantity at its own scale (a sum that
    cancels is compared at the size of its terms, not of its result)."""
    loss, metrics, rows, grad = got
    rloss, rmetrics, rrows, rgrad = want
    # rows: per statistic, relative to the element and to the column's largest value
    fin = torch.where(torch.isfinite(rrows), rrows.abs(), torch.zeros_like(rrows))
    col = fin.max(dim=0).values
    bad = _bad(rows, rrows, tol * (rrows.abs() + col))
    assert not bad.any(), f"rows differ at {bad.nonzero()[:5].tolist()}:\n{rows[bad]}\nvs C\n{rrows[bad]}"
    # the loss at the size of its row terms (no cancellation between rows)
    lscale = float(fin[:-1, RS_LOSS].mean()) if rows.shape[0] > 1 else 0.0
    assert not _bad(loss, rloss, tol * (rloss.abs() + lscale)), f"loss {float(loss)!r} vs C {float(rloss)!r}"
    bad = _bad(metrics, rmetrics, tol * (1 + rmetrics.abs()))
    assert not bad.any(), f"metrics {metrics.tolist()} vs C {rmetrics.tolist()}"
    # the gradient: relative per element and to its largest element; a 16-bit
    # gradient may round to the neighbouring value
    assert grad.dtype == rgrad.dtype and grad.shape == rgrad.shape
    ulp = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(grad.dtype, 0.0)
    gmax = float(rgrad.double().abs().nan_to_num(0, 0, 0).max()) if rgrad.numel() else 0.0
    bad = _bad(grad, rgrad, (tol + ulp) * rgrad.double().abs() + tol * gmax)
    assert not bad.any(), (f"grad differs at {bad.nonzero()[:5].tolist()}: {grad[bad][:5].tolist()} "
                           f"vs C {rgrad[bad][:5].tolist()}")
    assert (grad[case.mask == 0] == 0).all(), "masked tokens must get exactly zero gradient"


# ----------------------------------------------------------------------------
# the emulated kernels against the C core

GMPO_GRID = [
    # (B, T, dtype, convention, adv_shape, mask_kind, is_weights, beta, clamp)
    (6, 97, torch.float32, "trl", "B", "bool", None, 0.0, 0.0),
    (6, 97, torch.float32, "verl", "B", "bool", None, 0.0, 0.0),
    (5, 257, torch.float32, "trl", "BT", "int", "BT", 0.04, 0.0),
    (5, 257, torch.float32, "verl", "BT", "float", "BT", 0.04, 0.0),
    (4, 1025, torch.float32, "trl", "B1", "float", "B", 0.0, 0.3),
    (4, 1025, torch.float32, "verl", "B", "int", "B", 0.1, 0.3),
    (7, 33, torch.bfloat16, "trl", "B", "bool", None, 0.04, 0.0),
    (7, 33, torch.float16, "verl", "BT", "int", "BT", 0.0, 0.0),
    (3, 130, torch.float64, "trl", "BT", "float", "B", 0.04, 0.0),
    (3, 130, torch.float64, "verl", "B", "bool", "BT", 0.0, 0.25),
    (9, 1, torch.float32, "trl", "B", "bool", None, 0.0, 0.0),
    (3, 0, torch.float32, "trl", "B", "bool", None, 0.0, 0.0),
    (0, 5, torch.float32, "verl", "B", "bool", None, 0.0, 0.0),
]


@pytest.mark.parametrize("B,T,dtype,convention,adv_shape,mask_kind,isw,beta,clamp", GMPO_GRID)
def test_gmpo_matches_c_core(simt, B, T, dtype, convention, adv_shape, mask_kind, isw, beta, clamp):
    case = make_case(B, T, dtype=dtype, adv_shape=adv_shape, mask_kind=mask_kind, seed=B * 1000 + T,
                     ref=beta != 0, is_weights=isw, spread=0.4, tail=T > 0)
    opts = dict(convention=convention, beta=beta, log_ratio_clamp=clamp, normalizer=2.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_matches_c(run(simt, case, **opts), run(None, case, **opts), case, tol)


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grpo_matches_c_core(simt, loss_type, dtype):
    case = make_case(5, 203, dtype=dtype, seed=7, ref=True, is_weights="BT" if loss_type == "bnpo" else "B",
                     mask_kind="int" if loss_type == "dapo" else "bool")
    opts = dict(algo=GRPO, loss_type=loss_type, beta=0.04 if loss_type != "dr_grpo" else 0.0,
                denom=700.0 if loss_type == "dapo" else 0.0, normalizer=3.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_matches_c(run(simt, case, **opts), run(None, case, **opts), case, tol)


FAMILY = 2
FAMILY_TYPES = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3, "cispo": 4, "sapo": 5,
                "luspo": 6, "vespo": 7}
FAMILY_GRID = [
    # (B, T, dtype, loss_type, level, mask_kind, is_weights, beta): every option on
    (6, 97, torch.float32, "dapo", 1, "bool", "BT", 0.05),
    (5, 257, torch.float32, "grpo", 0, "int", "B", 0.05),
    (4, 1025, torch.float32, "sapo", 1, "float", "BT", 0.0),   # a row longer than a block
    (4, 300, torch.float32, "cispo", 0, "bool", "BT", 0.04),
    (7, 33, torch.bfloat16, "luspo", 1, "bool", None, 0.04),
    (7, 33, torch.float16, "vespo", 0, "int", "BT", 0.0),
    (3, 130, torch.float64, "vespo", 1, "float", "B", 0.04),
    (3, 130, torch.float64, "sapo", 0, "bool", None, 0.1),
    (3, 0, torch.float32, "dapo", 1, "bool", None, 0.0),
]


@pytest.mark.parametrize("B,T,dtype,loss_type,level,mask_kind,isw,beta", FAMILY_GRID)
def test_family_matches_c_core(simt, B, T, dtype, loss_type, level, mask_kind, isw, beta):
    """The family's kernels (gmpo_fam_fwd_kernel, gmpo_fam_bwd_kernel, the
    finish in fp64) against the C core: rows, loss, metrics, gradient."""
    case = make_case(B, T, dtype=dtype, mask_kind=mask_kind, seed=21, ref=beta != 0,
                     is_weights=isw, tail=T > 0)
    g = torch.Generator().manual_seed(22)
    slp = (case.old_logps.double() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    if B * T:
        slp.view(-1)[0] = float("nan")
    fam = dict(sampling_logps=slp, token_mask=torch.rand(B, T, generator=g) < 0.7,
               family=[float(level), 1.0, 1.0, 1.0, 1.4, 0.02, 1.0, 1.05, 2.0, 3.0, 3.0, 2.0])
    kw = dict(algo=FAMILY, loss_type=loss_type, eps_low=0.2,
              eps_high=2.0 if loss_type == "cispo" else 0.28, beta=beta, normalizer=2.0)
    want = run(None, case, family=fam, **kw)
    got = run(simt, case, family=fam, **kw)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_matches_c(got, want, case, tol=tol)


def family_options(level=0, off_policy=True):
    """The family's 12 options (gmpo_ext._backend.FAMILY_OPTS): every one on
    (delta 1.4, the off-policy mask at 0.02 unless off_policy=False, the
    bias-corrected KL), sapo's and vespo's constants."""
    return [float(level), 1.0, 1.0 if off_policy else 0.0, 1.0, 1.4, 0.02, 1.0, 1.05, 2.0, 3.0, 3.0, 2.0]


def family_extras(case, seed, dtype=None):
    """sampling_logps near logps (the off-policy KL of rows 3 and 5 past the
    threshold of family_options, the others' within it; a NaN the mask takes
    as 0) and a token_mask 70% on, for a case of make_case."""
    B, T = case.logps.shape
    g = torch.Generator().manual_seed(seed)
    off = torch.zeros(B, 1, dtype=torch.float64)
    off[3::2] = 0.1
    slp = case.logps.double() + off + 0.005 * torch.randn(B, T, generator=g, dtype=torch.float64)
    if B * T:
        slp.view(-1)[0] = float("nan")
    tm = torch.rand(B, T, generator=g) < 0.7
    return slp.to(dtype or case.logps.dtype), tm


@pytest.mark.parametrize("loss_type,dtype", [("grpo", torch.float32), ("sapo", torch.bfloat16),
                                             ("cispo", torch.float64), ("dr_grpo", torch.float16)])
def test_family_token_advantages(simt, loss_type, dtype):
    """Per-token (B, T) advantages (token level, no off-policy mask: what TRL's
    convention allows them with) and per-token importance weights: every
    token's own A and w, never the row's (0 and 1 for per-token tensors)."""
    case = make_case(5, 77, dtype=dtype, seed=31, adv_shape="BT", ref=True, is_weights="BT",
                     mask_kind="float")
    _, tm = family_extras(case, 32)
    fam = dict(sampling_logps=None, token_mask=tm, family=family_options(0, off_policy=False))
    kw = dict(algo=FAMILY, loss_type=loss_type, eps_low=0.2,
              eps_high=2.0 if loss_type == "cispo" else 0.28, beta=0.04, normalizer=2.0)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_matches_c(run(simt, case, family=fam, **kw), run(None, case, family=fam, **kw), case, tol)


# ----------------------------------------------------------------------------
# determinism

@pytest.mark.parametrize("algo", [GMPO, GRPO])
def test_same_bits_on_every_run(simt, algo, monkeypatch):
    # rows of 1 to 3000 tokens: 32- to 512-thread blocks, several warps each
    case = make_case(40, 3000, seed=11, adv_shape="BT", ref=True, is_weights="BT", spread=0.5)
    first = run(simt, case, algo=algo, beta=0.04)
    for workers in ("1", "2", "3"):
        monkeypatch.setenv("SIMT_WORKERS", workers)
        again = run(simt, case, algo=algo, beta=0.04)
        for a, b in zip(first[:2] + first[3:], again[:2] + again[3:]):
            assert torch.equal(a.view(torch.int32) if a.dtype == torch.float32 else a,
                               b.view(torch.int32) if b.dtype == torch.float32 else b)
        assert torch.equal(first[2].view(torch.int64), again[2].view(torch.int64))


# ----------------------------------------------------------------------------
# grid shapes


def test_more_rows_than_a_grid_y_dimension(simt):
    # 70 000 rows on grid.x (y and z stop at 65 535); the totals reduce them in one block
    B, T = 70_000, 5
    case = make_case(B, T, seed=3, zero_adv=False)
    got, want = run(simt, case), run(None, case)
    assert_matches_c(got, want, case)
    assert float(got[2][-1, 4]) == float(case.mask.sum())   # every row's tokens counted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_longer_than_a_block(simt, dtype):
    # 5003 tokens: a 512-thread forward block loops 2-3 times per thread, the
    # backward takes 5 blocks along y, and 5003 = 3 (mod 4) leaves a scalar tail
    case = make_case(3, 5003, dtype=dtype, seed=5, tail=False, adv_shape="BT", ref=True)
    assert_matches_c(run(simt, case, beta=0.04), run(None, case, beta=0.04), case)


# ----------------------------------------------------------------------------
# misaligned and strided views: the per-input scalar fallback


def _misaligned(t):
    """t's values in a buffer whose data pointer is one element past an
    allocation (every row starts off the 16-byte grid)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _row_padded(t, pad):
    """t as a view of a (B, T + pad) buffer at column pad: rows at varying alignment."""
    B, T = t.shape
    buf = torch.zeros(B, T + pad, dtype=t.dtype)
    buf[:, pad:] = t
    return buf[:, pad:]


def _transposed(t):
    """t's values with token stride B (a transposed (T, B) buffer)."""
    return t.t().contiguous().t()


def _interleaved(t):
    """t's values at every other element of each row (token stride 2)."""
    B, T = t.shape
    buf = torch.zeros(B, 2 * T, dtype=t.dtype)
    buf[:, ::2] = t
    return buf[:, ::2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["misaligned", "row_padded", "strided"])
def test_misaligned_and_strided_views(simt, dtype, layout):
    base = make_case(6, 131, dtype=dtype, seed=9, adv_shape="BT", ref=True, is_weights="BT",
                     mask_kind="int")
    if layout == "misaligned":
        f = _misaligned
        case = base.with_(logps=f(base.logps), old_logps=f(base.old_logps), mask=f(base.mask),
                          advantages=f(base.advantages), ref_logps=f(base.ref_logps),
                          is_weights=f(base.is_weights))
    elif layout == "row_padded":
        case = base.with_(logps=_row_padded(base.logps, 1), old_logps=_row_padded(base.old_logps, 3),
                          mask=_row_padded(base.mask, 2), advantages=_row_padded(base.advantages, 5),
                          ref_logps=_row_padded(base.ref_logps, 1), is_weights=base.is_weights)
    else:
        case = base.with_(logps=_interleaved(base.logps), old_logps=_transposed(base.old_logps),
                          mask=_transposed(base.mask), advantages=_interleaved(base.advantages),
                          ref_logps=base.ref_logps, is_weights=_transposed(base.is_weights))
    assert not case.logps.is_contiguous() or case.logps.data_ptr() % 16
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for algo in (GMPO, GRPO):
        got = run(simt, case, algo=algo, beta=0.04)
        assert_matches_c(got, run(None, case, algo=algo, beta=0.04), case, tol)
        # and the same values as the contiguous, aligned inputs take (vector loads)
        aligned = run(simt, base, algo=algo, beta=0.04)
        assert_matches_c(got, aligned, base, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["misaligned", "row_padded", "strided"])
def test_family_misaligned_and_strided_views(simt, dtype, layout):
    """The GRPO family's kernels on the layouts above, with its own two inputs
    (sampling_logps, token_mask) laid out unlike logps and the mask: each
    input's vector loads decided by its own view (stride, dtype, alignment at
    the row's head), the gradient's vector stores by grad's alignment at the
    head. misaligned: logps' rows start off the 16-byte grid, grad's on it;
    row_padded: sampling_logps' rows at other alignments than logps', a float
    token_mask; strided: token_mask transposed under a contiguous mask,
    sampling_logps interleaved."""
    base = make_case(6, 131, dtype=dtype, seed=9, ref=True, is_weights="BT", mask_kind="int")
    slp, tm = family_extras(base, 10)
    if layout == "misaligned":
        f = _misaligned
        case = base.with_(logps=f(base.logps), old_logps=f(base.old_logps), mask=f(base.mask),
                          ref_logps=f(base.ref_logps), is_weights=f(base.is_weights))
        slp_v, tm_v = f(slp), f(tm)
    elif layout == "row_padded":
        case = base.with_(logps=_row_padded(base.logps, 1), old_logps=_row_padded(base.old_logps, 3),
                          mask=_row_padded(base.mask, 2), ref_logps=_row_padded(base.ref_logps, 1),
                          is_weights=base.is_weights)
        slp_v, tm_v = _row_padded(slp, 2), _row_padded(tm.float(), 1)
    else:
        case = base.with_(logps=_interleaved(base.logps), old_logps=_transposed(base.old_logps),
                          ref_logps=base.ref_logps, is_weights=_transposed(base.is_weights))
        slp_v, tm_v = _interleaved(slp), _transposed(tm)
    assert not case.logps.is_contiguous() or case.logps.data_ptr() % 16
    kw = dict(algo=FAMILY, loss_type="grpo", eps_low=0.2, eps_high=0.28, beta=0.04, normalizer=2.0)
    fam = dict(sampling_logps=slp_v, token_mask=tm_v, family=family_options(0))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    got = run(simt, case, family=fam, **kw)
    assert_matches_c(got, run(None, case, family=fam, **kw), case, tol)
    # and the same values as the contiguous, aligned inputs take (vector loads)
    aligned = run(simt, base, family=dict(fam, sampling_logps=slp, token_mask=tm), **kw)
    assert_matches_c(got, aligned, base, tol)


# ----------------------------------------------------------------------------
# sanitizer builds of a standalone driver


# no ifunc (target_clones) resolvers: they run before the TSan runtime is up
DRIVER_DEFINES = ["GMPO_WITH_CUDA", "GMPO_SIMT", "GMPO_NO_CLONES", "GMPO_NO_TARGET_CLONES"]


def _build_driver(sanitize, cuda_dir=None, name=None):
    """The driver over the kernels of cuda_dir (default csrc/cuda) and the C core."""
    csrc = simt_backend.CSRC
    cuda_dir = pathlib.Path(cuda_dir or csrc / "cuda")
    reason = simt_build.sanitizer_works(sanitize)
    if reason:
        pytest.skip(f"{sanitize} runtime unusable here: {reason}")
    return simt_build.build_library(
        sorted(str(p) for p in cuda_dir.glob("*.cu")),
        c_sources=[str(DRIVER), str(csrc / "gmpo_common.c"), *sorted(str(p) for p in (csrc / "cpu").glob("*.c"))],
        include_dirs=[csrc], defines=DRIVER_DEFINES, sanitize=sanitize, opt="-O1",
        executable=True, name=name or f"gmpo_simt_driver_{sanitize}",
        extra_cflags=("-fno-strict-aliasing", "-fopenmp-simd"),
    )


def _run_driver(exe, sanitize, *args):
    env = simt_build.sanitizer_env(sanitize)
    env.setdefault("SIMT_WORKERS", "2")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("sanitize", ["asan", "tsan"])
def test_sanitized_driver_runs_clean(sanitize):
    proc = _run_driver(_build_driver(sanitize), sanitize)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " 0 failed" in proc.stdout, out[-6000:]
    for marker in simt_build.SANITIZER_MARKERS:
        assert marker not in out, out[-6000:]


# A copy of csrc with a bug planted in the kernels; the sanitizer must see it.
PLANTED = {
    # the forward's scalar tail reads one token past the end of the row
    "asan": ("cuda/gmpo_loss.cu", "\n    const int64_t nscalar = r.head + (T - tail);",
             "\n    const int64_t nscalar = r.head + (T - tail) + 1;", "0",
             ["heap-buffer-overflow", "gmpo_fwd_rows_kernel"]),
    # the barrier between the warps' partials and warp 0's reads is gone
    "tsan": ("cuda/gmpo_cuda_util.cuh", "        __syncthreads();\n", "", "11",
             ["WARNING: ThreadSanitizer: data race", "gmpo_block_sum8", "gmpo_fwd_rows_kernel"]),
}


@pytest.mark.parametrize("sanitize", ["asan", "tsan"])
def test_sanitizer_catches_a_planted_bug(sanitize):
    rel, old, new, case, needles = PLANTED[sanitize]
    # a fixed path, so that the build cache spares the rebuild on later runs
    root = REPO / "build" / "simt" / f"planted_{sanitize}"
    shutil.rmtree(root / "csrc", ignore_errors=True)
    shutil.copytree(simt_backend.CSRC, root / "csrc")
    path = root / "csrc" / rel
    text = path.read_text()
    assert text.count(old) == 1, f"the line to break is gone from {rel}: update PLANTED"
    path.write_text(text.replace(old, new))
    # only the copied kernels are rebuilt (they include ../gmpo.h of the copy);
    # the driver and the C core are the clean build's objects
    exe = _build_driver(sanitize, root / "csrc" / "cuda", name=f"gmpo_planted_{sanitize}")
    proc = _run_driver(exe, sanitize, case)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    for n in needles:
        assert n in out, f"{n!r} missing from:\n{out[-6000:]}"
