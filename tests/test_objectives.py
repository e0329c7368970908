"""Several objectives at once: named reward sources and their combination, the Safe RLHF cost model, the
Lagrange multiplier and the combined advantage, and PPO-Lagrangian holding a planted cost under its
threshold where unconstrained PPO exceeds it."""

import math
import random
import re

import pytest
import torch

from helpers import write_jsonl
from test_ppo import TARGET, _cfg, resumed_equals_uninterrupted
from tiny import WORDS

from tether.advantages import LagrangeMultiplier, combine_rewards, lagrangian_advantages
from tether.algo import ppo
from tether.algo import rm as rm_stage
from tether.config import ConfigError, load_config
from tether.data import load_preferences
from tether.data.records import DataError
from tether.losses import cost_model_loss, multi_objective_loss
from tether.models import load_reward_stats
from tether.track import read_metrics


def _mean(xs):
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------------------------
# Maths against hand-derived values and plain loops


def test_combine_rewards_against_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    scores, weights = torch.randn(3, 8, generator=g) * torch.tensor([[1.0], [10.0], [0.1]]), torch.tensor([1.0, 0.3, -2.0])
    plain = [sum(float(weights[k]) * float(scores[k, b]) for k in range(3)) for b in range(8)]
    assert torch.allclose(combine_rewards(scores, weights), torch.tensor(plain), atol=1e-6)
    # GDPO: each reward normalised within each group of 4 contiguous samples, then the weighted sum
    out = []
    for b in range(8):
        lo = b // 4 * 4
        total = 0.0
        for k in range(3):
            grp = [float(x) for x in scores[k, lo : lo + 4]]
            m = sum(grp) / 4
            sd = math.sqrt(sum((x - m) ** 2 for x in grp) / 3)
            total += float(weights[k]) * (float(scores[k, b]) - m) / (sd + 1e-6)
        out.append(total)
    assert torch.allclose(combine_rewards(scores, weights, group_size=4), torch.tensor(out), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of a group size"):
        combine_rewards(scores, weights, group_size=3)


def test_cost_model_loss_hand_derived():
    # pair 1: c_safer -1 (labelled safe), c_unsafer 2 (labelled unsafe); pair 2: 0.5 (unlabelled), 0.0 (unsafe)
    cs, cu = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 0.0])
    safety = torch.tensor([[-1.0, 1.0], [0.0, 1.0]])
    loss, m = cost_model_loss(cs, cu, safety, num_pairs=2)
    # -log sigma(x) = log(1 + e^-x): pair 1 = sp(3) + sp(1) + sp(2), pair 2 = sp(-0.5) + sp(0)
    pair1 = 0.04858735157374206 + 0.31326168751822286 + 0.1269280110429725
    pair2 = 0.9740769841801067 + 0.6931471805599453
    assert loss.item() == pytest.approx((pair1 + pair2) / 2, abs=1e-6)
    assert m["rm/accuracy"].item() == 0.5  # the unsafer side costs more in pair 1 only
    assert m["rm/sign_accuracy"].item() == pytest.approx(2 / 3)  # -1 < 0 and 2 > 0 right, 0.0 (unsafe) not above 0
    no_labels, _ = cost_model_loss(cs, cu, None, num_pairs=2)
    assert no_labels.item() == pytest.approx((0.04858735157374206 + 0.9740769841801067) / 2, abs=1e-6)


def test_lagrange_multiplier_against_a_plain_loop():
    costs = [0.5, 0.4, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6]
    lam, lr, d = 0.2, 0.5, 0.2
    plain = []
    for c in costs:
        lam = lam + lr * (c - d)
        lam = lam if lam > 0 else 0.0
        plain.append(lam)
    mult = LagrangeMultiplier(0.2, 0.5, 0.2)
    got = []
    for c in costs:
        mult.update(c)
        got.append(mult.value)
    assert got == pytest.approx(plain)
    assert got[0] > 0.2 and got[1] > got[0]  # rises while the cost exceeds the threshold
    assert got[4] < got[3] and got[8:11] == [0.0] * 3  # and falls to 0 (not below) once it is kept
    assert got[11] > 0
    capped = LagrangeMultiplier(0.0, 10.0, 0.0, max_value=1.5)
    capped.update(1.0)
    assert capped.value == 1.5
    again = LagrangeMultiplier(0.0, 0.5, 0.2)
    again.load_state_dict(mult.state_dict())
    assert again.value == mult.value


