"""The main job: GMPO against GRPO over several seeds, on CPU, through TRL.

    python -m gmpo_ext.demo [--seeds 5] [--methods gmpo,grpo] [--out gmpo_demo_out]
    python -m gmpo_ext.demo --quick            (one seed, a few steps: what the tests run)
    gmpo-demo ...                              (the same, as a console script)

A tiny Qwen2-style causal LM (random weights, built from a config) and a
character tokenizer built locally (nothing is downloaded) learn a task with a
reward a program checks. The default task reverses a digit string: the prompt
is ``"3071:"``, the answer ``"1703"``; the reward is the fraction of answer
positions the completion gets right (partial credit per position; a random
policy scores about 1/13). ``--task repeat`` is the older, easier one
(``"7:"`` -> ``"7777..."``).

Every method trains on the same seeds: for seed s, the same initial weights,
the same prompts in the same order and the same sampling seed. Methods
(``--methods``, a comma-separated subset):

* ``gmpo``: :class:`gmpo_ext.trl.GMPOTrainer` (geometric mean of the
  per-token ratios, clip (e^-0.4, e^0.4) in log space, the paper's setting);
* ``grpo``: :class:`gmpo_ext.trl.GRPOTrainer` (arithmetic mean; TRL's default
  loss ``dapo``, clip (0.8, 1.2) in ratio space);
* ``gspo``: the same trainer with ``importance_sampling_level="sequence"``
  (one ratio per sequence, loss ``grpo``, clip (1 - 3e-4, 1 + 4e-4): the GSPO
  paper's).

Every method runs through gmpo_ext's fused trainers (the LM head and the loss
fused), so the comparison is of the objectives, not of two code paths. Which
trainer class runs each method is decided in one place, :func:`trainer_class`,
and printed (read from the class itself). A fused trainer that falls back to
TRL's own loss or to the logits path warns (the warning stays visible) and the
run records it: ``config.fallbacks`` in summary.json.

Each generation batch is used for several optimizer updates
(``--steps-per-generation`` micro-batches x ``--num-iterations`` passes), so
the policy drifts from the one that sampled and the importance ratios move:
the product is the knob for how off-policy the updates are.

The defaults (reverse 4 digits, 400 optimizer steps of 32 completions, 8
updates per generation batch: 4 micro-batches x 2 passes, learning rate 3e-3)
were picked for signal and run time, before looking at which method wins: the
reward climbs from about 0.07 to about 0.3, the per-token log-ratio reaches a
few nats within a batch's 8 updates (with 4 updates the ranges were smaller
and the reward lower at the same number of steps), and the whole default run
(5 seeds x 2 methods) took 68 to 133 s on a busy 2-core machine (each run's
wall time is in its summary.md).

Per optimizer step and seed a recorder (:func:`recorder_class`: the same code
for every method, from the batch the loss sees and one extra no-grad forward
of the policy, over chunks of rows: :func:`policy_measures`) records: the mean reward of the generation batch the step
trains on, the min and max of the per-token log importance ratio
``log pi_theta - log pi_old``, the policy's entropy, the fraction of tokens
(of rows for GSPO's sequence-level clip) the method's clip cuts from the
gradient, the KL to the old policy (k3
estimator: the token mean of e^l - 1 - l, l the log-ratio; it estimates
KL(pi_old || pi_theta) on tokens pi_old sampled) and the gradient norm
(before clipping). Writes in ``--out``: ``demo.csv`` (every step of every
seed and method), ``demo.png`` (mean and 95% band over seeds of the reward
and the entropy per step and of the log-ratio's min and max per generation
batch), ``summary.json`` and ``summary.md`` (t-intervals over seeds and a
paired comparison against GMPO; :func:`summarize`).

The recorder, the statistics and the writers are reused by
``examples/ab_real_model.py`` (the same comparison with a real model).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import logging
import math
import os
import platform
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
# the tasks: a prompt, its answer, partial credit per position

def _reverse_prompt(rng, length):
    s = "".join(rng.choice(DIGITS) for _ in range(length))
    return f"{s}:"


def _repeat_prompt(rng, length):
    return f"{rng.choice(DIGITS)}:"


def answer(task: str, prompt: str, length: int) -> str:
    """The answer a prompt asks for: ``reverse``: the digits before ':' reversed;
    ``repeat``: the prompt's digit ``length`` times."""
    digits = prompt.split(":", 1)[0]
    if task == "reverse":
        return digits[::-1]
    if task == "repeat":
        return digits[:1] * length
    raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")


TASKS = {"reverse": _reverse_prompt, "repeat": _repeat_prompt}


def make_prompts(n: int, seed: int, task: str = "reverse", length: int = 4):
    """``n`` prompts of ``task`` (digit strings of ``length`` for ``reverse``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    rng = random.Random(seed)
    return [TASKS[task](rng, length) for _ in range(n)]


def position_credit(completion: str, target: str) -> float:
    """Fraction of the target's positions the completion gets right, in place:
    ``sum_i [completion[i] == target[i]] / len(target)``. Characters past the
    target's length are ignored; a short completion scores its missing
    positions 0."""
    if not target:
        raise ValueError("target must not be empty")
    return sum(a == b for a, b in zip(completion, target)) / len(target)


def make_reward(task: str = "reverse", length: int = 4):
    """A TRL reward function for ``task``: :func:`position_credit` against :func:`answer`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")

    def position_reward(prompts, completions, **kwargs):
        """Partial credit per position of the answer (see gmpo_ext.demo.position_credit)."""
        return [position_credit(c, answer(task, p, length)) for p, c in zip(prompts, completions)]
    position_reward.__name__ = f"{task}_reward"
    return position_reward


# ----------------------------------------------------------------------------
# the methods: configuration, clip rule and trainer class

# config fields per method, on top of the run's common ones
METHOD_CONFIG = {
    "gmpo": dict(epsilon=0.4, epsilon_high=0.4),                    # log space (the paper)
    "grpo": dict(epsilon=0.2, epsilon_high=0.2),                    # ratio space (TRL default)
    "gspo": dict(epsilon=3e-4, epsilon_high=4e-4, loss_type="grpo",  # the GSPO paper's
                 importance_sampling_level="sequence"),
}
# how each method clips, for the recorder's clip fraction
CLIP_RULE = {"gmpo": "token_log", "grpo": "token_ratio", "gspo": "sequence_ratio"}


