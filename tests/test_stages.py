"""SFT and reward-model stages end to end on tiny random models: they run, learn, resume, and fail clearly."""

import json
import random

import pytest
import torch

from tether.algo import rm as rm_stage
from tether.algo import sft as sft_stage
from tether.cli import main as cli
from tether.config import ConfigError, load_config
from tether.track import read_metrics
from tiny import WORDS, write_jsonl


def sft_records(n=16, seed=0):
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.sample(WORDS, 3)), "completion": " " + " ".join(rng.sample(WORDS, 4))} for _ in range(n)]


def marker_pairs(n, seed):
    """Preference rule a model can learn: the response containing 'excellent' wins."""
    rng = random.Random(seed)
    vocab = [w for w in WORDS if w != "excellent"]
    out = []
    for _ in range(n):
        prompt = " ".join(rng.sample(vocab, 3))
        good = rng.sample(vocab, 4)
        good.insert(rng.randrange(5), "excellent")
        bad = rng.sample(vocab, 5)
        out.append({"prompt": prompt, "chosen": " " + " ".join(good), "rejected": " " + " ".join(bad)})
    return out


def _params(path, cls="causal"):
    from tether.models import load_causal_lm, load_scalar_model

    m = load_causal_lm(path) if cls == "causal" else load_scalar_model(path)
    return {k: v.detach().clone() for k, v in m.named_parameters()}


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_sft_runs_and_moves_every_parameter(arch, request, tmp_path):
    model = request.getfixturevalue(arch)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records())
    cfg = load_config(sft_stage.SFTConfig, None, [f"model={model}", f"data.train={data}", f"out={tmp_path/'run'}",
                                                   "max_steps=3", "batch_size=4", "optim.lr=1e-2", "data.eval_fraction=0.25"])
    summary = sft_stage.train(cfg)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in summary.items() if k.startswith(("loss/", "eval/")))
    before, after = _params(model), _params(tmp_path / "run" / "final")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not move: {unchanged}"
    m = read_metrics(tmp_path / "run")
    assert [r["step"] for r in m] == [1, 2, 3]
    assert "eval/perplexity" in m[-1]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 3


def test_sft_chat_messages_through_template(tiny_llama, tmp_path):
    recs = [{"messages": [{"role": "user", "content": "hello cat"}, {"role": "assistant", "content": "hello dog"}]}] * 4
    data = write_jsonl(tmp_path / "chat.jsonl", recs)
    cfg = load_config(sft_stage.SFTConfig, None, [f"model={tiny_llama}", f"data.train={data}", f"out={tmp_path/'run'}", "max_steps=1", "batch_size=2"])
    assert sft_stage.train(cfg)["steps"] == 1


