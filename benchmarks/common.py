"""Shared by both runners: the result record, timers, peak memory, token counts of the fixed workload."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def runner_args(argv: list[str] | None, lib: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"benchmarks.run_{lib}")
    p.add_argument("--stage", required=True, help="sft | rm | dpo | orpo | simpo | kto | ppo | rloo | grpo | algo_grpo | dr_grpo | dapo | gspo")
    p.add_argument("--dir", required=True, help="workload folder (benchmarks.workload.build)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workload", default="", help="the Workload as JSON (benchmarks.compare passes it); default: Workload()")
    p.add_argument("--out", required=True, help="result JSON file")
    p.add_argument("--work", default="", help="scratch folder for run outputs")
    args = p.parse_args(argv)
    from benchmarks.workload import Workload

    args.w = Workload.from_json(args.workload) if args.workload else Workload().quick() if args.quick else Workload()
    return args


def setup_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class Clock:
    """Wall time of the training loop: from `start()` (after model load and data preparation) to the
    end of the last optimizer step, plus optional named phases."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.t_end: float | None = None
        self.c0 = self.c_end = 0.0  # process CPU seconds (all threads): steadier than wall time under load
        self.step_ends: list[float] = []
        self.phases: dict[str, float] = {}

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()
            self.c0 = time.process_time()

    def step_end(self) -> None:
        self.t_end = time.perf_counter()
        self.c_end = time.process_time()
        self.step_ends.append(self.t_end)

    def add(self, phase: str, dt: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + dt

    @property
    def cpu(self) -> float:
        return self.c_end - self.c0

    @property
    def wall(self) -> float:
        return (self.t_end or 0.0) - (self.t0 or 0.0)


def sft_tokens(d: Path, n: int, file: str = "sft.jsonl") -> tuple[int, int]:
    """(sequence tokens, target tokens) of the first n SFT (or KTO) examples, as both libraries tokenise them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d / "policy"))
    seq = tgt = 0
    with open(d / file) as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            r = json.loads(line)
            p, c = len(tok(r["prompt"])["input_ids"]), len(tok(r["completion"])["input_ids"]) + 1
            seq += p + c
            tgt += c
    return seq, tgt


def pair_tokens(d: Path, n: int) -> int:
    """Tokens of prompt+chosen and prompt+rejected (each with EOS) of the first n pairs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d / "policy"))
    total = 0
    with open(d / "prefs.jsonl") as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            r = json.loads(line)
            p = len(tok(r["prompt"])["input_ids"])
            total += 2 * p + len(tok(r["chosen"])["input_ids"]) + len(tok(r["rejected"])["input_ids"]) + 2
    return total


def write_result(path: str, result: dict) -> None:
    result["peak_rss_mb"] = peak_rss_mb()
    Path(path).write_text(json.dumps(result, indent=1))


def text_table(lines: list[tuple]) -> str:
    """Rows of cells (the first the header) as left-aligned columns, with a rule under the header."""
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(lines[0]))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
