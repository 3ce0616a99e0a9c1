"""The main job (gmpo_ext.demo) and its real-model sibling (examples/ab_real_model.py).

End to end: ``--quick`` writes demo.csv (one row per step, seed and method, the
recorder's columns), demo.png, summary.json and summary.md; the example runs
two steps per method through the same code with a tiny model saved to disk
and a local jsonl dataset. Units: the reward's partial credit, the clip rule
of each method, Student's t quantiles and the paired comparison against
hand-checked values, the generated sentences, the built-in PNG renderer, and
bad flags rejected with a message naming the flag.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import struct
import warnings
import weakref
import zlib

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[test]' installs it)")
pytest.importorskip("transformers", reason="transformers is not installed")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gmpo_ext import demo  # noqa: E402
from gmpo_ext._png import nice_ticks, render  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png_size(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _check_outputs(out, methods, seeds, steps):
    with open(os.path.join(out, "demo.csv")) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == demo.FIELDS
        rows = list(reader)
    assert len(rows) == len(methods) * len(seeds) * steps
    for m in methods:
        for s in seeds:
            got = [int(r["step"]) for r in rows if r["method"] == m and r["seed"] == str(s)]
            assert got == list(range(1, steps + 1))
    for r in rows:
        for k in ("reward", "log_ratio_min", "log_ratio_max", "entropy", "clip_frac", "kl_old",
                  "grad_norm"):
            assert math.isfinite(float(r[k])), (k, r)
        assert float(r["log_ratio_min"]) <= float(r["log_ratio_max"])
        assert 0.0 <= float(r["clip_frac"]) <= 1.0 and float(r["kl_old"]) >= 0.0
        assert 0.0 <= float(r["reward"]) <= 1.0 and float(r["entropy"]) > 0.0
    w, h = _png_size(os.path.join(out, "demo.png"))
    assert w > 500 and h > 200
    with open(os.path.join(out, "summary.json")) as f:
        summ = json.load(f)
    assert summ["config"]["methods"] == methods and summ["config"]["seeds"] == seeds
    assert set(summ["methods"]) == set(methods)
    with open(os.path.join(out, "summary.md")) as f:
        md = f.read()
    assert md.startswith(summ["config"]["description"])
    for m in methods:
        assert f"| {m.upper()} | `{summ['config']['implementations'][m]}` |" in md
    for s in summ["sentences"]:
        assert s in md
    return rows, summ, md


# ----------------------------------------------------------------------------
# end to end

def test_quick_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert demo.main(["--quick", "--out", out, "--no-progress"]) == 0
    steps = demo.QUICK["steps"]
    rows, summ, md = _check_outputs(out, ["gmpo", "grpo"], [0], steps)
    # both methods through gmpo_ext's fused trainers (the same code path); the
    # implementation is read from the class that ran, and printed; no fallback
    impl = summ["config"]["implementations"]
    assert impl == {"gmpo": "gmpo_ext.trl.GMPOTrainer", "grpo": "gmpo_ext.trl.GRPOTrainer"}
    assert summ["config"]["fallbacks"] == {}
    printed = capsys.readouterr().out
    assert f"gmpo runs through {impl['gmpo']}" in printed
    assert f"grpo runs through {impl['grpo']}" in printed
    # each generation batch is reused for steps_per_generation x num_iterations updates:
    # its first update is on-policy (log-ratio ~0, no clipping), later ones are not
    upd = summ["config"]["updates_per_generation_batch"]
    for r in rows:
        lo, hi = float(r["log_ratio_min"]), float(r["log_ratio_max"])
        if (int(r["step"]) - 1) % upd == 0:
            assert max(-lo, hi) < 1e-4 and float(r["clip_frac"]) == 0.0
    assert any(float(r["log_ratio_max"]) - float(r["log_ratio_min"]) > 1e-2 for r in rows)
    # --quick compares after updates: its final window lies in a later generation
    # batch than the first, sampled by a policy each method has updated
    assert steps >= 2 * upd
    assert steps - summ["final_window_steps"] >= upd
    # one seed: no interval, and the sentence says so
    assert summ["methods"]["gmpo"]["final_reward"]["half"] is None
    assert summ["sentences"][0].startswith("One seed cannot show a difference in final reward")
    assert "Wall time:" in md
    # both methods start from the same weights and data: the first batch's reward is equal
    first = {r["method"]: r["reward"] for r in rows if r["step"] == "1"}
    assert first["gmpo"] == first["grpo"]


def _load_example():
    path = os.path.join(ROOT, "examples", "ab_real_model.py")
    spec = importlib.util.spec_from_file_location("ab_real_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("chat", [False, True], ids=["plain_gas2", "chat_template"])
def test_ab_real_model_wiring(tmp_path, chat, monkeypatch):
    """examples/ab_real_model.py end to end on CPU: a tiny model saved to disk, a local
    jsonl dataset, one seed, a few steps per method (GSM8K-style answers); prompts as
    text, or as chat messages when the tokenizer has a chat template. It leaves Hugging
    Face's offline switches alone (a GPU box downloads the model and data). The plain
    case accumulates 2 micro-batches per step: a generation batch then lasts
    steps-per-generation x iterations / 2 optimizer steps."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    ex = _load_example()
    tok = demo.build_tokenizer("0123456789+-=?#:. \nQuestionAnswerSolvhpmdilyfbcwkt,<>|")
    if chat:
        tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                             "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    model_dir = tmp_path / "tiny"
    demo.build_model(len(tok), seed=0, hidden=32).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    from transformers import AutoTokenizer
    assert (AutoTokenizer.from_pretrained(model_dir).chat_template is not None) == chat
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]:
            f.write(json.dumps({"q": f"{a}+{b}?", "a": f"#### {a + b}"}) + "\n")
    out = str(tmp_path / "out")
    steps = 2 if chat else 4
    if not chat:    # a reward that varies within a group, so that the updates move the policy
        monkeypatch.setattr(ex, "last_number_reward", lambda completions, answer, **kw: [
            sum(ch.isdigit() for ch in c) / 4 for c in completions])
    gas = [] if chat else ["--gradient-accumulation-steps", "2", "--steps-per-generation", "2",
                           "--num-iterations", "2"]
    assert ex.main(["--model", str(model_dir), "--dataset", str(data), "--question-field", "q",
                    "--answer-field", "a", "--seeds", "1", "--steps", str(steps), "--use-cpu",
                    "--prompts-per-step", "2", "--num-generations", "2",
                    "--max-completion-length", "4", "--lr", "1e-3", "--out", out,
                    "--no-progress"] + gas) == 0
    rows, summ, _ = _check_outputs(out, ["gmpo", "grpo"], [0], steps)
    assert summ["config"]["model"] == str(model_dir)
    assert summ["config"]["implementations"]["grpo"] == "gmpo_ext.trl.GRPOTrainer"
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    if not chat:
        # TRL samples every 2 x 2 micro-batches = 2 optimizer steps of 2 micro-batches:
        # steps 1 and 3 train on fresh samples (on-policy), steps 2 and 4 reuse them
        assert summ["config"]["updates_per_generation_batch"] == 2
        assert summ["config"]["completions_per_generation_batch"] == 4
        for r in rows:
            rng = max(-float(r["log_ratio_min"]), float(r["log_ratio_max"]))
            if r["step"] in ("1", "3"):
                assert rng < 1e-5, r
        assert all(max(-float(r["log_ratio_min"]), float(r["log_ratio_max"])) > 1e-4
                   for r in rows if r["step"] in ("2", "4"))


