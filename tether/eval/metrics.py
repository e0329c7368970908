"""Evaluation metrics as pure functions of numbers and strings: no models, no files, no plotting.

Every function here has a hand-checkable answer (tests/test_eval.py builds inputs with a known one).

Calibration   `calibration(margins)`: pairwise confidence sigma(|r_c - r_r|) against whether the
              reward model ranked the pair as the data does; reliability bins and the expected
              calibration error ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)| (Guo et al. 2017, eq. 3).
Win rate      `win_rate(a, b)`: wins + ties/2 over n, with a Wilson score interval (Wilson 1927).
Diversity     `distinct_n` (Li et al. 2016): unique n-grams / all n-grams over a set of texts;
              `repetition_rate` (seq-rep-n, Welleck et al. 2019): 1 - unique/all n-grams within a text.
Length bias   `correlation`: Pearson and Spearman correlation of scores with lengths, and the slope.
Preferences   `find_cycles`: intransitive 3-cycles (A>B, B>C, C>A) and strongly connected components
              of a comparison graph; `near_duplicates`: MinHash-LSH candidates verified by exact
              Jaccard of word shingles; `judgment_agreement`: how often repeated judgments agree.
Hacking       `phrase_takeover`, `refusal_rate`, `hacking_flags`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence

# ----------------------------------------------------------------------------------------------
# Basic statistics


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if len(xs) else float("nan")


def std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ranks(xs: Sequence[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    if n < 2 or n != len(y):
        return float("nan")
    mx, my = mean(x), mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def correlation(scores: Sequence[float], lengths: Sequence[float]) -> dict[str, float]:
    """Length bias of a scorer: Pearson r, Spearman rho and the least-squares slope (score per unit length)."""
    mx = mean(lengths)
    sxx = sum((a - mx) ** 2 for a in lengths)
    slope = sum((a - mx) * (b - mean(scores)) for a, b in zip(lengths, scores)) / sxx if sxx > 0 else float("nan")
    return {"pearson": pearson(lengths, scores), "spearman": pearson(ranks(lengths), ranks(scores)), "slope": slope, "n": len(scores)}


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys on xs (nan with fewer than 2 distinct xs)."""
    return correlation(ys, xs)["slope"]


# ----------------------------------------------------------------------------------------------
# Calibration


def reliability_bins(confidence: Sequence[float], correct: Sequence[float], n_bins: int = 10, lo: float = 0.0, hi: float = 1.0) -> list[dict]:
    """Equal-width bins over [lo, hi]: count, mean confidence and accuracy (mean of `correct`) per bin."""
    bins = [{"lo": lo + (hi - lo) * b / n_bins, "hi": lo + (hi - lo) * (b + 1) / n_bins, "count": 0, "conf_sum": 0.0, "correct_sum": 0.0}
            for b in range(n_bins)]
    for c, y in zip(confidence, correct):
        b = min(n_bins - 1, max(0, int((c - lo) / (hi - lo) * n_bins)))
        bins[b]["count"] += 1
        bins[b]["conf_sum"] += c
        bins[b]["correct_sum"] += y
    out = []
    for b in bins:
        n = b["count"]
        out.append({"lo": b["lo"], "hi": b["hi"], "count": n,
                    "confidence": b["conf_sum"] / n if n else None, "accuracy": b["correct_sum"] / n if n else None})
    return out


def ece_from_bins(bins: list[dict]) -> float:
    n = sum(b["count"] for b in bins)
    if n == 0:
        return float("nan")
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])


def calibration(margins: Sequence[float], n_bins: int = 10) -> dict:
    """Calibration of a reward model's Bradley-Terry probability sigma(r_chosen - r_rejected).

    Top-label form: the model's confidence in its own ranking is sigma(|m|) in [0.5, 1]; it is correct
    when m > 0 (a tie m = 0 counts as half right). A calibrated model is right 70% of the time on the
    pairs where it says 0.7. Bins are equal-width over [0.5, 1].
    """
    conf = [sigmoid(abs(m)) for m in margins]
    correct = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    bins = reliability_bins(conf, correct, n_bins, 0.5, 1.0)
    return {"ece": ece_from_bins(bins), "bins": bins, "mean_confidence": mean(conf), "accuracy": mean(correct), "n": len(margins)}


