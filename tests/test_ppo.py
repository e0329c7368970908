"""PPO: loss invariance under micro-batching, learning on a rule reward, the KL leash, the rollback
guard, resume equivalence, group baselines, and one iteration on the real SmolLM2-135M."""

import copy
import json
import random

import pytest
import torch

from helpers import write_jsonl
from tiny import WORDS

from tether.algo import ppo
from tether.config import ConfigError, EngineConfig, OptimConfig, load_config
from tether.engine.local import LocalEngine
from tether.models import load_causal_lm, load_scalar_model, save_reward_stats
from tether.track import read_metrics
from tether.types import Experience

TARGET = list(range(10, 41))  # token ids the rule reward pays for (~10% of the tiny vocabulary)


def _prompts(path, n=64, seed=0):
    rng = random.Random(seed)
    return write_jsonl(path, [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))} for _ in range(n)])


def _cfg(model, tmp_path, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = [
        f"model={model}", f"data.train={_prompts(tmp_path / 'prompts.jsonl')}", f"out={tmp_path / 'run'}",
        "reward.fn=tether.rewards:token_fraction", f"reward.kwargs={{tokens: {TARGET}}}", "reward.missing_eos_penalty=0",
        "batch_size=16", "rollout.max_new_tokens=8", "optim.lr=3e-3", "ppo.minibatch_size=4",
        "engine.threads=1", "track.progress=false", "sample_every=0",
    ]
    return load_config(ppo.PPOConfig, None, base + list(overrides))


def _mean(xs):
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------------------------
# Invariance: one batch of 8 == 2 micro-batches of 4 with gradient accumulation


def _experience(V, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P, R = 8, 5, 6
    seq = torch.randint(5, V, (B, P + R), generator=g)
    attn = torch.ones(B, P + R, dtype=torch.long)
    attn[::3, :2] = 0  # left-padded prompts
    mask = torch.ones(B, R)
    mask[1::2, 4:] = 0  # responses of different lengths
    attn[:, P:] = mask.long()
    return Experience(
        sequences=seq, attention_mask=attn, response_mask=mask,
        logprobs=-3 - torch.rand(B, R, generator=g), ref_logprobs=-3 - torch.rand(B, R, generator=g),
        values=torch.randn(B, R, generator=g) * mask, advantages=torch.randn(B, R, generator=g) * mask,
        returns=torch.randn(B, R, generator=g) * mask, prompt_length=P,
    )


def _step(model, micro, loss_fn_factory, exp):
    eng = LocalEngine(model, EngineConfig(micro_batch_size=micro), OptimConfig(lr=1e-2, grad_clip=0.0, eps=1e-3))
    grads = {}
    orig = eng._step

    def spy(metrics):
        grads.update({k: p.grad.detach().clone() for k, p in eng.model.named_parameters() if p.grad is not None})
        return orig(metrics)

    eng._step = spy
    metrics = eng.train_step(exp, loss_fn_factory(float(exp.response_mask.sum())))
    return metrics, grads


@pytest.mark.parametrize("which", ["policy", "value"])
def test_ppo_loss_microbatch_invariance(tiny_gpt2, which):
    cfg = load_config(ppo.PPOConfig, None, ["reward.fn=x:y", "ppo.entropy_coef=0.01", "ppo.value_clip=0.1"])
    if which == "policy":
        base, factory, key = load_causal_lm(tiny_gpt2), (lambda n: ppo.policy_loss_fn(cfg, n)), "loss/policy"
    else:
        base, factory, key = load_scalar_model(tiny_gpt2), (lambda n: ppo.value_loss_fn(cfg, n)), "loss/value"
    ppo.disable_dropout(base)
    exp = _experience(base.config.vocab_size)
    m8, g8 = _step(copy.deepcopy(base), 0, factory, exp)
    m4, g4 = _step(copy.deepcopy(base), 4, factory, exp)
    assert abs(m8[key] - m4[key]) < 1e-6
    assert g8 and g8.keys() == g4.keys()
    for k in g8:
        assert torch.allclose(g8[k], g4[k], atol=1e-6, rtol=1e-4), k


# ----------------------------------------------------------------------------------------------
# Learning and the KL leash


def test_ppo_learns_rule_reward_with_bounded_kl(tiny_gpt2, tmp_path):
    summary = ppo.train(_cfg(tiny_gpt2, tmp_path, "max_steps=25", "kl.max=30"))
    rows = read_metrics(tmp_path / "run")
    rewards = [r["rewards/raw_mean"] for r in rows]
    before, after = _mean(rewards[:5]), _mean(rewards[-5:])
    assert after > before + 0.08, rewards  # from ~10% target tokens to clearly more
    assert after > 1.8 * before, rewards
    assert summary["rollbacks"] == 0
    assert max(r["objective/kl"] for r in rows) < 30
    for key in ("rewards/std", "objective/kl_token", "objective/kl_k2_token", "objective/kl_k3_token", "objective/kl_coef",
                "loss/policy", "loss/value", "policy/clipfrac", "value/clipfrac", "policy/approx_kl", "policy/entropy",
                "response/length_mean", "response/hit_max_fraction", "value/explained_variance",
                "timing/rollout", "timing/score", "timing/forward", "timing/update", "speed/gen_tokens_per_s", "memory/peak_rss_mb"):
        assert key in rows[-1], key
    assert (tmp_path / "run" / "final" / "config.json").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 25


def test_large_kl_coef_keeps_policy_at_reference(tiny_gpt2, tmp_path):
    runs = {}
    for coef in (0.0, 20.0):
        ppo.train(_cfg(tiny_gpt2, tmp_path / str(coef), "max_steps=12", f"kl.coef={coef}"))
        rows = read_metrics(tmp_path / str(coef) / "run")
        runs[coef] = (_mean([r["objective/kl"] for r in rows[-5:]]), _mean([r["rewards/raw_mean"] for r in rows[-5:]]))
    (kl_free, reward_free), (kl_leash, reward_leash) = runs[0.0], runs[20.0]
    assert kl_leash < 1.0 and kl_leash < 0.3 * kl_free, runs
    assert reward_leash < reward_free, runs


def test_adaptive_kl_controller_moves_and_resumes(tiny_gpt2, tmp_path):
    ppo.train(_cfg(tiny_gpt2, tmp_path, "max_steps=2", "kl.adaptive=true", "kl.target=0.01", "kl.horizon=100", "ppo.epochs=1"))
    coefs = [r["objective/kl_coef"] for r in read_metrics(tmp_path / "run")]
    assert coefs[0] == pytest.approx(0.05) and coefs[1] != pytest.approx(0.05)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_2" / "state.json").read_text())
    assert state["kl_controller"]["value"] != pytest.approx(0.05)


# ----------------------------------------------------------------------------------------------
# The guard


def test_rollback_on_injected_nan_and_run_continues(tiny_gpt2, tmp_path, monkeypatch):
    import helpers
    from tether import engine

    monkeypatch.setitem(engine.BACKENDS, "nan_once", "helpers:NanOnceEngine")
    # 16 prompts in minibatches of 4, one epoch: the policy's 5th step is the second iteration's first
    monkeypatch.setattr(helpers.NanOnceEngine, "at", 5)
    ppo.train(_cfg(tiny_gpt2, tmp_path, "max_steps=4", "ppo.epochs=1", "engine.backend=nan_once"))
    rows = read_metrics(tmp_path / "run")
    assert [r["guard/rolled_back"] for r in rows] == [0.0, 1.0, 0.0, 0.0]
    assert rows[-1]["guard/rollbacks"] == 1
    assert rows[2]["optim/skipped_policy"] == 0.0 and isinstance(rows[3]["loss/policy"], float)  # finite again
    final = load_causal_lm(tmp_path / "run" / "final")
    assert all(torch.isfinite(p).all() for p in final.parameters())


def test_kl_bound_rolls_back_to_previous_weights(tiny_gpt2, tmp_path):
    ppo.train(_cfg(tiny_gpt2, tmp_path, "max_steps=2", "ppo.epochs=1", "kl.max=1e-9"))
    rows = read_metrics(tmp_path / "run")
    assert [r["guard/rolled_back"] for r in rows] == [1.0, 1.0]
    before, after = load_causal_lm(tiny_gpt2).state_dict(), load_causal_lm(tmp_path / "run" / "final").state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_guard_stops_a_run_that_keeps_rolling_back(tiny_gpt2, tmp_path, capsys):
    # every update breaks kl.max: the run used to roll back 6 of 6 and exit 0 as if it had trained
    cfg = _cfg(tiny_gpt2, tmp_path, "max_steps=6", "ppo.epochs=1", "kl.max=1e-9", "ppo.max_rollbacks=3")
    argv = [f"{k}={v}" for k, v in [("model", cfg.model), ("data.train", cfg.data.train), ("out", cfg.out)]] + [
        "reward.fn=tether.rewards:token_fraction", f"reward.kwargs={{tokens: {TARGET}}}", "batch_size=16", "rollout.max_new_tokens=8",
        "ppo.minibatch_size=4", "engine.threads=1", "track.progress=false", "sample_every=0", "max_steps=6", "ppo.epochs=1",
        "kl.max=1e-9", "ppo.max_rollbacks=3"]
    assert ppo.main(argv) == 3
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("tether ppo: 3 updates in a row were rolled back") and "ppo.max_rollbacks=0" in last, last
    assert "Traceback" not in err
    rows = read_metrics(tmp_path / "run")
    assert [r["guard/rolled_back"] for r in rows] == [1.0, 1.0, 1.0]
    assert not (tmp_path / "run" / "summary.json").exists()  # not a finished stage


def test_guard_can_lower_the_learning_rate_instead(tiny_gpt2, tmp_path):
    summary = ppo.train(_cfg(tiny_gpt2, tmp_path, "max_steps=5", "ppo.epochs=1", "kl.max=1e-9", "ppo.max_rollbacks=2",
                             "ppo.on_rollbacks=lower_lr", "optim.schedule=constant"))
    rows = read_metrics(tmp_path / "run")
    lrs = [r["optim/lr_policy"] for r in rows]
    assert lrs == pytest.approx([3e-3, 3e-3, 1.5e-3, 1.5e-3, 7.5e-4]), lrs  # halved after every 2 rollbacks in a row
    assert [r["optim/lr_value"] for r in rows][-1] == pytest.approx(7.5e-4)
    assert summary["rollbacks"] == 5 and summary["steps"] == 5
    # resumed from the checkpoint of the iteration that halved the rates: the same run (the rates were
    # halved after that checkpoint was written, so a resume halved them one iteration late)
    common = ["ppo.epochs=1", "kl.max=1e-9", "ppo.max_rollbacks=2", "ppo.on_rollbacks=lower_lr", "optim.schedule=constant", "save_every=2"]
    ppo.train(_cfg(tiny_gpt2, tmp_path / "a", "max_steps=4", *common))
    ppo.train(_cfg(tiny_gpt2, tmp_path / "b", "max_steps=2", *common))
    ppo.train(_cfg(tiny_gpt2, tmp_path / "b", "max_steps=4", "resume=true", *common))
    a, b = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    assert [r["optim/lr_policy"] for r in a] == [r["optim/lr_policy"] for r in b] == pytest.approx([3e-3, 3e-3, 1.5e-3, 1.5e-3])


# ----------------------------------------------------------------------------------------------
# Resume


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "speed/", "memory/")) and k != "time"} for r in rows]


