"""tether ai critique-revise (Constitutional AI's supervised phase) on a tiny model and against a local
OpenAI-compatible server; the direct AI reward for PPO."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tether.ai.constitution import load_constitution


def _prompts(path: Path, n: int = 3) -> Path:
    recs = [{"prompt": "hello there", "id": "a"}, {"prompt": [{"role": "user", "content": "is the movie good"}]},
            {"prompt": "tell me about the cat"}, {"prompt": "the dog was bad"}, {"prompt": "what is red"}][:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_critique_revise_on_a_tiny_model_writes_sft_and_pair_records(tiny_llama, tmp_path, capsys):
    from tether.cli import main
    from tether.data import load_preferences, load_sft
    from tether.generate import Sampler

    out = tmp_path / "cai"
    args = ["ai", "critique-revise", "--model", str(tiny_llama), "--prompts", str(_prompts(tmp_path / "p.jsonl", 5)), "--out", str(out),
            "--principles", "all", "--max-new-tokens", "6", "--temperature", "0", "--chunk", "2", "--device", "cpu"]
    assert main(args) == 0
    trace, sft, pairs = _read(out / "trace.jsonl"), _read(out / "sft.jsonl"), _read(out / "pairs.jsonl")
    c = load_constitution()
    assert [t["id"] for t in trace] == ["a", "p1", "p2", "p3", "p4"]
    # every intermediate text is kept, and each is the model's (greedy) answer to the conversation so far
    sampler = Sampler(str(tiny_llama), "cpu")
    t = trace[1]
    assert [r["principle"] for r in t["rounds"]] == [p.name for p in c.principles]
    conv = [{"role": "user", "content": "is the movie good"}]
    assert sampler([conv], max_new_tokens=6, temperature=0)[0][0] == t["initial"]
    conv.append({"role": "assistant", "content": t["initial"]})
    for r, p in zip(t["rounds"], c.principles):
        assert r["critique_request"] == p.critique and r["revision_request"] == p.revision
        conv.append({"role": "user", "content": p.critique})
        assert sampler([conv], max_new_tokens=6, temperature=0)[0][0] == r["critique"]
        conv += [{"role": "assistant", "content": r["critique"]}, {"role": "user", "content": p.revision}]
        assert sampler([conv], max_new_tokens=6, temperature=0)[0][0] == r["revision"]
        conv.append({"role": "assistant", "content": r["revision"]})
    assert t["revision"] == t["rounds"][-1]["revision"]
    # SFT: prompt -> final revision; pairs: revision over initial; a record not written says why
    for t in trace:
        w = t["written"]
        assert w["sft"] == bool(t["revision"].strip())
        assert w["pair"] == (w["sft"] and t["revision"].strip() != t["initial"].strip())
        assert ("skipped" in w) == (not w["pair"])
    assert len(sft) == sum(t["written"]["sft"] for t in trace) >= 1 and len(pairs) == sum(t["written"]["pair"] for t in trace) >= 1
    by_id = {t["id"]: t for t in trace}
    for s in sft:
        assert s["completion"] == by_id[s["meta"]["id"]]["revision"] and s["prompt"] == by_id[s["meta"]["id"]]["prompt"]
    for p in pairs:
        assert p["chosen"] == by_id[p["meta"]["id"]]["revision"] and p["rejected"] == by_id[p["meta"]["id"]]["initial"]
        assert p["meta"]["principles"] == [p.name for p in c.principles] and p["source"] == f"tether-cai:hf:{tiny_llama.name}"
    assert len(load_sft(str(out / "sft.jsonl"))[0]) == len(sft)  # tether sft reads it
    assert len(load_preferences(str(out / "pairs.jsonl"))[0]) == len(pairs)  # tether rm / tether dpo read it
    assert (out / "errors.jsonl").read_text() == ""
    # resume: a lost chunk is made again, the finished ones are skipped, and the files are the same
    before = {f: (out / f).read_text() for f in ("trace.jsonl", "sft.jsonl", "pairs.jsonl")}
    (out / "chunks" / "chunk-00001.jsonl").unlink()
    (out / "trace.jsonl").unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "(2 chunk(s) resumed)" in capsys.readouterr().err
    assert {f: (out / f).read_text() for f in before} == before
    # a rerun with other settings into the same folder stops with one line
    assert main(args[:-6] + ["--temperature", "0.5", "--chunk", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings" in err and "temperature" in err


def test_critique_revise_bad_input_is_one_line(tiny_llama, tmp_path, capsys):
    from tether.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    assert main(["ai", "critique-revise", "--model", str(tiny_llama), "--prompts", str(bad), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:2" in err
    assert main(["ai", "critique-revise", "--model", str(tiny_llama), "--prompts", str(_prompts(tmp_path / "p.jsonl")), "--out", str(tmp_path / "o2"),
                 "--principles", "kindness"]) == 2
    assert "no principle named 'kindness'" in capsys.readouterr().err


class ChatServer:
    """A minimal OpenAI-compatible chat endpoint that writes text: the answer names the last user turn's
    first word; a conversation whose first prompt is 'flaky' gets a 500 on its first request, 'broken' always."""

    def __init__(self):
        self.requests = 0
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "chat", "object": "model", "created": 0, "owned_by": "t"}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                srv.requests += 1
                msgs = req["messages"]
                first = msgs[0]["content"]
                if first == "broken" or (first == "flaky" and srv.requests % 2 == 1 and len(msgs) == 1):
                    return self._send(500, {"error": {"message": "boom"}})
                text = f"{msgs[-1]['content'].split()[0].lower()} reply {len(msgs)}"
                self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": req["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_critique_revise_over_http_retries_reports_and_resumes_from_its_cache(tmp_path):
    pytest.importorskip("openai")
    from tether.cli import main

    srv = ChatServer()
    try:
        p = tmp_path / "p.jsonl"
        p.write_text("".join(json.dumps({"prompt": x, "id": x}) + "\n" for x in ["flaky", "broken", "hello"]))
        args = ["ai", "critique-revise", "--model", srv.url, "--prompts", str(p), "--out", str(tmp_path / "o"), "--principles", "honesty",
                "--chunk", "1", "--retries", "1", "--backoff", "0.01", "--concurrency", "1"]
        assert main(args) == 1  # 'broken' failed: reported, and the exit status says so
        trace = {t["id"]: t for t in _read(tmp_path / "o" / "trace.jsonl")}
        assert set(trace) == {"flaky", "hello"}
        h = trace["hello"]
        assert h["initial"] == "hello reply 1" and h["rounds"][0]["critique"] == "identify reply 3" and h["revision"] == "rewrite reply 5"
        assert _read(tmp_path / "o" / "pairs.jsonl")[1] == {
            "prompt": "hello", "chosen": "rewrite reply 5", "rejected": "hello reply 1", "id": "cai/hello", "source": f"tether-cai:openai:chat@{srv.url}",
            "meta": {"principles": ["honesty"], "model": f"openai:chat@{srv.url}", "constitution": "tether-default", "id": "hello", "kind": "critique-revise"}}
        (err,) = _read(tmp_path / "o" / "errors.jsonl")
        assert err["id"] == "broken" and "failed after 2 attempts" in err["error"] and "500" in err["error"]
        n = srv.requests
        assert main(args) == 1 and srv.requests == n + 2  # the rerun asks only for what failed (twice: one retry)
    finally:
        srv.server.shutdown()
        srv.server.server_close()


# -- the direct AI reward in PPO ---------------------------------------------------------------------------


def _p_yes_by_hand(model_dir, prompt, response, principle):
    """P(Yes) from the judge model's logits at the answer position, pooled over the single-token spellings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.data import encode_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = (f"Principle ({principle.name}): {principle.comparison}\n\n[Prompt]\n{prompt}\n\n[Response]\n{response}\n\n"
            "Judged by this principle, is the response good? Answer with a single word: Yes or No.")
    ids = encode_prompt(tok, [{"role": "user", "content": text}])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    enc = lambda v: tok(v, add_special_tokens=False)["input_ids"]  # noqa: E731
    # this vocabulary: " no" is one token; "Yes"/"yes" are not, so they are read from their first tokens
    yes, no = {enc("Yes")[0], enc("yes")[0]}, {enc(" no")[0]}
    assert all(len(enc(v)) > 1 for v in ("Yes", " Yes", "yes", " yes", "No", " No", "no")) and len(enc(" no")) == 1
    py, pn = sum(math.exp(logits[t]) for t in yes), sum(math.exp(logits[t]) for t in no)
    return py / (py + pn)


