"""The HTTP judge: any OpenAI-compatible chat endpoint (vLLM, llama.cpp, `tether serve`, a hosted API)
through the official `openai` client; and `sample_endpoint`, responses from one (`tether label generate
--model URL`).

Each comparison is one chat completion with max_tokens=1, temperature=0, logprobs=true, top_logprobs=5;
P(A) is read from the first token's top_logprobs (the tokens that are "A" or "B" once stripped of
whitespace, pooled). When only one option is among the top tokens the other is bounded by the smallest
listed probability (counted as `bounded`); when neither is, the comparison fails (a retry would get the
same answer at temperature 0).

Faults: a timeout, a connection error, 429 (honouring Retry-After), a 5xx or a malformed body (not JSON,
or no top_logprobs) is retried with exponential backoff, `retries` times; then the comparison fails with
the last error, which the caller reports per item. Other 4xx fail at once. `concurrency` requests run at a
time (a thread pool). Every answer is appended to the cache file (JSONL, one {key, top} per line; the key
is a SHA-256 of the endpoint and the request body) as soon as it arrives, so a run that is killed and
started again sends no request twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tether.ai.compare import OPTIONS, Comparison, JudgeError, Progress


class Malformed(Exception):
    """The endpoint answered 200 with a body we cannot read the option probabilities from."""


class RequestCache:
    """key -> the answer's top tokens, in an append-only JSONL file (a torn last line is ignored)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.data: dict[str, list] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.data[rec["key"]] = rec["top"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a killed run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def get(self, key: str) -> list | None:
        return self.data.get(key)

    def put(self, key: str, top: list) -> None:
        with self.lock:
            self.data[key] = top
            self._f.write(json.dumps({"key": key, "top": top}) + "\n")
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def parse_top(body: str) -> list[list]:
    """A chat completion's body -> [[token, logprob], ...] of its first token (the sampled one included)."""
    try:
        data = json.loads(body)
        first = data["choices"][0]["logprobs"]["content"][0]
        top = {t["token"]: float(t["logprob"]) for t in first.get("top_logprobs") or []}
        if "token" in first and "logprob" in first:
            top.setdefault(first["token"], float(first["logprob"]))
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise Malformed(f"malformed response ({type(e).__name__}: {str(e)[:80]})") from None
    if not top:
        raise Malformed("malformed response (no top_logprobs)")
    return [[t, v] for t, v in top.items()]


def option_probability(top: list[list], options=OPTIONS) -> tuple[float, bool]:
    """(P(first option) from the top tokens, whether one option had to be bounded). An option is a
    spelling or a tuple of spellings (pooled)."""
    spell = [(o,) if isinstance(o, str) else tuple(o) for o in options]
    probs = [sum(math.exp(v) for t, v in top if t.strip() in s) for s in spell]
    if not any(probs):
        shown = ", ".join(repr(t) for t, _ in top[:5])
        raise JudgeError(f"neither option {' nor '.join(repr(s[0]) for s in spell)} is among the top tokens ({shown})")
    bounded = not all(probs)
    if bounded:
        floor = min(math.exp(v) for _, v in top)
        probs = [p or floor for p in probs]
    return probs[0] / sum(probs), bounded


def endpoint_client(url: str, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 0):
    """(openai.OpenAI client, base URL ending in /v1) for an OpenAI-compatible server at `url`. The key: api_key,
    else OPENAI_API_KEY, else TETHER_API_KEY (`tether serve --api-key`'s variable), else none."""
    import openai

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("TETHER_API_KEY") or "none"
    return openai.OpenAI(base_url=base, api_key=key, timeout=timeout, max_retries=max_retries), base


