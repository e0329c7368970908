"""Inter-annotator agreement, in pure Python (no numpy needed).

Data shape everywhere: `labels[unit][coder] = value`, where a unit is one thing that several coders
labelled (a comparison item, a rating item, or one response pair of a ranking item).

- Cohen's kappa (two coders): (p_o - p_e) / (1 - p_e) over the units both labelled, p_e from
  each coder's own label frequencies.
- Fleiss' kappa (any number of coders, possibly varying per unit): P_i = (sum_j n_ij^2 - n_i) /
  (n_i (n_i - 1)), P_bar their mean, P_e = sum_j p_j^2 with p_j the pooled label proportions.
- Krippendorff's alpha: 1 - D_o / D_e from the coincidence matrix, with nominal, ordinal or interval
  distance; handles missing labels (units with fewer than 2 labels are skipped).
- Agreement with the majority: for each coder, the share of their labels that equal the strict
  plurality label of the *other* coders on the same unit (units without one are skipped).

When every label is the same value, kappa and alpha are undefined (0/0) and are returned as None;
the raw agreement is still reported next to them.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping

Labels = Mapping[Hashable, Mapping[Hashable, Hashable]]


def cohen_kappa(a: list, b: list) -> float | None:
    """Cohen's kappa of two equally long label lists; None if there is nothing to compare."""
    n = len(a)
    if n == 0 or n != len(b):
        return None
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    if p_e >= 1.0:
        return None  # both coders used one and the same label throughout: kappa is undefined
    return (p_o - p_e) / (1 - p_e)


def pairwise_cohen(labels: Labels, min_common: int = 2) -> list[dict]:
    """Cohen's kappa for every pair of coders with at least `min_common` units in common."""
    by_coder: dict = defaultdict(dict)
    for unit, votes in labels.items():
        for coder, v in votes.items():
            by_coder[coder][unit] = v
    out = []
    for c1, c2 in itertools.combinations(sorted(by_coder, key=str), 2):
        common = sorted(set(by_coder[c1]) & set(by_coder[c2]), key=str)
        if len(common) < min_common:
            continue
        a = [by_coder[c1][u] for u in common]
        b = [by_coder[c2][u] for u in common]
        out.append(
            {
                "a": c1,
                "b": c2,
                "n": len(common),
                "kappa": cohen_kappa(a, b),
                "raw_agreement": sum(x == y for x, y in zip(a, b, strict=True)) / len(common),
            }
        )
    return out


def fleiss_kappa(labels: Labels) -> float | None:
    """Fleiss' kappa over units with at least two labels (the number of labels may vary by unit)."""
    units = [Counter(v.values()) for v in labels.values() if len(v) >= 2]
    if not units:
        return None
    total = sum(sum(c.values()) for c in units)
    pooled: Counter = Counter()
    for c in units:
        pooled.update(c)
    p_e = sum((n / total) ** 2 for n in pooled.values())
    p_bar = sum(
        (sum(n * n for n in c.values()) - sum(c.values())) / (sum(c.values()) * (sum(c.values()) - 1)) for c in units
    ) / len(units)
    if p_e >= 1.0:
        return None  # a single label overall: undefined
    return (p_bar - p_e) / (1 - p_e)


def krippendorff_alpha(labels: Labels, level: str = "nominal") -> float | None:
    """Krippendorff's alpha with `level` in {"nominal", "ordinal", "interval"}."""
    coinc: dict = defaultdict(float)
    for votes in labels.values():
        vals = list(votes.values())
        m = len(vals)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            coinc[(vals[i], vals[j])] += 1.0 / (m - 1)
    if not coinc:
        return None
    n_c: dict = defaultdict(float)
    for (c, _k), w in coinc.items():
        n_c[c] += w
    n = sum(n_c.values())
    values = sorted(n_c, key=lambda x: (str(type(x)), x))

    if level == "nominal":

        def delta(c, k):  # noqa: ANN001, ANN202
            return 0.0 if c == k else 1.0
    elif level == "interval":

        def delta(c, k):  # noqa: ANN001, ANN202
            return float(c - k) ** 2
    elif level == "ordinal":
        pos = {v: i for i, v in enumerate(values)}

        def delta(c, k):  # noqa: ANN001, ANN202
            lo, hi = sorted((pos[c], pos[k]))
            s = sum(n_c[values[g]] for g in range(lo, hi + 1)) - (n_c[c] + n_c[k]) / 2
            return s * s
    else:
        raise ValueError(f"unknown level {level!r}")

    d_o = sum(w * delta(c, k) for (c, k), w in coinc.items()) / n
    d_e = sum(n_c[c] * n_c[k] * delta(c, k) for c in values for k in values) / (n * (n - 1))
    if d_e == 0:
        return None  # no variation in the labels: undefined
    return 1.0 - d_o / d_e


def plurality(values: list) -> Hashable | None:
    """The strictly most common value, or None if there is a tie for first place (or no values)."""
    if not values:
        return None
    (top, n), *rest = Counter(values).most_common(2) + [(None, -1)]
    return top if n > rest[0][1] else None


def majority_agreement(labels: Labels) -> dict:
    """Per coder: {"n": units compared, "agree": share equal to the others' plurality label}."""
    hits: dict = defaultdict(lambda: [0, 0])
    for votes in labels.values():
        for coder, v in votes.items():
            others = [w for c, w in votes.items() if c != coder]
            maj = plurality(others)
            if maj is None:
                continue
            hits[coder][1] += 1
            hits[coder][0] += int(v == maj)
    return {c: {"n": n, "agree": (a / n if n else None)} for c, (a, n) in hits.items()}
