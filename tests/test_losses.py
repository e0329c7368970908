"""Loss maths against hand-derived values."""

import math

import pytest
import torch

from tether import losses as L


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_masked_ops():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert L.masked_sum(x, m).item() == 6.0
    assert L.masked_mean(x, m).item() == pytest.approx(2.0)
    # values 1,2,3: mean 2, unbiased var = (1+0+1)/2 = 1
    assert L.masked_var(x, m).item() == pytest.approx(1.0)
    w = L.masked_whiten(x, m)
    assert L.masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)


def test_sft_loss_hand():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.5, 0.5]]))
    m = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    loss, _ = L.sft_loss(lp, m, num_tokens=3)
    expected = -(math.log(0.25) + math.log(0.9) + math.log(0.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, m = L.bradley_terry_loss(rc, rr, num_pairs=2)
    expected = (-math.log(sig(1.0)) - math.log(sig(-1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rm/accuracy"].item() == 0.5
    assert m["rm/margin"].item() == pytest.approx(0.0)
    loss_m, _ = L.bradley_terry_loss(rc, rr, num_pairs=2, margin=torch.tensor([0.5, 0.5]))
    assert loss_m.item() == pytest.approx((-math.log(sig(0.5)) - math.log(sig(-1.5))) / 2, rel=1e-6)


def test_dpo_sigmoid_ipo_hinge_hand():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.5])
    h = (-1 + 2) - (-3 + 2.5)  # 1.5
    beta = 0.5
    loss, m = L.dpo_loss(pc, pr, rc, rr, 1, beta=beta)
    assert loss.item() == pytest.approx(-math.log(sig(beta * h)), rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.25)
    assert m["rewards/accuracy"].item() == 1.0
    eps = 0.1
    loss_c, _ = L.dpo_loss(pc, pr, rc, rr, 1, beta=beta, label_smoothing=eps)
    assert loss_c.item() == pytest.approx(-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)), rel=1e-6)
    loss_i, _ = L.dpo_loss(pc, pr, rc, rr, 1, beta=beta, kind=L.DPOLoss.IPO)
    assert loss_i.item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-6)
    loss_h, _ = L.dpo_loss(pc, pr, rc, rr, 1, beta=beta, kind=L.DPOLoss.HINGE)
    assert loss_h.item() == pytest.approx(max(0.0, 1 - beta * h), rel=1e-6)


def test_kl_estimators_hand():
    lp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    lr = 0.5
    assert L.kl_estimate(lp, ref, L.KLEstimator.K1).item() == pytest.approx(lr)
    assert L.kl_estimate(lp, ref, L.KLEstimator.K2).item() == pytest.approx(0.5 * lr**2)
    assert L.kl_estimate(lp, ref, L.KLEstimator.K3).item() == pytest.approx(math.exp(-lr) - 1 + lr)
    assert L.kl_estimate(lp, ref, L.KLEstimator.ABS).item() == pytest.approx(lr)


def test_kl_estimators_unbiased_on_samples():
    # For categorical p, q: E_p[k1] = E_p[k3] = KL(p||q).
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2]); q = torch.tensor([0.2, 0.5, 0.3])
    kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200000, replacement=True, generator=g)
    lp, lq = p.log()[x][None], q.log()[x][None]
    assert L.kl_estimate(lp, lq, L.KLEstimator.K1).mean().item() == pytest.approx(kl, abs=5e-3)
    assert L.kl_estimate(lp, lq, L.KLEstimator.K3).mean().item() == pytest.approx(kl, abs=5e-3)


def test_ppo_policy_loss_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss, m = L.ppo_policy_loss(new, old, adv, mask, num_tokens=3, clip_eps=0.2)
    # token 1: ratio 1.5, A=1 -> min(1.5, 1.2) = 1.2; token 2: ratio .5, A=-2 -> min(-1, -1.6) = -1.6;
    # token 3: ratio 1.1, A=3 -> min(3.3, 3.3) = 3.3
    assert loss.item() == pytest.approx(-(1.2 - 1.6 + 3.3) / 3, rel=1e-5)
    assert m["policy/clipfrac"].item() == pytest.approx(2 / 3)


def test_value_loss_hand():
    v, old, g = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, m = L.value_loss(v, old, g, mask, num_tokens=2, clip_eps=0.2)
    # t0: (1-0)^2=1 vs clipped 0.7^2=0.49 -> 1; t1: 1 vs 1 -> 1  => 0.5*(1+1)/2
    assert loss.item() == pytest.approx(0.5)
    loss2, _ = L.value_loss(torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.ones(1, 1), 1, 0.2)
    # V=0 old=1 G=0: unclipped 0, clipped V=0.8 -> 0.64 -> max = 0.64
    assert loss2.item() == pytest.approx(0.5 * 0.64)


def test_token_logprobs_match_naive():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    naive = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(L.token_logprobs(logits, labels, chunk=4), naive, atol=1e-5)
    naive_t = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(L.token_logprobs(logits, labels, temperature=0.7), naive_t, atol=1e-5)
    # the gradient too (through the chunks), and no label is silently ignored (cross_entropy's -100)
    x = logits.clone().requires_grad_()
    w = torch.randn(3, 7, generator=g)
    (L.token_logprobs(x, labels, temperature=0.7, chunk=4) * w).sum().backward()
    ref = logits.clone().requires_grad_()
    (torch.log_softmax(ref / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1) * w).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=1e-6, rtol=1e-5)
    # bf16 logits (autocast's LM head): value and gradient as float32 maths on the same bf16 numbers, the
    # gradient rounded once to bf16; chunks of 3 rows over 7 x 3 rows
    xb = logits.bfloat16().requires_grad_()
    lb = L.token_logprobs(xb, labels, temperature=0.7, chunk=3)
    ref = logits.bfloat16().float().requires_grad_()
    lr_ = torch.log_softmax(ref / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    (lr_ * w).sum().backward()
    (lb * w).sum().backward()
    assert lb.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lb, lr_.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xb.grad, ref.grad.bfloat16(), atol=0, rtol=0)
    bad = labels.clone()
    bad[1, 2] = -100
    with pytest.raises(RuntimeError, match="out of bounds"):  # gather's bounds check
        L.token_logprobs(logits, bad)
    p = torch.softmax(logits, -1)
    ent = -(p * p.log()).sum(-1)
    assert torch.allclose(L.entropy_from_logits(logits, chunk=5), ent, atol=1e-5)