def test_ab_real_model_needs_cuda_or_use_cpu(tmp_path, monkeypatch):
    """Without a usable GPU the example stops with a message naming --use-cpu, before
    it loads anything (the model path does not even exist)."""
    ex = _load_example()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--use-cpu"):
        ex.main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])


def test_ab_real_model_arguments(tmp_path):
    ex = _load_example()
    o = ex.parse_args([])
    assert (o.model, o.dataset, o.dataset_config) == ("Qwen/Qwen2.5-0.5B-Instruct",
                                                      "openai/gsm8k", "main")
    assert o.methods == ["gmpo", "grpo"] and not o.bf16
    o = ex.parse_args(["--methods", "gmpo,gspo", "--seeds", "4", "--steps", "50", "--bf16",
                       "--model", "/m"])
    assert (o.methods, o.seeds, o.steps, o.bf16, o.model) == (["gmpo", "gspo"], 4, 50, True, "/m")
    for bad in (["--methods", "gmpo,ppo"], ["--seeds", "0"], ["--steps", "x"],
                ["--num-generations", "1"], ["--out", str(tmp_path / "f" / "x")],
                # 4 micro-batches per step, a generation batch lasts 2 x 1: not whole steps
                ["--gradient-accumulation-steps", "4", "--steps-per-generation", "2",
                 "--num-iterations", "1"],
                ["--gradient-accumulation-steps", "3"]):   # 4 x 8 completions per step
        (tmp_path / "f").write_text("a file")
        with pytest.raises(SystemExit):
            ex.parse_args(bad)
    o = ex.parse_args(["--gradient-accumulation-steps", "4", "--steps-per-generation", "4",
                       "--num-iterations", "2"])
    assert ex.updates_per_generation_batch(o) == 2
    # the reward: the completion's last number against GSM8K's "#### n"
    assert ex.gold_number("so 3 + 4 = 7\n#### 1,234") == 1234.0
    assert ex.last_number_reward(["it is 1,234", "1234 or 12", "none"],
                                 ["#### 1234"] * 3) == [1.0, 0.0, 0.0]
    assert ex.last_number_reward([[{"role": "assistant", "content": "x = 7"}]], ["7"]) == [1.0]
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(SystemExit, match="--dataset"):
        ex.load_rows(str(bad), None, "train", "question", "answer")


