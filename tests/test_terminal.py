"""What a command prints: tether's own lines (the keys set, one progress line per logged step with loss, speed
and ETA), no third-party bars or warnings unless --verbose; an unexpected error is one line and a hint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import write_jsonl

from tether.algo.ppo import PPOConfig
from tether.algo.sft import SFTConfig
from tether.cli import main as cli
from tether.config import load_config
from tether.terminal import changed_keys

ROOT = Path(__file__).resolve().parents[1]
# what transformers, peft and huggingface_hub print by themselves
THIRD_PARTY = ("Warning:", "warnings.warn", "is_gradient_checkpointing", "fan_in_fan_out", "Loading weights", "Writing model shards", "it/s]")


def _prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"the movie {i} was"} for i in range(8)])


def _lora_ppo(model, tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", "ppo", f"model={model}", f"data.train={_prompts(tmp_path)}", f"out={tmp_path / 'o'}",
         "reward.fn=tether.rewards:word_fraction", "max_steps=2", "batch_size=4", "ppo.minibatch_size=4",
         "rollout.max_new_tokens=4", "engine.lora.r=4", "engine.threads=1", *extra],
        capture_output=True, text=True, env=env, timeout=300)


def test_a_lora_ppo_run_prints_only_tethers_lines_unless_verbose(tiny_gpt2, tmp_path):
    # peft's "fan_in_fan_out" note and transformers' "is_gradient_checkpointing is deprecated" FutureWarning
    # were printed in every LoRA run, between tether's lines
    p = _lora_ppo(tiny_gpt2, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert not [s for s in THIRD_PARTY if s in out], out
    lines = out.splitlines()
    assert lines[0] == f"tether ppo -> {tmp_path / 'o'}"
    # the keys given on the command line, as typed; the whole config is in the run folder
    assert lines[1].startswith(f"  config, keys set: model={tiny_gpt2}  out={tmp_path / 'o'}  max_steps=2  batch_size=4")
    assert "engine.lora.r=4" in lines[1] and "optim.lr" not in lines[1] and lines[1].endswith(f"(every key: {tmp_path / 'o' / 'config.json'})")
    progress = [line for line in lines if line.startswith("ppo 1/2") or line.startswith("ppo 2/2")]
    assert len(progress) == 2 and all("policy_loss=" in line and "steps/s" in line for line in progress), out
    assert "ETA" in progress[0]
    # --verbose: the libraries speak again (so the check above is not vacuous)
    v = _lora_ppo(tiny_gpt2, tmp_path, "--verbose")
    assert v.returncode == 0, v.stderr[-3000:]
    assert "is_gradient_checkpointing" in v.stderr and "fan_in_fan_out" in v.stderr


def broken_reward(prompts, responses, **kw):
    raise RuntimeError("the reward service went away\nsecond line of detail")


def test_an_unexpected_error_is_one_line_and_a_hint_and_verbose_gives_the_traceback(tiny_gpt2, tmp_path, capsys):
    args = ["ppo", f"model={tiny_gpt2}", f"data.train={_prompts(tmp_path)}", f"out={tmp_path / 'o'}", "reward.fn=test_terminal:broken_reward",
            "max_steps=1", "batch_size=4", "ppo.minibatch_size=4", "rollout.max_new_tokens=4"]
    assert cli(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == ["tether ppo: RuntimeError: the reward service went away",
                        "  hint: run again with --verbose for the traceback (and include it when you report a bug)"]
    assert not any("Traceback" in line for line in err)
    with pytest.raises(RuntimeError, match="the reward service went away"):
        cli(args + ["--verbose"])


def test_changed_keys_are_the_ones_that_differ_from_the_defaults():
    cfg = load_config(PPOConfig, None, ["model=m", "reward.fn=tether.rewards:word_fraction", "optim.lr=1e-4", "engine.lora.target_modules=q_proj,v_proj", "track.wandb=true",
                                        "batch_size=8"])  # 8 is batch_size's default: not shown
    assert changed_keys(cfg) == "model=m  optim.lr=0.0001  engine.lora.target_modules=q_proj,v_proj  track.wandb=true  reward.fn=tether.rewards:word_fraction"
    assert changed_keys(load_config(SFTConfig, None, ["batch_size=8"])) == "(all defaults)"
