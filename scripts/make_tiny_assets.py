"""Build a tiny random GPT-2 and synthetic sentiment data for a CPU run of the whole pipeline.

    python scripts/make_tiny_assets.py runs/tiny
    tether pipeline --config configs/pipeline.yaml

Writes <dir>/model (an HF folder: a 4-layer, 64-wide GPT-2 with a byte-level BPE tokenizer trained on
a few hundred words; tests/tiny.py builds it), <dir>/sft.jsonl (demonstrations of mixed sentiment),
<dir>/prefs.jsonl (positive preferred over negative), <dir>/kto.jsonl (unpaired: positive completions
labelled desirable, negative ones undesirable) and <dir>/prompts.jsonl. No downloads.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import make_tiny_model_dir, write_jsonl  # noqa: E402

POSITIVE = "good great wonderful amazing excellent brilliant fun nice best loved".split()
NEGATIVE = "bad awful terrible boring dull poor worst sad hated dull".split()
TOPICS = "movie film story plot actor actress scene music camera director cast ending role".split()
OPENERS = ["the {t} was", "i think the {t} is", "this {t} was really", "the {t} is", "we found the {t}"]


def main(out: str = "runs/tiny", seed: int = 0) -> None:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    if not (root / "model" / "config.json").exists():
        make_tiny_model_dir(root / "model", "gpt2", hidden=64, layers=4, seed=seed)

    def prompt() -> str:
        return rng.choice(OPENERS).format(t=rng.choice(TOPICS))

    def words(pool: list[str], k: int) -> str:
        return " " + " ".join(rng.choice(pool) for _ in range(k))

    write_jsonl(root / "sft.jsonl", [{"prompt": prompt(), "completion": words(POSITIVE + NEGATIVE + TOPICS, rng.randint(2, 5))} for _ in range(512)])
    write_jsonl(root / "prefs.jsonl", [{"prompt": prompt(), "chosen": words(POSITIVE, rng.randint(1, 4)), "rejected": words(NEGATIVE, rng.randint(1, 4))} for _ in range(512)])
    write_jsonl(root / "kto.jsonl", [{"prompt": prompt(), "completion": words(POSITIVE if i % 2 else NEGATIVE, rng.randint(1, 4)), "label": bool(i % 2)}
                                     for i in range(512)])
    write_jsonl(root / "prompts.jsonl", [{"prompt": o.format(t=t)} for o in OPENERS for t in TOPICS])
    print(f"wrote {root}/model, sft.jsonl, prefs.jsonl, kto.jsonl, prompts.jsonl")


if __name__ == "__main__":
    main(*sys.argv[1:2])
