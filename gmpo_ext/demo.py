"""The main job: GMPO against GRPO on a small verifiable task, on CPU, through TRL.

    python -m gmpo_ext.demo [--seed 0] [--out docs] [--steps 240]
    gmpo-demo ...                                  (the same, as a console script)

A tiny Qwen2-style causal LM (random weights, built from a config) and a
character tokenizer built locally (nothing is downloaded) learn a toy task
with a programmatic reward: the prompt is a digit and a colon (``"7:"``), the
completion should repeat that digit (``"7777..."``); the reward is the
fraction of the first ``max_completion_length`` completion characters equal to
it (a random policy scores about 1/13). The same model (same initial weights,
same seed, same data order) is trained twice:

* GMPO: :class:`gmpo_ext.trl.GMPOTrainer` (the fused loss; clip range
  (e^-0.4, e^0.4) on the per-token ratio, in log space);
* GRPO: TRL's own ``GRPOTrainer`` (its default loss, ``dapo``, clip 0.2 in
  ratio space), instrumented only to record its log-ratios.

Each generation batch is used for several optimizer updates
(``steps_per_generation`` micro-batches x ``num_iterations`` passes), so the
policy drifts from the one that sampled and the importance ratios move. Per
optimizer step it records the mean reward of the batch's completions and the
range (min, max) of the per-token log importance ratio ``log pi_theta -
log pi_old``: the paper's stability observation (arXiv 2507.20673, Fig. 2) is
that GMPO keeps that range narrower than GRPO.

Writes ``<out>/demo.csv`` (one row per method and optimizer step) and
``<out>/demo.png`` (reward and log-ratio range per step, both methods), prints
a summary table. ``--seed`` makes a run repeatable on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import os
import random
import sys
import tempfile
import time
import warnings

DIGITS = "0123456789"
VOCAB_CHARS = DIGITS + ":"
PAD, EOS = "<pad>", "<eos>"


# ----------------------------------------------------------------------------
# a tiny model and tokenizer, built locally (also used by tests/test_trl.py)

def build_tokenizer(chars: str = VOCAB_CHARS):
    """A character-level ``PreTrainedTokenizerFast``: ids 0 = pad, 1 = eos, then ``chars``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   padding_side="left")


def build_model(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2,
                tie_word_embeddings: bool = True):
    """A tiny Qwen2-style causal LM with random weights (float32, CPU)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      tie_word_embeddings=tie_word_embeddings)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


# ----------------------------------------------------------------------------
# the task

def make_prompts(n: int, seed: int):
    rng = random.Random(seed)
    return [f"{rng.choice(DIGITS)}:" for _ in range(n)]


def make_reward(length: int):
    def repeat_digit_reward(prompts, completions, **kwargs):
        """Fraction of the first ``length`` completion characters equal to the prompt's digit."""
        out = []
        for p, c in zip(prompts, completions):
            d = p[0]
            out.append(sum(ch == d for ch in c[:length]) / length)
        return out
    return repeat_digit_reward


# ----------------------------------------------------------------------------
# training

LOG_RATIO_MIN = "gmpo/log_ratio_min"
LOG_RATIO_MAX = "gmpo/log_ratio_max"


def _grpo_recorder_class():
    """TRL's GRPOTrainer, recording the range of its per-token log-ratios (loss untouched)."""
    import torch
    from trl import GRPOTrainer

    class RecordingGRPOTrainer(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            self._rec_inputs = inputs
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._rec_inputs = None

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            inputs = getattr(self, "_rec_inputs", None)
            if inputs is not None:      # the current policy's log-probs inside the loss
                with torch.no_grad():
                    lp = out[0].detach()
                    old = inputs.get("old_per_token_logps")
                    old = lp if old is None else old
                    mask = inputs["completion_mask"]
                    if "tool_mask" in inputs:
                        mask = mask * inputs["tool_mask"]
                    lr = (lp - old)[mask.bool()]
                    if lr.numel():
                        mode = "train" if self.model.training else "eval"
                        self._metrics[mode][LOG_RATIO_MIN].append(lr.min().item())
                        self._metrics[mode][LOG_RATIO_MAX].append(lr.max().item())
            return out

    return RecordingGRPOTrainer


def _callbacks(label, total, records, position):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=total, desc=f"{label:5s}", position=position, leave=True,
                            dynamic_ncols=True, file=sys.stdout)
            self.reward = float("nan")

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:
                return
            rec = {"method": label, "step": state.global_step,
                   "reward": logs.get("reward", float("nan")),
                   "log_ratio_min": logs.get(LOG_RATIO_MIN, float("nan")),
                   "log_ratio_max": logs.get(LOG_RATIO_MAX, float("nan")),
                   "loss": logs.get("loss", float("nan")),
                   "entropy": logs.get("entropy", float("nan"))}
            records.append(rec)
            if rec["reward"] == rec["reward"]:
                self.reward = rec["reward"]
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(reward=f"{self.reward:.3f}",
                                 log_ratio=f"[{rec['log_ratio_min']:+.2f}, {rec['log_ratio_max']:+.2f}]")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return [Progress()]


