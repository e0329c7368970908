"""Reports and samples in the trackers, read back from the files each one writes: `tether eval --track`
sends a report's numbers, tables and PNGs to MLflow, W&B (offline) and TensorBoard; PPO's sample
completions are an MLflow table per step; a resumed run continues the same MLflow run."""

import json
import os
from pathlib import Path

import pytest
from test_stages import _wandb_records, marker_pairs
from tiny import write_jsonl

from tether.cli import main as cli
from tether.track import read_metrics

mlflow = pytest.importorskip("mlflow") if not os.environ.get("CI") else __import__("mlflow")
if not os.environ.get("CI"):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")


def _mlflow_run(out):
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["tether"])
    assert len(runs) == 1, runs  # one run, also after a resume
    return client, runs.iloc[0].run_id


def _artifacts(client, run_id, path=None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def _png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def test_an_eval_report_reaches_mlflow_wandb_and_tensorboard(tiny_gpt2, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    train = write_jsonl(tmp_path / "train.jsonl", marker_pairs(16, 1))
    held = write_jsonl(tmp_path / "held.jsonl", marker_pairs(12, 2))
    assert cli(["rm", f"model={tiny_gpt2}", f"data.train={train}", f"out={tmp_path / 'rm'}", "max_steps=2", "batch_size=4"]) == 0
    out = tmp_path / "report"
    assert cli(["eval", "rm", "--model", str(tmp_path / "rm" / "final"), "--data", str(held), "--out", str(out),
                "--track", "mlflow,wandb,tensorboard"]) == 0
    pngs = sorted(out.glob("*.png"))
    metrics = json.loads((out / "metrics.json").read_text())["files"][0]
    assert len(pngs) >= 2
    # MLflow: the numbers, each table as a JSON table, each plot as an image (the same pixels' size)
    client, run_id = _mlflow_run(out)
    logged = client.get_run(run_id).data.metrics
    assert logged["files.held.jsonl.accuracy"] == pytest.approx(metrics["accuracy"])
    arts = _artifacts(client, run_id)
    for p in pngs:
        (img,) = [a for a in arts if a.startswith(f"images/plots.{p.stem}+step+0") and a.endswith(".png")]
        assert _png_size(client.download_artifacts(run_id, img, str(tmp_path / "dl"))) == _png_size(p)
    summary = json.loads(Path(client.download_artifacts(run_id, "summary/step_0.json", str(tmp_path / "dl"))).read_text())
    assert "accuracy" in summary["columns"] and len(summary["data"]) == 1
    # W&B offline: the images and tables in the run's media folder, the numbers in its history
    run_id = (out / "wandb_run_id").read_text()
    (run_dir,) = out.glob(f"wandb/offline-run-*-{run_id}")
    media = run_dir / "files" / "media"
    for p in pngs:
        (img,) = media.glob(f"images/plots/{p.stem}_0_*.png")
        assert _png_size(img) == _png_size(p)
    table = json.loads(next(media.glob("table/summary_0_*.table.json")).read_text())
    assert table["columns"][0] == "step" and "accuracy" in table["columns"]
    _, history = _wandb_records(run_dir / f"run-{run_id}.wandb")
    (row,) = [r for s, r in history if s == 0 and "files/held.jsonl/accuracy" in r]
    assert row["files/held.jsonl/accuracy"] == pytest.approx(metrics["accuracy"]) and row[f"plots/{pngs[0].stem}/_type"] == "image-file"
    # TensorBoard: its own reader finds an image per plot, the numbers as scalars, the tables as text
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    for p in pngs:
        (ev,) = acc.Images(f"plots/{p.stem}")
        assert (ev.width, ev.height) == _png_size(p)
    assert acc.Scalars("files/held.jsonl/accuracy")[0].value == pytest.approx(metrics["accuracy"])
    assert "summary/text_summary" in acc.Tags()["tensors"]


def test_ppo_samples_are_an_mlflow_table_and_a_resume_continues_the_mlflow_run(tiny_gpt2, tmp_path):
    from test_ppo import _cfg

    from tether.algo import ppo

    common = ["track.mlflow=true", "sample_every=2", "save_every=2", "batch_size=8"]
    ppo.train(_cfg(tiny_gpt2, tmp_path / "a", "max_steps=2", *common))
    out = tmp_path / "a" / "run"
    ppo.train(_cfg(tiny_gpt2, tmp_path / "a", "max_steps=4", "resume=true", *common))
    client, run_id = _mlflow_run(out)
    assert (out / "mlflow_run_id").read_text() == run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss.policy")] == [1, 2, 3, 4]
    every = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in every} >= {2, 4}  # both runs sampled
    assert sorted(a for a in _artifacts(client, run_id) if a.startswith("samples/")) == sorted({f"samples/step_{r['step']}.json" for r in every})
    table = json.loads(Path(client.download_artifacts(run_id, "samples/step_4.json", str(tmp_path / "dl"))).read_text())
    samples = [r for r in every if r["step"] == 4]
    prompts = [row[table["columns"].index("prompt")] for row in table["data"]]
    assert prompts == [r["prompt"] for r in samples] and table["columns"][0] == "step"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
