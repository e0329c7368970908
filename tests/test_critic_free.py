"""Critic-free online RL on the PPO loop (`tether ppo algo=...`): GRPO and its variants (Dr. GRPO, DAPO,
GSPO), RLOO, REINFORCE++ (and its baseline form), ReMax. Hand-derived values and plain-loop references for
each estimator and loss, micro-batch invariance, learning on a rule reward, resume equivalence, the presets."""

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch

from test_ppo import TARGET, _cfg, _experience, _mean, _step, resumed_equals_uninterrupted

from tether import advantages as A
from tether import losses as L
from tether.algo import ppo
from tether.algo.rl_config import ALGOS
from tether.config import ConfigError, load_config
from tether.models import load_causal_lm
from tether.track import read_metrics

# ----------------------------------------------------------------------------------------------
# Estimators


def test_dr_grpo_drops_the_std_division():
    s = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    assert A.group_advantages(s, 3, A.Advantage.DR_GRPO).tolist() == [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]
    grpo = A.group_advantages(s, 3, A.Advantage.GRPO)  # the same numbers over each group's std (1 and sqrt(3))
    assert torch.allclose(grpo, torch.tensor([-1.0, 0.0, 1.0, -1 / 3**0.5, -1 / 3**0.5, 2 / 3**0.5]), atol=1e-5)


def test_reinforce_advantages_against_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    B, R, gamma = 4, 6, 0.9
    rewards, mask = torch.randn(B, R, generator=g), torch.ones(B, R)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    rewards = rewards * mask
    baseline = torch.randn(B, generator=g)
    got = A.reinforce_advantages(rewards, mask, baseline, gamma)
    for i in range(B):
        n = int(mask[i].sum())
        for t in range(R):
            want = sum(gamma ** (s - t) * float(rewards[i, s]) for s in range(t, n)) - float(baseline[i]) if t < n else 0.0
            assert float(got[i, t]) == pytest.approx(want, abs=1e-5), (i, t)
    assert torch.allclose(A.reinforce_advantages(rewards, mask, None, gamma), got + baseline[:, None] * mask, atol=1e-6)


def _estimate(kind, rewards, mask, G, baseline=None, whiten=False):
    cfg = load_config(ppo.PPOConfig, None, ["reward.fn=x:y", f"advantage={kind}", f"samples_per_prompt={G}", f"ppo.whiten_advantages={whiten}"])
    return ppo.estimate_advantages(rewards, torch.zeros_like(rewards), mask, cfg, baseline)[0]


def test_reinforce_pp_baseline_and_remax_by_hand():
    # two prompts x 2 samples; a -0.1 per-token KL penalty in the reward, the score on the last token
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    scores = torch.tensor([1.0, 0.0, 2.0, 4.0])
    rewards = A.kl_shaped_rewards(scores, torch.ones(4, 3), mask, 0.1)[0]
    # returns-to-go: row 0 [0.7, 0.8, 0.9], row 1 [-0.2, -0.1], row 2 [1.9], row 3 [3.7, 3.8, 3.9]
    # REINFORCE++-baseline: minus the group's mean return ((0.7 - 0.2) / 2 = 0.25; (1.9 + 3.7) / 2 = 2.8)
    want = torch.tensor([[0.45, 0.55, 0.65], [-0.45, -0.35, 0.0], [-0.9, 0.0, 0.0], [0.9, 1.0, 1.1]])
    assert torch.allclose(_estimate("reinforce_baseline", rewards, mask, 2), want, atol=1e-5)
    # ReMax: minus the greedy response's reward of each prompt (given; one value per row)
    greedy = torch.tensor([0.5, 0.5, 3.0, 3.0])
    want = torch.tensor([[0.2, 0.3, 0.4], [-0.7, -0.6, 0.0], [-1.1, 0.0, 0.0], [0.7, 0.8, 0.9]])
    assert torch.allclose(_estimate("remax", rewards, mask, 1, greedy), want, atol=1e-5)
    # REINFORCE++: no baseline, the returns-to-go whitened over the batch's tokens
    rtg = torch.tensor([[0.7, 0.8, 0.9], [-0.2, -0.1, 0.0], [1.9, 0.0, 0.0], [3.7, 3.8, 3.9]])
    flat = rtg[mask.bool()]
    want = (rtg - flat.mean()) / flat.std() * mask
    assert torch.allclose(_estimate("reinforce", rewards, mask, 1, whiten=True), want, atol=1e-4)


