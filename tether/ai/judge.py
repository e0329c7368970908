"""Judging two responses against a principle, and labelling a file of pairs with it.

The judge is asked one question per (pair, principle, order): the principle's comparison question, the
prompt, "[Response A]", "[Response B]", then "Answer with a single letter: A or B." as a user turn, the
assistant turn opened (the model's chat template). Its answer is read from the next-token distribution,
never from generated text: P(A) = softmax over the option tokens' logits (each option's single-token
spellings, "A" and " A", pooled by logsumexp), so a small model still gives a probability.

Position bias: with both orders each pair is judged as (x, y) and as (y, x); P(x better) is the mean of
P(A | x first) and 1 - P(A | y first). A judge that prefers whichever response comes first gives 0.5 (a
tie) and a *flip*: the two orders disagree about which response wins. --on-flip tie turns every flip
into a tie; the default keeps the mean, whose confidence the disagreement has already lowered.

Principles: all (P averaged over every principle) or sample (one per item, drawn with the seed and the
item's id, so a rerun draws the same one).

A judge is any object with `identity` (a string) and `judge(comparisons) -> list[float | JudgeError]`
(P(first response better) per comparison, or the reason it failed): LocalJudge here, HttpJudge in
tether.ai.http.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from tether.ai.compare import OPTIONS, TEMPLATE, Comparison, JudgeError, Progress, Rating, as_text  # noqa: F401 (re-exported)
from tether.ai.constitution import Constitution, Principle


@dataclass
class Item:
    """Two responses to one prompt. `raw` keeps the prompt and responses as read (strings or message lists)
    so that the records written are the input's own texts; human = 0 or 1 when a record says which one a
    person chose (preference input: x is the chosen one), else None."""

    id: str
    raw: tuple[Any, Any, Any]  # (prompt, x, y)
    response_ids: tuple[Any, Any]
    human: int | None = None
    group: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def texts(self) -> tuple[str, str, str]:
        return tuple(as_text(v) for v in self.raw)  # type: ignore[return-value]


@dataclass
class Result:
    item: Item
    p: float | None = None  # P(x better than y)
    per_principle: dict[str, list[float]] = field(default_factory=dict)  # principle -> P(x better) per order
    flip: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def confidence(self) -> float | None:
        return None if self.p is None else max(self.p, 1 - self.p)

    @property
    def tie(self) -> bool:
        return self.p == 0.5


# -- Reading the input -----------------------------------------------------------------------------------


def _hash_id(*parts: Any) -> str:
    return "h" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_items(path: str | Path) -> list[Item]:
    """Preference records ({prompt, chosen, rejected} and every format `tether rm` reads; the order is
    ignored for judging, and chosen is kept as the human label) or the feedback app's task format
    ({prompt, responses: [...], id?, meta?}: every pair of responses, as a compare project imports them)."""
    from tether.data.records import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    first = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                first = json.loads(line)
            except json.JSONDecodeError:
                first = None
            break
    is_tasks = isinstance(first, dict) and "responses" in first and not {"ranking", "ranks", "scores"} & set(first)
    return _read_tasks(path) if is_tasks else _read_preferences(path)


def _read_tasks(path: Path) -> list[Item]:
    from tether.data.records import DataError

    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        loc = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{loc}: invalid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{loc}: each line must be a JSON object")
        prompt, responses = obj.get("prompt"), obj.get("responses")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{loc}: field 'prompt' must be a non-empty string")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise DataError(f"{loc}: field 'responses' must be a list of at least 2 strings")
        ext = str(obj.get("id") or _hash_id(prompt, responses))
        pairs = [(0, 1)] if len(responses) == 2 else list(combinations(range(len(responses)), 2))
        for i, j in pairs:
            eid = ext if len(responses) == 2 else f"{ext}#{i}-{j}"
            items.append(Item(eid, (prompt, responses[i], responses[j]), (i, j), None, ext, obj.get("meta") or {}))
    if not items:
        raise DataError(f"{path}: no tasks in file")
    return items


def _read_preferences(path: Path) -> list[Item]:
    from tether.data.formats import load_preferences
    from tether.data.records import DataError

    pairs, _ = load_preferences(str(path))
    if not pairs:
        raise DataError(f"{path}: no preference records in file")
    items, seen = [], set()
    for pr in pairs:
        pid = pr.id or _hash_id(pr.prompt, pr.chosen, pr.rejected)
        if pid in seen:  # a ranking's pairs share the record's id
            pid = f"{pid}#{len(seen)}"
        seen.add(pid)
        items.append(Item(pid, (pr.prompt, pr.chosen, pr.rejected), ("chosen", "rejected"), 0, pr.id or pid,
                          {"source": pr.source} if pr.source else {}))
    return items


# -- Labelling -------------------------------------------------------------------------------------------


def principles_for(item: Item, constitution: Constitution, mode: str, seed: int) -> list[Principle]:
    if mode == "all":
        return list(constitution.principles)
    if mode == "sample":
        return [random.Random(f"{seed}:{item.id}").choice(constitution.principles)]
    return [constitution.get(mode)]  # one principle by name


def label(items: list[Item], judge, constitution: Constitution, principles: str = "all", both_orders: bool = True,
          seed: int = 0, on_flip: str = "average") -> list[Result]:
    """Judge every item; P(x better) per principle is the order-debiased mean, then averaged over principles."""
    plan: list[tuple[int, str, bool]] = []  # (item index, principle, x shown first)
    comps: list[Comparison] = []
    for k, it in enumerate(items):
        prompt, x, y = it.texts
        for pr in principles_for(it, constitution, principles, seed):
            orders = [True, False] if both_orders else [random.Random(f"{seed}:order:{it.id}").random() < 0.5]
            for x_first in orders:
                plan.append((k, pr.name, x_first))
                comps.append(Comparison(prompt, x, y, pr) if x_first else Comparison(prompt, y, x, pr))
    answers = judge.judge(comps) if comps else []
    results = [Result(it) for it in items]
    for (k, name, x_first), ans in zip(plan, answers):
        r = results[k]
        if isinstance(ans, Exception):
            r.errors.append(f"{name} ({'x' if x_first else 'y'} first): {ans}")
            continue
        r.per_principle.setdefault(name, []).append(float(ans) if x_first else 1.0 - float(ans))
    for r in results:
        if r.errors:
            r.per_principle, r.p = {}, None
            continue
        ps = []
        for name, po in r.per_principle.items():
            flipped = len(po) == 2 and (po[0] - 0.5) * (po[1] - 0.5) < 0
            r.flip = r.flip or flipped
            ps.append(0.5 if flipped and on_flip == "tie" else sum(po) / len(po))
        r.p = sum(ps) / len(ps)
    return results


def to_record(r: Result, identity: str) -> dict | None:
    """A preference record in `tether label export`'s schema (None for a tie or an error)."""
    if r.p is None or r.tie:
        return None
    it = r.item
    prompt, x, y = it.raw
    x_wins = r.p > 0.5
    chosen, rejected = (x, y) if x_wins else (y, x)
    ids = list(it.response_ids) if x_wins else list(it.response_ids[::-1])
    return {
        "prompt": prompt, "chosen": chosen, "rejected": rejected, "id": f"ai/{it.id}", "source": f"tether-ai:{identity}",
        "meta": {"kind": "compare", "policy": "ai", "task": it.id, "group": it.group, "response_ids": ids,
                 "labeler": identity, "principles": sorted(r.per_principle), "confidence": round(r.confidence, 6),
                 "p_orders": {k: [round(v, 6) for v in vs] for k, vs in r.per_principle.items()}, "flip": r.flip,
                 **({"input_meta": it.meta} if it.meta else {})},
    }