# ----------------------------------------------------------------------------
# the task

def test_reward_partial_credit():
    assert demo.answer("reverse", "3071:", 4) == "1703"
    assert demo.answer("repeat", "7:", 3) == "777"
    assert demo.position_credit("1703", "1703") == 1.0
    assert demo.position_credit("1700", "1703") == 0.75
    assert demo.position_credit("3071", "1703") == 0.0
    assert demo.position_credit("17", "1703") == 0.5          # missing positions score 0
    assert demo.position_credit("", "1703") == 0.0
    assert demo.position_credit("170399", "1703") == 1.0      # past the answer: ignored
    assert demo.position_credit("x1703", "1703") == 0.0       # in place, not anywhere
    reward = demo.make_reward("reverse", 4)
    assert reward(["3071:", "1234:"], ["1703", "4300"]) == [1.0, 0.5]
    assert demo.make_reward("repeat", 4)(["7:"], ["7707"]) == [0.75]
    with pytest.raises(ValueError, match="task"):
        demo.make_reward("sort", 4)
    prompts = demo.make_prompts(50, seed=3, task="reverse", length=4)
    assert prompts == demo.make_prompts(50, seed=3, task="reverse", length=4)
    assert all(len(p) == 5 and p[4] == ":" and p[:4].isdigit() for p in prompts)
    assert prompts != demo.make_prompts(50, seed=4, task="reverse", length=4)


def test_clipped_tokens():
    l = torch.tensor([[0.5, -0.5, 0.1, 0.3], [0.5, -0.5, 0.1, 0.3]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    # GMPO, log space 0.4: A > 0 clips l > 0.4; A < 0 clips l < -0.4 (padding never counts)
    got = demo.clipped_tokens("token_log", l, adv, mask, 0.4, 0.4)
    assert got.tolist() == [[True, False, False, False], [False, True, False, False]]
    # GRPO, ratio space 0.2: e^0.5 > 1.2, e^-0.5 < 0.8, e^0.1 and e^0.3 = 1.35 (> 1.2, A < 0: kept)
    got = demo.clipped_tokens("token_ratio", l, adv, mask, 0.2, 0.2)
    assert got.tolist() == [[True, False, False, False], [False, True, False, False]]
    # GSPO: row 0's mean 0.0333 (inside), row 1's 0.1 -> e^0.1 = 1.105 > 1 - 0.2; with
    # eps 0.05 row 1 (A < 0) is not clipped either: its ratio is above 1
    got = demo.clipped_tokens("sequence_ratio", l, adv, mask, 0.05, 0.05)
    assert not got.any()
    got = demo.clipped_tokens("sequence_ratio", l, torch.tensor([-1.0, 1.0]), mask, 0.05, 0.05)
    assert got.tolist() == [[False] * 4, [True] * 4]
    with pytest.raises(ValueError, match="rule"):
        demo.clipped_tokens("ppo", l, adv, mask, 0.2, 0.2)


# ----------------------------------------------------------------------------
# statistics

def test_t_quantile_known_values():
    for p in (0.6, 0.9, 0.975, 0.995, 0.1):
        # closed forms: df = 1 (Cauchy), df = 2
        assert demo.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert demo.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)),
                                                      rel=1e-9)
    # tables of Student's t: 97.5% points
    for df, q in ((4, 2.7764451052), (9, 2.2621571628), (29, 2.0452296421)):
        assert demo.t_quantile(0.975, df) == pytest.approx(q, rel=1e-8)
    assert demo.t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert demo.t_quantile(0.5, 3) == 0.0
    assert demo.t_sf2(demo.t_quantile(0.975, 7), 7) == pytest.approx(0.05, rel=1e-9)
    for bad in (0.0, 1.0, -1):
        with pytest.raises(ValueError, match="p must"):
            demo.t_quantile(bad, 3)


def test_mean_ci_hand_checked():
    st = demo.mean_ci([1, 2, 3, 4, 5])
    # mean 3, s = sqrt(2.5), half = t(0.975, 4) * s / sqrt(5)
    assert st["n"] == 5 and st["mean"] == 3.0 and st["sd"] == pytest.approx(math.sqrt(2.5))
    assert st["half"] == pytest.approx(2.7764451052 * math.sqrt(2.5) / math.sqrt(5), rel=1e-9)
    assert (st["lo"], st["hi"]) == (pytest.approx(3 - st["half"]), pytest.approx(3 + st["half"]))
    st = demo.mean_ci([2.0, float("nan")])           # NaN dropped: one value, no interval
    assert st["n"] == 1 and st["mean"] == 2.0 and math.isnan(st["half"])
    assert demo.mean_ci([])["n"] == 0


