"""Metrics: always `metrics.jsonl` (one JSON object per logged step), a terminal progress bar, and the
trackers the config turns on (MLflow, Weights & Biases, TensorBoard: tether.backends.tracking)."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tether.terminal import progress_info

console = Console(stderr=True, soft_wrap=True)  # a line longer than the terminal wraps there, not at 80 columns in a log file


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Tracker:
    def __init__(self, out: str | Path, cfg=None, run_config: dict | None = None, total: int = 0, desc: str = "train", resume: bool = False, start_step: int = 0):
        from tether.ranks import is_main

        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "metrics.jsonl"
        self.main = is_main()  # under torchrun only rank 0 writes; the metrics are already all-reduced
        if self.main and not resume and self.path.exists():
            self.path.unlink()
        self._file = open(self.path if self.main else os.devnull, "a", buffering=1)
        self.log_every = getattr(cfg, "log_every", 1) or 1
        self.t0 = time.perf_counter()
        from tether.backends.tracking import make_sinks  # the optional trackers live with the backends

        self.sinks = make_sinks(self.out, cfg, run_config or {}, start_step if resume else None) if self.main and cfg is not None else []
        show = self.main and getattr(cfg, "progress", True) and total > 0 and sys.stderr.isatty() and not os.environ.get("CI")
        self._plain_every = max(1, total // 10) if total else 10
        self.total, self.desc, self.progress, self.first = total, desc, None, start_step if resume else 0
        if show:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
            )
            self.task = self.progress.add_task(desc, total=total, info="")
            self.progress.start()

    def log(self, step: int, metrics: dict[str, Any], force: bool = False) -> None:
        record = {"step": step, "time": round(time.perf_counter() - self.t0, 3), **{k: _clean(v) for k, v in metrics.items()}}
        if force or step % self.log_every == 0:
            self._file.write(json.dumps(record) + "\n")
            nums = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            for sink in self.sinks:
                sink.log(step, nums)
        self._show(step, metrics)

    def _show(self, step: int, metrics: dict[str, Any]) -> None:
        rate = (step - self.first) / max(time.perf_counter() - self.t0, 1e-9)  # steps/s since this process started
        info = progress_info(self.desc, metrics, rate if step > self.first else 0.0)
        if info is None:  # an evaluation's record: the line keeps the last step's numbers
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif self.main and (step % self._plain_every == 0 or step == self.total):
            eta = f"  ETA {(self.total - step) / rate:.0f}s" if rate > 0 and step < self.total else ""
            console.print(f"{self.desc} {step}/{self.total}  {info}{eta}", highlight=False, markup=False)

    def event(self, message: str) -> None:
        if self.main:  # the progress bar prints through this console too: the line goes above the bar
            console.print(message, highlight=False, markup=False)

    def samples(self, step: int, rows: list[dict]) -> None:
        """A few completions ({prompt, response, reward}): appended to samples.jsonl and shown."""
        if not self.main:
            return
        with open(self.out / "samples.jsonl", "a") as f:
            f.writelines(json.dumps({"step": step, **r}) + "\n" for r in rows)
        for sink in self.sinks:
            sink.table(step, "samples", rows)
        for r in rows:
            self.event(f"[sample @{step}] reward={r['reward']:.3g} | {r['prompt'][-60:]!r} -> {r['response'][:120]!r}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self._file.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def peak_memory_mb(device) -> dict[str, float]:
    out = {"memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        import torch

        out["memory/peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
