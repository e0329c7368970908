"""Gold judges: functions that score responses independently of the reward model being trained.

A judge is `Callable[[list[str] prompts, list[str] responses], list[float]]` (higher = better).
`get_judge(spec)` builds one from a string:

    vader            VADER compound sentiment of the response, in [-1, 1] (tether/judges/sentiment.py)
    length           the response's length in words
    rule:<regex>     1.0 if the regex matches the response (case-insensitive), else 0.0;
                     rule:!<regex> is the negation (1.0 when it does not match)
    llm:<model_dir>  an LLM judge: log p(Yes) - log p(No) of a local causal LM asked whether the
                     response meets a rubric (tether/judges/llm.py); the rubric is get_judge's `rubric`
    module:function  any importable function with the judge signature (e.g. mypkg.judges:helpful)

Simulated annotators (tether/judges/annotators.py) build on these judges.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

Judge = Callable[[list[str], list[str]], list[float]]

_WORDS = re.compile(r"\w+")


def length_judge(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(_WORDS.findall(r))) for r in responses]


def rule_judge(pattern: str) -> Judge:
    negate = pattern.startswith("!")
    rx = re.compile(pattern[1:] if negate else pattern, re.I)

    def judge(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(bool(rx.search(r)) != negate) for r in responses]

    return judge


def get_judge(spec: str | Judge, rubric: str | None = None, device: str = "cpu") -> Judge:
    """A judge from a spec string (see the module docstring); a callable is returned as is."""
    if callable(spec):
        return spec
    if spec == "vader":
        from tether.judges.sentiment import vader_judge

        return vader_judge
    if spec == "length":
        return length_judge
    if spec.startswith("rule:"):
        return rule_judge(spec[len("rule:"):])
    if spec.startswith("llm:"):
        from tether.judges.llm import DEFAULT_RUBRIC, LLMJudge

        return LLMJudge(spec[len("llm:"):], rubric or DEFAULT_RUBRIC, device=device)
    if ":" in spec:
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"judge {spec!r}: cannot import {name} from {module} ({e})") from None
        if not callable(fn):
            raise ValueError(f"judge {spec!r}: {module}.{name} is not callable")
        return fn
    raise ValueError(f"unknown judge {spec!r}: expected vader, length, rule:<regex>, llm:<model_dir> or module:function")


def judge_name(spec: str | Judge) -> str:
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__)
    if spec.startswith("llm:"):
        return "llm:" + spec.rstrip("/").rsplit("/", 1)[-1]
    return spec
