"""Verifiable rewards (issue 22): number extraction, GSM8K's answers on its real records, the prompt record's
fields reaching the reward function, unbiased pass@k and best-of-n against enumeration, `tether eval policy
--verifier`, and rejection-sampling fine-tuning (`tether rsft`) and PPO learning a checkable task."""

import itertools
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_jsonl
from tiny import make_digits_model_dir

from tether.algo import ppo, rsft, sft
from tether.config import load_config
from tether.data import DataError, load_prompts
from tether.models import load_tokenizer
from tether.eval import metrics as M
from tether.rewards import answer_format, exact_number, extract_answer, numbers, reference_answer
from tether.track import read_metrics

from tether.config import ConfigError
from tether.data.corpora import shared_data_dir

try:
    GSM8K = shared_data_dir() / "gsm8k"
except ConfigError:  # the GSM8K tests skip with [data]; the rest run
    GSM8K = None
needs_gsm8k = pytest.mark.skipif(GSM8K is None, reason="[data] ../shared/data is not beside this checkout")


# ----------------------------------------------------------------------------------------------
# Numbers in free text


@pytest.mark.parametrize("text, value", [
    ("The answer is 18.", 18), ("#### 1,234", 1234), ("-$5.50 is what it cost", -5.5), ("she has 16-3-4=9 eggs", 9),
    ("Total: $70,000.", 70000), ("so the answer is -3, not 4", -3), ("about 3.14159", 3.14159), ("1, 2, 3", 3),
    ("first 12 then \\boxed{42} then 7", 42), ("#### 72\nand later 5", 72), ("I think 5. The answer is: 6. Really 7", 6),
    ("$ 1,000,000 dollars", 1000000), ("0.5 of them", 0.5), ("no number here", None), ("x2 and y3", None), ("", None),
])
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_numbers_keep_their_order_and_separators():
    assert numbers("Janet sells 16 - 3 - 4 = 9 eggs for $1,200.50 at -2 degrees.") == [16, 3, 4, 9, 1200.5, -2]
    assert numbers("1,23 and 1,234,567") == [1, 23, 1234567]  # a comma is a thousands separator only before three digits


def test_format_rewards():
    responses = ["so #### 42", "\\boxed{4}", "The answer is 3", "42", "#### none"]
    assert answer_format([], responses, "####") == [1, 0, 0, 0, 0]
    assert answer_format([], responses, style="boxed") == [0, 1, 0, 0, 0]
    assert answer_format([], responses, style="answer_is") == [0, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="style"):
        answer_format([], responses, style="xml")


# ----------------------------------------------------------------------------------------------
# GSM8K, real records


@needs_gsm8k
def test_gsm8k_records_read_as_prompts_with_their_answers():
    prompts, report = load_prompts(str(GSM8K / "test.jsonl"))
    raw = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()]
    assert len(prompts) == len(raw) == 1319 and report.n_used == 1319
    assert prompts[0].prompt == raw[0]["question"] and prompts[0].meta == {"answer": raw[0]["answer"]}
    assert reference_answer(raw[0]["answer"]) == 18 and reference_answer(raw[2]["answer"]) == 70000
    solutions = [r["answer"] for r in raw]
    # every worked solution, read as a response, is correct against its own record, and the next record's almost never
    assert exact_number([], solutions, solutions) == [1.0] * len(raw)
    wrong = exact_number([], solutions, solutions[1:] + solutions[:1])
    assert sum(wrong) / len(wrong) < 0.05


@needs_gsm8k
def test_gsm8k_converter_writes_prompt_records(tmp_path):
    from tether.data.convert import main

    assert main(["gsm8k", str(GSM8K / "train.jsonl"), str(tmp_path / "train.jsonl")]) == 0
    recs = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().split("\n") if line]  # not splitlines: a question may hold U+2028
    assert len(recs) == 7473
    assert all(r["answer"] == r["solution"].rsplit("####", 1)[1].strip().replace(",", "") for r in recs)
    prompts, _ = load_prompts(str(tmp_path / "train.jsonl"))
    assert prompts[0].prompt == recs[0]["prompt"] and prompts[0].meta["answer"] == recs[0]["answer"]
    assert exact_number([], ["It is 72."], [prompts[0].meta["answer"]]) == [float(recs[0]["answer"] == "72")]
    assert main(["gsm8k", str(GSM8K / "test.jsonl"), str(tmp_path / "chat.jsonl"), "--chat"]) == 0
    chat, _ = load_prompts(str(tmp_path / "chat.jsonl"))
    assert len(chat) == 1319 and chat[0].prompt == [{"role": "user", "content": json.loads((GSM8K / "test.jsonl").read_text().split("\n")[0])["question"]}]
    assert chat[0].meta["answer"] == "18"


