"""Advantage estimators against plain-loop references."""

import pytest
import torch

from tether import advantages as A


def gae_loop(rewards, values, lengths, gamma, lam):
    B = len(rewards)
    advs, rets = [], []
    for b in range(B):
        L = lengths[b]
        adv = [0.0] * len(rewards[b])
        last = 0.0
        for t in reversed(range(L)):
            nv = values[b][t + 1] if t + 1 < L else 0.0
            delta = rewards[b][t] + gamma * nv - values[b][t]
            last = delta + gamma * lam * last
            adv[t] = last
        advs.append(adv)
        rets.append([adv[t] + (values[b][t] if t < L else 0.0) for t in range(len(adv))])
    return torch.tensor(advs), torch.tensor(rets)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(1)
    B, R = 4, 6
    lengths = [6, 3, 1, 5]
    mask = torch.zeros(B, R)
    for b, L in enumerate(lengths):
        mask[b, :L] = 1
    rewards = torch.randn(B, R, generator=g) * mask
    values = torch.randn(B, R, generator=g)
    adv, ret = A.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    assert torch.allclose(adv, ref_adv * mask, atol=1e-5)
    assert torch.allclose(ret, ref_ret * mask, atol=1e-5)


def test_kl_shaped_rewards():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r, non_score = A.kl_shaped_rewards(scores, kl, mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.01, -0.02 + 1.0, 0.0], [-0.05, -0.05, -0.05 + 2.0]]))
    assert torch.allclose(non_score.sum(1), torch.tensor([-0.03, -0.15]))


def test_group_baselines_loop():
    s = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    rloo = A.group_advantages(s, 3, A.Advantage.RLOO)
    exp = []
    for grp in (s[:3].tolist(), s[3:].tolist()):
        for i, x in enumerate(grp):
            others = [y for j, y in enumerate(grp) if j != i]
            exp.append(x - sum(others) / len(others))
    assert torch.allclose(rloo, torch.tensor(exp))
    grpo = A.group_advantages(s, 3, A.Advantage.GRPO)
    exp2 = []
    for grp in (s[:3], s[3:]):
        exp2 += ((grp - grp.mean()) / (grp.std() + 1e-6)).tolist()
    assert torch.allclose(grpo, torch.tensor(exp2), atol=1e-5)
    assert A.Advantage.GAE.needs_critic and not A.Advantage.RLOO.needs_critic


def test_adaptive_kl_controller():
    c = A.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    c.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2
    assert c.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    c2 = A.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    c2.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert c2.value == pytest.approx(0.2 * (1 - 0.1 * 100 / 10000))


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4)
    assert A.explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    assert A.explained_variance(torch.full_like(ret, 2.5), ret, m).item() == pytest.approx(0.0, abs=1e-6)
