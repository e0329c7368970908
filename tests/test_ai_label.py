"""tether ai label / tether eval labeler: option-probability judging, both-order debiasing, the HTTP judge
against `tether serve` and against a fault-injecting server, cache resume after a kill, constitutions."""

import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tether.ai.constitution import ConstitutionError, load_constitution
from tether.ai.judge import Comparison, Item, label, read_items, to_record

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _items(n=4):
    return [Item(f"i{k}", (f"question {k}", f"good answer {k}", f"bad answer {k}"), ("chosen", "rejected"), 0) for k in range(n)]


# -- the local judge ---------------------------------------------------------------------------------------


def test_option_probability_is_the_softmax_of_the_option_logits(tiny_llama):
    import torch

    from tether.ai.judge import LocalJudge
    from tether.data import encode_prompt

    judge = LocalJudge(str(tiny_llama), device="cpu", batch_size=3)
    tok, pr = judge.tok, load_constitution().principles[0]
    a, b = (tok(o, add_special_tokens=False)["input_ids"] for o in ("A", "B"))
    assert len(a) == len(b) == 1 and judge.option_ids == [a, b]  # " A" is no single token in this vocabulary
    comps = [Comparison("hello there", "the movie was good", "bad", pr), Comparison("a question " * 5, "yes", "no no no no", pr),
             Comparison("hi", "the cat and the dog were very good friends", "red blue green", pr), Comparison("x", "y", "z", pr)]
    got = judge.judge(comps)  # batched, left-padded, sorted by length
    for c, p in zip(comps, got):
        ids = encode_prompt(tok, c.messages())
        with torch.no_grad():
            logits = judge.model(input_ids=torch.tensor([ids])).logits[0, -1]  # the answer position, no padding
        want = math.exp(logits[a[0]]) / (math.exp(logits[a[0]]) + math.exp(logits[b[0]]))
        assert p == pytest.approx(want, abs=1e-5)
    assert len(set(round(p, 6) for p in got)) > 1


class FirstBias:
    """A labeler that always prefers whichever response it is shown first (a planted position bias)."""
    identity = "fake:first"

    def __init__(self, p=0.9):
        self.p, self.calls = p, 0

    def judge(self, comps):
        self.calls += len(comps)
        return [self.p] * len(comps)


class Fair:
    """Prefers the response containing 'good', wherever it is, plus a position bias of `bias`."""
    identity = "fake:fair"

    def __init__(self, bias=0.0):
        self.bias = bias

    def judge(self, comps):
        return [min(1.0, (0.8 if "good" in c.first else 0.2) + self.bias) for c in comps]


def test_both_orders_turn_a_planted_position_bias_into_flagged_ties():
    c = load_constitution()
    judge = FirstBias()
    res = label(_items(), judge, c, "all", both_orders=True)
    assert judge.calls == 4 * 3 * 2  # items x principles x orders
    assert all(r.p == 0.5 and r.tie and r.flip for r in res)
    assert all(to_record(r, judge.identity) is None for r in res)  # a tie is no preference record
    # one order: the bias goes straight into the labels, undetected
    res1 = label(_items(), FirstBias(), c, "all", both_orders=False)
    assert all(r.p in (pytest.approx(0.9), pytest.approx(0.1)) and not r.flip for r in res1)
    # a judge with a real preference keeps it; a position bias only lowers its confidence, and no flip
    res2 = label(_items(), Fair(bias=0.1), c, "sample", both_orders=True, seed=3)
    assert all(r.p == pytest.approx(0.8) and not r.flip and len(r.per_principle) == 1 for r in res2)
    assert label(_items(), Fair(), c, "sample", seed=3)[0].per_principle.keys() == res2[0].per_principle.keys()  # seeded
    rec = to_record(res2[0], "fake:fair")
    assert rec["chosen"] == "good answer 0" and rec["rejected"] == "bad answer 0" and rec["source"] == "tether-ai:fake:fair"
    assert rec["meta"]["confidence"] == pytest.approx(0.8) and rec["meta"]["labeler"] == "fake:fair" and rec["meta"]["flip"] is False
    # a strong bias that overrides the content flips, and --on-flip tie makes it a tie
    res3 = label(_items(1), Fair(bias=0.45), c, "helpfulness", on_flip="tie")
    assert res3[0].flip and res3[0].p == 0.5