# -- The local Hugging Face judge ------------------------------------------------------------------------


class LocalJudge:
    """A local causal LM: P(A) = softmax over the option tokens' logits at the answer position. Batched,
    left-padded (positions from the attention mask, so padding changes nothing)."""

    def __init__(self, model_dir: str, device: str = "auto", batch_size: int = 8, max_length: int = 2048, options=OPTIONS):
        from tether.models import load_causal_lm, load_tokenizer, resolve_device

        self.tok = load_tokenizer(model_dir)
        self.device = resolve_device(device)
        self.model = load_causal_lm(model_dir, self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.option_ids = [self._option_ids(o) for o in options]  # P(first option) is the answer
        if len({i for ids in self.option_ids for i in ids}) < sum(map(len, self.option_ids)):
            from tether.models import ModelError

            raise ModelError(f"{model_dir}: the options {options} share a first token in this tokenizer")
        self.identity = f"hf:{Path(model_dir).resolve().name}"
        self.n_truncated = 0

    def _option_ids(self, label: str | tuple[str, ...]) -> list[int]:
        spellings = (label,) if isinstance(label, str) else label
        enc = {v: self.tok(v, add_special_tokens=False)["input_ids"] for w in spellings for v in (w, " " + w)}
        ids = sorted({e[0] for e in enc.values() if len(e) == 1})
        if not ids and not isinstance(label, str):  # a word with no single-token spelling: its first token (not a bare space)
            ids = sorted({enc[w][0] for w in spellings if enc[w]})
        if not ids:
            from tether.models import ModelError

            raise ModelError(f"the tokenizer has no single token for the option {label!r}")
        return ids

    def encode(self, c: Comparison | Rating) -> list[int]:
        from tether.data import encode_prompt

        ids = encode_prompt(self.tok, c.messages())
        if len(ids) <= self.max_length:
            return ids
        # too long: shorten the responses (never the question or the answer instruction)
        self.n_truncated += 1
        rs = [self.tok(t, add_special_tokens=False)["input_ids"] for t in c.responses]
        keep = max(8, (self.max_length - (len(ids) - sum(map(len, rs)))) // len(rs))
        short = c.shortened([self.tok.decode(r[:keep]) for r in rs])
        return encode_prompt(self.tok, short.messages())[-self.max_length:]

    def judge(self, comps: list[Comparison] | list[Rating]) -> list[float]:
        import torch

        from tether.data import collate_prompts, pad_id
        from tether.models import position_ids_from_mask

        rows = [self.encode(c) for c in comps]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch
        out: list[float] = [0.0] * len(rows)
        progress = Progress(len(rows))
        with torch.no_grad():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                b = collate_prompts([rows[i] for i in idx], pad_id(self.tok))
                mask = b.attention_mask.to(self.device)
                logits = self.model(input_ids=b.input_ids.to(self.device), attention_mask=mask,
                                    position_ids=position_ids_from_mask(mask), use_cache=False).logits[:, -1].float()  # [B, V]
                opt = torch.stack([logits[:, ids].logsumexp(-1) for ids in self.option_ids], -1)  # [B, options]
                pa = torch.softmax(opt, -1)[:, 0].tolist()
                for i, p in zip(idx, pa):
                    out[i] = p
                progress.step(len(idx))
        return out


def make_judge(spec: str, **kw):
    """A URL (http:// or https://) -> HttpJudge; anything else is a local model folder -> LocalJudge."""
    if spec.startswith(("http://", "https://")):
        from tether.ai.http import HttpJudge

        return HttpJudge(spec, **{k: v for k, v in kw.items() if k in HttpJudge.OPTIONS})
    return LocalJudge(spec, **{k: v for k, v in kw.items() if k in ("device", "batch_size", "max_length", "options")})
