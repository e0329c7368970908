"""Where metrics go besides `metrics.jsonl`: the trackers teams already look at. `tether.track.Tracker`
builds the ones the config turns on; each has `log(step, numbers)` and `close()`.

    track.mlflow=true        MLflow (a SQLite store in the run folder unless track.mlflow_uri is set)
"""

from __future__ import annotations

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


def make_sinks(out: Path, cfg, run_config: dict[str, Any]) -> list:
    return [MLflowSink(out, cfg, run_config)] if getattr(cfg, "mlflow", False) else []
