"""Human-labelled judge benchmarks as preference records, for `tether eval labeler`.

    python -m tether.ai.convert llmbar ../shared/data/llmbar/Dataset data/llmbar.jsonl        # every dataset.json below
    python -m tether.ai.convert llmbar ../shared/data/llmbar/Dataset/LLMBar/Natural/dataset.json data/natural.jsonl
    python -m tether.ai.convert llmbar ../shared/data/llmbar/Dataset/Processed/MT-Bench/dataset.json data/mtbench_human.jsonl
    python -m tether.ai.convert xstest-unsafe ../shared/data/xstest/xstest_prompts.csv data/xstest_unsafe.jsonl  # prompts

xstest-unsafe: XSTest's 200 unsafe prompts as prompt records ({prompt, id, meta: {type, focus}}), the red-team
prompts `tether ai critique-revise` revises answers to (xstest-safe: its 250 safe ones, for over-refusal).

LLMBar (and the sets it ships processed: FairEval, LLMEval^2, MT-Bench): {input, output_1, output_2,
label}, label 1 or 2 the better output (MT-Bench: the expert human majority vote); any other label is
counted and skipped; a record without the three texts stops the run with the file and the record. Records:
{prompt, chosen, rejected, id, source, meta: {eval_only: true}}; `source` is the dataset's folder
(e.g. llmbar/LLMBar/Adversarial/Neighbor), so a report can be split by subset. (Outside the data core:
tether.data.convert holds the training-set converters.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from tether.data.records import DataError


def llmbar_records(src: str | Path, counts: Counter | None = None) -> list[dict]:
    src = Path(src)
    files = sorted(src.rglob("dataset.json")) if src.is_dir() else [src]
    if not files:
        raise FileNotFoundError(f"{src}: no dataset.json below it")
    counts = counts if counts is not None else Counter()
    out = []
    for f in files:
        rel = f.parent.relative_to(src) if src.is_dir() else Path(f.parent.name)
        subset = "/".join(("llmbar", *rel.parts)) if rel.parts else "llmbar"
        for i, row in enumerate(_rows(f)):
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("input", "output_1", "output_2")):
                raise DataError(f"{f}: record {i}: needs string fields input, output_1 and output_2")
            label = row.get("label")
            if label not in (1, 2):
                counts["label not 1 or 2"] += 1
                continue
            a, b = row["output_1"], row["output_2"]
            chosen, rejected = (a, b) if label == 1 else (b, a)
            if chosen == rejected:
                counts["identical outputs"] += 1
                continue
            out.append({"prompt": row["input"], "chosen": chosen, "rejected": rejected, "id": f"{subset}:{i}", "source": subset,
                        "meta": {"eval_only": True}})
            counts["records"] += 1
    return out


def _rows(f: Path) -> list:
    try:
        rows = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(rows, list):
        raise DataError(f"{f}: must be a JSON list of records")
    return rows


def xstest_prompts(path: str | Path, label: str = "unsafe") -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{"prompt": r["prompt"], "id": f"xstest:{r['id']}", "meta": {"type": r["type"], "focus": r["focus"], "label": r["label"]}}
            for r in rows if r["label"] == label]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tether.ai.convert", description=__doc__.strip().splitlines()[0])
    ap.add_argument("kind", choices=["llmbar", "xstest-unsafe", "xstest-safe"])
    ap.add_argument("src", help="a dataset.json or a folder of them")
    ap.add_argument("out", help="preference jsonl to write")
    a = ap.parse_args(argv)
    counts: Counter = Counter()
    try:
        recs = llmbar_records(a.src, counts) if a.kind == "llmbar" else xstest_prompts(a.src, a.kind.split("-")[1])
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    skipped = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "records")
    print(f"wrote {len(recs)} {'preference' if a.kind == 'llmbar' else 'prompt'} records to {a.out}" + (f" (skipped: {skipped})" if skipped else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
