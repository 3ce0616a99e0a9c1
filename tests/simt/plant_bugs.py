"""Plant bugs in a scratch copy of csrc/cuda, one at a time, and see whether the
SIMT tests catch each one.

For every bug of BUGS: copy csrc/cuda to build/simt/plant/<bug>/cuda, replace
one exact piece of source text (it must occur exactly once), point the SIMT
builds at the copy (SIMT_CUDA_DIR, read by tests/simt_backend.py) and run the
bug's pytest selection. A bug is caught when that run fails; the table names the
tests that failed. The C core and the module are the clean ones (only the .cu
objects are rebuilt; the build cache keeps them between runs).

    python tests/simt/plant_bugs.py [--only NAME ...] [--list] [--check] [--whole] [-x]

--whole runs the whole `pytest -m simt tests` selection against each bug instead
of its own list (what a catch must survive: no hand-picked tests); -x stops a
run at its first failing test. The kernels other than the planted one are
links to the clean sources, so their cached objects serve every copy.

--check: only verify that every pattern still applies to the current sources
(what tests/test_simt_harness.py runs in CI). Developer tool: a full run builds
each copy a few ways (plain, tiny grid, TSan) and takes some minutes.
Exit status: 0 every bug caught (or, with --check, every pattern found), 1 not.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
CUDA = REPO / "csrc" / "cuda"
SCRATCH = REPO / "build" / "simt" / "plant"

GRID = "tests/test_simt_grid.py"
# the GRPO family's SIMT cases: the emulated kernels against the C core / TRL's formulas
FAM = ["tests/test_simt_kernels.py::test_family_matches_c_core",
       "tests/test_simt_kernels.py::test_family_token_advantages",
       "tests/test_simt_kernels.py::test_family_misaligned_and_strided_views",
       "tests/test_grpo_family.py::test_backends", "tests/test_verl_family.py::test_simt_case_per_mode"]


@dataclass
class Bug:
    name: str
    kind: str
    file: str     # under csrc/cuda
    old: str      # exact text, exactly once in the file
    new: str
    tests: list = field(default_factory=list)   # pytest node ids / -k selections


BUGS = [
    Bug("logits_fwd_no_stride", "grid-stride loop: stride removed",
        "logits_cuda.cu",
        "    const int64_t rows = a.B * a.T;\n    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {",
        "    const int64_t rows = a.B * a.T;\n    for (int64_t r = blockIdx.x; r < rows; r += rows) {",
        [f"{GRID}::test_logits_tiny_grid", f"{GRID}::test_driver_tiny_grid_matches_c"]),
    Bug("loss_bwd_no_y_stride", "grid-stride loop: stride removed (grid.y)",
        "gmpo_loss.cu",
        "const int64_t stride = (int64_t)gridDim.y * blockDim.x;",
        "const int64_t stride = nvec;",
        [f"{GRID}::test_loss_tiny_grid", f"{GRID}::test_driver_tiny_grid_matches_c"]),
    Bug("logits_bwd_row_from_blockidx", "grid-stride loop: row from blockIdx.x",
        "logits_cuda.cu",
        "const int64_t b = r / a.TL, t = r % a.TL, V = a.V;",
        "const int64_t b = blockIdx.x / a.TL, t = blockIdx.x % a.TL, V = a.V;",
        [f"{GRID}::test_logits_tiny_grid", f"{GRID}::test_driver_tiny_grid_matches_c"]),
    Bug("logits_merge_no_reuse_barrier", "barrier guarding shared-memory reuse removed",
        "logits_cuda.cu",
        "    __syncthreads();                           // part is reused by the next row\n",
        "",
        [f"{GRID}::test_tsan_tiny_grid_runs_clean"]),
    Bug("loss_finish_no_stride", "grid-stride loop: one pass (the split rows' finish)",
        "gmpo_loss.cu",
        "for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.B; i += stride) {",
        "for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.B; i += a.B + 0 * stride) {",
        [f"{GRID}::test_finish_sums_tiny_grid"]),
    Bug("loss_bwd_row_offset_32bit", "32-bit truncation of the gradient's row offset",
        "gmpo_loss.cu",
        "char *gr = (char *)grad + i * T * gmpo_dtype_size(gdt);",
        "char *gr = (char *)grad + (int32_t)(i * T) * gmpo_dtype_size(gdt);",
        [f"{GRID}::test_row_offsets_past_2_32"]),
    Bug("logits_misaligned_vector", "misaligned 16-byte vector access",
        "logits_cuda.cu",
        "int64_t h = mis ? (16 - mis) / lg_dt<DT>::size : 0;",
        "int64_t h = 0 * mis;",
        [f"{GRID}::test_logits_tiny_grid", f"{GRID}::test_driver_tiny_grid_matches_c"]),
    Bug("loss_misaligned_vector", "misaligned 16-byte vector access",
        "gmpo_loss.cu",
        "    return (uintptr_t)(p + head * gmpo_dtype_size(v.dtype)) % (uintptr_t)gmpo_vec_align<VEC>(v.dtype) == 0;",
        "    return head >= 0;",
        ["tests/test_simt_kernels.py::test_misaligned_and_strided_views"]),
    Bug("logits_merge_reads_unwritten_smem", "shared-memory read past the written slots",
        "logits_cuda.cu",
        "st = lane < nwarps ? part[lane] : lg_state{-INFINITY, 0.0f, 0.0f};",
        "st = lane < LG_WARPS ? part[lane] : lg_state{-INFINITY, 0.0f, 0.0f};",
        [f"{GRID}::test_logits_tiny_grid", f"{GRID}::test_driver_tiny_grid_matches_c"]),
    Bug("loss_totals_reads_unwritten_smem", "shared-memory read past the written slots",
        "gmpo_loss.cu",
        "for (int w = 1; w < nwarps; w++) gmpo_totals_merge(tot, part[w]);",
        "for (int w = 1; w < 32 + 0 * nwarps; w++) gmpo_totals_merge(tot, part[w]);",
        [f"{GRID}::test_loss_tiny_grid", f"{GRID}::test_driver_tiny_grid_matches_c"]),
    # the LM-head tile kernels (issue 19: each class of bug the suite could not see)
    Bug("hidden_fold_no_stride", "grid-stride loop: stride removed (tile tokens)",
        "hidden_cuda.cu",
        "    for (int64_t r = blockIdx.x; r < a.n; r += gridDim.x) {\n        const char *row",
        "    for (int64_t r = blockIdx.x; r < a.n; r += a.n) {\n        const char *row",
        [f"{GRID}::test_tiles_tiny_grid_strided", f"{GRID}::test_driver_tiny_grid_matches_c"]),
    Bug("hidden_fold_no_reuse_barrier", "barrier guarding shared-memory reuse removed (tiles)",
        "hidden_cuda.cu",
        "            __syncthreads();                     // part is reused by the next row\n",
        "",
        [f"{GRID}::test_tsan_tiny_grid_runs_clean"]),
    Bug("hidden_grad_row_offset_32bit", "32-bit truncation of the tile's row offset (grad)",
        "hidden_cuda.cu",
        "        char *row = a.tile + r * a.ld * (DT == GMPO_DT_F32 ? 4 : 2);\n        const float G",
        "        char *row = a.tile + (int32_t)(r * a.ld) * (DT == GMPO_DT_F32 ? 4 : 2);\n        const float G",
        [f"{GRID}::test_row_offsets_past_2_32"]),
    Bug("hidden_fold_row_stride_vn", "row address from vn instead of the row stride ld",
        "hidden_cuda.cu",
        "const char *row = a.tile + r * a.ld *",
        "const char *row = a.tile + r * a.vn *",
        [f"{GRID}::test_tiles_tiny_grid_strided", f"{GRID}::test_driver_tiny_grid_matches_c"]),
    Bug("hidden_fold_drops_nan", "the fold's NaN flag dropped",
        "hidden_cuda.cu",
        "float st[GMPO_LSE_STATE] = {nan ? NAN : m, s, w, 0.0f};",
        "float st[GMPO_LSE_STATE] = {((void)nan, m), s, w, 0.0f};",
        [f"{GRID}::test_driver_tiny_grid_matches_c"]),
    Bug("hidden_fold_negative_id", "an id < 0 not marked invalid (only id >= V)",
        "hidden_cuda.cu",
        "(id < 0 || id >= a.V)",
        "(id >= a.V)",
        ["tests/test_hidden.py::test_cuda_kernels_never_read_out_of_bounds_ids",
         f"{GRID}::test_driver_tiny_grid_matches_c"]),
    Bug("loss_input_row_offset_32bit", "32-bit truncation of an input's row offset",
        "gmpo_loss.cu",
        "    return (const char *)v.data + i * v.stride_b * gmpo_dtype_size(v.dtype);",
        "    return (const char *)v.data + (int32_t)(i * v.stride_b) * gmpo_dtype_size(v.dtype);",
        [f"{GRID}::test_row_offsets_past_2_32"]),
    # caught before issue 19 only by the luck of a random id on a tile boundary
    Bug("hidden_fold_target_past_tile", "the target read one past the tile's last column",
        "hidden_cuda.cu",
        "if (local >= 0 && local < a.vn) st[3]",
        "if (local >= 0 && local <= a.vn) st[3]",
        [f"{GRID}::test_asan_tiles_run_clean", f"{GRID}::test_driver_tiny_grid_matches_c"]),
    # the GRPO family's kernels (gmpo_fam_fwd_kernel, gmpo_fam_bwd_kernel): their own
    # code, not gmpo_math.h's formulas (which the C core shares and its tests see)
    Bug("fam_bwd_stride_from_grid_x", "grid-stride loop: grid.x's size as grid.y's stride",
        "gmpo_loss.cu",
        "const int64_t ystride = (int64_t)gridDim.y * blockDim.x;",
        "const int64_t ystride = (int64_t)gridDim.x * blockDim.x;",
        [*FAM, f"{GRID}::test_family_tiny_grid"]),
    Bug("fam_bwd_grad_row_offset_32bit", "32-bit truncation of the gradient's row offset",
        "gmpo_loss.cu",
        "char *gr = (char *)grad + gmpo_dtype_size(gdt) * (i * T);",
        "char *gr = (char *)grad + gmpo_dtype_size(gdt) * (int32_t)(i * T);",
        [*FAM, f"{GRID}::test_row_offsets_past_2_32"]),
    Bug("fam_bwd_store_align_at_row_start", "vector store alignment checked at the row, not its head",
        "gmpo_loss.cu",
        "   // row i of grad\n    const bool vg = VEC > 1 && (uintptr_t)(gr + r.head * gmpo_dtype_size(gdt)) %",
        "   // row i of grad\n    const bool vg = VEC > 1 && (uintptr_t)gr %",
        [*FAM]),
    Bug("fam_tok_mask_vec_from_mask_view", "token_mask's vector flag from the mask's view (stride, dtype)",
        "gmpo_loss.cu",
        "f.vtm = gmpo_row_vec<VEC>(a.tok_mask, f.tm, r.head);",
        "f.vtm = gmpo_row_vec<VEC>(a.mask, f.tm, r.head);",
        [*FAM]),
    Bug("fam_samp_logp_vec_from_logp", "sampling_logps' vector flag copied from logp's",
        "gmpo_loss.cu",
        "f.vslp = gmpo_row_vec<VEC>(a.samp_logp, f.slp, r.head);",
        "f.vslp = r.vlp;",
        [*FAM]),
    Bug("fam_bwd_row_weight_for_token_weights", "per-row is_weights where per-token ones were loaded (grad)",
        "gmpo_loss.cu",
        "tm[k], lp[k], olp[k], adv[k], ref[k], w[k]);",
        "tm[k], lp[k], olp[k], adv[k], ref[k], w_row);",
        [*FAM]),
    Bug("fam_fwd_row_adv_for_token_adv", "per-row advantage where per-token ones were loaded (forward)",
        "gmpo_loss.cu",
        "f.slp ? slp[k] : lp[k], adv[k],",
        "f.slp ? slp[k] : lp[k], adv_row,",
        [*FAM]),
    Bug("fam_bwd_tail_index_no_head", "the tail tokens' index forgets the row's head (grad)",
        "gmpo_loss.cu",
        "gmpo_fam_bwd_group<Acc, 1>(a, fo, r, f, j < r.head ? j : tail + (j - r.head),",
        "gmpo_fam_bwd_group<Acc, 1>(a, fo, r, f, j < r.head ? j : tail + j,",
        [*FAM]),
    Bug("fam_bwd_absent_tok_mask_zero", "an absent token_mask read as 0, not 1 (grad)",
        "gmpo_loss.cu",
        "        gmpo_fam_load<Acc, VEC>(a.tok_mask, f.tm, f.vtm, t, (Acc)1, tm);",
        "        gmpo_fam_load<Acc, VEC>(a.tok_mask, f.tm, f.vtm, t, (Acc)0, tm);",
        [*FAM]),
    Bug("fam_fwd_logw_skips_padding", "vespo's unmasked log-weight sum moved below the padding early-out",
        "gmpo_loss.cu",
        "    if (vw) {\n        gmpo_load_tokens<Acc, VEC>(a.is_w, r.w, r.vw, t, w);\n#pragma unroll\n"
        "        for (int k = 0; k < VEC; k++) *logw += gmpo_fam_lw(w[k]);\n    }\n"
        "    if (!gmpo_load_group<Acc, VEC>(a, r, t, adv_row, w_row, m, lp, olp, adv, ref, w)) return;\n",
        "    if (!gmpo_load_group<Acc, VEC>(a, r, t, adv_row, w_row, m, lp, olp, adv, ref, w)) return;\n"
        "    if (vw) {\n        gmpo_load_tokens<Acc, VEC>(a.is_w, r.w, r.vw, t, w);\n#pragma unroll\n"
        "        for (int k = 0; k < VEC; k++) *logw += gmpo_fam_lw(w[k]);\n    }\n",
        [*FAM]),
    Bug("fam_fwd_sums_at_row_stride", "split rows' sums written at the rows' stride (10), not the sums' (8)",
        "gmpo_loss.cu",
        "sums[i * GMPO_SUM_STATS + k] = sm[k];",
        "sums[i * GMPO_ROW_STATS + k] = sm[k];",
        [*FAM, "tests/test_distributed.py::test_two_ranks[simt]"]),
    Bug("fam_fwd_samp_logp_not_loaded", "the forward's sampler rows not loaded (the backward's false)",
        "gmpo_loss.cu",
        "gmpo_make_fam_rows<VEC>(a, r, i, fo.opm);",
        "gmpo_make_fam_rows<VEC>(a, r, i, false);",
        [*FAM]),
]


def pattern_problems(bugs=BUGS, cuda=CUDA) -> list[str]:
    """Bugs whose text no longer occurs exactly once in the current sources."""
    out = []
    for b in bugs:
        n = (cuda / b.file).read_text().count(b.old)
        if n != 1:
            out.append(f"{b.name}: its text occurs {n} times in csrc/cuda/{b.file} (update BUGS)")
    return out


def plant(bug: Bug) -> pathlib.Path:
    dst = SCRATCH / bug.name / "cuda"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(CUDA, dst)
    path = dst / bug.file
    text = path.read_text()
    assert text.count(bug.old) == 1, bug.name
    path.write_text(text.replace(bug.old, bug.new))
    # the other kernels: links to the clean ones, so that their cached objects
    # (keyed by the resolved path) serve every plant and only the planted file
    # is compiled in each build
    for src in dst.glob("*.cu"):
        if src.name != bug.file:
            src.unlink()
            src.symlink_to(CUDA / src.name)
    # the copy includes ../gmpo.h etc.: headers of csrc next to it
    for h in (REPO / "csrc").glob("*.h"):
        shutil.copy2(h, dst.parent / h.name)
    return dst


WHOLE = ["-m", "simt", "tests"]   # --whole: every SIMT test instead of a bug's own list


def run_tests(bug: Bug, cuda_dir: pathlib.Path, timeout: float, whole: bool = False,
              first: bool = False) -> tuple[bool, list[str], str]:
    env = dict(os.environ, SIMT_CUDA_DIR=str(cuda_dir), SIMT_QUIET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
           *(["-x"] if first else []), *(WHOLE if whole else bug.tests)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, ["(timed out: a hang is caught too)"], ""
    out = proc.stdout + proc.stderr
    if "BuildError" in out:   # the planted copy must build (warnings are errors): not a catch
        return False, ["(the planted copy does not build: fix its text in BUGS)"], out
    failed = sorted(set(re.findall(r"^FAILED (\S+)", out, re.M)))
    errors = sorted(set(re.findall(r"^ERROR (\S+)", out, re.M)))
    if proc.returncode not in (0, 1):
        return True, failed + errors + [f"(pytest exit {proc.returncode})"], out
    return proc.returncode == 1, failed + errors, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="bug names to plant (default: all)")
    ap.add_argument("--list", action="store_true", help="list the bugs and exit")
    ap.add_argument("--check", action="store_true", help="only check that every pattern applies")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per bug's test run")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the test output of missed bugs")
    ap.add_argument("--whole", action="store_true",
                    help="run the whole `-m simt` selection against each bug, not its own tests")
    ap.add_argument("-x", "--first", action="store_true", help="stop each run at its first failing test")
    args = ap.parse_args(argv)
    bugs = [b for b in BUGS if not args.only or b.name in args.only]
    if args.list:
        for b in bugs:
            print(f"{b.name:36} {b.kind}  [{b.file}]  tests: {' '.join(b.tests)}")
        return 0
    problems = pattern_problems(bugs)
    if problems or args.check:
        print("\n".join(problems) or f"all {len(bugs)} patterns apply")
        return 1 if problems else 0
    rows, missed = [], 0
    for b in bugs:
        t0 = time.time()
        caught, failed, out = run_tests(b, plant(b), args.timeout, args.whole, args.first)
        missed += not caught
        rows.append((b.name, b.kind, "caught" if caught else "MISSED", f"{time.time() - t0:.0f}s",
                     ", ".join(f.split("::")[-1] for f in failed) or "-"))
        print(f"{rows[-1][2]:7} {b.name} ({rows[-1][3]}): {rows[-1][4]}", flush=True)
        if not caught and args.verbose:
            print(out[-4000:])
    print()
    print("| bug | kind | result | time | failing tests |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n{len(rows) - missed} of {len(rows)} caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