def test_dynamic_sampling_filter_and_overlong_penalty():
    s = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    assert A.uniform_groups(s, 2).tolist() == [True, True, False, False, True, True, True, True]
    # max 10 tokens, buffer 4: free up to 6, then -1/4 per token down to -1 at 10
    got = A.overlong_penalty(torch.tensor([3, 6, 7, 8, 10]), 10, 4)
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]


# ----------------------------------------------------------------------------------------------
# Losses


def _plain_policy_loss(new, old, adv, mask, agg, eps, eps_high, seq_ratio, max_len):
    """The surrogate written out per sequence and token in Python floats."""
    B, R = mask.shape
    lens = [int(mask[i].sum()) for i in range(B)]
    total, num_tokens = 0.0, sum(lens)
    for i in range(B):
        seq_lr = sum(float(new[i, t] - old[i, t]) for t in range(lens[i])) / lens[i]
        for t in range(lens[i]):
            rho = math.exp(seq_lr if seq_ratio else float(new[i, t] - old[i, t]))
            a = float(adv[i, t])
            term = -min(rho * a, min(max(rho, 1 - eps), 1 + eps_high) * a)
            total += term / {"token": num_tokens, "sequence": lens[i] * B, "constant": B * max_len}[agg]
    return total


@pytest.mark.parametrize("agg", ["token", "sequence", "constant"])
@pytest.mark.parametrize("seq_ratio", [False, True])
def test_policy_loss_aggregations_and_ratios_against_a_plain_loop(agg, seq_ratio):
    g = torch.Generator().manual_seed(1)
    B, R = 5, 7
    mask = torch.ones(B, R)
    mask[0, 2:] = mask[3, 5:] = 0
    old = -2 - torch.rand(B, R, generator=g)
    new = old + 0.3 * torch.randn(B, R, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, R) * mask
    norm = L.loss_normaliser(mask, L.LossAgg(agg), float(mask.sum()), float(B), 10)
    loss, _ = L.ppo_policy_loss(new, old, adv, mask, norm, 0.2, 0.28, seq_ratio)
    assert float(loss) == pytest.approx(_plain_policy_loss(new, old, adv, mask, agg, 0.2, 0.28, seq_ratio, 10), rel=1e-5)


def test_aggregations_and_clip_higher_by_hand():
    # ratio 1 everywhere: the loss is -sum(A) under each normaliser. Rows of 1 and 3 tokens, A = 3 and 1.
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv, lp = torch.tensor([[3.0], [1.0]]).expand(2, 3) * mask, torch.zeros(2, 3)
    for agg, want in (("token", -6 / 4), ("sequence", -(3 / 1 + 3 / 3) / 2), ("constant", -6 / (2 * 8))):
        norm = L.loss_normaliser(mask, L.LossAgg(agg), 4.0, 2.0, 8)
        assert float(L.ppo_policy_loss(lp, lp, adv, mask, norm)[0]) == pytest.approx(want), agg
    # one token, ratio 1.25 with A = 1: clipped to 1.2 by eps 0.2, kept by eps_high 0.28 (DAPO's clip-higher);
    # ratio 0.75 with A = -1: the lower clip 0.8 holds either way (-min(-0.75, -0.8) = 0.8)
    one = torch.ones(1, 1)
    for rho, a, high, want in ((1.25, 1.0, 0.0, -1.2), (1.25, 1.0, 0.28, -1.25), (0.75, -1.0, 0.28, 0.8)):
        new = torch.full((1, 1), math.log(rho))
        assert float(L.ppo_policy_loss(new, torch.zeros(1, 1), a * one, one, 1.0, 0.2, high)[0]) == pytest.approx(want)


def test_gspo_ratio_gradient_by_hand():
    # unclipped, one sequence of 2 tokens with log ratios 0.1 and 0.3: s = exp(0.2), L = -s A over 1 sequence;
    # dL/d logp_t = -s A / 2 for each token (the sequence's mean log ratio)
    new = torch.tensor([[0.1, 0.3]], requires_grad=True)
    mask, A_ = torch.ones(1, 2), 2.0
    norm = L.loss_normaliser(mask, L.LossAgg.SEQUENCE, 2.0, 1.0, 2)
    loss, m = L.ppo_policy_loss(new, torch.zeros(1, 2), torch.full((1, 2), A_), mask, norm, 0.5, 0.0, seq_ratio=True)
    loss.backward()
    s = math.exp(0.2)
    assert float(loss.detach()) == pytest.approx(-s * A_)
    assert new.grad[0].tolist() == pytest.approx([-s * A_ / 2, -s * A_ / 2])
    assert float(m["policy/ratio"]) == pytest.approx(s)


