"""Rewards that are Python functions rather than reward models: rule-based checks, judges, tests.

    tether ppo ... reward.fn=tether.rewards:word_fraction 'reward.kwargs={words: [good, great]}'
    tether ppo ... reward.fn=my_package.rewards:judge

A reward function takes the prompts and the decoded responses (B strings each) and returns B floats:

    def my_reward(prompts: list[str], responses: list[str], **kwargs) -> list[float]

If it declares a `response_ids` parameter (or **kwargs) it also gets the sampled token ids of each
response (EOS and padding removed), for rules on tokens. `reward.kwargs` are passed as keywords.

The prompt records' other fields reach it too: a parameter named after a field (or **kwargs) gets that
field's B values, one per response (None where a record lacks it), so a verifier reads each prompt's
own reference answer and never looks it up by prompt text:

    def exact_number(prompts, responses, answer, **_) -> list[float]   # answer: the records' `answer`

A `reward.kwargs` key of the same name wins over the field.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable, Sequence

RewardFn = Callable[..., Sequence[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """'package.module:function' -> the function (ConfigError naming reward.fn when it cannot load)."""
    from tether.config import ConfigError

    if ":" not in spec:
        raise ConfigError(f"config key 'reward.fn': expected 'package.module:function', got {spec!r}")
    module_name, name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"config key 'reward.fn': cannot import {module_name!r}: {e}") from None
    fn = module
    for part in name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"config key 'reward.fn': {module_name!r} has no attribute {name!r}")
    if not callable(fn):
        raise ConfigError(f"config key 'reward.fn': {spec!r} is not callable")
    return fn


def _wants_ids(fn: RewardFn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "response_ids" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def record_columns(fn: RewardFn, fields: list[dict], taken: set[str]) -> dict[str, list]:
    """The prompt records' fields that `fn` takes, as columns of B values (None where a record lacks one).
    A parameter without a default that no record has is a DataError naming it."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    every = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    keys = {k for f in fields for k in f} - taken - {"prompts", "responses", "response_ids"}
    for name, p in list(params.items())[2:]:
        if name not in keys | taken and p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            from tether.data.records import DataError

            raise DataError(f"the reward function {getattr(fn, '__name__', fn)} reads the prompt records' field {name!r}, which the prompt records do not have"
                            f" (they have: {', '.join(sorted(keys)) or 'no other field'})")
    return {k: [f.get(k) for f in fields] for k in sorted(keys) if every or k in params}


def call_reward_fn(fn: RewardFn, prompts: list[str], responses: list[str], response_ids: list[list[int]], kwargs: dict[str, Any],
                   fields: list[dict] | None = None) -> list[float]:
    """fn's rewards; fields: each row's prompt record's other fields (PromptBatch.fields)."""
    extra = {"response_ids": response_ids} if _wants_ids(fn) else {}
    extra |= record_columns(fn, fields or [{} for _ in responses], set(kwargs) | set(extra))
    out = [float(x) for x in fn(prompts, responses, **extra, **kwargs)]
    if len(out) != len(responses):
        raise ValueError(f"reward function returned {len(out)} values for {len(responses)} responses")
    return out


# ----------------------------------------------------------------------------------------------
# Built-in rule rewards (demos and tests)

_WORD = re.compile(r"[A-Za-z']+")


def word_fraction(prompts: list[str], responses: list[str], words: Sequence[str] = ("good", "great")) -> list[float]:
    """Fraction of the words in each response that belong to `words` (case-insensitive)."""
    target = {w.lower() for w in words}
    out = []
    for r in responses:
        ws = [w.lower() for w in _WORD.findall(r)]
        out.append(sum(w in target for w in ws) / len(ws) if ws else 0.0)
    return out


def word_count(prompts: list[str], responses: list[str], words: Sequence[str] = ("good",), cap: int = 0) -> list[float]:
    """+1 for each occurrence of a word from `words` (capped at `cap` when cap > 0)."""
    target = {w.lower() for w in words}
    out = []
    for r in responses:
        n = sum(w.lower() in target for w in _WORD.findall(r))
        out.append(float(min(n, cap) if cap > 0 else n))
    return out


def token_fraction(prompts: list[str], responses: list[str], response_ids: list[list[int]], tokens: Sequence[int] = ()) -> list[float]:
    """Fraction of the sampled tokens of each response whose id is in `tokens`."""
    target = set(int(t) for t in tokens)
    return [sum(t in target for t in ids) / len(ids) if ids else 0.0 for ids in response_ids]