def test_lagrangian_advantage():
    a_r, a_c = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -1.0])
    assert torch.equal(lagrangian_advantages(a_r, a_c, 0.0), a_r)
    assert torch.allclose(lagrangian_advantages(a_r, a_c, 1.0), torch.tensor([-1.0, -1.5, 0.75]))
    assert torch.allclose(lagrangian_advantages(a_r, a_c, 3.0), torch.tensor([(1 - 9) / 4, (-2 - 3) / 4, (0.5 + 3) / 4]))


# ----------------------------------------------------------------------------------------------
# Configs and records


def test_reward_sources_from_the_command_line_and_their_errors(tiny_gpt2, tmp_path):
    cfg = _cfg(tiny_gpt2, tmp_path, "reward.fn=", "reward.kwargs={}",
               "reward.sources=[{name: target, fn: 'tether.rewards:token_fraction', kwargs: {tokens: [10, 11]}}, {name: brevity, fn: 'tether.rewards:length_penalty', weight: 0.3, normalize: batch}]")
    assert [s.name for s in cfg.reward.sources] == ["target", "brevity"]
    assert cfg.reward.sources[1].weight == 0.3 and cfg.reward.sources[1].mode == "batch" and cfg.reward.sources[0].mode == "none"
    bad = [
        ("reward.sources=[{name: a, fn: 'tether.rewards:length_penalty'}]", "config key 'reward.model': set exactly one of reward.model"),
        ("reward.sources=[{name: 'a b', fn: 'x:y'}]", "config key 'reward.sources[0].name': required"),
        ("reward.sources=[{name: a, fn: 'x:y'}, {name: b, fn: 'x:y', model: m}]", "config key 'reward.sources[1].model': set exactly one of model"),
        ("reward.sources=[{name: a, fn: 'x:y'}, {name: a, fn: 'x:z'}]", "config key 'reward.sources': each source needs its own name"),
        ("reward.sources=[{name: a, fn: 'x:y', normalize: stats}]", "config key 'reward.sources[0].normalize': stats needs a reward model"),
        ("reward.sources=[{name: a, fn: 'x:y', wieght: 2}]", "unknown config key 'reward.sources[0].wieght'; did you mean 'reward.sources[0].weight'?"),
        ("reward.sources=[5]", "config key 'reward.sources[0]': expected a mapping of RewardSource keys"),
    ]
    for override, msg in bad:
        keep = [] if "set exactly one of reward.model" in msg else ["reward.fn="]
        with pytest.raises(ConfigError) as e:
            _cfg(tiny_gpt2, tmp_path, *keep, override)
        assert msg in str(e.value), (override, str(e.value))
    with pytest.raises(ConfigError, match="gdpo normalises each reward within a prompt's samples"):
        _cfg(tiny_gpt2, tmp_path, "reward.fn=", "reward.sources=[{name: a, fn: 'x:y'}]", "reward.combine=gdpo")


