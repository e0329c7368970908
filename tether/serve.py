"""`tether serve --model DIR`: an OpenAI-compatible HTTP server for any tether output folder.

    tether serve --model runs/ppo/final                    # http://127.0.0.1:8000/v1
    tether serve --model runs/rm/final --port 8300         # a reward model: POST /v1/score

GET /v1/models, POST /v1/chat/completions (the model's chat template, as training and `tether generate`
format prompts), POST /v1/completions (text as is), POST /v1/score (reward models: {"prompt", "response"},
strings, message lists or lists of them -> {"scores": [...]}, tether's one scoring convention).
Supported: stream (server-sent events), n, temperature, top_p, max_tokens, stop, seed, logprobs
(chat: logprobs + top_logprobs; completions: logprobs=k), usage. Other OpenAI fields are ignored.

Generation goes through the Rollout seam (tether/rollout): one worker thread takes requests from a
bounded queue and runs the waiting requests whose sampling settings match as one batch. A full queue
answers 503 with Retry-After at once; a request waits at most --timeout seconds (then 504).
Logprobs are the model's own (temperature 1, before top_p), from one teacher-forced pass over the
sampled tokens, as vLLM reports them by default. The Rollout seam returns whole responses, so a
streamed request is generated --stream-chunk tokens at a time (each segment continues the last one's
sequence, one more prefill each) and its text is sent after every segment; a stream stops at a stop
string, an answer without streaming is cut at it after generation.
"""


import argparse
import asyncio
import copy
import hmac
import json
import os
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAX_TOP_LOGPROBS = 20  # OpenAI's own limit


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- Requests and the queue -------------------------------------------------------------------------


