"""Invariance: one batch of 8 == 2 micro-batches of 4 with gradient accumulation."""

import copy

import torch

from tether.config import EngineConfig, OptimConfig
from tether.engine.local import LocalEngine
from tether.losses import sft_loss
from tether.models import causal_logprobs, disable_dropout, load_causal_lm
from tether.types import SFTBatch


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (8, 10), generator=g)
    attn = torch.ones_like(ids)
    attn[::2, 7:] = 0  # different lengths, so per-micro-batch means would differ from the global mean
    loss_mask = attn.float().clone()
    loss_mask[:, :4] = 0
    return SFTBatch(ids, attn, loss_mask)


def _run(model, micro):
    eng = LocalEngine(model, EngineConfig(micro_batch_size=micro), OptimConfig(lr=1e-2, grad_clip=0.0, eps=1e-3))  # large eps: Adam linear in tiny grads)
    b = _batch()
    n = float(b.loss_mask.sum())

    def loss_fn(m, mb):
        lp, _ = causal_logprobs(m, mb.input_ids, mb.attention_mask)
        return sft_loss(lp, mb.loss_mask, n)

    # capture gradients before the step
    grads = {}
    orig_step = eng._step

    def spy(metrics):
        for k, p in eng.model.named_parameters():
            grads[k] = p.grad.detach().clone()
        return orig_step(metrics)

    eng._step = spy
    metrics = eng.train_step(b, loss_fn)
    return metrics, grads, {k: v.detach().clone() for k, v in eng.model.state_dict().items()}


def test_microbatch_invariance(tiny_gpt2):
    base = load_causal_lm(tiny_gpt2)
    base.config.resid_pdrop = base.config.embd_pdrop = base.config.attn_pdrop = 0.0
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    m8, g8, w8 = _run(copy.deepcopy(base), 0)
    m4, g4, w4 = _run(copy.deepcopy(base), 4)
    assert abs(m8["loss/sft"] - m4["loss/sft"]) < 1e-5
    for k in g8:
        assert torch.allclose(g8[k], g4[k], atol=1e-6), k
    for k in w8:
        assert torch.allclose(w8[k], w4[k], atol=1e-6), k


def test_nonfinite_gradient_never_reaches_weights(tiny_gpt2):
    model = load_causal_lm(tiny_gpt2)
    eng = LocalEngine(model, EngineConfig(), OptimConfig(lr=1e-2))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def bad(m, mb):
        lp, _ = causal_logprobs(m, mb.input_ids, mb.attention_mask)
        return lp.sum() * float("nan"), {}

    metrics = eng.train_step(_batch(), bad)
    assert metrics["optim/skipped"] == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_train_step_hands_back_per_row_outputs_in_order(tiny_gpt2):
    """A loss_fn may return per-row outputs (PPO's old values from the critic's first step): train_step gives
    them back detached, on the CPU, in the batch's order across micro-batches, beside the usual metrics."""
    b = _batch()
    n = float(b.loss_mask.sum())

    def loss_fn(m, mb):
        lp, _ = causal_logprobs(m, mb.input_ids, mb.attention_mask)
        loss, metrics = sft_loss(lp, mb.loss_mask, n)
        return loss, metrics, lp

    outs = {}
    for micro in (0, 3):
        model = load_causal_lm(tiny_gpt2)
        disable_dropout(model)
        eng = LocalEngine(model, EngineConfig(micro_batch_size=micro), OptimConfig(lr=1e-2))
        with torch.no_grad():
            before, _ = causal_logprobs(eng.model, b.input_ids, b.attention_mask)
        metrics, outs[micro] = eng.train_step(b, loss_fn)
        assert "loss/sft" in metrics and not outs[micro].requires_grad and outs[micro].shape == (8, 10)
        torch.testing.assert_close(outs[micro], before, atol=1e-5, rtol=1e-4)  # the forward before the step
    assert isinstance(LocalEngine(load_causal_lm(tiny_gpt2), EngineConfig(), OptimConfig()).train_step(b, lambda m, mb: loss_fn(m, mb)[:2]), dict)


def test_cpu_engine_keeps_freed_memory_in_the_process(tiny_gpt2):
    """glibc gives a freed 256 MB block back to the kernel (it had its own mmap), so the next large tensor is
    new pages that fault and are zero-filled on first touch; after a CPU engine starts, the freed block is
    reused (a training step frees and reallocates blocks of this kind every step)."""
    import resource
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc settings: Linux only")
    LocalEngine(load_causal_lm(tiny_gpt2), EngineConfig(device="cpu"), OptimConfig())
    torch.ones(64 << 20)  # 256 MB, allocated and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(48 << 20)  # 192 MB
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2000, f"{faults} page faults writing 192 MB into freed memory (49,152 pages if none is reused)"
    del x