def test_paired_hand_checked():
    c = demo.paired([1, 2, 3], [0, 2, 1])            # differences 1, 0, 2
    assert (c["n"], c["higher"], c["equal"], c["lower"]) == (3, 2, 1, 0)
    assert c["mean_diff"] == 1.0
    # s = 1; half = t(0.975, 2) / sqrt(3); t = sqrt(3); df 2: p = 1 - t / sqrt(2 + t^2)
    assert c["half"] == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-9)
    assert c["t"] == pytest.approx(math.sqrt(3))
    assert c["p"] == pytest.approx(1 - math.sqrt(3) / math.sqrt(5), rel=1e-9)
    c = demo.paired([3, 3], [1, 1])                  # identical differences: no spread
    assert c["p"] == 0.0 and c["lower"] == 0
    with pytest.raises(ValueError, match="paired"):
        demo.paired([1, 2], [1])


def _records(rewards_by_method, steps=10):
    """Synthetic records: reward per (method, seed) constant over the steps."""
    out = []
    for m, per_seed in rewards_by_method.items():
        for s, rew in enumerate(per_seed):
            for t in range(1, steps + 1):
                out.append({"method": m, "seed": s, "step": t, "reward": rew,
                            "log_ratio_min": -0.1 * (s + 1), "log_ratio_max": 0.2,
                            "entropy": 1.0 + 0.01 * s, "clip_frac": 0.0, "kl_old": 0.0,
                            "grad_norm": 1.0, "loss": 0.0})
    return out


def test_summary_sentences_follow_the_numbers(tmp_path):
    # GMPO clearly higher on every seed: the CI excludes 0 and the sentence says so
    recs = _records({"gmpo": [0.9, 0.8, 0.85, 0.95], "grpo": [0.5, 0.45, 0.5, 0.55]})
    s = demo.summarize(recs, ["gmpo", "grpo"], range(4), 10)
    c = s["paired"]["grpo"]["final_reward"]
    assert c["higher"] == 4 and c["lo"] > 0
    assert "GMPO higher is shown at n=4" in s["sentences"][0]
    # noisy, no consistent difference: the CI includes 0
    recs = _records({"gmpo": [0.9, 0.4, 0.6, 0.5], "grpo": [0.5, 0.8, 0.55, 0.5]})
    s = demo.summarize(recs, ["gmpo", "grpo"], range(4), 10)
    assert "includes 0, so no difference in final reward is shown at n=4" in s["sentences"][0]
    # the same log-ratio ranges and entropies for both on every seed: no difference
    assert s["sentences"][1].startswith("GMPO and GRPO have the same mean log-ratio range on "
                                        "each of the 4 seeds, so")
    assert s["sentences"][2].startswith("GMPO and GRPO have the same final entropy on each")
    assert "the paper's observation (narrower for GMPO) is not reproduced" in s["sentences"][1]
    assert "the paper's observation (higher for GMPO) is not reproduced" in s["sentences"][2]
    # GMPO's range wider on every seed: shown, and said to be the opposite of the paper's
    recs2 = _records({"gmpo": [0.5, 0.6, 0.5, 0.6], "grpo": [0.5, 0.6, 0.5, 0.6]})
    for r in recs2:
        if r["method"] == "gmpo":
            r["log_ratio_max"] += 0.5 + 0.01 * r["seed"]
    s2 = demo.summarize(recs2, ["gmpo", "grpo"], range(4), 10)
    assert ("GMPO higher on 4 of 4 seeds): wider for GMPO is shown, the opposite of the paper's "
            "observation (narrower for GMPO) at n=4.") in s2["sentences"][1]
    md = demo.summary_markdown(s)
    assert "| GRPO | final reward | 2 of 4 |" in md
    demo.write_outputs(str(tmp_path), recs, dict(s, config={"methods": ["gmpo", "grpo"],
                                                           "steps": 10}), "t")
    assert sorted(os.listdir(tmp_path)) == ["demo.csv", "demo.png", "summary.json", "summary.md"]


