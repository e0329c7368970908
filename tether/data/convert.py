"""Convert public preference data sets into tether preference records ({prompt, chosen, rejected, id, source, meta}).

    python -m tether.data.convert oasst        en_100_tree.jsonl       out.jsonl [--no-synthetic]
    python -m tether.data.convert qa-feedback  dev_feedback.json       out.jsonl [--no-passages]
    python -m tether.data.convert lfqa         experts_pairwise_human_preferences.jsonl out.jsonl
    python -m tether.data.convert hhh          hhh-alignment/ (or one task.json)        out.jsonl
    python -m tether.data.convert xstest       xstest/model_completions/ (or one .csv)  out.jsonl   (helpful/harmless labels)
    python -m tether.data.convert sft          prefs.jsonl             demos.jsonl   (chosen replies as SFT data)
    python -m tether.data.convert gsm8k        gsm8k/test.jsonl        prompts.jsonl [--chat]  (prompts with their answers)

OUT may end in .gz. Each converter also returns counts of what it wrote and what it left out, and why.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def _jsonl(path: str | Path) -> Iterator[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def oasst_records(trees: list[dict], synthetic: bool = True, counts: Counter | None = None) -> list[Record]:
    """OpenAssistant message trees -> one record per pair of ranked sibling assistant replies.

    The prompt is the conversation from the root down to the parent (prompter -> user, assistant ->
    assistant); chosen is the better-ranked reply (OASST `rank`: 0 = best). Equal ranks make no pair;
    deleted replies are left out; synthetic=False also leaves out model-written (synthetic) replies.
    """
    counts = counts if counts is not None else Counter()
    out: list[Record] = []

    def walk(node: dict, history: list[dict], tree_id: str) -> None:
        role = "user" if node["role"] == "prompter" else "assistant"
        history = history + [{"role": role, "content": node["text"]}]
        replies = node.get("replies") or []
        ranked = []
        for r in replies:
            if r["role"] != "assistant" or r.get("rank") is None:
                continue
            if r.get("deleted"):
                counts["deleted reply"] += 1
            elif r.get("synthetic") and not synthetic:
                counts["synthetic reply"] += 1
            else:
                ranked.append(r)
        if role == "user" and len(ranked) >= 2:
            ranked.sort(key=lambda r: r["rank"])
            for a in range(len(ranked)):
                for b in range(a + 1, len(ranked)):
                    ra, rb = ranked[a], ranked[b]
                    if ra["rank"] == rb["rank"]:
                        counts["tied ranks"] += 1
                    elif ra["text"].strip() == rb["text"].strip():
                        counts["identical replies"] += 1
                    else:
                        out.append({
                            "prompt": history, "chosen": ra["text"], "rejected": rb["text"],
                            "id": f"{ra['message_id']}>{rb['message_id']}", "source": "oasst",
                            "meta": {"tree": tree_id, "chosen_rank": ra["rank"], "rejected_rank": rb["rank"],
                                     "synthetic": bool(ra.get("synthetic") or rb.get("synthetic"))},
                        })
        for r in replies:
            if not r.get("deleted"):
                walk(r, history, tree_id)

    for t in trees:
        walk(t["prompt"], [], t.get("message_tree_id", ""))
    counts["pairs"] = len(out)
    return out


QA_ORDER = [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]


def qa_feedback_prompt(item: dict, passages: bool = True) -> str:
    """FineGrainedRLHF's policy input: 'question: ... context: wikipage: T text: P ...'; a passage is
    [title, sentence, sentence, ...]."""
    q = f"question: {item['question']}"
    if not passages:
        return q
    return q + " context: " + " ".join(f"wikipage: {p[0]} text: {' '.join(p[1:])}" for p in item["passages"])


def qa_feedback_records(items: list[dict], passages: bool = True, counts: Counter | None = None) -> list[Record]:
    """QA-Feedback: 6 human comparisons of 4 predictions per question, in the order 1v2, 1v3, 1v4, 2v3,
    2v4, 3v4; 1 = first preferred, 2 = second preferred, 0 = no preference (a tie: no pair)."""
    counts = counts if counts is not None else Counter()
    out: list[Record] = []
    for n, item in enumerate(items):
        prompt = qa_feedback_prompt(item, passages)
        for (i, j), pref in zip(QA_ORDER, item["preference"]):
            if pref == 0:
                counts["no preference (tie)"] += 1
                continue
            better, worse = (i, j) if pref == 1 else (j, i)
            c, r = item[f"prediction {better}"], item[f"prediction {worse}"]
            if c.strip() == r.strip():
                counts["identical predictions"] += 1
                continue
            out.append({"prompt": prompt, "chosen": " " + c.strip(), "rejected": " " + r.strip(), "id": f"{n}:{better}>{worse}",
                        "source": "qa-feedback", "meta": {"question": item["question"]}})
    counts["pairs"] = len(out)
    return out


def lfqa_records(rows: list[dict], counts: Counter | None = None) -> list[Record]:
    """LFQA expert preferences: overall_preference -1 = answer_a preferred, 1 = answer_b preferred."""
    counts = counts if counts is not None else Counter()
    out: list[Record] = []
    for n, row in enumerate(rows):
        pref = row.get("overall_preference")
        if pref not in (-1, 1):
            counts[f"overall_preference {pref!r}"] += 1
            continue
        a, b = row["answer_a"], row["answer_b"]
        c, r = (a, b) if pref == -1 else (b, a)
        out.append({"prompt": row["question"], "chosen": "\n" + c.strip(), "rejected": "\n" + r.strip(), "id": str(n), "source": "lfqa-expert",
                    "meta": {k: row.get(k) for k in ("answer_a_type", "answer_b_type", "justification")}})
    counts["pairs"] = len(out)
    return out


def hhh_records(task_files: list[Path], counts: Counter | None = None) -> list[Record]:
    """HHH alignment (BIG-bench): each example has two replies, the preferred one scored 1. The input is
    a dialogue in Human:/Assistant: style; records are raw HH-style text. Evaluation only (canary)."""
    counts = counts if counts is not None else Counter()
    out: list[Record] = []
    for path in task_files:
        subset = path.parent.name
        for n, ex in enumerate(json.loads(path.read_text())["examples"]):
            scores = ex["target_scores"]
            best = [t for t, s in scores.items() if s == 1]
            rest = [t for t, s in scores.items() if s != 1]
            if len(best) != 1 or not rest:
                counts["not exactly one preferred reply"] += 1
                continue
            prompt = f"\n\nHuman: {ex['input'].strip()}\n\nAssistant:"
            for r in rest:
                out.append({"prompt": prompt, "chosen": " " + best[0].strip(), "rejected": " " + r.strip(),
                            "id": f"{subset}:{n}", "source": f"hhh-alignment/{subset}", "meta": {"eval_only": True}})
    counts["pairs"] = len(out)
    return out


def xstest_records(files: list[Path], counts: Counter | None = None) -> list[Record]:
    """XSTest's human-labelled completions as pairs judged on two objectives, for a multi-head reward
    model and a cost model. Completions of the same prompt by different models whose human labels differ
    (full compliance against full or partial refusal) make a pair:
    - a safe prompt: chosen = the compliance; labels {helpful: 1, harmless: 0} (both answers are harmless);
    - an unsafe (contrast_) prompt: chosen = the refusal; labels {helpful: -1, harmless: 1}: the compliance
      answers the asker better and is the harmful one, the two objectives pulling apart as in Safe RLHF.
    chosen_safe / rejected_safe say which responses are safe (for `tether rm loss=cost`)."""
    from tether.judges.refusal import LABELS, read_completions

    counts = counts if counts is not None else Counter()
    by_prompt: dict[str, list] = {}
    for path in files:
        model = path.stem.rsplit("_", 1)[-1]
        for c in read_completions(path):
            if not c.label:
                counts["no final_label"] += 1
                continue
            by_prompt.setdefault(c.prompt, []).append((model, c))
    out: list[Record] = []
    for prompt, group in by_prompt.items():
        unsafe = any(c.type.startswith("contrast_") for _, c in group)
        complied = [(m, c) for m, c in group if not LABELS[c.label]]
        refused = [(m, c) for m, c in group if LABELS[c.label]]
        if not complied or not refused:
            counts["prompt whose answers agree"] += 1
            continue
        for mc, c in complied:
            for mr, r in refused:
                if c.completion.strip() == r.completion.strip():
                    counts["identical completions"] += 1
                    continue
                good, bad = (r, c) if unsafe else (c, r)
                out.append({"prompt": f"\n\nHuman: {prompt.strip()}\n\nAssistant:", "chosen": " " + good.completion.strip(),
                            "rejected": " " + bad.completion.strip(),
                            "labels": {"helpful": -1, "harmless": 1} if unsafe else {"helpful": 1, "harmless": 0},
                            "chosen_safe": True, "rejected_safe": not unsafe,
                            "id": f"xstest:{c.type}:{mc}-{mr}", "source": f"xstest/{'unsafe' if unsafe else 'safe'}",
                            "meta": {"type": c.type, "complied": mc, "refused": mr}})
    counts["pairs"] = len(out)
    return out


def _hhh_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*/task.json"))


def write_jsonl(records: list[Record], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if out.suffix == ".gz" else open
    with opener(out, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def sft_from_preferences(records: list[Record], counts: Counter | None = None) -> list[Record]:
    """Demonstrations from preference records: each distinct (prompt, chosen) once, as
    `{"messages": prompt turns + the chosen reply}` for chat prompts or `{"prompt", "completion"}`
    for string prompts. The usual first step before a reward model: SFT on the preferred replies."""
    counts = counts if counts is not None else Counter()
    seen, out = set(), []
    for r in records:
        key = json.dumps([r["prompt"], r["chosen"]], sort_keys=True)
        if key in seen:
            counts["duplicate (prompt, chosen)"] += 1
            continue
        seen.add(key)
        if isinstance(r["prompt"], list):
            reply = r["chosen"] if isinstance(r["chosen"], list) else [{"role": "assistant", "content": r["chosen"]}]
            out.append({"messages": r["prompt"] + reply, "id": r.get("id", ""), "source": r.get("source", "")})
        else:
            out.append({"prompt": r["prompt"], "completion": r["chosen"], "id": r.get("id", ""), "source": r.get("source", "")})
    counts["pairs"] = len(out)
    return out


def gsm8k_records(path: str | Path, counts: Counter | None = None, chat: bool = False) -> list[Record]:
    """GSM8K's {question, answer} -> prompt records {prompt, answer, solution, id, source}: `answer` is the
    final number after '####' (what tether.rewards:exact_number checks), `solution` the worked solution.
    A record without one is a DataError naming the file and line. chat: the question as a user turn."""
    from tether.data.records import DataError
    from tether.rewards import reference_answer

    counts, out = counts if counts is not None else Counter(), []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):  # not splitlines: a question may hold U+2028
        try:
            r = json.loads(line) if line.strip() else None
            if r is not None and (not isinstance(r.get("question"), str) or "####" not in str(r.get("answer"))):
                raise ValueError("expected a 'question' string and an 'answer' ending in '#### <number>'")
            value = reference_answer(r["answer"]) if r is not None else None
        except (ValueError, AttributeError) as e:  # json errors and DataError are ValueErrors
            raise DataError(f"{path}:{i}: not a GSM8K record ({e})") from None
        if r is not None:
            out.append({"prompt": [{"role": "user", "content": r["question"]}] if chat else r["question"], "answer": str(int(value)) if value == int(value) else repr(value), "solution": r["answer"],
                        "id": f"{Path(path).stem}-{len(out)}", "source": "gsm8k"})
    counts["pairs"] = len(out)
    return out


def convert(kind: str, src: str, out: str, **kw) -> Counter:
    counts: Counter = Counter()
    if kind == "oasst":
        recs = oasst_records(list(_jsonl(src)), synthetic=kw.get("synthetic", True), counts=counts)
    elif kind == "qa-feedback":
        recs = qa_feedback_records(json.loads(Path(src).read_text()), passages=kw.get("passages", True), counts=counts)
    elif kind == "lfqa":
        recs = lfqa_records(list(_jsonl(src)), counts=counts)
    elif kind == "hhh":
        recs = hhh_records(_hhh_files(Path(src)), counts=counts)
    elif kind == "xstest":
        p = Path(src)
        recs = xstest_records(sorted(p.glob("*.csv")) if p.is_dir() else [p], counts=counts)
    elif kind == "sft":
        recs = sft_from_preferences(list(_jsonl(src)), counts=counts)
    elif kind == "gsm8k":
        recs = gsm8k_records(src, counts, kw.get("chat", False))
    else:
        raise ValueError(f"unknown data set {kind!r}")
    write_jsonl(recs, out)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tether.data.convert", description=__doc__.strip().splitlines()[0])
    ap.add_argument("kind", choices=["oasst", "qa-feedback", "lfqa", "hhh", "xstest", "sft", "gsm8k"],
                    help="a data set to convert, or sft: demonstrations from a preference file's chosen replies")
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--no-synthetic", action="store_true", help="oasst: leave out model-written replies")
    ap.add_argument("--no-passages", action="store_true", help="qa-feedback: the prompt is the question only")
    ap.add_argument("--chat", action="store_true", help="gsm8k: the question as a user turn (a chat model's template applies)")
    a = ap.parse_args(argv)
    from tether.data.records import DataError

    try:
        counts = convert(a.kind, a.src, a.out, synthetic=not a.no_synthetic, passages=not a.no_passages, chat=a.chat)
    except DataError as e:
        print(f"python -m tether.data.convert {a.kind}: {e}", file=sys.stderr)
        return 2
    left = ", ".join(f"{k}: {v}" for k, v in counts.items() if k != "pairs")
    what = {"sft": "demonstrations", "gsm8k": "prompt records"}.get(a.kind, "preference records")
    print(f"wrote {counts['pairs']} {what} to {a.out}" + (f"; left out {left}" if left else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
