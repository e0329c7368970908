"""Simulated annotators: noisy pairwise judgments that follow Bradley-Terry on a gold judge's score.

Each annotator in a fixed pool compares two responses A and B to the same prompt. With gold scores
g_A, g_B (any judge from tether.judges, e.g. VADER sentiment) and rationality beta,

    P(a typical annotator prefers A) = sigma(beta * (g_A - g_B))          (Bradley & Terry 1952)

A share `contrarian` of the pool holds the opposite preference, P = sigma(-beta * (g_A - g_B)) (they
"disagree" with the gold judge systematically rather than randomly). Pairs with |g_A - g_B| <=
tie_margin get a "tie" vote from everyone. beta -> infinity gives a perfect (non-contrarian)
annotator, beta = 0 a coin.

Every pair is shown to `votes_per_pair` distinct annotators drawn from the pool; the label is the
strict majority of the A/B votes (a tied vote gives no record, as the feedback app's `majority`
export does). The records have the feedback app's export schema

    {"prompt", "chosen", "rejected", "id", "source", "meta": {"votes": {"A", "B", "tie"}, "agreement",
     "n_annotators", "annotators", "gold": [g_chosen, g_rejected], ...}}

so `tether rm` and `tether dpo` read them like human labels.

`expected_vote_agreement` and `expected_label_agreement` give the agreement with the gold judge that
the model implies (a closed form per pair), which tests/test_annotators.py checks the simulation
against.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Sequence

from tether.config import check, doc

Gold = Callable[[list[str], list[str]], list[float]]


@dataclass(frozen=True)
class AnnotatorConfig:
    rationality: float = doc(8.0, "beta: P(prefer A) = sigma(beta * (gold_A - gold_B)); larger = less noise")
    contrarian: float = doc(0.1, "share of the annotator pool whose preference is reversed")
    pool_size: int = doc(20, "annotators in the pool (each is contrarian or not for the whole run)")
    votes_per_pair: int = doc(3, "distinct annotators who judge each pair (odd avoids tied votes)")
    tie_margin: float = doc(0.0, "|gold_A - gold_B| <= this: every annotator votes 'tie' (no record)")
    pairs_per_prompt: int = doc(0, "pairs compared per prompt from its K responses (0 = all K(K-1)/2)")
    seed: int = doc(0, "random seed of the pool and the votes")

    def validate(self, p: str = "") -> None:
        check(self.rationality >= 0, f"{p}rationality", "must be >= 0")
        check(0 <= self.contrarian <= 1, f"{p}contrarian", "must be in [0, 1]")
        check(self.pool_size >= 1, f"{p}pool_size", "must be >= 1")
        check(1 <= self.votes_per_pair <= self.pool_size, f"{p}votes_per_pair", "must be in [1, pool_size]")
        check(self.tie_margin >= 0, f"{p}tie_margin", "must be >= 0")
        check(self.pairs_per_prompt >= 0, f"{p}pairs_per_prompt", "must be >= 0")


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def n_contrarians(cfg: AnnotatorConfig) -> int:
    return int(round(cfg.contrarian * cfg.pool_size))


def vote(delta: float, contrarian: bool, cfg: AnnotatorConfig, rng: random.Random) -> str:
    """One annotator's vote on a pair with gold difference delta = g_A - g_B: 'A', 'B' or 'tie'."""
    if abs(delta) <= cfg.tie_margin:
        return "tie"
    p_a = sigmoid((-1.0 if contrarian else 1.0) * cfg.rationality * delta)
    return "A" if rng.random() < p_a else "B"


def expected_vote_agreement(delta: float, cfg: AnnotatorConfig) -> float:
    """P(one vote from a random pool member sides with the gold judge), for |delta| > tie_margin."""
    c = n_contrarians(cfg) / cfg.pool_size
    p = sigmoid(cfg.rationality * abs(delta))
    return (1 - c) * p + c * (1 - p)


def expected_label_agreement(delta: float, cfg: AnnotatorConfig) -> tuple[float, float]:
    """(P(majority label sides with gold), P(a record is made)) for one pair, |delta| > tie_margin.

    The k voters are drawn without replacement from a pool with C contrarians (hypergeometric in j,
    the number of contrarians among them); given j, agreeing votes are Binomial(k-j, p) +
    Binomial(j, 1-p) with p = sigma(beta |delta|). A record is made when one side has a strict
    majority; it agrees with gold when that side is gold's.
    """
    k, M, C = cfg.votes_per_pair, cfg.pool_size, n_contrarians(cfg)
    p = sigmoid(cfg.rationality * abs(delta))
    agree = made = 0.0
    for j in range(max(0, k - (M - C)), min(k, C) + 1):
        pj = math.comb(C, j) * math.comb(M - C, k - j) / math.comb(M, k)
        # distribution of the number of agreeing votes: convolution of two binomials
        dist = [0.0] * (k + 1)
        for a in range(k - j + 1):
            pa = math.comb(k - j, a) * p**a * (1 - p) ** (k - j - a)
            for b in range(j + 1):
                dist[a + b] += pa * math.comb(j, b) * (1 - p) ** b * p ** (j - b)
        for n_agree, q in enumerate(dist):
            if 2 * n_agree > k:
                agree += pj * q
                made += pj * q
            elif 2 * n_agree < k:
                made += pj * q
    return agree, made


