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
from tether.ai.judge import Comparison, Item, label, to_record

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


# -- the HTTP judge ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt_of(content: str) -> str:
    return content.split("[Prompt]\n", 1)[1].split("\n\n[Response A]", 1)[0]


class FakeOpenAI:
    """A minimal OpenAI-compatible chat endpoint in a thread, counting requests by body. P(A) = 0.8 when
    Response A contains 'good', else 0.2 (" B" spelt with a space, as many tokenizers do). Faults are
    planted by the item's prompt: timeout-once, 429-once, malformed-once (the first request of each body
    fails, the next succeeds), always-500, always-malformed, no-options. kill_at=N: the N-th request
    SIGKILLs the process `victim` (the labelling run) instead of answering."""

    def __init__(self, sleep: float = 2.0):
        self.seen, self.answered, self.total, self.sleep = {}, {}, 0, sleep
        self.kill_at, self.victim, self.lock = None, None, threading.Lock()
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body, headers=()):
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "test"}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()
                with fake.lock:
                    fake.total += 1
                    n = fake.seen[key] = fake.seen.get(key, 0) + 1
                    total = fake.total
                if fake.kill_at == total:
                    os.kill(fake.victim.pid, signal.SIGKILL)
                    return  # no answer: the connection closes
                content = req["messages"][0]["content"]
                fault = _prompt_of(content)
                try:
                    if fault == "timeout-once" and n == 1:
                        time.sleep(fake.sleep)
                        return
                    if fault == "429-once" and n == 1:
                        return self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}}, [("Retry-After", "0")])
                    if fault == "malformed-once" and n == 1:
                        return self._send(200, b"{not json")
                    if fault == "always-500":
                        return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
                    if fault == "always-malformed":
                        return self._send(200, {"id": "x", "object": "chat.completion", "choices": []})
                    a_good = "good" in content.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
                    pa = 0.8 if a_good else 0.2
                    top = [{"token": "x", "logprob": math.log(0.5)}, {"token": "y", "logprob": math.log(0.3)}] if fault == "no-options" else \
                        [{"token": "A", "logprob": math.log(pa * 0.9)}, {"token": " B", "logprob": math.log((1 - pa) * 0.9)}, {"token": "C", "logprob": math.log(0.05)}]
                    first = {"token": top[0]["token"], "logprob": top[0]["logprob"], "bytes": None, "top_logprobs": top}
                    self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": req["model"],
                                     "choices": [{"index": 0, "message": {"role": "assistant", "content": top[0]["token"]},
                                                  "logprobs": {"content": [first]}, "finish_reason": "length"}]})
                    with fake.lock:
                        fake.answered[key] = fake.answered.get(key, 0) + 1
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", _free_port()), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    pytest.importorskip("openai")
    f = FakeOpenAI()
    yield f
    f.stop()


