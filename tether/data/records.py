"""Record types shared by the readers, the format adapters and the tokenisers, and bad-record handling.

A record's location `loc` is "file:line" for JSONL, "file[index]" for a JSON array or an HF dataset on
disk. Every problem with a record is reported as "{loc}: {problem}".
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


class DataError(ValueError):
    """A data file or record is bad. The message names the file and the line (or index)."""


class BadRecord(Exception):
    """Raised inside the adapters; turned into DataError or a skip count by `Sink`."""

    def __init__(self, problem: str, reason: str | None = None):
        super().__init__(problem)
        self.problem = problem
        # The key a skip is counted under: the problem without its varying details.
        self.reason = reason or re.sub(r" \(.*\)$", "", problem)


@dataclass(frozen=True)
class SFTExample:
    prompt: str | None  # raw text; None for message records
    completion: str | None
    messages: Messages | None  # None for prompt/completion records
    loc: str
    label: bool | None = None  # KTO: true = a desirable completion, false = an undesirable one


@dataclass(frozen=True)
class PreferencePair:
    # Either all three are strings (raw text, concatenated as is), or all three are message lists:
    # the prompt is the conversation so far, chosen/rejected are the assistant turn(s) that follow.
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    loc: str
    margin: float | None = None
    source: str = ""
    id: str = ""
    safety: tuple[int, int] | None = None  # (chosen, rejected): +1 unsafe, -1 safe, 0 unlabelled (cost models)
    labels: dict[str, int] | None = None  # objective -> 1 chosen better, -1 rejected better, 0 no preference (multi-head RMs)


@dataclass(frozen=True)
class PromptExample:
    prompt: str | Messages  # messages end on a user turn
    loc: str
    meta: dict = field(default_factory=dict)


class TokenizedPair(NamedTuple):
    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens, ending with EOS unless truncated
    rejected_ids: list[int]
    margin: float | None = None
    safety: tuple[int, int] | None = None
    labels: dict[str, int] | None = None


@dataclass
class DataReport:
    """What happened to the data: nothing is dropped without being counted here."""

    n_read: int = 0  # records read from the files
    n_used: int = 0  # items produced (examples, pairs or prompts), after any skips
    skipped: dict[str, int] = field(default_factory=dict)  # bad records (or items), reason -> count
    truncated: int = 0  # items whose response was cut to data.max_length
    dropped: dict[str, int] = field(default_factory=dict)  # valid records that yield nothing, reason -> count
    noted: dict[str, int] = field(default_factory=dict)  # kept, but worth knowing (an empty response on one side)
    items: str = "examples"  # what n_used counts
    first_skipped: list[str] = field(default_factory=list)  # the first few "{loc}: {problem}" skipped

    def summary(self) -> str:
        unit = "" if self.items == "examples" else f" {self.items}"
        parts = [f"{self.n_read} records, {self.n_used}{unit} used"]
        for name, d in (("skipped", self.skipped), ("dropped", self.dropped), ("kept", self.noted)):
            if d:
                why = ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
                parts.append(f"{name} {sum(d.values())} ({why})")
        if self.truncated:
            parts.append(f"truncated {self.truncated}")
        return "; ".join(parts)


SKIP_HINT = " (data.on_bad_record=skip skips such records and counts them)"


class Sink:
    """Applies data.on_bad_record to bad records: raise DataError, or count the skip in the report."""

    def __init__(self, on_bad_record: str, report: DataReport):
        if on_bad_record not in ("error", "skip"):
            raise DataError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        self.mode = on_bad_record
        self.report = report
        self.n_skipped = 0

    def bad(self, loc: str, err: BadRecord) -> None:
        msg = f"{loc}: {err.problem}"
        if self.mode == "error":
            raise DataError(msg + SKIP_HINT)
        self.report.skipped[err.reason] = self.report.skipped.get(err.reason, 0) + 1
        if len(self.report.first_skipped) < 5:
            self.report.first_skipped.append(msg)
        self.n_skipped += 1

    def drop(self, reason: str, n: int = 1) -> None:
        self.report.dropped[reason] = self.report.dropped.get(reason, 0) + n

    def note(self, reason: str, n: int = 1) -> None:
        self.report.noted[reason] = self.report.noted.get(reason, 0) + n

    def announce(self, what: str) -> None:
        """Print one line when this call skipped anything (skip mode never hides what it skipped)."""
        if self.n_skipped:
            first = self.report.first_skipped[0] if self.report.first_skipped else ""
            print(f"tether.data: {what}: skipped {self.n_skipped} bad record(s); {self.report.summary()}; first: {first}", file=sys.stderr)


# -- Field validation shared by the adapters -------------------------------------------------------


def text_field(rec: dict, key: str, allow_empty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        raise BadRecord(f"field '{key}' is missing")
    v = rec[key]
    if not isinstance(v, str):
        raise BadRecord(f"field '{key}' must be a string, got {type(v).__name__}", f"field '{key}' has the wrong type")
    if not v.strip() and not allow_empty:
        raise BadRecord(f"field '{key}' is empty")
    return v


def messages_field(v: object, key: str) -> Messages:
    """Validate a list of {role, content} messages; returns clean copies with only those two keys."""
    if not isinstance(v, list):
        raise BadRecord(f"field '{key}' must be a list of messages, got {type(v).__name__}", f"field '{key}' has the wrong type")
    if not v:
        raise BadRecord(f"field '{key}' is empty")
    out: Messages = []
    for i, m in enumerate(v):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise BadRecord(f"{where} must be an object with 'role' and 'content', got {type(m).__name__}", f"{key} has the wrong type")
        for k in ("role", "content"):
            if k not in m or m[k] is None:
                raise BadRecord(f"field '{where}.{k}' is missing", f"field '{key}[].{k}' is missing")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise BadRecord(f"unknown role {role!r} in {where} (expected one of: {', '.join(ROLES)})", "unknown role")
        if not isinstance(content, str):
            raise BadRecord(f"field '{where}.content' must be a string, got {type(content).__name__}", f"field '{key}[].content' has the wrong type")
        if not content.strip():
            raise BadRecord(f"field '{where}.content' is empty", f"field '{key}[].content' is empty")
        out.append({"role": role, "content": content})
    return out


def text_or_messages(rec: dict, key: str, allow_empty: bool = False) -> str | Messages:
    if key not in rec or rec[key] is None:
        raise BadRecord(f"field '{key}' is missing")
    v = rec[key]
    if isinstance(v, str):
        return text_field(rec, key, allow_empty)
    if isinstance(v, list):
        return messages_field(v, key)
    raise BadRecord(f"field '{key}' must be a string or a list of messages, got {type(v).__name__}", f"field '{key}' has the wrong type")
