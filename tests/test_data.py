"""The data layer: readers, format adapters, bad records with their location, tokenisation, collation."""

from __future__ import annotations

import dataclasses
import gzip
import json

import pytest
import torch

from helpers import make_tokenizer, write_jsonl
from tether.data.records import SKIP_HINT
from tether.config import DataConfig
from tether.data import (
    DataError,
    DataReport,
    PreferencePair,
    PromptExample,
    SFTExample,
    collate_pairs,
    collate_prompts,
    collate_sft,
    encode_prompt,
    load_preferences,
    load_prompts,
    load_sft,
    pad_id,
    render_prompt,
    split_eval,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_sft,
)

CFG = DataConfig(max_length=128, max_prompt_length=64)
U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return make_tokenizer(chat_template=True)


def cfg(**kw) -> DataConfig:
    return dataclasses.replace(CFG, **kw)


def masked_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


def unmasked_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if not m])


# ----------------------------------------------------------------------------------------------
# Readers


PAIRS = [
    {"prompt": "tell me a story", "chosen": " the cat was happy", "rejected": " no"},
    {"prompt": "write a poem", "chosen": " red blue green", "rejected": " the dog"},
]


def test_jsonl_json_gz_and_comma_joined(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", PAIRS)
    (tmp_path / "b.json").write_text(json.dumps(PAIRS))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in PAIRS))
    with gzip.open(tmp_path / "d.json.gz", "wt") as f:
        f.write(json.dumps(PAIRS))
    for name in ("a.jsonl", "b.json", "c.jsonl.gz", "d.json.gz"):
        pairs, report = load_preferences(str(tmp_path / name))
        assert [p.chosen for p in pairs] == [" the cat was happy", " red blue green"]
        assert (report.n_read, report.n_used) == (2, 2)
    locs = [p.loc for p in load_preferences(str(tmp_path / "a.jsonl"))[0]]
    assert locs == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:2"]
    assert [p.loc for p in load_preferences(str(tmp_path / "b.json"))[0]] == [f"{tmp_path}/b.json[0]", f"{tmp_path}/b.json[1]"]
    spec = ",".join(str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.jsonl.gz"))
    pairs, report = load_preferences(spec)
    assert len(pairs) == 6 and report.n_read == 6


def test_blank_lines_bom_and_json_named_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(PAIRS[0]).encode() + b"\n\n  \n" + json.dumps(PAIRS[1]).encode() + b"\n")
    pairs, _ = load_preferences(str(p))
    assert [x.loc.rsplit(":", 1)[1] for x in pairs] == ["1", "4"]
    q = tmp_path / "lines.json"  # JSONL content under a .json name is read line by line
    write_jsonl(q, PAIRS)
    assert len(load_preferences(str(q))[0]) == 2


def test_hf_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "ds"))
    pairs, report = load_preferences(str(tmp_path / "ds"))
    assert [p.rejected for p in pairs] == [" no", " the dog"] and report.n_read == 2
    assert pairs[1].loc == f"{tmp_path}/ds[1]"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_preferences(str(tmp_path / "dd"))[0]) == 2
    bad = [PAIRS[0], {"prompt": "x", "chosen": "", "rejected": " "}]
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"^" + str(tmp_path) + r"/bad\[1\]: 'chosen' and 'rejected' are both empty responses \(data.on_bad_record=skip"):
        load_preferences(str(tmp_path / "bad"))


def test_missing_datasets_package(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "ds").mkdir()
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match="pip install datasets"):
        load_preferences(str(tmp_path / "ds"))


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_sft(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_sft(str(tmp_path / "x.csv"))
    (tmp_path / "broken.json").write_text('[{"prompt": "a",\n "completion": }]')
    with pytest.raises(DataError, match=r"broken\.json:2: invalid JSON \(Expecting value at column 16\)$"):
        load_sft(str(tmp_path / "broken.json"))
    with pytest.raises(DataError, match="no data file given"):
        load_sft("")


# ----------------------------------------------------------------------------------------------
# SFT and preference formats


def test_sft_formats(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "hello", "completion": " world"},
        {"messages": [S("be nice"), U("hello"), A("yes")]},
        {"text": "the movie was good"},
    ])
    ex, report = load_sft(str(p))
    assert ex[0] == SFTExample("hello", " world", None, f"{p}:1")
    assert ex[1].messages == [S("be nice"), U("hello"), A("yes")] and ex[1].prompt is None
    assert (ex[2].prompt, ex[2].completion) == ("", "the movie was good")
    assert report.summary() == "3 records, 3 used"


