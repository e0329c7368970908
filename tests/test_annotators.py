"""Simulated annotators: their agreement with the gold judge is what Bradley-Terry with rationality beta
and a share of contrarians predicts, within sampling error; their records are ordinary preference records."""

import itertools
import json
import math
import random

import pytest

from tether.judges.annotators import AnnotatorConfig, AnnotatorPool, annotate, expected_label_agreement


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def gold_from_text(prompts, responses):
    """A gold judge for tests: the response text is its own score."""
    return [float(r) for r in responses]


def make_items(n: int, seed: int = 0, k: int = 2):
    rng = random.Random(seed)
    prompts = [f"p{i}" for i in range(n)]
    responses = [[f"{rng.uniform(-1, 1):.6f}" for _ in range(k)] for _ in range(n)]
    return prompts, responses


def deltas(responses):
    return [float(a) - float(b) for a, b in responses]


@pytest.mark.parametrize("beta,contrarian", [(2.0, 0.0), (5.0, 0.2), (10.0, 0.1), (0.0, 0.0)])
def test_single_vote_agreement_matches_bradley_terry(beta, contrarian):
    """One vote per pair: P(vote sides with gold) = (1-c) sigma(beta|d|) + c sigma(-beta|d|), c = C/M."""
    prompts, responses = make_items(4000, seed=1)
    cfg = AnnotatorConfig(rationality=beta, contrarian=contrarian, pool_size=20, votes_per_pair=1, seed=3)
    records, stats = annotate(prompts, responses, gold_from_text, cfg)
    c = round(contrarian * 20) / 20
    expected = [(1 - c) * sig(beta * abs(d)) + c * sig(-beta * abs(d)) for d in deltas(responses)]
    p = sum(expected) / len(expected)
    se = math.sqrt(sum(e * (1 - e) for e in expected)) / len(expected)  # independent Bernoulli votes
    assert stats["records"] == len(prompts)  # one vote never ties
    assert abs(stats["vote_gold_agreement"] - p) < 4 * se + 1e-9, (stats["vote_gold_agreement"], p, se)
    assert abs(stats["label_gold_agreement"] - p) < 4 * se + 1e-9


def test_majority_of_three_matches_analytic_expectation():
    """Three distinct annotators from a pool of 10 with 3 contrarians, majority label.

    Derived here by brute force: every 3-subset of the pool equally likely, every vote pattern
    weighted by its Bradley-Terry probability."""
    beta, M, C = 4.0, 10, 3
    prompts, responses = make_items(4000, seed=2)
    cfg = AnnotatorConfig(rationality=beta, contrarian=C / M, pool_size=M, votes_per_pair=3, seed=5)
    records, stats = annotate(prompts, responses, gold_from_text, cfg)
    pool = AnnotatorPool(cfg)
    assert sum(a["contrarian"] for a in pool.annotators) == C

    def brute(d: float) -> float:
        p = sig(beta * abs(d))
        total = 0.0
        subsets = list(itertools.combinations([True] * C + [False] * (M - C), 3))
        for sub in subsets:
            for pattern in itertools.product([True, False], repeat=3):  # True = vote agrees with gold
                pr = 1.0
                for contrarian, agree in zip(sub, pattern):
                    q = (1 - p) if contrarian else p
                    pr *= q if agree else 1 - q
                if sum(pattern) >= 2:
                    total += pr
        return total / len(subsets)

    ds = deltas(responses)
    expected = [brute(d) for d in ds]
    p = sum(expected) / len(expected)
    se = math.sqrt(sum(e * (1 - e) for e in expected)) / len(expected)
    assert abs(stats["label_gold_agreement"] - p) < 4 * se, (stats["label_gold_agreement"], p, se)
    # the module's closed form agrees with the brute force, pair by pair
    for d in ds[:50]:
        assert expected_label_agreement(d, cfg)[0] == pytest.approx(brute(d), abs=1e-12)
    assert stats["expected_label_gold_agreement"] == pytest.approx(p, abs=1e-9)
    # the inter-annotator agreement is the share of votes for the majority side: 2/3 or 1
    assert all(r["meta"]["agreement"] in (2 / 3, 1.0) for r in records)


def test_rationality_orders_agreement():
    prompts, responses = make_items(1500, seed=4)
    rates = []
    for beta in (0.5, 2.0, 8.0, 50.0):
        _, st = annotate(prompts, responses, gold_from_text, AnnotatorConfig(rationality=beta, contrarian=0.0, votes_per_pair=1, seed=0))
        rates.append(st["vote_gold_agreement"])
    assert rates == sorted(rates)
    assert rates[-1] > 0.97


def test_ties_and_identical_responses_make_no_record():
    prompts = ["a", "b", "c"]
    responses = [["0.5", "0.5"], ["0.30", "0.3"], ["0.1", "0.9"]]  # identical text; equal gold; a real pair
    records, st = annotate(prompts, responses, gold_from_text, AnnotatorConfig(rationality=100.0, contrarian=0.0, seed=0))
    assert st["pairs"] == 2 and st["gold_ties"] == 1
    assert len(records) == 1 and records[0]["chosen"] == "0.9"


def test_records_are_preference_records(tmp_path):
    """Same schema as the feedback app's export; tether's preference reader loads them."""
    from tether.data import load_preferences

    prompts, responses = make_items(20, seed=6, k=3)
    records, _ = annotate(prompts, responses, gold_from_text, AnnotatorConfig(seed=0), source="sim")
    for r in records:
        assert set(r) == {"prompt", "chosen", "rejected", "id", "source", "meta"}
        assert set(r["meta"]["votes"]) == {"A", "B", "tie"}
        assert 0.5 < r["meta"]["agreement"] <= 1
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs, report = load_preferences(str(path))
    assert len(pairs) == len(records) and report.n_used == len(records)
    assert len({r["id"] for r in records}) == len(records)


def test_empty_responses_are_not_compared():
    records, st = annotate(["a"], [["0.5", " ", "-0.5"]], lambda p, r: [float(x) if x.strip() else 0.0 for x in r], AnnotatorConfig(seed=0))
    assert st["empty_responses"] == 1 and st["pairs"] == 1 and len(records) == 1