@dataclass
class Job:
    """One HTTP request's work. `key` says which jobs may share a batch; `rows` is its batch size."""

    kind: str  # "generate" or "score"
    key: tuple
    rows: int
    payload: Any
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)
    events: asyncio.Queue | None = field(default=None, repr=False)  # a streamed request's progress
    cancelled: bool = False  # its client went away or its time ran out: the worker drops its rows

    def gone(self) -> bool:
        return self.cancelled or self.future.done()

    def emit(self, item: tuple) -> None:
        """A streamed request's ("delta", [...]), ("end", result) or ("error", ApiError), from the worker."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop that asked is closed (a server shutting down): nobody waits for it
            pass

    def finish(self, result=None, error: Exception | None = None) -> None:
        if self.events is not None:
            return self.emit(("error", error) if error is not None else ("end", result))

        def _set():
            if self.future.done():  # the client's wait timed out or it went away
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the loop that asked is closed (a server shutting down): nobody waits for it
            pass


class JobQueue:
    """A bounded FIFO from which the worker takes a batch: the oldest job and every waiting job with the
    same key, up to max_rows rows. queue.Queue cannot take matching items out of the middle."""

    def __init__(self, maxsize: int):
        self.maxsize, self.items, self.cv = maxsize, deque(), threading.Condition()
        self.taken = {"requests": 0, "batches": 0}  # /health shows them: is batching happening?

    def put(self, job: Job) -> bool:
        with self.cv:
            if len(self.items) >= self.maxsize:
                return False
            self.items.append(job)
            self.cv.notify()
            return True

    def take(self, max_rows: int) -> list[Job]:
        with self.cv:
            while not self.items:
                self.cv.wait()
            batch = [self.items.popleft()]
            rows = batch[0].rows
            for job in list(self.items):
                if job.key == batch[0].key and rows + job.rows <= max_rows:
                    self.items.remove(job)
                    batch.append(job)
                    rows += job.rows
            self.taken["requests"] += len(batch)
            self.taken["batches"] += 1
            return batch


def worker_loop(queue: JobQueue, backend, max_rows: int) -> None:
    while True:
        try:
            run_batch(queue.take(max_rows), backend)
        except Exception as e:  # noqa: BLE001 - the worker must outlive any one batch, or every later request waits
            print(f"tether serve: the worker caught {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def run_batch(jobs: list[Job], backend) -> None:
    """Answer each job: its result, its timeout (it waited too long to start), or the batch's error."""
    now = time.monotonic()
    live = [j for j in jobs if j.deadline > now and not j.gone()]
    for j in jobs:
        if j not in live:
            j.finish(error=_timeout())
    if not live:
        return
    try:
        results = backend.run(live)
    except ApiError as e:
        for j in live:
            j.finish(error=e)
        return
    except Exception as e:  # noqa: BLE001 - a failed batch answers its requests in one line
        print(f"tether serve: a batch failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        for j in live:
            j.finish(error=ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error"))
        return
    for j, r in zip(live, results):
        j.finish(r)


def _timeout() -> ApiError:
    return ApiError(504, "the request took longer than the server's --timeout allows", "timeout", code="timeout")


# -- Backends: what the worker runs ---------------------------------------------------------------


@dataclass
class Choice:
    tokens: list[int]
    pieces: list[str]  # decoded text of each token (joined: the response text)
    finish_reason: str
    logprobs: list[float] | None = None
    top: list[list[tuple[str, float]]] | None = None
    texts: list[str] | None = None  # each token's own text, as logprobs name it


def token_pieces(tokenizer, tokens: list[int], final: bool = True) -> list[str]:
    """The text each token adds: prefix decodes differenced, so that the pieces join to the decoded
    response (a token holding half a UTF-8 character adds nothing until the character is complete; a
    response still being generated (final=False) keeps its trailing half character back too, so that a
    piece once streamed never changes)."""
    pieces, text = [], ""
    for i in range(len(tokens)):
        full = tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)
        if full.endswith("\ufffd") and (i < len(tokens) - 1 or not final):
            pieces.append("")
            continue
        pieces.append(full[len(text):] if full.startswith(text) else full)
        text = full if full.startswith(text) else text + full
    return pieces


def apply_stop(choice: Choice, stop: list[str]) -> Choice:
    """Cut the text before the first stop string; the tokens kept are those that begin before it."""
    text = "".join(choice.pieces)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut < 0:
        return choice
    keep, start = [], 0
    for i, p in enumerate(choice.pieces):
        if start >= cut:
            break
        keep.append(p[: cut - start])
        start += len(p)
    n = len(keep)
    cut_list = lambda v: None if v is None else v[:n]  # noqa: E731
    return Choice(choice.tokens[:n], keep, "stop", cut_list(choice.logprobs), cut_list(choice.top), cut_list(choice.texts))


@dataclass
class _Row:
    """One streamed response as it grows: its tokens, and how many of them its client has been sent."""

    job: Job
    index: int  # the choice's index in the response
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top: list | None = None
    texts: list[str] | None = None
    finish: str | None = None
    sent: int = 0

    def choice(self, tokenizer) -> Choice:
        return Choice(self.tokens, token_pieces(tokenizer, self.tokens, final=self.finish is not None), self.finish or "length",
                      self.logprobs, self.top, self.texts)


class Generator:
    """A causal LM behind a Rollout (tether.rollout's backend table: hf, vllm)."""

    kind = "generate"

    def __init__(self, model_dir: str, backend: str = "hf", device: str = "auto", max_rows: int = 16, stream_chunk: int = 16):
        from tether.generate import context_length
        from tether.models import eos_ids, load_causal_lm, load_tokenizer, resolve_device
        from tether.rollout import rollout_class

        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(model_dir)  # the worker thread's (the rollout decodes with it)
        # the request handlers' own copy: a Rust tokenizer used from two threads at once can fail ("Already borrowed")
        self.encoder = copy.deepcopy(self.tokenizer)
        self.model = load_causal_lm(model_dir, self.device).eval()
        self.rollout = rollout_class(backend)(self.model, self.tokenizer, self.device)
        self.eos = eos_ids(self.tokenizer, self.model)
        self.context = context_length(self.model)
        self.max_rows = max_rows  # one request's rows (prompts x n) beyond this are generated in several batches
        self.stream_chunk = stream_chunk  # tokens a streamed response gets per segment

    def encode(self, prompt) -> list[int]:
        """A string as is, a message list through the chat template: the ids `tether generate` sends."""
        from tether.data import encode_prompt, pad_id

        ids = encode_prompt(self.encoder, prompt)
        tok = self.encoder
        return ids or [tok.bos_token_id if tok.bos_token_id is not None else pad_id(tok)]

    def _generate(self, rows: list[list[int]], sampling) -> list[tuple[list[int], bool]]:
        """Prompt ids per row -> (response tokens without EOS, whether it reached EOS), max_rows at a time."""
        from tether.data import collate_prompts, pad_id

        out_rows = []
        for s in range(0, len(rows), self.max_rows):
            out = self.rollout.generate(collate_prompts(rows[s : s + self.max_rows], pad_id(self.tokenizer)), sampling)
            for i in range(out.sequences.shape[0]):
                keep = out.response_mask[i].bool().tolist()
                toks = [t for t, k in zip(out.sequences[i, out.prompt_length:].tolist(), keep) if k and t not in self.eos]
                out_rows.append((toks, bool(out.finished[i])))
        return out_rows

    def run(self, jobs: list[Job]) -> list[list[list[Choice]]]:
        """-> per job, per prompt, its n choices."""
        import torch

        from tether.rollout import SamplingConfig

        temperature, top_p, max_tokens, seed, stream = jobs[0].key
        if seed is not None:
            torch.manual_seed(seed)
        if stream:
            return self._stream(jobs, temperature, top_p, max_tokens)
        rows = [ids for j in jobs for ids in j.payload["prompts"] for _ in range(j.payload["n"])]
        sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)
        choices = [Choice(toks, token_pieces(self.tokenizer, toks), "stop" if eos else "length") for toks, eos in self._generate(rows, sampling)]
        results, r = [], 0
        for j in jobs:
            per_prompt = []
            for ids in j.payload["prompts"]:
                cs = choices[r : r + j.payload["n"]]
                r += j.payload["n"]
                if j.payload["logprobs"] is not None:
                    cs = [self._with_logprobs(ids, c, j.payload["logprobs"]) for c in cs]
                per_prompt.append([apply_stop(c, j.payload["stop"]) if j.payload["stop"] else c for c in cs])
            results.append(per_prompt)
        return results

    def _stream(self, jobs: list[Job], temperature: float, top_p: float, max_tokens: int) -> list[list[list[Choice]]]:
        """Generate `stream_chunk` tokens at a time, each segment's prompt the last one's sequence, and send
        every job the new text after each segment. The Rollout seam returns whole responses, so this is how
        a stream gets its first tokens before the last: sampling from the continued prompt draws from the
        same distribution, at the cost of one prefill per segment."""
        from tether.rollout import SamplingConfig

        rows = [_Row(j, p * j.payload["n"] + k, ids) for j in jobs for p, ids in enumerate(j.payload["prompts"]) for k in range(j.payload["n"])]
        while True:
            now = time.monotonic()
            active = [r for r in rows if r.finish is None and not r.job.gone() and r.job.deadline > now]
            if not active:
                break
            step = min(self.stream_chunk, max_tokens - len(active[0].tokens))  # active rows all have as many tokens
            sampling = SamplingConfig(max_new_tokens=step, temperature=temperature, top_p=top_p)
            for r, (toks, eos) in zip(active, self._generate([r.prompt + r.tokens for r in active], sampling)):
                k = r.job.payload["logprobs"]
                if k is not None:
                    lp = self._with_logprobs(r.prompt + r.tokens, Choice(toks, [], ""), k)
                    r.logprobs, r.top, r.texts = (r.logprobs or []) + lp.logprobs, (r.top or []) + lp.top, (r.texts or []) + lp.texts
                r.tokens = r.tokens + toks
                r.finish = "stop" if eos else "length" if len(r.tokens) >= max_tokens else None
            for job in {id(r.job): r.job for r in active}.values():
                deltas = [d for d in (self._delta(r) for r in active if r.job is job) if d is not None]
                if deltas:
                    job.emit(("delta", deltas))
        return [[[r.choice(self.tokenizer) for r in rows if r.job is j][p * j.payload["n"] : (p + 1) * j.payload["n"]]
                 for p in range(len(j.payload["prompts"]))] for j in jobs]

    def _delta(self, r: "_Row") -> tuple | None:
        """(choice index, the tokens not yet sent as a Choice, their text offset), or None: nothing new. Stop
        strings are looked for in the whole text so far; while a row goes on, its last len(stop) - 1
        characters are kept back (they may begin a stop string)."""
        c = r.choice(self.tokenizer)
        stop = r.job.payload["stop"]
        if stop:
            cut = apply_stop(c, stop)
            if cut is not c:
                r.finish, c = "stop", cut
                r.tokens, r.logprobs, r.top, r.texts = cut.tokens, cut.logprobs, cut.top, cut.texts
        upto = len(c.tokens)
        if r.finish is None and stop:
            limit, end, upto = len("".join(c.pieces)) - (max(map(len, stop)) - 1), 0, 0
            while upto < len(c.pieces) and end + len(c.pieces[upto]) <= limit:
                end += len(c.pieces[upto])
                upto += 1
        if upto <= r.sent and r.finish is None:
            return None
        part = lambda v: None if v is None else v[r.sent : upto]  # noqa: E731
        d = (r.index, Choice(c.tokens[r.sent : upto], c.pieces[r.sent : upto], r.finish, part(c.logprobs), part(c.top), part(c.texts)),
             sum(len(p) for p in c.pieces[: r.sent]))
        r.sent = upto
        return d

    def _with_logprobs(self, prompt: list[int], c: Choice, k: int) -> Choice:
        """The model's log-probabilities of the sampled tokens and its k most likely ones at each step."""
        import torch

        if not c.tokens:
            return Choice(c.tokens, c.pieces, c.finish_reason, [], [], [])
        seq = torch.tensor([prompt + c.tokens], device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=seq).logits[0, len(prompt) - 1 : -1].float()  # [R, V]
        logp = torch.log_softmax(logits, -1)
        chosen = logp.gather(1, seq[0, len(prompt):, None]).squeeze(1).tolist()
        top = []
        if k > 0:
            vals, idx = logp.topk(k, -1)
            for v_row, i_row in zip(vals.tolist(), idx.tolist()):
                top.append([(self.tokenizer.decode([t]), v) for t, v in zip(i_row, v_row)])
        else:
            top = [[] for _ in c.tokens]
        return Choice(c.tokens, c.pieces, c.finish_reason, chosen, top, [self.tokenizer.decode([t]) for t in c.tokens])