def test_preference_formats_and_extra_keys(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [
        # what the annotation app exports
        {"prompt": "hello", "chosen": " yes", "rejected": " no", "id": 7, "source": "app", "meta": {"annotator": "x"}, "margin": 2},
        {"prompt": [U("hello")], "chosen": [A("yes")], "rejected": "no"},
        {"prompt": "hello", "chosen": [U("hello"), A("yes")], "rejected": [U("hello"), A("no")]},
    ])
    pairs, _ = load_preferences(str(p))
    assert pairs[0] == PreferencePair("hello", " yes", " no", f"{p}:1", margin=2.0, source="app", id="7")
    # a message anywhere makes all three message lists; a response repeating the prompt loses it
    assert pairs[1].prompt == [U("hello")] and pairs[1].chosen == [A("yes")] and pairs[1].rejected == [A("no")]
    assert pairs[2].prompt == [U("hello")] and pairs[2].chosen == [A("yes")] and pairs[2].rejected == [A("no")]


def test_hh_transcripts(tmp_path):
    c = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant: a cat walks in"
    r = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant: no"
    # texts that diverge before the last Assistant turn: the continuations are the responses
    c2 = "\n\nHuman: hi\n\nAssistant: sure\n\nHuman: thanks\n\nAssistant: welcome"
    r2 = "\n\nHuman: hi\n\nAssistant: go away\n\nHuman: why\n\nAssistant: no"
    # shared text running past the marker into the response ("a ...")
    c3 = "\n\nHuman: hi\n\nAssistant: a cat"
    r3 = "\n\nHuman: hi\n\nAssistant: a dog"
    p = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": c, "rejected": r}, {"chosen": c2, "rejected": r2}, {"chosen": c3, "rejected": r3}])
    pairs, _ = load_preferences(str(p))
    assert pairs[0].prompt == "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant:"
    assert (pairs[0].chosen, pairs[0].rejected) == (" a cat walks in", " no")
    assert pairs[1].prompt == "\n\nHuman: hi\n\nAssistant:"
    assert (pairs[1].chosen, pairs[1].rejected) == (" sure\n\nHuman: thanks\n\nAssistant: welcome", " go away\n\nHuman: why\n\nAssistant: no")
    assert (pairs[2].prompt, pairs[2].chosen, pairs[2].rejected) == ("\n\nHuman: hi\n\nAssistant:", " a cat", " a dog")
    # message-list transcripts
    q = write_jsonl(tmp_path / "m.jsonl", [{"chosen": [U("hi"), A("yes")], "rejected": [U("hi"), A("no")]}])
    (pair,), _ = load_preferences(str(q))
    assert (pair.prompt, pair.chosen, pair.rejected) == ([U("hi")], [A("yes")], [A("no")])


def test_rankings_give_all_ordered_pairs(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "q", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1]},
        {"prompt": "q2", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]},  # lower is better; a and c tie
        {"prompt": "q3", "responses": ["a", "b", "c"], "scores": [0.5, 2, 1]},  # higher is better
    ])
    pairs, report = load_preferences(str(p))
    got = [(x.prompt, x.chosen, x.rejected) for x in pairs]
    assert got[:6] == [("q", "r2", "r0"), ("q", "r2", "r3"), ("q", "r2", "r1"), ("q", "r0", "r3"), ("q", "r0", "r1"), ("q", "r3", "r1")]
    assert got[6:8] == [("q2", "b", "a"), ("q2", "b", "c")]
    assert got[8:] == [("q3", "b", "c"), ("q3", "b", "a"), ("q3", "c", "a")]
    assert (report.n_read, report.n_used) == (3, 11)
    assert report.summary() == "3 records, 11 pairs used"