def resumed_equals_uninterrupted(model, tmp_path, *common):
    """4 steps in one run (a) and 2 + resume to 4 (b) log the same metrics; returns both logs."""
    ppo.train(_cfg(model, tmp_path / "a", "max_steps=4", *common))
    ppo.train(_cfg(model, tmp_path / "b", "max_steps=2", *common))
    ppo.train(_cfg(model, tmp_path / "b", "max_steps=4", "resume=true", *common))
    a, b = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert _comparable(a) == _comparable(b)
    return a, b


def test_resume_equivalence(tiny_gpt2, tmp_path):
    resumed_equals_uninterrupted(tiny_gpt2, tmp_path, "ppo.epochs=2", "save_every=2", "batch_size=8", "kl.adaptive=true")
    from safetensors.torch import load_file

    for name in ("final", "value"):  # raw tensors: loading "value" as a scalar model would re-draw its head
        wa, wb = (load_file(str(tmp_path / x / "run" / name / "model.safetensors")) for x in ("a", "b"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)


def test_reused_sampler_logprobs_equal_a_recomputed_pass(tiny_gpt2, tmp_path):
    """float32, untruncated sampling: the sampler's logprobs and entropy are the old-policy pass's, so
    skipping that pass changes nothing but rounding; with top-k the pass runs (the sampled distribution
    is not the policy's)."""
    common = ["max_steps=3", "ppo.epochs=2", "batch_size=8", "rollout.top_k=0", "rollout.top_p=1.0", "rollout.temperature=0.8"]
    ppo.train(_cfg(tiny_gpt2, tmp_path / "reuse", *common))
    ppo.train(_cfg(tiny_gpt2, tmp_path / "pass", *common, "rollout.reuse_logprobs=off"))
    ppo.train(_cfg(tiny_gpt2, tmp_path / "topk", "max_steps=1", "batch_size=8", "rollout.top_k=5"))
    a, b = read_metrics(tmp_path / "reuse" / "run"), read_metrics(tmp_path / "pass" / "run")
    assert [r["rollout/logprobs_reused"] for r in a] == [1.0] * 3 and [r["rollout/logprobs_reused"] for r in b] == [0.0] * 3
    assert all(r["rollout/logprob_drift"] < 1e-5 for r in b)
    for key in ("objective/kl", "policy/entropy", "loss/policy", "loss/value", "rewards/raw_mean", "policy/approx_kl"):
        for ra, rb in zip(a, b):
            assert ra[key] == pytest.approx(rb[key], rel=1e-3, abs=1e-5), key
    assert read_metrics(tmp_path / "topk" / "run")[0]["rollout/logprobs_reused"] == 0.0


def test_fused_value_pass_equals_a_separate_pass(tiny_gpt2, tmp_path):
    """A whole-batch minibatch: the critic's first step gives the old values (no separate no-grad pass), and
    every loss, value statistic and reward over 3 iterations x 2 epochs equals the separate pass's run."""
    common = ["max_steps=3", "ppo.epochs=2", "batch_size=8", "ppo.minibatch_size=0"]
    ppo.train(_cfg(tiny_gpt2, tmp_path / "fused", *common))
    ppo.train(_cfg(tiny_gpt2, tmp_path / "pass", *common, "critic.fuse_value_pass=off"))
    ppo.train(_cfg(tiny_gpt2, tmp_path / "minibatches", "max_steps=1", "batch_size=8"))  # minibatch 4 of 8: a pass
    a, b = read_metrics(tmp_path / "fused" / "run"), read_metrics(tmp_path / "pass" / "run")
    assert [r["value/fused_pass"] for r in a] == [1.0] * 3 and [r["value/fused_pass"] for r in b] == [0.0] * 3
    assert read_metrics(tmp_path / "minibatches" / "run")[0]["value/fused_pass"] == 0.0
    for key in ("loss/value", "value/explained_variance", "value/mean", "loss/policy", "policy/approx_kl", "objective/kl", "rewards/raw_mean"):
        for ra, rb in zip(a, b):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key


def test_fused_logprob_pass_equals_a_separate_pass(tiny_gpt2, tmp_path):
    """GRPO (KL in the loss) with top-k sampling, so the sampler's logprobs are not the policy's: the
    policy's first whole-batch step gives the old-policy logprobs (no separate no-grad pass) and every loss,
    KL, entropy, drift and reward over 3 iterations x 2 epochs equals the separate pass's run. The KL in the
    reward (PPO's default), importance weights or minibatches keep the pass."""
    common = ["algo=grpo", "max_steps=3", "ppo.epochs=2", "batch_size=4", "ppo.minibatch_size=0", "rollout.top_k=20"]
    ppo.train(_cfg(tiny_gpt2, tmp_path / "fused", *common))
    ppo.train(_cfg(tiny_gpt2, tmp_path / "pass", *common, "rollout.reuse_logprobs=off"))
    a, b = read_metrics(tmp_path / "fused" / "run"), read_metrics(tmp_path / "pass" / "run")
    assert [r["rollout/logprobs_fused"] for r in a] == [1.0] * 3 and [r["rollout/logprobs_fused"] for r in b] == [0.0] * 3
    for key in ("loss/policy", "policy/approx_kl", "policy/clipfrac", "policy/ratio", "objective/kl", "objective/kl_k3_token", "loss/kl", "policy/entropy",
                "rollout/logprob_drift", "rollout/logprob_drift_max", "rewards/raw_mean"):
        for ra, rb in zip(a, b):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
    assert a[-1]["rewards/raw_mean"] != a[0]["rewards/raw_mean"]  # it trained
    for i, extra in enumerate((["kl.in_loss=false", "kl.coef=0.05"], ["rollout.tis_cap=2"], ["ppo.minibatch_size=2"])):
        ppo.train(_cfg(tiny_gpt2, tmp_path / f"x{i}", *common, "max_steps=1", *extra))
        assert read_metrics(tmp_path / f"x{i}" / "run")[0]["rollout/logprobs_fused"] == 0.0, extra


# ----------------------------------------------------------------------------------------------
# Group baselines, reward models, config errors


def test_rloo_without_critic(tiny_gpt2, tmp_path, monkeypatch):
    import tether.packing

    packed, pack = [], tether.packing.pack
    monkeypatch.setattr(tether.packing, "pack", lambda rows, groups=None, *a, **k: packed.append(groups) or pack(rows, groups, *a, **k))
    summary = ppo.train(_cfg(tiny_gpt2, tmp_path, "max_steps=2", "advantage=rloo", "samples_per_prompt=2", "batch_size=4", "ppo.epochs=1"))
    # every packed pass was told which rows are one prompt's samples; the rollout's passes (all 8 rows) see
    # each prompt's two samples side by side, as the loop drew them
    whole = [g for g in packed if g is not None and len(g[0]) == 8]
    assert all(g is not None for g in packed) and whole, packed
    assert all(g[0][0::2] == g[0][1::2] and len(set(g[0])) == 4 for g in whole), whole
    rows = read_metrics(tmp_path / "run")
    assert "loss/value" not in rows[-1] and rows[-1]["loss/policy"] == rows[-1]["loss/policy"]
    assert not (tmp_path / "run" / "value").exists() and summary["steps"] == 2


def test_reward_model_scores_are_normalised(tiny_gpt2, tmp_path):
    rm_dir = tmp_path / "rm"
    rm = load_scalar_model(tiny_gpt2)
    rm.save_pretrained(rm_dir)
    from tether.models import load_tokenizer

    load_tokenizer(tiny_gpt2).save_pretrained(rm_dir)
    save_reward_stats(rm_dir, mean=0.5, std=2.0)
    cfg = _cfg(tiny_gpt2, tmp_path, "max_steps=1", "reward.fn=", f"reward.model={rm_dir}", "reward.clip=100", "ppo.epochs=1")
    assert cfg.critic_from_reward_model
    ppo.train(cfg)
    r = read_metrics(tmp_path / "run")[-1]
    assert r["rewards/mean"] == pytest.approx((r["rewards/raw_mean"] - 0.5) / 2.0, abs=1e-5)
    assert r["rewards/std"] == pytest.approx(r["rewards/raw_std"] / 2.0, abs=1e-5)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="reward.model"):
        load_config(ppo.PPOConfig, None, ["reward.model=a", "reward.fn=b:c"])
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        load_config(ppo.PPOConfig, None, ["reward.fn=b:c", "advantage=grpo"])
    with pytest.raises(ConfigError, match="critic.init"):
        load_config(ppo.PPOConfig, None, ["reward.fn=b:c", "critic.init=reward_model"])
    with pytest.raises(ConfigError, match="kl.estimator"):
        load_config(ppo.PPOConfig, None, ["reward.fn=b:c", "kl.estimator=k9"])


