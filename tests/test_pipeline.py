"""The pipeline: SFT -> RM -> PPO end to end on a tiny model, skipping finished stages, resuming an
interrupted one, failing early on a bad stage config."""

import json
import random
import shutil

import pytest
import yaml

from helpers import write_jsonl

from tether.algo import pipeline
from tether.algo.common import is_finished
from tether.config import ConfigError, load_config
from tether.track import read_metrics

POS = "good great wonderful amazing".split()
NEG = "bad awful terrible boring".split()
TOPICS = "movie film story plot actor scene".split()


def _data(tmp_path):
    rng = random.Random(0)
    sft = [{"prompt": f"the {rng.choice(TOPICS)} was", "completion": " " + " ".join(rng.choice(POS + NEG) for _ in range(2))} for _ in range(32)]
    prefs = [{"prompt": f"the {rng.choice(TOPICS)} was", "chosen": " " + rng.choice(POS), "rejected": " " + rng.choice(NEG)} for _ in range(32)]
    prompts = [{"prompt": f"the {t} was"} for t in TOPICS]
    return write_jsonl(tmp_path / "sft.jsonl", sft), write_jsonl(tmp_path / "prefs.jsonl", prefs), write_jsonl(tmp_path / "prompts.jsonl", prompts)


def _write_cfg(tmp_path, model, stages=("sft", "rm", "ppo")):
    sft, prefs, prompts = _data(tmp_path)
    common = {"batch_size": 8, "engine": {"threads": 1}, "track": {"progress": False}, "optim": {"lr": 1e-3}}
    cfg = {
        "out": str(tmp_path / "pipe"), "model": str(model), "stages": list(stages),
        "sft": {**common, "data": {"train": str(sft)}, "max_steps": 3},
        "rm": {**common, "data": {"train": str(prefs)}, "max_steps": 3},
        "ppo": {**common, "data": {"train": str(prompts)}, "max_steps": 2, "batch_size": 4, "sample_every": 0,
                "rollout": {"max_new_tokens": 6}, "ppo": {"epochs": 1}},
        "dpo": {**common, "data": {"train": str(prefs)}, "max_steps": 2},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_sft_rm_ppo_skips_finished_and_resumes(tiny_gpt2, tmp_path):
    path = _write_cfg(tmp_path, tiny_gpt2)
    assert pipeline.main(["--config", str(path)]) == 0
    root = tmp_path / "pipe"
    for s in ("sft", "rm", "ppo"):
        assert is_finished(root / s), s
    # the stages were wired: RM from the SFT model, PPO against the RM (and its statistics)
    assert json.loads((root / "rm" / "config.json").read_text())["model"] == str(root / "sft" / "final")
    ppo_cfg = json.loads((root / "ppo" / "config.json").read_text())
    assert ppo_cfg["model"] == str(root / "sft" / "final") and ppo_cfg["reward"]["model"] == str(root / "rm" / "final")
    assert (root / "rm" / "final" / "tether_reward.json").exists()

    # a second run skips every finished stage
    mtimes = {s: (root / s / "summary.json").stat().st_mtime_ns for s in ("sft", "rm", "ppo")}
    report = pipeline.run(load_config(pipeline.PipelineConfig, path))
    assert all(report["stages"][s]["skipped"] for s in mtimes)
    assert {s: (root / s / "summary.json").stat().st_mtime_ns for s in mtimes} == mtimes

    # interrupt PPO after its checkpoint: it resumes there, with a dotted override for more iterations
    (root / "ppo" / "summary.json").unlink()
    shutil.rmtree(root / "ppo" / "final")
    report = pipeline.run(load_config(pipeline.PipelineConfig, path, ["ppo.max_steps=3"]))
    assert report["stages"]["sft"]["skipped"] and report["stages"]["rm"]["skipped"] and not report["stages"]["ppo"]["skipped"]
    assert [r["step"] for r in read_metrics(root / "ppo")] == [1, 2, 3]
    assert is_finished(root / "ppo")


def test_pipeline_sft_dpo(tiny_gpt2, tmp_path):
    path = _write_cfg(tmp_path, tiny_gpt2, ("sft", "dpo"))
    report = pipeline.run(load_config(pipeline.PipelineConfig, path))
    assert set(report["stages"]) == {"sft", "dpo"}
    assert is_finished(tmp_path / "pipe" / "dpo") and not (tmp_path / "pipe" / "rm").exists()


def test_bad_stage_config_fails_before_anything_runs(tiny_gpt2, tmp_path):
    path = _write_cfg(tmp_path, tiny_gpt2)
    with pytest.raises(ConfigError, match="ppo.ppo.epoch"):
        pipeline.run(load_config(pipeline.PipelineConfig, path, ["ppo.ppo.epoch=2"]))
    assert not (tmp_path / "pipe" / "sft").exists()
    with pytest.raises(ConfigError, match="stages"):
        load_config(pipeline.PipelineConfig, path, ["stages=ppo,sft"])


@pytest.mark.parametrize("name", ["ppo", "dpo", "pipeline", "loop"])
def test_shipped_configs_load(name):
    from pathlib import Path

    from tether.algo import dpo, ppo
    from tether.loop.run import LoopConfig

    path = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    assert path.read_text().startswith("#") and f"tether {name} --config configs/{name}.yaml" in path.read_text()
    cls = {"ppo": ppo.PPOConfig, "dpo": dpo.DPOConfig, "pipeline": pipeline.PipelineConfig, "loop": LoopConfig}[name]
    cfg = load_config(cls, path)
    if name == "pipeline":
        assert [n for n, _ in pipeline.stage_configs(cfg)] == ["sft", "rm", "ppo"]