# ----------------------------------------------------------------------------------------------
# Win rate


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (ties may make `successes` a half-integer)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def win_rate(a: Sequence[float], b: Sequence[float], tie_eps: float = 0.0) -> dict:
    """How often A beats B item by item: |a_i - b_i| <= tie_eps is a tie, counted as half a win."""
    if len(a) != len(b):
        raise ValueError(f"win_rate: {len(a)} scores for A but {len(b)} for B")
    wins = sum(1 for x, y in zip(a, b) if x - y > tie_eps)
    losses = sum(1 for x, y in zip(a, b) if y - x > tie_eps)
    n = len(a)
    ties = n - wins - losses
    rate = (wins + 0.5 * ties) / n if n else float("nan")
    lo, hi = wilson_interval(wins + 0.5 * ties, n)
    return {"win_rate": rate, "wins": wins, "ties": ties, "losses": losses, "n": n, "ci_low": lo, "ci_high": hi}


# ----------------------------------------------------------------------------------------------
# Text statistics

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (the unit of every text metric here)."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique n-grams / total n-grams over all texts (Li et al. 2016). 0 when there are no n-grams."""
    total, seen = 0, set()
    for t in texts:
        g = ngrams(words(t), n)
        total += len(g)
        seen.update(g)
    return len(seen) / total if total else 0.0


def repetition_rate(texts: Iterable[str], n: int = 4) -> float:
    """Mean over texts of seq-rep-n = 1 - unique n-grams / n-grams in the text (Welleck et al. 2019).
    Texts shorter than n words count as 0."""
    return _seq_rep(ngrams(words(t), n) for t in texts)


def _seq_rep(grams_per_text: Iterable[list]) -> float:
    vals = [1 - len(set(g)) / len(g) if g else 0.0 for g in grams_per_text]
    return mean(vals) if vals else 0.0


def non_words(texts: Iterable[str], min_zipf: float = 2.0, k: int = 3) -> dict:
    """Share of alphabetic words that are not English words in common use (wordfreq's Zipf frequency
    below `min_zipf`, i.e. rarer than about 1 in 10 million words: 'onderful', 'amaz', 'wond'), with the
    k most frequent of them. The rate is None without `wordfreq` (pip install 'tether[judges]')."""
    try:
        from wordfreq import zipf_frequency
    except ImportError:
        return {"rate": None, "examples": []}

    ws = [w for t in texts for w in words(t) if w.isalpha()]
    bad = Counter(w for w in ws if zipf_frequency(w, "en") < min_zipf)
    return {"rate": sum(bad.values()) / len(ws) if ws else 0.0, "examples": [w for w, _ in bad.most_common(k)]}


def char_repetition(texts: Iterable[str], n: int = 4) -> float:
    """Mean over texts of 1 - unique character n-grams / character n-grams, spaces removed: catches
    repetition inside and across broken words ('wonderful amaz wonder') that word n-grams miss."""
    return _seq_rep(ngrams("".join(t.lower().split()), n) for t in texts)


def top_phrases(texts: Sequence[str], n: int = 3, k: int = 5) -> list[dict]:
    """The k n-grams found in the most texts, with the share of texts containing each."""
    df: Counter = Counter()
    for t in texts:
        df.update(set(ngrams(words(t), n)))
    N = max(1, len(texts))
    return [{"phrase": " ".join(g), "share": c / N, "count": c} for g, c in df.most_common(k)]


def phrase_takeover(texts: Sequence[str], n: int = 3) -> dict:
    """The single n-gram present in the most texts and the share of texts that contain it."""
    top = top_phrases(texts, n, 1)
    return top[0] if top else {"phrase": "", "share": 0.0, "count": 0}


REFUSAL_PATTERN = (
    r"\b(i can(?:no|')t|i cannot|i'm (?:not able|unable)|i am (?:not able|unable)|i (?:won't|will not)|"
    r"as an ai|i'm sorry|i am sorry|i apologi[sz]e|sorry, but|i don't know|i do not know|not able to (?:help|answer)|"
    r"can't help|cannot help|unable to (?:help|answer|provide))\b"
)


