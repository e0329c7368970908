"""Which sampled pairs to spend a round's labelling budget on.

Candidates are all pairs of distinct, non-empty responses to one prompt. `random` draws the budget
uniformly; the active rules rank by the reward model's uncertainty and take the most uncertain:

    margin     u = -|r_a - r_b|                          (the RM can barely tell them apart)
    ensemble   u = std over members m of (r_a^m - r_b^m)  (Christiano et al. 2017: the members disagree)

Pure functions on lists: the loop scores the responses, this module only ranks them.
"""

from __future__ import annotations

import random
import statistics
from itertools import combinations

RULES = ("random", "margin", "ensemble")


def candidates(groups: list[list[str]]) -> list[tuple[int, int, int]]:
    """(group, i, j) for every pair i < j of distinct, non-empty responses in each group."""
    out = []
    for g, rs in enumerate(groups):
        out += [(g, i, j) for i, j in combinations(range(len(rs)), 2) if rs[i] != rs[j] and rs[i].strip() and rs[j].strip()]
    return out


def uncertainty(pairs: list[tuple[int, int, int]], scores: list[list[list[float]]], rule: str) -> list[float]:
    """scores[m][g][i]: member m's reward of response i of group g (one member for `margin`)."""
    if rule == "margin":
        return [-abs(scores[0][g][i] - scores[0][g][j]) for g, i, j in pairs]
    if rule == "ensemble":
        if len(scores) < 2:
            raise ValueError("ensemble selection needs at least 2 reward models (rm_ensemble >= 2)")
        return [statistics.pstdev([s[g][i] - s[g][j] for s in scores]) for g, i, j in pairs]
    raise ValueError(f"unknown selection rule {rule!r}; expected one of {RULES}")


def select(pairs: list, budget: int, rule: str, seed: int, scores: list | None = None) -> tuple[list[int], list[float] | None]:
    """Indices into `pairs` of the budget's pairs (in candidate order) and the uncertainties used (None
    for random). Ties in uncertainty are broken by a seeded shuffle, not by position."""
    rng = random.Random(seed)
    budget = min(budget, len(pairs))
    if rule == "random" or scores is None:
        return sorted(rng.sample(range(len(pairs)), budget)), None
    u = uncertainty(pairs, scores, rule)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    order.sort(key=lambda k: -u[k])
    return sorted(order[:budget]), u
