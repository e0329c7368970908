"""LoRA: adapter parameter counts, the reference really is the base model, merged weights == adapter model."""

import dataclasses

import pytest
import torch

pytest.importorskip("peft")

from tether.config import EngineConfig, LoRAConfig, OptimConfig  # noqa: E402
from tether.engine import make_engine  # noqa: E402
from tether.models import causal_logprobs, load_causal_lm, load_scalar_model, scalar_values  # noqa: E402
from tether.types import SFTBatch  # noqa: E402


def _cfg(r=4, **kw):
    return EngineConfig(lora=LoRAConfig(r=r, alpha=8.0, **kw))


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (4, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    return SFTBatch(ids, attn, attn.float())


def _logits(model, b):
    with torch.no_grad():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


def _train(engine, b, steps=3):
    n = float(b.loss_mask.sum())

    def loss_fn(m, mb):
        lp, _ = causal_logprobs(m, mb.input_ids, mb.attention_mask)
        return -(lp * mb.loss_mask).sum() / n, {}

    for _ in range(steps):
        engine.train_step(b, loss_fn)


def test_trainable_parameter_count(tiny_gpt2):
    # tiny gpt2: 2 layers, n_embd 32; PEFT's default target for gpt2 is c_attn (Conv1D 32 -> 96)
    policy = make_engine(load_causal_lm(tiny_gpt2), _cfg(r=4), OptimConfig(lr=1e-2))
    trainable = {k: p.numel() for k, p in policy.named_parameters() if p.requires_grad}
    assert all("lora_" in k for k in trainable)
    assert sum(trainable.values()) == 2 * 4 * (32 + 96)
    opt_params = sum(p.numel() for g in policy.optimizer.param_groups for p in g["params"])
    assert opt_params == 2 * 4 * (32 + 96)
    # critic / reward model: adapters + the whole scalar head (32 weights, no bias)
    critic = make_engine(load_scalar_model(tiny_gpt2), _cfg(r=4, target_modules=["c_attn", "c_proj"]), OptimConfig())
    n = sum(p.numel() for _, p in critic.named_parameters() if p.requires_grad)
    # c_attn 32->96 and c_proj (attn 32->32, mlp 128->32) in each of 2 layers
    assert n == 2 * 4 * ((32 + 96) + (32 + 32) + (128 + 32)) + 32


def test_reference_is_base_and_merge_matches(tiny_gpt2, tmp_path):
    from tether.backends.lora import AdapterDisabledEngine
    from tether.engine import make_reference

    base = load_causal_lm(tiny_gpt2)
    policy = make_engine(load_causal_lm(tiny_gpt2), _cfg(), OptimConfig(lr=5e-2))
    ref = make_reference(policy, _cfg(), tiny_gpt2, tiny_gpt2)
    assert isinstance(ref, AdapterDisabledEngine)  # no second copy of the base weights
    # shared_reference=false, or a reference from another folder: a frozen copy loaded from disk
    separate = make_reference(policy, _cfg(shared_reference=False), tiny_gpt2, tiny_gpt2)
    assert not isinstance(separate, AdapterDisabledEngine) and not any(p.requires_grad for _, p in separate.named_parameters())
    b = _batch()
    lp = lambda m, mb: causal_logprobs(m, mb.input_ids, mb.attention_mask)[0]  # noqa: E731
    # step 0: B = 0, so policy == reference == base, and KL is exactly 0
    assert torch.equal(policy.forward(b, lp), ref.forward(b, lp))
    _train(policy, b)
    base_lp = lp(base.eval(), b)
    assert torch.allclose(ref.forward(b, lp), base_lp, atol=1e-6)  # the reference still is the base
    assert torch.allclose(separate.forward(b, lp), base_lp, atol=1e-6)
    assert (policy.forward(b, lp) - base_lp).abs().max() > 1e-3  # while the policy has moved
    # merge-and-save: a plain HF folder whose logits equal the adapter model's
    policy.save_model(tmp_path / "merged")
    merged = load_causal_lm(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    assert (tmp_path / "merged" / "adapter" / "adapter_config.json").exists()
    policy.model.eval()
    assert torch.allclose(_logits(merged.eval(), b), _logits(policy.model, b), atol=1e-5)


def test_lora_critic_values_and_checkpoint_roundtrip(tiny_gpt2, tmp_path):
    from tether.checkpoint import Checkpointer

    cfg = _cfg()
    critic = make_engine(load_scalar_model(tiny_gpt2), cfg, OptimConfig(lr=1e-2))
    b = _batch()

    def loss_fn(m, mb):
        v = scalar_values(m, mb.input_ids, mb.attention_mask)
        return (v**2 * mb.loss_mask).sum() / mb.loss_mask.sum(), {}

    critic.train_step(b, loss_fn)
    ck = Checkpointer(tmp_path)
    ck.save(1, {"value": critic}, {}, {})
    torch.manual_seed(1)
    other = make_engine(load_scalar_model(tiny_gpt2), dataclasses.replace(cfg), OptimConfig(lr=1e-2))
    ck.load({"value": other})
    fn = lambda m, mb: scalar_values(m, mb.input_ids, mb.attention_mask)  # noqa: E731
    assert torch.equal(critic.forward(b, fn), other.forward(b, fn))
