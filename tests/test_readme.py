"""README's real-model quick start, run as written from an empty folder, with one change: after
`tether model import-gguf` the SmolLM2 weights are swapped for a tiny random Llama with the same
tokenizer and chat template, so every command, key and file name is checked in CI in about a minute.
The real-model times in README were measured by hand (docs in README say where)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tether.track import read_metrics

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

pytestmark = pytest.mark.slow


def readme_commands(section: str = "## Quick start with a real model", end: str = "Each run folder holds") -> list[str]:
    text = (REPO / "README.md").read_text()
    body = text[text.index(section):text.index(end)]
    lines = [ln for block in re.findall(r"```bash\n(.*?)```", body, re.S) for ln in block.replace("\\\n", " ").splitlines()]
    return [ln.split("  #")[0].strip() for ln in lines if ln.strip().startswith(".venv/bin/")]


def _shrink(folder: Path) -> None:
    """The imported model's config with 2 layers of width 64: same vocabulary, tokenizer, template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(folder))
    cfg.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32})
    torch.manual_seed(0)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder), safe_serialization=True)


def test_readme_quick_start_runs_as_written(tmp_path):
    if not (SHARED / "data").exists():
        pytest.skip("[data] ../shared/data is not beside this checkout")
    work = tmp_path / "tether"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    for name in (".venv", "scripts", "configs"):
        (work / name).symlink_to(REPO / name)
    if not (REPO / ".venv" / "bin" / "tether").exists():
        pytest.skip("[setup] no .venv/bin/tether (bash scripts/setup.sh makes it)")
    cmds = readme_commands()
    assert any("import-gguf" in c for c in cmds) and any(" ppo " in c for c in cmds) and any("eval policy" in c for c in cmds)
    env = {**os.environ, "CI": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    for cmd in cmds:
        p = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"README command failed ({p.returncode}): {cmd}\n{p.stderr[-3000:]}"
        if "import-gguf" in cmd:
            _shrink(work / "models" / "smollm2")
    assert json.loads((work / "runs" / "rm" / "summary.json").read_text())["eval/pairs"] > 0
    assert (work / "runs" / "eval_ppo" / "metrics.json").exists() and (work / "runs" / "dpo" / "final" / "config.json").exists()
    assert json.loads((work / "runs" / "redteam_smollm2" / "metrics.json").read_text())["harmful_compliance"]["n"] == 200


def test_readme_offline_preference_commands_run_as_written(tmp_path):
    """README's R-DPO / SimPO / ORPO / RPO / KTO lines on the tiny assets, as written."""
    if not (REPO / ".venv" / "bin" / "tether").exists():
        pytest.skip("[setup] no .venv/bin/tether (bash scripts/setup.sh makes it)")
    for name in (".venv", "scripts"):
        (tmp_path / name).symlink_to(REPO / name)
    cmds = readme_commands("## Offline preference optimisation", "The reference-free losses")
    assert sum(" dpo " in c for c in cmds) == 4 and any(" kto " in c for c in cmds)
    for cmd in cmds:
        p = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"README command failed ({p.returncode}): {cmd}\n{p.stderr[-3000:]}"
    for run in ("rdpo", "simpo", "orpo", "rpo", "kto"):
        assert json.loads((tmp_path / "runs" / run / "summary.json").read_text())["eval/rewards_accuracy"] > 0.9, run
    assert not (tmp_path / "runs" / "simpo" / "ref_logps.pt").exists() and (tmp_path / "runs" / "rdpo" / "ref_logps.pt").exists()
    assert read_metrics(tmp_path / "runs" / "rpo")[-1]["loss/rpo_nll"] > 0  # the NLL term is on
