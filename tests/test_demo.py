"""`tether demo --quick` end to end: every stage leaves its outputs, and the report's numbers are the
ones in the metrics files (formatted, never recomputed)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("vaderSentiment")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import os

    from tether.data.corpora import shared_data_dir
    from tether.config import ConfigError

    try:
        shared_data_dir()
    except ConfigError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("demo")
    old = os.environ.get("TETHER_CACHE")
    os.environ["TETHER_CACHE"] = str(root / "cache")
    try:
        from tether.demo.sentiment import main

        out = root / "run"
        assert main(["--quick", "--out", str(out), "--threads", "2"]) == 0
        yield out
    finally:
        if old is None:
            os.environ.pop("TETHER_CACHE", None)
        else:
            os.environ["TETHER_CACHE"] = old


def test_every_stage_produced_its_outputs(quick_run):
    out = quick_run
    from tether.demo.sentiment import STAGES

    for stage in STAGES:
        info = json.loads((out / stage / "stage.json").read_text())
        assert info["timing"]["wall_s"] >= 0
    assert (out / "config.json").exists()
    assert (out / "pretrain" / "config.json").exists()
    pre = json.loads((out / "pretrain" / "summary.json").read_text())
    assert (Path(pre["model"]) / "config.json").exists() and (Path(pre["model"]) / "tokenizer.json").exists()
    for f in ("sft.jsonl", "prompts_feedback.jsonl", "prompts_eval.jsonl"):
        assert (out / "data" / f).stat().st_size > 0
    for stage in ("sft", "rm", "ppo", "dpo"):
        assert (out / stage / "config.json").exists(), stage
        assert (out / stage / "final" / "config.json").exists(), stage
        assert (out / stage / "metrics.jsonl").exists(), stage
    assert (out / "rm" / "final" / "tether_reward.json").exists()
    assert len(list((out / "ppo" / "checkpoints").glob("step_*/model_policy"))) >= 2
    assert len(list((out / "dpo" / "checkpoints").glob("step_*/model_policy"))) >= 1
    prefs = [json.loads(x) for x in (out / "annotate" / "preferences_train.jsonl").read_text().splitlines()]
    assert prefs and set(prefs[0]) == {"prompt", "chosen", "rejected", "id", "source", "meta"}
    ann = json.loads((out / "annotate" / "annotators.json").read_text())
    assert ann["train"]["records"] == len(prefs)
    assert (out / "bon" / "samples.jsonl").exists()
    for png in ("frontier.png", "proxy_vs_gold.png", "training.png", "win_rates.png"):
        p = out / "plots" / png
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"plots/{png}" in (out / "report.md").read_text()


def _md_rows(report: str, first_header: str) -> list[list[str]]:
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_report_numbers_are_the_metrics_files_numbers(quick_run):
    out = quick_run
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    results = json.loads((out / "results.json").read_text())
    by_name = {e["name"]: e for e in metrics["policies"]}

    rows = _md_rows(report, "policy")
    assert rows == results["table"]["rows"]
    names = [r[0] for r in rows]
    assert {"SFT", "PPO", "DPO"} <= set(names) and any(n.startswith("best-of-") for n in names)
    for name, gold, win, ci, kl, proxy, length in rows:
        e = by_name[name]
        assert gold == f"{e['gold_mean']:.3f}"
        assert win == f"{e['win_rate']:.3f}"
        assert ci == f"{e['ci_low']:.3f}–{e['ci_high']:.3f}"
        assert kl == f"{e['kl']:.2f}"
        assert proxy == f"{e['proxy_mean']:.3f}"
        assert length == f"{e['length_mean']:.1f}"
    # the win rate in the metrics file is the one its own counts give
    for e in metrics["policies"]:
        assert e["win_rate"] == pytest.approx((e["wins"] + 0.5 * e["ties"]) / e["n"])
        assert e["n"] == metrics["prompts"]

    checks = {r[0]: r for r in _md_rows(report, "check")}
    rm_row = checks["reward model accuracy vs gold (held-out prompts)"]
    assert rm_row[1] == f"{metrics['rm']['accuracy_vs_gold']:.3f}"
    assert checks["PPO win rate vs SFT (gold)"][1] == f"{by_name['PPO']['win_rate']:.3f}"
    assert checks["DPO win rate vs SFT (gold)"][1] == f"{by_name['DPO']['win_rate']:.3f}"

    # annotator numbers in the report are annotators.json's
    ann = json.loads((out / "annotate" / "annotators.json").read_text())["train"]
    assert f"| labels agreeing with gold (measured) | {ann['label_gold_agreement']:.3f} |" in report
    assert f"| inter-annotator agreement (share of votes for the majority) | {ann['inter_annotator_agreement']:.3f} |" in report

    # the PPO curve in the report's plots comes from ppo/metrics.jsonl; its last KL is the summary's
    ppo_summary = json.loads((out / "ppo" / "summary.json").read_text())
    last = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["objective/kl"] == pytest.approx(ppo_summary["objective/kl"])

    # the sample table shows eval/samples.jsonl's first rows
    first = json.loads((out / "eval" / "samples.jsonl").read_text().splitlines()[0])
    assert first["prompt"].replace("|", "\\|") in report


def test_second_pretrain_is_cached(quick_run):
    import time

    from tether.algo.pretrain import PretrainConfig, train
    from tether.config import load_config
    from tether.demo.sentiment import QUICK, DemoConfig

    pre = json.loads((quick_run / "pretrain" / "summary.json").read_text())
    keys = [o.split(".", 1)[1] for o in QUICK if o.startswith("pretrain.")]
    # the demo's precision (it sets the pretraining engine's; the cache key depends on it)
    cfg = load_config(PretrainConfig, None, keys + ["engine.device=cpu", "engine.threads=2", f"engine.precision={DemoConfig().resolved_precision}"])
    t = time.perf_counter()
    res = train(cfg)
    assert res["cached"] and res["model"] == pre["model"]
    assert time.perf_counter() - t < 5


def test_cut_responses_are_scored_with_the_eos_their_training_records_had(tiny_gpt2):
    """The RM is trained on text records (EOS appended to every response): a response cut at max_new_tokens
    is scored with that EOS too, and an RM score of a cut row equals the score of the same text + EOS."""
    import torch

    from tether.models import as_trained, load_scalar_model, load_tokenizer, sequence_scores
    from tether.types import RolloutBatch

    tok = load_tokenizer(tiny_gpt2)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # row 0 ended with EOS after 2 tokens; row 1 was cut after 3 (prompt [7, 8], left-padded in row 1)
    seqs = torch.tensor([[7, 8, 40, eos, pad], [pad, 9, 41, 42, 43]])
    attn = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    ro = RolloutBatch(sequences=seqs, attention_mask=attn, response_mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), logprobs=torch.zeros(2, 3),
                      prompt_length=2, finished=torch.tensor([True, False]))
    s, a = as_trained(ro.sequences, ro.attention_mask, ro.finished, eos, pad)
    assert s.tolist() == [[7, 8, 40, eos, pad, pad], [pad, 9, 41, 42, 43, eos]]
    assert a.tolist() == [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]
    rm = load_scalar_model(tiny_gpt2, pad_token_id=pad).eval()
    with torch.no_grad():
        scores = sequence_scores(rm, s, a)
        alone = sequence_scores(rm, torch.tensor([[9, 41, 42, 43, eos]]), torch.ones(1, 5, dtype=torch.long))
    assert torch.allclose(scores[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_quick_demo_says_which_precision_ran(precision, quick_run, tmp_path, capsys):
    # the demo's figures differ between fp32 and bf16 autocast (README quotes both); the report and the
    # terminal say which ran and why. bf16 runs only where the CPU has bf16 instructions (else ~100x slower).
    from tether.demo.sentiment import main
    from tether.models import cpu_has_bf16

    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("[cpu] this CPU emulates bf16 (no AVX512-BF16/AMX); the bf16 demo is checked on CPUs that have it")
    out = tmp_path / precision
    # the default precision already ran in quick_run; the other one runs here from the pretrained base it cached
    base = json.loads((quick_run / "pretrain" / "summary.json").read_text())["model"]
    assert main(["--quick", "--out", str(out), "--threads", "2", "--base-model", base, f"precision={precision}"]) == 0
    assert json.loads((out / "results.json").read_text())["precision"] == precision
    note = f"Precision: {precision} (precision={precision})."
    assert note in (out / "report.md").read_text()
    assert f"precision: {precision} (precision={precision})" in capsys.readouterr().out
    assert all(json.loads((out / s / "config.json").read_text())["engine"]["precision"] == precision for s in ("sft", "rm", "ppo", "dpo"))


def test_stages_are_the_stage_configs_with_the_demos_settings():
    """The demo's stages are `tether <stage>` configs: its settings, the user's `<stage>.` keys over them,
    the wiring where neither sets it, and RM/DPO epochs counted as the demo counts them."""
    from tether.config import ConfigError, load_config
    from tether.demo.sentiment import QUICK, DemoConfig, stage_config

    cfg = load_config(DemoConfig, None, QUICK + ["ppo.kl.coef=0.2", "rm.optim.lr=1e-3", "dpo.max_steps=7", "precision=fp32"])
    ppo = stage_config(cfg, "ppo", {"model": "m", "out": "o", "reward": {"model": "r"}, "rollout": {"max_new_tokens": 12}},
                       per_run=lambda steps: {"save_every": steps // 2})
    assert (ppo.kl.coef, ppo.max_steps, ppo.batch_size, ppo.ppo.minibatch_size, ppo.ppo.epochs) == (0.2, 4, 8, 8, 1)  # yours, then QUICK's
    assert (ppo.optim.lr, ppo.ppo.rollback, ppo.rollout.top_k, ppo.rollout.max_new_tokens, ppo.save_every) == (1e-4, False, 0, 12, 2)
    assert (ppo.reward.model, ppo.engine.precision, ppo.engine.device) == ("r", "fp32", "cpu")
    rm = stage_config(cfg, "rm", {"model": "m", "out": "o"}, n_train=100)
    assert (rm.optim.lr, rm.optim.weight_decay, rm.max_steps) == (1e-3, 0.0, 5)  # ceil(1.5 x 100 / 32)
    assert stage_config(cfg, "dpo", {"model": "m", "out": "o"}, n_train=100).max_steps == 7
    fn = load_config(DemoConfig, None, ["ppo.reward.fn=tether.rewards:word_fraction"])
    assert stage_config(fn, "ppo", {"model": "m", "out": "o", "reward": {"model": "r"}}).reward.model == ""  # yours, not the RM
    with pytest.raises(ConfigError, match="unknown config key 'ppo.kl.cof'; did you mean 'ppo.kl.coef'"):
        load_config(DemoConfig, None, ["ppo.kl.cof=1"])  # at load, before any stage runs


def test_constrained_experiment_on_the_quick_demo(quick_run, tmp_path):
    """python -m tether.demo.constrained: every variant trained with its λ settings, the report's numbers
    are the metrics file's, and each policy's cost is the gold rule on its own held-out responses."""
    from tether.demo.constrained import main
    from tether.track import read_metrics

    out = tmp_path / "constrained"
    assert main(["--demo", str(quick_run), "--out", str(out), "--weights", "4", "--n-prompts", "8", "--lambda-lr", "50"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["policies"]) == ["SFT", "unconstrained", "lagrangian", "fixed w=4"]
    logs = {n: read_metrics(out / "runs" / d / "metrics.jsonl") for n, d in
            (("unconstrained", "unconstrained"), ("lagrangian", "lagrangian"), ("fixed", "fixed_w4"))}
    assert all(x["lagrange/lambda"] == 0 for x in logs["unconstrained"])  # measured, never used
    assert all(x["lagrange/lambda"] == 4 for x in logs["fixed"])
    lam = [x["lagrange/lambda"] for x in logs["lagrangian"]]
    costs = [x["cost/mean"] for x in logs["lagrangian"]]
    # λ_t = max(0, λ_{t-1} + lr (cost_t - threshold)), from λ_0 = 1
    expect, ref = [], 1.0
    for c in costs:
        ref = max(0.0, ref + 50 * (c - m["threshold"]))
        expect.append(ref)
    assert lam == pytest.approx(expect, abs=1e-6) and m["lambda_trajectory"] == lam
    report = (out / "report.md").read_text()
    for name, r in m["policies"].items():
        assert f"| {name} | {r['gold_reward']:.3f} | {r['win_rate_vs_sft']:.3f} | {r['cost']:.3f} |" in report
    assert (out / "frontier.png").exists()
    assert main(["--demo", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_redteam_experiment_on_the_quick_demo(quick_run, tmp_path):
    """python -m tether.demo.redteam: both red policies trained on the two named rewards, the report's
    rows are the metrics file's, and the findings are files the rest of tether reads."""
    from tether.demo.redteam import main
    from tether.feedback.service import parse_task_lines
    from tether.track import read_metrics

    out = tmp_path / "redteam"
    assert main(["--demo", str(quick_run), "--out", str(out), "--steps", "3", "--n-prompts", "6", "-k", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["red_policies"]) == ["SFT (untrained red)", "red (diversity)", "red (no diversity)"]
    rows = read_metrics(out / "red" / "metrics.jsonl")
    assert len(rows) == 3 and all("rewards/failure/raw_mean" in r and "rewards/diversity/raw_mean" in r for r in rows)
    assert not any("rewards/diversity/raw_mean" in r for r in read_metrics(out / "red_no_diversity" / "metrics.jsonl"))
    report = (out / "report.md").read_text()
    for name, r in m["red_policies"].items():
        assert r["test_cases"] == 12 and f"| {name} | 12 | {r['failure_rate']:.3f}" in report
    findings = [json.loads(x) for x in (out / "findings" / "findings.jsonl").read_text().splitlines()]
    assert sum(f["failed"] for f in findings) == m["red_policies"]["red (diversity)"]["failures"]
    assert all(f["failed"] == (f["score"] < m["threshold"]) for f in findings)
    failing = list(dict.fromkeys(f["test_case"] for f in findings if f["failed"]))
    assert len(failing) == m["red_policies"]["red (diversity)"]["distinct_failures"]
    assert [json.loads(x)["prompt"] for x in (out / "findings" / "prompts.jsonl").read_text().splitlines()] == failing
    assert parse_task_lines("compare", (out / "findings" / "tasks.jsonl").read_text())[1] == []
    assert main(["--demo", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_the_reports_plots_and_tables_reach_the_trackers(quick_run, tmp_path, monkeypatch):
    """`tether demo track.tensorboard=true track.wandb=true`: the report's PNGs as images, its results and samples
    as tables (each stage logs its own curves with the same trackers), read back from the files written."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tether.config import load_config
    from tether.demo.sentiment import QUICK, DemoConfig, main, stage_config

    cfg = load_config(DemoConfig, None, QUICK + [f"out={tmp_path}", "track.tensorboard=true", "track.mlflow=true"])
    ppo = stage_config(cfg, "ppo", {"model": "m", "out": "o", "data": {"train": "t"}, "reward": {"model": "r"}})
    assert ppo.track.tensorboard and ppo.track.mlflow and ppo.track.mlflow_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    plain = stage_config(load_config(DemoConfig, None, QUICK), "ppo", {"model": "m", "out": "o", "data": {"train": "t"}, "reward": {"model": "r"}})
    assert plain.track == type(plain.track)()  # no tracker: the stage's track keys stay its defaults (none shown as set)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    shutil.copytree(quick_run, out)
    assert main(["--quick", "--out", str(out), "--threads", "2", "--from", "report", "track.tensorboard=true", "track.wandb=true"]) == 0
    pngs = sorted((out / "plots").glob("*.png"))
    assert len(pngs) >= 3
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == sorted(f"plots/{p.stem}" for p in pngs)
    assert {"results/text_summary", "samples/text_summary"} <= set(acc.Tags()["tensors"])
    run_id = (out / "wandb_run_id").read_text()
    (media,) = out.glob(f"wandb/offline-run-*-{run_id}/files/media")
    assert sorted(p.name.split("_0_")[0] for p in media.glob("images/plots/*.png")) == sorted(p.stem for p in pngs)
    samples = json.loads(next(media.glob("table/samples_0_*.table.json")).read_text())
    assert samples["columns"] == ["step", "prompt", "policy", "response", "gold"] and samples["data"]