def test_k3_kl_in_the_loss_by_hand():
    # pi = 1/2, ref = 1 on each token: k3 = ref/pi - 1 - log(ref/pi) = 1 - log 2; gradient 1 - ref/pi = -1
    lp = torch.full((1, 2), math.log(0.5), requires_grad=True)
    ref, mask = torch.zeros(1, 2), torch.ones(1, 2)
    loss, m = L.kl_loss(lp, ref, mask, 2.0, 0.04, L.KLEstimator.K3)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.04 * (1 - math.log(2)) * 2 / 2.0)
    assert float(m["policy/kl_ref"]) == pytest.approx(1 - math.log(2))
    assert lp.grad[0].tolist() == pytest.approx([-0.02, -0.02])


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "dapo", "gspo", "reinforce_pp_baseline"])
def test_policy_loss_microbatch_invariance(tiny_gpt2, algo):
    cfg = load_config(ppo.PPOConfig, None, ["reward.fn=x:y", f"algo={algo}", "kl.coef=0.1", "ppo.clip_high=0.3", "rollout.max_new_tokens=6"])
    base = load_causal_lm(tiny_gpt2)
    ppo.disable_dropout(base)
    exp = _experience(base.config.vocab_size)
    factory = lambda n: ppo.policy_loss_fn(cfg, n, float(len(exp)))  # noqa: E731
    m8, g8 = _step(copy.deepcopy(base), 0, factory, exp)
    m4, g4 = _step(copy.deepcopy(base), 4, factory, exp)
    for key in ("loss/policy", "loss/kl") if cfg.kl.in_loss else ("loss/policy",):
        assert abs(m8[key] - m4[key]) < 1e-6, key
    assert g8 and g8.keys() == g4.keys()
    for k in g8:
        assert torch.allclose(g8[k], g4[k], atol=1e-6, rtol=1e-4), k


# ----------------------------------------------------------------------------------------------
# The presets and their keys


def test_presets_set_keys_and_the_users_keys_win(capsys):
    c = load_config(ppo.PPOConfig, None, ["reward.fn=x:y", "algo=grpo"])
    assert (c.advantage, c.kl.in_loss, c.kl.estimator, c.kl.coef, c.ppo.loss_agg, c.ppo.whiten_advantages) == ("grpo", True, "k3", 0.04, "sequence", False)
    c = load_config(ppo.PPOConfig, None, ["reward.fn=x:y", "algo=dapo", "ppo.clip_high=0.3", "samples_per_prompt=8"])
    assert (c.ppo.clip_high, c.samples_per_prompt, c.dynamic_sampling, c.kl.coef) == (0.3, 8, True, 0.0)
    assert load_config(ppo.PPOConfig, None, ["reward.fn=x:y"]).advantage == "gae"  # ppo: nothing changes
    shipped = Path(__file__).parents[1] / "configs" / "ppo_critic_free.yaml"  # README's command for each method
    assert "tether ppo --config configs/ppo_critic_free.yaml algo=grpo" in shipped.read_text()
    for algo in ALGOS:  # each preset is a valid config, alone and over the shipped one
        assert load_config(ppo.PPOConfig, None, ["reward.fn=x:y", f"algo={algo}"]).algo == algo
        assert load_config(ppo.PPOConfig, shipped, [f"algo={algo}"]).ppo.epochs == (1 if algo in ("rloo", "remax") else 4)
    with pytest.raises(ConfigError, match="config key 'algo': must be one of ppo, grpo"):
        load_config(ppo.PPOConfig, None, ["reward.fn=x:y", "algo=trpo"])
    with pytest.raises(ConfigError, match="config key 'dynamic_sampling': needs samples_per_prompt >= 2"):
        load_config(ppo.PPOConfig, None, ["reward.fn=x:y", "dynamic_sampling=true"])
    with pytest.raises(ConfigError, match="overlong_buffer"):
        load_config(ppo.PPOConfig, None, ["reward.fn=x:y", "overlong_buffer=40", "rollout.max_new_tokens=32"])
    with pytest.raises(SystemExit):
        ppo.main(["--help"])
    out = capsys.readouterr().out
    for key in ("algo", "advantage", "kl.in_loss", "ppo.clip_high", "ppo.ratio", "ppo.loss_agg", "dynamic_sampling", "dynamic_sampling_batches", "overlong_buffer", "overlong_penalty"):
        assert f"  {key} (" in out, key
    for name in (*ALGOS, "dr_grpo", "reinforce_baseline", "remax"):
        assert name in out, name


# ----------------------------------------------------------------------------------------------
# Learning, resume, the loop's options


