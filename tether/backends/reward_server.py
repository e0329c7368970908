"""A reward model behind HTTP, and a client that PPO calls like any Python reward function.

    python -m tether.backends.reward_server --model runs/rm/final --port 8300            # serve
    tether ppo ... reward.fn=tether.backends.reward_server:http_reward \\
                   reward.kwargs='{url: "http://127.0.0.1:8300/score"}'              # call it

POST /score  {"prompts": [...], "responses": [...]}  ->  {"scores": [...]}
GET  /health ->  {"ok": true, "model": ...}

The server scores each (prompt, response) as `tether eval` and PPO do (tokenised like the reward model's
training records, EOS after the response), in batches, under no_grad; with --normalize it applies the
(mean, std) saved by `tether rm`. Standard library only (http.server), one request at a time: a small
remote judge, not a serving system.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence


class RewardScorer:
    """(prompts, responses) -> rewards, with tether's one scoring convention: the text tokenised as the
    reward model's training records were (chat template, EOS after the response; tether.eval.scoring)."""

    def __init__(self, model_dir: str, batch_size: int = 16, normalize: bool = False, device: str = "auto"):
        from tether.eval.scoring import Scorer

        self.scorer = Scorer.load(model_dir, device, batch_size)
        self.stats = self.scorer.stats if normalize else {"mean": 0.0, "std": 1.0}
        self.model_dir = model_dir

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        scores = self.scorer.score_responses(list(prompts), list(responses))
        return [(s - self.stats["mean"]) / self.stats["std"] for s in scores]


def make_server(scorer: RewardScorer, host: str = "127.0.0.1", port: int = 8300) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                return self._send(200, {"ok": True, "model": scorer.model_dir})
            self._send(404, {"error": "not found"})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self._send(404, {"error": "not found"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompts, responses = req["prompts"], req["responses"]
                if not isinstance(prompts, list) or not isinstance(responses, list) or len(prompts) != len(responses):
                    raise ValueError("'prompts' and 'responses' must be lists of the same length")
            except (ValueError, KeyError, TypeError) as e:
                return self._send(400, {"error": f"bad request: {e}"})
            self._send(200, {"scores": scorer(prompts, responses)})

        def log_message(self, *args):  # quiet
            pass

    return ThreadingHTTPServer((host, port), Handler)


def http_reward(prompts: list[str], responses: list[str], url: str = "http://127.0.0.1:8300/score", timeout: float = 120.0, **_) -> list[float]:
    """A `reward.fn` that asks a reward server; raises with the server's message on an error."""
    body = json.dumps({"prompts": list(prompts), "responses": list(responses)}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return [float(s) for s in json.loads(r.read())["scores"]]
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"reward server {url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None
    except urllib.error.URLError as e:
        raise RuntimeError(f"reward server {url} unreachable: {e.reason} (start it with python -m tether.backends.reward_server)") from None
    except TimeoutError:
        raise RuntimeError(f"reward server {url} unreachable: no answer within {timeout:g}s") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tether.backends.reward_server", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="reward model folder (from tether rm)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--normalize", action="store_true", help="apply the mean/std saved by tether rm")
    args = ap.parse_args(argv)
    server = make_server(RewardScorer(args.model, args.batch_size, args.normalize), args.host, args.port)
    print(f"reward server on http://{args.host}:{server.server_address[1]}/score", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
