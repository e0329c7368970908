"""Invariance: 2 processes x batch 4 (torchrun, gloo) == 1 process x batch 8, for SFT, RM, DPO and PPO,
under DDP and FSDP2. All stages of one mode run in one launch to pay the start-up cost once.

Measured on a 2-core CPU (tiny GPT-2, 3 steps, AdamW eps 1e-6): max |loss difference| <= 7.2e-7 and
max |weight difference| <= 2.4e-6 for SFT, RM, DPO and PPO under DDP and FSDP2 (float summation order
only). PPO under FSDP2 differed by 0.01-0.1 in step-1 losses until session 6: the rollback guard's
snapshot took the gathered optimizer state, which torch.distributed.checkpoint initialises before the
first step with a step of its own (AdamW's bias correction then differed).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .util import REPO, env, max_diffs, metrics, pref_data, prompt_data, sft_data, tiny_model

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun on localhost")

LOSS_KEYS = {"sft": ["loss/sft"], "rm": ["loss/rm"], "dpo": ["loss/dpo"], "ppo": ["loss/policy", "loss/value"]}
TOL_LOSS, TOL_WEIGHT = 1e-5, 1e-4


def _specs(d: Path, backend: str) -> list:
    common = ["batch_size=8", "max_steps=3", "optim.lr=1e-3", "optim.eps=1e-6", "seed=3", f"model={d / 'model'}", "track.progress=false",
              f"engine.backend={backend}", "engine.threads=1" if backend != "local" else "engine.threads=2"]
    ppo = [f"data.train={d / 'prompts.jsonl'}", "reward.fn=tether.rewards:word_fraction", "critic.init=policy", "rollout.max_new_tokens=6",
           # greedy sampling: each rank samples its own rows, so random draws could not line up with one process
           "rollout.temperature=0", "ppo.epochs=2", "sample_every=0",
           # advantages are whitened per batch; in two processes each rank would whiten its half
           "ppo.whiten_advantages=false"]
    return [
        ["sft", common + [f"data.train={d / 'sft.jsonl'}", f"out={d / backend / 'sft'}"]],
        ["rm", common + [f"data.train={d / 'pref.jsonl'}", f"out={d / backend / 'rm'}"]],
        ["dpo", common + [f"data.train={d / 'pref.jsonl'}", f"out={d / backend / 'dpo'}"]],
        ["ppo", common + ppo + [f"out={d / backend / 'ppo'}"]],
    ]


def _launch(d: Path, backend: str) -> float:
    spec = d / f"{backend}.json"
    spec.write_text(json.dumps(_specs(d, backend)))
    script = str(REPO / "tests" / "distributed" / "stages.py")
    if backend == "local":
        cmd = [sys.executable, script, str(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, str(spec)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env(2 if backend == "local" else 1), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{backend} failed:\n{p.stdout[-2000:]}\n{p.stderr[-5000:]}"
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inv")
    # GPT-2's default dropout (0.1) in the config: every stage turns it off unless `dropout=true`, so two
    # processes draw no different masks (SFT kept it on and differed by 3e-3 at step 1)
    tiny_model(d / "model", dropout=None)
    assert json.loads((d / "model" / "config.json").read_text())["resid_pdrop"] > 0
    sft_data(d / "sft.jsonl")
    pref_data(d / "pref.jsonl")
    prompt_data(d / "prompts.jsonl")
    times = {b: _launch(d, b) for b in ("local", "ddp", "fsdp")}
    (d / "times.json").write_text(json.dumps(times))
    print("wall seconds per launch of 4 stages:", times)
    return d


@pytest.mark.parametrize("backend,stage", [(b, s) for b in ("ddp", "fsdp") for s in ("sft", "rm", "dpo", "ppo")])
def test_two_processes_equal_one(runs, backend, stage):
    dl, dw = max_diffs(runs / "local" / stage, runs / backend / stage, LOSS_KEYS[stage])
    print(f"{backend} {stage}: max |dloss| {dl:.2e}, max |dweight| {dw:.2e}")
    assert dl < TOL_LOSS and dw < TOL_WEIGHT, (dl, dw)


def test_only_rank0_writes(runs):
    rows = metrics(runs / "ddp" / "sft")
    assert [r["step"] for r in rows] == [1, 2, 3]  # one line per step, not one per rank
    assert not list((runs / "ddp" / "sft").glob("*.tmp-*"))