class RewardBackend:
    """A reward model: (prompt, response) -> its scalar reward (tether.backends.reward_server.RewardScorer)."""

    kind = "score"

    def __init__(self, model_dir: str, device: str = "auto", normalize: bool = False, head: str | None = None, batch_size: int = 16):
        from tether.backends.reward_server import RewardScorer

        self.scorer = RewardScorer(model_dir, batch_size, normalize, device)
        if head is not None:
            self.scorer.scorer.use_head(head)
        elif self.scorer.scorer.heads:
            from tether.models import ModelError

            raise ModelError(f"{model_dir} has the reward heads {self.scorer.scorer.heads}; choose one with --head")

    def run(self, jobs: list[Job]) -> list[list[float]]:
        prompts = [p for j in jobs for p in j.payload["prompts"]]
        responses = [r for j in jobs for r in j.payload["responses"]]
        scores, out, s = self.scorer(prompts, responses), [], 0
        for j in jobs:
            out.append(scores[s : s + len(j.payload["prompts"])])
            s += len(j.payload["prompts"])
        return out


# -- Request parsing -------------------------------------------------------------------------------


def _number(body: dict, key: str, default, lo=None, hi=None, integer: bool = False):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", param=key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(400, f"'{key}' must be {bounds}, got {v}", param=key)
    return v


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    return stop