def test_ratings_grouped_by_prompt_ties_excluded(tmp_path):
    p = write_jsonl(tmp_path / "rt.jsonl", [
        {"prompt": "q", "response": "a", "rating": 3},
        {"prompt": "q", "response": "b", "rating": 5},
        {"prompt": "q", "response": "c", "rating": 3},
        {"prompt": "alone", "response": "x", "rating": 1},
        {"prompt": "tie", "response": "x", "rating": 2},
        {"prompt": "tie", "response": "y", "rating": 2},
    ])
    pairs, report = load_preferences(str(p))
    assert [(x.prompt, x.chosen, x.rejected) for x in pairs] == [("q", "b", "a"), ("q", "b", "c")]
    assert report.dropped == {"rating with no differently rated response to the same prompt": 3}
    assert "dropped 3" in report.summary()


# ----------------------------------------------------------------------------------------------
# Bad records: the exact message "{path}:{line}: {problem}"


ROLE_MSG = "unknown role 'robot' in messages[1] (expected one of: system, user, assistant)"


@pytest.mark.parametrize("loader,line,problem", [
    (load_preferences, '{"prompt": "a"', "invalid JSON (Expecting ',' delimiter at column 15)"),
    (load_preferences, '{"prompt": "a", "rejected": "b"}', "field 'chosen' is missing"),
    (load_preferences, '{"prompt": "a", "chosen": "  ", "rejected": ""}', "'chosen' and 'rejected' are both empty responses"),
    (load_preferences, '{"prompt": " ", "chosen": "a", "rejected": "b"}', "field 'prompt' is empty"),
    (load_preferences, '{"prompt": "a", "chosen": "b", "rejected": "b"}', "'chosen' and 'rejected' are identical"),
    (load_preferences, '{"prompt": "a", "chosen": 3, "rejected": "b"}', "field 'chosen' must be a string or a list of messages, got int"),
    (load_preferences, '{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}', "field 'margin' must be a finite number, got 'big'"),
    (load_preferences, '["a", "b"]', "expected a JSON object, got list"),
    (load_preferences, '{"question": "a", "answer": "b"}',
     "unrecognised record: expected keys {prompt, chosen, rejected}, {chosen, rejected} (full transcripts), "
     "{prompt, responses, ranking|ranks|scores} or {prompt, response, rating}; got keys [answer, question]"),
    (load_preferences, '{"chosen": "yes", "rejected": "no"}',
     "'chosen' and 'rejected' share no prompt ending in '\\n\\nAssistant:' (give a 'prompt' field)"),
    (load_preferences, '{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}',
     "field 'ranking' must list each response index 0..1 once, best first; got [0, 0]"),
    (load_preferences, '{"prompt": "q", "responses": ["a", "b"]}', "field 'ranking' is missing (or give 'ranks' or 'scores')"),
    (load_sft, '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}', ROLE_MSG),
    (load_sft, '{"messages": [{"role": "user", "content": "hi"}]}', "messages has no assistant turn to learn from"),
    (load_sft, '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}', "field 'messages[1].content' is missing"),
    (load_sft, '{"prompt": "a"}', "field 'completion' is missing"),
    (load_prompts, '{"messages": [{"role": "system", "content": "hi"}]}', "messages has no user turn to answer"),
    (load_prompts, '{"foo": 1}', "unrecognised record: expected keys {prompt}, {messages}, {question} or a preference or SFT record; got keys [foo]"),
])
def test_bad_record_messages(tmp_path, loader, line, problem):
    good = {"prompt": "x", "chosen": "y", "rejected": "z"} if loader is load_preferences else {"prompt": "x", "completion": "y"}
    p = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DataError) as e:
        loader(str(p))
    assert str(e.value) == f"{p}:2: {problem}{SKIP_HINT}"
    assert isinstance(e.value, ValueError)