def clip_ranges(methods) -> str:
    """The methods' clip ranges in words, from METHOD_CONFIG (for the summary)."""
    out = []
    for m in methods:
        c = METHOD_CONFIG[m]
        lo, hi = c["epsilon"], c.get("epsilon_high", c["epsilon"])
        if CLIP_RULE[m] == "token_log":
            out.append(f"{m.upper()} the per-token ratio to (e^-{lo:g}, e^{hi:g}) = "
                       f"({math.exp(-lo):.3g}, {math.exp(hi):.3g})")
        else:
            what = "sequence" if CLIP_RULE[m] == "sequence_ratio" else "per-token"
            out.append(f"{m.upper()} the {what} ratio to ({1 - lo:.6g}, {1 + hi:.6g})")
    return "clip ranges: " + ", ".join(out)


def trainer_class(method: str):
    """The trainer class that runs ``method``: the ONE place that decides it.
    gmpo: :class:`gmpo_ext.trl.GMPOTrainer`; grpo and gspo:
    :class:`gmpo_ext.trl.GRPOTrainer` (the fused drop-in for TRL's)."""
    if method == "gmpo":
        from .trl import GMPOTrainer
        return GMPOTrainer
    if method in ("grpo", "gspo"):
        from .trl import GRPOTrainer
        return GRPOTrainer
    raise ValueError(f"method must be one of {sorted(METHOD_CONFIG)}, got {method!r}")


def config_class(method: str):
    """GMPOConfig for gmpo, GRPOConfig (TRL's, re-exported by gmpo_ext.trl) for the
    GRPO family."""
    if method == "gmpo":
        from .trl import GMPOConfig
        return GMPOConfig
    from .trl import GRPOConfig
    return GRPOConfig


def implementation(cls) -> str:
    """``module.Class`` of a trainer class, the name printed and stored per method."""
    return f"{cls.__module__}.{cls.__qualname__}"


def parse_methods(text: str):
    """``"gmpo,grpo"`` -> ``["gmpo", "grpo"]``; unknown or repeated names raise ValueError."""
    methods = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods: no method given (choose from gmpo, grpo, gspo)")
    for m in methods:
        if m not in METHOD_CONFIG:
            raise ValueError(f"--methods: unknown method {m!r} (choose from "
                             f"{', '.join(METHOD_CONFIG)})")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods: a method is repeated in {text!r}")
    return methods


# ----------------------------------------------------------------------------
# the recorder: the same measures for every method

FIELDS = ["method", "seed", "step", "reward", "log_ratio_min", "log_ratio_max", "entropy",
          "clip_frac", "kl_old", "grad_norm", "loss"]


def clipped_tokens(rule: str, log_ratio, advantages, mask, eps_low: float, eps_high: float):
    """Bool (B, T): the counted tokens whose term the method's clip cuts from the
    gradient. log_ratio, mask: (B, T); advantages: (B,) or (B, T).

    * ``token_log`` (GMPO): l > eps_high where A > 0, l < -eps_low where A < 0;
    * ``token_ratio`` (GRPO): e^l > 1 + eps_high where A > 0, e^l < 1 - eps_low
      where A < 0;
    * ``sequence_ratio`` (GSPO): the same on the row's ratio exp(masked mean of
      l), every counted token of a clipped row."""
    import torch
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
    m = mask != 0
    if rule == "token_log":
        x, lo, hi = log_ratio, -eps_low, eps_high
    elif rule == "token_ratio":
        x, lo, hi = torch.exp(log_ratio), 1.0 - eps_low, 1.0 + eps_high
    elif rule == "sequence_ratio":
        mf = m.to(log_ratio.dtype)
        seq = (log_ratio * mf).sum(-1, keepdim=True) / mf.sum(-1, keepdim=True).clamp(min=1.0)
        x, lo, hi = torch.exp(seq).expand_as(log_ratio), 1.0 - eps_low, 1.0 + eps_high
    else:
        raise ValueError(f"rule must be token_log, token_ratio or sequence_ratio, got {rule!r}")
    return (((x > hi) & (adv > 0)) | ((x < lo) & (adv < 0))) & m


def rows_per_forward(T: int, vocab: int, max_logits_bytes: int = 256 * 2**20) -> int:
    """Rows per no-grad forward of :func:`policy_measures`: as many as keep one
    forward's (rows, T + 1, V) fp32 logits within ``max_logits_bytes`` (at least 1).
    Qwen2.5-0.5B (V = 151 936), T = 256: 1 row (156 MB); the demo's tiny model:
    every row at once."""
    per_row = (T + 1) * max(1, int(vocab)) * 4
    return max(1, int(max_logits_bytes) // per_row)


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(head, "weight", None)
    if w is not None and w.dim() == 2:
        return int(w.shape[0])
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(getattr(cfg, "vocab_size", 0) or 1)


def policy_measures(model, inputs, temperature: float, max_logits_bytes: int = 256 * 2**20,
                    autocast=None):
    """(log_ratio, entropy, mask) of the current policy on a TRL batch: no-grad
    forwards over chunks of rows (:func:`rows_per_forward`: no chunk's logits
    exceed ``max_logits_bytes``, so the whole (B, T, V) logits are never held),
    log-probs and entropies with :func:`gmpo_ext.selective_logps`.
    log_ratio = log pi_theta - log pi_old (0 where the batch has no old
    log-probs: on-policy)."""
    import torch
    from .logits import selective_logps

    p_ids, p_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    c_ids, c_mask = inputs["completion_ids"], inputs["completion_mask"]
    mask = c_mask if "tool_mask" not in inputs else c_mask * inputs["tool_mask"]
    ids, am = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1)
    T = c_ids.shape[1]
    chunk = rows_per_forward(T, _vocab_size(model), max_logits_bytes)
    lps, ents = [], []
    with torch.no_grad():
        for r0 in range(0, ids.shape[0], chunk):
            sl = slice(r0, r0 + chunk)
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                logits = model(input_ids=ids[sl], attention_mask=am[sl], logits_to_keep=T + 1,
                               use_cache=False).logits
            if logits.shape[1] != T + 1:      # a model that ignored logits_to_keep
                logits = logits[:, -(T + 1):]
            lp, ent = selective_logps(logits, c_ids[sl], temperature, return_entropy=True)
            lps.append(lp.float())
            ents.append(ent.float())
            del logits
    logps, entropy = torch.cat(lps), torch.cat(ents)
    old = inputs.get("old_per_token_logps")
    log_ratio = torch.zeros_like(logps) if old is None else logps - old.float()
    return log_ratio, entropy, mask


def k3(log_ratio):
    """The k3 estimator per token, e^l - 1 - l with l = log pi_theta - log pi_old
    (>= 0): its mean over tokens pi_old sampled estimates KL(pi_old || pi_theta)
    (E_old[e^l] = 1, E_old[-l] = KL(pi_old || pi_theta))."""
    import torch
    return torch.exp(log_ratio) - 1.0 - log_ratio