def test_label_cli_on_a_local_model_writes_export_records(tiny_llama, tmp_path):
    from tiny import write_jsonl

    from tether.cli import main
    from tether.data import load_preferences

    write_jsonl(tmp_path / "tasks.jsonl", [{"id": "t1", "prompt": "hello", "responses": ["the movie was good", "bad", "fun"]},
                                           {"id": "t2", "prompt": "hi", "responses": ["yes", "no"]}])
    out = tmp_path / "ai.jsonl"
    assert main(["ai", "label", "--model", str(tiny_llama), "--data", str(tmp_path / "tasks.jsonl"), "--out", str(out), "--device", "cpu"]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 4 and {r["meta"]["task"] for r in recs} == {"t1#0-1", "t1#0-2", "t1#1-2", "t2"}
    for r in recs:
        assert set(r) == {"prompt", "chosen", "rejected", "id", "source", "meta"} and r["meta"]["labeler"] == f"hf:{tiny_llama.name}"
        assert 0.5 < r["meta"]["confidence"] <= 1 and r["meta"]["principles"] == ["harmlessness", "helpfulness", "honesty"]
    assert len(load_preferences(str(out))[0]) == 4  # tether rm / tether dpo read it
    assert (tmp_path / "ai.errors.jsonl").read_text() == ""


# -- constitutions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, problem", [
    ("principles:\n  - name: kind\n    critique: c\n    revision: r\n", "principle 'kind' (#1): missing field 'comparison'"),
    ("principles:\n  - name: kind\n    critique: c\n    revision: r\n    comparison: q\n    weight: 2\n", "principle 'kind' (#1): unknown key 'weight'"),
    ("principles:\n  - {name: a, critique: c, revision: r, comparison: q}\n  - {critique: c, revision: r, comparison: q}\n", "principle #2: missing field 'name'"),
    ("principles:\n  - {name: a, critique: c, revision: r, comparison: q}\n  - {name: a, critique: c, revision: r, comparison: q}\n", "principle 'a' (#2): duplicate name 'a'"),
    ("rules: []\n", "unknown top-level key 'rules'"),
])
def test_constitution_errors_name_the_file_and_the_principle(tmp_path, body, problem):
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(ConstitutionError) as e:
        load_constitution(f)
    assert str(e.value).startswith(f"{f}: {problem}") and "\n" not in str(e.value)


def test_a_bad_constitution_stops_the_command_with_one_line(tmp_path, capsys):
    from tether.cli import main

    f = tmp_path / "c.yaml"
    f.write_text("principles:\n  - name: kind\n    critique: c\n    revision: r\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    assert main(["ai", "label", "--model", "unused", "--data", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--constitution", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tether ai label: {f}: principle 'kind' (#1): missing field 'comparison'"


def test_default_constitution_is_package_data():
    c = load_constitution()
    assert [p.name for p in c.principles] == ["helpfulness", "harmlessness", "honesty"]
    assert "ai/*.yaml" in (ROOT / "pyproject.toml").read_text()


# -- eval labeler ------------------------------------------------------------------------------------------


def test_routing_against_random_routing_on_hand_built_results():
    from tether.ai.eval_labeler import evaluate, routing

    conf = [0.95, 0.9, 0.8, 0.6, 0.55]
    correct = [1.0, 1.0, 1.0, 0.0, 0.0]
    r = routing(conf, correct, thresholds=(0.5, 0.85), targets=(0.8, 1.0))
    assert r["thresholds"][0]["share_auto"] == 1 and r["thresholds"][0]["agreement_auto"]["rate"] == pytest.approx(0.6)
    assert r["thresholds"][1]["n_auto"] == 2 and r["thresholds"][1]["agreement_auto"]["rate"] == 1.0
    assert r["thresholds"][1]["random_agreement_auto"] == pytest.approx(0.6) and r["thresholds"][1]["final_agreement"] == 1.0
    # 80% final agreement: auto-labelling the 4 most confident gives (3 + 1 human) / 5; random routing of a
    # share s gives 1 - 0.4 s, so s = 0.5
    assert r["savings"][0] == {"target": 0.8, "confidence_share_auto": 0.8, "random_share_auto": pytest.approx(0.5)}
    assert r["savings"][1]["confidence_share_auto"] == pytest.approx(0.6) and r["savings"][1]["random_share_auto"] == 0.0
    res = label(_items(), Fair(bias=0.1), load_constitution(), "all")
    m = evaluate(res)
    assert m["agreement"]["rate"] == 1.0 and m["position_flip_rate"]["rate"] == 0.0 and m["baselines"]["length"]["rate"] == 1.0  # "good" is one letter longer than "bad"
    assert m["ece"] == pytest.approx(0.2)  # always right, 0.8 confident
    m = evaluate(label(_items(), FirstBias(), load_constitution(), "all"))
    assert m["agreement"]["rate"] == 0.5 and m["ties"] == 4 and m["position_flip_rate"]["rate"] == 1.0


def test_eval_labeler_command_writes_its_report(tiny_llama, tmp_path):
    from tiny import write_jsonl

    from tether.cli import main

    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"q {i}", "chosen": "good " * (i + 1), "rejected": "bad"} for i in range(5)])
    out = tmp_path / "rep"
    assert main(["eval", "labeler", "--labeler", str(tiny_llama), "--data", str(tmp_path / "prefs.jsonl"), "--out", str(out),
                 "--device", "cpu", "--principles", "honesty"]) == 0
    m = json.loads((out / "metrics.json").read_text())["files"]["prefs.jsonl"]
    assert m["judged"] == 5 and m["baselines"]["length"]["rate"] == 1.0 and 0 <= m["agreement"]["rate"] <= 1
    assert "Routing" in (out / "report.md").read_text() and len((out / "judgements.jsonl").read_text().splitlines()) == 5