def test_one_empty_reply_is_a_judgment_and_is_counted(tmp_path, tok):
    # ~1 in 500 HH-RLHF records ends with an empty assistant reply on one side; tether rm / dpo stopped
    # at it ("field 'chosen' has an empty response after the shared prompt")
    hh = "\n\nHuman: how do I pick a lock?\n\nAssistant:"
    p = write_jsonl(tmp_path / "hh.jsonl", [
        PAIRS[0], {"chosen": hh, "rejected": hh + " Take a tension wrench and"}, {"prompt": "q", "chosen": "an answer", "rejected": ""},
    ])
    pairs, report = load_preferences(str(p))
    assert [(x.prompt, x.chosen, x.rejected) for x in pairs[1:]] == [(hh, "", " Take a tension wrench and"), ("q", "an answer", "")]
    assert report.noted == {"an empty response on one side": 2} and "kept 2 (an empty response on one side: 2)" in report.summary()
    items = tokenize_pairs(pairs, tok, DataConfig(max_length=64))
    assert items[1].chosen_ids == [tok.eos_token_id]  # the empty reply is just its end
    with pytest.raises(DataError, match="are both empty responses"):
        load_preferences(str(write_jsonl(tmp_path / "both.jsonl", [{"prompt": "q", "chosen": " ", "rejected": ""}])))
    with pytest.raises(DataError, match="are identical"):  # two empty transcript replies
        load_preferences(str(write_jsonl(tmp_path / "hh2.jsonl", [{"chosen": hh + " ", "rejected": hh}])))


def test_not_utf8_and_json_array_index(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(json.dumps(PAIRS[0]).encode() + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError) as e:
        load_preferences(str(p))
    assert str(e.value) == f"{p}:2: not valid UTF-8 (byte 0xe9 at column 16: invalid continuation byte){SKIP_HINT}"
    q = tmp_path / "arr.json"
    q.write_text(json.dumps([PAIRS[0], PAIRS[1], {"prompt": "a", "chosen": "b"}]))
    with pytest.raises(DataError) as e:
        load_preferences(str(q))
    assert str(e.value) == f"{q}[2]: field 'rejected' is missing{SKIP_HINT}"


def test_skip_mode_counts_by_reason(tmp_path, capsys):
    p = write_jsonl(tmp_path / "mixed.jsonl", [
        PAIRS[0], "{bad json", {"prompt": "a", "chosen": "", "rejected": " "}, {"prompt": "c", "chosen": "", "rejected": ""},
        {"prompt": "a", "chosen": "same", "rejected": "same"}, PAIRS[1],
    ])
    pairs, report = load_preferences(str(p), on_bad_record="skip")
    assert len(pairs) == 2
    assert report.skipped == {"invalid JSON": 1, "both responses empty": 2, "'chosen' and 'rejected' are identical": 1}
    assert report.summary() == ("6 records, 2 pairs used; skipped 4 (both responses empty: 2, invalid JSON: 1, "
                                "'chosen' and 'rejected' are identical: 1)")
    assert report.first_skipped[0].startswith(f"{p}:2: invalid JSON (")
    assert "skipped 4 bad record(s)" in capsys.readouterr().err
    with pytest.raises(DataError, match="on_bad_record must be"):
        load_preferences(str(p), on_bad_record="ignore")


def test_prompt_too_long_is_a_bad_record(tmp_path, tok):
    long_prompt = "the movie was good " * 40
    ex = [SFTExample("hello", " world", None, "f.jsonl:1"), SFTExample(long_prompt, " ok", None, "f.jsonl:2")]
    n = len(tok(long_prompt)["input_ids"])
    with pytest.raises(DataError) as e:
        tokenize_sft(ex, tok, cfg(max_length=256, max_prompt_length=32))
    assert str(e.value) == f"f.jsonl:2: prompt is {n} tokens, longer than data.max_prompt_length=32{SKIP_HINT}"
    report = DataReport(n_read=2, n_used=2)
    kept: list[int] = []
    items = tokenize_sft(ex, tok, cfg(max_length=256, max_prompt_length=32, on_bad_record="skip"), report, kept)
    assert len(items) == 1 and kept == [0]
    assert report.skipped == {"prompt longer than data.max_prompt_length": 1} and report.n_used == 1
    pairs = [PreferencePair(long_prompt, "a", "b", "p.jsonl:9")]
    with pytest.raises(DataError, match=r"^p\.jsonl:9: prompt is \d+ tokens, longer than data\.max_prompt_length=32 \(data\.on_bad_record=skip"):
        tokenize_pairs(pairs, tok, cfg(max_length=256, max_prompt_length=32))
    with pytest.raises(DataError, match=r"^t\.txt:3: prompt is"):
        tokenize_prompts([PromptExample(long_prompt, "t.txt:3")], tok, cfg(max_length=256, max_prompt_length=32))


# ----------------------------------------------------------------------------------------------
# Prompts


def test_prompt_sources(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("tell me a story\n\nwrite a poem\n")
    ex, report = load_prompts(str(txt))
    assert [(e.prompt, e.loc) for e in ex] == [("tell me a story", f"{txt}:1"), ("write a poem", f"{txt}:3")]
    p = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q1", "answer": "42"},
        {"messages": [U("hi"), A("yes"), U("why"), A("because")]},
        {"prompt": [S("sys"), U("hi")]},
    ])
    ex, _ = load_prompts(str(p))
    assert ex[0].prompt == "q1" and ex[0].meta == {"answer": "42"}
    assert ex[1].prompt == [U("hi"), A("yes"), U("why")]
    assert ex[2].prompt == [S("sys"), U("hi")]
    # prompts of preference files, each once
    q = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
    ])
    ex, report = load_prompts(str(q))
    assert [e.prompt for e in ex] == ["q", "\n\nHuman: hi\n\nAssistant:"]
    assert report.dropped == {"duplicate prompt from a preference file": 1}