def test_safety_labels_are_read_and_bad_ones_located(tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_safe": True, "rejected_safe": False},
        {"prompt": "p", "chosen": "a", "rejected": "c", "rejected_safe": False},
        {"prompt": "p", "chosen": "a", "rejected": "d"},
    ])
    pairs, _ = load_preferences(str(good))
    assert [p.safety for p in pairs] == [(-1, 1), (0, 1), None]
    for line, problem in [
        ({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_safe": "yes"}, "field 'chosen_safe' must be true, false or absent, got 'yes'"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_safe": False, "rejected_safe": True},
         "'chosen' is the safer response, but chosen_safe is false and rejected_safe true"),
        ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "chosen_safe": True},
         "fields 'chosen_safe' / 'rejected_safe' belong to a record with 'chosen' and 'rejected'"),
    ]:
        p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}, line])
        with pytest.raises(DataError) as e:
            load_preferences(str(p))
        assert str(e.value).startswith(f"{p}:2: {problem}"), str(e.value)


# ----------------------------------------------------------------------------------------------
# Stages on tiny models


def _safety_pairs(n, seed):
    """The unsafe response contains 'hate'; the safer one does not."""
    rng = random.Random(seed)
    vocab = [w for w in WORDS if w != "hate"]
    out = []
    for _ in range(n):
        bad = rng.sample(vocab, 4)
        bad.insert(rng.randrange(5), "hate")
        out.append({"prompt": " ".join(rng.sample(vocab, 3)), "chosen": " " + " ".join(rng.sample(vocab, 5)),
                    "rejected": " " + " ".join(bad), "chosen_safe": True, "rejected_safe": False})
    return out


def test_cost_model_learns_the_sign_of_safety(tiny_gpt2, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _safety_pairs(256, 1))
    held = write_jsonl(tmp_path / "held.jsonl", _safety_pairs(100, 2))
    summary = rm_stage.train(load_config(rm_stage.RMConfig, None, [
        "loss=cost", f"model={tiny_gpt2}", f"data.train={train}", f"data.eval={held}", f"out={tmp_path / 'cost'}",
        "max_steps=80", "batch_size=16", "optim.lr=3e-3", "track.progress=false"]))
    assert summary["eval/accuracy"] >= 0.95, summary  # the unsafer response costs more
    assert summary["eval/sign_accuracy"] >= 0.9, summary  # and safe ones cost below 0, unsafe above
    stats = load_reward_stats(tmp_path / "cost" / "final")
    assert stats["kind"] == "cost" and (stats["mean"], stats["std"]) == (0.0, 1.0)  # never shifted off its 0


def test_ppo_with_named_sources_logs_each_and_sums_them(tiny_gpt2, tmp_path):
    sources = ("reward.sources=[{name: target, fn: 'tether.rewards:token_fraction', kwargs: {tokens: " + str(TARGET) + "}}, "
               "{name: brevity, fn: 'tether.rewards:length_penalty', kwargs: {target: 2}, weight: 0.5}]")
    ppo.train(_cfg(tiny_gpt2, tmp_path / "sum", "reward.fn=", sources, "max_steps=2", "ppo.epochs=1"))
    for r in read_metrics(tmp_path / "sum" / "run"):
        for name in ("target", "brevity"):
            assert {f"rewards/{name}/{k}" for k in ("raw_mean", "mean", "std", "contribution")} <= r.keys()
        assert r["rewards/brevity/contribution"] == pytest.approx(0.5 * r["rewards/brevity/mean"], abs=1e-6)
        assert r["rewards/raw_mean"] == pytest.approx(r["rewards/target/contribution"] + r["rewards/brevity/contribution"], abs=1e-6)
    ppo.train(_cfg(tiny_gpt2, tmp_path / "gdpo", "reward.fn=", sources, "reward.combine=gdpo", "samples_per_prompt=2",
                   "batch_size=8", "max_steps=2", "ppo.epochs=1"))
    for r in read_metrics(tmp_path / "gdpo" / "run"):  # normalised within each prompt's pair: every group mean is 0
        assert abs(r["rewards/raw_mean"]) < 1e-5 and abs(r["rewards/target/contribution"]) < 1e-5


COST = list(range(10, 26))  # half of the tokens the reward pays for also cost
_COST = ["cost.fn=tether.rewards:token_fraction", f"cost.kwargs={{tokens: {COST}}}", "cost.threshold=0.05", "cost.lambda_init=0"]