def test_summary_sentences_edge_cases():
    """Few seeds, NaN, identical differences and a run without GMPO: the sentences
    say what the numbers can show, each measure with its own n."""
    # one seed: no interval
    s = demo.summarize(_records({"gmpo": [0.6], "grpo": [0.5]}), ["gmpo", "grpo"], [0], 10)
    assert s["sentences"][0] == ("One seed cannot show a difference in final reward: on it GMPO "
                                 "has 0.600 and GRPO 0.500 (a paired interval needs at least 2 "
                                 "seeds).")
    # NaN final rewards on seeds 1 and 2 of GRPO: the reward's comparison has n=1 (seed
    # 0 only), the other measures keep n=3; the table's GRPO cell says n=1
    recs = _records({"gmpo": [0.6, 0.7, 0.8], "grpo": [0.5, 0.6, 0.7]})
    for r in recs:
        if r["method"] == "grpo" and r["seed"] > 0:
            r["reward"] = float("nan")
    s = demo.summarize(recs, ["gmpo", "grpo"], range(3), 10)
    assert s["paired"]["grpo"]["final_reward"]["n"] == 1
    assert s["sentences"][0].startswith("One seed cannot show a difference in final reward: on "
                                        "it GMPO has 0.600 and GRPO 0.500")
    assert "on each of the 3 seeds" in s["sentences"][1]
    assert "on each of the 3 seeds" in s["sentences"][2]
    md = demo.summary_markdown(s)
    assert "| GRPO | `?` | 0.500 (n=1) |" in md and "over 3 seeds" in md
    # no seed with a value
    for r in recs:
        if r["method"] == "grpo":
            r["reward"] = float("nan")
    s = demo.summarize(recs, ["gmpo", "grpo"], range(3), 10)
    assert s["sentences"][0] == "No seed has a final reward for both GMPO and GRPO: nothing to compare."
    # the same difference on every seed: a zero-width interval shows nothing
    s = demo.summarize(_records({"gmpo": [0.6, 0.7], "grpo": [0.5, 0.6]}), ["gmpo", "grpo"],
                       range(2), 10)
    assert s["sentences"][0] == ("GMPO's final reward minus GRPO's is +0.100 on each of the 2 "
                                 "seeds: with no spread between seeds the t-interval has no "
                                 "width and shows nothing.")
    assert s["sentences"][1].startswith("GMPO and GRPO have the same mean log-ratio range on "
                                        "each of the 2 seeds")
    # 3 comparisons without a multiplicity correction; the clip ranges in log-ratio terms
    assert any("3 comparisons are each made at the 5% level without a multiple-comparison "
               "correction" in x and "about 14%" in x for x in s["sentences"])
    clip = [x for x in s["sentences"] if x.startswith("The clip ranges differ")]
    assert clip and "GMPO clips the per-token log-ratio at -0.400 and +0.400" in clip[0]
    assert "i.e. the log-ratio at -0.223 and +0.182; GMPO's range is wider" in clip[0]
    # without GMPO the first method is the reference; no paper or clip sentence
    recs = _records({"grpo": [0.9, 0.8, 0.85, 0.95], "gspo": [0.5, 0.45, 0.5, 0.55]})
    s = demo.summarize(recs, ["grpo", "gspo"], range(4), 10)
    assert s["reference"] == "grpo" and list(s["paired"]) == ["gspo"]
    assert "GRPO higher is shown at n=4" in s["sentences"][0]
    assert not any("paper" in x or "clip ranges" in x for x in s["sentences"])


def test_summary_recomputed_from_the_outputs(tmp_path):
    """summary_from_outputs (what tools/gen_docs.py checks the docs with) gives back
    the markdown the run wrote, from demo.csv and summary.json alone."""
    recs = _records({"gmpo": [0.9, 0.4, 0.6], "grpo": [0.5, 0.8, 0.55]})
    cfg = {"methods": ["gmpo", "grpo"], "seeds": [0, 1, 2], "steps": 10, "description": "d",
           "scope": "s", "implementations": {"gmpo": "a.B", "grpo": "c.D"}}
    s = demo.summarize(recs, cfg["methods"], cfg["seeds"], 10, config=cfg)
    s["wall_s"] = {"total": 12.5, "per_run": {"gmpo": {"0": 2.0, "1": 2.2, "2": 2.1},
                                              "grpo": {"0": 2.0, "1": 2.0, "2": 2.2}}}
    s["load_avg_1min"] = {"start": 1.5, "after_each_run": [2.0], "end": 2.25}
    demo.write_outputs(str(tmp_path), recs, s, "t")
    md = (tmp_path / "summary.md").read_text()
    assert "Wall time: 12 s of training for 6 runs (mean per run: GMPO 2.1 s, GRPO 2.1 s); " \
           "1-minute load average 1.5 at the start, 2.2 at the end." in md
    assert demo.summary_markdown(demo.summary_from_outputs(str(tmp_path))) == md


# ----------------------------------------------------------------------------
# the built-in PNG renderer

