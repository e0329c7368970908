"""Atomic checkpoints: a crash mid-save never damages the previous checkpoint.

Layout of a run folder:
    out/config.json            resolved config
    out/metrics.jsonl          one JSON object per logged step
    out/checkpoints/step_N/    model_<name>/ (HF folder, safetensors), optim_<name>.pt,
                               state.json (step, data position, controller state), rng.pt, config.json
    out/checkpoints/latest     text file naming the newest complete step folder
    out/final/                 the final model (HF folder)

A checkpoint is written to `step_N.tmp-<pid>`, fsynced, then renamed into place; `latest` is
replaced atomically afterwards. A half-written folder is never named by `latest` and is removed at
the next save.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether.atomic import _fsync_dir, atomic_write_text


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, what: str):
    """A failed write into `tmp` removes it (on a full disk a half-written file or folder would hold the
    space) and raises an OSError naming `what`, the disk's free space and the first line of the cause. Only
    rank 0 writes, so only it removes; a failure inside a nested save keeps the innermost cause (`why`)."""
    from tether.ranks import is_main

    try:
        yield
    except Exception as e:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        why = getattr(e, "why", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        err = OSError(f"{what} could not be written ({shutil.disk_usage(tmp.parent).free >> 20} MB free on its disk): {why}")
        err.why = why
        raise err from e


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, then rename: readers never see half a file. Under torchrun
    only rank 0 writes; the others wait until the file is complete."""
    from tether.ranks import barrier, is_main

    path = Path(path)
    if is_main():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with _removed_on_failure(tmp, f"file {path}"):
            torch.save(obj, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    barrier()


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_model_folder(model, path: Path, tokenizer=None, state_dict: dict | None = None, extra=None) -> None:
    """`model.save_pretrained` (config + safetensors [+ tokenizer]) to a temporary folder, fsynced, then
    renamed into place. Engines call it from `save_model`; under torchrun rank 0 writes and the others
    wait. `state_dict` replaces the module's own (gathered FSDP shards); `extra(folder)` adds files."""
    from tether.ranks import barrier, is_main

    path = Path(path)
    if is_main():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        with _removed_on_failure(tmp, f"model folder {path}"):
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            if extra is not None:
                extra(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            _fsync_tree(tmp)
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    barrier()


class Checkpointer:
    """Saves and restores everything a run needs to continue bit-for-bit on the same hardware."""

    def __init__(self, out: str | Path, keep: int = 2):
        self.root = Path(out) / "checkpoints"
        self.keep = max(1, keep)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "state.json").exists() else None

    def save(self, step: int, engines: dict[str, Any], state: dict[str, Any], config: dict[str, Any], tokenizer=None) -> Path:
        """engines: name -> Engine; state: JSON-able loop state. Under torchrun every rank calls this (an
        engine's save is a collective), rank 0 writes, the others wait at a barrier until it is complete."""
        from tether.ranks import barrier, is_main

        final = self.root / f"step_{step}"
        tmp = self.root / f"step_{step}.tmp-{os.getpid()}"
        if is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        with _removed_on_failure(tmp, f"checkpoint {final}"):
            for name, engine in engines.items():
                engine.save_model(tmp / f"model_{name}", merged=False)
                opt = engine.optimizer_state()
                if opt is not None and is_main():
                    torch.save(opt, tmp / f"optim_{name}.pt")
            if not is_main():
                barrier()
                return final
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            # state.json last: its presence marks the folder complete.
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
            _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / "latest", final.name + "\n")
        self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        steps = sorted((p for p in self.root.glob("step_*") if p.is_dir() and "." not in p.name), key=lambda p: int(p.name.split("_")[1]))
        latest = self.latest()
        for p in steps[: -self.keep]:
            if p != latest:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engines: dict[str, Any], path: Path | None = None) -> dict[str, Any]:
        """Restore weights, optimizer/scheduler and RNG; returns the loop state saved with them."""
        from safetensors.torch import load_file

        path = path or self.latest()
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root}")
        for name, engine in engines.items():
            folder = path / f"model_{name}"
            try:
                engine.load_state_dict({k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()})
            except RuntimeError as e:
                raise RuntimeError(f"checkpoint {folder} does not match the model: {e}") from None
            opt_file = path / f"optim_{name}.pt"
            if opt_file.exists():
                engine.load_optimizer_state(torch.load(opt_file, weights_only=False))
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        return json.loads((path / "state.json").read_text())
