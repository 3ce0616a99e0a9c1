"""gmpo_ext.trl.GMPOTrainer (and GRPOTrainer) under the training engines, 2 processes
on CPU (gloo).

Each test launches tests/_trl_engine_worker.py with ``torch.distributed.run``
once per engine and runs several variants in it: the real TRL trainer step
(``compute_loss`` on the engine-wrapped model, the engine's backward) on a
fixed batch of 8 rows split over the 2 ranks. For every variant it asserts

* the fused head ran: linear_logps was called and the LM head module itself
  never projected more than one position (the model's last-position logits
  of the head check), i.e. the (B, T, V) logits were never formed;
* the loss (averaged over ranks) and every trainable parameter's full
  gradient, reduced by the engine as it reduces every other parameter's,
  equal TRL's own GMPOTrainer (GRPOTrainer for ``grpo``) in one process on
  the whole batch (fp32, 1e-5 relative to the tensor's largest entry); under
  bf16 autocast (``bf16``, logits of |z| = 30) the loss within 2e-3 of TRL's
  bf16 trainer and each gradient's error against TRL's fp32 one at most twice
  TRL's own bf16 error;

and, for ``train``, that one ``trainer.train()`` step with generation and 2
gradient-accumulation micro-batches runs fused under FSDP2 (the second
micro-batch crashed before the head moved into the model's forward).

accelerate does not turn FSDP or DeepSpeed on for a CPU run by itself: the
worker switches accelerate's state to FSDP (its own FSDP preparation then
runs) and calls deepspeed.initialize directly for ZeRO-3
(stage3_param_persistence_threshold=0, so the tiny head is partitioned like a
real one).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[test]' installs it)")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _trl_engine_worker as worker  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]

RTOL = 1e-5

ENGINES = {
    "ddp": ["plain", "tied", "lora", "ga", "gc", "bf16", "grpo"],
    "fsdp1": ["plain", "tied", "ga"],
    "fsdp2": ["plain", "tied", "lora", "ga", "train", "rank1fail", "bf16", "grpo"],
    "zero3": ["plain", "tied", "ga", "rank1fail", "grpo"],
}

# what linear_logps says of the head's weight outside the forward, per engine
DIRECT = {
    "ddp": None,
    "fsdp1": ("ValueError", "FSDP1 flat-parameter shard"),
    "fsdp2": ("TypeError", "is a DTensor"),
    "zero3": ("ValueError", "ZeRO-3 partition"),
}


def _launch(engine, variants, out):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                   if p]),
        OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    # --standalone: a free port for the rendezvous (a fixed one collides, port 0 hangs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "_trl_engine_worker.py"), engine, str(out), *variants]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        pytest.fail(f"{engine} workers failed (exit {proc.returncode}):\n{tail}")


def _max_rel(ref, got):
    scale = ref.abs().max()
    return float((ref - got).abs().max() / scale) if scale > 0 else float(got.abs().max())


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_matches_trl_single_process(engine, tmp_path):
    if engine == "zero3":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (the test extra has it)")
    if engine != "ddp" or "lora" in ENGINES[engine]:
        pytest.importorskip("peft", reason="peft is not installed (the test extra has it)")
    variants = ENGINES[engine]
    _launch(engine, variants, tmp_path)
    tok = worker._tok()
    for variant in variants:
        got = torch.load(tmp_path / f"{variant}.pt", weights_only=False)
        what = f"{engine}/{variant}"
        assert got["wrapped"] == engine, (what, got["wrapped"])
        if variant == "rank1fail":   # every rank on the logits path (a hang before)
            assert not got["fused"] and any("another rank" in w for w in got["warned"]), got
            assert got["calls"]["head_in"] == worker.T + 1, (what, got["calls"])
        else:
            assert got["fused"] and not got["warned"], (what, got["warned"])
            assert got["calls"]["linear_logps"] >= 1, what
            assert got["calls"]["head_in"] == 1, (what, got["calls"])   # never the completion
        if variant == "train":
            assert got["steps"] == 1 and torch.isfinite(torch.tensor(got["loss"])), what
            continue
        # the head's weight handed to linear_logps outside the forward: refused,
        # saying what to do, where the engine shards it (DDP: a plain tensor)
        if variant == "plain":
            want = DIRECT[engine]
            got_direct = got["direct"]
            assert (got_direct is None) if want is None else \
                (got_direct[0] == want[0] and want[1] in got_direct[1]), (what, got_direct)
        opts, path = set(variant.split("+")), str(tmp_path / f"model_{variant}")
        if "bf16" in opts:
            _assert_bf16_close(what, got, *worker.reference(tok, opts, path),
                               *worker.reference(tok, opts, path, bf16=True))
            continue
        ref_loss, ref_grads = worker.reference(tok, opts, path)
        assert abs(got["loss"] - ref_loss) <= RTOL * abs(ref_loss), (what, got["loss"], ref_loss)
        assert set(got["grads"]) == set(ref_grads), (what, set(got["grads"]) ^ set(ref_grads))
        for name, g in ref_grads.items():
            assert _max_rel(g, got["grads"][name]) <= RTOL, (what, name,
                                                             _max_rel(g, got["grads"][name]))
        assert sum(bool(g.abs().max() > 0) for g in ref_grads.values()) >= len(ref_grads) - 1
        if "lora" in variant:   # the head frozen: the fused head computed no weight gradient
            assert not any("lm_head" in n for n in ref_grads), what


def _assert_bf16_close(what, got, l32, g32, l16, g16):
    """bf16 under the engine against TRL's trainer in one process: the loss within
    2e-3 of TRL's bf16 loss; per parameter, the error against TRL's fp32 gradient
    at most twice TRL's own bf16 error plus 1e-3 of the gradient's scale (the
    tolerance of tests/test_trl.py's single-process bf16 test)."""
    assert abs(got["loss"] - l16) <= 2e-3 * abs(l16), (what, got["loss"], l16, l32)
    assert set(got["grads"]) == set(g32), what
    for n, g in g32.items():
        scale = float(g.abs().max())
        err_trl = float((g16[n] - g).abs().max())
        err = float((got["grads"][n].float() - g).abs().max())
        assert err <= 2 * err_trl + 1e-3 * scale, (what, n, err, err_trl, scale)


# ----------------------------------------------------------------------------
# the README's engine table is written from ENGINES and DIRECT above

_LABELS = {"ddp": "DDP", "fsdp1": "FSDP1 (`use_orig_params=True`)", "fsdp2": "FSDP2 (`fully_shard`)",
           "zero3": "DeepSpeed ZeRO-3"}
_VARIANTS = {"plain": "untied", "tied": "tied embeddings", "lora": "PEFT LoRA (head frozen)",
             "ga": "grad. accumulation 2", "gc": "grad. checkpointing",
             "bf16": "bf16 autocast (logits of magnitude 30)",
             "train": "`train()` step with generation, GA 2",
             "rank1fail": "head check failing on one rank (all fall back)",
             "grpo": "`GRPOTrainer` (dapo, beta 0.1)"}


def readme_table():
    """The markdown table README.md shows (between its engine-table markers)."""
    rows = ["| engine (2 ranks, gloo) | cases run | fused head | loss, every gradient vs TRL's "
            "trainer in one process | `linear_logps(weight=head.weight)` outside the forward |",
            "| :--- | :--- | :---: | :---: | :--- |"]
    for engine, variants in ENGINES.items():
        direct = DIRECT[engine]
        rows.append(f"| {_LABELS[engine]} | {', '.join(_VARIANTS[v] for v in variants)} | yes | "
                    f"equal (1e-5){' (`train()`: runs)' if 'train' in variants else ''}"
                    f"{' (one-rank failure: logits path, equal)' if 'rank1fail' in variants else ''}"
                    f"{' (bf16: within 2x TRL bf16 error)' if 'bf16' in variants else ''} | "
                    f"{'runs (a plain tensor)' if direct is None else direct[0] + ': ' + direct[1]} |")
    return "\n".join(rows)


def test_readme_engine_table_is_current():
    """README.md's table lists exactly what this file runs and asserts."""
    with open(os.path.join(os.path.dirname(HERE), "README.md"), encoding="utf-8") as f:
        text = f.read()
    begin, end = "<!-- engines:begin (tests/test_trl_engines.py) -->", "<!-- engines:end -->"
    assert begin in text and end in text, "README.md lost its engine table markers"
    shown = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert len({row.count("|") for row in shown.splitlines()}) == 1, "a cell holds a '|'"
    assert shown == readme_table(), ("README.md's engine table drifted; regenerate it with "
                                     "python -c 'import sys; sys.path.insert(0, \"tests\"); "
                                     "import test_trl_engines as t; print(t.readme_table())'")


@pytest.mark.parametrize("variant", ["lora", "gc+tied"])
def test_single_process_variants_match_trl(variant, tmp_path):
    """The same cases without an engine: PEFT LoRA alone, gradient checkpointing
    with a tied head; fused, and equal to TRL's own trainer."""
    pytest.importorskip("peft", reason="peft is not installed (the test extra has it)")
    from gmpo_ext.trl import GMPOTrainer
    tok = worker._tok()
    opts = set(variant.split("+"))
    path = str(tmp_path / "model")
    model = worker._model(len(tok), opts, path)
    inputs = worker.batch(model, len(tok))
    trainer = worker._trainer(GMPOTrainer, model, tok, str(tmp_path / "run"))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    assert trainer.fused_lm_head and not trainer._gmpo_fallback_warned
    ref_loss, ref_grads = worker.reference(tok, opts, path)
    assert abs(float(loss) - ref_loss) <= RTOL * abs(ref_loss)
    grads = {worker.canonical(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert _max_rel(g, grads[name]) <= RTOL, (name, _max_rel(g, grads[name]))
