"""Rewards that are Python functions rather than reward models: rule-based checks, judges, tests.

    tether ppo ... reward.fn=tether.rewards:word_fraction 'reward.kwargs={words: [good, great]}'
    tether ppo ... reward.fn=my_package.rewards:judge

A reward function takes the prompts and the decoded responses (B strings each) and returns B floats:

    def my_reward(prompts: list[str], responses: list[str], **kwargs) -> list[float]

If it declares a `response_ids` parameter (or **kwargs) it also gets the sampled token ids of each
response (EOS and padding removed), for rules on tokens. `reward.kwargs` are passed as keywords.
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


def call_reward_fn(fn: RewardFn, prompts: list[str], responses: list[str], response_ids: list[list[int]], kwargs: dict[str, Any]) -> list[float]:
    extra = {"response_ids": response_ids} if _wants_ids(fn) else {}
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