class AnnotatorPool:
    def __init__(self, cfg: AnnotatorConfig):
        cfg.validate()
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        ids = list(range(cfg.pool_size))
        contrarians = set(self.rng.sample(ids, n_contrarians(cfg)))
        self.annotators = [{"name": f"sim{i:02d}", "contrarian": i in contrarians} for i in ids]

    def judge(self, delta: float) -> tuple[list[int], list[str]]:
        """Votes of `votes_per_pair` distinct annotators on a pair with gold difference delta."""
        who = self.rng.sample(range(self.cfg.pool_size), self.cfg.votes_per_pair)
        return who, [vote(delta, self.annotators[i]["contrarian"], self.cfg, self.rng) for i in who]


def annotate(
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    gold: Gold,
    cfg: AnnotatorConfig,
    source: str = "simulated",
    id_prefix: str = "sim",
) -> tuple[list[dict], dict]:
    """Compare responses to each prompt; returns (preference records, stats).

    responses[i] holds the K responses sampled for prompts[i]. Identical responses are not compared, and
    neither are empty ones (preference records need non-empty texts); both are counted in the stats.
    stats: pairs compared, records made, ties, the mean inter-annotator agreement (share of votes for
    the majority side), and the agreement of votes and labels with the gold judge.
    """
    pool = AnnotatorPool(cfg)
    flat_p = [p for p, rs in zip(prompts, responses) for _ in rs]
    flat_r = [r for rs in responses for r in rs]
    scores = gold(flat_p, flat_r)
    records: list[dict] = []
    n_pairs = n_tie_pairs = n_vote_ties = n_votes = n_votes_agree = n_label_agree = n_empty = 0
    agreement_sum = 0.0
    expected_label = expected_made = 0.0
    pos = 0
    for i, (prompt, rs) in enumerate(zip(prompts, responses)):
        g = scores[pos : pos + len(rs)]
        pos += len(rs)
        n_empty += sum(not r.strip() for r in rs)
        pairs = [(a, b) for a, b in combinations(range(len(rs)), 2) if rs[a] != rs[b] and rs[a].strip() and rs[b].strip()]
        if cfg.pairs_per_prompt and len(pairs) > cfg.pairs_per_prompt:
            pairs = pool.rng.sample(pairs, cfg.pairs_per_prompt)
        for a, b in pairs:
            n_pairs += 1
            delta = g[a] - g[b]
            if abs(delta) <= cfg.tie_margin:
                n_tie_pairs += 1
                continue
            who, votes = pool.judge(delta)
            gold_side = "A" if delta > 0 else "B"
            n_votes += len(votes)
            n_votes_agree += sum(v == gold_side for v in votes)
            ea, em = expected_label_agreement(delta, cfg)
            expected_label += ea
            expected_made += em
            na, nb = votes.count("A"), votes.count("B")
            if na == nb:
                n_vote_ties += 1
                continue
            win = "A" if na > nb else "B"
            chosen, rejected = (a, b) if win == "A" else (b, a)
            agreement = max(na, nb) / len(votes)
            agreement_sum += agreement
            n_label_agree += win == gold_side
            records.append({
                "prompt": prompt,
                "chosen": rs[chosen],
                "rejected": rs[rejected],
                "id": f"{id_prefix}/{i}/{chosen}-{rejected}",
                "source": source,
                "meta": {
                    "kind": "compare", "policy": "majority", "group": str(i),
                    "votes": {"A": na, "B": nb, "tie": votes.count("tie")},
                    "agreement": agreement,
                    "n_annotators": len(votes),
                    "annotators": [pool.annotators[w]["name"] for w in who],
                    "response_ids": [chosen, rejected],
                    "gold": [g[chosen], g[rejected]],
                },
            })
    n_judged = n_pairs - n_tie_pairs
    stats = {
        "prompts": len(prompts),
        "responses": len(flat_r),
        "empty_responses": n_empty,
        "pairs": n_pairs,
        "gold_ties": n_tie_pairs,
        "vote_ties": n_vote_ties,
        "records": len(records),
        "inter_annotator_agreement": agreement_sum / max(len(records), 1),
        "vote_gold_agreement": n_votes_agree / max(n_votes, 1),
        "label_gold_agreement": n_label_agree / max(len(records), 1),
        "expected_label_gold_agreement": expected_label / max(expected_made, 1e-12),
        "contrarians": n_contrarians(cfg),
        "rationality": cfg.rationality,
        "gold_mean": sum(scores) / max(len(scores), 1),
        "judged_pairs": n_judged,
    }
    return records, stats