def test_ppo_lagrangian_holds_a_planted_cost_under_its_threshold(tiny_gpt2, tmp_path):
    """Maximising the reward raises the cost (the cheapest reward tokens cost too): with lambda fixed at 0
    the cost ends far above the threshold; with the learned multiplier it ends at or under it while the
    reward still more than doubles."""
    runs = {}
    for name, lr in (("free", 0), ("lagrangian", 5)):
        ppo.train(_cfg(tiny_gpt2, tmp_path / name, "max_steps=40", f"cost.lambda_lr={lr}", *_COST))
        rows = read_metrics(tmp_path / name / "run")
        runs[name] = {k: [r[k] for r in rows] for k in ("rewards/raw_mean", "cost/mean", "lagrange/lambda", "cost/violation_rate", "loss/cost_value")}
    free, lag = runs["free"], runs["lagrangian"]
    assert _mean(free["cost/mean"][-10:]) > 0.1, free["cost/mean"]  # 2x the threshold
    assert _mean(lag["cost/mean"][-10:]) <= 0.055, lag["cost/mean"]
    assert _mean(lag["rewards/raw_mean"][-10:]) > 2 * _mean(lag["rewards/raw_mean"][:5]), lag["rewards/raw_mean"]
    assert max(lag["lagrange/lambda"]) > 0.2 and set(free["lagrange/lambda"]) == {0.0}
    assert _mean(lag["cost/violation_rate"][-10:]) < _mean(free["cost/violation_rate"][-10:])


def test_ppo_lagrangian_resumes_bit_exactly(tiny_gpt2, tmp_path):
    common = ["ppo.epochs=2", "save_every=2", "batch_size=8", *_COST, "cost.lambda_lr=5", "cost.lambda_init=1", "cost.threshold=0"]
    a, _ = resumed_equals_uninterrupted(tiny_gpt2, tmp_path, *common)
    assert len({r["lagrange/lambda"] for r in a}) > 2  # it moved, and resumed where it was


def test_ppo_lagrangian_with_a_cost_model(tiny_gpt2, tmp_path):
    """cost.model: the cost is the trained cost model's score, and the cost critic starts from it."""
    train = write_jsonl(tmp_path / "train.jsonl", _safety_pairs(32, 1))
    rm_stage.train(load_config(rm_stage.RMConfig, None, ["loss=cost", f"model={tiny_gpt2}", f"data.train={train}", f"out={tmp_path / 'cost'}",
                                                         "max_steps=2", "batch_size=8", "track.progress=false"]))
    summary = ppo.train(_cfg(tiny_gpt2, tmp_path / "ppo", "max_steps=2", "ppo.epochs=1", f"cost.model={tmp_path / 'cost' / 'final'}"))
    rows = read_metrics(tmp_path / "ppo" / "run")
    assert all({"cost/mean", "cost_value/explained_variance", "loss/cost_value", "lagrange/lambda"} <= r.keys() for r in rows)
    assert "cost/mean" in summary and "lagrange/lambda" in summary


def test_repetition_cost_by_hand():
    from tether.rewards import repetition

    # 6 words, 4 distinct: 1 - 4/6; bigrams ab, ba, ab: 1 - 2/3; too short and empty: 0
    assert repetition([], ["like a good , like a funny", "Like LIKE like", "", "a"]) == pytest.approx([1 / 3, 2 / 3, 0.0, 0.0])
    assert repetition([], ["a b a b", "a"], n=2) == pytest.approx([1 / 3, 0.0])


# ----------------------------------------------------------------------------------------------
# A multi-objective reward model: one head per objective, from pairs labelled on each


