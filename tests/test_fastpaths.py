"""The speed paths give the same numbers as the plain ones (benchmarks/README: what each one buys)."""

import torch


def _batch(V, pad):
    g = torch.Generator().manual_seed(0)
    lengths = [12, 7, 10]
    T = max(lengths)
    ids = torch.full((3, T), pad, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, V, (n,), generator=g)
        mask[i, :n] = 1
    targets = mask.clone().float()
    targets[:, :4] = 0  # a 4-token prompt
    return ids, mask, targets


def test_targets_and_unmasked_right_padding_match_full_logprobs(tiny_gpt2):
    from tether.models import _inputs, causal_logprobs, load_causal_lm, load_tokenizer, position_ids_from_mask
    from tether.losses import token_logprobs

    tok = load_tokenizer(tiny_gpt2)
    model = load_causal_lm(tiny_gpt2).eval()
    ids, mask, targets = _batch(len(tok), tok.pad_token_id)
    assert _inputs(ids, mask, None)["attention_mask"] is None  # right padding: the fast path
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        ref = torch.nn.functional.pad(token_logprobs(ref_logits[:, :-1], ids[:, 1:]), (1, 0))
        full, _ = causal_logprobs(model, ids, mask)
        sel, _ = causal_logprobs(model, ids, mask, targets=targets)
    torch.testing.assert_close(full * mask, ref * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sel * targets, ref * targets, atol=1e-5, rtol=1e-5)
    assert (sel[targets == 0] == 0).all()


def test_targets_gradients_match(tiny_gpt2):
    from tether.models import causal_logprobs, load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_gpt2)
    ids, mask, targets = _batch(len(tok), tok.pad_token_id)
    grads = []
    for kw in ({}, {"targets": targets}):
        model = load_causal_lm(tiny_gpt2)
        lp, _ = causal_logprobs(model, ids, mask, **kw)
        (lp * targets).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_fused_gelu_is_the_same_function(tiny_gpt2):
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    from tether.models import load_causal_lm

    x = torch.randn(64, 128) * 3
    torch.testing.assert_close(torch.nn.GELU(approximate="tanh")(x), NewGELUActivation()(x), atol=1e-6, rtol=1e-6)
    fused = load_causal_lm(tiny_gpt2)
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2))
    ids = torch.randint(4, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_engine_uses_fused_adamw(tiny_gpt2):
    from tether.config import EngineConfig, OptimConfig
    from tether.engine.local import LocalEngine
    from tether.models import load_causal_lm

    engine = LocalEngine(load_causal_lm(tiny_gpt2), EngineConfig(device="cpu"), OptimConfig(), total_steps=1)
    assert engine.optimizer.defaults.get("fused") is True