# ----------------------------------------------------------------------------------------------
# Tokenisation: loss masks, EOS, templates, truncation


def test_raw_text_mask_is_completion_plus_eos(tok):
    ex = [SFTExample("the movie was", " really good and fun", None, "x:1"), SFTExample("", "hello world", None, "x:2")]
    items = tokenize_sft(ex, tok, CFG)
    (ids, mask), (ids2, mask2) = items
    assert tok.decode(ids) == "the movie was really good and fun<|endoftext|>"  # raw concatenation, no template
    assert masked_text(tok, ids, mask) == " really good and fun<|endoftext|>"
    assert unmasked_text(tok, ids, mask) == "the movie was"
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert masked_text(tok, ids2, mask2) == "hello world<|endoftext|>" and all(mask2)
    # a completion that already ends with the EOS text is not given a second one
    (ids3, _), = tokenize_sft([SFTExample("a", " b<|endoftext|>", None, "x:3")], tok, CFG)
    assert ids3.count(tok.eos_token_id) == 1


def test_chat_template_mask_covers_assistant_turns_only(chat_tok):
    msgs = [S("be nice"), U("hello"), A("yes sure"), U("why"), A("because it is fun")]
    (ids, mask), = tokenize_sft([SFTExample(None, None, msgs, "x:1")], chat_tok, CFG)
    text = chat_tok.decode(ids)
    assert text == ("<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                    "<|im_start|>assistant\nyes sure<|im_end|>\n<|im_start|>user\nwhy<|im_end|>\n"
                    "<|im_start|>assistant\nbecause it is fun<|im_end|>")
    # content and the end-of-turn (= EOS here, so not doubled), never the role header or user turns
    assert masked_text(chat_tok, ids, mask) == "yes sure<|im_end|>because it is fun<|im_end|>"
    assert ids.count(chat_tok.eos_token_id) == 5
    # the prompt ids are exactly what generation sees
    n = mask.index(1)
    assert ids[:n] == encode_prompt(chat_tok, msgs[:2])
    assert render_prompt(chat_tok, msgs[:2]) == "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_plain_format_without_template(tok, chat_tok):
    msgs = [S("be nice"), U("hello"), A("yes sure"), U("why"), A("because")]
    for t, ct in ((tok, "auto"), (chat_tok, "plain")):
        (ids, mask), = tokenize_sft([SFTExample(None, None, msgs, "x:1")], t, cfg(chat_template=ct))
        eos = t.eos_token
        assert t.decode(ids) == f"be nice\n\nHuman: hello\n\nAssistant: yes sure{eos}\n\nHuman: why\n\nAssistant: because{eos}"
        assert masked_text(t, ids, mask) == f" yes sure{eos} because{eos}"
        assert render_prompt(t, msgs[:4], ct) == f"be nice\n\nHuman: hello\n\nAssistant: yes sure{eos}\n\nHuman: why\n\nAssistant:"
        assert ids[: mask.index(1)] == encode_prompt(t, msgs[:2], ct)
    with pytest.raises(DataError, match="no chat template"):
        tokenize_sft([SFTExample(None, None, msgs, "x:1")], tok, cfg(chat_template="model"))
    # string prompts are never templated
    assert render_prompt(chat_tok, "the movie") == "the movie"