def train_one(method: str, opts, records: list, position: int = 0):
    """Train one method; append its per-step records; return (wall s, CPU s of this process)."""
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .trl import GMPOConfig, GMPOTrainer
    from trl import GRPOConfig

    tok = build_tokenizer()
    model = build_model(len(tok), seed=opts.seed)
    spg, iters = opts.steps_per_generation, opts.num_iterations
    batch = opts.prompts_per_step * opts.num_generations
    n_gen = -(-opts.steps // (spg * iters))
    # a fixed-size prompt set (not sized by --steps): the first steps of a run do not
    # depend on how many steps it has
    prompts = make_prompts(max(4096, n_gen * spg * opts.prompts_per_step), opts.seed)
    common = dict(
        output_dir=opts.trainer_dir, report_to="none", use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False, save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=opts.seed, data_seed=opts.seed,
        max_steps=opts.steps, learning_rate=opts.lr, lr_scheduler_type="constant",
        warmup_steps=0, adam_beta2=0.99, max_grad_norm=1.0,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=opts.num_generations, steps_per_generation=spg,
        num_iterations=iters, max_completion_length=opts.completion_length,
        temperature=1.0, beta=0.0, dataloader_num_workers=0,
    )
    reward = make_reward(opts.completion_length)
    if method == "gmpo":
        cls, args = GMPOTrainer, GMPOConfig(**common, epsilon=opts.gmpo_epsilon)
    else:
        cls, args = _grpo_recorder_class(), GRPOConfig(**common, epsilon=opts.grpo_epsilon)
    trainer = cls(model=model, reward_funcs=reward, args=args,
                  train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    for cb in _callbacks(method.upper(), opts.steps, records, position):
        trainer.add_callback(cb)
    torch.manual_seed(opts.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    return time.perf_counter() - t0, time.process_time() - c0


# ----------------------------------------------------------------------------
# outputs

FIELDS = ["method", "step", "reward", "log_ratio_min", "log_ratio_max", "loss", "entropy"]


def write_csv(path, records):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in records:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in FIELDS})


def _finite(xs):
    return [x for x in xs if x == x]


def summarize(records, walls, window: int):
    rows = []
    for method in ("gmpo", "grpo"):
        recs = [r for r in records if r["method"] == method.upper()]
        rew = _finite([r["reward"] for r in recs])
        lo = _finite([r["log_ratio_min"] for r in recs])
        hi = _finite([r["log_ratio_max"] for r in recs])
        if not rew:
            continue
        k = max(1, min(window, len(rew)))
        rows.append({
            "method": method.upper(),
            "steps": recs[-1]["step"],
            "reward_first": sum(rew[:k]) / k,
            "reward_last": sum(rew[-k:]) / k,
            "log_ratio_min": min(lo) if lo else float("nan"),
            "log_ratio_max": max(hi) if hi else float("nan"),
            "mean_range": (sum(h - l for h, l in zip(hi, lo)) / len(hi)) if hi else float("nan"),
            "wall_s": walls.get(method, (float("nan"),) * 2)[0],
            "cpu_s": walls.get(method, (float("nan"),) * 2)[1],
        })
    return rows


def print_table(rows, window, out=sys.stdout):
    head = (f"{'method':6s} {'steps':>5s} {'reward first':>12s} {'reward last':>11s} "
            f"{'min log-ratio':>13s} {'max log-ratio':>13s} {'mean range':>10s} {'wall s':>7s} "
            f"{'CPU s':>6s}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        print(f"{r['method']:6s} {r['steps']:5d} {r['reward_first']:12.3f} {r['reward_last']:11.3f} "
              f"{r['log_ratio_min']:+13.3f} {r['log_ratio_max']:+13.3f} {r['mean_range']:10.3f} "
              f"{r['wall_s']:7.1f} {r['cpu_s']:6.1f}", file=out)
    print(f"(reward first/last: mean over the first/last {window} generation batches; "
          "log-ratio: per-token log pi_theta/pi_old over all updates; mean range: mean over "
          "steps of max - min; CPU s: process time, all threads)", file=out)


def plot(path, records, title, per_batch: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"GMPO": "tab:blue", "GRPO": "tab:red"}
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, c in colors.items():
        recs = [r for r in records if r["method"] == method]
        rs = [(r["step"], r["reward"]) for r in recs if r["reward"] == r["reward"]]
        if rs:
            ax0.plot(*zip(*rs), color=c, label=method, lw=1.5)
        lr = [(r["step"], r["log_ratio_min"], r["log_ratio_max"]) for r in recs
              if r["log_ratio_min"] == r["log_ratio_min"]]
        if lr:
            s, lo, hi = zip(*lr)
            ax1.plot(s, hi, color=c, lw=0.6, alpha=0.6)
            ax1.plot(s, lo, color=c, lw=0.6, alpha=0.6)
            # envelope per generation batch: its updates span `per_batch` steps
            xs, los, his = [], [], []
            for k in range(0, len(s), per_batch):
                xs.append(s[min(k + per_batch, len(s)) - 1])
                los.append(min(lo[k:k + per_batch]))
                his.append(max(hi[k:k + per_batch]))
            ax1.fill_between(xs, los, his, color=c, alpha=0.25, lw=0,
                             label=f"{method}: min..max per generation batch")
    ax0.set_xlabel("optimizer step")
    ax0.set_ylabel("mean reward of the generation batch")
    ax0.set_title("reward")
    ax0.grid(alpha=0.3)
    ax0.legend()
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("per-token log(pi_theta / pi_old)")
    ax1.set_title("range of the log importance ratio (lines: per step)")
    ax1.axhline(0.0, color="k", lw=0.5)
    ax1.grid(alpha=0.3)
    ax1.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gmpo-demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data and sampling")
    p.add_argument("--out", default="gmpo_demo_out", help="output folder (demo.csv, demo.png)")
    p.add_argument("--steps", type=int, default=240, help="optimizer steps per method")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--prompts-per-step", dest="prompts_per_step", type=int, default=4)
    p.add_argument("--num-generations", dest="num_generations", type=int, default=8)
    p.add_argument("--steps-per-generation", dest="steps_per_generation", type=int, default=2)
    p.add_argument("--num-iterations", dest="num_iterations", type=int, default=2)
    p.add_argument("--completion-length", dest="completion_length", type=int, default=8)
    p.add_argument("--gmpo-epsilon", dest="gmpo_epsilon", type=float, default=0.4,
                   help="GMPO clip range, log space (paper: 0.4)")
    p.add_argument("--grpo-epsilon", dest="grpo_epsilon", type=float, default=0.2,
                   help="GRPO clip range, ratio space (TRL default 0.2)")
    p.add_argument("--methods", default="gmpo,grpo", help="comma-separated subset of gmpo,grpo")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the model is tiny, one thread keeps "
                   "the run fast on a busy machine, and the results do not depend on it)")
    return p.parse_args(argv)


