#!/usr/bin/env python
"""Regenerate the generated blocks of README.md and docs/*.md from their results files.

A generated block is the text between two marker lines,

    <!-- generated:NAME -->
    ...
    <!-- /generated:NAME -->

and NAME is a key of BLOCKS below: the files it is made from (benchmark CSVs,
the main job's summary, the engine test) and the function that renders them.
Every number in the docs that comes from a results file sits in such a block,
so it is written by this script, never typed.

    python tools/gen_docs.py            # rewrite every block (and report what changed)
    python tools/gen_docs.py --check    # change nothing; exit 1 on any problem

FILES names whole files that are generated the same way (docs/demo/summary.md:
the main job writes it, and it must equal what the run's demo.csv and
summary.json render); the script rewrites them too and --check compares them.

--check (and tests/test_docs.py) fails when a block or a file of FILES differs
from what its sources render, when a block's source is missing, when a block names no
registered NAME or a registered NAME has no block, when README.md is longer
than README_MAX_LINES lines, or when a relative link (file or #anchor) in a
markdown file of the repository does not resolve.

PENDING names the files that a job of issue 18 will write but that are not
committed yet. A missing pending file is reported ("pending"), not an error: a
block made from it shows a fixed placeholder, and a link to it is allowed. Once
the file exists, --check fails until its entry is removed from PENDING (so the
block is then checked against it like any other).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200
RESULTS = "benchmarks/results"

# files a job of issue 18 writes that are not committed yet: path -> who writes it.
# The integrator removes an entry once the file is committed (--check says when).
PENDING: dict = {}


# ----------------------------------------------------------------------------
# reading the sources

def _rows(root: Path, rel: str) -> list[dict]:
    with open(root / rel, newline="") as f:
        return list(csv.DictReader(f))


_MODULES: dict[Path, object] = {}


def _module(root: Path, rel: str):
    """Import the script or test module ``rel`` (its directory on sys.path, as when
    it runs), once per path."""
    path = (root / rel).resolve()
    if str(root) not in sys.path:       # the checkout's gmpo_ext, as the tests import it
        sys.path.append(str(root))
    if path not in _MODULES:
        sys.path.insert(0, str(path.parent))
        try:
            spec = importlib.util.spec_from_file_location(f"_gen_docs_{path.stem}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        finally:
            sys.path.remove(str(path.parent))
        _MODULES[path] = mod
    return _MODULES[path]


def _f(x, nd=2) -> str:
    return f"{float(x):.{nd}f}"


def _mib(x) -> str:
    return f"{float(x):,.0f} MiB"


# ----------------------------------------------------------------------------
# renderers: (root, *source paths) -> markdown

def render_demo_summary(root: Path, csv_path: str, json_path: str) -> str:
    """The main job's summary (the markdown fragment gmpo_ext.demo writes as
    summary.md), recomputed from the run's data: the statistics from demo.csv,
    the configuration, wall time and load from summary.json, rendered by the
    demo's own summarize() and summary_markdown() (the checkout's
    gmpo_ext/demo.py). A number doctored in summary.md or in the README's copy
    differs from this."""
    demo = _module(ROOT, "gmpo_ext/demo.py")      # this checkout's, whatever root is
    out = (root / csv_path).parent
    if (root / json_path).parent != out:
        raise ValueError(f"{csv_path} and {json_path} must be in one folder")
    return demo.summary_markdown(demo.summary_from_outputs(str(out)))


def render_engines(root: Path, test_file: str) -> str:
    """The engine table of tests/test_trl_engines.py, inside the markers its
    test_readme_engine_table_is_current looks for in README.md."""
    table = _module(root, test_file).readme_table()
    return ("<!-- engines:begin (tests/test_trl_engines.py) -->\n" + table +
            "\n<!-- engines:end -->")


def render_grpo_options(root: Path, test_file: str) -> str:
    """The GRPOConfig option table of tests/test_trl_family.py, inside the markers
    its test_readme_option_table_is_current looks for in docs/trl-verl.md."""
    table = _module(root, test_file).option_table()
    return ("<!-- grpo-options:begin (tests/test_trl_family.py) -->\n" + table +
            "\n<!-- grpo-options:end -->")


def _loss_both(root: Path, rel: str) -> dict:
    """bench_loss rows, fp32 forward + backward, by (B, T, path)."""
    return {(int(r["B"]), int(r["T"]), r["path"]): r for r in _rows(root, rel)
            if r["dtype"] == "fp32" and r["mode"] == "both"}


def _hidden_rows(root: Path, rel: str) -> list[dict]:
    return [r for r in _rows(root, rel) if r["median_s"] not in ("nan", "")]


def _hidden_key(r) -> tuple:
    return (r["H"], r["V"], r["B"], r["T"], r["dtype"])


def render_headline(root: Path, loss: str, logits: str, hidden: str, step: str,
                    family: str) -> str:
    """The README's performance table: one headline ratio per benchmark."""
    by = _loss_both(root, loss)
    fused = sorted(((float(r["speedup_vs_eager"]), B, T) for (B, T, p), r in by.items()
                    if p == "fused"))
    lo, hi = fused[0], fused[-1]
    lg = {(r["dtype"], r["path"]): r for r in _rows(root, logits)}
    lg0 = next(iter(lg.values()))
    hd = [r for r in _hidden_rows(root, hidden) if r["H"] == "896" and r["dtype"] == "fp32"]
    big = max({_hidden_key(r) for r in hd}, key=lambda k: int(k[2]) * int(k[3]))
    hdp = {r["path"]: r for r in hd if _hidden_key(r) == big}
    st = _rows(root, step)
    st_ours = [r for r in st if r["trainer"] == "ours_fused"]
    st_trl = {(r["B"], r["T"]): r for r in st if r["trainer"] == "trl"}
    fam = [r for r in _rows(root, family) if r["trainer"] == "ours"]
    fam_lo = min(fam, key=lambda r: float(r["speedup_vs_trl"]))
    fam_hi = max(fam, key=lambda r: float(r["speedup_vs_trl"]))
    fam_peak = max(fam, key=lambda r: float(r["peak_vs_trl"]))
    fam_shapes = sorted({f"{r['B']} x {r['T']}" for r in fam})
    cpus = sorted({lg0["device_name"], next(iter(by.values()))["device_name"],
                   hd[0]["device"], st[0]["cpu"], fam[0]["device"]})

    def logit_cell(dt):
        return (f"{dt}: {_f(lg[(dt, 'fused')]['speedup_vs_trl'])}x, "
                f"{_f(lg[(dt, 'fused_inplace')]['speedup_vs_trl'])}x in place")

    rows = [
        ["the GMPO loss, fp32 (smallest and largest speed-up over the B x T grid)",
         "the eager PyTorch formula",
         f"{lo[0]:.1f}x ({lo[1]} x {lo[2]}) to {hi[0]:.1f}x ({hi[1]} x {hi[2]})", "-"],
        [f"the loss from logits (B={lg0['B']}, T={lg0['T']}, V={lg0['V']})",
         "TRL's log-softmax, gather and formula",
         f"{logit_cell('fp32')}; {logit_cell('bf16')}",
         f"beyond the logits, fp32: {_f(lg[('fp32', 'fused')]['peak_beyond_x_logits'], 1)}x their "
         f"size ({_f(lg[('fp32', 'fused_inplace')]['peak_beyond_x_logits'], 1)}x in place); "
         f"TRL's {_f(lg[('fp32', 'trl')]['peak_beyond_x_logits'], 1)}x"],
        [f"the loss from hidden states, LM head fused (H={big[0]}, V={big[1]}, "
         f"{int(big[2]) * int(big[3])} tokens, fp32)",
         "TRL 1.16's fused head (`chunked_logprob`)",
         f"{_f(hdp['ours']['speedup_vs_trl'])}x",
         f"{_mib(hdp['ours']['peak_beyond_mib'])}; TRL's {_mib(hdp['trl']['peak_beyond_mib'])}"],
        ["the trainer's loss step (`compute_loss` + backward, 2-layer Qwen2, "
         f"Qwen2.5-0.5B head, fp32)", "TRL's `GMPOTrainer`",
         "; ".join(f"B x T = {r['B']} x {r['T']}: {_f(r['speedup_vs_trl'])}x" for r in st_ours),
         "; ".join(f"{_mib(r['peak_mib'])}; TRL's {_mib(st_trl[(r['B'], r['T'])]['peak_mib'])}"
                   for r in st_ours)],
        [f"the GRPO family's trainer step ({len({r['loss'] for r in fam} - {'gspo'})} loss types "
         f"and GSPO, "
         f"B x T = {', '.join(fam_shapes)}, "
         f"{' and '.join(sorted({r['dtype'] for r in fam}, reverse=True))})",
         "TRL's `GRPOTrainer`, same loss type",
         f"{_f(fam_lo['speedup_vs_trl'])}x ({fam_lo['loss']}, {fam_lo['dtype']}) to "
         f"{_f(fam_hi['speedup_vs_trl'])}x ({fam_hi['loss']}, {fam_hi['dtype']})",
         f"at most {_f(fam_peak['peak_vs_trl'])} of TRL's ({fam_peak['dtype']})"],
    ]
    head = ["forward + backward of", "against", "faster by (median)", "peak memory"]
    out = ["| " + " | ".join(head) + " |", "| :--- | :--- | :--- | :--- |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append("")
    out.append(f"CPU only so far ({', '.join(cpus)}; 2 threads, shared machines); "
               "sources: `" + "`, `".join(Path(p).name for p in (loss, logits, hidden, step,
                                                                 family)) +
               "` in `benchmarks/results/`.")
    return "\n".join(out)


def render_bench_loss(root: Path, loss: str) -> str:
    """bench_loss.py's own table (fp32, forward + backward), from its CSV."""
    bl = _module(root, "benchmarks/bench_loss.py")
    return bl.readme_table(bl.load_csv(root / loss))


def render_bench_logits(root: Path, logits: str) -> str:
    """bench_logits.py's own table, from its CSV."""
    return _module(root, "benchmarks/bench_logits.py").readme_markdown(_rows(root, logits))


def render_bench_hidden(root: Path, hidden: str, rows_csv: str) -> str:
    """The fused head's findings in words, then the whole table, from bench_hidden's CSVs."""
    rs = _hidden_rows(root, hidden)
    cfg: dict[tuple, dict] = {}
    for r in rs:
        cfg.setdefault(_hidden_key(r), {})[r["path"]] = r
    big = [k for k in cfg if k[0] == "896" and k[4] == "fp32"]
    big = max(big, key=lambda k: int(k[2]) * int(k[3]))
    q = cfg[big]
    small = [r for r in rs if r["H"] == "256" and r["dtype"] == "fp32"]
    ours = [r for r in small if r["path"] == "ours"]
    trl = [r for r in small if r["path"] == "trl"]
    n = sorted(int(r["N"]) for r in ours)
    longest = max(ours, key=lambda r: int(r["N"]))
    peaks = [float(r["peak_beyond_mib"]) for r in ours]
    # mode="rows" against the default schedule: time from the timed rows run, memory
    # from the newest run of each (a later memory-only run has no time)
    rr = _rows(root, rows_csv)
    timed = {r["path"]: r for r in rr if r["H"] == "896" and r["median_s"] != "nan"}
    mem = {r["path"]: r for r in rr if r["H"] == "896"}
    rows_speed = float(timed["ours"]["median_s"]) / float(timed["rows"]["median_s"])
    rows_mem = float(mem["rows"]["peak_beyond_mib"]) / float(mem["ours"]["peak_beyond_mib"])
    text = (
        f"At the Qwen2.5-0.5B head (H={big[0]}, V={big[1]}), N={int(big[2]) * int(big[3])} "
        f"tokens, fp32, gmpo_ext is {_f(q['ours']['speedup_vs_trl'])}x faster than TRL's path "
        f"and holds {_mib(q['ours']['peak_beyond_mib'])} beyond the inputs and parameter "
        f"gradients ({q['ours']['peak_tiles']} of its tiles) where TRL's holds "
        f"{_mib(q['trl']['peak_beyond_mib'])} and full logits {_mib(q['full']['peak_beyond_mib'])}; "
        f"at H=256, V=32768 its peak stays at {min(peaks):.0f}-{max(peaks):.0f} MiB from "
        f"N={n[0]} to N={n[-1]} ({longest['B']} x {longest['T']}) while TRL's grows to "
        f"{max(float(r['peak_beyond_mib']) for r in trl) / 1024:.1f} GiB. `mode=\"rows\"` "
        f"(rows of {timed['rows']['T']} tokens, H={big[0]}) is {rows_speed:.2f}x faster than "
        f"the default token tiles and holds {rows_mem:.1f}x their memory; a 4096-token row "
        f"at V={big[1]} is {4096 * int(big[1]) * 4 / 2**20 / float(q['ours']['tile_mib']):.0f} "
        "fp32 tiles.")
    head = "| H | V | B x T | dtype | path | median s | peak MiB | tiles | x TRL |"
    out = [text, "", head, "| ---: | ---: | :--- | :--- | :--- | ---: | ---: | ---: | ---: |"]
    for r in rs:
        out.append(f"| {r['H']} | {r['V']} | {r['B']} x {r['T']} | {r['dtype']} | {r['path']} | "
                   f"{_f(r['median_s'])} | {_f(r['peak_beyond_mib'], 1)} | {r['peak_tiles']} | "
                   f"{r['speedup_vs_trl'] or '-'} |")
    out += ["", f"Machine: {rs[0]['device']}, {rs[0]['threads']} threads; git "
            f"{', '.join(sorted({r['rev'] for r in rs}))}; one run per row group, the paths "
            "interleaved on the same inputs."]
    return "\n".join(out)


def render_bench_trl_step(root: Path, step: str) -> str:
    """bench_trl_step.py's CSV as a table."""
    rs = _rows(root, step)
    names = {"trl": "TRL `GMPOTrainer`", "ours_fused": "gmpo_ext, LM head fused (default)",
             "ours_logits": "gmpo_ext, `fused_lm_head=False`"}
    out = ["| B x T (prompt P) | trainer | step s | x TRL | peak MiB | peak / TRL's |",
           "| :--- | :--- | ---: | ---: | ---: | ---: |"]
    for r in rs:
        out.append(f"| {r['B']} x {r['T']} ({r['P']}) | {names.get(r['trainer'], r['trainer'])} | "
                   f"{_f(r['seconds'])} | {r['speedup_vs_trl']}x | {_f(r['peak_mib'], 1)} | "
                   f"{r['peak_vs_trl']} |")
    out += ["", f"{rs[0]['cpu']}, {rs[0]['threads']} threads, H={rs[0]['H']}, V={rs[0]['V']}; "
            "the three trainers' losses are checked equal first (the `loss` column of the CSV)."]
    return "\n".join(out)


def render_bench_family(root: Path, fam: str) -> str:
    """bench_family.py's CSV as a table (one row per loss type and dtype)."""
    rs = _rows(root, fam)
    out = ["| loss (level) | dtype | B x T | TRL step s | ours step s | x TRL | TRL peak MiB | "
           "ours peak MiB | peak / TRL's | fused |",
           "| :--- | :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    trl = {(r["loss"], r["dtype"], r["B"], r["T"]): r for r in rs if r["trainer"] == "trl"}
    for r in rs:
        if r["trainer"] != "ours":
            continue
        t = trl[(r["loss"], r["dtype"], r["B"], r["T"])]
        out.append(f"| {r['loss']} ({r['level']}) | {r['dtype']} | {r['B']} x {r['T']} | "
                   f"{_f(t['seconds'])} | {_f(r['seconds'])} | {r['speedup_vs_trl']}x | "
                   f"{_f(t['peak_mib'], 1)} | {_f(r['peak_mib'], 1)} | {r['peak_vs_trl']} | "
                   f"{r['fused']} |")
    use = sorted(float(r["cpu_seconds"]) / float(r["seconds"]) for r in rs
                 if r.get("cpu_seconds"))
    load = (f"; each timed step's process CPU time over its wall time {use[0]:.2f} to "
            f"{use[-1]:.2f} (2.00: both cores throughout)" if use else "")
    trl_s = {}
    for r in rs:
        if r["trainer"] == "trl":
            trl_s.setdefault(r["dtype"], []).append(float(r["seconds"]))
    spread = "; TRL's steps " + ", ".join(f"{min(v):.1f} to {max(v):.1f} s in {d}"
                                         for d, v in trl_s.items())
    gerr = {}
    for r in rs:
        if r.get("grad_rel_err"):
            gerr[r["dtype"]] = max(gerr.get(r["dtype"], 0.0), float(r["grad_rel_err"]))
    checked = ("each case's loss and gradients checked against TRL's first (columns "
               "`loss_value`, `grad_rel_err` of the CSV: largest relative gradient difference "
               + ", ".join(f"{v:.1e} in {d}" for d, v in gerr.items()) + ")" if gerr else
               "each trainer's losses checked equal first (the `loss_value` column of the CSV)")
    out += ["", f"{rs[0]['device']}, {rs[0]['threads']} threads, H={rs[0]['H']}, V={rs[0]['V']}; "
            f"{checked}{load}{spread}."]
    return "\n".join(out)


def render_bench_distributed(root: Path, dist: str) -> str:
    """bench_distributed.py's table, and the collectives' share of the fused head's call."""
    bd = _module(root, "benchmarks/bench_distributed.py")
    table = bd.readme_table(root / dist)
    head2 = [r for r in _rows(root, dist) if r["path"] == "head" and r["world"] == "2"]
    share = float(head2[0]["collective_ms"]) / float(head2[0]["call_ms"])
    return (table + f"\n\nAt P = 2 the fused head's collectives take {100 * share:.1f}% of its "
            "call.")


API_FUNCTIONS = ("gmpo_loss", "grpo_loss", "gmpo_loss_from_logits", "grpo_loss_from_logits",
                 "selective_logps", "gmpo_loss_from_hidden", "grpo_loss_from_hidden",
                 "linear_logps", "GMPOLoss", "GRPOLoss")


def render_api_signatures(root: Path, *sources: str) -> str:
    """Every public function's arguments and defaults, read from the package itself
    (``inspect.signature``), so the reference cannot miss one."""
    import inspect
    sys.path.insert(0, str(root))
    try:
        import gmpo_ext
    finally:
        sys.path.remove(str(root))
    out = ["| function | arguments (after `*`: keyword only) |", "| :--- | :--- |"]
    for name in API_FUNCTIONS:
        parts, star = [], False
        for p in inspect.signature(getattr(gmpo_ext, name)).parameters.values():
            if p.kind is p.KEYWORD_ONLY and not star:
                parts.append("*")
                star = True
            if p.kind is p.VAR_KEYWORD:
                parts.append(f"**{p.name}")
            elif p.kind is p.VAR_POSITIONAL:
                parts.append(f"*{p.name}")
                star = True
            else:
                parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
        out.append(f"| `{name}` | `{', '.join(parts)}` |")
    return "\n".join(out)


@dataclass(frozen=True)
class Block:
    sources: tuple[str, ...]        # paths relative to the repository root
    render: Callable[..., str]      # render(root, *sources) -> markdown


BLOCKS: dict[str, Block] = {
    "demo-summary": Block(("docs/demo/demo.csv", "docs/demo/summary.json"), render_demo_summary),
    "api-signatures": Block(("gmpo_ext/__init__.py", "gmpo_ext/loss.py", "gmpo_ext/logits.py",
                             "gmpo_ext/hidden.py"), render_api_signatures),
    "engines": Block(("tests/test_trl_engines.py",), render_engines),
    "grpo-options": Block(("tests/test_trl_family.py",), render_grpo_options),
    "headline": Block((f"{RESULTS}/bench_loss_cpu.csv", f"{RESULTS}/bench_logits_cpu.csv",
                       f"{RESULTS}/bench_hidden_cpu.csv", f"{RESULTS}/bench_trl_step_cpu.csv",
                       f"{RESULTS}/bench_family_cpu.csv"),
                      render_headline),
    "bench-loss": Block((f"{RESULTS}/bench_loss_cpu.csv",), render_bench_loss),
    "bench-logits": Block((f"{RESULTS}/bench_logits_cpu.csv",), render_bench_logits),
    "bench-hidden": Block((f"{RESULTS}/bench_hidden_cpu.csv",
                           f"{RESULTS}/bench_hidden_rows_cpu.csv"), render_bench_hidden),
    "bench-trl-step": Block((f"{RESULTS}/bench_trl_step_cpu.csv",), render_bench_trl_step),
    "bench-family": Block((f"{RESULTS}/bench_family_cpu.csv",), render_bench_family),
    "bench-distributed": Block((f"{RESULTS}/bench_distributed_cpu.csv",),
                               render_bench_distributed),
}


# whole generated files: path -> how it is made (checked and rewritten like a block)
FILES: dict[str, Block] = {
    "docs/demo/summary.md": Block(("docs/demo/demo.csv", "docs/demo/summary.json"),
                                  render_demo_summary),
}


def pending_text(name: str, missing: list[str], pending: dict) -> str:
    """What a block shows while its pending source does not exist yet."""
    return "\n".join(f"_Not generated yet: `{p}` is written by {pending[p]}; then "
                     f"`python tools/gen_docs.py` puts it here._" for p in missing)


# ----------------------------------------------------------------------------
# blocks in the markdown files

OPEN = re.compile(r"^<!-- generated:([A-Za-z0-9_.-]+) -->[ \t]*$", re.M)


def doc_files(root: Path) -> list[Path]:
    """The files whose generated blocks are maintained: README.md and docs/*.md."""
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def find_blocks(text: str) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(name, start, end) of each block's body (between the marker lines), and errors."""
    blocks, errors = [], []
    for m in OPEN.finditer(text):
        name = m.group(1)
        close = f"<!-- /generated:{name} -->"
        j = text.find("\n" + close, m.end())
        nxt = OPEN.search(text, m.end())
        if j < 0 or (nxt and nxt.start() < j):
            errors.append(f"block {name!r}: no closing {close} before the next block")
            continue
        blocks.append((name, m.end(), j + 1))
    for m in re.finditer(r"^<!-- /generated:([A-Za-z0-9_.-]+) -->", text, re.M):
        if not any(b[0] == m.group(1) and b[2] == m.start() for b in blocks):
            errors.append(f"a closing marker for {m.group(1)!r} without its opening one")
    return blocks, errors


def render(root: Path, name: str, blocks=None, pending=None) -> tuple[str, list[str]]:
    """The body of block ``name`` (between the marker lines, newline-framed), and the
    pending sources it could not use."""
    blocks = BLOCKS if blocks is None else blocks
    pending = PENDING if pending is None else pending
    b = blocks[name]
    missing = [s for s in b.sources if not (root / s).exists()]
    if missing:
        if all(s in pending for s in missing):
            return "\n" + pending_text(name, missing, pending) + "\n", missing
        raise FileNotFoundError(", ".join(s for s in missing if s not in pending))
    return "\n" + b.render(root, *b.sources).strip("\n") + "\n", []


@dataclass
class Report:
    errors: list[str]
    notes: list[str]
    changed: list[str]


def run(root: Path = ROOT, write: bool = False, blocks=None, pending=None, files=None) -> Report:
    """Check (and with ``write`` rewrite) every generated block and file of
    ``files``, README.md's length and every relative link. ``files`` defaults to
    FILES with the default ``blocks``, to none with blocks of the caller's."""
    if files is None:
        files = FILES if blocks is None else {}
    blocks = BLOCKS if blocks is None else blocks
    pending = PENDING if pending is None else pending
    rep = Report([], [], [])
    for rel, b in files.items():
        missing = [s for s in b.sources if not (root / s).exists()]
        if missing:
            if not all(s in pending for s in missing):
                rep.errors.append(f"{rel}: source missing: "
                                  f"{', '.join(s for s in missing if s not in pending)}")
            continue
        want = b.render(root, *b.sources).strip("\n") + "\n"
        path = root / rel
        have = path.read_text(encoding="utf-8") if path.exists() else None
        if have != want:
            rep.changed.append(rel)
            if write:
                path.write_text(want, encoding="utf-8")
    seen = set()
    for p in pending:
        if (root / p).exists():
            rep.errors.append(f"{p} exists now: remove its PENDING entry in tools/gen_docs.py "
                              "and run python tools/gen_docs.py")
    for path in doc_files(root):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        found, errs = find_blocks(text)
        rep.errors += [f"{rel}: {e}" for e in errs]
        new, pos = [], 0
        for name, i, j in found:
            seen.add(name)
            if name not in blocks:
                rep.errors.append(f"{rel}: block {name!r} is not in BLOCKS "
                                  f"(known: {', '.join(sorted(blocks))})")
                continue
            try:
                body, waiting = render(root, name, blocks, pending)
            except FileNotFoundError as e:
                rep.errors.append(f"{rel}: block {name!r}: source missing: {e}")
                continue
            for s in waiting:
                rep.notes.append(f"{rel}: block {name!r}: source missing: {s} "
                                 f"(pending: {pending[s]})")
            if text[i:j] != body:
                rep.changed.append(f"{rel}: {name}")
                new.append(text[pos:i] + body)
                pos = j
        if write and pos:
            path.write_text("".join(new) + text[pos:], encoding="utf-8")
    for name in sorted(set(blocks) - seen):
        rep.errors.append(f"block {name!r} is registered but no README.md or docs/*.md has it")
    if not write:
        rep.errors += [f"{c}: differs from its sources (run python tools/gen_docs.py)"
                       for c in rep.changed]
    n = len((root / "README.md").read_text(encoding="utf-8").splitlines())
    if n > README_MAX_LINES:
        rep.errors.append(f"README.md has {n} lines, more than {README_MAX_LINES}: move detail "
                          "to docs/")
    link_errors, link_notes = check_links(root, pending)
    rep.errors += link_errors
    rep.notes += link_notes
    return rep


# ----------------------------------------------------------------------------
# links

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files(root: Path) -> list[Path]:
    """Every markdown file git tracks (or, outside git, every one under root)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.md"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.split()
        files = [root / p for p in out if (root / p).exists()]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        files = [p for p in root.rglob("*.md") if ".git" not in p.parts]
    return sorted(set(files))


def strip_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans blanked (lines kept)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", lambda m: "\n" * m.group(0).count("\n"), text,
                  flags=re.M | re.S)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text)


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    out, count = set(), {}
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", strip_code_blocks(text), re.M):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))    # [x](y) -> x
        a = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")
        k = count.get(a, 0)
        count[a] = k + 1
        out.add(a if k == 0 else f"{a}-{k}")
    return out


def strip_code_blocks(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)


def check_links(root: Path, pending=None) -> tuple[list[str], list[str]]:
    """Every relative link and image of every markdown file: the file exists (or is
    pending) and a #anchor names a heading of the markdown file it points at."""
    pending = PENDING if pending is None else pending
    errors, notes = [], []
    for md in markdown_files(root):
        rel = md.relative_to(root).as_posix()
        text = md.read_text(encoding="utf-8")
        for line_no, line in enumerate(strip_code(text).splitlines(), 1):
            for m in LINK.finditer(line):
                target = m.group(1)
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
                    continue                                 # http:, https:, mailto:
                path, _, frag = target.partition("#")
                dest = (md.parent / path).resolve() if path else md
                where = f"{rel}:{line_no}: link {target!r}"
                try:
                    drel = dest.relative_to(root.resolve()).as_posix()
                except ValueError:
                    errors.append(f"{where} leaves the repository")
                    continue
                if not dest.exists():
                    if drel in pending:
                        notes.append(f"{where}: target missing (pending: {pending[drel]})")
                    else:
                        errors.append(f"{where}: {drel} does not exist")
                    continue
                if frag and dest.suffix == ".md" and frag not in anchors(
                        dest.read_text(encoding="utf-8")):
                    errors.append(f"{where}: {drel} has no heading with the anchor #{frag}")
    return errors, notes


# ----------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 when a block drifted, a source or a link "
                         "target is missing or README.md is too long")
    args = ap.parse_args(argv)
    rep = run(ROOT, write=not args.check)
    for n in rep.notes:
        print(f"note: {n}")
    if not args.check:
        for c in rep.changed:
            print(f"rewrote {c}")
    for e in rep.errors:
        print(f"error: {e}", file=sys.stderr)
    if not rep.errors and args.check:
        print(f"ok: {sum(1 for _ in BLOCKS)} generated blocks current, links resolve")
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