def _learns(tiny_gpt2, tmp_path, algo, *overrides, steps=20):
    ppo.train(_cfg(tiny_gpt2, tmp_path, f"algo={algo}", f"max_steps={steps}", "batch_size=4", *overrides))
    rows = read_metrics(tmp_path / "run")
    rewards = [r["rewards/raw_mean"] for r in rows]
    before, after = _mean(rewards[:4]), _mean(rewards[-4:])
    assert after > before + 0.08 and after > 1.8 * before, rewards  # from ~10% target tokens to clearly more
    return rows


def test_grpo_learns_rule_reward(tiny_gpt2, tmp_path):
    rows = _learns(tiny_gpt2, tmp_path, "grpo")
    assert "loss/value" not in rows[-1] and rows[-1]["loss/kl"] > 0 and rows[-1]["objective/non_score_reward"] == 0.0


def test_rloo_learns_rule_reward(tiny_gpt2, tmp_path):
    rows = _learns(tiny_gpt2, tmp_path, "rloo", "ppo.minibatch_size=0", "optim.lr=2e-2", steps=30)  # the preset: one policy-gradient step per batch (a plain REINFORCE step: a larger rate)
    assert rows[-1]["ppo/minibatch_steps"] == 1 and "loss/kl" not in rows[-1]


def test_remax_baseline_is_the_greedy_reward(tiny_gpt2, tmp_path):
    """The greedy response is scored once per prompt: at kl.coef 0 and no whitening, the advantage of every
    sample is its reward minus its prompt's greedy reward, which the greedy rollout reproduces."""
    ppo.train(_cfg(tiny_gpt2, tmp_path, "algo=remax", "max_steps=2", "batch_size=4", "samples_per_prompt=2", "kl.coef=0"))
    rows = read_metrics(tmp_path / "run")
    assert all("rewards/greedy_raw_mean" in r for r in rows)
    cfg = _cfg(tiny_gpt2, tmp_path / "x", "algo=remax", "batch_size=4", "samples_per_prompt=2", "kl.coef=0")
    from tether.data import collate_prompts
    from tether.engine import make_engine, make_reference
    from tether.models import eos_ids, load_tokenizer
    from tether.rollout import make_rollout

    tok = load_tokenizer(tiny_gpt2)
    model = load_causal_lm(tiny_gpt2)
    policy = make_engine(model, cfg.engine, cfg.optim)
    ref = make_reference(policy, cfg.engine, tiny_gpt2, tiny_gpt2)
    scorer = ppo.Rewards.build(cfg.reward, cfg.engine, tok, 0, eos_ids(tok, model))
    rollout = make_rollout("hf", policy, tok)
    ids = [tok("a b c")["input_ids"], tok("d e")["input_ids"]]
    prompts = collate_prompts([ids[0], ids[0], ids[1], ids[1]], tok.pad_token_id or 0, ["a b c"] * 2 + ["d e"] * 2)
    torch.manual_seed(0)
    exp, ro, m, _ = ppo.make_experience(prompts, rollout, policy, ref, None, scorer, cfg, 0.0)
    greedy = rollout.generate(prompts.select([0, 2]), ppo.dataclasses.replace(cfg.rollout, temperature=0.0))
    g = scorer.score(greedy)[1].repeat_interleave(2)
    assert torch.allclose(exp.advantages, (exp.scores - g)[:, None] * exp.response_mask, atol=1e-6)
    assert m["rewards/greedy_raw_mean"] == pytest.approx(float(g.mean()))


def test_remax_learns_rule_reward(tiny_gpt2, tmp_path):
    rows = _learns(tiny_gpt2, tmp_path, "remax", "samples_per_prompt=4", "ppo.minibatch_size=0", "optim.lr=2e-2", steps=30)
    assert rows[-1]["ppo/minibatch_steps"] == 1 and rows[-1]["rewards/greedy_raw_mean"] >= 0


def uneven(prompts, responses, response_ids, tokens=()):
    """A rule reward that is 1 for every sample of a prompt with an even number of words (a uniform group)."""
    target = set(tokens)
    return [1.0 if len(p.split()) % 2 == 0 else sum(t in target for t in ids) / max(len(ids), 1) for p, ids in zip(prompts, response_ids)]


def test_dynamic_sampling_refills_uniform_groups_and_resumes(tiny_gpt2, tmp_path):
    a, _ = resumed_equals_uninterrupted(tiny_gpt2, tmp_path, "algo=dapo", "samples_per_prompt=2", "save_every=2", "batch_size=8",
                                        "reward.fn=test_critic_free:uneven", "overlong_buffer=4")
    for r in a:  # about 6 groups in 10 are uniform: the batch is refilled to its 8 groups from further prompt batches
        assert r["rollout/groups_kept"] == 8 and r["rollout/sample_batches"] >= 2, r
        assert 0 < r["rollout/groups_dropped"] == r["rollout/groups_uniform"], r
        assert r["rewards/overlong_penalty"] <= 0
    assert any(r["rewards/overlong_penalty"] < 0 for r in a)