def _messages(v) -> list[dict]:
    """OpenAI messages (content a string or text parts) -> tether's [{"role", "content"}]."""
    from tether.data.records import BadRecord, messages_field

    if isinstance(v, list):
        v = [dict(m, content="".join(p.get("text", "") for p in m["content"] if isinstance(p, dict)))
             if isinstance(m, dict) and isinstance(m.get("content"), list) else m for m in v]
        # OpenAI's newer name for the system turn; the chat templates tether trains with know "system"
        v = [dict(m, role="system") if isinstance(m, dict) and m.get("role") == "developer" else m for m in v]
    try:
        return messages_field(v, "messages")
    except BadRecord as e:
        raise ApiError(400, str(e), param="messages") from None


def _completion_prompts(gen: Generator, v) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids or a list of those."""
    if isinstance(v, str):
        return [gen.encode(v)]
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return [list(v)]
    if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        return [gen.encode(p) for p in v]
    if isinstance(v, list) and v and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in v):
        return [list(p) for p in v]
    raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")


def generation_job(gen: Generator, body: dict, chat: bool, default_max_tokens: int, max_n: int) -> dict:
    """Validate a request body -> the job payload and its batch key."""
    if chat:
        if "messages" not in body:
            raise ApiError(400, "'messages' is required", param="messages")
        prompts = [gen.encode(_messages(body["messages"]))]
    else:
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", param="prompt")
        prompts = _completion_prompts(gen, body["prompt"])
    vocab = len(gen.encoder)
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
    n = _number(body, "n", 1, 1, max_n, integer=True)
    temperature = float(_number(body, "temperature", 1.0, 0, 2))
    top_p = float(_number(body, "top_p", 1.0, 0, 1))
    if top_p == 0:
        raise ApiError(400, "'top_p' must be greater than 0", param="top_p")
    limit_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, limit_key, None, 1, integer=True)
    seed = _number(body, "seed", None, integer=True)
    param = "messages" if chat else "prompt"
    longest = max(len(p) for p in prompts)
    if gen.context is not None:
        room = gen.context - longest
        if room < 1:
            raise ApiError(400, f"the prompt is {longest} tokens, and the model's context is {gen.context}: no room for a response",
                           param=param, code="context_length_exceeded")
        if max_tokens is not None and longest + max_tokens > gen.context:
            raise ApiError(400, f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) is over the model's context of "
                           f"{gen.context} tokens; ask for {room} or fewer", param=limit_key, code="context_length_exceeded")
        max_tokens = max_tokens or min(default_max_tokens, room)
    max_tokens = max_tokens or default_max_tokens
    if chat:
        lp = None
        if body.get("logprobs"):
            lp = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    else:
        lp = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if temperature == 0:
        top_p, seed = 1.0, None  # greedy: top_p and seed change nothing, so such requests share a batch
    return {"key": (temperature, top_p, max_tokens, seed, bool(body.get("stream"))), "rows": len(prompts) * n,
            "payload": {"prompts": prompts, "n": n, "stop": _stop(body), "logprobs": lp}}


def score_job(body: dict) -> dict:
    """{"prompt", "response"}: strings (or message-list prompts), or lists of them ("prompts"/"responses"
    too, the shape tether.backends.reward_server takes)."""
    p = body.get("prompt", body.get("prompts"))
    r = body.get("response", body.get("responses"))
    if p is None or r is None:
        raise ApiError(400, "'prompt' and 'response' are required", param="prompt" if p is None else "response")
    single = isinstance(r, str)
    if single:
        p, r = [p], [r]
    elif not isinstance(r, list) or not isinstance(p, list) or len(p) != len(r) or not r:
        raise ApiError(400, "'prompt' and 'response' must be two lists of the same length (or one of each)", param="response")
    prompts = []
    for x in p:
        if isinstance(x, str):
            prompts.append(x)
        elif isinstance(x, list):
            prompts.append(_messages(x))
        else:
            raise ApiError(400, "each prompt must be a string or a message list", param="prompt")
    if not all(isinstance(x, str) for x in r):
        raise ApiError(400, "each response must be a string", param="response")
    return {"key": ("score",), "rows": len(r), "payload": {"prompts": prompts, "responses": list(r), "single": single}}


# -- Responses -------------------------------------------------------------------------------------


def _chat_logprobs(c: Choice, lo: int = 0, hi: int | None = None) -> dict | None:
    if c.logprobs is None:
        return None
    hi = len(c.tokens) if hi is None else hi
    content = []
    for i in range(lo, hi):
        tok = c.texts[i]
        content.append({"token": tok, "logprob": c.logprobs[i], "bytes": list(tok.encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in c.top[i]]})
    return {"content": content}


def _text_logprobs(c: Choice, lo: int = 0, hi: int | None = None, offset0: int = 0) -> dict | None:
    if c.logprobs is None:
        return None
    hi = len(c.tokens) if hi is None else hi
    offsets, o = [], offset0 + sum(len(p) for p in c.pieces[:lo])
    for p in c.pieces[lo:hi]:
        offsets.append(o)
        o += len(p)
    return {"tokens": c.texts[lo:hi], "token_logprobs": c.logprobs[lo:hi],
            "top_logprobs": [dict(t) for t in c.top[lo:hi]], "text_offset": offsets}


def _usage(prompts: list[list[int]], choices: list[list[Choice]]) -> dict:
    p = sum(len(x) for x in prompts)
    c = sum(len(ch.tokens) for cs in choices for ch in cs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_body(chat: bool, name: str, payload: dict, result: list[list[Choice]]) -> dict:
    flat = [c for cs in result for c in cs]
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(c.pieces)},
                    "logprobs": _chat_logprobs(c), "finish_reason": c.finish_reason} for i, c in enumerate(flat)]
    else:
        choices = [{"index": i, "text": "".join(c.pieces), "logprobs": _text_logprobs(c), "finish_reason": c.finish_reason}
                   for i, c in enumerate(flat)]
    return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": name, "choices": choices, "usage": _usage(payload["prompts"], result)}


def stream_events(chat: bool, name: str, n_choices: int, first: tuple, next_event, include_usage: bool, payload: dict):
    """OpenAI's stream from a job's events: a role chunk per choice (chat), one chunk per token as the
    segments arrive, each choice's finish_reason, then (stream_options.include_usage) the usage, then
    [DONE]. A request whose time runs out mid-stream gets OpenAI's error object as its last event."""
    base = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": name}

    def chunk(choices, **extra):
        return "data: " + json.dumps({**base, "choices": choices, **extra}) + "\n\n"

    async def events():
        if chat:
            for i in range(n_choices):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        kind, data = first
        while kind == "delta":
            for i, c, offset in data:
                for t in range(len(c.tokens)):
                    if not c.pieces[t] and c.logprobs is None:  # half a character: it comes with the next token
                        continue
                    if chat:
                        yield chunk([{"index": i, "delta": {"content": c.pieces[t]}, "logprobs": _chat_logprobs(c, t, t + 1), "finish_reason": None}])
                    else:
                        yield chunk([{"index": i, "text": c.pieces[t], "logprobs": _text_logprobs(c, t, t + 1, offset), "finish_reason": None}])
                if c.finish_reason is not None:
                    end = {"delta": {}} if chat else {"text": ""}
                    yield chunk([{"index": i, **end, "logprobs": None, "finish_reason": c.finish_reason}])
            try:
                kind, data = await next_event()
            except ApiError as e:
                yield "data: " + json.dumps(e.body()) + "\n\n"
                return
        if include_usage:
            yield chunk([], usage=_usage(payload["prompts"], data))
        yield "data: [DONE]\n\n"

    return events()