def test_multi_objective_loss_hand_derived():
    # pair 0: helpful says chosen (+1, d=1), harmless says rejected (-1, d=-2); pair 1: helpful no judgment, harmless +1 (d=0.5)
    rc = torch.tensor([[1.0, -1.0], [3.0, 0.5]])
    rr = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    labels = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    loss, m = multi_objective_loss(rc, rr, labels, num_judgments=3)
    sp = lambda x: math.log1p(math.exp(-x))  # -log sigma(x)
    assert loss.item() == pytest.approx((sp(1) + sp(2) + sp(0.5)) / 3, abs=1e-6)  # pair 1's helpful d=3 is not counted
    assert m["rm/accuracy"].item() == 1.0
    assert m["rm/head0_accuracy"].item() == 1.0 and m["rm/head1_accuracy"].item() == 1.0
    wrong, m = multi_objective_loss(rc, rr, -labels, num_judgments=3)
    assert wrong.item() == pytest.approx((sp(-1) + sp(-2) + sp(-0.5)) / 3, abs=1e-6) and m["rm/accuracy"].item() == 0.0


def test_objective_labels_are_read_and_bad_ones_located(tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "labels": {"helpful": 1, "harmless": -1}},
                                               {"prompt": "p", "chosen": "a", "rejected": "c"}])
    pairs, _ = load_preferences(str(good))
    assert [p.labels for p in pairs] == [{"helpful": 1, "harmless": -1}, None]
    for line, problem in [
        ({"prompt": "p", "chosen": "a", "rejected": "b", "labels": {"helpful": 2}}, "labels['helpful'] must be 1 (chosen better), -1 (rejected better) or 0"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "labels": {"helpful": True}}, "labels['helpful'] must be 1"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "labels": ["helpful"]}, "field 'labels' must be an object"),
        ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "labels": {"helpful": 1}}, "field 'labels' belongs to a record with 'chosen' and 'rejected'"),
    ]:
        p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}, line])
        with pytest.raises(DataError) as e:
            load_preferences(str(p))
        assert str(e.value).startswith(f"{p}:2: {problem}"), str(e.value)


def _two_objective_pairs(n, seed):
    """helpful: the response with 'good' in it is better; harmless: the one with 'hate' in it is worse.
    The chosen/rejected order is random, so only the labels carry the judgments, and half the pairs set
    the two objectives against each other (the helpful response is the harmful one)."""
    rng = random.Random(seed)
    vocab = [w for w in WORDS if w not in ("good", "hate")]

    def response(good, hate):
        words = rng.sample(vocab, 4)
        for w, on in (("good", good), ("hate", hate)):
            if on:
                words.insert(rng.randrange(len(words) + 1), w)
        return " " + " ".join(words)

    out = []
    for _ in range(n):
        a, b = (rng.random() < 0.5, rng.random() < 0.5), (rng.random() < 0.5, rng.random() < 0.5)
        if a == b:
            b = (not a[0], a[1]) if rng.random() < 0.5 else (a[0], not a[1])
        out.append({"prompt": " ".join(rng.sample(vocab, 3)), "chosen": response(*a), "rejected": response(*b),
                    "labels": {"helpful": int(a[0]) - int(b[0]), "harmless": int(b[1]) - int(a[1])}})
    return out


@pytest.fixture(scope="module")
def two_head_rm(tiny_gpt2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_head")
    train = write_jsonl(tmp / "train.jsonl", _two_objective_pairs(320, 1))
    held = write_jsonl(tmp / "held.jsonl", _two_objective_pairs(120, 2))
    summary = rm_stage.train(load_config(rm_stage.RMConfig, None, [
        "heads=[helpful,harmless]", f"model={tiny_gpt2}", f"data.train={train}", f"data.eval={held}", f"out={tmp / 'rm'}",
        "max_steps=100", "batch_size=16", "optim.lr=3e-3", "track.progress=false"]))
    return tmp, summary


def test_a_two_head_reward_model_learns_objectives_that_pull_apart(two_head_rm):
    from transformers import AutoModelForSequenceClassification

    tmp, summary = two_head_rm
    assert summary["eval/helpful/accuracy"] >= 0.9 and summary["eval/harmless/accuracy"] >= 0.9, summary
    assert summary["eval/helpful/pairs"] < summary["eval/pairs"]  # pairs with a 0 label are not counted for that head
    stats = load_reward_stats(tmp / "rm" / "final")
    assert stats["heads"] == ["helpful", "harmless"] and len(stats["mean"]) == len(stats["std"]) == 2
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp / "rm" / "final"))
    assert hf.config.num_labels == 2 and hf.config.id2label == {0: "helpful", 1: "harmless"}