def _quiet():
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    for name in ("transformers", "trl", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> int:
    opts = parse_args(argv)
    _quiet()
    t_start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):   # import-time notices of TRL/transformers
        import torch
        import transformers
        import trl  # noqa: F401
        from . import trl as _gmpo_trl  # noqa: F401  (fails here with a clear message)
    transformers.utils.logging.set_verbosity_error()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    os.makedirs(opts.out, exist_ok=True)
    methods = [m.strip().lower() for m in opts.methods.split(",") if m.strip()]
    print(f"gmpo_ext demo: repeat-the-digit task, tiny Qwen2 (random init), {opts.steps} optimizer "
          f"steps per method, {opts.prompts_per_step * opts.num_generations} completions per step, "
          f"{opts.steps_per_generation * opts.num_iterations} updates per generation batch, "
          f"seed {opts.seed}, {torch.get_num_threads()} threads")
    records, walls = [], {}
    for method in methods:
        if method not in ("gmpo", "grpo"):
            raise SystemExit(f"--methods: unknown method {method!r} (gmpo, grpo)")
    with tempfile.TemporaryDirectory(prefix="gmpo_demo_") as tmp:   # the trainers' output_dir
        opts.trainer_dir = tmp
        for method in methods:
            walls[method] = train_one(method, opts, records, position=0)
    window = 4
    rows = summarize(records, walls, window)
    csv_path = os.path.join(opts.out, "demo.csv")
    png_path = os.path.join(opts.out, "demo.png")
    write_csv(csv_path, records)
    plot(png_path, records, per_batch=opts.steps_per_generation * opts.num_iterations, title=
         f"GMPO (gmpo_ext.trl, log-space eps {opts.gmpo_epsilon}) vs GRPO (TRL, eps {opts.grpo_epsilon}); "
         f"{opts.steps_per_generation * opts.num_iterations} updates per generation batch, "
         f"seed {opts.seed}")
    print()
    print_table(rows, window)
    print(f"\nwrote {csv_path} and {png_path} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
