"""Helpers for the multi-process tests: tiny dropout-free models, data files, launching stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WORDS = "the movie was good great bad awful fun boring film story plot really very not so".split()


def tiny_model(path: Path, arch: str = "gpt2", seed: int = 0, dropout: float | None = 0.0) -> Path:
    """A tiny random model, its config's dropout set to `dropout` (None: GPT-2's default 0.1)."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import make_tiny_model_dir

    make_tiny_model_dir(path, arch, seed=seed)
    if dropout is None:
        return path
    cfg = json.loads((path / "config.json").read_text())
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "attention_dropout"):
        if k in cfg:
            cfg[k] = dropout
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def sft_data(path: Path, n: int = 32) -> Path:
    rows = [{"prompt": _text(i, 3 + i % 4), "completion": " " + _text(i + 1, 2 + i % 5)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pref_data(path: Path, n: int = 32) -> Path:
    rows = [{"prompt": _text(i, 3 + i % 3), "chosen": " good " + _text(i + 2, 1 + i % 3), "rejected": " bad " + _text(i + 5, 2 + i % 4)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_data(path: Path, n: int = 32) -> Path:
    rows = [{"prompt": _text(i, 2 + i % 4)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def env(threads: int) -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO), CI="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def run_stage(stage: str, args: list[str], nproc: int = 1, timeout: int = 240, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    """Run `tether <stage> args` in one process, or under torchrun with nproc processes (gloo)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "tether.cli", stage, *args, "engine.threads=2"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tether.cli", stage, *args, "engine.threads=1"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env(2 if nproc == 1 else 1), capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return dt, p


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def max_diffs(out_a: Path, out_b: Path, keys: list[str]) -> tuple[float, float]:
    """(max |loss_a - loss_b| over steps and keys, max |w_a - w_b| over final weights)."""
    ma, mb = metrics(out_a), metrics(out_b)
    ma = [m for m in ma if any(k in m for k in keys)]
    mb = [m for m in mb if any(k in m for k in keys)]
    assert len(ma) == len(mb) and ma, (len(ma), len(mb))
    dl = max(abs(a[k] - b[k]) for a, b in zip(ma, mb) for k in keys if k in a)
    wa, wb = weights(Path(out_a) / "final"), weights(Path(out_b) / "final")
    assert wa.keys() == wb.keys()
    dw = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    return dl, dw
