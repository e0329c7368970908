"""A checkable task a tiny model can learn on a CPU in seconds: repeat the digit ("7" -> "7").

    python scripts/make_digit_task.py runs/digits

Writes <dir>/model (a 2-layer, 32-wide GPT-2 over 16 tokens: the digits, + = ? and space, EOS, pad; tests/tiny.py
builds it), <dir>/repeat.jsonl (the ten prompts twice, each with its `answer`, which tether.rewards:exact_number
checks) and <dir>/format.jsonl (each prompt answered with a random digit: SFT on it teaches the answer's form,
one digit then EOS, but not which digit). No downloads.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import make_digits_model_dir, write_jsonl  # noqa: E402


def main(out: str = "runs/digits", seed: int = 0) -> None:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "model" / "config.json").exists():
        make_digits_model_dir(root / "model", seed)
    write_jsonl(root / "repeat.jsonl", [{"prompt": f"{d}", "answer": d} for d in range(10)] * 2)
    rng = random.Random(seed)
    write_jsonl(root / "format.jsonl", [{"prompt": f"{d}", "completion": str(rng.randrange(10))} for d in range(10) for _ in range(8)])
    print(f"wrote {root}/model, {root}/repeat.jsonl, {root}/format.jsonl", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:2])