def test_bad_records_are_one_line(tmp_path, capsys):
    from tether.data.convert import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q?", "answer": "x\n#### 3"}, {"question": "q2?", "answer": "no final number"}])
    assert main(["gsm8k", str(bad), str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:2" in err and "####" in err
    with pytest.raises(DataError, match=r"bad2.jsonl:1: field 'question' must be a string"):
        load_prompts(str(write_jsonl(tmp_path / "bad2.jsonl", [{"question": 5, "answer": "#### 5"}])))
    with pytest.raises(DataError, match="has no final number"):
        exact_number([], ["5"], ["five"])


# ----------------------------------------------------------------------------------------------
# pass@k and best-of-n against enumeration of every draw


def test_pass_at_k_equals_the_average_over_all_k_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            correct = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
                assert M.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert M.pass_at_k(200, 1, 100) == pytest.approx(0.5)  # large n: exact in integers
    with pytest.raises(ValueError):
        M.pass_at_k(4, 5, 1)


def _best_brute(scores, n, quality):
    total, subsets = 0.0, list(itertools.combinations(range(len(scores)), n))
    for s in subsets:
        top = max(scores[i] for i in s)
        tied = [quality[i] for i in s if scores[i] == top]  # a uniform tie-break
        total += sum(tied) / len(tied)
    return total / len(subsets)


def test_best_of_n_equals_the_average_over_all_draws():
    rng = random.Random(0)
    for _ in range(40):
        m = rng.randint(1, 8)
        scores = [rng.choice([0.0, 0.5, 1.0, 2.0, rng.random()]) for _ in range(m)]  # ties on purpose
        quality = [float(rng.random() < 0.4) for _ in range(m)]
        for n in range(1, m + 1):
            assert M.best_of_n(scores, n, quality) == pytest.approx(_best_brute(scores, n, quality), abs=1e-12)
            assert M.best_of_n(scores, n) == pytest.approx(_best_brute(scores, n, scores), abs=1e-12)
        c = [1.0, 0.0, 1.0, 0.0, 0.0]  # the verifier picking for itself is pass@n
        assert M.best_of_n(c, 3) == pytest.approx(M.pass_at_k(5, 2, 3))


# ----------------------------------------------------------------------------------------------
# A checkable task a tiny model learns: "d" -> d (repeat the digit)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    prompts = write_jsonl(root / "repeat.jsonl", [{"prompt": f"{d}", "answer": d} for d in range(10)] * 2)
    return make_digits_model_dir(root / "model"), prompts


def _accuracy(model, prompts, k=16):
    from tether.eval.policy_report import verify_side

    fields = [e.meta for e in load_prompts(str(prompts))[0]]
    texts = [e.prompt for e in load_prompts(str(prompts))[0]]
    return verify_side(str(model), texts, fields, exact_number, {}, k, max_new_tokens=2, device="cpu")["accuracy"]


def test_rsft_learns_to_repeat_the_digit(digits, tmp_path):
    model, prompts = digits
    cfg = load_config(rsft.RSFTConfig, None, [
        f"model={model}", f"data.train={prompts}", f"out={tmp_path / 'rsft'}", "reward.fn=tether.rewards:exact_number", "reward.missing_eos_penalty=0",
        "min_reward=1", "rounds=5", "samples_per_prompt=16", "rollout.max_new_tokens=2", "optim.lr=1e-2", "batch_size=8", "epochs=16",
        "engine.threads=1", "track.progress=false", "prompts_per_batch=20"])
    summary = rsft.train(cfg)
    acc = [r["reward_at_least_min"] for r in summary["rounds"]]
    assert acc[0] < 0.15 and acc[-1] > acc[0] + 0.5, acc  # each round's samples, from the model the round starts with
    assert all(r["kept"] <= 20 for r in summary["rounds"])  # keep=best: one sample per prompt at most
    before, after = _accuracy(model, prompts), _accuracy(tmp_path / "rsft" / "final", prompts)
    assert after > before + 0.5, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "rsft" / "round_0" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 20 * 16 and all(r["reward"] == float(extract_answer(r["response"]) == int(r["prompt"])) for r in rows)
    assert all(r["reward"] == 1 for r in rows if r["kept"])
    assert len(read_metrics(tmp_path / "rsft")) == 5


def test_rsft_select_and_resume(digits, tmp_path):
    rows = [(0, "a", True), (0, "b", True), (1, "c", True), (1, "d", True), (2, "e", True), (3, " ", True), (3, "f", True)]
    assert rsft.select(rows, [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0], "best", 1.0) == [False, True, True, False, False, False, True]
    assert rsft.select(rows, [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0], "all", 1.0) == [False, True, True, True, False, False, True]
    assert rsft.select(rows, [0.3, 0.2, -1.0, -2.0, -5.0, 9.0, -9.0], "best", None) == [True, False, True, False, True, False, True]  # empty: never
    model, prompts = digits
    common = [f"model={model}", f"data.train={prompts}", f"out={tmp_path / 'r'}", "reward.fn=tether.rewards:exact_number",
              "reward.missing_eos_penalty=0", "samples_per_prompt=4", "rollout.max_new_tokens=2", "max_steps=1", "engine.threads=1", "track.progress=false"]
    first = rsft.train(load_config(rsft.RSFTConfig, None, common + ["rounds=1"]))
    stamp = (tmp_path / "r" / "round_0" / "samples.jsonl").stat().st_mtime_ns
    both = rsft.train(load_config(rsft.RSFTConfig, None, common + ["rounds=2", "resume=true"]))
    assert (tmp_path / "r" / "round_0" / "samples.jsonl").stat().st_mtime_ns == stamp  # the finished round was not run again
    assert both["rounds"][0] == first["rounds"][0] and len(both["rounds"]) == 2
    # the resumed run equals an uninterrupted one: the same samples, figures and weights
    whole = rsft.train(load_config(rsft.RSFTConfig, None, [c.replace(str(tmp_path / "r"), str(tmp_path / "w")) for c in common] + ["rounds=2"]))
    strip = [{k: v for k, v in r.items() if k != "model"} for r in both["rounds"]], [{k: v for k, v in r.items() if k != "model"} for r in whole["rounds"]]
    assert strip[0] == strip[1] and all(r["kept"] > 0 for r in whole["rounds"])  # each round trained
    for r in (0, 1):
        assert (tmp_path / "r" / f"round_{r}" / "samples.jsonl").read_text() == (tmp_path / "w" / f"round_{r}" / "samples.jsonl").read_text()
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("r", "w"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_learns_to_repeat_the_digit_with_the_verifier(digits, tmp_path):
    model, prompts = digits
    # a short SFT teaches the format (one digit, then EOS) with a random digit: about 10% right; PPO learns which digit
    rng = random.Random(0)
    fmt = write_jsonl(tmp_path / "fmt.jsonl", [{"prompt": f"{d}", "completion": str(rng.randrange(10))} for d in range(10) for _ in range(8)])
    sft.train(load_config(sft.SFTConfig, None, [f"model={model}", f"data.train={fmt}", f"out={tmp_path / 'fmt'}", "optim.lr=1e-2", "batch_size=16",
                                                "epochs=3", "engine.threads=1", "track.progress=false"]))
    cfg = load_config(ppo.PPOConfig, None, [
        f"model={tmp_path / 'fmt' / 'final'}", f"data.train={prompts}", f"out={tmp_path / 'ppo'}", "reward.fn=tether.rewards:exact_number",
        "reward.missing_eos_penalty=0", "advantage=rloo", "samples_per_prompt=8", "batch_size=10", "ppo.minibatch_size=20", "rollout.max_new_tokens=2",
        "optim.lr=3e-3", "max_steps=40", "kl.coef=0", "engine.threads=1", "track.progress=false", "sample_every=0"])
    ppo.train(cfg)
    rewards = [r["rewards/raw_mean"] for r in read_metrics(tmp_path / "ppo")]
    before, after = sum(rewards[:5]) / 5, sum(rewards[-8:]) / 8
    assert after > before + 0.1 and after > 2 * before, rewards


# ----------------------------------------------------------------------------------------------
# The prompt record's fields reach the reward function


def needs_answer(prompts, responses, answer, tag):
    """A reward that fails unless each row got its own record's fields."""
    assert len(answer) == len(tag) == len(prompts) == len(responses)
    for p, a, t in zip(prompts, answer, tag):
        assert a == int(p[0]) and t == f"t{p[0]}", (p, a, t)
    needs_answer.calls += 1
    return [0.0] * len(prompts)


def test_record_fields_reach_the_reward_function(digits, tmp_path):
    model, _ = digits
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{d}=", "answer": d, "tag": f"t{d}"} for d in range(10)])
    needs_answer.calls = 0
    ppo.train(load_config(ppo.PPOConfig, None, [
        f"model={model}", f"data.train={prompts}", f"out={tmp_path / 'ppo'}", "reward.fn=test_verifiable:needs_answer", "advantage=rloo",
        "samples_per_prompt=2", "batch_size=4", "rollout.max_new_tokens=2", "max_steps=2", "engine.threads=1", "track.progress=false"]))
    assert needs_answer.calls == 2
    rsft.train(load_config(rsft.RSFTConfig, None, [
        f"model={model}", f"data.train={prompts}", f"out={tmp_path / 'rsft'}", "reward.fn=test_verifiable:needs_answer", "samples_per_prompt=3",
        "prompts_per_batch=4", "rollout.max_new_tokens=2", "max_steps=1", "engine.threads=1", "track.progress=false"]))
    assert needs_answer.calls == 2 + 3  # ten prompts, four per sampling call


def test_a_missing_field_is_one_line(digits, tmp_path, capsys):
    from tether.cli import main

    model, _ = digits
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{d}=", "label": d} for d in range(4)])
    rc = main(["ppo", f"model={model}", f"data.train={prompts}", f"out={tmp_path / 'ppo'}", "reward.fn=tether.rewards:exact_number",
               "batch_size=2", "rollout.max_new_tokens=2", "max_steps=1", "engine.threads=1", "track.progress=false"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("tether ppo:")]  # after the run's header
    assert rc == 2 and len(err) == 1 and "'answer'" in err[0] and "(they have: label)" in err[0], err


# ----------------------------------------------------------------------------------------------
# tether eval policy --verifier


def test_eval_policy_reports_accuracy_and_pass_at_k(digits, tmp_path):
    from tether.eval.cli import main

    model, prompts = digits
    rc = main(["policy", "--model", str(model), "--ref", str(model), "--prompts", str(prompts), "--verifier", "tether.rewards:exact_number",
               "-k", "6", "--max-new-tokens", "2", "--out", str(tmp_path / "rep"), "--device", "cpu"])
    assert rc == 0
    res = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    side = res["sides"][0]
    assert res["prompts"] == 20 and len(res["sides"]) == 2 and set(side["pass_at_k"]) == {"1", "2", "4", "6"}
    assert side["pass_at_k"]["1"] == pytest.approx(side["accuracy"])
    assert side["pass_at_k"]["1"] <= side["pass_at_k"]["2"] <= side["pass_at_k"]["4"] <= side["pass_at_k"]["6"]
    assert res["sides"][1] == side  # the same model and seed: the same samples
    assert "pass@6" in (tmp_path / "rep" / "report.md").read_text()
    # a reward model choosing among the samples (an untrained head on the same model: any scorer will do)
    from tether.models import load_scalar_model, save_reward_stats

    rm = tmp_path / "rm"
    load_scalar_model(str(model)).save_pretrained(str(rm))
    load_tokenizer(str(model)).save_pretrained(str(rm))
    save_reward_stats(rm, 0.0, 1.0)
    assert main(["policy", "--model", str(model), "--prompts", str(prompts), "--verifier", "tether.rewards:exact_number", "--reward-model", str(rm),
                 "-k", "6", "--max-new-tokens", "2", "--out", str(tmp_path / "rep2"), "--device", "cpu"]) == 0
    bon = json.loads((tmp_path / "rep2" / "metrics.json").read_text())["sides"][0]["best_of_n"]
    assert set(bon) == {"1", "2", "4", "6"} and bon["1"] == pytest.approx(side["accuracy"])  # the best of one sample is a random sample


@pytest.mark.slow
@needs_gsm8k
def test_one_round_on_smollm2_with_gsm8k(request, tmp_path):
    """The real-data interface: GSM8K test records as chat prompts, SmolLM2 sampling, the verifier, one SFT step."""
    try:
        model = request.getfixturevalue("smollm2_dir")
    except pytest.FixtureLookupError:
        pytest.skip("the smollm2_dir fixture (tests/conftest.py) is not available")
    raw = [json.loads((GSM8K / "test.jsonl").read_text().split("\n")[0])]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in raw])
    summary = rsft.train(load_config(rsft.RSFTConfig, None, [
        f"model={model}", f"data.train={prompts}", f"out={tmp_path / 'rsft'}", "reward.fn=tether.rewards:exact_number", "reward.missing_eos_penalty=0",
        "samples_per_prompt=2", "rollout.max_new_tokens=16", "max_steps=1", "batch_size=1", "optim.lr=1e-6", "track.progress=false"]))
    rows = [json.loads(line) for line in (tmp_path / "rsft" / "round_0" / "samples.jsonl").read_text().split("\n") if line]
    assert len(rows) == 2 and all(r["reward"] in (0.0, 1.0) for r in rows)
    assert summary["rounds"][0]["kept"] == 1 and (tmp_path / "rsft" / "final" / "config.json").exists()  # keep=best, no floor: one per prompt


def test_rsft_config_and_data_errors_are_one_line(digits, tmp_path, capsys):
    from tether.cli import main

    model, prompts = digits
    with pytest.raises(ConfigError, match="min_reward"):
        load_config(rsft.RSFTConfig, None, ["reward.fn=tether.rewards:exact_number", "keep=all"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1", "answer": 1}\n{"question": 5, "answer": 5}\n')
    rc = main(["rsft", f"model={model}", f"data.train={bad}", f"out={tmp_path / 'r'}", "reward.fn=tether.rewards:exact_number"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("tether rsft:")]
    assert rc == 2 and len(err) == 1 and f"{bad}:2: field 'question' must be a string" in err[0], err