def test_ppo_with_a_direct_ai_reward_logs_the_judges_probability(tiny_llama, tmp_path):
    from tiny import write_jsonl

    from tether.ai.reward import ai_judge
    from tether.algo import ppo
    from tether.config import load_config
    from tether.track import read_metrics

    c = load_constitution()
    prompts = ["hello there", "the movie was", "tell me about the cat", "is it good"]
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "reference": f"a good answer about {p}"} for p in prompts])
    cfg = load_config(ppo.PPOConfig, None, [
        f"model={tiny_llama}", f"data.train={tmp_path / 'p.jsonl'}", f"out={tmp_path / 'run'}", "reward.fn=tether.ai.reward:ai_judge",
        f"reward.kwargs={{model: {tiny_llama}, principle: harmlessness}}", "reward.missing_eos_penalty=0", "batch_size=4",
        "rollout.max_new_tokens=6", "ppo.minibatch_size=4", "max_steps=3", "engine.threads=1", "track.progress=false",
        "sample_every=1", "num_samples=4"])
    ppo.train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 3 and all(0 < r["rewards/raw_mean"] < 1 for r in rows)
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and len({round(s["reward"], 6) for s in samples}) > 1
    for s in samples[:4] + samples[-2:]:  # the logged reward is the judge's P(Yes), computed here by hand
        assert s["reward"] == pytest.approx(_p_yes_by_hand(tiny_llama, s["prompt"], s["response"], c.get("harmlessness")), abs=1e-5)
    for k in range(3):
        assert rows[k]["rewards/raw_mean"] == pytest.approx(sum(s["reward"] for s in samples[4 * k:4 * k + 4]) / 4, abs=1e-5)
    # all principles: the mean of each principle's P(Yes)
    got = ai_judge(["hello there"], ["the cat was good"], model=str(tiny_llama))
    assert got[0] == pytest.approx(sum(_p_yes_by_hand(tiny_llama, "hello there", "the cat was good", p) for p in c.principles) / 3, abs=1e-5)
    # against the record's reference: P(response better), both orders averaged, from the A/B judge
    from tether.ai.judge import Comparison, LocalJudge

    (p_ref,) = ai_judge(["is it good"], ["no"], model=str(tiny_llama), principle="honesty", references=str(tmp_path / "p.jsonl"))
    lj, h = LocalJudge(str(tiny_llama), device="cpu"), c.get("honesty")
    fwd, rev = lj.judge([Comparison("is it good", "no", "a good answer about is it good", h), Comparison("is it good", "a good answer about is it good", "no", h)])
    assert p_ref == pytest.approx((fwd + 1 - rev) / 2, abs=1e-6)
    with pytest.raises(Exception, match="no reference for the prompt 'unknown'"):
        ai_judge(["unknown"], ["x"], model=str(tiny_llama), references=str(tmp_path / "p.jsonl"))


