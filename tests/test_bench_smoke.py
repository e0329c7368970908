"""The benchmark harness runs end to end (tether side, --quick). No timing assertions."""

import importlib.util
import json

import pytest


def _quick(tmp_path, capsys, stages: str, tether_only: bool = True) -> tuple[str, dict]:
    """`benchmarks.compare --quick` on `stages` in fp32 -> (the printed table, the runs by "lib|stage|precision")."""
    from benchmarks.compare import main

    out = tmp_path / "runs.json"
    argv = ["--quick", "--stages", stages, "--precision", "fp32", "--dir", str(tmp_path / "workload"), "--json", str(out)]
    assert main(argv + (["--tether-only"] if tether_only else [])) == 0
    return capsys.readouterr().out, json.loads(out.read_text())["runs"]


@pytest.mark.slow
def test_bench_quick_tether_sft_rm(tmp_path, capsys):
    table, runs = _quick(tmp_path, capsys, "sft,rm")
    assert "sft" in table and "rm" in table
    for key in ("tether|sft|fp32", "tether|rm|fp32"):
        r = runs[key][0]
        assert r["steps"] == 6 and r["wall_s"] > 0 and all(x == x for x in r["losses"])


@pytest.mark.slow
def test_bench_quick_tether_grpo_loss_presets(tmp_path, capsys):
    """The grpo_loss rows run `tether ppo algo=...`'s presets (their KL and clip), with DAPO's dynamic
    sampling off as TRL has none, and print each row with its process time."""
    table, runs = _quick(tmp_path, capsys, "grpo_loss")
    assert all(f"rl:{s}" in table for s in ("algo_grpo", "dr_grpo", "dapo", "gspo")) and "process s" in table
    for stage, kl_in_loss in (("algo_grpo", True), ("dr_grpo", True), ("dapo", False), ("gspo", False)):
        r = runs[f"tether|{stage}|fp32"][0]
        assert r["steps"] == 2 and r["whole_s"] > r["wall_s"] > 0, stage
        assert ("loss/kl" in r["metrics"][-1]) == kl_in_loss, stage  # GRPO's k3 term at beta 0.04; none for DAPO and GSPO


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="[optional] TRL is a benchmark-only dependency (pip install -e .[bench])")
def test_bench_quick_trl_sft_same_step0_loss(tmp_path, capsys):
    _, runs = _quick(tmp_path, capsys, "sft", tether_only=False)
    t, r = runs["tether|sft|fp32"][0], runs["trl|sft|fp32"][0]
    assert abs(t["losses"][0] - r["losses"][0]) < 1e-4  # same work, same maths