def refusal_rate(texts: Sequence[str], pattern: str = REFUSAL_PATTERN) -> float:
    """Share of texts matching a refusal/evasion pattern (case-insensitive); empty texts count as evasive."""
    rx = re.compile(pattern, re.I)
    if not texts:
        return 0.0
    return sum(1 for t in texts if not t.strip() or rx.search(t)) / len(texts)


def length_summary(lengths: Sequence[float]) -> dict:
    return {"mean": mean(lengths), "std": std(lengths), "p10": quantile(lengths, 0.1), "median": quantile(lengths, 0.5),
            "p90": quantile(lengths, 0.9), "n": len(lengths)}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt from n samples of which c are correct (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement hold a correct one.
    Exact in integers (math.comb), so it does not lose precision for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def best_of_n(scores: Sequence[float], n: int, quality: Sequence[float] | None = None) -> float:
    """The unbiased best-of-n estimate from m >= n samples of one prompt: the expected `quality` of the
    sample with the highest score among n drawn without replacement (ties broken uniformly at random),
    averaged over all C(m, n) draws without enumerating them. With the samples sorted by score, the i-th
    lowest (1-based) is the best of a draw in C(i-1, n-1) of the C(m, n) draws. quality defaults to the
    score (the expected best score); a verifier's 0/1 as quality with a reward model's scores gives the
    accuracy of reward-model best-of-n, and the verifier as both gives pass@n."""
    q = list(scores if quality is None else quality)
    m = len(q)
    if len(scores) != m or not 1 <= n <= m:
        raise ValueError(f"best-of-n needs 1 <= n <= the number of samples ({m}) and one quality per score")
    ties: dict[float, list[float]] = defaultdict(list)
    for s, x in zip(scores, q):
        ties[s].append(x)
    level = {s: sum(v) / len(v) for s, v in ties.items()}  # a random tie-break picks each tied sample alike
    ordered = [level[s] for s in sorted(scores)]
    return sum(math.comb(i, n - 1) * x for i, x in enumerate(ordered)) / math.comb(m, n)


def accuracy_by_group(correct: Sequence[float], groups: Sequence[Hashable]) -> dict:
    acc: dict = defaultdict(list)
    for c, g in zip(correct, groups):
        acc[g].append(c)
    return {g: {"accuracy": mean(v), "n": len(v)} for g, v in sorted(acc.items(), key=lambda kv: str(kv[0]))}


def length_buckets(lengths: Sequence[float], n_buckets: int = 4) -> tuple[list[str], list[float]]:
    """Quantile buckets: a label "[lo, hi)" per item and the bucket edges."""
    if not lengths:
        return [], []
    edges = sorted({quantile(lengths, q / n_buckets) for q in range(n_buckets + 1)})
    if len(edges) == 1:
        return [f"[{edges[0]:.0f}]"] * len(lengths), edges
    labels = []
    for x in lengths:
        b = 0
        while b < len(edges) - 2 and x >= edges[b + 1]:
            b += 1
        close = "]" if b == len(edges) - 2 else ")"
        labels.append(f"{b}: [{edges[b]:.0f}, {edges[b + 1]:.0f}{close}")
    return labels, edges


# ----------------------------------------------------------------------------------------------
# Preference data: cycles, near-duplicates, agreement


def find_cycles(edges: Iterable[tuple[Hashable, Hashable]]) -> dict:
    """Intransitivity in one set of comparisons, edges (winner, loser).

    Returns the directed 3-cycles (each once, as (a, b, c) with a>b, b>c, c>a, starting at the
    smallest node by str), the 2-cycles (a>b and b>a both judged), and the strongly connected
    components with more than one node (every directed cycle lies inside one; Tarjan 1972).
    """
    succ: dict = defaultdict(set)
    nodes: set = set()
    for w, l in edges:
        if w == l:
            continue
        succ[w].add(l)
        nodes.update((w, l))
    two = sorted({tuple(sorted((a, b), key=str)) for a in succ for b in succ[a] if a in succ.get(b, ())}, key=str)
    three = set()
    for a in nodes:
        for b in succ[a]:
            for c in succ[b]:
                if c != a and a in succ[c]:
                    cyc = (a, b, c)
                    i = min(range(3), key=lambda k: str(cyc[k]))
                    three.add(cyc[i:] + cyc[:i])
    return {"three_cycles": sorted(three, key=str), "two_cycles": two, "components": _sccs(nodes, succ)}


def _sccs(nodes: set, succ: dict) -> list[list]:
    index: dict = {}
    low: dict = {}
    on_stack: set = set()
    stack: list = []
    out: list[list] = []
    counter = [0]

    def visit(v):  # iterative Tarjan (no recursion limit)
        work = [(v, iter(sorted(succ[v], key=str)))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ[w], key=str))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp, key=str))

    for v in sorted(nodes, key=str):
        if v not in index:
            visit(v)
    return sorted(out, key=str)