# ----------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_one_iteration_on_smollm2(request, tmp_path):
    try:
        model = request.getfixturevalue("smollm2_dir")
    except pytest.FixtureLookupError:
        pytest.skip("the smollm2_dir fixture (tests/conftest.py) is not available")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": q}]} for q in ("Say hello.", "Name a colour.")])
    cfg = load_config(ppo.PPOConfig, None, [
        f"model={model}", f"data.train={prompts}", f"out={tmp_path / 'run'}", "reward.fn=tether.rewards:length_penalty",
        "reward.kwargs={target: 5}", "critic.init=policy", "max_steps=1", "batch_size=2", "rollout.max_new_tokens=8",
        "ppo.epochs=1", "track.progress=false", "sample_every=1", "optim.lr=1e-6",
    ])
    summary = ppo.train(cfg)
    r = read_metrics(tmp_path / "run")[-1]
    assert summary["steps"] == 1 and r["guard/rolled_back"] == 0.0
    assert r["loss/policy"] == r["loss/policy"] and r["objective/kl"] == pytest.approx(0.0, abs=1e-3)


def test_vllm_rollout_without_vllm_is_one_line(tiny_gpt2, tmp_path):
    """rollout.backend=vllm where vLLM is not installed (this environment; tests/with_vllm run where it is)."""
    import importlib.util
    import subprocess
    import sys

    assert importlib.util.find_spec("vllm") is None, "the default test environment has no vLLM (it lives in .venv-vllm)"
    r = subprocess.run([sys.executable, "-m", "tether.cli", "ppo", f"model={tiny_gpt2}", f"data.train={_prompts(tmp_path / 'p.jsonl', n=4)}",
                        f"out={tmp_path / 'run'}", "reward.fn=tether.rewards:token_fraction", "max_steps=1", "batch_size=2", "rollout.backend=vllm"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "rollout.backend=vllm needs vLLM" in r.stderr.strip().splitlines()[-1] and "scripts/setup_vllm.sh" in r.stderr, r.stderr
