"""Every shipped config runs as its header says, from a clean folder: the inputs made by the commands it
names (the tiny route), a couple of iterations. They used to stop at `data/prompts.jsonl: no such file`."""

import re
import subprocess
import sys

import pytest

from .util import REPO, env

# loop.yaml builds its own inputs (the demo's pretraining and SFT): tests/test_loop.py runs it
CONFIGS = sorted(c for c in (REPO / "configs").glob("*.yaml") if c.name != "loop.yaml")


def _tether(cwd, args, torchrun=False, timeout=300):
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    cmd = head + ["-m", "tether.cli", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env(1 if torchrun else 2), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-4000:]}"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A folder with only what the headers' commands make: tiny assets, then the tiny SFT and RM."""
    d = tmp_path_factory.mktemp("clean")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_assets.py"), "runs/tiny"], cwd=d, check=True, env=env(2))
    _tether(d, ["pipeline", "--config", str(REPO / "configs" / "pipeline.yaml"), "stages=sft,rm", "sft.max_steps=4", "rm.max_steps=4"])
    return d


def test_every_config_names_its_inputs():
    for cfg in CONFIGS:
        text = cfg.read_text()
        assert "runs/tiny" in text and ("make_tiny_assets.py" in text), f"{cfg.name}: its header does not say how to make its inputs"


@pytest.mark.parametrize("cfg", [c.name for c in CONFIGS if c.name != "pipeline.yaml"])
def test_config_runs_from_a_clean_folder(cfg, clean):
    text = (REPO / "configs" / cfg).read_text()
    extra = re.search(r"#   then add: (.+)", text).group(1).split()
    run = [("ppo" if cfg.startswith("ppo") else "dpo"), "--config", str(REPO / "configs" / cfg), *extra,
           f"out=runs/{cfg}", "max_steps=2", "batch_size=4", "track.progress=false"]
    if cfg.startswith("ppo"):
        run += ["rollout.max_new_tokens=4", "ppo.minibatch_size=0", "sample_every=0"]
    if cfg == "ppo_ray.yaml":
        run += ["engine.ray.num_cpus=2"]
    _tether(clean, run, torchrun=cfg == "ppo_ddp.yaml")
    assert (clean / "runs" / cfg / "final" / "config.json").exists()