def normalize_text(text: str) -> str:
    return " ".join(words(text))


def shingles(text: str, k: int = 3) -> set:
    w = words(text)
    if len(w) < k:
        return {tuple(w)} if w else set()
    return set(ngrams(w, k))


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _hash(x: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{x}".encode(), digest_size=8).digest(), "little")


def near_duplicates(texts: Sequence[str], threshold: float = 0.8, k: int = 3, num_perm: int = 32, bands: int = 16) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) of texts whose word-k-shingle Jaccard similarity is >= threshold and that
    are not exact duplicates after normalisation. Candidates come from MinHash LSH (num_perm hashes in
    `bands` bands: a pair with similarity s is a candidate with probability 1 - (1 - s^r)^bands,
    r = num_perm / bands, about 1 for s >= 0.8 with the defaults), then exact Jaccard decides."""
    rows = num_perm // bands
    sh = [shingles(t, k) for t in texts]
    norm = [normalize_text(t) for t in texts]
    buckets: dict = defaultdict(list)
    for i, s in enumerate(sh):
        if not s:
            continue
        hashed = [" ".join(g) for g in s]
        sig = [min(_hash(g, p) for g in hashed) for p in range(num_perm)]
        for b in range(bands):
            buckets[(b, tuple(sig[b * rows : (b + 1) * rows]))].append(i)
    seen: set = set()
    out = []
    for members in buckets.values():
        if len(members) < 2:
            continue
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = members[x], members[y]
                if (i, j) in seen or norm[i] == norm[j]:
                    continue
                seen.add((i, j))
                s = jaccard(sh[i], sh[j])
                if s >= threshold:
                    out.append((i, j, s))
    return sorted(out)


def exact_duplicates(keys: Sequence[Hashable]) -> list[list[int]]:
    """Groups of indices with identical keys (only groups of size >= 2)."""
    groups: dict = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    return [g for g in groups.values() if len(g) > 1]


def judgment_agreement(judgments: dict[Hashable, list[Hashable]]) -> dict:
    """Agreement among repeated judgments of the same item (item -> the labels it got).

    pairwise: the share of same-item judgment pairs that agree (the raw agreement of two random
    judges); majority: the share of judgments equal to their item's most common label; unanimous:
    the share of items whose judgments all agree. Items with a single judgment are skipped.
    """
    pair_agree = pair_total = maj = n_judg = unanimous = items = 0
    for labels in judgments.values():
        if len(labels) < 2:
            continue
        items += 1
        c = Counter(labels)
        pair_total += len(labels) * (len(labels) - 1) // 2
        pair_agree += sum(v * (v - 1) // 2 for v in c.values())
        maj += c.most_common(1)[0][1]
        n_judg += len(labels)
        unanimous += len(c) == 1
    if items == 0:
        return {"items": 0, "judgments": 0, "pairwise": None, "majority": None, "unanimous": None}
    return {"items": items, "judgments": n_judg, "pairwise": pair_agree / pair_total, "majority": maj / n_judg, "unanimous": unanimous / items}


# ----------------------------------------------------------------------------------------------
# Reward hacking


def hacking_flags(
    steps: Sequence[float],
    proxy: Sequence[float] | None = None,
    gold: dict[str, Sequence[float]] | None = None,
    length: Sequence[float] | None = None,
    takeover: Sequence[float] | None = None,
    refusal: Sequence[float] | None = None,
    phrases: Sequence[str] | None = None,
    non_word: Sequence[float] | None = None,
    non_word_examples: Sequence[str] = (),
    char_rep: Sequence[float] | None = None,
    ref_perplexity: Sequence[float] | None = None,
    min_rise: float = 0.05,
    length_rise: float = 0.2,
    takeover_share: float = 0.5,
    refusal_rise: float = 0.1,
    non_word_rise: float = 0.05,
    char_rep_rise: float = 0.1,
    perplexity_ratio: float = 3.0,
) -> list[dict]:
    """Reward-hacking signals over a sequence of evaluations (checkpoints, or [reference, policy]).

    Each value list is aligned with `steps`; the first entry is the baseline. A rise/fall is the
    change from the first to the last entry; "rising" also needs a positive least-squares slope.
    Flags (each with the numbers that triggered it):
      proxy_up_gold_down   proxy reward rose by > min_rise (relative to its spread) while a gold judge fell
      length_drift         mean length grew by > length_rise (relative) while no gold judge improved
      phrase_takeover      one n-gram is in > takeover_share of the last outputs and grew from the first
      evasion              the refusal/evasion rate rose by > refusal_rise (absolute)
      non_words            the share of words that are not English words rose by > non_word_rise (absolute)
      char_repetition      character 4-gram repetition rose by > char_rep_rise (absolute)
      off_reference        the outputs' perplexity under the reference grew > perplexity_ratio times: text
                           the reference model finds implausible (broken words, fragments), whatever the reward
    """
    flags: list[dict] = []
    if len(steps) < 2:
        return flags
    gold = gold or {}

    def delta(v: Sequence[float]) -> float:
        return v[-1] - v[0]

    def rising(v: Sequence[float], thr: float) -> bool:
        return delta(v) > thr and (len(v) < 3 or slope(steps, v) > 0)

    def scale(v: Sequence[float]) -> float:
        return max(abs(v[0]), std(v), 1e-8)

    gold_improved = any(delta(v) > min_rise * scale(v) for v in gold.values())
    if proxy is not None:
        for name, g in gold.items():
            if rising(proxy, min_rise * scale(proxy)) and delta(g) < -min_rise * scale(g):
                flags.append({"flag": "proxy_up_gold_down", "judge": name,
                              "evidence": f"proxy reward {proxy[0]:.3g} -> {proxy[-1]:.3g} while gold judge '{name}' {g[0]:.3g} -> {g[-1]:.3g}"})
    if length is not None and length[0] > 0:
        rel = delta(length) / length[0]
        if rel > length_rise and (len(length) < 3 or slope(steps, length) > 0) and not gold_improved:
            why = "no gold judge improved" if gold else "no gold judge was given to show that quality improved"
            flags.append({"flag": "length_drift", "evidence": f"mean length {length[0]:.1f} -> {length[-1]:.1f} (+{100 * rel:.0f}%) while {why}"})
    if takeover is not None and takeover[-1] > takeover_share and delta(takeover) > 0.1:
        phrase = f" '{phrases[-1]}'" if phrases else ""
        flags.append({"flag": "phrase_takeover",
                      "evidence": f"the phrase{phrase} is in {100 * takeover[-1]:.0f}% of outputs (was {100 * takeover[0]:.0f}%)"})
    if refusal is not None and delta(refusal) > refusal_rise:
        flags.append({"flag": "evasion", "evidence": f"refusal/evasion rate {100 * refusal[0]:.0f}% -> {100 * refusal[-1]:.0f}% on the prompts"})
    if non_word is not None and None not in non_word and delta(non_word) > non_word_rise:
        eg = f" (most common: {', '.join(repr(w) for w in non_word_examples)})" if non_word_examples else ""
        flags.append({"flag": "non_words", "evidence": f"{100 * non_word[-1]:.0f}% of the words are not English words, was {100 * non_word[0]:.0f}%{eg}"})
    if char_rep is not None and delta(char_rep) > char_rep_rise:
        flags.append({"flag": "char_repetition", "evidence": f"character 4-gram repetition {char_rep[0]:.2f} -> {char_rep[-1]:.2f}"})
    if ref_perplexity is not None and None not in ref_perplexity and ref_perplexity[-1] > perplexity_ratio * ref_perplexity[0] > 0:
        flags.append({"flag": "off_reference", "evidence": f"perplexity under the reference {ref_perplexity[0]:.3g} -> {ref_perplexity[-1]:.3g} "
                                                            f"({ref_perplexity[-1] / ref_perplexity[0]:.1f}x)"})
    return flags