def test_pairs_tokenised_and_collated(tok, chat_tok):
    pairs = [PreferencePair("the movie was", " good", " really bad and boring", "x:1", margin=1.5),
             PreferencePair("hello", " yes", " no", "x:2")]
    items = tokenize_pairs(pairs, tok, CFG)
    assert tok.decode(items[0].prompt_ids) == "the movie was"
    assert tok.decode(items[0].chosen_ids) == " good<|endoftext|>"
    assert tok.decode(items[0].rejected_ids) == " really bad and boring<|endoftext|>"
    b = collate_pairs(items, pad_id(tok))
    assert b.chosen_input_ids.dtype == torch.long and b.chosen_loss_mask.dtype == torch.float
    for side in ("chosen", "rejected"):
        for i in range(2):
            ids = getattr(b, f"{side}_input_ids")[i]
            att = getattr(b, f"{side}_attention_mask")[i]
            lm = getattr(b, f"{side}_loss_mask")[i]
            assert tok.decode(ids[lm.bool()].tolist()) == tok.decode(getattr(items[i], f"{side}_ids"))
            assert tok.decode(ids[att.bool()].tolist()) == tok.decode(items[i].prompt_ids + getattr(items[i], f"{side}_ids"))
            assert (ids[~att.bool()] == pad_id(tok)).all()
    assert b.margin.tolist() == [1.5, 0.0]
    # the prompt boundary stays known after collating: packed passes share it without searching for it
    n = [len(it.prompt_ids) for it in items]
    assert b.prompt_len == n and b.groups() == ([0, 1, 0, 1], n * 2) and b.select([1]).groups() == ([0, 0], n[1:] * 2)
    assert collate_pairs(items[1:], pad_id(tok)).margin is None
    # conversations through the chat template
    mp = PreferencePair([U("hello")], [A("yes")], [A("no way")], "x:3")
    (it,) = tokenize_pairs([mp], chat_tok, CFG)
    assert chat_tok.decode(it.prompt_ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert (chat_tok.decode(it.chosen_ids), chat_tok.decode(it.rejected_ids)) == ("yes<|im_end|>", "no way<|im_end|>")


def test_truncation_is_counted(tok):
    long = " the movie was good" * 30
    report = DataReport(n_read=2, n_used=2)
    items = tokenize_sft([SFTExample("hello", long, None, "x:1"), SFTExample("hello", " world", None, "x:2")], tok, cfg(max_length=20), report)
    assert len(items[0][0]) == 20 and items[0][0][-1] != tok.eos_token_id  # the cut response does not end
    assert report.truncated == 1 and report.summary() == "2 records, 2 used; truncated 1"
    report = DataReport(items="pairs")
    (it,) = tokenize_pairs([PreferencePair("hello", long, " no", "x:1")], tok, cfg(max_length=20), report)
    assert len(it.prompt_ids) + len(it.chosen_ids) == 20 and it.rejected_ids[-1] == tok.eos_token_id
    assert report.truncated == 1


# ----------------------------------------------------------------------------------------------
# Collation: padding and packing


def test_prompts_left_padded(tok):
    tok_nopad = make_tokenizer(pad=False)
    assert pad_id(tok_nopad) == tok_nopad.eos_token_id and pad_id(tok) == tok.pad_token_id
    ids = tokenize_prompts([PromptExample("hello", "a"), PromptExample("the movie was really good", "b")], tok, CFG)
    b = collate_prompts(ids, pad_id(tok), ["hello", "the movie was really good"])
    assert b.input_ids.shape == b.attention_mask.shape == (2, max(map(len, ids)))
    short = len(ids[0])
    assert b.input_ids[0, -short:].tolist() == ids[0] and (b.input_ids[0, :-short] == pad_id(tok)).all()
    assert b.attention_mask[0].tolist() == [0] * (b.input_ids.shape[1] - short) + [1] * short
    assert b.attention_mask[1].all() and b.prompts == ["hello", "the movie was really good"]
    # rows holding the same prompt (samples of one prompt) share a group id, so it is computed once
    assert b.group_ids == [0, 1] and collate_prompts([ids[1], ids[0], ids[1]], pad_id(tok)).group_ids == [0, 1, 0]


def test_sft_right_padding(tok):
    items = tokenize_sft([SFTExample("hello", " world", None, "a"), SFTExample("the movie", " was good and fun", None, "b")], tok, CFG)
    b = collate_sft(items, pad_id(tok))
    assert b.position_ids is None and b.loss_mask.dtype == torch.float
    for i, (ids, mask) in enumerate(items):
        assert b.input_ids[i, : len(ids)].tolist() == ids and b.loss_mask[i, : len(ids)].tolist() == mask
        assert b.attention_mask[i].sum() == len(ids) and b.loss_mask[i, len(ids):].sum() == 0


def test_packing_loses_no_tokens(tok):
    texts = ["hello", "the movie was good", "a", "what a really long boring film it was", "cat", "dog and cat", "sure"]
    items = tokenize_sft([SFTExample("q", " " + t, None, f"x:{i}") for i, t in enumerate(texts)], tok, CFG)
    L = 32
    b = collate_sft(items, pad_id(tok), packing=True, max_length=L)
    assert b.input_ids.shape[1] <= L and b.input_ids.shape[0] < len(items)
    got = []
    for r in range(b.input_ids.shape[0]):
        pos, real = b.position_ids[r], b.attention_mask[r].bool()
        seg = torch.where(real, (pos == 0).long().cumsum(0), 0)  # an example starts where its positions restart
        for s in range(1, int(seg.max()) + 1):
            sel = seg == s
            assert pos[sel].tolist() == list(range(int(sel.sum())))  # positions restart per example
            got.append((b.input_ids[r][sel].tolist(), b.loss_mask[r][sel].int().tolist()))
        assert (b.loss_mask[r][seg == 0] == 0).all() and (b.input_ids[r][seg == 0] == pad_id(tok)).all()
    assert sorted(got) == sorted(items)  # every token of every example, with its mask, exactly once
    assert b.attention_mask.sum() == sum(len(i) for i, _ in items)


# ----------------------------------------------------------------------------------------------
# Eval split


def test_split_eval_deterministic_and_grouped():
    items = list(range(100))
    tr, ev = split_eval(items, 0.1, seed=3)
    assert len(ev) == 10 and sorted(tr + ev) == items and split_eval(items, 0.1, seed=3) == (tr, ev)
    assert split_eval(items, 0.1, seed=4)[1] != ev
    assert split_eval(items, 0.0, 0) == (items, [])
    pairs = [PreferencePair(f"q{i // 3}", f"a{i}", f"b{i}", f"x:{i}") for i in range(30)]
    tr, ev = split_eval(pairs, 0.2, seed=0)
    assert {p.prompt for p in tr}.isdisjoint({p.prompt for p in ev}) and len(ev) == 6


# ----------------------------------------------------------------------------------------------
# Converters of public data sets


def test_oasst_converter_on_a_small_tree(tmp_path):
    from tether.data.convert import convert

    def msg(mid, role, text, rank=None, replies=(), **kw):
        return {"message_id": mid, "role": role, "text": text, "rank": rank, "deleted": False, "synthetic": False, "replies": list(replies), **kw}

    tree = {"message_tree_id": "t1", "prompt": msg("p", "prompter", "hello", replies=[
        msg("a0", "assistant", "best", 0, [msg("u", "prompter", "why", replies=[msg("b0", "assistant", "because", 0), msg("b1", "assistant", "dunno", 1)])]),
        msg("a1", "assistant", "middle", 1),
        msg("a2", "assistant", "worst", 2, synthetic=True),
    ])}
    write_jsonl(tmp_path / "trees.jsonl", [tree])
    counts = convert("oasst", str(tmp_path / "trees.jsonl"), str(tmp_path / "out.jsonl"))
    assert counts["pairs"] == 4
    pairs, _ = load_preferences(str(tmp_path / "out.jsonl"))
    got = [(len(p.prompt), p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs]
    assert got == [(1, "best", "middle"), (1, "best", "worst"), (1, "middle", "worst"), (3, "because", "dunno")]
    assert pairs[3].prompt == [U("hello"), A("best"), U("why")] and pairs[0].source == "oasst"
    assert convert("oasst", str(tmp_path / "trees.jsonl"), str(tmp_path / "o2.jsonl"), synthetic=False)["pairs"] == 2


REAL = "/work/shared/data"


@pytest.mark.parametrize("kind,src,n", [
    ("oasst", "oasst-en-100-trees/en_100_tree.jsonl", 754),  # README: 754 comparisons
    ("qa-feedback", "qa-feedback/dev_feedback.json", 2616),  # README: 2,616 non-tie pairs
    ("lfqa", "lfqa-expert-preferences/experts_pairwise_human_preferences.jsonl", 260),
    ("hhh", "hhh-alignment", 221),
])
def test_converters_on_real_data(tmp_path, kind, src, n):
    import os

    from tether.data.convert import convert

    if not os.path.exists(f"{REAL}/{src}"):
        pytest.skip("shared data not present")
    counts = convert(kind, f"{REAL}/{src}", str(tmp_path / "out.jsonl"))
    pairs, report = load_preferences(str(tmp_path / "out.jsonl"))
    assert counts["pairs"] == len(pairs) == report.n_used == n and not report.skipped


def test_template_whose_generation_prompt_is_not_a_prefix(chat_tok):
    """Thinking-style templates open the assistant turn differently with add_generation_prompt; the
    assistant content is then found in the rendering itself."""
    import copy

    t = copy.deepcopy(chat_tok)
    t.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think></think>\n{% endif %}"
    )
    msgs = [U("hello"), A("yes sure"), U("why"), A("because")]
    (ids, mask), = tokenize_sft([SFTExample(None, None, msgs, "x:1")], t, CFG)
    assert masked_text(t, ids, mask) == "yes sure<|im_end|>because<|im_end|>"
    assert "<think>" not in t.decode(ids)


def test_bos_adding_tokenizer_keeps_bos_out_of_the_loss():
    from tokenizers import processors

    t = make_tokenizer()
    bos = t.convert_tokens_to_ids("<|im_start|>")
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    t.bos_token = "<|im_start|>"
    (ids, mask), = tokenize_sft([SFTExample("hello", " world", None, "x:1")], t, CFG)
    assert ids[0] == bos and mask[0] == 0 and ids.count(bos) == 1
    assert masked_text(t, ids, mask) == " world<|endoftext|>"
    assert encode_prompt(t, "hello") == ids[: mask.index(1)]
    (p,) = tokenize_pairs([PreferencePair("hello", " a", " b", "x:1")], t, CFG)
    assert p.prompt_ids[0] == bos


@pytest.mark.parametrize("chat", [True, False])
def test_multi_turn_pair_keeps_earlier_turns_in_prompt(chat):
    """A pair whose prompt already holds an assistant turn: only the last reply is the response."""
    from tether.data import PreferencePair, tokenize_pairs

    tok = make_tokenizer(chat_template=chat)
    prompt = [{"role": "user", "content": "hello cat"}, {"role": "assistant", "content": "hello dog"},
              {"role": "user", "content": "is the movie good"}]
    pair = PreferencePair(prompt=prompt, chosen=[{"role": "assistant", "content": "yes it is great"}],
                          rejected=[{"role": "assistant", "content": "no it is bad"}], loc="x:1")
    (item,) = tokenize_pairs([pair], tok, DataConfig(max_length=256, max_prompt_length=200))
    assert "hello dog" in tok.decode(item.prompt_ids)
    assert "hello dog" not in tok.decode(item.chosen_ids) and "yes it is great" in tok.decode(item.chosen_ids)
    assert "no it is bad" in tok.decode(item.rejected_ids) and "hello" not in tok.decode(item.rejected_ids)


def test_pair_batch_stacked_puts_rejected_under_chosen_right_padded():
    import torch

    from tether.types import PairBatch

    c = torch.tensor([[1, 2, 3], [4, 5, 6]])
    r = torch.tensor([[7, 8, 9, 10, 11], [12, 13, 14, 15, 16]])
    b = PairBatch(c, torch.ones_like(c), torch.full(c.shape, 0.5), r, torch.ones_like(r), torch.full(r.shape, 2.0))
    ids, attn, loss = b.stacked()
    assert ids.tolist() == [[1, 2, 3, 0, 0], [4, 5, 6, 0, 0], r[0].tolist(), r[1].tolist()]
    assert attn.tolist() == [[1, 1, 1, 0, 0]] * 2 + [[1] * 5] * 2
    assert loss.tolist() == [[0.5, 0.5, 0.5, 0, 0]] * 2 + [[2.0] * 5] * 2 and loss.dtype == torch.float
