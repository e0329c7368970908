"""Format adapters: records -> SFTExample, PreferencePair, PromptExample. Every record kind is detected
from its keys, so one file (or a ','-joined list of files) may mix kinds.

SFT records
  {prompt, completion}   raw text, concatenated as is (no template); loss on the completion
  {messages}             a conversation; loss on every assistant turn
  {text}                 raw text with an empty prompt; loss on all of it (language-model style)

Unpaired records (`tether kto`): any SFT record above with label = true (a desirable completion) or
false (an undesirable one), e.g. {prompt, completion, label}; for {messages}, the completion is
everything from the first assistant turn on.

Preference records (optional keys everywhere: id, source, meta, margin = preference strength;
chosen_safe / rejected_safe = true or false, each response's safety label for a cost model, where
`chosen` is the safer response: `tether rm loss=cost`; labels = {name: 1 | -1 | 0}, the pair judged on
several objectives for a multi-head reward model (`tether rm heads=[...]`): 1 = chosen is better on that
objective, -1 = rejected is, 0 = no preference)
  {prompt, chosen, rejected}  each a string or a message list. If any is a message list, all become
        message lists: a string prompt becomes one user turn, a string response one assistant turn, and
        a response list that repeats the prompt messages first has them removed.
  {chosen, rejected}     full transcripts without a prompt:
        - strings in Anthropic HH-RLHF style ("\\n\\nHuman: ...\\n\\nAssistant: ..."): the prompt is the
          longest common prefix of the two texts that ends with "\\n\\nAssistant:", the responses are the
          rest. When the texts diverge before the last Assistant turn, the responses are the whole
          differing continuations (they then contain later Human turns); a pair whose common prefix has
          no "\\n\\nAssistant:" is a bad record.
        - message lists: the prompt is the longest common run of leading messages; the rest of each
          must start with an assistant turn.
  {prompt, responses, ranking}  `ranking` lists response indices best first, each index once; the
        K responses give all K(K-1)/2 pairs, ordered (ranking[0] > ranking[1]), (ranking[0] >
        ranking[2]), ..., (ranking[1] > ranking[2]), ...
  {prompt, responses, ranks}    ranks[i] is response i's rank, lower is better (OASST style); equal ranks
        are ties and make no pair. Pairs come in the same best-first order as for `ranking`.
  {prompt, responses, scores}   scores[i] is response i's score, higher is better; equal scores are ties.
  {prompt, response, rating}    grouped by (identical) prompt across all files of the spec: every two
        responses with different ratings make a pair, the higher rating preferred; equal ratings are
        ties and make no pair. A rating with nothing to pair against is counted in report.dropped.

Prompt records (for PPO / generation)
  {prompt} (string or messages ending on a user turn), {messages} (trailing assistant turns are
  removed), {question} (GSM8K's {question, answer}), any preference or SFT record above (its prompt), or
  a .txt file with one prompt per line. The record's other keys are kept (PromptExample.meta) and reach
  reward functions (a reference answer: tether.rewards).
  Prompts taken from preference records are de-duplicated (counted in report.dropped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from typing import Any

from tether.data.readers import iter_records
from tether.data.records import (BadRecord, DataReport, Messages, PreferencePair, PromptExample, SFTExample, Sink, messages_field, text_field,
                                  text_or_messages)

ASSISTANT_MARK = "\n\nAssistant:"


def _keys(rec: dict) -> str:
    return "[" + ", ".join(sorted(map(str, rec))) + "]"


def _prompt_key(prompt) -> str:
    """A prompt (text or messages) as a key that is equal for equal prompts."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


# -- SFT -------------------------------------------------------------------------------------------


