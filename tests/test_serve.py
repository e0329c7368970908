"""`tether serve`: real server processes on 127.0.0.1, called with the official openai client."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-tether-test"
BODY_LIMIT = 20_000
HELLO = [{"role": "user", "content": "hello there, tell me about the movie"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, log: Path, *args: str):
        self.port, self.model = _free_port(), str(model)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TETHER_API_KEY": ""}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tether.cli", "serve", "--model", str(model), "--port", str(self.port), *args],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env,
        )

    def wait(self, timeout: float = 120.0) -> "Server":
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not answer within {timeout} s: {self.log.read_text()[-2000:]}")

    def client(self, key: str | None = KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", **kw)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny import make_tiny_model_dir

    from tether.checkpoint import save_model_folder
    from tether.models import load_scalar_model, load_tokenizer, save_reward_stats

    root = tmp_path_factory.mktemp("serve")
    policy = make_tiny_model_dir(root / "policy", "llama", chat_template=True)
    slow = make_tiny_model_dir(root / "slow", "llama", chat_template=True, hidden=128, layers=4)
    tok = load_tokenizer(policy)
    save_model_folder(load_scalar_model(policy, pad_token_id=tok.pad_token_id), root / "rm", tok)
    save_reward_stats(root / "rm", 0.5, 2.0)
    return {"policy": policy, "slow": slow, "rm": root / "rm", "root": root}


@pytest.fixture(scope="module")
def servers(models):
    # started together: most of a start is importing torch and transformers, which overlap
    root = models["root"]
    s = {
        "main": Server(models["policy"], root / "main.log", "--api-key", KEY, "--max-body-bytes", str(BODY_LIMIT), "--served-model-name", "tiny"),
        "busy": Server(models["slow"], root / "busy.log", "--max-queue", "1", "--max-batch", "1"),
        "rm": Server(models["rm"], root / "rm.log", "--served-model-name", "tiny-rm"),
    }
    try:
        for v in s.values():
            v.wait()
        yield s
    finally:
        for v in s.values():
            v.stop()


def _chat(client, messages=HELLO, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, **kw)


def test_models_chat_and_usage(servers, models):
    from tether.data import encode_prompt
    from tether.models import load_tokenizer

    c = servers["main"].client()
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = _chat(c, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    # the prompt went through the model's chat template, exactly as training encodes it
    assert r.usage.prompt_tokens == len(encode_prompt(load_tokenizer(models["policy"]), HELLO))
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_equals_tether_generate(servers, models, capsys):
    from tether.generate import main as generate

    assert generate(["--model", str(models["policy"]), "--prompt", HELLO[0]["content"], "--temperature", "0", "--max-new-tokens", "12"]) == 0
    want = json.loads(capsys.readouterr().out.splitlines()[0])["response"]
    got = _chat(servers["main"].client(), max_tokens=12, temperature=0).choices[0].message.content
    assert want and got == want


def test_streaming_matches_the_whole_response(servers):
    c = servers["main"].client()
    # 40 tokens: three segments of --stream-chunk 16, each continuing the last one's sequence
    whole = _chat(c, max_tokens=40, temperature=0)
    chunks = list(_chat(c, max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # a stop string is found across segments, and no text past it is ever sent
    text = whole.choices[0].message.content
    stop = text[len(text) * 3 // 4 : len(text) * 3 // 4 + 3]
    cut = _chat(c, max_tokens=40, temperature=0, stop=stop)
    streamed = list(_chat(c, max_tokens=40, temperature=0, stop=stop, stream=True, n=2))
    for i in (0, 1):
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices and ch.choices[0].index == i) == cut.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in streamed if ch.choices[0].finish_reason] == ["stop", "stop"]
    lp = [ch.choices[0].logprobs.content[0] for ch in _chat(c, max_tokens=20, temperature=0, stream=True, logprobs=True, top_logprobs=2)
          if ch.choices and ch.choices[0].logprobs]
    assert len(lp) == 20 and all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in lp)
    # the raw stream ends as OpenAI's does
    raw = httpx.post(servers["main"].url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"prompt": "the movie", "max_tokens": 4, "stream": True}, timeout=30)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_a_stream_sends_its_first_tokens_before_the_last_are_generated(servers):
    s = servers["busy"]
    c = s.client(key=None)
    t0 = time.monotonic()
    arrivals = [time.monotonic() - t0 for ch in c.completions.create(model=s.model, prompt="the movie", max_tokens=200, temperature=0, stream=True)
                if ch.choices and ch.choices[0].text]
    assert len(arrivals) > 100
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])  # 16 of 200 tokens: about 1/12 of the time


def test_n_samples_and_completions(servers):
    c = servers["main"].client()
    r = _chat(c, max_tokens=8, temperature=1.0, top_p=0.9, n=4)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert len({ch.message.content for ch in r.choices}) > 1  # sampled, not one answer copied
    cr = c.completions.create(model="tiny", prompt=["the movie was", "a story"], max_tokens=5, n=2, temperature=0)
    assert cr.object == "text_completion" and len(cr.choices) == 4
    # greedy: the n samples of a prompt agree, and each prompt is answered on its own
    assert cr.choices[0].text == cr.choices[1].text and cr.choices[2].text == cr.choices[3].text
    a, b = (c.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0) for p in ("the movie was", "a story"))
    assert [a.choices[0].text, b.choices[0].text] == [cr.choices[0].text, cr.choices[2].text]
    # a prompt is counted once, however many samples it has; every sample's tokens are counted
    assert cr.usage.prompt_tokens == a.usage.prompt_tokens + b.usage.prompt_tokens
    assert cr.usage.completion_tokens == 2 * (a.usage.completion_tokens + b.usage.completion_tokens)
    # more rows than --max-batch (16) are generated in several batches, each answered
    many = c.completions.create(model="tiny", prompt="a story", max_tokens=5, n=20, temperature=0)
    assert [ch.text for ch in many.choices] == [b.choices[0].text] * 20


def test_stop_strings(servers):
    c = servers["main"].client()
    full = _chat(c, max_tokens=16, temperature=0).choices[0].message.content
    assert len(full) >= 6
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = _chat(c, max_tokens=16, temperature=0, stop=stop)
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    r2 = _chat(c, max_tokens=16, temperature=0, stop=["\x00never", stop])
    assert r2.choices[0].message.content == full[: full.find(stop)]
    assert r2.usage.completion_tokens < 16


def test_logprobs(servers):
    c = servers["main"].client()
    r = _chat(c, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        # greedy picks the most likely token, so its logprob is the top one
        assert t.logprob == pytest.approx(tops[0], abs=1e-5) and t.token == t.top_logprobs[0].token
    cr = c.completions.create(model="tiny", prompt="the movie", max_tokens=5, temperature=0, logprobs=2)
    lp = cr.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == cr.usage.completion_tokens
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)


def test_concurrent_clients_are_batched_and_kept_apart(servers):
    s = servers["main"]
    c = s.client()
    prompts = [[{"role": "user", "content": f"question {i}: what is a {w}"}] for i, w in enumerate(["cat", "dog", "film", "plot", "song", "scene"])]
    alone = [_chat(c, messages=p, max_tokens=40, temperature=0).choices[0].message.content for p in prompts]
    before = httpx.get(s.url + "/health").json()
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(prompts))

    def ask(i):
        cl = s.client()
        barrier.wait()
        results[i] = _chat(cl, messages=prompts[i], max_tokens=40, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = httpx.get(s.url + "/health").json()
    assert [results.get(i) for i in range(len(prompts))] == alone  # each client gets its own answer
    assert after["requests"] - before["requests"] == len(prompts)
    assert after["batches"] - before["batches"] < len(prompts)  # some requests shared a batch


def _error(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_requests_answer_4xx_in_openai_shape(servers):
    s = servers["main"]
    c = s.client()
    auth = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(c, messages=[{"role": "user", "content": " ".join(["the movie was good"] * 200)}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(c, max_tokens=250)  # the prompt plus 250 tokens is over the context of 256
    assert e.value.body["code"] == "context_length_exceeded"
    for bad in ({"max_tokens": -1}, {"n": 0}, {"temperature": -0.5}, {"top_p": 0}, {"stop": 3}, {"top_logprobs": 50, "logprobs": True}):
        r = httpx.post(s.url + "/v1/chat/completions", headers=auth, json={"model": "tiny", "messages": HELLO, **bad}, timeout=30)
        assert r.status_code == 400, (bad, r.text)
        assert _error(r)["param"] == next(iter(bad))
    for body in (b"{not json", b"[1, 2]", json.dumps({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}).encode(),
                 json.dumps({"model": "tiny"}).encode()):
        r = httpx.post(s.url + "/v1/chat/completions", headers={**auth, "Content-Type": "application/json"}, content=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        _error(r)
    r = httpx.post(s.url + "/v1/completions", headers=auth, json={"model": "tiny", "prompt": "x" * (BODY_LIMIT + 1)}, timeout=30)
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    r = httpx.post(s.url + "/v1/score", headers=auth, json={"prompt": "a", "response": "b"}, timeout=30)
    assert r.status_code == 400 and _error(r)["code"] == "wrong_model_kind"
    assert httpx.get(s.url + "/v1/nothing-here", headers=auth).status_code == 404


def test_api_key(servers):
    s = servers["main"]
    with pytest.raises(openai.AuthenticationError) as e:
        s.client(key="sk-wrong").models.list()
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO})
    assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
    assert servers["rm"].client(key=None).models.list().data[0].id == "tiny-rm"  # no key set: open


def test_a_full_queue_answers_503_at_once(servers):
    s = servers["busy"]
    n = 10
    out: list = [None] * n
    barrier = threading.Barrier(n)

    def ask(i):
        cl = s.client(key=None, max_retries=0)
        barrier.wait()
        t0 = time.monotonic()
        try:
            cl.completions.create(model=s.model, prompt=f"the movie {i}", max_tokens=200, temperature=0)
            out[i] = (200, time.monotonic() - t0, None)
        except openai.APIStatusError as e:
            out[i] = (e.status_code, time.monotonic() - t0, e.response.headers.get("retry-after"))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = [o[0] for o in out]
    assert set(codes) <= {200, 503}, codes
    assert 200 in codes and 503 in codes, codes
    busy = [o for o in out if o[0] == 503]
    assert all(o[2] == "1" for o in busy)
    assert max(o[1] for o in busy) < min(o[1] for o in out if o[0] == 200) + 1  # refused without waiting for a slot


def test_score_endpoint_uses_tethers_scorer(servers, models):
    from tether.backends.reward_server import RewardScorer

    s = servers["rm"]
    prompts = ["the movie was", [{"role": "user", "content": "tell me a story"}]]
    responses = ["great fun", "a cat and a dog"]
    want = RewardScorer(str(models["rm"]), device="cpu")(prompts, responses)
    r = httpx.post(s.url + "/v1/score", json={"model": "tiny-rm", "prompt": prompts, "response": responses}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == pytest.approx(want, abs=1e-4)
    one = httpx.post(s.url + "/v1/score", json={"prompt": "the movie was", "response": "great fun"}, timeout=30).json()
    assert one["score"] == pytest.approx(want[0], abs=1e-4)
    # the reward server's field names work too, so PPO's http_reward can point here
    from tether.backends.reward_server import http_reward

    assert http_reward(["the movie was"], ["great fun"], url=s.url + "/v1/score") == pytest.approx(want[:1], abs=1e-4)
    r = httpx.post(s.url + "/v1/score", json={"prompt": ["a"], "response": ["b", "c"]})
    assert r.status_code == 400 and _error(r)["param"] == "response"
    with pytest.raises(openai.BadRequestError) as e:
        s.client(key=None).chat.completions.create(model="tiny-rm", messages=HELLO)
    assert e.value.body["code"] == "wrong_model_kind"


def test_vllm_backend_missing_is_one_clear_line(models):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("[optional] vLLM is installed here")
    out = subprocess.run([sys.executable, "-m", "tether.cli", "serve", "--model", str(models["policy"]), "--backend", "vllm"],
                         capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "pip install vllm" in lines[0], out.stderr


def test_a_bad_folder_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tether.cli", "serve", "--model", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "does not exist" in lines[0], out.stderr


class _SlowScorer:
    """A stand-in backend whose batches take `delay` seconds: the queue and timeout without a model."""

    kind = "score"

    def __init__(self, delay: float):
        self.delay = delay

    def run(self, jobs):
        time.sleep(self.delay)
        return [[0.0] * len(j.payload["prompts"]) for j in jobs]


def test_timeout_and_queue_limits_in_process():
    from fastapi.testclient import TestClient

    from tether.serve import Settings, make_app

    app = make_app(_SlowScorer(1.0), Settings("slow", max_queue=1, max_batch=1, timeout=0.3))
    with TestClient(app) as tc:
        t0 = time.monotonic()
        r = tc.post("/v1/score", json={"prompt": "a", "response": "b"})
        assert r.status_code == 504 and _error(r)["code"] == "timeout"
        assert time.monotonic() - t0 < 0.9  # answered at the timeout, not when the batch ended
    app = make_app(_SlowScorer(0.5), Settings("slow", max_queue=1, max_batch=1, timeout=10))
    with TestClient(app) as tc:
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(tc.post("/v1/score", json={"prompt": "a", "response": "b"}).status_code))
                   for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)  # the first is running, the second waits, the rest find the queue full
        for t in threads:
            t.join(10)
        assert sorted(codes) == [200, 200, 503, 503]


def test_the_load_script_measures_a_running_server(servers):
    from benchmarks.serve_load import run_level

    r = run_level(servers["main"].url + "/v1", "tiny", clients=3, requests=2, max_tokens=6, temperature=1.0, api_key=KEY)
    assert r["requests"] == 6 and r["errors"] == 0
    assert 0 < r["completion_tokens"] <= 36 and r["tokens_per_s"] > 0
    assert 0 < r["p50_s"] <= r["p95_s"]


def test_label_generate_from_a_served_model_equals_local_generation_without_torch(servers, models, tmp_path):
    """`tether label generate --model http://.../v1`: tasks for the annotation app from any OpenAI-compatible
    server (here `tether serve`); greedy responses equal sampling the folder locally, and the command imports
    no torch (the feedback package's rule) since the model runs in the server."""
    from tether.generate import sample_responses

    prompts = ["hello there, tell me about the movie", "what did you think of the ending"]
    pfile = tmp_path / "p.jsonl"
    pfile.write_text("".join(json.dumps({"prompt": p, "id": f"q{i}"}) + "\n" for i, p in enumerate(prompts)))
    url, db = servers["main"].url + "/v1", str(tmp_path / "l.db")
    code = (
        "import sys\nfrom tether.cli import main\n"
        f"assert main(['label', 'create-project', 'p', '--kind', 'compare', '--db', {db!r}]) == 0\n"
        f"assert main(['label', 'generate', '--model', {url!r}, '--api-key', {KEY!r}, '--prompts', {str(pfile)!r}, '-k', '2',"
        f" '--temperature', '0', '--max-new-tokens', '8', '--out', {str(tmp_path / 'greedy.jsonl')!r}, '--project', 'p', '--db', {db!r}]) == 0\n"
        f"assert main(['label', 'generate', '--model', {url!r}, '--api-key', {KEY!r}, '--prompts', {str(pfile)!r}, '-k', '3',"
        f" '--max-new-tokens', '8', '--chat', '--out', {str(tmp_path / 'sampled.jsonl')!r}, '--db', {db!r}]) == 0\n"
        "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "HEAVY []" in r.stdout and "imported 2 items from 2 prompts into 'p'" in r.stdout
    greedy = [json.loads(x) for x in (tmp_path / "greedy.jsonl").read_text().splitlines()]
    want = sample_responses(str(models["policy"]), prompts, k=1, max_new_tokens=8, temperature=0.0)
    assert [g["id"] for g in greedy] == ["q0", "q1"] and all(g["meta"]["model"] == f"tiny@{url}" for g in greedy)
    assert [g["responses"] for g in greedy] == [[w[0], w[0]] for w in want] and all(w[0] for w in want)
    sampled = [json.loads(x) for x in (tmp_path / "sampled.jsonl").read_text().splitlines()]
    assert [len(s["responses"]) for s in sampled] == [3, 3]  # --chat: each prompt a user turn of the chat template
    # a server that is not there: one line, not a traceback
    bad = subprocess.run([sys.executable, "-m", "tether.cli", "label", "generate", "--model", f"http://127.0.0.1:{_free_port()}/v1",
                          "--prompts", str(pfile), "--out", str(tmp_path / "x.jsonl"), "--db", db],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"tether label generate: cannot reach http://127.0.0.1:"), bad.stderr