def _tqdm():
    try:
        from tqdm.auto import tqdm
        return tqdm
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def recorder_class():
    """The recorder: a ``transformers.TrainerCallback`` that also sees every loss
    batch (through :func:`recording`), built on first use (transformers is
    imported then)."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Per optimizer step of one run (method, seed): the measures in FIELDS.

        ``observe`` (called with each micro-batch before its loss) accumulates
        token counts, sums, min and max; the clip fraction counts tokens, or
        rows for a sequence-level clip (GSPO: one ratio per row, counted once,
        as TRL's ``clip_ratio`` counts it); ``on_log`` (every optimizer step:
        ``logging_steps=1``) turns them into one row, with the reward TRL
        logged for the step's generation batch (carried over the steps that
        reuse it) and the gradient norm the Trainer logged. Also the run's
        progress bar (tqdm, or a plain line every tenth of the run)."""

        def __init__(self, method, seed, rule, eps_low, eps_high, total_steps, label="",
                     progress=True, out=None):
            self.method, self.seed, self.rule = method, seed, rule
            self.eps_low, self.eps_high = float(eps_low), float(eps_high)
            self.total, self.label, self.progress = total_steps, label, progress
            self.out = out or sys.stdout
            self.rows, self._acc, self._reward, self.bar = [], None, float("nan"), None

        # -- the loss batches
        def observe(self, trainer, model, inputs):
            import torch
            temperature = float(getattr(trainer, "temperature", trainer.args.temperature))
            log_ratio, entropy, mask = policy_measures(
                model, inputs, temperature, autocast=trainer.accelerator.autocast)
            m = mask != 0
            clipped = clipped_tokens(self.rule, log_ratio, inputs["advantages"], mask,
                                     self.eps_low, self.eps_high)
            kl = k3(log_ratio)                  # >= 0; estimates KL(pi_old || pi)
            a = self._acc or dict(n=0, ent=0.0, clip=0, clip_n=0, kl=0.0, lo=math.inf,
                                  hi=-math.inf)
            n = int(m.sum())
            if self.rule == "sequence_ratio":   # rows, every row counted (TRL's count)
                a["clip"] += int(clipped.any(-1).sum())
                a["clip_n"] += int(m.shape[0])
            else:
                a["clip"] += int(clipped.sum())
                a["clip_n"] += n
            if n:
                a["n"] += n
                a["ent"] += float(entropy[m].double().sum())
                a["kl"] += float(kl[m].double().sum())
                a["lo"] = min(a["lo"], float(log_ratio[m].min()))
                a["hi"] = max(a["hi"], float(log_ratio[m].max()))
            self._acc = a

        # -- the trainer's events
        def on_train_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()
            tq = _tqdm() if self.progress else None
            if tq is not None:
                self.bar = tq(total=self.total, desc=self.label, leave=True, dynamic_ncols=True,
                              file=self.out)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:
                return
            if "reward" in logs:
                self._reward = float(logs["reward"])
            a, nan = self._acc or {"n": 0}, float("nan")
            n = a["n"]
            self.rows.append({
                "method": self.method, "seed": self.seed, "step": state.global_step,
                "reward": self._reward,
                "log_ratio_min": a["lo"] if n else nan, "log_ratio_max": a["hi"] if n else nan,
                "entropy": a["ent"] / n if n else nan,
                "clip_frac": a["clip"] / a["clip_n"] if n and a["clip_n"] else nan,
                "kl_old": a["kl"] / n if n else nan,
                "grad_norm": float(logs.get("grad_norm", nan)),
                "loss": float(logs.get("loss", nan)),
            })
            self._acc = None
            self._progress(state.global_step)

        def _progress(self, step):
            r = self.rows[-1]
            if self.bar is not None:
                self.bar.update(step - self.bar.n)
                self.bar.set_postfix(reward=f"{r['reward']:.3f}",
                                     log_ratio=f"[{r['log_ratio_min']:+.2f},"
                                     f"{r['log_ratio_max']:+.2f}]",
                                     refresh=False)
            elif self.progress and (step % max(1, self.total // 10) == 0 or step == self.total):
                el = time.perf_counter() - self._t0
                left = el / step * (self.total - step) if step else float("nan")
                print(f"{self.label} step {step}/{self.total}  reward {r['reward']:.3f}  "
                      f"{el:.0f} s, about {left:.0f} s left", file=self.out, flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return Recorder


def recording(cls):
    """``cls`` (a TRL trainer class) with ``compute_loss`` showing each training
    batch to the trainer's ``recorder`` first (the loss itself untouched)."""

    class Recording(cls):
        recorder = None

        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.recorder is not None and self.model.training:
                self.recorder.observe(self, model, inputs)
            return super().compute_loss(model, inputs, *args, **kwargs)

    Recording.__name__ = Recording.__qualname__ = f"Recording{cls.__name__}"
    return Recording


# ----------------------------------------------------------------------------
# running the comparison

def train_one(method: str, seed: int, setup, steps: int, label: str = "", progress=True,
              log_history=None, fallbacks=None):
    """Train ``method`` on ``seed``; return (rows, wall seconds, implementation).

    ``setup(method, seed)`` returns the trainer's keyword arguments (``model``,
    ``reward_funcs``, ``args`` (a config with ``logging_steps=1`` and
    ``max_steps=steps``), ``train_dataset``, ``processing_class``, ...).
    ``log_history``: a list to extend with the trainer's own logs (what it
    logged per step: TRL's metrics, loss, gradient norm). ``fallbacks``: a list
    to extend with the reasons a fused gmpo_ext trainer fell back (to TRL's
    own loss or to the logits path; each also warned once). The trainer, its
    model and optimizer state are freed before returning (and the CUDA cache
    emptied), so two runs' models never coexist."""
    import gc

    import torch
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cls = trainer_class(method)
    kwargs = setup(method, seed)
    args = kwargs["args"]
    if args.logging_steps != 1 or args.max_steps != steps:
        raise ValueError("the recorder needs logging_steps=1 and max_steps=steps in the config")
    eps_low = args.epsilon
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    rec = recorder_class()(method, seed, CLIP_RULE[method], eps_low, eps_high, steps,
                           label=label, progress=progress)
    trainer = recording(cls)(**kwargs)
    trainer.recorder = rec
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(rec)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    if log_history is not None:
        log_history.extend(trainer.state.log_history)
    if fallbacks is not None:
        fallbacks.extend(sorted(getattr(trainer, "_gmpo_fallback_warned", ())))
    trainer.recorder = None
    del trainer, kwargs, args
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rec.rows, wall, implementation(cls)


def run_comparison(methods, seeds, setup, steps: int, out: str, config: dict, title: str,
                   progress=True, log=print):
    """Every method on every seed (seed-major: a paired result exists after each
    seed), then the outputs in ``out``; returns the summary (see :func:`summarize`)."""
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    load_start = _loadavg()
    records, walls, impls, loads = [], {m: {} for m in methods}, {}, []
    fallbacks = {m: [] for m in methods}
    runs = [(s, m) for s in seeds for m in methods]
    for m in methods:
        log(f"{m} runs through {implementation(trainer_class(m))}")
    for k, (seed, method) in enumerate(runs):
        label = f"[{k + 1}/{len(runs)}] {method} seed {seed}"
        fb = []
        rows, wall, impl = train_one(method, seed, setup, steps, label=label, progress=progress,
                                     fallbacks=fb)
        fallbacks[method] += [f"seed {seed}: {why}" for why in fb]
        impls[method] = impl
        records += rows
        walls[method][seed] = wall
        loads.append(_loadavg())
        done = time.perf_counter() - t_start
        left = done / (k + 1) * (len(runs) - k - 1)
        if k + 1 < len(runs):
            log(f"    {wall:.1f} s; about {left:.0f} s left for the {len(runs) - k - 1} other runs")
    wall_total = time.perf_counter() - t_start
    config = dict(config, implementations=impls, methods=list(methods), seeds=list(seeds),
                  steps=steps, fallbacks={m: v for m, v in fallbacks.items() if v})
    # the summary is computed from the records as demo.csv holds them (6 significant
    # digits), so that tools/gen_docs.py recomputes it from the CSV exactly
    records = [dict(r, **{k: float(f"{r[k]:.6g}") for k in FIELDS if isinstance(r[k], float)})
               for r in records]
    summary = summarize(records, methods, seeds, steps, config=config)
    summary["wall_s"] = {"total": wall_total, "per_run": {m: {str(s): w for s, w in ws.items()}
                                                          for m, ws in walls.items()}}
    # the machine's 1-minute load average (os.getloadavg) before the first run and
    # after each run: what the wall times ran under
    summary["load_avg_1min"] = {"start": load_start, "after_each_run": loads,
                                "end": loads[-1] if loads else load_start}
    write_outputs(out, records, summary, title)
    return summary


def _loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


# ----------------------------------------------------------------------------
# statistics (no SciPy): Student's t from the regularized incomplete beta

def _betacf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + \
        b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail P(|T| >= |t|) of Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t (0 < p < 1), by bisection on :func:`t_sf2`."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    tail = 2.0 * min(p, 1.0 - p)          # two-sided tail of |t|
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf2(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    q = 0.5 * (lo + hi)
    return q if p > 0.5 else -q


def mean_ci(xs, level: float = 0.95) -> dict:
    """Mean and the Student t-interval over ``xs`` (NaNs dropped):
    mean +- t_{(1+level)/2, n-1} * s / sqrt(n), s the sample standard deviation.
    ``half``, ``lo``, ``hi`` are NaN for n < 2."""
    xs = [float(x) for x in xs if x == x]
    n, nan = len(xs), float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "sd": nan, "half": nan, "lo": nan, "hi": nan}
    mean = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": nan, "half": nan, "lo": nan, "hi": nan}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "half": half, "lo": mean - half, "hi": mean + half}


def paired(a, b, level: float = 0.95) -> dict:
    """Paired comparison of ``a`` against ``b`` (equal-length lists, one entry per
    seed; pairs with a NaN dropped): how many seeds a is higher, lower, equal;
    the mean difference a - b with its t-interval, and the two-sided paired
    t-test's p-value (t = mean / (s / sqrt(n)), n - 1 df)."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} values against {len(b)}")
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if x == x and y == y]
    d = [x - y for x, y in pairs]
    ci = mean_ci(d, level)
    out = {"n": len(d), "higher": sum(v > 0 for v in d), "lower": sum(v < 0 for v in d),
           "equal": sum(v == 0 for v in d), "mean_diff": ci["mean"], "half": ci["half"],
           "lo": ci["lo"], "hi": ci["hi"], "t": float("nan"), "p": float("nan")}
    if ci["n"] >= 2:
        if ci["sd"] > 0:
            out["t"] = ci["mean"] / (ci["sd"] / math.sqrt(ci["n"]))
            out["p"] = t_sf2(out["t"], ci["n"] - 1)
        else:       # every difference the same
            out["t"] = math.copysign(math.inf, ci["mean"]) if ci["mean"] else float("nan")
            out["p"] = 0.0 if ci["mean"] else 1.0
    return out


# ----------------------------------------------------------------------------
# summary: per-seed measures, intervals, the paired comparison, the sentences

MEASURES = {   # key -> (label, what it is)
    "final_reward": ("final reward", "mean reward over the last {w}"),
    "mean_log_ratio_range": ("mean log-ratio range",
                             "mean over steps of max - min of the per-token log-ratio"),
    "final_entropy": ("final entropy", "mean entropy (nats per token) over the last {w}"),
}


def final_window(steps: int) -> int:
    """Steps whose mean is a run's final value: the last tenth (at least 1)."""
    return max(1, int(round(steps / 10)))


def _mean(xs):
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def per_seed(records, method, seed, steps):
    """The three measures of one run (see MEASURES) plus its extreme log-ratios."""
    rows = sorted((r for r in records if r["method"] == method and r["seed"] == seed),
                  key=lambda r: r["step"])
    w = final_window(steps)
    tail = rows[-w:]
    lo = [r["log_ratio_min"] for r in rows if r["log_ratio_min"] == r["log_ratio_min"]]
    hi = [r["log_ratio_max"] for r in rows if r["log_ratio_max"] == r["log_ratio_max"]]
    return {
        "final_reward": _mean([r["reward"] for r in tail]),
        "mean_log_ratio_range": _mean([r["log_ratio_max"] - r["log_ratio_min"] for r in rows]),
        "final_entropy": _mean([r["entropy"] for r in tail]),
        "log_ratio_min": min(lo) if lo else float("nan"),
        "log_ratio_max": max(hi) if hi else float("nan"),
        "first_reward": _mean([r["reward"] for r in rows[:w]]),
        "steps": len(rows),
    }


def summarize(records, methods, seeds, steps, config=None, reference="gmpo") -> dict:
    """Everything summary.json and summary.md hold: per method and seed the
    measures, per method their mean and 95% t-interval over seeds, per other
    method the paired comparison against ``reference`` (difference =
    reference - other, so a positive difference means the reference is
    higher), and the generated sentences. Without ``reference`` among the
    methods the first method is the reference."""
    seeds, methods = list(seeds), list(methods)
    if reference not in methods:
        reference = methods[0]
    per = {m: {s: per_seed(records, m, s, steps) for s in seeds} for m in methods}
    stats = {m: {k: mean_ci([per[m][s][k] for s in seeds]) for k in
                 list(MEASURES) + ["first_reward"]} for m in methods}
    comp = {}
    if reference in methods:
        for m in methods:
            if m != reference:
                comp[m] = {k: paired([per[reference][s][k] for s in seeds],
                                     [per[m][s][k] for s in seeds]) for k in MEASURES}
    summary = {
        "config": config or {},
        "final_window_steps": final_window(steps),
        "measures": {k: v[1].format(w=_plural(final_window(steps), "step"))
                     for k, v in MEASURES.items()},
        "per_seed": {m: {str(s): v for s, v in d.items()} for m, d in per.items()},
        "methods": stats,
        "reference": reference,
        "paired": comp,
        "test": "paired Student t (two-sided), 95% t-interval of the mean difference over seeds",
    }
    summary["sentences"] = sentences(summary)
    return summary


def _f(x, nd=3, sign=False):
    if x != x:
        return "n/a"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _ci(c):
    if c["lo"] != c["lo"]:
        return "n/a"
    return f"{_f(c['lo'], sign=True)} to {_f(c['hi'], sign=True)}"


def _pm(st, nd=3):
    if st["n"] < 2:
        return _f(st["mean"], nd)
    return f"{_f(st['mean'], nd)} ± {_f(st['half'], nd)}"


def _plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def _name(m):
    return m.upper()


def _pairs(summary, ref, m, key):
    """(reference value, other value) per seed where both have one."""
    a, b = summary["per_seed"][ref], summary["per_seed"][m]
    out = []
    for s in a:
        x, y = a[s].get(key), (b.get(s) or {}).get(key)
        if x is not None and y is not None and x == x and y == y:
            out.append((x, y))
    return out


def _few_seeds(c, pairs, label, R, M):
    """The sentence for a comparison a t-interval cannot make: n = 0, n = 1, or
    every seed's difference the same; None otherwise."""
    n = c["n"]
    if n == 0:
        return f"No seed has a {label} for both {R} and {M}: nothing to compare."
    if n == 1:
        (x, y), = pairs
        return (f"One seed cannot show a difference in {label}: on it {R} has {_f(x)} and {M} "
                f"{_f(y)} (a paired interval needs at least 2 seeds).")
    if c["half"] == 0:
        d = c["mean_diff"]
        if d == 0:
            return f"{R} and {M} have the same {label} on each of the {n} seeds."
        return (f"{R}'s {label} minus {M}'s is {_f(d, sign=True)} on each of the {n} seeds: with "
                "no spread between seeds the t-interval has no width and shows nothing.")
    return None


def sentences(summary) -> list:
    """Plain sentences stating what the numbers show and do not, generated
    from them (a difference is "shown" only when its 95% interval excludes 0;
    fewer than 2 seeds, or the same difference on every seed, shows nothing)."""
    ref, out = summary["reference"], []
    cfg = summary.get("config", {})
    for m, comp in summary["paired"].items():
        c = comp["final_reward"]
        n = c["n"]
        R, M = _name(ref), _name(m)
        few = _few_seeds(c, _pairs(summary, ref, m, "final_reward"), "final reward", R, M)
        if few is not None:
            out.append(few)
        else:
            head = (f"{R}'s final reward is higher than {M}'s on {c['higher']} of {n} seeds; the "
                    f"paired difference is {_f(c['mean_diff'], sign=True)} (95% CI "
                    f"{_f(c['lo'], sign=True)} to {_f(c['hi'], sign=True)}, paired t-test p = "
                    f"{_f(c['p'], 2)})")
            if c["lo"] > 0 or c["hi"] < 0:
                out.append(head + f": {R} {'higher' if c['lo'] > 0 else 'lower'} is shown at "
                           f"n={n} on this task.")
            else:
                out.append(head + f": the interval includes 0, so no difference in final reward "
                           f"is shown at n={n}.")
        # the paper (arXiv 2507.20673) reports GMPO's log-ratio range narrower and its
        # entropy higher than GRPO's
        for k, word, paper in (("mean_log_ratio_range", ("wider", "narrower"), "narrower"),
                               ("final_entropy", ("higher", "lower"), "higher")):
            c = comp[k]
            n = c["n"]
            label = MEASURES[k][0]
            vs_paper = ref == "gmpo" and m == "grpo"
            few = _few_seeds(c, _pairs(summary, ref, m, k), label, R, M)
            if few is not None:
                if vs_paper and n >= 2 and c["mean_diff"] == 0:
                    few = few[:-1] + (f", so the paper's observation ({paper} for GMPO) is not "
                                      "reproduced.")
                out.append(few)
                continue
            head = (f"{label[0].upper()}{label[1:]}, {R} - {M}: {_f(c['mean_diff'], sign=True)} "
                    f"(95% CI {_f(c['lo'], sign=True)} to {_f(c['hi'], sign=True)}; {R} higher "
                    f"on {c['higher']} of {n} seeds)")
            if c["lo"] > 0 or c["hi"] < 0:
                got = word[0] if c["lo"] > 0 else word[1]
                verdict = f"{got} for {R} is shown"
                if vs_paper:
                    verdict += (", as the paper reports" if got == paper else
                                f", the opposite of the paper's observation ({paper} for GMPO)")
            else:
                verdict = "the interval includes 0, no difference shown"
                if vs_paper:
                    verdict += f", so the paper's observation ({paper} for GMPO) is not reproduced"
            out.append(f"{head}: {verdict} at n={n}.")
    if summary["paired"]:
        k = len(MEASURES) * len(summary["paired"])
        out.append(f"The {k} comparisons are each made at the 5% level without a "
                   "multiple-comparison correction: with no true difference anywhere, one or more "
                   f"of them would read as shown with a chance of about "
                   f"{100 * (1 - 0.95 ** k):.0f}%.")
    clip = _clip_sentence(summary, cfg)
    if clip:
        out.append(clip)
    scope = cfg.get("scope")
    if scope:
        out.append(scope)
    return out


def _clip_sentence(summary, cfg):
    """GMPO's clip range against GRPO's, in log-ratio terms (they bear on the
    log-ratio range), when both ran."""
    methods = list(summary["methods"])
    if "gmpo" not in methods or "grpo" not in methods:
        return None
    mc = cfg.get("method_config") or METHOD_CONFIG
    g, r = mc.get("gmpo", METHOD_CONFIG["gmpo"]), mc.get("grpo", METHOD_CONFIG["grpo"])
    glo, ghi = g["epsilon"], g.get("epsilon_high") or g["epsilon"]
    rlo, rhi = r["epsilon"], r.get("epsilon_high") or r["epsilon"]
    lo, hi = math.log(1 - rlo), math.log(1 + rhi)
    wider = -glo <= lo and ghi >= hi and (ghi - (-glo)) > (hi - lo)
    return (f"The clip ranges differ: GMPO clips the per-token log-ratio at {_f(-glo, sign=True)} "
            f"and {_f(ghi, sign=True)}, GRPO the ratio at {1 - rlo:g} and {1 + rhi:g}, i.e. the "
            f"log-ratio at {_f(lo, sign=True)} and {_f(hi, sign=True)}; GMPO's range is "
            f"{'wider' if wider else 'not wider'}, so its tokens' ratios can move further "
            "before the clip stops their gradient, which bears on the log-ratio ranges compared "
            "here.")


def summary_markdown(summary) -> str:
    """The markdown fragment summary.md: a table per method, the paired
    comparison, the sentences (no heading: it is spliced into other pages)."""
    cfg = summary.get("config", {})
    impls = cfg.get("implementations", {})
    ref = summary["reference"]
    n = max(st["final_reward"]["n"] for st in summary["methods"].values())

    def cell(st):       # a cell over fewer seeds than the table says its n
        return _pm(st) if st["n"] == n else f"{_pm(st)} (n={st['n']})"
    lines = []
    if cfg.get("description"):
        lines += [cfg["description"], ""]
    lines += ["| method | trainer | " + " | ".join(v[0] for v in MEASURES.values()) + " |",
              "| :--- | :--- | " + " | ".join("---:" for _ in MEASURES) + " |"]
    for m, st in summary["methods"].items():
        lines.append(f"| {_name(m)} | `{impls.get(m, '?')}` | " +
                     " | ".join(cell(st[k]) for k in MEASURES) + " |")
    lines += ["", f"Mean ± half-width of the 95% t-interval over {_plural(n, 'seed')}; "
              + "; ".join(f"{v[0]}: {summary['measures'][k]}" for k, v in MEASURES.items())
              + "."]
    if summary["paired"]:
        lines += ["", f"| {_name(ref)} against | measure | seeds where {_name(ref)} is higher | "
                  f"mean difference ({_name(ref)} - other) | 95% CI | p |",
                  "| :--- | :--- | ---: | ---: | :---: | ---: |"]
        for m, comp in summary["paired"].items():
            for k, c in comp.items():
                lines.append(f"| {_name(m)} | {MEASURES[k][0]} | {c['higher']} of {c['n']} | "
                             f"{_f(c['mean_diff'], sign=True)} | {_ci(c)} | {_f(c['p'], 3)} |")
        lines += ["", "Paired over seeds (same initial weights and data per seed); "
                  f"test: {summary['test']}."]
    lines += [""] + [" ".join(summary["sentences"])]
    wall = summary.get("wall_s")
    if wall and wall.get("total") is not None:
        per = wall.get("per_run", {})
        runs = sum(len(v) for v in per.values())
        each = ", ".join(f"{_name(m)} {_mean(list(v.values())):.1f} s" for m, v in per.items()
                         if v)
        la = summary.get("load_avg_1min") or {}
        ok = [la.get(k) is not None and la[k] == la[k] for k in ("start", "end")]
        load = (f"; 1-minute load average {la['start']:.1f} at the start, {la['end']:.1f} at the "
                "end" if all(ok) else "")
        cpus = f" on {cfg['cpus']} CPUs" if cfg.get("cpus") else ""
        lines += ["", f"Wall time: {wall['total']:.0f} s of training for {_plural(runs, 'run')}"
                  f"{cpus} (mean per run: {each}){load}."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# outputs

def write_csv(path, records):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in records:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in FIELDS})


def read_csv(path):
    """demo.csv back as records (method str, seed and step int, the rest float)."""
    with open(path, newline="") as f:
        return [{k: (r[k] if k == "method" else int(r[k]) if k in ("seed", "step") else
                     float(r[k])) for k in FIELDS} for r in csv.DictReader(f)]


def summary_from_outputs(out):
    """The summary recomputed from a run's outputs in ``out``: the statistics from
    demo.csv, the run's configuration, wall time and load from summary.json
    (what tools/gen_docs.py checks summary.md and the README against)."""
    with open(os.path.join(out, "summary.json")) as f:
        saved = json.load(f)
    cfg = saved["config"]
    summary = summarize(read_csv(os.path.join(out, "demo.csv")), cfg["methods"], cfg["seeds"],
                        cfg["steps"], config=cfg, reference=saved.get("reference", "gmpo"))
    for k in ("wall_s", "load_avg_1min"):
        if k in saved:
            summary[k] = saved[k]
    return summary


def _band(records, method, key, per_batch: int = 1):
    """(x, mean over seeds, half-width of the 95% t-interval) per step, or with
    ``per_batch`` > 1 per generation batch of that many steps: the extreme
    (min for ``log_ratio_min``, max for ``log_ratio_max``) over the batch's
    steps, at its last step."""
    pick = min if key == "log_ratio_min" else max
    per = {}     # (seed, x) -> value
    for r in records:
        if r["method"] != method or r[key] != r[key]:
            continue
        x = r["step"] if per_batch <= 1 else ((r["step"] - 1) // per_batch + 1) * per_batch
        k = (r["seed"], x)
        per[k] = r[key] if k not in per else pick(per[k], r[key])
    by = {}
    for (_, x), v in per.items():
        by.setdefault(x, []).append(v)
    out = []
    for x in sorted(by):
        st = mean_ci(by[x])
        out.append((x, st["mean"], st["half"] if st["n"] > 1 else 0.0))
    return out


COLORS = {"gmpo": (31, 119, 180), "grpo": (214, 39, 40), "gspo": (44, 160, 44)}
_OTHER_COLORS = [(148, 103, 189), (140, 86, 75), (127, 127, 127)]


def figure_panels(records, methods, per_batch: int = 1):
    """The figure's three panels as data: per method the mean over seeds and its
    95% t-band of the reward and the entropy per step, and of the log-ratio's
    min and max per generation batch (``per_batch`` steps; see :func:`_band`)."""
    spec = [("reward of the generation batch", ("reward",), "reward"),
            ("log-ratio min and max per batch", ("log_ratio_min", "log_ratio_max"),
             "log(pi_theta / pi_old)"),
            ("entropy of the policy", ("entropy",), "nats per token")]
    panels = []
    for title, keys, ylabel in spec:
        series = []
        for i, m in enumerate(methods):
            color = COLORS.get(m, _OTHER_COLORS[i % len(_OTHER_COLORS)])
            for j, key in enumerate(keys):
                b = _band(records, m, key, per_batch if len(keys) == 2 else 1)
                if not b:
                    continue
                s, mu, h = zip(*b)
                series.append({"label": _name(m), "color": color, "x": list(s), "y": list(mu),
                               "lo": [a - c for a, c in zip(mu, h)],
                               "hi": [a + c for a, c in zip(mu, h)], "legend": j == 0})
        panels.append({"title": title, "xlabel": "optimizer step", "ylabel": ylabel,
                       "series": series, "hline": 0.0 if len(keys) == 2 else None})
    return panels


def plot(path, records, methods, title, per_batch: int = 1, backend=None):
    """demo.png: matplotlib when it is installed (``backend="matplotlib"``), else
    the built-in renderer (``backend="builtin"``, gmpo_ext._png). Returns the
    backend used."""
    panels = figure_panels(records, methods, per_batch)
    if backend is None:
        try:
            import matplotlib  # noqa: F401
            backend = "matplotlib"
        except ImportError:
            backend = "builtin"
    if backend == "builtin":
        from ._png import render
        render(path, panels, title)
        return backend
    if backend != "matplotlib":
        raise ValueError(f"backend must be 'matplotlib' or 'builtin', got {backend!r}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.3))
    for ax, p in zip(axes, panels):
        for s in p["series"]:
            c = tuple(v / 255 for v in s["color"])
            ax.plot(s["x"], s["y"], color=c, lw=1.3, label=s["label"] if s["legend"] else None)
            ax.fill_between(s["x"], s["lo"], s["hi"], color=c, alpha=0.2, lw=0)
        if p["hline"] is not None:
            ax.axhline(p["hline"], color="k", lw=0.5)
        ax.set_xlabel(p["xlabel"])
        ax.set_ylabel(p["ylabel"])
        ax.set_title(p["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return backend


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_outputs(out, records, summary, title):
    """demo.csv, demo.png, summary.json, summary.md in ``out``."""
    cfg = summary["config"]
    write_csv(os.path.join(out, "demo.csv"), records)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(_json_safe(summary), f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(summary))
    plot(os.path.join(out, "demo.png"), records, cfg["methods"], title,
         cfg.get("updates_per_generation_batch", 1))


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("gmpo_ext", "torch", "trl", "transformers", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    return out


# ----------------------------------------------------------------------------
# the demo's own set-up

def demo_setup(opts):
    """setup(method, seed) for :func:`train_one`: the tiny model, the task's
    prompts and reward, the config (common fields + METHOD_CONFIG[method])."""
    from datasets import Dataset

    tok = build_tokenizer()
    spg, iters = opts.steps_per_generation, opts.num_iterations
    batch = opts.prompts_per_step * opts.num_generations
    n_gen = -(-opts.steps // (spg * iters))
    reward = make_reward(opts.task, opts.length)

    def setup(method, seed):
        # a fixed-size prompt set (not sized by --steps): the first steps of a run do
        # not depend on how many steps it has
        prompts = make_prompts(max(4096, n_gen * spg * opts.prompts_per_step), seed, opts.task,
                               opts.length)
        common = dict(
            output_dir=opts.trainer_dir, report_to="none", use_cpu=True,
            bf16=False, fp16=False, gradient_checkpointing=False, save_strategy="no",
            logging_steps=1, disable_tqdm=True, seed=seed, data_seed=seed,
            max_steps=opts.steps, learning_rate=opts.lr, lr_scheduler_type="constant",
            warmup_steps=0, adam_beta2=0.99, max_grad_norm=1.0,
            per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            num_generations=opts.num_generations, steps_per_generation=spg,
            num_iterations=iters, max_completion_length=opts.completion_length,
            temperature=1.0, beta=0.0, dataloader_num_workers=0,
        )
        args = config_class(method)(**common, **METHOD_CONFIG[method])
        return dict(model=build_model(len(tok), seed=seed), reward_funcs=reward, args=args,
                    train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)

    return setup


# ----------------------------------------------------------------------------
# command line

# the defaults, and --quick's (one seed, 8 steps over 2 generation batches of 4
# updates each: the final step trains on a batch sampled after 4 updates, so the
# methods' final rewards can differ); a flag given explicitly wins over both
DEFAULTS = dict(seeds=5, steps=400, steps_per_generation=4, num_iterations=2)
QUICK = dict(seeds=1, steps=8, steps_per_generation=2, num_iterations=2)


def output_dir_error(path):
    """Why ``path`` cannot be (or become) an output folder, or None: it or an
    ancestor exists and is not a folder, or the nearest existing ancestor is not
    writable. Nothing is created."""
    p = os.path.abspath(path)
    if os.path.exists(p):
        if not os.path.isdir(p):
            return f"{path!r} exists and is not a folder"
        return None if os.access(p, os.W_OK) else f"{path!r} is not writable"
    parent = os.path.dirname(p)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{path!r} cannot be created: {parent!r} is not a folder"
    if not os.access(parent, os.W_OK):
        return f"{path!r} cannot be created: {parent!r} is not writable"
    return None


def positive_int(name):
    def conv(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}")
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {v}")
        return v
    return conv


def positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def methods_arg(text):
    try:
        return parse_methods(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--methods: ", ""))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the description as written and every default shown."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gmpo-demo", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--methods", type=methods_arg, default="gmpo,grpo",
                   help="comma-separated subset of gmpo, grpo, gspo")
    p.add_argument("--seeds", type=positive_int("--seeds"), default=None,
                   help=f"seeds 0..N-1, every method on each (default {DEFAULTS['seeds']}; "
                   f"--quick: {QUICK['seeds']})")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['seeds']} seed, {QUICK['steps']} steps, "
                   f"{QUICK['steps_per_generation']} x {QUICK['num_iterations']} updates per "
                   "generation batch (what the test suite runs); flags given explicitly win")
    p.add_argument("--out", default="gmpo_demo_out",
                   help="output folder (demo.csv, demo.png, summary.json, summary.md)")
    p.add_argument("--task", choices=sorted(TASKS), default="reverse",
                   help="reverse: reverse a digit string; repeat: repeat the prompt's digit")
    p.add_argument("--length", type=positive_int("--length"), default=4,
                   help="digits per reverse prompt (and the answer's length)")
    p.add_argument("--steps", type=positive_int("--steps"), default=None,
                   help=f"optimizer steps per run (default {DEFAULTS['steps']}; --quick: "
                   f"{QUICK['steps']})")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="learning rate (AdamW)")
    p.add_argument("--prompts-per-step", dest="prompts_per_step",
                   type=positive_int("--prompts-per-step"), default=4)
    p.add_argument("--num-generations", dest="num_generations",
                   type=positive_int("--num-generations"), default=8,
                   help="completions per prompt (the group; at least 2)")
    p.add_argument("--steps-per-generation", dest="steps_per_generation",
                   type=positive_int("--steps-per-generation"), default=None,
                   help="micro-batches per generation batch; x --num-iterations = updates per "
                   f"generation batch (the off-policy knob; default "
                   f"{DEFAULTS['steps_per_generation']}; --quick: {QUICK['steps_per_generation']})")
    p.add_argument("--num-iterations", dest="num_iterations", type=positive_int("--num-iterations"),
                   default=None, help=f"passes over each generation batch (default "
                   f"{DEFAULTS['num_iterations']}; --quick: {QUICK['num_iterations']})")
    p.add_argument("--completion-length", dest="completion_length",
                   type=positive_int("--completion-length"), default=None,
                   help="max completion tokens (default: the answer's length)")
    p.add_argument("--threads", type=positive_int("--threads"), default=1,
                   help="torch intra-op threads (default 1: the model is tiny, one thread keeps "
                   "the run fast on a busy machine)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    opts = p.parse_args(argv)
    for k, v in (QUICK if opts.quick else DEFAULTS).items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    if opts.num_generations < 2:
        p.error("--num-generations must be at least 2 (the advantage compares a prompt's "
                "completions with each other)")
    why = output_dir_error(opts.out)
    if why:
        p.error(f"--out: {why}")
    if opts.completion_length is None:
        opts.completion_length = opts.length if opts.task == "reverse" else 8
    if opts.task == "reverse" and opts.length + 1 + opts.completion_length > 64:
        p.error("--length + 1 + --completion-length must be at most 64 (the model's positions)")
    if opts.task == "repeat":
        opts.length = opts.completion_length
    return opts


# third-party packages whose warnings and logs the runs do not show (deprecation
# notices, generation-config advice); gmpo_ext's own warnings stay visible
NOISY = ("transformers", "trl", "accelerate", "datasets", "huggingface_hub", "tokenizers",
         "deepspeed")


def quiet(offline: bool = False):
    """Quieter runs: warnings raised in the NOISY packages' modules ignored (by
    module, not globally: gmpo_ext's warnings, among them a fused trainer's
    fallback warning, are always shown), their loggers at ERROR. ``offline``:
    set HF_HUB_OFFLINE and HF_DATASETS_OFFLINE (where unset) before transformers
    or datasets are imported: the demo downloads nothing; the real-model example
    must not set them (it may download its model and data)."""
    for name in NOISY:
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
    # first in the list, so it wins over the module filters: a warning of ours
    # can be raised with a stacklevel that points into a third-party module
    warnings.filterwarnings("default", message=r"gmpo_ext")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed (imported by accelerate when installed) sets its own logger's level
    # when it creates it ("Setting accelerator to CPU"); a filter outlives that
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ErrorsOnly) for f in ds.filters):
        ds.addFilter(_ErrorsOnly())


class _ErrorsOnly(logging.Filter):
    def filter(self, record):
        return record.levelno >= logging.ERROR


def _param_count(vocab):
    return sum(p.numel() for p in build_model(vocab).parameters())


def main(argv=None) -> int:
    opts = parse_args(argv)
    quiet(offline=True)
    with contextlib.redirect_stderr(io.StringIO()):   # import-time notices of TRL/transformers
        import torch
        import transformers
        import trl  # noqa: F401
        from . import trl as _gmpo_trl  # noqa: F401  (fails here with a clear message)
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(opts.threads)
    methods, seeds = opts.methods, list(range(opts.seeds))
    upd = opts.steps_per_generation * opts.num_iterations
    batch = opts.prompts_per_step * opts.num_generations
    n_params = _param_count(len(build_tokenizer()))
    task = (f"reverse {opts.length} digits" if opts.task == "reverse" else
            f"repeat the digit ({opts.completion_length} characters)")
    spg, iters = opts.steps_per_generation, opts.num_iterations
    gen = batch * spg
    knob = (f"each generation batch ({gen} completions: {gen // opts.num_generations} prompts x "
            f"{opts.num_generations}) is used for {upd} optimizer steps ({spg} micro-batches of "
            f"{batch} x {iters} passes)")
    print(f"gmpo_ext demo: {task}, tiny Qwen2 ({n_params} parameters, random init), "
          f"{', '.join(methods)} on seeds 0..{opts.seeds - 1}, {opts.steps} optimizer steps per "
          f"run; {knob}; {torch.get_num_threads()} thread(s)")
    desc = (f"{' against '.join(_name(m) for m in methods)}; task: {task} (tiny Qwen2, "
            f"{n_params} parameters, random init, character tokenizer; reward: the fraction of "
            f"answer positions right, a random policy scores about 1/13); "
            f"{_plural(opts.seeds, 'seed')}, {opts.steps} optimizer steps per run; {knob}; "
            f"{clip_ranges(methods)}. Written by `python -m gmpo_ext.demo`.")
    config = {
        "task": opts.task, "length": opts.length, "completion_length": opts.completion_length,
        "lr": opts.lr, "prompts_per_step": opts.prompts_per_step,
        "num_generations": opts.num_generations, "completions_per_step": batch,
        "completions_per_generation_batch": gen,
        "steps_per_generation": opts.steps_per_generation,
        "num_iterations": opts.num_iterations, "updates_per_generation_batch": upd,
        "method_config": {m: METHOD_CONFIG[m] for m in methods},
        "model_parameters": n_params, "threads": opts.threads, "quick": opts.quick,
        "versions": versions(), "cpus": os.cpu_count(), "description": desc,
        "scope": (f"What this does not show: this is one toy task with a {n_params}-parameter "
                  "random-init model on CPU, so it says nothing about how the methods compare "
                  "on real models or benchmarks such as the paper's."),
    }
    title = (f"{' vs '.join(_name(m) for m in methods)}: {task}; mean and 95% band over "
             f"{_plural(opts.seeds, 'seed')}; {upd} updates per generation batch")
    with tempfile.TemporaryDirectory(prefix="gmpo_demo_") as tmp:   # the trainers' output_dir
        opts.trainer_dir = tmp
        summary = run_comparison(methods, seeds, demo_setup(opts), opts.steps, opts.out, config,
                                 title, progress=opts.progress)
    print()
    print(summary_markdown(summary))
    la = summary["load_avg_1min"]
    print(f"wrote demo.csv, demo.png, summary.json, summary.md in {opts.out}: "
          f"{summary['wall_s']['total']:.0f} s of training (1-min load average "
          f"{la['start']:.1f} at the start, {la['end']:.1f} at the end, {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
