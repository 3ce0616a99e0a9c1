"""The docs: generated blocks current, sources present, links resolving, README short.

tools/gen_docs.py writes every block between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` in README.md and docs/*.md from its results file
(benchmark CSVs, the main job's summary, the engine test). The first test runs
its check on the repository; the others show, on small trees in tmp_path, that
the check catches each kind of problem it exists for.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gen_docs  # noqa: E402


def test_docs_are_current():
    """README.md and docs/*.md: every generated block equals what its sources
    render, no source is missing (but the named pending ones), every relative
    link and anchor resolves, README.md has at most 200 lines."""
    rep = gen_docs.run(ROOT)
    assert rep.errors == [], "\n".join(rep.errors + ["(python tools/gen_docs.py rewrites blocks)"])
    for note in rep.notes:   # what is pending, said in the test's output
        print(note)


def test_pending_is_only_the_main_jobs_output():
    """A pending source is reported, not checked; only the main job's summary
    block may wait on one, and a pending file must really be missing (once it
    is committed the check fails until its PENDING entry is removed)."""
    waiting = {n for n, b in gen_docs.BLOCKS.items() if any(s in gen_docs.PENDING for s in b.sources)}
    assert waiting <= {"demo-summary"}, waiting
    assert set(gen_docs.PENDING) <= {"docs/demo/summary.md", "docs/demo/demo.png"}
    for p in gen_docs.PENDING:
        assert not (ROOT / p).exists(), f"{p} exists: remove it from PENDING in tools/gen_docs.py"


def test_readme_keeps_the_two_setup_commands():
    """.ci/run runs the README's test command verbatim; both commands stay in it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    test_cmd = ('pip install -e ".[test]" && pip install --no-deps -r tests/requirements-verl.txt'
                ' && python -m pytest -q')
    assert f"\n{test_cmd}\n" in text
    # the main job writes to its default folder: the set-up command rewrites no tracked
    # file (the maintainers' regeneration into docs/demo is in docs/demo.md)
    assert '\npip install -e ".[demo]" && python -m gmpo_ext.demo\n' in text
    assert "--out docs/demo" not in text
    assert test_cmd in (ROOT / ".ci/run").read_text()
    # the verl tests compare with verl itself: the command installs it
    reqs = (ROOT / "tests/requirements-verl.txt").read_text()
    assert "verl==" in reqs


def test_demo_extra_has_what_the_demo_imports():
    """The main job's command installs the demo extra: it must carry every
    third-party package gmpo_ext/demo.py imports."""
    import ast
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib/tomli")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["demo"]
    have = {r.split("=")[0].split("<")[0].split(">")[0].split("[")[0].strip().lower()
            for r in extra}
    tree = ast.parse((ROOT / "gmpo_ext" / "demo.py").read_text(encoding="utf-8"))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
    stdlib = set(getattr(sys, "stdlib_module_names", ())) or {
        "argparse", "csv", "math", "os", "random", "sys", "time", "json", "dataclasses",
        "pathlib", "statistics", "warnings", "itertools", "functools", "contextlib", "typing",
        "collections", "shutil", "tempfile", "__future__"}
    pip_name = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}
    third = {pip_name.get(m, m).lower() for m in mods
             if m not in stdlib and m not in ("gmpo_ext", "__future__")}
    provided_by = {"numpy": "matplotlib"}   # a hard dependency of matplotlib
    missing = {m for m in third if m not in have and provided_by.get(m) not in have}
    assert not missing, f"gmpo_ext/demo.py imports {sorted(missing)}, not in the demo extra {extra}"


# ----------------------------------------------------------------------------
# the check itself, on small trees

def _toy(tmp_path: Path, readme: str, docs: dict[str, str] | None = None) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(readme, encoding="utf-8")
    for name, text in (docs or {}).items():
        (tmp_path / "docs" / name).write_text(text, encoding="utf-8")
    return tmp_path


def _csv_block(root, path):
    rows = (root / path).read_text().split()
    return f"| n |\n| ---: |\n" + "\n".join(f"| {r} |" for r in rows[1:])


TOY = {"numbers": gen_docs.Block(("results/n.csv",), _csv_block)}
BLOCK = "<!-- generated:numbers -->\n| n |\n| ---: |\n| 1 |\n| 2 |\n<!-- /generated:numbers -->\n"


def test_check_catches_drift_and_write_fixes_it(tmp_path):
    root = _toy(tmp_path, "# t\n\n" + BLOCK)
    (root / "results").mkdir()
    (root / "results/n.csv").write_text("n\n1\n2\n")
    assert gen_docs.run(root, blocks=TOY, pending={}).errors == []
    (root / "results/n.csv").write_text("n\n1\n3\n")            # a new result
    errs = gen_docs.run(root, blocks=TOY, pending={}).errors
    assert errs == ["README.md: numbers: differs from its sources (run python tools/gen_docs.py)"]
    gen_docs.run(root, write=True, blocks=TOY, pending={})
    assert "| 3 |" in (root / "README.md").read_text()
    assert gen_docs.run(root, blocks=TOY, pending={}).errors == []
    text = (root / "README.md").read_text().replace("| 3 |", "| 4 |")   # edited by hand
    (root / "README.md").write_text(text)
    assert len(gen_docs.run(root, blocks=TOY, pending={}).errors) == 1


def test_check_catches_missing_unknown_and_unused_blocks(tmp_path):
    root = _toy(tmp_path, "# t\n\n" + BLOCK, {"a.md": "<!-- generated:nope -->\nx\n"
                                                      "<!-- /generated:nope -->\n"})
    blocks = dict(TOY, unused=gen_docs.Block(("results/n.csv",), _csv_block))
    errs = "\n".join(gen_docs.run(root, blocks=blocks, pending={}).errors)
    assert "README.md: block 'numbers': source missing: results/n.csv" in errs
    assert "docs/a.md: block 'nope' is not in BLOCKS" in errs
    assert "block 'unused' is registered but no README.md or docs/*.md has it" in errs
    (root / "docs/a.md").write_text("<!-- generated:numbers -->\nno end\n")
    errs = "\n".join(gen_docs.run(root, blocks=TOY, pending={}).errors)
    assert "docs/a.md: block 'numbers': no closing" in errs


def test_pending_source_is_reported_then_must_be_flipped(tmp_path):
    pending = {"results/n.csv": "a job that has not run"}
    root = _toy(tmp_path, "# t\n\n<!-- generated:numbers -->\n<!-- /generated:numbers -->\n")
    rep = gen_docs.run(root, write=True, blocks=TOY, pending=pending)
    assert rep.errors == []
    assert any("source missing: results/n.csv (pending: a job" in n for n in rep.notes)
    assert "Not generated yet: `results/n.csv`" in (root / "README.md").read_text()
    assert gen_docs.run(root, blocks=TOY, pending=pending).errors == []
    (root / "results").mkdir()
    (root / "results/n.csv").write_text("n\n5\n")
    errs = gen_docs.run(root, blocks=TOY, pending=pending).errors
    assert any("results/n.csv exists now: remove its PENDING entry" in e for e in errs)
    assert gen_docs.run(root, write=True, blocks=TOY, pending={}).errors == []
    assert "| 5 |" in (root / "README.md").read_text()


def _demo_run(root: Path):
    """A small run's outputs in root/docs/demo, written by the demo's own writers."""
    from gmpo_ext import demo
    recs = []
    for m, vals in (("gmpo", [0.9, 0.4, 0.6]), ("grpo", [0.5, 0.8, 0.55])):
        for seed, v in enumerate(vals):
            for t in range(1, 11):
                recs.append({"method": m, "seed": seed, "step": t, "reward": v + 0.001 * t,
                             "log_ratio_min": -0.1 * (seed + 1), "log_ratio_max": 0.2,
                             "entropy": 1.0 + 0.01 * seed, "clip_frac": 0.0, "kl_old": 0.0,
                             "grad_norm": 1.0, "loss": 0.0})
    cfg = {"methods": ["gmpo", "grpo"], "seeds": [0, 1, 2], "steps": 10, "description": "A run.",
           "implementations": {"gmpo": "gmpo_ext.trl.GMPOTrainer",
                               "grpo": "gmpo_ext.trl.GRPOTrainer"}}
    s = demo.summarize(recs, cfg["methods"], cfg["seeds"], 10, config=cfg)
    s["wall_s"] = {"total": 30.0, "per_run": {"gmpo": {"0": 5.0}, "grpo": {"0": 5.0}}}
    out = root / "docs" / "demo"
    out.mkdir(parents=True)
    demo.write_outputs(str(out), recs, s, "t")
    return out


def test_demo_summary_is_checked_against_the_runs_data(tmp_path):
    """The README's demo block and docs/demo/summary.md are rendered from the run's
    demo.csv and summary.json by the demo's own functions: a number doctored in
    either (or in the CSV) fails the check, and the write mode restores them."""
    root = _toy(tmp_path, "# t\n\n<!-- generated:demo-summary -->\n"
                          "<!-- /generated:demo-summary -->\n")
    out = _demo_run(root)
    blocks = {"demo-summary": gen_docs.BLOCKS["demo-summary"]}
    files = gen_docs.FILES
    assert set(files) == {"docs/demo/summary.md"}
    assert gen_docs.run(root, write=True, blocks=blocks, pending={}, files=files).errors == []
    md = (out / "summary.md").read_text()
    readme = (root / "README.md").read_text()
    assert md.strip() in readme and "| GMPO | `gmpo_ext.trl.GMPOTrainer` |" in md
    assert gen_docs.run(root, blocks=blocks, pending={}, files=files).errors == []
    cell = md.split("| GMPO | `gmpo_ext.trl.GMPOTrainer` | ")[1].split(" ")[0]   # GMPO's reward
    doctored = f"{float(cell) + 0.05:.3f}"
    # a doctored number in summary.md and the README together (the old check's blind spot)
    (out / "summary.md").write_text(md.replace(cell, doctored, 1))
    (root / "README.md").write_text(readme.replace(cell, doctored, 1))
    errs = gen_docs.run(root, blocks=blocks, pending={}, files=files).errors
    assert sorted(errs) == [
        "README.md: demo-summary: differs from its sources (run python tools/gen_docs.py)",
        "docs/demo/summary.md: differs from its sources (run python tools/gen_docs.py)"]
    assert gen_docs.run(root, write=True, blocks=blocks, pending={}, files=files).errors == []
    assert (out / "summary.md").read_text() == md and (root / "README.md").read_text() == readme
    # a number in summary.md alone
    (out / "summary.md").write_text(md.replace(cell, doctored, 1))
    assert gen_docs.run(root, blocks=blocks, pending={}, files=files).errors == [
        "docs/demo/summary.md: differs from its sources (run python tools/gen_docs.py)"]
    (out / "summary.md").write_text(md)
    # the data changed (another run's CSV): both differ until regenerated
    csv_text = (out / "demo.csv").read_text()
    (out / "demo.csv").write_text(csv_text.replace("gmpo,0,10,0.91,", "gmpo,0,10,0.31,"))
    assert len(gen_docs.run(root, blocks=blocks, pending={}, files=files).errors) == 2


def test_committed_summary_json_matches_its_csv():
    """The statistics stored in docs/demo/summary.json (per seed, per method, paired,
    the sentences) are the ones demo.csv gives: summary.md and the README are
    checked by the generator, this covers the JSON a reader may load instead."""
    import json
    from gmpo_ext import demo
    out = ROOT / "docs" / "demo"
    saved = json.loads((out / "summary.json").read_text())
    again = json.loads(json.dumps(demo.summary_from_outputs(str(out))))
    for key in ("per_seed", "methods", "paired", "measures", "final_window_steps", "sentences"):
        assert again[key] == saved[key], key     # the same code on the same CSV: equal


def test_check_catches_a_long_readme(tmp_path):
    root = _toy(tmp_path, "# t\n" + "line\n" * gen_docs.README_MAX_LINES)
    errs = gen_docs.run(root, blocks={}, pending={}).errors
    assert errs == [f"README.md has {gen_docs.README_MAX_LINES + 1} lines, more than "
                    f"{gen_docs.README_MAX_LINES}: move detail to docs/"]


def test_check_catches_broken_links_and_anchors(tmp_path):
    root = _toy(tmp_path, "# Top\n\n## A `b` (c.d)\n\nsee [x](docs/x.md#second-part), "
                          "[y](#a-b-cd), [web](https://example.com/nope.md), "
                          "`[not a link](nowhere.md)`\n\n```\n[nor](this.md)\n```\n",
                {"x.md": "# X\n\n## Second part\n\n[back](../README.md#top) "
                         "![plot](../img.png)\n"})
    (root / "img.png").write_bytes(b"")
    assert gen_docs.run(root, blocks={}, pending={}).errors == []
    (root / "img.png").unlink()
    text = (root / "README.md").read_text()
    (root / "README.md").write_text(text.replace("#second-part", "#third-part")
                                    .replace("#a-b-cd", "#a-b"))
    errs = gen_docs.run(root, blocks={}, pending={}).errors
    assert sorted(errs) == sorted([
        "README.md:5: link 'docs/x.md#third-part': docs/x.md has no heading with the anchor "
        "#third-part",
        "README.md:5: link '#a-b': README.md has no heading with the anchor #a-b",
        "docs/x.md:5: link '../img.png': img.png does not exist"])
    (root / "README.md").write_text(text)
    rep = gen_docs.run(root, blocks={}, pending={"img.png": "later"})   # a pending target
    assert rep.errors == [] and rep.notes == [
        "docs/x.md:5: link '../img.png': target missing (pending: later)"]
