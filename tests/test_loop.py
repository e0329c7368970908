"""`tether loop`: active selection (plain), the 2-round quick loop end to end with its provenance and
report, resume after a SIGKILL in every stage, and the one-line errors of a bad config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tether.loop.run import STAGES, Loop, main, parse
from tether.loop.select import candidates, select, uncertainty

REPO = Path(__file__).resolve().parents[1]
# select=margin: round 2's tasks are scored by round 1's reward model (the active path runs in CI too)
ARGS = ["select=margin"]


# ------------------------------------------------------------------ selection


def test_candidates_skip_identical_and_empty_responses():
    assert candidates([["a", "b", "a"], ["x", " ", "y"]]) == [(0, 0, 1), (0, 1, 2), (1, 0, 2)]


def test_margin_selection_picks_the_planted_uncertain_pairs():
    groups = [[f"g{g}r{i}" for i in range(4)] for g in range(5)]
    pairs = candidates(groups)  # 5 groups x 6 pairs
    scores = [[[float(10 * i) for i in range(4)] for _ in range(5)]]  # responses 10 apart: every margin >= 10 ...
    planted = {(1, 0, 3), (3, 1, 2), (4, 2, 3)}
    for g, i, j in planted:
        scores[0][g][j] = scores[0][g][i] + 0.01  # ... but these three (every other margin stays above 9.9)
    chosen, u = select(pairs, 3, "margin", seed=0, scores=scores)
    assert {pairs[k] for k in chosen} == planted
    assert u[pairs.index((1, 0, 3))] == pytest.approx(-0.01) and u[pairs.index((0, 0, 1))] == -10.0


def test_ensemble_selection_picks_the_pairs_the_members_disagree_on():
    groups = [["a", "b", "c"] for _ in range(4)]
    pairs = candidates(groups)  # 4 groups x 3 pairs
    base = [[0.0, 1.0, 2.0] for _ in range(4)]
    other = [row[:] for row in base]
    other[2][0] = 3.0  # member 2 reverses a>b and a>c in group 2 only
    chosen, u = select(pairs, 2, "ensemble", seed=1, scores=[base, other])
    assert {pairs[k] for k in chosen} == {(2, 0, 1), (2, 0, 2)}
    # std of the two members' margins, by hand: pair (2,0,1): margins -1 and 2 -> std 1.5
    assert u[pairs.index((2, 0, 1))] == pytest.approx(1.5)
    assert u[pairs.index((0, 0, 1))] == 0.0
    with pytest.raises(ValueError, match="at least 2 reward models"):
        uncertainty(pairs, [base], "ensemble")


def test_random_selection_is_seeded_and_ties_are_not_broken_by_position():
    pairs = candidates([["a", "b", "c", "d"] for _ in range(10)])
    a, _ = select(pairs, 7, "random", seed=3)
    assert a == select(pairs, 7, "random", seed=3)[0] and a != select(pairs, 7, "random", seed=4)[0]
    assert len(set(a)) == 7 and select(pairs, 10_000, "random", seed=0)[0] == list(range(len(pairs)))
    flat = [[[0.0] * 4 for _ in range(10)]]  # every pair ties: the budget must not be the first pairs
    tied = select(pairs, 5, "margin", seed=0, scores=flat)[0]
    assert tied != list(range(5)) and tied == select(pairs, 5, "margin", seed=0, scores=flat)[0]


# ------------------------------------------------------------------ the quick loop


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loop") / "quick"
    Loop(parse(["--quick", "--out", str(out), *ARGS])).run()
    return out


def test_quick_loop_writes_every_round_with_provenance(quick):
    for r in (1, 2):
        for stage in STAGES:
            assert (quick / f"round_{r}" / stage / "stage.json").exists(), (r, stage)
        assert (quick / f"round_{r}" / "policy" / "final").is_dir() and (quick / f"round_{r}" / "rm" / "final").is_dir()
    samples = [json.loads(x) for x in (quick / "round_2" / "samples" / "samples.jsonl").read_text().splitlines()]
    assert {p for x in samples for p in x["policies"]} == {"round_1/policy"}  # round 2 samples round 1's policy
    tasks = [json.loads(x) for x in (quick / "round_2" / "tasks" / "tasks.jsonl").read_text().splitlines()]
    assert tasks and all("uncertainty" in t["meta"] for t in tasks)  # margin rule from round 2 on
    for r in (1, 2):
        labels = [json.loads(x) for x in (quick / f"round_{r}" / "labels" / "labels.jsonl").read_text().splitlines()]
        assert labels
        task_ids = {json.loads(x)["id"] for x in (quick / f"round_{r}" / "tasks" / "tasks.jsonl").read_text().splitlines()}
        for rec in labels:
            prov = rec["meta"]["provenance"]
            assert prov["round"] == r and prov["task"] in task_ids and len(prov["sample_ids"]) == 2
            assert prov["policies"] == (["sft", "sft"] if r == 1 else ["round_1/policy"] * 2)
            assert rec["meta"]["annotators"] and all(a.startswith("sim") for a in rec["meta"]["annotators"])
            by_id = {s: t for x in samples for s, t in zip(x["sample_ids"], x["responses"])} if r == 2 else None
            if by_id:  # the chosen response is the sample the provenance names first
                assert by_id[prov["sample_ids"][0]] == rec["chosen"] and by_id[prov["sample_ids"][1]] == rec["rejected"]
        split = sum(1 for name in ("train", "heldout") for _ in (quick / f"round_{r}" / "labels" / f"{name}.jsonl").read_text().splitlines())
        assert split == len(labels)
    shift = json.loads((quick / "round_2" / "rm" / "shift.json").read_text())
    assert shift["before"] is not None and shift["after"]["gold"]["pairs"] >= 0


def test_report_figures_equal_the_metrics_files(quick):
    metrics = json.loads((quick / "metrics.json").read_text())
    report = (quick / "report.md").read_text()
    assert (quick / "rounds.png").stat().st_size > 1000
    rows = [line for line in report.splitlines() if re.match(r"\| [12] \|", line)]
    assert len(rows) == 2
    total = 0
    for r, line in enumerate(rows, 1):
        cells = [c.strip() for c in line.strip("|").split("|")]
        ev = json.loads((quick / f"round_{r}" / "eval" / "metrics.json").read_text())
        labels = json.loads((quick / f"round_{r}" / "labels" / "stats.json").read_text())
        shift = json.loads((quick / f"round_{r}" / "rm" / "shift.json").read_text())
        total += labels["records"]
        fmt = lambda v, nd=3: "-" if v is None else f"{v:.{nd}f}"  # noqa: E731
        assert cells[1] == f"{labels['records']} / {total}"
        before = (shift["before"] or {}).get("gold", {}).get("accuracy")
        assert cells[2] == f"{fmt(before)} -> {fmt(shift['after']['gold']['accuracy'])}"
        assert cells[3] == fmt(ev["rm_accuracy_fresh"]["accuracy"]) and cells[4] == fmt(ev["rm_accuracy_sft_heldout"]["accuracy"])
        assert cells[5:10] == [fmt(ev["gold_mean"]), fmt(ev["win_vs_sft"]), fmt(ev["win_vs_previous"]), fmt(ev["kl"], 2), fmt(ev["length_mean"], 1)]
        assert metrics["rounds"][r - 1]["gold_mean"] == ev["gold_mean"] and metrics["rounds"][r - 1]["labels_total"] == total
    prov = metrics["provenance"]
    assert sum(prov["responses_by_policy"].values()) == 2 * sum(x["labels"] for x in metrics["rounds"])


# ------------------------------------------------------------------ resume after kills


def _final_files(out: Path) -> dict:
    files = {}
    for r in (1, 2):
        for rel in ("samples/samples.jsonl", "tasks/tasks.jsonl", "labels/labels.jsonl", "rm/shift.json", "eval/metrics.json", "eval/samples.jsonl"):
            files[f"round_{r}/{rel}"] = (out / f"round_{r}" / rel).read_text()
    files["rounds"] = json.dumps(json.loads((out / "metrics.json").read_text())["rounds"])
    return files


def test_resume_after_a_kill_in_each_stage_gives_the_same_files(quick, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tether.loop.run", "--quick", "--out", str(out), *ARGS]
    kills = ["1/samples", "1/labels", "1/rm", "2/tasks", "2/policy", "2/eval"]
    for at in kills:
        p = subprocess.run(cmd, cwd=REPO, env={**os.environ, "TETHER_LOOP_KILL_AT": at}, capture_output=True, text=True, timeout=600)
        assert p.returncode == -9, (at, p.stdout[-2000:], p.stderr[-2000:])
        r, stage = at.split("/")
        folder = out / f"round_{r}" / stage
        assert folder.is_dir() and not (folder / "stage.json").exists()  # killed inside the stage, before its marker
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "round 2 tasks: done (reused)" in p.stderr and "round 1 rm: done (reused)" in p.stderr  # progress goes to stderr
    assert _final_files(out) == _final_files(quick)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("over, message", [
    (["rounds=0"], "rounds"),
    (["select=ensemble"], "rm_ensemble"),
    (["select=best"], "select"),
    (["collect.source=ai"], "collect.judge"),
    (["ppo.bogus=1"], "ppo.bogus"),
    (["setup.bogus=1"], "setup.bogus"),
    (["prompts=x.jsonl"], "prompts"),
])
def test_bad_config_is_one_line(over, message, tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tether loop:") and message in err, err


def test_too_many_rounds_for_the_prompts_is_one_line(quick, tmp_path, capsys):
    setup = quick / "setup"
    args = ["--quick", "--out", str(tmp_path / "x"), f"sft_model={setup / 'sft' / 'final'}",
            f"prompts={setup / 'data' / 'prompts_eval.jsonl'}", f"eval_prompts={setup / 'data' / 'prompts_eval.jsonl'}", "rounds=50"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rounds x prompts_per_round needs 1200" in err, err


def test_a_round_labelled_by_the_ai_judge(quick, tiny_llama, tmp_path):
    """collect.source=ai: `tether ai label`'s judge (a tiny chat model here) labels the round; each record
    names the judge and keeps the loop's provenance; the judge's ties are counted, never kept as labels."""
    setup = quick / "setup"
    out = tmp_path / "ai"
    args = ["--quick", "--out", str(out), f"sft_model={setup / 'sft' / 'final'}", f"prompts={setup / 'data' / 'prompts_feedback.jsonl'}",
            f"eval_prompts={setup / 'data' / 'prompts_eval.jsonl'}", "rounds=1", "collect.source=ai", f"collect.judge={tiny_llama}",
            "collect.min_labels=1"]
    assert main(args) == 0
    labels = [json.loads(x) for x in (out / "round_1" / "labels" / "labels.jsonl").read_text().splitlines()]
    stats = json.loads((out / "round_1" / "labels" / "stats.json").read_text())
    tasks = (out / "round_1" / "tasks" / "tasks.jsonl").read_text().splitlines()
    assert labels and stats["records"] == len(labels) and stats["records"] + stats["ties"] + stats["errors"] == len(tasks), stats
    for rec in labels:
        assert rec["meta"]["labeler"] == Path(tiny_llama).name and rec["meta"]["provenance"]["round"] == 1
        assert rec["meta"]["provenance"]["policies"] == ["sft", "sft"]


def test_a_rerun_with_other_settings_is_refused(quick, capsys):
    """Finished stages are reused on a rerun, so a changed key that they depend on stops it (one line);
    more rounds or another collection deadline do not."""
    assert main(["--quick", "--out", str(quick), *ARGS, "labels_per_round=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tether loop: ") and "labels_per_round=" in err and "another --out" in err, err
    assert main(["--quick", "--out", str(quick), *ARGS, "collect.timeout_minutes=5"]) == 0


def test_the_shipped_config_runs(tmp_path):
    """configs/loop.yaml as its header says, shrunk by --quick (its keys under --quick's)."""
    out = tmp_path / "shipped"
    assert main(["--config", str(REPO / "configs" / "loop.yaml"), "--quick", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["select"] == "margin" and cfg["earlier_share"] == 0.25 and (out / "round_2" / "eval" / "stage.json").exists()
    samples = [json.loads(x) for x in (out / "round_2" / "samples" / "samples.jsonl").read_text().splitlines()]
    assert {p for x in samples for p in x["policies"]} == {"round_1/policy", "sft"}  # earlier_share: one of 4 from SFT