def _prefs(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": p, "prompt": p, "chosen": f"good answer to {p}", "rejected": "bad answer"}) + "\n" for p in prompts))
    return path


def test_http_faults_are_retried_then_reported_per_item(fake, tmp_path):
    from tether.cli import main

    faults = ["timeout-once", "429-once", "malformed-once", "always-500", "always-malformed", "no-options", "fine"]
    out = tmp_path / "ai.jsonl"
    rc = main(["ai", "label", "--model", fake.url, "--data", str(_prefs(tmp_path / "p.jsonl", faults)), "--out", str(out),
               "--principles", "helpfulness", "--timeout", "0.5", "--retries", "2", "--backoff", "0.01", "--concurrency", "4"])
    assert rc == 1  # some items failed: the exit status says so
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(recs) == {"ai/timeout-once", "ai/429-once", "ai/malformed-once", "ai/fine"}
    for r in recs.values():  # retried to the right answer, in both orders
        assert r["chosen"].startswith("good answer") and r["meta"]["confidence"] == pytest.approx(0.8)
        assert r["meta"]["labeler"] == f"openai:fake@{fake.url}" and r["meta"]["flip"] is False
    errors = {e["id"]: " ".join(e["errors"]) for e in map(json.loads, (tmp_path / "ai.errors.jsonl").read_text().splitlines())}
    assert set(errors) == {"always-500", "always-malformed", "no-options"}  # never written as ties
    assert "failed after 3 attempts" in errors["always-500"] and "500" in errors["always-500"]
    assert "failed after 3 attempts" in errors["always-malformed"] and "malformed" in errors["always-malformed"]
    assert "neither option" in errors["no-options"]
    assert (tmp_path / "ai.ties.jsonl").read_text() == ""
    # requests per body: each transient fault once then success (2), 500 and malformed 1 + 2 retries, no retry for no-options
    assert sorted(fake.seen.values()) == sorted([2] * 6 + [3] * 4 + [1] * 2 + [1] * 2)  # 3 transient x 2 orders, ..., fine


def test_a_killed_run_resumes_from_its_cache_without_repeating_a_request(fake, tmp_path):
    from tether.cli import main

    data = _prefs(tmp_path / "p.jsonl", [f"fine {k}" for k in range(5)])
    out = tmp_path / "ai.jsonl"
    args = ["ai", "label", "--model", fake.url, "--data", str(data), "--out", str(out), "--principles", "honesty", "--concurrency", "1"]
    fake.kill_at = 4
    fake.victim = subprocess.Popen([sys.executable, "-m", "tether.cli", *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    fake.victim.wait(60)
    assert fake.victim.returncode == -signal.SIGKILL and not out.exists()
    assert len((tmp_path / "ai.cache.jsonl").read_text().splitlines()) == 3  # the answers that arrived before the kill
    fake.kill_at = None
    assert main(args) == 0
    assert fake.total == 11  # 10 comparisons, the one in flight at the kill asked twice (it was never answered)
    assert sorted(fake.answered.values()) == [1] * 10  # no answer was paid for twice
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 5 and all(r["meta"]["confidence"] == pytest.approx(0.8) and r["chosen"].startswith("good") for r in recs)
    answered = fake.total
    assert main(args) == 0 and fake.total == answered  # a third run is all cache


# -- against a real `tether serve` -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ab_model(tmp_path_factory):
    """A tiny Llama whose two option tokens outrank every other token (so both are among the top 5 that an
    OpenAI-style endpoint returns): a constant residual dimension that only the A and B rows read."""
    import torch
    from tiny import make_tiny_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = make_tiny_model_dir(tmp_path_factory.mktemp("ab") / "judge", "llama", chat_template=True)
    tok = AutoTokenizer.from_pretrained(d)
    m = AutoModelForCausalLM.from_pretrained(d)
    a, b = (tok(o, add_special_tokens=False)["input_ids"][0] for o in ("A", "B"))
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 1:] *= 50  # the content, at unit scale
        m.model.embed_tokens.weight[:, 0] = 10.0
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        for t in (a, b):  # A and B read the content strongly and the constant dimension
            m.lm_head.weight[t, 1:] *= 50
            m.lm_head.weight[t, 0] += 3.0
    m.save_pretrained(d)
    return d


def test_http_judge_against_tether_serve_equals_the_local_judge(ab_model, tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import httpx

    from tether.ai.http import HttpJudge
    from tether.ai.judge import LocalJudge
    from tether.cli import main

    port = _free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "tether.cli", "serve", "--model", str(ab_model), "--port", str(port),
                             "--served-model-name", "judge", "--device", "cpu"], env={**ENV, "TETHER_API_KEY": ""},
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() - t0 < 120, log.read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        pr = load_constitution().principles
        comps = [Comparison("hello there", "the movie was good", "bad", pr[0]), Comparison("hi", "yes", "no no no", pr[1]),
                 Comparison("what is it", "a cat and a dog", "the red one", pr[2])]
        http = HttpJudge(f"http://127.0.0.1:{port}", concurrency=2, cache=tmp_path / "c.jsonl")  # model from /v1/models
        got = http.judge(comps)
        want = LocalJudge(str(ab_model), device="cpu").judge(comps)
        assert http.model_name == "judge" and http.stats["bounded"] == 0 and http.stats["failed"] == 0
        assert got == pytest.approx(want, abs=1e-4)
        assert len(set(round(p, 5) for p in want)) > 1
        http.close()
        # the command end to end against the server
        data = _prefs(tmp_path / "p.jsonl", ["q1", "q2"])
        assert main(["ai", "label", "--model", f"http://127.0.0.1:{port}/v1", "--data", str(data), "--out", str(tmp_path / "o.jsonl"),
                     "--principles", "helpfulness"]) == 0
        recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
        assert len(recs) + len((tmp_path / "o.ties.jsonl").read_text().splitlines()) == 2
        assert all(r["meta"]["labeler"] == f"openai:judge@http://127.0.0.1:{port}/v1" for r in recs)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_llmbar_converts_and_the_report_splits_by_source(tmp_path):
    from tether.ai.convert import main as convert
    from tether.ai.eval_labeler import evaluate
    from tether.ai.judge import read_items

    for sub, better in (("Natural", 1), ("Adversarial/Neighbor", 2)):
        (tmp_path / "ds" / sub).mkdir(parents=True)
        rows = [{"input": f"q{i}", "output_1": f"good {i}" if better == 1 else f"bad {i}", "output_2": f"bad {i}" if better == 1 else f"good {i}",
                 "label": better} for i in range(3)] + [{"input": "tie", "output_1": "a", "output_2": "b", "label": 0}]
        (tmp_path / "ds" / sub / "dataset.json").write_text(json.dumps(rows))
    assert convert(["llmbar", str(tmp_path / "ds"), str(tmp_path / "llmbar.jsonl")]) == 0
    recs = [json.loads(x) for x in (tmp_path / "llmbar.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and all(r["chosen"].startswith("good") for r in recs)
    assert {r["source"] for r in recs} == {"llmbar/Natural", "llmbar/Adversarial/Neighbor"}
    m = evaluate(label(read_items(tmp_path / "llmbar.jsonl"), Fair(), load_constitution(), "honesty"))
    assert set(m["by_source"]) == {"llmbar/Natural", "llmbar/Adversarial/Neighbor"} and all(v["rate"] == 1.0 for v in m["by_source"].values())


def test_mtbench_human_judgments_convert_from_llmbars_processed_file(tmp_path, capsys):
    from tether.ai.convert import main as convert

    src = ROOT.parent / "shared" / "data" / "llmbar" / "Dataset" / "Processed" / "MT-Bench" / "dataset.json"
    if not src.exists():
        pytest.skip("[data] ../shared/data is not beside this checkout")
    rows = json.loads(src.read_text())
    (tmp_path / "few.json").write_text(json.dumps(rows[:3]))
    assert convert(["llmbar", str(tmp_path / "few.json"), str(tmp_path / "few.jsonl")]) == 0
    recs = [json.loads(x) for x in (tmp_path / "few.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in recs] == [
        (w["input"], w[f"output_{w['label']}"], w[f"output_{3 - w['label']}"]) for w in rows[:3]]
    assert convert(["llmbar", str(src), str(tmp_path / "all.jsonl")]) == 0
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 200  # the README's count: no ties to skip
    capsys.readouterr()
    (tmp_path / "bad.json").write_text(json.dumps(rows[:3] + [{"input": "q", "output_1": "a", "label": 1}]))
    assert convert(["llmbar", str(tmp_path / "bad.json"), str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.json: record 3:" in err and "output_2" in err and not (tmp_path / "bad.jsonl").exists()
