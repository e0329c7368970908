"""Where metrics go besides `metrics.jsonl`: the trackers teams already look at. `tether.track.Tracker`
builds the ones the config turns on; each has `log(step, numbers)`, `samples(step, rows)` and `close()`.
The metric names are tether's `group/name` keys everywhere (MLflow, which refuses "/", gets "group.name").

    track.mlflow=true        MLflow (a SQLite store in the run folder unless track.mlflow_uri is set)
    track.wandb=true         Weights & Biases, project track.experiment; WANDB_MODE=offline writes <out>/wandb only
    track.tensorboard=true   TensorBoard event files in <out>/tensorboard (`tensorboard --logdir <out>/tensorboard`)

A resumed run (`--resume`) continues the same W&B run (its id is kept in <out>/wandb_run_id) and the same
TensorBoard folder, dropping the events past the step it resumes from.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any


def _flat(d: dict, p: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        out |= _flat(v, f"{p}{k}.") if isinstance(v, dict) else {f"{p}{k}": str(v)[:500]}
    return out


class MLflowSink:
    def __init__(self, out: Path, cfg, run_config: dict[str, Any]):
        try:
            import mlflow
        except ImportError:
            raise RuntimeError("track.mlflow=true needs MLflow: pip install 'tether[mlflow]'") from None
        mlflow.set_tracking_uri(cfg.mlflow_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}")
        mlflow.set_experiment(cfg.experiment)
        self.mlflow = mlflow
        mlflow.start_run(run_name=out.name)
        mlflow.log_params(_flat(run_config))

    def log(self, step: int, numbers: dict[str, float]) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


    def samples(self, step: int, rows: list[dict]) -> None:
        pass  # in samples.jsonl beside the run


class WandbSink:
    def __init__(self, out: Path, cfg, run_config: dict[str, Any], resume_step: int | None):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("track.wandb=true needs Weights & Biases: pip install 'tether[wandb]'") from None
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.exists() else secrets.token_hex(8)
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.experiment, name=out.name, id=run_id, resume="allow", dir=str(out), config=run_config)

    def log(self, step: int, numbers: dict[str, float]) -> None:
        self.run.log(numbers, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        cols = list(rows[0]) if rows else []
        self.run.log({"samples": self.wandb.Table(columns=["step", *cols], data=[[step, *(r[c] for c in cols)] for r in rows])}, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    def __init__(self, out: Path, cfg, run_config: dict[str, Any], resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("track.tensorboard=true needs TensorBoard: pip install 'tether[tensorboard]'") from None
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in _flat(run_config).items()), 0)

    def log(self, step: int, numbers: dict[str, float]) -> None:
        for k, v in numbers.items():
            self.writer.add_scalar(k, v, step)

    def samples(self, step: int, rows: list[dict]) -> None:
        cols = list(rows[0]) if rows else []
        table = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
                          ["| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", " ") for c in cols) + " |" for r in rows])
        self.writer.add_text("samples", table, step)

    def close(self) -> None:
        self.writer.close()


def make_sinks(out: Path, cfg, run_config: dict[str, Any], resume_step: int | None = None) -> list:
    """resume_step: the step a resumed run continues from (None: a new run)."""
    sinks: list = [MLflowSink(out, cfg, run_config)] if getattr(cfg, "mlflow", False) else []
    if getattr(cfg, "wandb", False):
        sinks.append(WandbSink(out, cfg, run_config, resume_step))
    if getattr(cfg, "tensorboard", False):
        sinks.append(TensorBoardSink(out, cfg, run_config, resume_step))
    return sinks