def test_builtin_png(tmp_path):
    path = str(tmp_path / "p.png")
    series = [{"label": "A", "color": (255, 0, 0), "x": [1, 2, 3], "y": [0.0, 1.0, 0.5],
               "lo": [-0.1, 0.9, 0.4], "hi": [0.1, 1.1, 0.6]}]
    render(path, [{"title": "t", "xlabel": "x", "ylabel": "y", "series": series, "hline": 0.0}],
           title="title", width=400, height=200)
    assert _png_size(path) == (400, 200)
    with open(path, "rb") as f:
        data = f.read()
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert len(raw) == 200 * (1 + 3 * 400)
    assert bytes([255, 0, 0]) in raw                  # the line is drawn
    assert nice_ticks(0, 1, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 100, 4) == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert nice_ticks(3, 157, 6) == [50.0, 100.0, 150.0]    # smallest round step >= span / n
    assert demo.plot(path, _records({"gmpo": [0.5, 0.6]}), ["gmpo"], "t", 10,
                     backend="builtin") == "builtin"


def test_builtin_png_survives_inf_and_nan(tmp_path):
    """Infinite and NaN values (a run that diverged) are left out, not a crash."""
    inf, nan = float("inf"), float("nan")
    series = [{"label": "A", "color": (255, 0, 0), "x": [1, 2, 3, 4, inf],
               "y": [0.0, inf, -inf, 0.5, 1.0], "lo": [nan, 0.9, -inf, 0.4, 0.0],
               "hi": [0.1, inf, 1.0, 0.6, 0.0]},
              {"label": "B", "color": (0, 0, 255), "x": [1, 2], "y": [nan, nan]}]
    path = str(tmp_path / "p.png")
    render(path, [{"title": "t", "xlabel": "x", "ylabel": "y", "series": series, "hline": None}],
           width=300, height=150)
    assert _png_size(path) == (300, 150)
    recs = _records({"gmpo": [0.5, 0.6]})
    recs[3]["log_ratio_max"] = inf
    recs[4]["reward"] = -inf
    assert demo.plot(path, recs, ["gmpo"], "t", 2, backend="builtin") == "builtin"


# ----------------------------------------------------------------------------
# flags