def test_labeler_agreement_table_on_real_sets_and_its_resume(tiny_llama, tmp_path, capsys):
    from pathlib import Path

    from benchmarks.labeler_agreement import main

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not data.exists():
        pytest.skip("[data] ../shared/data is not beside this checkout")
    args = ["--model", str(tiny_llama), "--data", str(data), "--out", str(tmp_path), "--sets", "hhh,mtbench-human",
            "--n", "3", "--max-length", "384", "--routing-min", "3"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    rows = [r.split(" | ") for r in out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["| hhh", "| mtbench-human"] and all(r[1] == "3" and r[-1] != "– |" for r in rows)
    assert err.count("judging 3 pairs") == 2
    assert main(args) == 0  # finished sets are read back, not judged again
    again, err = capsys.readouterr()
    assert again == out and "judging" not in err
    assert main(args[:-6] + ["--n", "4", "--max-length", "384"]) == 0  # another sample size judges again
    out4, err = capsys.readouterr()
    assert err.count("judging 4 pairs") == 2 and "| hhh | 4 |" in out4


@pytest.mark.slow
def test_bench_quick_tether_offline_losses(tmp_path, capsys):
    """ORPO and SimPO (`tether dpo`'s reference-free loss types) and KTO run in the harness."""
    table, runs = _quick(tmp_path, capsys, "orpo,simpo,kto")
    assert all(s in table for s in ("orpo", "simpo", "kto"))
    for stage in ("orpo", "simpo", "kto"):
        r = runs[f"tether|{stage}|fp32"][0]
        assert r["steps"] == 6 and r["wall_s"] > 0 and len(r["losses"]) == 6 and all(x == x for x in r["losses"])
    # step 0: policy = reference, so every implicit reward and z0 are 0 and each example's loss is 1 - sigmoid(0)
    assert abs(runs["tether|kto|fp32"][0]["losses"][0] - 0.5) < 1e-6


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="[optional] TRL is a benchmark-only dependency (pip install -e .[bench])")
def test_bench_quick_trl_offline_losses_same_step0_loss(tmp_path, capsys):
    _, runs = _quick(tmp_path, capsys, "simpo,kto,orpo", tether_only=False)
    for stage in ("simpo", "kto"):  # same maths on both sides
        t, r = runs[f"tether|{stage}|fp32"][0], runs[f"trl|{stage}|fp32"][0]
        assert abs(t["losses"][0] - r["losses"][0]) < 1e-4, stage
    # ORPO's NLL term: TRL averages over all chosen tokens of the batch, tether per response and then over pairs
    t, r = runs["tether|orpo|fp32"][0], runs["trl|orpo|fp32"][0]
    assert abs(t["losses"][0] - r["losses"][0]) < 0.01 * abs(r["losses"][0])


def test_bench_generation_quick_tiny(tmp_path, capsys):
    """`benchmarks.generation --quick` on the workload's GPT-2: every decoder returns the whole batch with
    counted tokens, and greedy decoding gives tether's tokens, model.generate's and (when installed) TRL's alike."""
    import torch

    from benchmarks import generation as g

    d = tmp_path / "workload"
    out = tmp_path / "gen.json"
    assert g.main(["--model", "tiny", "--precision", "fp32", "--quick", "--dir", str(d), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    decoders = ["tether", "generate"] + (["trl"] if g.have_trl() else [])
    assert [r["decoder"] for r in rows] == decoders and "| tiny | fp32 | generate |" in capsys.readouterr().out
    for r in rows:  # 16 prompts x 4 samples, at most 32 counted tokens each
        assert r["sequences"] == 64 and 0 < r["tokens"] <= 64 * 32 and r["seconds"] > 0 and 0 < r["mfu"], r["decoder"]

    path, tok, texts, new_tokens, chat = g.model_setup("tiny", d)
    batch = g.prompt_batch(tok, texts[:4], 2, chat)
    eos = g.stop_ids(path, tok)
    ours = g.tether_decoder(path, tok, "fp32", 2)[0](batch, new_tokens, greedy=True)
    theirs = [g.generate_decoder(path, tok, "fp32", eos)[0]]
    if g.have_trl():
        theirs.append(g.trl_decoder(path, tok, "fp32", eos, new_tokens, tmp_path)[0])
    for gen in theirs:
        assert torch.equal(ours, gen(batch, new_tokens, greedy=True))


@pytest.mark.slow
def test_growth_sweeps_both_axes_and_plots(tmp_path, capsys):
    """benchmarks.growth at its smallest: two sequence lengths and two model shapes, one SFT step each, a
    table row per point with its parameter count, and the PNG."""
    from benchmarks.growth import main

    png, out = tmp_path / "growth.png", tmp_path / "growth.json"
    assert main(["--stages", "sft", "--seqs", "64,128", "--shapes", "2x128,4x256", "--modes", "full,lora", "--steps", "1", "--tether-only",
                 "--png", str(png), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["axis"], r["mode"], r["seq"]) for r in rows] == [("seq", "full", 64), ("seq", "full", 128), ("model", "full", 128), ("model", "full", 128),
                                                                ("model", "lora", 128), ("model", "lora", 128)]
    assert rows[2]["params"] < rows[3]["params"] and all(r["tether_s"] > 0 and r["tether_mb"] > 0 for r in rows)
    assert png.stat().st_size > 10_000 and "cost growth" in capsys.readouterr().out


def test_growth_fits_the_largest_model_per_memory_mode():
    """The 24 GiB extrapolation: a least-squares line through one mode's (parameters, peak MB) points,
    solved for LIMIT_MB (hand-derived: 1,000 MB at 1M and 2,000 MB at 3M is 0.5 MB per 1k parameters, so
    24,576 MB at 1M + 23,576 x 2,000 = 48.152M); other modes' and stages' rows do not enter; a falling line
    has no answer. (A run's peak memory is too noisy at the smoke test's sizes to assert a fit there.)"""
    from benchmarks.growth import LIMIT_MB, fit_largest

    rows = [{"axis": "model", "stage": "sft", "mode": "full", "params": 1e6, "tether_mb": 1000.0},
            {"axis": "model", "stage": "sft", "mode": "full", "params": 3e6, "tether_mb": 2000.0},
            {"axis": "model", "stage": "sft", "mode": "lora", "params": 1e6, "tether_mb": 900.0},
            {"axis": "model", "stage": "sft", "mode": "lora", "params": 3e6, "tether_mb": 1200.0},
            {"axis": "model", "stage": "rm", "mode": "full", "params": 3e6, "tether_mb": 1.0},
            {"axis": "seq", "stage": "sft", "mode": "full", "params": 2e6, "tether_mb": 9000.0}]
    assert LIMIT_MB == 24 * 1024 and fit_largest(rows, "tether", "sft") == pytest.approx(48.152e6)
    assert fit_largest(rows, "tether", "sft", "lora") == pytest.approx(1e6 + (LIMIT_MB - 900) / 150 * 1e6)
    assert fit_largest(rows, "tether", "rm") is None  # one point
    falling = [dict(r, tether_mb=3000.0 - r["tether_mb"]) for r in rows[:2]]
    assert fit_largest(falling, "tether", "sft") is None