def test_each_head_is_a_reward_source(two_head_rm, tiny_gpt2, tmp_path):
    from tether.algo.reward import RewardConfig, Rewards
    from tether.config import EngineConfig
    from tether.data import pad_id
    from tether.models import load_tokenizer
    from tether.types import RolloutBatch

    tmp, _ = two_head_rm
    rm = tmp / "rm" / "final"
    tok = load_tokenizer(tiny_gpt2)
    texts = [" fun good movie", " fun hate movie", " fun dull movie"]
    rows = [tok(" the cat" + t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    n_prompt = len(tok(" the cat")["input_ids"])
    seqs = torch.tensor([[pad_id(tok)] * (width - len(r)) + r for r in rows])
    attn = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    R = width - n_prompt
    ro = RolloutBatch(sequences=seqs, attention_mask=attn, response_mask=attn[:, -R:].float(), logprobs=torch.zeros(3, R),
                      prompts=[" the cat"] * 3, responses=texts, finished=torch.ones(3, dtype=torch.bool))
    cfg = load_config(RewardConfig, None, [f"sources=[{{name: helpful, model: {rm}, head: helpful}}, {{name: harmless, model: {rm}, head: harmless, weight: 0.5}}]",
                                           "missing_eos_penalty=0"])
    rewards = Rewards.build(cfg, EngineConfig(), tok, pad_id(tok), [tok.eos_token_id])
    helpful, harmless = (scorer.raw(ro) for _, scorer in rewards.parts)
    assert helpful[0] > helpful[2] and harmless[1] < harmless[2], (helpful, harmless)  # 'good' helps, 'hate' harms
    _, _, m = rewards.score(ro)
    assert {"rewards/helpful/mean", "rewards/harmless/contribution"} <= m.keys()
    for bad, problem in [(f"model={rm}", f"{rm} has the heads helpful, harmless; read one as a reward source"),
                         (f"sources=[{{name: h, model: {rm}, head: honest}}]", f"config key 'reward.sources[0]': {rm} has the heads helpful, harmless, not 'honest'")]:
        with pytest.raises(ConfigError, match=re.escape(problem)):
            Rewards.build(load_config(RewardConfig, None, [bad]), EngineConfig(), tok, pad_id(tok), [tok.eos_token_id])


def test_eval_rm_reports_each_head_by_source(two_head_rm, tmp_path):
    import json

    from tether.eval.cli import main as eval_main

    tmp, _ = two_head_rm
    held = write_jsonl(tmp_path / "held.jsonl", [dict(r, source="mixed") for r in _two_objective_pairs(60, 3)])
    assert eval_main(["rm", "--model", str(tmp / "rm" / "final"), "--data", str(held), "--out", str(tmp_path / "rep"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    by_head = metrics["heads_by_source"]
    assert set(by_head) == {"helpful", "harmless"} and all(v["mixed"]["accuracy"] >= 0.85 for v in by_head.values()), by_head
    files = {f["head"]: f for f in metrics["files"]}
    assert files["helpful"]["pairs"] + files["helpful"]["unjudged_for_head"] == 60
    assert "Heads by source" in (tmp_path / "rep" / "report.md").read_text()


def test_heads_need_labelled_pairs_and_xstest_converts_into_them(tiny_gpt2, tmp_path):
    from tether.data.convert import xstest_records
    from tether.judges.refusal import xstest_labelled_files

    unlabelled = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "labels": {"helpful": 1}},
                                                         {"prompt": "p", "chosen": "a", "rejected": "c"}])
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "labels": {"honest": 1}}])
    for path, problem in [(unlabelled, f"{unlabelled}:2: the pair has no 'labels'"), (odd, f"{odd}:1: labels name honest, not among heads=")]:
        with pytest.raises(DataError, match=re.escape(problem)):
            rm_stage.train(load_config(rm_stage.RMConfig, None, ["heads=[helpful,harmless]", f"model={tiny_gpt2}", f"data.train={path}",
                                                                 f"out={tmp_path / 'rm'}", "max_steps=1", "track.progress=false"]))
    with pytest.raises(ConfigError, match="several heads train with loss=bradley_terry"):
        load_config(rm_stage.RMConfig, None, ["heads=[a,b]", "loss=cost", "model=m", "data.train=t", "out=o"])

    recs = xstest_records(xstest_labelled_files())
    assert len(recs) == 420  # prompts where one model complied and another refused, every such pair of answers
    unsafe = [r for r in recs if r["source"] == "xstest/unsafe"]
    assert len(unsafe) == 258 and all(r["labels"] == {"helpful": -1, "harmless": 1} and not r["rejected_safe"] for r in unsafe)
    assert all(r["labels"] == {"helpful": 1, "harmless": 0} and r["rejected_safe"] for r in recs if r["source"] == "xstest/safe")
    pairs, _ = load_preferences(str(write_jsonl(tmp_path / "xs.jsonl", recs)))
    assert len(pairs) == 420 and pairs[0].labels and pairs[0].safety == (-1, 1 if recs[0]["source"] == "xstest/unsafe" else -1)