@pytest.mark.parametrize("argv, flag", [
    (["--methods", "gmpo,ppo"], "--methods"),
    (["--methods", ""], "--methods"),
    (["--methods", "gmpo,gmpo"], "--methods"),
    (["--seeds", "0"], "--seeds"),
    (["--steps", "-3"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--lr", "0"], "--lr"),
    (["--task", "sort"], "--task"),
    (["--steps-per-generation", "0"], "--steps-per-generation"),
    (["--length", "40", "--completion-length", "40"], "--length"),
    (["--num-generations", "1"], "--num-generations"),
    (["--out", "@FILE/x"], "--out"),
    (["--out", "@FILE"], "--out"),
])
def test_bad_flags_rejected(argv, flag, capsys, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    argv = [a.replace("@FILE", str(f)) for a in argv]
    with pytest.raises(SystemExit) as e:
        demo.parse_args(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_flags():
    o = demo.parse_args([])
    assert o.seeds == 5 and o.methods == ["gmpo", "grpo"] and o.task == "reverse"
    assert o.completion_length == o.length
    assert (o.steps, o.steps_per_generation, o.num_iterations) == (400, 4, 2)
    o = demo.parse_args(["--methods", "GMPO, grpo,gspo", "--quick"])
    assert o.methods == ["gmpo", "grpo", "gspo"]
    assert (o.seeds, o.steps, o.steps_per_generation, o.num_iterations) == (1, 8, 2, 2)
    # flags given with --quick win over its values
    o = demo.parse_args(["--quick", "--seeds", "3", "--steps", "5", "--num-iterations", "1"])
    assert (o.seeds, o.steps, o.steps_per_generation, o.num_iterations) == (3, 5, 2, 1)
    from gmpo_ext.trl import GRPOTrainer
    assert demo.trainer_class("gspo") is demo.trainer_class("grpo") is GRPOTrainer
    assert demo.METHOD_CONFIG["gspo"]["importance_sampling_level"] == "sequence"
    with pytest.raises(ValueError, match="method"):
        demo.trainer_class("ppo")


def test_band_per_generation_batch():
    """The figure's log-ratio panel: per generation batch the extreme over its steps,
    then mean and t-band over seeds; the other panels per step."""
    recs = []
    for seed, vals in ((0, [-0.1, -0.5, -0.2, -0.3]), (1, [-0.3, -0.1, -0.4, -0.2])):
        for step, v in enumerate(vals, 1):
            recs.append({"method": "gmpo", "seed": seed, "step": step, "log_ratio_min": v,
                         "log_ratio_max": -v, "reward": v})
    got = demo._band(recs, "gmpo", "log_ratio_min", per_batch=2)
    # batch 1 (steps 1-2): seed 0 -0.5, seed 1 -0.3; batch 2 (steps 3-4): -0.3, -0.4
    assert [x for x, _, _ in got] == [2, 4]
    assert got[0][1] == pytest.approx(-0.4) and got[1][1] == pytest.approx(-0.35)
    # s = 0.1 sqrt(2), half = t(0.975, 1) s / sqrt(2)
    assert got[0][2] == pytest.approx(12.706204736 * 0.1, rel=1e-8)
    got = demo._band(recs, "gmpo", "log_ratio_max", per_batch=2)
    assert [m for _, m, _ in got] == [pytest.approx(0.4), pytest.approx(0.35)]
    got = demo._band(recs, "gmpo", "reward")
    assert [x for x, _, _ in got] == [1, 2, 3, 4] and got[1][1] == pytest.approx(-0.3)


@pytest.mark.parametrize("method", ["gmpo", "grpo", "gspo"])
def test_recorder_matches_the_trainers_own_metrics(method, tmp_path):
    """The recorder computes every method's measures with one code path; where the
    trainer logs the same quantity (entropy, clip fraction: tokens, or rows for
    GSPO's sequence-level clip; GMPO also the log-ratio range), the two agree step by
    step. The run's model is freed when train_one returns."""
    opts = demo.parse_args(["--quick", "--out", str(tmp_path)])
    opts.trainer_dir = str(tmp_path)
    logs, models = [], []
    setup = demo.demo_setup(opts)

    def tracked(m, seed):
        kw = setup(m, seed)
        models.append(weakref.ref(kw["model"]))
        return kw
    rows, _, _ = demo.train_one(method, 0, tracked, opts.steps, progress=False,
                                log_history=logs)
    assert models and models[0]() is None           # no model left behind
    logs = {h["step"]: h for h in logs if "loss" in h}
    assert sorted(logs) == [r["step"] for r in rows]
    for r in rows:
        h = logs[r["step"]]
        assert r["entropy"] == pytest.approx(h["entropy"], abs=1e-5)
        assert r["grad_norm"] == h["grad_norm"] and r["loss"] == h["loss"]
        # the clip fraction: the same tokens (a log-ratio within rounding of a bound could
        # differ; none does in this deterministic run)
        assert r["clip_frac"] == pytest.approx(h["clip_ratio/region_mean"], abs=1e-6)
        if method == "gmpo":
            assert r["log_ratio_min"] == pytest.approx(h["gmpo/log_ratio_min"], abs=1e-4)
            assert r["log_ratio_max"] == pytest.approx(h["gmpo/log_ratio_max"], abs=1e-4)
    assert any(r["clip_frac"] > 0 for r in rows)


def test_fallback_is_visible_and_recorded(tmp_path, monkeypatch):
    """A fused trainer that cannot fuse the LM head warns (quiet() keeps gmpo_ext's
    warnings visible, while it ignores transformers' by module) and the run records
    the reason in summary.json."""
    from gmpo_ext import trl as gtrl
    monkeypatch.setattr(gtrl._FusedHeadMixin, "_head", lambda self, base, cfg: "a test reason")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        assert demo.main(["--quick", "--steps", "1", "--methods", "grpo", "--out", str(out),
                          "--no-progress"]) == 0
    msgs = [str(w.message) for w in caught]
    assert any("fused LM head unavailable: a test reason; using the logits path" in m
               for m in msgs), msgs
    summ = json.loads((out / "summary.json").read_text())
    assert summ["config"]["fallbacks"] == {"grpo": ["seed 0: fused LM head unavailable: a test "
                                                    "reason"]}


def test_quiet_filters_by_module(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")         # what shows without quiet(): everything
        demo.quiet()
        warnings.warn_explicit("noise", UserWarning, "trainer.py", 1,
                               module="transformers.trainer")
        warnings.warn_explicit("gmpo_ext.trl.GRPOTrainer: x; this batch uses TRL's own loss",
                               UserWarning, "trainer.py", 2, module="transformers.trainer")
        warnings.warn_explicit("ours", UserWarning, "demo.py", 3, module="gmpo_ext.demo")
    assert [str(w.message) for w in caught] == [
        "gmpo_ext.trl.GRPOTrainer: x; this batch uses TRL's own loss", "ours"]
    assert "HF_HUB_OFFLINE" not in os.environ        # only the demo's main sets offline
    import logging
    ds = logging.getLogger("DeepSpeed")
    ds.setLevel(logging.INFO)                         # what DeepSpeed does when it starts
    mk = lambda lvl: logging.LogRecord("DeepSpeed", lvl, "f.py", 1, "m", None, None)  # noqa: E731
    assert not ds.filter(mk(logging.WARNING)) and ds.filter(mk(logging.ERROR))


def test_policy_measures_in_chunks_and_kl_direction():
    """policy_measures over chunks of rows (a logits budget) equals one forward, and
    the recorder's kl_old is KL(pi_old || pi_theta), exactly, on a case where the
    completions are pi_old's outcomes in proportion (1/2, 1/4, 1/4)."""
    from types import SimpleNamespace
    import contextlib

    assert demo.rows_per_forward(256, 151936) == 1
    assert demo.rows_per_forward(8, 13) == (256 * 2**20) // (9 * 13 * 4)
    assert demo.rows_per_forward(8, 13, max_logits_bytes=1) == 1

    new = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    old = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)

    class Fixed(torch.nn.Module):     # the same next-token distribution everywhere
        def __init__(self):
            super().__init__()
            self.calls, self.config = 0, SimpleNamespace(vocab_size=3)

        def forward(self, input_ids, attention_mask, logits_to_keep, use_cache):
            self.calls += 1
            B = input_ids.shape[0]
            return SimpleNamespace(logits=new.log().float().expand(B, logits_to_keep, 3).clone())
    c_ids = torch.tensor([[0], [0], [1], [2]])
    inputs = {"prompt_ids": torch.zeros(4, 2, dtype=torch.long),
              "prompt_mask": torch.ones(4, 2, dtype=torch.long), "completion_ids": c_ids,
              "completion_mask": torch.ones(4, 1, dtype=torch.long),
              "old_per_token_logps": old.log()[c_ids].float(),
              "advantages": torch.tensor([1.0, -1.0, 1.0, -1.0])}
    model = Fixed()
    one = demo.policy_measures(model, inputs, 1.0)
    assert model.calls == 1
    model.calls = 0
    chunked = demo.policy_measures(model, inputs, 1.0, max_logits_bytes=2 * 2 * 3 * 4)
    assert model.calls == 2
    for a, b in zip(one, chunked):
        assert torch.equal(a, b)
    rec = demo.recorder_class()("grpo", 0, "token_ratio", 0.2, 0.2, 1, progress=False)
    trainer = SimpleNamespace(temperature=1.0, args=SimpleNamespace(temperature=1.0),
                              accelerator=SimpleNamespace(autocast=contextlib.nullcontext))
    rec.observe(trainer, model, inputs)
    rec.on_log(None, SimpleNamespace(global_step=1), None, logs={"loss": 0.0})
    kl_old_new = float((old * (old / new).log()).sum())     # KL(pi_old || pi_theta)
    kl_new_old = float((new * (new / old).log()).sum())
    assert rec.rows[0]["kl_old"] == pytest.approx(kl_old_new, rel=1e-5)
    assert abs(kl_old_new - kl_new_old) > 0.05               # the direction matters here
    # the entropy of pi_theta per token
    assert rec.rows[0]["entropy"] == pytest.approx(float(-(new * new.log()).sum()), rel=1e-5)


def test_matplotlib_backend(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the demo extra "
                        "installs it); the built-in renderer is tested in test_builtin_png")
    path = str(tmp_path / "m.png")
    assert demo.plot(path, _records({"gmpo": [0.5, 0.6], "grpo": [0.4, 0.5]}), ["gmpo", "grpo"],
                     "t", 2, backend="matplotlib") == "matplotlib"
    w, h = _png_size(path)
    assert w > 500 and h > 200


def test_recorder_rows_and_plain_progress(monkeypatch):
    """Without tqdm the progress is a plain line every tenth of the run, with the time
    left; the reward TRL logs on a generation step carries over the steps reusing it."""
    import io
    from types import SimpleNamespace

    monkeypatch.setattr(demo, "_tqdm", lambda: None)
    out = io.StringIO()
    rec = demo.recorder_class()("gmpo", 3, "token_log", 0.4, 0.4, 20, label="run", out=out)
    rec.on_train_begin(None, None, None)
    for step in range(1, 21):
        logs = {"loss": 0.5, "grad_norm": 2.0}
        if step % 4 == 1:
            logs["reward"] = step / 100
        rec.on_log(None, SimpleNamespace(global_step=step), None, logs=logs)
    rec.on_log(None, SimpleNamespace(global_step=20), None, logs={"train_loss": 0.5})  # not a step
    rec.on_train_end(None, None, None)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and all(" s left" in ln and ln.startswith("run step") for ln in lines)
    assert [r["step"] for r in rec.rows] == list(range(1, 21))
    assert [r["reward"] for r in rec.rows[:6]] == [0.01] * 4 + [0.05] * 2
    assert all(r["seed"] == 3 and r["grad_norm"] == 2.0 for r in rec.rows)
    assert math.isnan(rec.rows[0]["entropy"])       # no loss batch observed: no measure
