"""Agreement metrics against published worked examples."""

import pytest

from tether.feedback import agreement as ag

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4-coder, 12-unit example
# with missing values (None). Published: nominal .743, ordinal .815, interval .849.
K_DATA = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
}


def _units(data):
    units = {}
    for coder, vals in data.items():
        for u, v in enumerate(vals):
            if v is not None:
                units.setdefault(u, {})[coder] = v
    return units


@pytest.mark.parametrize("level,expected", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_published_example(level, expected):
    assert ag.krippendorff_alpha(_units(K_DATA), level) == pytest.approx(expected, abs=5e-4)


def test_fleiss_wikipedia_example():
    # Fleiss' kappa example from Wikipedia: 10 subjects, 14 raters, 5 categories; kappa = 0.210
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]
    units = {}
    for i, row in enumerate(table):
        votes = [c for c, n in enumerate(row) for _ in range(n)]
        units[i] = {f"r{k}": v for k, v in enumerate(votes)}
    assert ag.fleiss_kappa(units) == pytest.approx(0.210, abs=5e-4)


def test_cohen_wikipedia_example():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o = .7, p_e = .5, kappa = .4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert ag.cohen_kappa(a, b) == pytest.approx(0.4)
    units = {i: {"a": x, "b": y} for i, (x, y) in enumerate(zip(a, b))}
    (pair,) = ag.pairwise_cohen(units)
    assert pair["n"] == 50 and pair["kappa"] == pytest.approx(0.4) and pair["raw_agreement"] == pytest.approx(0.7)


def test_perfect_and_chance():
    units = {i: {"a": i % 3, "b": i % 3, "c": i % 3} for i in range(30)}
    assert ag.krippendorff_alpha(units) == pytest.approx(1.0)
    assert ag.fleiss_kappa(units) == pytest.approx(1.0)
    assert ag.cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    same = {i: {"a": "A", "b": "A"} for i in range(5)}  # no variation: undefined, not 1.0
    assert ag.cohen_kappa(["A"] * 5, ["A"] * 5) is None
    assert ag.fleiss_kappa(same) is None and ag.krippendorff_alpha(same) is None


def test_majority_agreement_leave_one_out():
    units = {1: {"a": "A", "b": "A", "c": "B"}, 2: {"a": "B", "b": "B", "c": "B"}, 3: {"a": "A", "b": "B"}}
    m = ag.majority_agreement(units)
    # unit 1: others of a are {A, B} -> no majority; of c are {A, A} -> A (c disagrees)
    assert m["c"] == {"n": 2, "agree": 0.5}
    # a: unit 1 tied others (skipped), unit 2 agrees, unit 3 disagrees
    assert m["a"] == {"n": 2, "agree": 0.5}
    assert ag.plurality(["A", "B"]) is None and ag.plurality(["A", "A", "B"]) == "A"