# -- The app ---------------------------------------------------------------------------------------


@dataclass
class Settings:
    name: str
    api_key: str | None = None
    max_queue: int = 64
    max_batch: int = 16
    timeout: float = 120.0
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    max_n: int = 64


def make_app(backend, settings: Settings):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    queue = JobQueue(settings.max_queue)
    threading.Thread(target=worker_loop, args=(queue, backend, settings.max_batch), daemon=True, name="tether-serve-worker").start()
    app = FastAPI(title="tether serve", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):  # unknown routes and methods, in OpenAI's shape too
        return error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=None))

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):  # constant time: no guessing by timing
            raise ApiError(401, "invalid or missing API key (send it as 'Authorization: Bearer KEY')", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        check_key(request)
        too_big = ApiError(413, f"the request body is over the server's limit of {settings.max_body_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise too_big
        raw = b""
        async for part in request.stream():  # a chunked body has no length to check first
            raw += part
            if len(raw) > settings.max_body_bytes:
                raise too_big
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def check_model(body: dict, kind: str) -> None:
        if "model" in body and body["model"] != settings.name:
            raise ApiError(404, f"the model {body['model']!r} does not exist; this server has {settings.name!r}",
                           param="model", code="model_not_found")
        if backend.kind != kind:
            what = "a reward model: POST /v1/score" if backend.kind == "score" else "a language model: use /v1/chat/completions or /v1/completions"
            raise ApiError(400, f"{settings.name!r} is {what}", param="model", code="wrong_model_kind")

    async def submit(spec: dict, kind: str, stream: bool = False):
        """Queue a job; -> its result, or (stream) the job itself, whose events then arrive."""
        loop = asyncio.get_running_loop()
        job = Job(kind, spec["key"], spec["rows"], spec["payload"], time.monotonic() + settings.timeout, loop, loop.create_future(),
                  asyncio.Queue() if stream else None)
        if not queue.put(job):
            raise ApiError(503, f"the server is busy: {settings.max_queue} requests are waiting; retry shortly", "server_error",
                           code="queue_full", headers={"Retry-After": "1"})
        if stream:
            return job
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), settings.timeout)
        except asyncio.TimeoutError:
            job.future.cancel()  # the worker skips it if it has not started it
            raise _timeout() from None

    async def guarded(fn):
        try:
            return await fn()
        except ApiError as e:
            return error(e)
        except Exception as e:  # noqa: BLE001 - a bug answers one line in OpenAI's shape, not a traceback
            print(f"tether serve: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return error(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    @app.get("/v1/models")
    async def models(request: Request):
        async def run():
            check_key(request)
            return {"object": "list", "data": [{"id": settings.name, "object": "model", "created": started, "owned_by": "tether"}]}

        return await guarded(run)

    def completions(chat: bool):
        async def endpoint(request: Request):
            async def run():
                body = await read_json(request)
                check_model(body, "generate")
                spec = generation_job(backend, body, chat, settings.default_max_tokens, settings.max_n)
                if not body.get("stream"):
                    return completion_body(chat, settings.name, spec["payload"], await submit(spec, "generate"))
                job = await submit(spec, "generate", stream=True)

                async def next_event():
                    try:
                        kind, data = await asyncio.wait_for(job.events.get(), max(job.deadline - time.monotonic(), 1e-3))
                    except asyncio.TimeoutError:
                        job.cancelled = True
                        raise _timeout() from None
                    if kind == "error":
                        job.cancelled = True
                        raise data
                    return kind, data

                # the first segment is awaited here, so that a request that fails before any token is sent
                # answers with its HTTP status, not a 200 stream holding an error
                first = await next_event()
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                events = stream_events(chat, settings.name, spec["rows"], first, next_event, usage, spec["payload"])

                async def body_then_cancel():
                    try:
                        async for e in events:
                            yield e
                    finally:  # done, or the client went away: the worker drops the rest of its rows
                        job.cancelled = True

                return StreamingResponse(body_then_cancel(), media_type="text/event-stream")

            return await guarded(run)

        return endpoint

    app.post("/v1/chat/completions")(completions(True))
    app.post("/v1/completions")(completions(False))

    @app.post("/v1/score")
    async def score(request: Request):
        async def run():
            body = await read_json(request)
            check_model(body, "score")
            spec = score_job(body)
            scores = await submit(spec, "score")
            out = {"object": "score", "model": settings.name, "scores": scores}
            return {**out, "score": scores[0]} if spec["payload"]["single"] else out

        return await guarded(run)

    @app.get("/health")
    async def health():
        return {"ok": True, "model": settings.name, "kind": backend.kind, "waiting": len(queue.items), **queue.taken}

    return app


def load_backend(model: str, backend: str, device: str, normalize: bool = False, head: str | None = None, max_rows: int = 16,
                 stream_chunk: int = 16):
    """A reward model folder (tether_reward.json or a *ForSequenceClassification) scores; anything else generates."""
    from tether.eval.scoring import is_reward_model

    if is_reward_model(model):
        return RewardBackend(model, device, normalize, head)
    return Generator(model, backend, device, max_rows, stream_chunk)


def missing(backend: str) -> str | None:
    """What this machine lacks for `backend`, as one line that says how to get it (None: nothing)."""
    import importlib.util

    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        return ("--backend vllm needs vLLM, which is not installed here: `bash scripts/setup_vllm.sh` builds its CPU build in "
                ".venv-vllm; on a CUDA machine, `pip install vllm` (tether's [vllm] extra); or use --backend hf")
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        return "tether serve needs FastAPI and uvicorn: pip install 'tether[serve]'"
    return None


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="tether serve", description=__doc__.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a tether output folder: SFT/PPO/DPO final, or a reward model")
    ap.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--backend", default="hf", choices=("hf", "vllm"), help="the Rollout that generates (default hf)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--served-model-name", help="the name clients send as `model` (default: --model as given)")
    ap.add_argument("--api-key", default=os.environ.get("TETHER_API_KEY") or None, help="require 'Authorization: Bearer KEY' (default: $TETHER_API_KEY)")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get 503 + Retry-After (default 64)")
    ap.add_argument("--max-batch", type=int, default=16, help="rows (prompts x n) generated together (default 16)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait for its answer (default 120, then 504)")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    ap.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request sets none (default 256)")
    ap.add_argument("--stream-chunk", type=int, default=16, help="a streamed response is generated and sent this many tokens at a time (default 16)")
    ap.add_argument("--normalize", action="store_true", help="reward model: apply the mean/std saved by tether rm")
    ap.add_argument("--head", help="reward model with several heads: the one to score with")
    ap.add_argument("--verbose", action="store_true", help="a Python traceback instead of the one-line error; uvicorn's access log")
    args = ap.parse_args(argv)
    for k in ("max_queue", "max_batch", "max_body_bytes", "default_max_tokens", "stream_chunk"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1")
    if args.timeout <= 0:
        ap.error("--timeout must be positive")
    lack = missing(args.backend)
    if lack:
        print(f"tether serve: {lack}", file=sys.stderr)
        return 2
    from tether.cli import one_line
    from tether.terminal import verbose

    args.verbose = args.verbose or verbose()  # `tether serve ... --verbose` reaches here without the flag
    return one_line("tether serve", lambda: _serve(args), args.verbose)


def _serve(args) -> int:
    import uvicorn

    t0 = time.perf_counter()
    try:
        backend = load_backend(args.model, args.backend, args.device, args.normalize, args.head, args.max_batch, args.stream_chunk)
    except NotImplementedError as e:  # the vLLM rollout is a stub until it is built on a CUDA machine
        print(f"tether serve: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or args.model
    settings = Settings(name, args.api_key or None, args.max_queue, args.max_batch, args.timeout, args.max_body_bytes, args.default_max_tokens)
    app = make_app(backend, settings)
    what = "reward model, POST /v1/score" if backend.kind == "score" else "chat and completions"
    print(f"tether serve: {name} ({what}) on http://{args.host}:{args.port}/v1, loaded in {time.perf_counter() - t0:.1f} s"
          + (", API key required" if args.api_key else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                access_log=args.verbose)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