def test_an_http_rating_pools_the_yes_and_no_spellings():
    from tether.ai.compare import YES_NO
    from tether.ai.http import option_probability

    top = [["Yes", math.log(0.5)], [" yes", math.log(0.1)], [" no", math.log(0.2)], ["No", math.log(0.1)], ["A", math.log(0.05)]]
    assert option_probability(top, YES_NO) == (pytest.approx(0.6 / 0.9), False)
    assert option_probability([["Yes", math.log(0.7)], ["x", math.log(0.1)]], YES_NO) == (pytest.approx(0.7 / 0.8), True)  # No bounded
    assert option_probability([["A", math.log(0.8)], ["B", math.log(0.2)]]) == (pytest.approx(0.8), False)  # the A/B default unchanged


def test_a_mistyped_model_is_one_line_and_the_fixed_rerun_runs(tiny_llama, tmp_path, capsys):
    from tether.cli import main

    args = ["ai", "critique-revise", "--prompts", str(_prompts(tmp_path / "p.jsonl", 1)), "--out", str(tmp_path / "o"), "--max-new-tokens", "4",
            "--device", "cpu"]
    assert main([*args, "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err
    assert main([*args, "--model", "http://127.0.0.1:9/v1", "--retries", "0", "--timeout", "2"]) == 2  # nothing listens on port 9
    assert capsys.readouterr().err.strip().startswith("tether ai critique-revise: --model http://127.0.0.1:9/v1: failed after 1 attempts")
    assert main([*args, "--model", str(tiny_llama)]) == 0