def test_sft_memorises(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(8))
    cfg = load_config(sft_stage.SFTConfig, None, [f"model={tiny_gpt2}", f"data.train={data}", f"data.eval={data}",
                                                   f"out={tmp_path/'run'}", "max_steps=120", "batch_size=8", "optim.lr=1e-2", "track.log_every=20"])
    summary = sft_stage.train(cfg)
    assert summary["eval/loss"] < 0.1, summary


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_rm_runs_and_moves_every_parameter(arch, request, tmp_path):
    model = request.getfixturevalue(arch)
    data = write_jsonl(tmp_path / "prefs.jsonl", marker_pairs(16, 0))
    cfg = load_config(rm_stage.RMConfig, None, [f"model={model}", f"data.train={data}", f"out={tmp_path/'rm'}", "max_steps=3", "batch_size=4", "optim.lr=1e-2"])
    rm_stage.train(cfg)
    before = _params(model, "scalar")
    after = _params(tmp_path / "rm" / "final", "scalar")
    # The final norm's bias only shifts every score by the same constant, to which the Bradley-Terry
    # loss is invariant: its gradient is exactly zero, so it is the one parameter that must not move.
    shift_only = {"transformer.ln_f.bias"}
    unchanged = [k for k in before if k not in shift_only and torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    assert all(torch.equal(before[k], after[k]) for k in shift_only if k in before)
    stats = json.loads((tmp_path / "rm" / "final" / "tether_reward.json").read_text())
    # 3 steps x 4 pairs trained on: the statistics pass scores those 12 pairs' worth (24 scores) of the 16,
    # not all of them (it never costs more than the training's forward passes)
    assert stats["std"] > 0 and stats["n"] == 24


def test_rm_learns_marker_rule_to_95_percent(tiny_gpt2, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", marker_pairs(256, 1))
    held = write_jsonl(tmp_path / "held.jsonl", marker_pairs(100, 2))
    rc = cli(["rm", f"model={tiny_gpt2}", f"data.train={train}", f"data.eval={held}", f"out={tmp_path/'rm'}",
              "max_steps=80", "batch_size=16", "optim.lr=3e-3", "track.log_every=10"])
    assert rc == 0
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["eval/accuracy"] >= 0.95, summary
    assert summary["eval/pairs"] == 100


def _crash_after(monkeypatch, module, n_steps):
    """Make the stage's engine raise after n optimizer steps (a crash mid-run)."""
    real = module.make_engine

    def make(*a, **k):
        eng = real(*a, **k)
        orig, count = eng.train_step, {"n": 0}

        def step(*aa, **kk):
            if count["n"] == n_steps:
                raise KeyboardInterrupt("simulated crash")
            count["n"] += 1
            return orig(*aa, **kk)

        eng.train_step = step
        return eng

    monkeypatch.setattr(module, "make_engine", make)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_resume_equivalence(stage, tiny_gpt2, tmp_path, monkeypatch):
    module = sft_stage if stage == "sft" else rm_stage
    cls = sft_stage.SFTConfig if stage == "sft" else rm_stage.RMConfig
    data = write_jsonl(tmp_path / "d.jsonl", sft_records(12) if stage == "sft" else marker_pairs(12, 3))
    common = [f"model={tiny_gpt2}", f"data.train={data}", "max_steps=6", "batch_size=4", "optim.lr=5e-3",
              "optim.schedule=cosine", "optim.warmup_steps=2", "save_every=3", "seed=7"]
    module.train(load_config(cls, None, common + [f"out={tmp_path/'straight'}"]))
    with monkeypatch.context() as mp:
        _crash_after(mp, module, 3)
        with pytest.raises(KeyboardInterrupt):
            module.train(load_config(cls, None, common + [f"out={tmp_path/'resumed'}"]))
    assert (tmp_path / "resumed" / "checkpoints" / "step_3" / "state.json").exists()
    module.train(load_config(cls, None, common + [f"out={tmp_path/'resumed'}", "resume=true"]))
    kind = "causal" if stage == "sft" else "scalar"
    a, b = _params(tmp_path / "straight" / "final", kind), _params(tmp_path / "resumed" / "final", kind)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    key = "loss/sft" if stage == "sft" else "loss/rm"
    straight = {r["step"]: r[key] for r in read_metrics(tmp_path / "straight") if key in r}
    resumed = {r["step"]: r[key] for r in read_metrics(tmp_path / "resumed") if key in r}
    assert straight == resumed


def test_cli_help_lists_every_key_with_default(capsys):
    with pytest.raises(SystemExit):
        cli(["rm", "--help"])
    out = capsys.readouterr().out
    for key in ("model", "data.train", "data.on_bad_record", "optim.lr", "engine.precision", "track.mlflow", "use_margin"):
        assert key in out, key
    assert "default 1e-05" in out


def test_config_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; did you mean 'optim.lr'"):
        load_config(sft_stage.SFTConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"config key 'batch_size': expected an integer, got 'x'"):
        load_config(sft_stage.SFTConfig, None, ["batch_size=x"])
    with pytest.raises(ConfigError, match=r"config key 'data.on_bad_record': must be one of error, skip; got 'ignore'"):
        load_config(sft_stage.SFTConfig, None, ["data.on_bad_record=ignore"])
    with pytest.raises(ConfigError, match=r"config key 'data.eval_fraction': must be in \[0, 1\)"):
        load_config(sft_stage.SFTConfig, None, ["data.eval_fraction=1.5"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("optim:\n  lr: 0.001\nbatch_sise: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'batch_sise'; did you mean 'batch_size'"):
        load_config(sft_stage.SFTConfig, yaml_file, [])
    # the CLI turns them into a message and exit code 2, not a traceback
    assert cli(["sft", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err


def test_yaml_plus_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: m\noptim:\n  lr: 0.001\n  betas: [0.8, 0.9]\n")
    cfg = load_config(sft_stage.SFTConfig, f, ["optim.lr=2e-4", "data.train=a.jsonl,b.jsonl"])
    assert cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.8, 0.9) and cfg.data.train == "a.jsonl,b.jsonl"
    with pytest.raises(Exception):
        cfg.model = "x"  # frozen


def test_bad_record_stops_before_training(tiny_gpt2, tmp_path, capsys):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"}) + "\n")
    rc = cli(["rm", f"model={tiny_gpt2}", f"data.train={bad}", f"out={tmp_path/'rm'}", "max_steps=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: 'chosen' and 'rejected' are identical" in err
    assert not (tmp_path / "rm" / "final").exists()


def test_dropout_is_one_choice_for_every_stage(tiny_gpt2, tmp_path):
    # SFT kept GPT-2's dropout on while RM/DPO/PPO turned it off, so SFT under torchrun could not match one process
    assert json.loads((tiny_gpt2 / "config.json").read_text())["resid_pdrop"] == 0.1
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(8))
    for keep in (False, True):
        out = tmp_path / f"sft_{keep}"
        assert cli(["sft", f"model={tiny_gpt2}", f"data.train={data}", f"out={out}", "max_steps=1", "batch_size=4", f"dropout={str(keep).lower()}"]) == 0
        assert json.loads((out / "final" / "config.json").read_text())["resid_pdrop"] == (0.1 if keep else 0.0)


def test_rm_scores_the_held_out_set_once_at_the_end(tiny_gpt2, tmp_path, monkeypatch):
    # the last step's evaluation was computed again after training (90 s of 700 on SmolLM2 in README's quick start)
    calls = []
    real = rm_stage.score_pairs
    monkeypatch.setattr(rm_stage, "score_pairs", lambda engine, items, *a: calls.append(len(items)) or real(engine, items, *a))
    train = write_jsonl(tmp_path / "train.jsonl", marker_pairs(32, 1))
    held = write_jsonl(tmp_path / "held.jsonl", marker_pairs(12, 2))
    summary = rm_stage.train(load_config(rm_stage.RMConfig, None, [f"model={tiny_gpt2}", f"data.train={train}", f"data.eval={held}",
                                                                   f"out={tmp_path / 'rm'}", "max_steps=2", "batch_size=4", "track.progress=false"]))
    assert calls == [12, 8]  # the step-2 evaluation, then the statistics pass over the 2 x 4 pairs trained on
    assert summary["eval/pairs"] == 12 and summary["train/pairs"] == 8


def test_the_terminal_shows_no_per_model_progress_bars(tiny_gpt2, tmp_path):
    # every load and save drew a transformers bar ("Loading weights", "Writing model shards")
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(8))
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    p = subprocess.run([sys.executable, "-m", "tether.cli", "sft", f"model={tiny_gpt2}", f"data.train={data}", f"out={tmp_path / 'o'}",
                        "max_steps=1", "batch_size=4"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Loading weights" not in p.stderr and "Writing model shards" not in p.stderr, p.stderr[-2000:]


def test_a_full_disk_at_a_checkpoint_is_one_line_with_a_hint(tiny_gpt2, tmp_path):
    # CI's disk filled during a SmolLM2 checkpoint and the run ended in torch's "[enforce fail at
    # inline_container.cc:672] . unexpected pos": nothing said which file, or that the disk was the cause
    import resource
    import signal
    import subprocess
    import sys

    def limit_writes():  # the kernel refuses writes past 256 KB, as a full disk does: the optimizer state's
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))

    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(8))
    out = tmp_path / "o"
    p = subprocess.run([sys.executable, "-m", "tether.cli", "sft", f"model={tiny_gpt2}", f"data.train={data}", f"out={out}", "max_steps=2",
                        "save_every=1", "batch_size=4"], capture_output=True, text=True, timeout=120, preexec_fn=limit_writes)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and err[-2].startswith(f"tether sft: OSError: checkpoint {out / 'checkpoints' / 'step_1'} could not be written ("), p.stderr[-2000:]
    assert "MB free on its disk" in err[-2] and "keep_checkpoints=1" in err[-1]
    assert not list((out / "checkpoints").glob("*.tmp-*"))


def test_rm_writes_its_held_out_split_for_eval(tiny_gpt2, tmp_path, capsys):
    # README evaluated the reward model on its own training file (90% of it trained on)
    from tether.data import load_preferences

    pairs = marker_pairs(40, 3) + [{"prompt": "p", "chosen": "a yes", "rejected": ""}]
    train = write_jsonl(tmp_path / "train.jsonl", pairs)
    out = tmp_path / "rm"
    assert cli(["rm", f"model={tiny_gpt2}", f"data.train={train}", "data.eval_fraction=0.25", f"out={out}", "max_steps=2", "batch_size=4"]) == 0
    held, _ = load_preferences(str(out / "held_out.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    assert len(held) == summary["eval/pairs"] == 10
    assert {(p.prompt, p.chosen, p.rejected) for p in held} <= {(r["prompt"], r["chosen"], r["rejected"]) for r in pairs}
    assert cli(["eval", "rm", "--model", str(out / "final"), "--data", str(out / "held_out.jsonl"), "--out", str(tmp_path / "ev")]) == 0


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "generate"])
def test_a_missing_model_folder_is_one_line(stage, tmp_path, capsys):
    # was a 26-line traceback (exit 1)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c", "completion": "b"}])
    args = (["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"] if stage == "generate" else
            [stage, f"model={tmp_path / 'nope'}", f"data.train={data}", f"out={tmp_path / 'out'}", "reward.fn=tether.rewards:length"][: 4 + (stage == "ppo")])
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"tether {stage}: model folder {tmp_path / 'nope'} does not exist (give a local Hugging Face model folder, e.g. the `final/` of an earlier run)"
    assert not any("Traceback" in line for line in err)
    with pytest.raises(Exception, match="does not exist"):  # --verbose: the traceback, for a bug report
        cli(args + ["--verbose"])


@pytest.mark.parametrize("content", ["", json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"}) + "\n"])
def test_no_training_examples_is_one_line(content, tiny_gpt2, tmp_path, capsys):
    # an empty file was a ZeroDivisionError in total_steps; all records skipped, "ValueError: no training examples"
    data = tmp_path / "prefs.jsonl"
    data.write_text(content)
    assert cli(["rm", f"model={tiny_gpt2}", f"data.train={data}", f"out={tmp_path / 'rm'}", "data.on_bad_record=skip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"tether rm: {data}: no training examples left (") and "Traceback" not in "".join(err), err


def test_hh_transcripts_train_without_conversion(tiny_gpt2, tmp_path):
    recs = [
        {"chosen": "\n\nHuman: is the movie good?\n\nAssistant: yes it is wonderful",
         "rejected": "\n\nHuman: is the movie good?\n\nAssistant: no it is awful"},
        {"chosen": "\n\nHuman: hello\n\nAssistant: hello world\n\nHuman: thanks\n\nAssistant: you are welcome",
         "rejected": "\n\nHuman: hello\n\nAssistant: hello world\n\nHuman: thanks\n\nAssistant: no"},
    ] * 4
    data = write_jsonl(tmp_path / "hh.jsonl", recs)
    assert cli(["rm", f"model={tiny_gpt2}", f"data.train={data}", f"out={tmp_path/'rm'}", "max_steps=2", "batch_size=4"]) == 0


def test_mlflow_logging(tiny_gpt2, tmp_path):
    mlflow = pytest.importorskip("mlflow") if not __import__("os").environ.get("CI") else __import__("mlflow")
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(8))
    cfg = load_config(sft_stage.SFTConfig, None, [f"model={tiny_gpt2}", f"data.train={data}", f"out={tmp_path/'run'}",
                                                   "max_steps=2", "batch_size=4", "track.mlflow=true"])
    sft_stage.train(cfg)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path/'run'/'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tether"])
    assert len(runs) == 1
    hist = mlflow.tracking.MlflowClient().get_metric_history(runs.iloc[0].run_id, "loss.sft")
    assert [m.step for m in hist] == [1, 2]


def test_list_overrides_parse_their_items():
    from dataclasses import dataclass

    from tether.config import doc

    @dataclass(frozen=True)
    class C:
        ns: list[int] = doc([1], "ints")
        names: list[str] = doc([], "strings")

    c = load_config(C, None, ["ns=1,2,4", "names=a.jsonl,b.jsonl"])
    assert c.ns == [1, 2, 4] and c.names == ["a.jsonl", "b.jsonl"]
    assert load_config(C, None, ["ns=[3, 5]"]).ns == [3, 5]
    with pytest.raises(ConfigError, match="config key 'ns': expected an integer, got 'x'"):
        load_config(C, None, ["ns=1,x"])


def test_rm_keep_best_restores_the_best_evaluation(tiny_gpt2, tmp_path):
    # a learning rate high enough that held-out accuracy does not rise monotonically: the best
    # evaluation is not the last one, and the final folder must hold that step's weights
    train = write_jsonl(tmp_path / "train.jsonl", marker_pairs(64, 1))
    held = write_jsonl(tmp_path / "held.jsonl", marker_pairs(40, 2))
    rc = cli(["rm", f"model={tiny_gpt2}", f"data.train={train}", f"data.eval={held}", f"out={tmp_path/'rm'}",
              "max_steps=8", "batch_size=8", "optim.lr=5e-2", "optim.schedule=constant", "eval_every=1",
              "save_every=1", "keep_checkpoints=8", "keep_best=true", "track.progress=false"])
    assert rc == 0
    rows = [r for r in read_metrics(tmp_path / "rm") if "eval/accuracy" in r]
    best = max(rows, key=lambda r: (r["eval/accuracy"], -r["eval/loss"]))
    assert best["step"] != rows[-1]["step"], "the run's last evaluation was its best: raise the learning rate"
    from safetensors.torch import load_file

    # the files themselves: a checkpoint folder has no tether_reward.json, so load_scalar_model would
    # give it a fresh head
    final = load_file(tmp_path / "rm" / "final" / "model.safetensors")
    ckpt = tmp_path / "rm" / "checkpoints"
    at_best = load_file(ckpt / f"step_{best['step']}" / "model_reward_model" / "model.safetensors")
    last = load_file(ckpt / f"step_{rows[-1]['step']}" / "model_reward_model" / "model.safetensors")
    assert final.keys() == at_best.keys()
    assert all(torch.equal(final[k], at_best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)


def _tb_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_records(path):
    """The run record and the history rows of a .wandb file. wandb >= 0.19 has no Python reader of its
    own files (its core is in Go), so this reads the format: a 7-byte ':W&B' header, then LevelDB-log
    blocks of 32 KiB whose records (checksum, length, type; full / first / middle / last) hold
    protobuf `Record`s (wandb.proto)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks, pos = chunks + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            records.append(pb.Record.FromString(chunks))
            chunks = b""
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history = [(r.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
               for r in records if r.WhichOneof("record_type") == "history"]
    return run, history


def test_wandb_offline_and_tensorboard_logging_and_resume(tiny_gpt2, tmp_path, monkeypatch):
    """PPO logged to W&B (offline: the files wandb writes) and TensorBoard (read back by TensorBoard's own
    reader): the same group/name keys and values as metrics.jsonl, the config as run parameters, samples as
    a table; an interrupted run resumed continues the same W&B run and TensorBoard folder."""
    import os

    wandb = pytest.importorskip("wandb") if not os.environ.get("CI") else __import__("wandb")
    if not os.environ.get("CI"):
        pytest.importorskip("tensorboard")
    from test_ppo import _cfg

    from tether.algo import ppo

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = ["track.wandb=true", "track.tensorboard=true", "sample_every=2", "save_every=2", "batch_size=8"]
    ppo.train(_cfg(tiny_gpt2, tmp_path / "a", "max_steps=2", *common))
    out = tmp_path / "a" / "run"
    rows = read_metrics(out)
    tb = _tb_scalars(out / "tensorboard")
    for key in ("loss/policy", "rewards/raw_mean", "objective/kl"):
        assert tb[key] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    run_id = (out / "wandb_run_id").read_text()
    (run_dir,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    run, history = _wandb_records(run_dir / f"run-{run_id}.wandb")
    assert run.run_id == run_id
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["max_steps"] == 2 and config["ppo"]["minibatch_size"] == 4
    assert [step for step, _ in history] == [1, 2]
    for (step, logged), row in zip(history, rows):
        assert logged["loss/policy"] == pytest.approx(row["loss/policy"], rel=1e-6) and logged["samples/_type"] == "table-file"
    table = json.loads(next((run_dir / "files" / "media" / "table").glob("samples_2_*.table.json")).read_text())
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines() if json.loads(x)["step"] == 2]
    assert table["columns"] == ["step", "prompt", "response", "reward"] and [d[1] for d in table["data"]] == [r["prompt"] for r in samples]
    # resume: stopped after step 2 of 4, continued with --resume: one W&B run id, one TensorBoard history
    ppo.train(_cfg(tiny_gpt2, tmp_path / "a", "max_steps=4", "resume=true", *common))
    # wandb names the second folder offline-run-<time>-<id>-1 when both runs start within the same second
    assert (out / "wandb_run_id").read_text() == run_id and len([d for d in (out / "wandb").glob(f"offline-run-*-{run_id}*") if d.is_dir()]) == 2
    steps = [s for s, _ in _tb_scalars(out / "tensorboard")["loss/policy"]]
    assert steps == [1, 2, 3, 4], steps
