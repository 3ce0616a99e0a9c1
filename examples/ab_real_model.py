"""GMPO against GRPO on a real model and task: the main job's A/B, on your GPU box.

    # Qwen2.5-0.5B-Instruct on GSM8K (from the hub, or the local cache), 3 seeds:
    python examples/ab_real_model.py --bf16

    # your own model and data, from disk:
    python examples/ab_real_model.py --model /models/my-llm --dataset /data/train.jsonl \\
        --question-field question --answer-field answer --seeds 5 --steps 300 --bf16

Every method (``--methods``, default gmpo,grpo) trains on every seed from the
same initial weights (the model is loaded afresh for each run), the seed
fixing the data order and the sampling. The runs go through the same code as
``python -m gmpo_ext.demo``: the trainer class per method
(``gmpo_ext.demo.trainer_class``; printed), the per-step recorder (reward,
per-token log-ratio min and max, entropy, clip fraction, KL to the old
policy, gradient norm), the statistics over seeds (t-intervals, the paired
comparison against GMPO) and the outputs in ``--out``: demo.csv, demo.png,
summary.json, summary.md.

The dataset (a hub name, or a local .json/.jsonl/.parquet/.csv file) needs a
question and an answer column; GSM8K's answers end in ``#### <number>``, and a
plain number works too. Reward: 1 when the last number in the completion
equals the answer's, else 0. The prompt is the question with an instruction
to end on the number, in the model's chat template when it has one.

The off-policy knob: TRL samples a generation batch every
``--steps-per-generation`` x ``--num-iterations`` micro-batches, and an
optimizer step takes ``--gradient-accumulation-steps`` micro-batches, so each
generation batch is used for steps-per-generation x num-iterations /
gradient-accumulation-steps optimizer steps (which must be a whole number).

The recorder adds one no-grad forward of the policy per micro-batch (about a
third of the loss step), over chunks of rows whose logits stay within 256 MiB
(gmpo_ext.demo.rows_per_forward), so it does not hold the (B, T, V) logits the
fused trainers avoid. Written to run as it is on one CUDA GPU with
``pip install -e ".[demo]"`` (the model and dataset are downloaded unless they
are on disk); without a usable GPU it stops unless ``--use-cpu`` is given. It
is tested here on CPU with a tiny local model and a tiny local dataset
(tests/test_demo.py).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

from gmpo_ext.demo import (METHOD_CONFIG, HelpFormatter, clip_ranges, config_class,
                           methods_arg, output_dir_error, positive_float, positive_int, quiet,
                           run_comparison, summary_markdown, versions)

INSTRUCTION = "Solve the problem. End your answer with the final number alone on the last line."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gold_number(answer: str):
    """The answer's number: after ``####`` (GSM8K) or the answer's last number; None if none."""
    tail = answer.split("####")[-1]
    found = _NUMBER.findall(tail)
    return _to_float(found[-1]) if found else None


def _to_float(s: str):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def last_number_reward(completions, answer, **kwargs):
    """1.0 when the completion's last number equals the answer's number, else 0.0."""
    out = []
    for c, a in zip(completions, answer):
        if isinstance(c, list):                       # conversational: the assistant's message
            c = c[-1]["content"] if c else ""
        found = _NUMBER.findall(c)
        got, want = (_to_float(found[-1]) if found else None), gold_number(a)
        out.append(float(got is not None and want is not None and abs(got - want) < 1e-6))
    return out


def load_rows(path_or_name, config, split, question_field, answer_field):
    """The dataset with ``prompt`` text and ``answer``: a local file or a hub dataset."""
    from datasets import load_dataset

    if os.path.exists(path_or_name):
        ext = os.path.splitext(path_or_name)[1].lower().lstrip(".")
        kind = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
        if kind is None:
            raise SystemExit(f"--dataset: {path_or_name!r} is not a .json, .jsonl, .parquet or "
                             ".csv file")
        ds = load_dataset(kind, data_files=path_or_name, split="train")
    else:
        ds = load_dataset(path_or_name, config, split=split)
    for f in (question_field, answer_field):
        if f not in ds.column_names:
            raise SystemExit(f"--dataset: no column {f!r} (columns: {', '.join(ds.column_names)}); "
                             "set --question-field / --answer-field")
    return ds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct",
                   help="a hub id or a local folder (save_pretrained)")
    p.add_argument("--dataset", default="openai/gsm8k",
                   help="a hub dataset or a local .json/.jsonl/.parquet/.csv file")
    p.add_argument("--dataset-config", dest="dataset_config", default="main")
    p.add_argument("--split", default="train")
    p.add_argument("--question-field", dest="question_field", default="question")
    p.add_argument("--answer-field", dest="answer_field", default="answer")
    p.add_argument("--methods", type=methods_arg, default="gmpo,grpo",
                   help="comma-separated subset of gmpo, grpo, gspo")
    p.add_argument("--seeds", type=positive_int("--seeds"), default=3)
    p.add_argument("--steps", type=positive_int("--steps"), default=200,
                   help="optimizer steps per run")
    p.add_argument("--lr", type=positive_float, default=1e-6)
    p.add_argument("--prompts-per-step", dest="prompts_per_step",
                   type=positive_int("--prompts-per-step"), default=4)
    p.add_argument("--num-generations", dest="num_generations",
                   type=positive_int("--num-generations"), default=8,
                   help="completions per prompt (the group; at least 2)")
    p.add_argument("--gradient-accumulation-steps", dest="gradient_accumulation_steps",
                   type=positive_int("--gradient-accumulation-steps"), default=1)
    p.add_argument("--steps-per-generation", dest="steps_per_generation",
                   type=positive_int("--steps-per-generation"), default=2,
                   help="micro-batches per generation batch")
    p.add_argument("--num-iterations", dest="num_iterations",
                   type=positive_int("--num-iterations"), default=2,
                   help="passes over each generation batch; optimizer steps per generation batch "
                   "= steps-per-generation x num-iterations / gradient-accumulation-steps")
    p.add_argument("--max-completion-length", dest="max_completion_length",
                   type=positive_int("--max-completion-length"), default=256)
    p.add_argument("--bf16", action="store_true",
                   help="bf16 mixed precision (weights and optimizer state stay fp32)")
    p.add_argument("--use-cpu", dest="use_cpu", action="store_true",
                   help="train on CPU (the tests; slow for a real model)")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true")
    p.add_argument("--out", default="ab_out",
                   help="output folder (demo.csv, demo.png, summary.json, summary.md)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    o = p.parse_args(argv)
    if o.num_generations < 2:
        p.error("--num-generations must be at least 2 (the advantage compares a prompt's "
                "completions with each other)")
    gas = o.gradient_accumulation_steps
    if (o.prompts_per_step * o.num_generations) % gas:
        p.error("--gradient-accumulation-steps must divide --prompts-per-step x "
                "--num-generations (the completions of one optimizer step)")
    if (o.steps_per_generation * o.num_iterations) % gas:
        p.error("--gradient-accumulation-steps must divide --steps-per-generation x "
                "--num-iterations (a generation batch must last whole optimizer steps)")
    why = output_dir_error(o.out)
    if why:
        p.error(f"--out: {why}")
    return o


def updates_per_generation_batch(opts) -> int:
    """Optimizer steps that train on one generation batch: TRL samples every
    steps_per_generation x num_iterations micro-batches; a step is
    gradient_accumulation_steps micro-batches."""
    return opts.steps_per_generation * opts.num_iterations // opts.gradient_accumulation_steps


def main(argv=None) -> int:
    opts = parse_args(argv)
    quiet(offline=False)        # the model and dataset may come from the hub
    import torch

    if not opts.use_cpu and not torch.cuda.is_available():
        raise SystemExit("ab_real_model.py: no usable CUDA GPU (torch.cuda.is_available() is "
                         "False); this comparison is meant for a GPU. Pass --use-cpu to train on "
                         "the CPU anyway (slow for a real model).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(opts.model, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chat = getattr(tok, "chat_template", None) is not None
    rows = load_rows(opts.dataset, opts.dataset_config, opts.split, opts.question_field,
                     opts.answer_field)

    def to_prompt(ex):
        text = f"{ex[opts.question_field]}\n{INSTRUCTION}"
        prompt = [{"role": "user", "content": text}] if chat else f"Question: {text}\nAnswer:"
        return {"prompt": prompt, "answer": str(ex[opts.answer_field])}

    rows = rows.map(to_prompt, remove_columns=rows.column_names)
    batch = opts.prompts_per_step * opts.num_generations

    def setup(method, seed):
        common = dict(
            output_dir=opts.trainer_dir, report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, seed=seed, data_seed=seed, max_steps=opts.steps,
            learning_rate=opts.lr, lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=1.0, bf16=opts.bf16, use_cpu=opts.use_cpu,
            gradient_checkpointing=opts.gradient_checkpointing,
            per_device_train_batch_size=batch // opts.gradient_accumulation_steps,
            gradient_accumulation_steps=opts.gradient_accumulation_steps,
            num_generations=opts.num_generations, steps_per_generation=opts.steps_per_generation,
            num_iterations=opts.num_iterations, max_completion_length=opts.max_completion_length,
            temperature=1.0, beta=0.0, dataloader_num_workers=0,
        )
        args = config_class(method)(**common, **METHOD_CONFIG[method])
        # fp32 weights (AdamW's steps at lr ~1e-6 vanish in bf16 weights); --bf16 is
        # mixed precision: the forward and backward under bf16 autocast
        model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=torch.float32)
        return dict(model=model, reward_funcs=last_number_reward, args=args,
                    train_dataset=rows.shuffle(seed=seed), processing_class=tok)

    upd = updates_per_generation_batch(opts)
    gen = batch // opts.gradient_accumulation_steps * opts.steps_per_generation
    name = os.path.basename(opts.model.rstrip("/")) or opts.model
    data = os.path.basename(opts.dataset) if os.path.exists(opts.dataset) else opts.dataset
    config = {
        "model": opts.model, "dataset": opts.dataset, "dataset_config": opts.dataset_config,
        "split": opts.split, "lr": opts.lr, "completions_per_step": batch,
        "prompts_per_step": opts.prompts_per_step, "num_generations": opts.num_generations,
        "steps_per_generation": opts.steps_per_generation, "num_iterations": opts.num_iterations,
        "gradient_accumulation_steps": opts.gradient_accumulation_steps,
        "completions_per_generation_batch": gen, "updates_per_generation_batch": upd, "max_completion_length": opts.max_completion_length,
        "bf16": opts.bf16, "method_config": {m: METHOD_CONFIG[m] for m in opts.methods},
        "versions": versions(),
        "description": (f"{', '.join(m.upper() for m in opts.methods)} on {name}, {data}; "
                        f"{opts.seeds} seeds, {opts.steps} optimizer steps per run, {batch} "
                        f"completions per step, {upd} optimizer steps per generation batch of "
                        f"{gen} completions; "
                        f"{clip_ranges(opts.methods)}. Written by `examples/ab_real_model.py`."),
        "scope": (f"What this does not show: one model ({name}), one task and {opts.steps} "
                  "steps; other models, tasks and longer runs can differ."),
    }
    title = (f"{' vs '.join(m.upper() for m in opts.methods)}: {name} on {data}; mean and 95% "
             f"band over {opts.seeds} seed{'s' if opts.seeds != 1 else ''}; {upd} updates per "
             "generation batch")
    with tempfile.TemporaryDirectory(prefix="gmpo_ab_") as tmp:
        opts.trainer_dir = tmp
        summary = run_comparison(opts.methods, list(range(opts.seeds)), setup, opts.steps,
                                 opts.out, config, title, progress=opts.progress)
    print()
    print(summary_markdown(summary))
    print(f"wrote demo.csv, demo.png, summary.json, summary.md in {opts.out} "
          f"({summary['wall_s']['total']:.0f} s of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
