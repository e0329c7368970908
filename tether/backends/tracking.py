"""Where metrics go besides `metrics.jsonl`: the trackers teams already look at. `tether.track.Tracker`
builds the ones the config turns on; each has `log(step, numbers)`, `table(step, key, rows)` (sample
completions: a list of dicts with the same keys), `image(step, key, path)` (a PNG) and `close()`. The metric
names are tether's `group/name` keys everywhere (MLflow, which refuses "/", gets "group.name").
`log_report` sends a finished report (the demo's, `tether eval --track ...`) its numbers, tables and PNGs.

    track.mlflow=true        MLflow (a SQLite store in the run folder unless track.mlflow_uri is set)
    track.wandb=true         Weights & Biases, project track.experiment; WANDB_MODE=offline writes <out>/wandb only
    track.tensorboard=true   TensorBoard event files in <out>/tensorboard (`tensorboard --logdir <out>/tensorboard`)

A resumed run (`--resume`) continues the same MLflow and W&B runs (their ids are kept in <out>/mlflow_run_id
and <out>/wandb_run_id) and the same TensorBoard folder, dropping the events past the step it resumes from.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

from tether.config import flat_keys


def _cell(v: Any) -> Any:
    """A table cell the trackers take: numbers and strings as they are, anything else as JSON text."""
    return v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v, ensure_ascii=False)


def _flat(d: dict) -> dict[str, str]:
    return {k: str(v)[:500] for k, v in flat_keys(d).items()}  # MLflow params are strings of at most 500 characters


class MLflowSink:
    def __init__(self, out: Path, cfg, run_config: dict[str, Any], resume_step: int | None = None):
        try:
            import mlflow
        except ImportError:
            raise RuntimeError("track.mlflow=true needs MLflow: pip install 'tether[mlflow]'") from None
        mlflow.set_tracking_uri(cfg.mlflow_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}")
        mlflow.set_experiment(cfg.experiment)
        self.mlflow = mlflow
        id_file = out / "mlflow_run_id"
        if resume_step is not None and id_file.exists():
            mlflow.start_run(run_id=id_file.read_text().strip())  # its parameters are logged already
        else:
            id_file.write_text(mlflow.start_run(run_name=out.name).info.run_id)
            mlflow.log_params(_flat(run_config))

    def log(self, step: int, numbers: dict[str, float]) -> None:
        # MLflow takes letters, digits and _ - . : space in a name (a report's "by_length/0: [2, 4)" has more)
        self.mlflow.log_metrics({re.sub(r"[^\w\-. :]", "_", k.replace("/", ".")): v for k, v in numbers.items()}, step=step)

    def table(self, step: int, key: str, rows: list[dict]) -> None:
        cols = list(rows[0]) if rows else []
        # one JSON table per step (MLflow's table artifact, shown in its UI's evaluation view)
        self.mlflow.log_table({"step": [step] * len(rows), **{c: [_cell(r[c]) for r in rows] for c in cols}}, f"{key}/step_{step}.json")

    def image(self, step: int, key: str, path: Path) -> None:
        from PIL import Image

        with Image.open(path) as img:
            self.mlflow.log_image(img.convert("RGB"), key=key.replace("/", "."), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


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

    def table(self, step: int, key: str, rows: list[dict]) -> None:
        cols = list(rows[0]) if rows else []
        self.run.log({key: self.wandb.Table(columns=["step", *cols], data=[[step, *(_cell(r[c]) for c in cols)] for r in rows])}, step=step)

    def image(self, step: int, key: str, path: Path) -> None:
        self.run.log({key: self.wandb.Image(str(path))}, step=step)

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

    def table(self, step: int, key: str, rows: list[dict]) -> None:
        cols = list(rows[0]) if rows else []
        table = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
                          ["| " + " | ".join(str(_cell(r[c])).replace("|", "\\|").replace("\n", " ") for c in cols) + " |" for r in rows])
        self.writer.add_text(key, table, step)  # TensorBoard's text plugin renders Markdown tables

    def image(self, step: int, key: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            self.writer.add_image(key, np.asarray(img.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def make_sinks(out: Path, cfg, run_config: dict[str, Any], resume_step: int | None = None) -> list:
    """resume_step: the step a resumed run continues from (None: a new run)."""
    sinks: list = [MLflowSink(out, cfg, run_config, resume_step)] if getattr(cfg, "mlflow", False) else []
    if getattr(cfg, "wandb", False):
        sinks.append(WandbSink(out, cfg, run_config, resume_step))
    if getattr(cfg, "tensorboard", False):
        sinks.append(TensorBoardSink(out, cfg, run_config, resume_step))
    return sinks


def log_report(out: str | Path, cfg, run_config: dict[str, Any], metrics: dict[str, float] | None = None,
               tables: dict[str, list[dict]] | None = None, images: list[Path] | None = None, step: int = 0) -> list[str]:
    """A finished report to the trackers `cfg` turns on (a TrackConfig): its numbers, its tables and its PNGs
    (keyed `plots/<file stem>`), at `step`. Written again (a report made again in the same folder) it
    continues the same runs. Returns the names of the trackers written to."""
    out = Path(out)
    again = any((out / f).exists() for f in ("mlflow_run_id", "wandb_run_id", "tensorboard"))
    sinks = make_sinks(out, cfg, run_config, step - 1 if again else None)
    try:
        for sink in sinks:
            # a W&B run continued takes no step below the ones it has: a report made again is its next step
            at = max(step, getattr(getattr(sink, "run", None), "step", step))
            if metrics:
                sink.log(at, metrics)
            for key, rows in (tables or {}).items():
                sink.table(at, key, rows)
            for path in images or []:
                sink.image(at, f"plots/{Path(path).stem}", Path(path))
    finally:
        for sink in sinks:
            sink.close()
    return [{"MLflowSink": "MLflow", "WandbSink": "W&B"}.get(type(s).__name__, "TensorBoard") for s in sinks]
