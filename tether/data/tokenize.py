"""Tokenisation (raw text or chat template), truncation, and collation into SFTBatch / PairBatch / PromptBatch.

Text vs chat
  String records are raw text: prompt tokens then completion tokens, no template. Message lists are
  rendered with the tokenizer's chat template when it has one and data.chat_template is auto/model, else
  (or with chat_template=plain) as "{system}\\n\\nHuman: {user}\\n\\nAssistant: {assistant}<eos>...".
Loss mask
  1 on completion tokens, and for conversations on every assistant turn: its content and the template's
  end-of-turn that follows (not the role header before it, nor user/system turns). The assistant spans
  are found by rendering each conversation prefix (with and without the generation prompt) and
  checking that it is a prefix of the full rendering; the text is then tokenised piece by piece, so that
  a prompt's ids are exactly those that generation will see (`encode_prompt`).
EOS
  Every completion / assistant turn / response ends with the EOS id, unless the text (or the template's
  end-of-turn) already ends with it.
Truncation
  A prompt over data.max_prompt_length tokens is a bad record (data.on_bad_record); prompt+response over
  data.max_length has its response cut (the EOS is lost, so the model does not learn to stop there) and
  is counted in report.truncated.
"""

from __future__ import annotations

from typing import Any

import torch

from tether.data.records import BadRecord, DataError, DataReport, Messages, PreferencePair, PromptExample, SFTExample, Sink, TokenizedPair
from tether.types import PairBatch, PromptBatch, SFTBatch

Piece = tuple[str, bool]  # (text, is_target)


def pad_id(tokenizer) -> int:
    """The pad token id, or the EOS id when the tokenizer has no pad token (masks make it harmless)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise DataError("the tokenizer has neither a pad token nor an EOS token")


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set one (the model must learn where a response ends)")
    return int(tokenizer.eos_token_id)


def _enc(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before raw text (a BOS for Llama-style tokenizers; nothing for GPT-2 style)."""
    with_sp = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = _enc(tokenizer, "a")
    for k in range(len(with_sp) - len(without) + 1):
        if with_sp[k: k + len(without)] == without:
            return with_sp[:k]
    return []


def use_template(tokenizer, chat_template: str = "auto") -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template == "plain":
        return False
    if chat_template == "model" and not has:
        raise DataError("data.chat_template=model but the tokenizer has no chat template (use auto or plain)")
    if chat_template not in ("auto", "model"):
        raise DataError(f"data.chat_template must be auto, model or plain; got {chat_template!r}")
    return has


# -- Rendering conversations into (text, is_target) pieces -----------------------------------------


def _plain_pieces(messages: Messages, add_generation_prompt: bool) -> list[Piece]:
    """'{system}\\n\\nHuman: ...\\n\\nAssistant: ...' (HH style). Target pieces get an EOS id after them."""
    pieces: list[Piece] = []
    text = ""
    for i, m in enumerate(messages):
        if m["role"] == "system":
            text += m["content"] if i == 0 else f"\n\n{m['content']}"
        elif m["role"] == "user":
            text += f"\n\nHuman: {m['content']}"
        else:
            pieces += [(text + "\n\nAssistant:", False), (" " + m["content"], True)]
            text = ""
    if add_generation_prompt:
        text += "\n\nAssistant:"
    return pieces + [(text, False)] if text else pieces