def length_penalty(prompts: list[str], responses: list[str], target: int = 20) -> list[float]:
    """-|len(words) - target| / target: prefers responses of about `target` words."""
    return [-abs(len(r.split()) - target) / max(target, 1) for r in responses]


def repetition(prompts: list[str], responses: list[str], n: int = 1) -> list[float]:
    """seq-rep-n of each response: 1 - unique word n-grams / word n-grams (Welleck et al. 2019); 0 for
    responses shorter than n words. A degeneracy cost: PPO on a sentiment reward raises it by repeating
    its pet phrases."""
    out = []
    for r in responses:
        ws = [w.lower() for w in _WORD.findall(r)]
        grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
        out.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
    return out


# ----------------------------------------------------------------------------------------------
# Verifiable rewards: checkable answers (GSM8K, Cobbe et al. 2021) and the format they are given in

# A number as written in free text: an optional minus sign right before it (not a hyphen after a word or a
# digit, nor one followed by a space: "16-3" and "16 - 3" are 16 and 3), an optional $, thousands separated
# by commas, decimals ("18." is 18: a trailing full stop is not a decimal point).
_NUMBER = re.compile(r"(?<![\w.)])(-)?(?:\$\s?)?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)")
_MARKED = (re.compile(r"####\s*([^\n]*)"), re.compile(r"\\boxed\{([^{}]*)\}"), re.compile(r"answer is:?\s*([^\n]*)", re.IGNORECASE))


def numbers(text: str) -> list[float]:
    """Every number in the text, in order: '-$1,234.50' -> -1234.5."""
    return [float((m[1] or "") + m[2].replace(",", "") + (m[3] or "")) for m in _NUMBER.finditer(text)]


def extract_answer(text: str) -> float | None:
    """The final numeric answer of a free-text response: the first number after the last '####', else
    inside the last \\boxed{...}, else after the last 'the answer is', else the last number in the text;
    None when there is none."""
    for marked in _MARKED:
        for m in reversed(list(marked.finditer(text))):
            found = numbers(m.group(1))
            if found:
                return found[0]
    found = numbers(text)
    return found[-1] if found else None


def reference_answer(answer: Any) -> float:
    """A record's reference answer as a number: a GSM8K solution ('... #### 72'), or a number or numeric string."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return float(answer)
    text = str(answer) if answer is not None else ""
    value = extract_answer(text.rsplit("####", 1)[1]) if "####" in text else (numbers(text)[0] if len(numbers(text)) == 1 else None)
    if value is None:
        from tether.data.records import DataError

        raise DataError(f"the prompt record's reference answer {text[-60:]!r} has no final number (expected '... #### <number>' or one number)")
    return value


def exact_number(prompts: list[str], responses: list[str], answer: Sequence[Any], **_: Any) -> list[float]:
    """1.0 where the response's final number (extract_answer) equals the record's `answer` (reference_answer), else 0.0.
    GSM8K: reward.fn=tether.rewards:exact_number on its {question, answer} records."""
    refs = [reference_answer(a) for a in answer]
    if len(refs) != len(responses):
        raise ValueError(f"exact_number: {len(refs)} reference answers for {len(responses)} responses")
    got = [extract_answer(r) for r in responses]
    return [float(g is not None and abs(g - a) <= 1e-6 * max(1.0, abs(a))) for g, a in zip(got, refs)]


_FORMATS = {"####": re.compile(r"####\s*" + _NUMBER.pattern), "boxed": re.compile(r"\\boxed\{\s*" + _NUMBER.pattern + r"\s*\}"),
            "answer_is": re.compile(r"answer is:?\s*" + _NUMBER.pattern, re.IGNORECASE)}


def answer_format(prompts: list[str], responses: list[str], style: str = "####", **_: Any) -> list[float]:
    """1.0 where the response states a final number in the asked form, else 0.0: style '####'
    ('#### 42', GSM8K's), 'boxed' ('\\boxed{42}') or 'answer_is' ('The answer is 42')."""
    if style not in _FORMATS:
        raise ValueError(f"answer_format: style must be one of {', '.join(_FORMATS)}, got {style!r}")
    return [float(bool(_FORMATS[style].search(r))) for r in responses]