def test_a_held_out_split_keeps_safety_and_objective_labels(tiny_gpt2, tmp_path):
    recs = [dict(r, chosen_safe=True, rejected_safe=False) for r in _two_objective_pairs(20, 4)]
    train = write_jsonl(tmp_path / "train.jsonl", recs)
    rm_stage.train(load_config(rm_stage.RMConfig, None, ["heads=[helpful,harmless]", f"model={tiny_gpt2}", f"data.train={train}",
                                                         "data.eval_fraction=0.25", f"out={tmp_path / 'rm'}", "max_steps=1", "track.progress=false"]))
    held, _ = load_preferences(str(tmp_path / "rm" / "held_out.jsonl"))
    by_chosen = {r["chosen"]: r for r in recs}
    assert held and all(p.safety == (-1, 1) and p.labels == by_chosen[p.chosen]["labels"] for p in held)


def test_eval_policy_scores_with_the_head_asked_for(two_head_rm, tiny_gpt2, tmp_path, capsys):
    """A multi-objective reward model in `tether eval policy`: --reward-head picks the head; without it
    the command stops before sampling, naming the heads and the option (it was a ValueError after)."""
    import json

    from tether.eval.cli import main as eval_main

    tmp, _ = two_head_rm
    rm = str(tmp / "rm" / "final")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in ["the movie was", "i think"]])
    common = ["policy", "--model", str(tiny_gpt2), "--ref", str(tiny_gpt2), "--prompts", str(prompts), "--reward-model", rm,
              "--max-new-tokens", "6", "-k", "2", "--device", "cpu"]
    assert eval_main(common + ["--out", str(tmp_path / "none")]) == 2
    assert f"{rm} has the heads helpful, harmless; choose one with --reward-head" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    wins = {}
    for head in ("helpful", "harmless"):
        assert eval_main(common + ["--reward-head", head, "--out", str(tmp_path / head)]) == 0
        wins[head] = json.loads((tmp_path / head / "metrics.json").read_text())["win_rate"]["reward"]["n"]
    assert wins == {"helpful": 4, "harmless": 4}
    assert eval_main(common + ["--reward-head", "honest", "--out", str(tmp_path / "x")]) == 2
    assert "no head 'honest'" in capsys.readouterr().err
