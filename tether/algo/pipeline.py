"""The RLHF phases in order: SFT -> reward model -> PPO (or SFT -> DPO), each stage reading the
previous stage's output folder. Restartable: a finished stage (summary.json + final/) is skipped, an
interrupted one continues from its latest checkpoint.

    tether pipeline --config configs/pipeline.yaml
    tether pipeline --config configs/pipeline.yaml ppo.max_steps=3 out=runs/p2

pipeline.yaml holds `out`, `model` and one section per stage (`sft:`, `rm:`, `ppo:` or `dpo:`), each a
config of that stage (see `tether <stage> --help`). Defaults wired between stages, unless a section
sets them: every stage's `out` = <out>/<stage>; sft.model = model; rm.model, ppo.model and dpo.model
= <sft out>/final; ppo.reward.model = <rm out>/final (unless ppo.reward.fn is set).
"""

from __future__ import annotations

import copy
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tether.cli import cli_main
from tether.config import ConfigError, _build, check, doc

# stage -> (module, config class)
STAGES = {
    "sft": ("tether.algo.sft", "SFTConfig"),
    "rm": ("tether.algo.rm", "RMConfig"),
    "ppo": ("tether.algo.ppo", "PPOConfig"),
    "dpo": ("tether.algo.dpo", "DPOConfig"),
}
ORDER = ["sft", "rm", "ppo", "dpo"]


@dataclass(frozen=True)
class PipelineConfig:
    out: str = doc("runs/pipeline", "root folder; stage S writes to <out>/S unless its section sets `out`")
    model: str = doc("", "the base model folder the first stage starts from")
    stages: list[str] = doc(["sft", "rm", "ppo"], "stages to run, in order: a subset of sft, rm, ppo, dpo (e.g. sft,dpo)")
    sft: dict = doc({}, "the SFT stage's config (keys of `tether sft --help`)")
    rm: dict = doc({}, "the reward-model stage's config (keys of `tether rm --help`)")
    ppo: dict = doc({}, "the PPO stage's config (keys of `tether ppo --help`)")
    dpo: dict = doc({}, "the DPO stage's config (keys of `tether dpo --help`)")
    resume: bool = doc(False, "accepted for symmetry: the pipeline always continues where it stopped")

    def validate(self, p: str = "") -> None:
        check(len(self.stages) > 0, f"{p}stages", "name at least one stage")
        for s in self.stages:
            check(s in STAGES, f"{p}stages", f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
        check(len(set(self.stages)) == len(self.stages), f"{p}stages", "a stage is listed twice")
        check(list(self.stages) == sorted(self.stages, key=ORDER.index), f"{p}stages", f"must be in the order {' -> '.join(ORDER)}")


def _final(out: str) -> str:
    return str(Path(out) / "final")


def stage_configs(cfg: PipelineConfig) -> list[tuple[str, object]]:
    """Build and validate every stage's config up front (so a typo in `ppo:` fails before SFT runs)."""
    from tether.algo.common import is_finished
    from tether.checkpoint import Checkpointer

    outs = {s: str(getattr(cfg, s).get("out") or Path(cfg.out) / s) for s in cfg.stages}
    built = []
    for name in cfg.stages:
        tree = copy.deepcopy(getattr(cfg, name))
        if not isinstance(tree, dict):
            raise ConfigError(f"config key '{name}': is a stage section; set its keys, e.g. {name}.max_steps=...")
        tree.setdefault("out", outs[name])
        tree.setdefault("model", _final(outs["sft"]) if name != "sft" and "sft" in outs else cfg.model)
        if name == "ppo" and "rm" in outs:
            reward = tree.setdefault("reward", {})
            if isinstance(reward, dict) and not reward.get("fn"):
                reward.setdefault("model", _final(outs["rm"]))
        out = tree["out"]
        if not is_finished(out) and Checkpointer(out).latest() is not None:
            tree["resume"] = True  # interrupted: continue from its checkpoint
        module, cls = STAGES[name]
        built.append((name, _build(getattr(importlib.import_module(module), cls), tree, f"{name}.")))
    return built


def run(cfg: PipelineConfig) -> dict:
    from tether.algo.common import is_finished
    from tether.checkpoint import atomic_write_text
    from tether.config import to_dict
    from tether.track import console

    if not cfg.model and not cfg.sft.get("model"):
        raise ConfigError("config key 'model': required (the base model folder for the first stage)")
    stages = stage_configs(cfg)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {"stages": {}}
    for name, stage_cfg in stages:
        if is_finished(stage_cfg.out):
            console.print(f"[bold]pipeline[/bold]: {name} already finished in {stage_cfg.out}; skipping", highlight=False)
            summary = json.loads((Path(stage_cfg.out) / "summary.json").read_text())
            report["stages"][name] = {"skipped": True, "out": stage_cfg.out, "summary": summary}
            continue
        verb = "resuming" if stage_cfg.resume else "running"
        console.print(f"[bold]pipeline[/bold]: {verb} {name} -> {stage_cfg.out}", highlight=False)
        t = time.perf_counter()
        summary = importlib.import_module(STAGES[name][0]).train(stage_cfg)
        report["stages"][name] = {"skipped": False, "out": stage_cfg.out, "seconds": round(time.perf_counter() - t, 2), "summary": summary}
    report["config"] = to_dict(cfg)
    atomic_write_text(root / "pipeline.json", json.dumps(report, indent=2, default=str) + "\n")
    console.print(f"[bold]pipeline[/bold]: done; {root / 'pipeline.json'}", highlight=False)
    return report


def main(argv: list[str]) -> int:
    return cli_main(PipelineConfig, run, argv, "tether pipeline", __doc__.strip().splitlines()[0])