def test_dynamic_sampling_without_refill_shrinks_the_batch(tiny_gpt2, tmp_path):
    ppo.train(_cfg(tiny_gpt2, tmp_path, "algo=dapo", "samples_per_prompt=2", "batch_size=8", "max_steps=2", "dynamic_sampling_batches=1",
                   "reward.fn=test_critic_free:uneven"))
    for r in read_metrics(tmp_path / "run"):
        assert r["rollout/sample_batches"] == 1 and 0 < r["rollout/groups_dropped"] == r["rollout/groups_uniform"] < 8, r
        assert r["rollout/groups_kept"] == 8 - r["rollout/groups_dropped"]


def test_joined_rollouts_score_as_their_parts(tiny_gpt2):
    """cat_rollouts re-pads prompts on the left and responses on the right: every row's logprobs under the
    model, its mask and its texts are those of the part it came from."""
    from tether.data.tokenize import collate_prompts
    from tether.models import causal_logprobs, load_tokenizer
    from tether.rollout import make_rollout
    from tether.rollout.base import SamplingConfig, cat_rollouts
    from tether.engine import make_engine
    from tether.config import EngineConfig, OptimConfig

    tok, model = load_tokenizer(tiny_gpt2), load_causal_lm(tiny_gpt2)
    rollout = make_rollout("hf", make_engine(model, EngineConfig(device="cpu", threads=1), OptimConfig()), tok)
    pad = tok.pad_token_id or 0
    torch.manual_seed(0)
    parts = [rollout.generate(collate_prompts([tok(t)["input_ids"] for t in texts], pad, texts), SamplingConfig(max_new_tokens=n))
             for texts, n in ((["a b c d e", "f g"], 6), (["h"], 3))]
    joined = cat_rollouts(parts, pad)
    assert joined.prompt_length == max(p.prompt_length for p in parts) and joined.response_mask.shape[1] == 6
    assert joined.responses == parts[0].responses + parts[1].responses and joined.group_ids == [0, 1, 2]

    def lp(b):
        R = b.response_mask.shape[1]
        return causal_logprobs(model, b.sequences, b.attention_mask, num_response=R)[0] * b.response_mask

    with torch.no_grad():
        whole, alone = lp(joined), [lp(p) for p in parts]
    assert torch.allclose(whole[:2], alone[0], atol=1e-5) and torch.allclose(whole[2:, :3], alone[1], atol=1e-5)
    assert torch.equal(joined.response_mask[2, 3:], torch.zeros(3)) and torch.equal(joined.logprobs[2, :3], parts[1].logprobs[0])


def test_resume_equivalence_with_grpo(tiny_gpt2, tmp_path):
    resumed_equals_uninterrupted(tiny_gpt2, tmp_path, "algo=grpo", "save_every=2", "batch_size=4", "kl.adaptive=true", "ppo.epochs=2")


@pytest.mark.slow
@pytest.mark.parametrize("algo", [a for a in ALGOS if a != "ppo"])
def test_one_iteration_of_each_method_on_smollm2(smollm2_dir, tmp_path, algo):
    from helpers import write_jsonl

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": q}]} for q in ("Say hello.", "Name a colour.")])
    cfg = load_config(ppo.PPOConfig, None, [
        f"model={smollm2_dir}", f"data.train={prompts}", f"out={tmp_path / 'run'}", "reward.fn=tether.rewards:length_penalty", f"algo={algo}",
        "reward.kwargs={target: 5}", "samples_per_prompt=2", "max_steps=1", "batch_size=2", "rollout.max_new_tokens=8",
        "ppo.epochs=1", "track.progress=false", "sample_every=0", "optim.lr=1e-6", "dynamic_sampling_batches=2",
    ])
    try:
        summary = ppo.train(cfg)
        r = read_metrics(tmp_path / "run")[-1]
    finally:  # a full 135M checkpoint with its optimizer state is ~2 GB: 8 of them kept would fill a CI disk
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
    assert summary["steps"] == 1 and r["guard/rolled_back"] == 0.0 and math.isfinite(r["loss/policy"]), r
    if cfg.kl.in_loss:  # one step from the reference: the KL term is ~0
        assert r["loss/kl"] == pytest.approx(0.0, abs=1e-4)
