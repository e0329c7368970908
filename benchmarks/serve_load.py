"""Load on `tether serve`: N concurrent openai clients, tokens/s and p50/p95 request latency.

    .venv/bin/python -m benchmarks.serve_load --serve runs/ppo/final                  # starts the server itself
    .venv/bin/python -m benchmarks.serve_load --url http://127.0.0.1:8000/v1 --model runs/ppo/final
    .venv/bin/python -m benchmarks.serve_load --serve models/smollm2 --clients 1,8,32 --requests 4 --max-tokens 64

Each client sends --requests chat completions one after another (a different prompt each, temperature
--temperature, max_tokens --max-tokens); all clients of a level start together. tokens/s is every
completion token the server returned (its `usage`) over the level's wall time; latency is per request,
from sending to the whole answer. With --serve, the server's start (process launch to the first answer
of /v1/models) is timed too. Prints one line per level and, with --json, writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TOPICS = ["a movie you liked", "learning Python", "a good breakfast", "the ocean", "a short trip", "a rainy day", "a pet cat",
          "writing a poem", "a busy morning", "a quiet library", "a chess game", "an old song"]


def start_server(model: str, port: int, extra: list[str]) -> tuple[subprocess.Popen, float]:
    """`tether serve` on 127.0.0.1:port; returns the process and seconds until /v1/models answered."""
    import httpx

    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads a pipe while the load runs
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tether.cli", "serve", "--model", model, "--port", str(port), *extra], stderr=log)
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"serve_load: the server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code < 500:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.2)


def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int, temperature: float, api_key: str) -> dict:
    import openai

    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        cl = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=600)
        barrier.wait()
        for r in range(requests):
            topic = TOPICS[(c * requests + r) % len(TOPICS)]
            t0 = time.perf_counter()
            try:
                out = cl.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Tell me about {topic}."}],
                                                 max_tokens=max_tokens, temperature=temperature)
            except openai.APIError as e:  # a 503 (queue full) counts as an error, not a latency
                with lock:
                    errors.append(type(e).__name__)
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += out.usage.completion_tokens

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan"))
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "completion_tokens": tokens[0], "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens[0] / wall, 1), "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p95_s": round(pct(0.95), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--serve", help="a model folder: start `tether serve` on it for the run")
    where.add_argument("--url", help="a running server's base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", help="the served model name (default: --serve's folder, or the server's only model)")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per level (default 4)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--api-key", default=os.environ.get("TETHER_API_KEY") or "none")
    ap.add_argument("--server-args", default="", help="extra `tether serve` flags with --serve, e.g. '--max-batch 32'")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    proc, started = None, None
    if args.serve:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc, started = start_server(args.serve, port, args.server_args.split())
        url = f"http://127.0.0.1:{port}/v1"
        print(f"server started in {started:.1f} s (process launch to the first /v1/models answer)", flush=True)
    else:
        url = args.url
    try:
        import openai

        model = args.model or args.serve or openai.OpenAI(base_url=url, api_key=args.api_key).models.list().data[0].id
        results = []
        for c in (int(x) for x in args.clients.split(",")):
            r = run_level(url, model, c, args.requests, args.max_tokens, args.temperature, args.api_key)
            results.append(r)
            print(f"{c:>3} clients: {r['requests']} requests ({r['errors']} errors), {r['completion_tokens']} tokens in {r['wall_s']:.2f} s "
                  f"= {r['tokens_per_s']:.1f} tokens/s; latency p50 {r['p50_s']} s, p95 {r['p95_s']} s", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"url": url, "model": model, "server_start_s": started, "max_tokens": args.max_tokens, "levels": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