def sample_endpoint(url: str, prompts: list, k: int = 1, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                    seed: int = 0, model_name: str | None = None, api_key: str | None = None, concurrency: int = 4,
                    timeout: float = 120.0, chat: bool = False) -> tuple[str, list[list[str]]]:
    """k responses for each prompt from an OpenAI-compatible server, `concurrency` requests at a time (a server
    that batches, as `tether serve` does, runs them together). A string prompt goes to /v1/completions as it is,
    as a local model folder samples it (chat=True: as one user turn to /v1/chat/completions, for chat-only
    APIs); a message list goes to /v1/chat/completions. Returns ("model@URL", responses per prompt). The
    client's own retries (2, with backoff) cover a busy server's 429/503; any other error stops the run."""
    client, base = endpoint_client(url, api_key, timeout, max_retries=2)
    name = model_name or client.models.list().data[0].id

    def one(i: int) -> list[str]:
        p, kw = prompts[i], dict(model=name, n=k, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i)
        if isinstance(p, str) and not chat:
            return [c.text for c in sorted(client.completions.create(prompt=p, **kw).choices, key=lambda c: c.index)]
        r = client.chat.completions.create(messages=[{"role": "user", "content": p}] if isinstance(p, str) else p, **kw)
        return [c.message.content or "" for c in sorted(r.choices, key=lambda c: c.index)]

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return f"{name}@{base}", list(pool.map(one, range(len(prompts))))


class HttpJudge:
    OPTIONS = ("model_name", "api_key", "timeout", "retries", "backoff", "concurrency", "cache", "top_logprobs", "options")

    def __init__(self, url: str, model_name: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 4, backoff: float = 1.0, concurrency: int = 4, cache: str | Path | None = None,
                 top_logprobs: int = 5, options=None):
        import openai

        self.openai = openai
        # our own retries (counted, with the failure kept per item), not the client's silent ones
        self.client, self.base = endpoint_client(url, api_key, timeout, max_retries=0)
        self.retries, self.backoff, self.concurrency, self.top_logprobs = retries, backoff, concurrency, top_logprobs
        self.options = options or OPTIONS  # (the module's A/B: the class's OPTIONS names the keyword arguments)
        self.cache = RequestCache(cache) if cache else None
        self.stats = {"requests": 0, "cached": 0, "retries": 0, "failed": 0, "bounded": 0}
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self.model_name = model_name or self._retry(lambda: self.client.models.list().data[0].id)
        self.identity = f"openai:{self.model_name}@{self.base}"

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _retry(self, call):
        o = self.openai
        for attempt in range(self.retries + 1):
            wait = None
            try:
                return call()
            except (o.APIConnectionError, Malformed) as e:  # APITimeoutError is an APIConnectionError
                err = e
            except o.APIStatusError as e:
                if e.status_code != 429 and e.status_code < 500:
                    raise JudgeError(f"HTTP {e.status_code}: {str(e)[:200]}") from None
                err = e
                try:
                    wait = float(e.response.headers.get("retry-after"))
                except (TypeError, ValueError):
                    wait = None
            if attempt == self.retries:
                break
            self._count("retries")
            delay = wait if wait is not None else self.backoff * 2 ** attempt * (1 + 0.1 * random.random())
            time.sleep(min(delay, 60.0))
        name = "timeout" if isinstance(err, o.APITimeoutError) else type(err).__name__
        raise JudgeError(f"failed after {self.retries + 1} attempts; last: {name}: {str(err)[:200]}")

    def request(self, c: Comparison) -> dict:
        return {"model": self.model_name, "messages": c.messages(), "max_tokens": 1, "temperature": 0,
                "logprobs": True, "top_logprobs": self.top_logprobs}

    def key(self, body: dict) -> str:
        return hashlib.sha256(json.dumps({"endpoint": self.base, **body}, sort_keys=True).encode()).hexdigest()

    def _one(self, c: Comparison) -> float | JudgeError:
        try:
            return self._judge_one(c)
        finally:
            if self._progress:
                self._progress.step()

    def _judge_one(self, c: Comparison) -> float | JudgeError:
        body = self.request(c)
        key = self.key(body)
        top = self.cache.get(key) if self.cache else None
        try:
            if top is None:
                def call():
                    self._count("requests")
                    raw = self.client.chat.completions.with_raw_response.create(**body)
                    return parse_top(raw.http_response.text)

                top = self._retry(call)
                if self.cache:
                    self.cache.put(key, top)
            else:
                self._count("cached")
            p, bounded = option_probability(top, self.options)
        except JudgeError as e:
            self._count("failed")
            return e
        if bounded:
            self._count("bounded")
        return p

    def judge(self, comps: list[Comparison]) -> list[float | JudgeError]:
        self._progress = Progress(len(comps))
        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency))
        try:
            return list(pool.map(self._one, comps))
        finally:  # on Ctrl-C, drop the queued requests (what already arrived is in the cache) instead of sending them all
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self.cache:
            self.cache.close()