def _render(tokenizer, messages: Messages, gen: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # noqa: BLE001 - jinja raises many kinds (e.g. "roles must alternate")
        raise BadRecord(f"the chat template rejects this conversation ({e})", "chat template error") from None


def _template_pieces(tokenizer, messages: Messages) -> list[Piece]:
    full = _render(tokenizer, messages, False)
    eos_text = tokenizer.eos_token or ""
    pieces: list[Piece] = []
    cur = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        after = _render(tokenizer, messages[: i + 1], False).rstrip()
        if len(before) >= cur and len(after) > len(before) and full.startswith(before) and full.startswith(after):
            start, end = len(before), len(after)
        else:  # a template that renders prefixes differently: find the content itself
            content = m["content"].strip()
            start = full.find(content, cur)
            if start < 0:
                raise BadRecord(f"cannot find assistant turn {i} in the chat template's rendering", "chat template error")
            end = start + len(content)
            if eos_text and full.startswith(eos_text, end):
                end += len(eos_text)
        pieces += [(full[cur:start], False), (full[start:end], True)]
        cur = end
    return pieces + [(full[cur:], False)]


def encode_conversation(tokenizer, messages: Messages, chat_template: str = "auto", response_turn: int = 0) -> tuple[list[int], list[int], int]:
    """(ids, loss_mask, n_prompt): n_prompt = tokens before assistant turn number `response_turn`
    (0 = the first; a preference pair whose prompt already holds k assistant turns passes k, so the
    earlier turns stay in the prompt). Text after the last assistant turn (a template's trailing
    newline) is dropped: it is never a target."""
    template = use_template(tokenizer, chat_template)
    eos = _eos(tokenizer)
    pieces = _template_pieces(tokenizer, messages) if template else _plain_pieces(messages, False)
    ids: list[int] = [] if template else _special_prefix(tokenizer)
    mask: list[int] = [0] * len(ids)
    n_prompt = -1
    turn = 0
    for text, target in pieces:
        t = _enc(tokenizer, text)
        if target:
            if n_prompt < 0 and turn == response_turn:
                n_prompt = len(ids)
            turn += 1
            if not t or t[-1] != eos:
                t.append(eos)
        ids += t
        mask += [int(target)] * len(t)
    if n_prompt < 0:
        raise BadRecord("the conversation has no assistant turn")
    last = len(mask) - mask[::-1].index(1)
    return ids[:last], mask[:last], n_prompt


def render_prompt(tokenizer, prompt: str | Messages, chat_template: str = "auto") -> str:
    """A prompt as text: a string as is; messages templated with the generation prompt (plain format:
    ending in '\\n\\nAssistant:', with the EOS token text after earlier assistant turns)."""
    if isinstance(prompt, str):
        return prompt
    if use_template(tokenizer, chat_template):
        return _render(tokenizer, prompt, True)
    eos_text = tokenizer.eos_token or ""
    return "".join(t + (eos_text if target else "") for t, target in _plain_pieces(prompt, True))


def encode_prompt(tokenizer, prompt: str | Messages, chat_template: str = "auto") -> list[int]:
    """Token ids of a prompt exactly as training sees them before the response."""
    if isinstance(prompt, str):
        return _special_prefix(tokenizer) + _enc(tokenizer, prompt)
    if use_template(tokenizer, chat_template):
        return _enc(tokenizer, _render(tokenizer, prompt, True))
    eos = _eos(tokenizer)
    ids = _special_prefix(tokenizer)
    for text, target in _plain_pieces(prompt, True):
        ids += _enc(tokenizer, text) + ([eos] if target else [])
    return ids


def prompt_text(prompt: str | Messages) -> str:
    """A human-readable prompt (PromptBatch.prompts): a string as is, messages in the plain format."""
    if isinstance(prompt, str):
        return prompt
    return "".join(t for t, _ in _plain_pieces(prompt, False)).strip("\n")


# -- Tokenise with length checks -------------------------------------------------------------------


def _check_prompt(n: int, cfg) -> None:
    if n > cfg.max_prompt_length:
        raise BadRecord(f"prompt is {n} tokens, longer than data.max_prompt_length={cfg.max_prompt_length}",
                        "prompt longer than data.max_prompt_length")
    if n >= cfg.max_length:
        raise BadRecord(f"no room for a response: prompt is {n} tokens and data.max_length={cfg.max_length}",
                        "no room for a response")


def _each(items: list, cfg, report: DataReport | None, kept: list[int] | None, unit: str, what: str, encode) -> list:
    """encode(item, report) for each item; a bad one (BadRecord) goes to data.on_bad_record and is taken
    out of report.n_used. `kept`, if given, receives the indices of the items kept."""
    if report is None:
        report = DataReport(n_read=len(items), n_used=len(items), items=unit)
    sink, out = Sink(cfg.on_bad_record, report), []
    for idx, item in enumerate(items):
        try:
            out.append(encode(item, report))
        except BadRecord as e:
            sink.bad(item.loc, e)  # raises in error mode
            report.n_used -= 1
            continue
        if kept is not None:
            kept.append(idx)
    sink.announce(what)
    return out


def tokenize_sft(examples: list[SFTExample], tokenizer, cfg, report: DataReport | None = None,
                 kept: list[int] | None = None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) per example. `kept`, if given, receives the indices of the examples kept."""
    eos = _eos(tokenizer)

    def encode(ex: SFTExample, report: DataReport) -> tuple[list[int], list[int]]:
        if ex.messages is not None:
            ids, mask, n_prompt = encode_conversation(tokenizer, ex.messages, cfg.chat_template)
        else:
            p = _special_prefix(tokenizer) + _enc(tokenizer, ex.prompt or "")
            c = _enc(tokenizer, ex.completion or "")
            if not c or c[-1] != eos:
                c.append(eos)
            ids, mask, n_prompt = p + c, [0] * len(p) + [1] * len(c), len(p)
        _check_prompt(n_prompt, cfg)
        if len(ids) > cfg.max_length:
            ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
            report.truncated += 1
        return ids, mask

    return _each(examples, cfg, report, kept, "examples", "tokenize_sft", encode)


def _pair_ids(tokenizer, pair: PreferencePair, chat_template: str) -> tuple[list[int], list[int], list[int]]:
    if isinstance(pair.prompt, str):
        eos = _eos(tokenizer)
        resp = []
        for r in (pair.chosen, pair.rejected):
            t = _enc(tokenizer, r)
            resp.append(t if t and t[-1] == eos else t + [eos])
        return _special_prefix(tokenizer) + _enc(tokenizer, pair.prompt), resp[0], resp[1]
    prompts, resp = [], []
    earlier_turns = sum(m["role"] == "assistant" for m in pair.prompt)  # they belong to the prompt
    for r in (pair.chosen, pair.rejected):
        ids, _, n = encode_conversation(tokenizer, pair.prompt + r, chat_template, response_turn=earlier_turns)
        prompts.append(ids[:n])
        resp.append(ids[n:])
    if prompts[0] != prompts[1]:
        raise BadRecord("the chat template renders the prompt differently before 'chosen' and 'rejected'", "chat template error")
    return prompts[0], resp[0], resp[1]


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, cfg, report: DataReport | None = None,
                   kept: list[int] | None = None) -> list[TokenizedPair]:
    def encode(pair: PreferencePair, report: DataReport) -> TokenizedPair:
        p, c, r = _pair_ids(tokenizer, pair, cfg.chat_template)
        _check_prompt(len(p), cfg)
        room = cfg.max_length - len(p)
        if len(c) > room or len(r) > room:
            c, r = c[:room], r[:room]
            report.truncated += 1
        return TokenizedPair(p, c, r, pair.margin, pair.safety, pair.labels)

    return _each(pairs, cfg, report, kept, "pairs", "tokenize_pairs", encode)


def tokenize_prompts(prompts: list[PromptExample], tokenizer, cfg, report: DataReport | None = None,
                     kept: list[int] | None = None) -> list[list[int]]:
    def encode(ex: PromptExample, report: DataReport) -> list[int]:
        ids = encode_prompt(tokenizer, ex.prompt, cfg.chat_template)
        _check_prompt(len(ids), cfg)
        return ids

    return _each(prompts, cfg, report, kept, "prompts", "tokenize_prompts", encode)


# -- Collate ---------------------------------------------------------------------------------------


def _right_pad(seqs: list[list[int]], value: int, dtype=torch.long) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=dtype).reshape(len(seqs), width)


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit packing: rows of item indices, each row's total length <= max_length, items in order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"item {i} has {n} tokens, more than the packing length {max_length}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def collate_sft(items: list[tuple[list[int], list[int]]], pad: int, packing: bool = False, max_length: int = 0) -> SFTBatch:
    """Right-padded SFTBatch. With packing, examples are packed into rows of at most max_length tokens
    (B = number of rows, which may be fewer than len(items)); position_ids restart at 0 per example."""
    if not packing:
        ids = _right_pad([i for i, _ in items], pad)
        return SFTBatch(
            input_ids=ids,  # [B, T]
            attention_mask=_right_pad([[1] * len(i) for i, _ in items], 0),  # [B, T]
            loss_mask=_right_pad([m for _, m in items], 0, torch.float),  # [B, T]
        )
    width = max_length or max(len(i) for i, _ in items)
    rows = pack_rows([len(i) for i, _ in items], width)
    r_ids, r_mask, r_pos = [], [], []
    for row in rows:
        ids, mask, pos = [], [], []
        for i in row:
            t, m = items[i]
            ids += t
            mask += m
            pos += range(len(t))
        r_ids.append(ids), r_mask.append(mask), r_pos.append(pos)
    return SFTBatch(
        input_ids=_right_pad(r_ids, pad),  # [B, T], T <= max_length
        attention_mask=_right_pad([[1] * len(s) for s in r_ids], 0),  # [B, T]
        loss_mask=_right_pad(r_mask, 0, torch.float),  # [B, T]
        position_ids=_right_pad(r_pos, 0),  # [B, T]
    )


def collate_pairs(items: list[TokenizedPair], pad: int, heads: tuple[str, ...] = ()) -> PairBatch:
    """prompt+chosen and prompt+rejected, right-padded; loss masks on the response tokens. margin is a
    [B] tensor when any pair has one (missing margins are 0), else None. With heads, labels is [B, K]:
    each pair's label for each named objective (0 where it has none)."""
    fields: dict[str, Any] = {}
    for side in ("chosen", "rejected"):
        seqs = [it.prompt_ids + getattr(it, f"{side}_ids") for it in items]
        masks = [[0] * len(it.prompt_ids) + [1] * len(getattr(it, f"{side}_ids")) for it in items]
        fields[f"{side}_input_ids"] = _right_pad(seqs, pad)  # [B, T]
        fields[f"{side}_attention_mask"] = _right_pad([[1] * len(s) for s in seqs], 0)  # [B, T]
        fields[f"{side}_loss_mask"] = _right_pad(masks, 0, torch.float)  # [B, T]
    margins = [it.margin for it in items]
    margin = None if all(m is None for m in margins) else torch.tensor([m or 0.0 for m in margins], dtype=torch.float)  # [B]
    safety = None if all(it.safety is None for it in items) else torch.tensor([it.safety or (0, 0) for it in items], dtype=torch.float)  # [B, 2]
    labels = torch.tensor([[(it.labels or {}).get(h, 0) for h in heads] for it in items], dtype=torch.float) if heads else None  # [B, K]
    return PairBatch(**fields, margin=margin, safety=safety, labels=labels, prompt_len=[len(it.prompt_ids) for it in items])


def collate_prompts(items: list[list[int]], pad: int, texts: list[str] | None = None, fields: list[dict] | None = None) -> PromptBatch:
    """LEFT-padded prompts, so that generation appends at a common column. Rows holding the same prompt
    (RL samples, best-of-N) share a group id, so that the sampler and packed passes compute it once."""
    same: dict = {}
    width = max((len(s) for s in items), default=0)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in items], dtype=torch.long).reshape(len(items), width)  # [B, P]
    att = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in items], dtype=torch.long).reshape(len(items), width)  # [B, P]
    return PromptBatch(input_ids=ids, attention_mask=att, prompts=list(texts) if texts is not None else [],
                       group_ids=[same.setdefault(tuple(s), len(same)) for s in items], fields=list(fields or []))
