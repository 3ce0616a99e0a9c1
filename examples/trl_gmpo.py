"""GMPO with TRL, the loss fused by gmpo_ext: a complete training script.

The only gmpo_ext-specific line is the import of GMPOTrainer; everything else
is a plain TRL GMPO script (GMPOConfig is TRL's own, re-exported).

    # offline, on CPU, a tiny randomly initialised model (about a minute):
    python examples/trl_gmpo.py --max-steps 8

    # a real model (downloads it), e.g. on a GPU:
    python examples/trl_gmpo.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 200 --bf16

Task: two-digit additions ("17+25="), rewarded by the fraction of the sum's
digits the completion gets right (a verifiable reward, no reward model).
"""

from __future__ import annotations

import argparse
import random

from datasets import Dataset

# from trl.experimental.gmpo import GMPOConfig, GMPOTrainer     <- TRL's GMPO
from gmpo_ext.trl import GMPOConfig, GMPOTrainer                # <- the same, fused


def addition_dataset(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "answer")})


def correct_sum(completions, answer, **kwargs):
    """Fraction of the sum's digits the completion gets right, in place (1.0: it starts with
    the right sum). Extra dataset columns (``answer``) arrive as keyword arguments."""
    return [sum(x == y for x, y in zip(c.strip(), a)) / len(a) for c, a in zip(completions, answer)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny",
                   help="a model id or path; 'tiny' builds a random tiny Qwen2 locally")
    p.add_argument("--output-dir", default="gmpo_trl_out")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.model == "tiny":
        from gmpo_ext.demo import build_model, build_tokenizer

        tokenizer = build_tokenizer("0123456789+=")
        model = build_model(len(tokenizer), seed=args.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(args.model)

    config = GMPOConfig(
        output_dir=args.output_dir,
        # GMPO's clip range is in LOG space: ratios kept within (e^-0.4, e^0.4)
        epsilon=0.4,
        epsilon_high=0.4,
        beta=0.0,                       # > 0 adds the k3 KL to a reference model
        num_generations=8,
        per_device_train_batch_size=16,
        steps_per_generation=2,         # several updates per generation batch:
        num_iterations=2,               # the importance ratios move away from 1
        max_completion_length=4,
        temperature=1.0,
        learning_rate=3e-3 if args.model == "tiny" else 1e-6,
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        use_cpu=args.model == "tiny",
        gradient_checkpointing=False,
        seed=args.seed,
    )
    trainer = GMPOTrainer(
        model=model,
        reward_funcs=correct_sum,
        args=config,
        train_dataset=addition_dataset(512, args.seed),
        processing_class=tokenizer,
    )
    trainer.train()
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    print({k: last[k] for k in ("loss", "entropy", "clip_ratio/region_mean",
                                "gmpo/log_ratio_min", "gmpo/log_ratio_max") if k in last})


if __name__ == "__main__":
    main()
