"""Set-up shared by every stage: run folder, resolved config, seeds, data splits, step counts."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from tether.checkpoint import Checkpointer, atomic_write_text, seed_everything
from tether.config import ConfigError, save_config
from tether.data.records import DataError
from tether.terminal import changed_keys
from tether.track import console

SUMMARY_FILE = "summary.json"
HELD_OUT = "held_out.jsonl"  # data.eval_fraction's split, written into the run folder


def start_run(cfg, stage: str) -> tuple[Path, Checkpointer]:
    """Create the run folder, print and save the resolved config, seed every RNG."""
    if not cfg.model:
        raise ConfigError("config key 'model': required (a local Hugging Face model folder)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    console.print(f"[bold]tether {stage}[/bold] -> {out}", highlight=False)
    console.print(f"  config, keys set: {changed_keys(cfg)}  (every key: {out / 'config.json'})", highlight=False, markup=False)
    seed_everything(cfg.seed)
    return out, Checkpointer(out, keep=cfg.keep_checkpoints)


def load_train_eval(loader: Callable, cfg) -> tuple[list, list, Any]:
    """Read data.train (and data.eval, or split eval_fraction off train). Returns (train, eval, report)."""
    from tether.data import split_eval

    if not cfg.data.train:
        raise ConfigError("config key 'data.train': required (a data file)")
    train, report = loader(cfg.data.train, cfg.data.on_bad_record)
    if cfg.data.eval:
        held_out, eval_report = loader(cfg.data.eval, cfg.data.on_bad_record)
        console.print(f"eval data: {eval_report.summary()}", highlight=False)
    elif cfg.data.eval_fraction > 0:
        train, held_out = split_eval(train, cfg.data.eval_fraction, cfg.seed)
        # the held-out records as a file the loaders read: `tether eval` on what the model never saw
        rows = (_as_record(x) for x in held_out)
        atomic_write_text(Path(cfg.out) / HELD_OUT, "".join(json.dumps(r) + "\n" for r in rows))
        console.print(f"held-out split ({len(held_out)} records) -> {Path(cfg.out) / HELD_OUT}", highlight=False)
    else:
        held_out = []
    console.print(f"train data: {report.summary()}", highlight=False)
    return train, held_out, report


def _as_record(x) -> dict:
    """A loaded example as a record the readers take again (a pair's safety as chosen_safe / rejected_safe)."""
    rec = {k: v for k, v in dataclasses.asdict(x).items() if k not in ("loc", "safety") and v is not None}
    for side, flag in zip(("chosen_safe", "rejected_safe"), getattr(x, "safety", None) or ()):
        if flag:
            rec[side] = flag < 0
    return rec


def load_tokenized(cfg, load: Callable, tokenize: Callable) -> tuple[Any, list, list, Any, int, int]:
    """The data head every offline stage shares: tokenizer, train/eval records tokenised (bad records
    and truncation counted in the report), the pad id and the number of optimizer steps.
    Returns (tokenizer, train_items, eval_items, report, pad, steps)."""
    from tether.data import pad_id
    from tether.models import load_tokenizer

    tok = load_tokenizer(cfg.model)
    train, held_out, report = load_train_eval(load, cfg)
    train_items = require_examples(tokenize(train, tok, cfg.data, report), cfg, report)
    eval_items = tokenize(held_out, tok, cfg.data) if held_out else []
    return tok, train_items, eval_items, report, pad_id(tok), total_steps(cfg, len(train_items))


def require_examples(items: list, cfg, report) -> list:
    if not items:
        raise DataError(f"{cfg.data.train}: no training examples left ({report.summary()}); check the file and data.on_bad_record")
    return items


def sampler_and_step(cfg, ckpt, engines: dict, n_train: int) -> tuple[Any, int, dict]:
    """The seeded batch sampler and the step to start from: 0, or with `resume` the latest
    checkpoint's step, its weights/optimizer/RNG restored into `engines` and the sampler's position.
    Returns (sampler, step, loop state saved with the checkpoint ({} when starting fresh))."""
    from tether.data.loader import BatchSampler

    sampler = BatchSampler(n_train, cfg.batch_size, cfg.seed, cfg.data.shuffle)
    if not (cfg.resume and ckpt.latest() is not None):
        return sampler, 0, {}
    state = ckpt.load(engines)
    sampler.load_state_dict(state["sampler"])
    return sampler, state["step"], state


def total_steps(cfg, n_train: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = max(1, n_train // min(cfg.batch_size, n_train))
    return max(1, math.ceil(cfg.epochs * per_epoch))


def should(every: int, step: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def write_summary(out: Path, summary: dict) -> dict:
    """summary.json marks a finished stage (the pipeline skips stages that have one). Returns `summary`."""
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def is_finished(out: str | Path) -> bool:
    return (Path(out) / SUMMARY_FILE).exists() and (Path(out) / "final" / "config.json").exists()