def parse_sft(rec: dict, loc: str) -> SFTExample:
    if "messages" in rec and rec["messages"] is not None:
        msgs = messages_field(rec["messages"], "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise BadRecord("messages has no assistant turn to learn from")
        return SFTExample(None, None, msgs, loc)
    if "text" in rec and rec.get("prompt") is None and rec.get("completion") is None:
        return SFTExample("", text_field(rec, "text"), None, loc)
    if "prompt" in rec or "completion" in rec:
        prompt = text_or_messages(rec, "prompt")
        completion = text_or_messages(rec, "completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return SFTExample(prompt, completion, None, loc)
        p, c, _ = _as_messages(prompt, completion, completion, ("prompt", "completion", "completion"))
        return SFTExample(None, None, p + c, loc)
    raise BadRecord(f"unrecognised record: expected keys {{prompt, completion}}, {{messages}} or {{text}}; got keys {_keys(rec)}",
                    "unrecognised record")


def parse_kto(rec: dict, loc: str) -> SFTExample:
    ex = parse_sft(rec, loc)
    label = rec.get("label")
    if not isinstance(label, bool):
        raise BadRecord("field 'label' is missing (true = desirable, false = undesirable)" if label is None else
                        f"field 'label' must be true or false, got {label!r}", "field 'label' is missing or not true/false")
    return dataclasses.replace(ex, label=label)


def load_kto(spec: str, on_bad_record: str = "error") -> tuple[list[SFTExample], DataReport]:
    sink = Sink(on_bad_record, DataReport())
    return _finish([ex for _, ex in parsed(spec, sink, parse_kto)], sink, spec)


def parsed(spec: str, sink: Sink, parse, **kw):
    """(loc, parse(record, loc)) for each record of `spec`; a bad one goes to the sink (raise, or count)."""
    for loc, rec, err in iter_records(spec, **kw):
        sink.report.n_read += 1
        try:
            if err is not None:
                raise err
            got = parse(rec, loc)
        except BadRecord as e:
            sink.bad(loc, e)
            continue
        yield loc, got


def _finish(out: list, sink: Sink, spec: str) -> tuple[list, DataReport]:
    sink.report.n_used = len(out)
    sink.announce(spec)
    return out, sink.report


def load_sft(spec: str, on_bad_record: str = "error") -> tuple[list[SFTExample], DataReport]:
    sink = Sink(on_bad_record, DataReport())
    return _finish([ex for _, ex in parsed(spec, sink, parse_sft)], sink, spec)


# -- Preferences -----------------------------------------------------------------------------------


def _as_messages(prompt, chosen, rejected, names=("prompt", "chosen", "rejected")) -> tuple[Messages, Messages, Messages]:
    p = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if p[-1]["role"] == "assistant":
        raise BadRecord(f"'{names[0]}' must end on a user turn, not an assistant turn")
    outs = []
    for name, r in zip(names[1:], (chosen, rejected)):
        r = [{"role": "assistant", "content": r}] if isinstance(r, str) else r
        if len(r) > len(p) and r[: len(p)] == p:  # a full conversation that repeats the prompt
            r = r[len(p):]
        if r[0]["role"] != "assistant":
            raise BadRecord(f"'{name}' must start with an assistant turn, got {r[0]['role']!r}", f"'{name}' must start with an assistant turn")
        outs.append(r)
    return p, outs[0], outs[1]


def _same(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF style: (prompt ending in '\\n\\nAssistant:', chosen response, rejected response)."""
    n = len(os.path.commonprefix([chosen, rejected]))  # character by character
    cut = chosen.rfind(ASSISTANT_MARK, 0, n)  # the marker must lie inside the common prefix
    if cut < 0:
        raise BadRecord("'chosen' and 'rejected' share no prompt ending in '\\n\\nAssistant:' (give a 'prompt' field)",
                        "no shared prompt in transcripts")
    end = cut + len(ASSISTANT_MARK)
    # One empty reply is a real judgment (saying nothing was preferred to a harmful answer, ~1 in 500
    # HH-RLHF records); two empty replies compare nothing.
    return chosen[:end], chosen[end:], rejected[end:]


def _split_message_transcripts(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise BadRecord("'chosen' and 'rejected' share no leading messages (give a 'prompt' field)", "no shared prompt in transcripts")
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if len(v) == n:
            raise BadRecord(f"field '{name}' has no response after the shared prompt", f"field '{name}' has an empty response")
    return _as_messages(chosen[:n], chosen[n:], rejected[n:])


def _extras(rec: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = rec.get("margin")
    if m is not None:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise BadRecord(f"field 'margin' must be a finite number, got {m!r}", "field 'margin' is not a number")
        out["margin"] = float(m)
    for k in ("id", "source"):
        if rec.get(k) is not None:
            out[k] = str(rec[k])
    if rec.get("chosen_safe") is not None or rec.get("rejected_safe") is not None:
        flags = []
        for k in ("chosen_safe", "rejected_safe"):
            v = rec.get(k)
            if v is not None and not isinstance(v, bool):
                raise BadRecord(f"field '{k}' must be true, false or absent, got {v!r}", f"field '{k}' is not a boolean")
            flags.append(0 if v is None else -1 if v else 1)
        if flags == [1, -1]:
            raise BadRecord("'chosen' is the safer response, but chosen_safe is false and rejected_safe true", "safety labels contradict the order")
        out["safety"] = tuple(flags)
    if rec.get("labels") is not None:
        labels = rec["labels"]
        if not isinstance(labels, dict) or not labels:
            raise BadRecord(f"field 'labels' must be an object {{objective: 1 | -1 | 0}}, got {labels!r}", "field 'labels' is not an object")
        for k, v in labels.items():
            if isinstance(v, bool) or v not in (1, -1, 0):
                raise BadRecord(f"labels[{k!r}] must be 1 (chosen better), -1 (rejected better) or 0 (no preference), got {v!r}",
                                "a label is not 1, -1 or 0")
        out["labels"] = {str(k): int(v) for k, v in labels.items()}
    return out


def make_pair(prompt, chosen, rejected, loc: str, **extras) -> PreferencePair:
    if all(isinstance(v, str) and not v.strip() for v in (chosen, rejected)):
        raise BadRecord("'chosen' and 'rejected' are both empty responses", "both responses empty")
    if _same(chosen, rejected):
        raise BadRecord("'chosen' and 'rejected' are identical")
    if not (isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str)):
        prompt, chosen, rejected = _as_messages(prompt, chosen, rejected)
    return PreferencePair(prompt, chosen, rejected, loc, **extras)


def _number_list(rec: dict, key: str, k: int) -> list[float]:
    v = rec[key]
    if not isinstance(v, list) or len(v) != k or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise BadRecord(f"field '{key}' must be a list of {k} numbers (one per response), got {v!r}", f"field '{key}' is malformed")
    return [float(x) for x in v]


def _ranked_pairs(rec: dict, loc: str, extras: dict) -> list[PreferencePair]:
    prompt = text_or_messages(rec, "prompt")
    resp = rec["responses"]
    if not isinstance(resp, list):
        raise BadRecord(f"field 'responses' must be a list, got {type(resp).__name__}", "field 'responses' has the wrong type")
    k = len(resp)
    if k < 2:
        raise BadRecord(f"field 'responses' needs at least 2 responses, got {k}")
    responses = [text_or_messages({f"responses[{i}]": r}, f"responses[{i}]") for i, r in enumerate(resp)]
    if rec.get("ranking") is not None:
        order = rec["ranking"]
        if not isinstance(order, list) or sorted(order) != list(range(k)) or any(isinstance(x, bool) for x in order):
            raise BadRecord(f"field 'ranking' must list each response index 0..{k - 1} once, best first; got {order!r}",
                            "field 'ranking' is malformed")
        better = {i: -pos for pos, i in enumerate(order)}  # higher = better
    elif rec.get("ranks") is not None:
        better = {i: -r for i, r in enumerate(_number_list(rec, "ranks", k))}
        order = sorted(range(k), key=lambda i: -better[i])
    else:
        better = dict(enumerate(_number_list(rec, "scores", k)))
        order = sorted(range(k), key=lambda i: -better[i])
    pairs = []
    for a in range(k):
        for b in range(a + 1, k):
            i, j = order[a], order[b]
            if better[i] == better[j]:
                continue  # a tie makes no pair
            if _same(responses[i], responses[j]):
                raise BadRecord(f"responses[{i}] and responses[{j}] are identical but ranked differently", "ranked responses are identical")
            pairs.append(make_pair(prompt, responses[i], responses[j], loc, **extras))
    return pairs


PREF_KEYS = ("expected keys {prompt, chosen, rejected}, {chosen, rejected} (full transcripts), "
             "{prompt, responses, ranking|ranks|scores} or {prompt, response, rating}")


def parse_preference(rec: dict, loc: str) -> list[PreferencePair] | tuple[Any, ...]:
    """Pairs from one record; a rating record returns (group key, prompt, response, rating, extras)."""
    extras = _extras(rec)
    if "chosen" in rec or "rejected" in rec:
        chosen = text_or_messages(rec, "chosen", allow_empty=True)
        rejected = text_or_messages(rec, "rejected", allow_empty=True)
        if rec.get("prompt") is not None:
            return [make_pair(text_or_messages(rec, "prompt"), chosen, rejected, loc, **extras)]
        if _same(chosen, rejected):
            raise BadRecord("'chosen' and 'rejected' are identical")
        if isinstance(chosen, str) and isinstance(rejected, str):
            return [make_pair(*split_transcripts(chosen, rejected), loc, **extras)]
        if isinstance(chosen, list) and isinstance(rejected, list):
            return [make_pair(*_split_message_transcripts(chosen, rejected), loc, **extras)]
        raise BadRecord("'chosen' and 'rejected' must both be strings or both message lists when there is no 'prompt'",
                        "'chosen' and 'rejected' have different types")
    if "safety" in extras:
        raise BadRecord("fields 'chosen_safe' / 'rejected_safe' belong to a record with 'chosen' and 'rejected'", "safety labels without chosen/rejected")
    if "labels" in extras:
        raise BadRecord("field 'labels' belongs to a record with 'chosen' and 'rejected'", "labels without chosen/rejected")
    if "responses" in rec:
        if all(rec.get(k) is None for k in ("ranking", "ranks", "scores")):
            raise BadRecord("field 'ranking' is missing (or give 'ranks' or 'scores')", "field 'ranking' is missing")
        return _ranked_pairs(rec, loc, extras)
    if "rating" in rec or "response" in rec:
        prompt = text_or_messages(rec, "prompt")
        response = text_or_messages(rec, "response")
        rating = rec.get("rating")
        if rating is None:
            raise BadRecord("field 'rating' is missing")
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
            raise BadRecord(f"field 'rating' must be a number, got {rating!r}", "field 'rating' is not a number")
        return (_prompt_key(prompt), prompt, response, float(rating), extras, loc)
    raise BadRecord(f"unrecognised record: {PREF_KEYS}; got keys {_keys(rec)}", "unrecognised record")


def _rating_pairs(ratings: list[tuple], sink: Sink) -> list[PreferencePair]:
    groups: dict[str, list[tuple]] = {}
    for r in ratings:
        groups.setdefault(r[0], []).append(r)
    pairs: list[PreferencePair] = []
    for group in groups.values():
        group = sorted(group, key=lambda r: -r[3])  # stable: file order within equal ratings
        paired = [False] * len(group)
        for a in range(len(group)):
            for b in range(a + 1, len(group)):
                ga, gb = group[a], group[b]
                if ga[3] == gb[3]:
                    continue  # a tie makes no pair
                if _same(ga[2], gb[2]):
                    sink.drop("same response rated differently")
                    continue
                extras = {k: v for k, v in ga[4].items() if k != "margin"}
                pairs.append(make_pair(ga[1], ga[2], gb[2], f"{ga[5]} vs {gb[5]}", **extras))
                paired[a] = paired[b] = True
        if not all(paired):
            sink.drop("rating with no differently rated response to the same prompt", paired.count(False))
    return pairs


def load_preferences(spec: str, on_bad_record: str = "error") -> tuple[list[PreferencePair], DataReport]:
    sink = Sink(on_bad_record, DataReport(items="pairs"))
    pairs: list[PreferencePair] = []
    ratings: list[tuple] = []
    for _, got in parsed(spec, sink, parse_preference):
        if isinstance(got, tuple):
            ratings.append(got)
        elif got:
            pairs.extend(got)
            if n_empty := sum(isinstance(v, str) and not v.strip() for p in got for v in (p.chosen, p.rejected)):
                sink.note("an empty response on one side", n_empty)
        else:
            sink.drop("all ranked responses tied")
    pairs.extend(_rating_pairs(ratings, sink))
    return _finish(pairs, sink, spec)


# -- Prompts ---------------------------------------------------------------------------------------


def parse_prompt(rec: dict, loc: str) -> tuple[PromptExample, bool]:
    """(prompt, taken_from_a_pair_record). Other keys of the record go to meta (e.g. a reference answer)."""
    meta = dict(rec["meta"]) if isinstance(rec.get("meta"), dict) else {}
    derived, key = False, "question" if rec.get("prompt") is None and rec.get("question") is not None else "prompt"  # GSM8K: {question, answer}
    if rec.get("messages") is not None and rec.get(key) is None:
        msgs = messages_field(rec["messages"], "messages")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not msgs or msgs[-1]["role"] != "user":
            raise BadRecord("messages has no user turn to answer")
        prompt: str | Messages = msgs
    elif rec.get(key) is not None:
        prompt = text_or_messages(rec, key)
        if isinstance(prompt, list) and prompt[-1]["role"] != "user":
            raise BadRecord(f"'prompt' must end on a user turn, not {prompt[-1]['role']!r}", "'prompt' must end on a user turn")
        derived = any(k in rec for k in ("chosen", "responses", "response"))
    elif "chosen" in rec or "rejected" in rec:
        prompt = parse_preference(rec, loc)[0].prompt
        derived = True
    else:
        raise BadRecord(f"unrecognised record: expected keys {{prompt}}, {{messages}}, {{question}} or a preference or SFT record; got keys {_keys(rec)}",
                        "unrecognised record")
    for k, v in rec.items():
        if k not in ("prompt", "messages", "meta", key):
            meta.setdefault(k, v)
    return PromptExample(prompt, loc, meta), derived


def load_prompts(spec: str, on_bad_record: str = "error") -> tuple[list[PromptExample], DataReport]:
    sink = Sink(on_bad_record, DataReport(items="prompts"))
    out: list[PromptExample] = []
    seen: set[str] = set()
    for _, (ex, derived) in parsed(spec, sink, parse_prompt, allow_txt=True):
        if derived:  # many pairs share a prompt; RL should see each once
            if (key := _prompt_key(ex.prompt)) in seen:
                sink.drop("duplicate prompt from a preference file")
                continue
            seen.add(key)
        out.append(ex)
    return _finish(out, sink, spec)


# -- Eval split ------------------------------------------------------------------------------------


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval), deterministic in `seed`; both keep the input order. About `fraction` of the items go to
    eval (at least one when fraction > 0 and there are two or more items). Preference pairs that share a
    prompt are kept on the same side, so that eval prompts are unseen in training."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    n = len(items)
    if fraction == 0.0 or n < 2:
        return list(items), []
    groups: dict[Any, list[int]] = {}
    for i, it in enumerate(items):
        # pairs from one ranking share a prompt: keep them on one side
        groups.setdefault(("key", _prompt_key(it.prompt)) if isinstance(it, PreferencePair) else ("item", i), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target = max(1, round(n * fraction))
    chosen: set[int] = set()
    for k in keys:
        if len(chosen) >= target:
            break
        if len(chosen) + len(groups[k]) >= n:
            continue  # never move everything to eval
        chosen.update(groups[k])
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]
