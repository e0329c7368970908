"""Parity with Hugging Face: logprobs, rewards, generation."""

import dataclasses

import pytest
import torch

from tether.models import (
    causal_logprobs, load_causal_lm, load_scalar_model, load_tokenizer, position_ids_from_mask, scalar_values, sequence_scores,
)
from tether.rollout.base import SamplingConfig
from tether.rollout.base import response_mask_from_tokens
from tether.rollout.hf import HFRollout
from tether.types import PromptBatch


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_logprobs_match_log_softmax_gather(arch, request):
    path = request.getfixturevalue(arch)
    model = load_causal_lm(path).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in row 1
    with torch.no_grad():
        lp, ent = causal_logprobs(model, ids, mask, with_entropy=True)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        naive = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        real = (mask[:, 1:] * mask[:, :-1]).bool()  # the token and its predecessor are real
        assert torch.allclose(lp[:, 1:][real], naive[real], atol=1e-5)
        assert (lp[:, 1:][~real] == 0).all() and (ent[:, 1:][~real] == 0).all()  # padding columns are 0
        # response-only path (logits_to_keep) gives the same last-R logprobs
        lp_r, _ = causal_logprobs(model, ids, mask, num_response=5)
        assert torch.allclose(lp_r, naive[:, -5:], atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_detached_entropy_equals_the_entropy_without_its_graph(tiny_gpt2, packed):
    """with_entropy="detached" (PPO's fused first step reports the entropy as a metric): the same values as
    with_entropy=True, with no autograd graph behind them, while the logprobs keep theirs."""
    from tether.packing import enable_packing

    model = load_causal_lm(tiny_gpt2)
    assert enable_packing(model) if packed else True
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    lp, ent = causal_logprobs(model, ids, mask, num_response=6, temperature=0.7, with_entropy=True)
    lp_d, ent_d = causal_logprobs(model, ids, mask, num_response=6, temperature=0.7, with_entropy="detached")
    assert ent.requires_grad and not ent_d.requires_grad and lp_d.requires_grad
    assert torch.equal(ent.detach(), ent_d) and torch.equal(lp.detach(), lp_d.detach())


def test_left_padding_does_not_change_logprobs(tiny_gpt2):
    model = load_causal_lm(tiny_gpt2).eval()
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    padded = torch.tensor([[0, 0, 7, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a, _ = causal_logprobs(model, ids, torch.ones_like(ids), num_response=3)
        b, _ = causal_logprobs(model, padded, mask, num_response=3)
    assert torch.allclose(a, b, atol=1e-5)


def test_reward_model_head_and_hf_loading(tiny_gpt2, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tether.checkpoint import save_model_folder

    tok = load_tokenizer(tiny_gpt2)
    rm = load_scalar_model(tiny_gpt2, pad_token_id=tok.pad_token_id).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, tok.pad_token_id]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        s = sequence_scores(rm, ids, mask)
        per_tok = scalar_values(rm, ids, mask)
    assert torch.allclose(s, torch.stack([per_tok[0, 3], per_tok[1, 2]]), atol=1e-5)
    save_model_folder(rm, tmp_path / "rm", tok)
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        hf_scores = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(hf_scores, s, atol=1e-5)


def test_greedy_generation_matches_hf(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    model = load_causal_lm(tiny_llama).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    P = 5
    ids = torch.tensor([[tok.pad_token_id] * 2 + prompts[0], prompts[1]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = HFRollout(model, tok).generate(PromptBatch(ids, mask, ["a", "b"]), SamplingConfig(max_new_tokens=6, temperature=0, stop_at_eos=False))
    for i, p in enumerate(prompts):
        ref = model.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
        assert out.sequences[i, P:].tolist() == ref[0, len(p):].tolist()
    # the sampler logprobs equal the trainer's logprobs for greedy (temperature-free) decoding
    with torch.no_grad():
        lp, _ = causal_logprobs(model, out.sequences, out.attention_mask, num_response=6)
    assert torch.allclose(lp, out.logprobs, atol=1e-4)


def test_frozen_weights_are_cast_once_per_generate_under_autocast(tiny_llama):
    """A frozen model (a LoRA policy's base) decoding under bf16 autocast: each weight is cast to bf16 once
    for the whole generate call, not at every step (autocast caches only weights that require grad), and
    the weights are frozen again afterwards. The tokens equal the same decoding of a trainable copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    tok = load_tokenizer(tiny_llama)
    model = load_causal_lm(tiny_llama).eval().requires_grad_(False)
    weight = model.model.layers[0].mlp.up_proj.weight
    casts = []

    class CountCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() == weight.data_ptr():
                casts.append(1)
            return func(*args, **(kwargs or {}))

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    sampling = SamplingConfig(max_new_tokens=6, temperature=0, stop_at_eos=False)
    with CountCasts():
        out = HFRollout(model, tok, autocast_dtype=torch.bfloat16).generate(PromptBatch(ids, torch.ones_like(ids)), sampling)
    assert out.response_mask.shape[1] == 6 and len(casts) == 1, f"{len(casts)} casts of one weight over 6 decoding steps"
    assert not any(p.requires_grad for p in model.parameters())
    trainable = load_causal_lm(tiny_llama).eval()
    ref = HFRollout(trainable, tok, autocast_dtype=torch.bfloat16).generate(PromptBatch(ids, torch.ones_like(ids)), sampling)
    assert torch.equal(out.sequences, ref.sequences)


def test_sampler_logprobs_match_trainer_with_temperature(tiny_gpt2):
    tok = load_tokenizer(tiny_gpt2)
    model = load_causal_lm(tiny_gpt2).eval()
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (4, 6))
    out = HFRollout(model, tok).generate(PromptBatch(ids, torch.ones_like(ids)), SamplingConfig(max_new_tokens=8, temperature=0.7))
    with torch.no_grad():
        lp, _ = causal_logprobs(model, out.sequences, out.attention_mask, num_response=out.response_mask.shape[1], temperature=0.7)
    m = out.response_mask.bool()
    assert torch.allclose(lp[m], out.logprobs[m], atol=1e-4)


def test_response_mask_stops_after_first_eos():
    resp = torch.tensor([[4, 5, 0, 0, 0], [4, 5, 6, 7, 8]])
    m, fin = response_mask_from_tokens(resp, [0])
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert fin.tolist() == [True, False]


def _rollout_batch(tok, rows: list[list[int]]) -> PromptBatch:
    """Left-padded prompts; repeated rows exercise the sampler's encode-each-distinct-prompt-once path."""
    P = max(len(r) for r in rows)
    ids = torch.tensor([[tok.pad_token_id] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    keys: dict = {}
    return PromptBatch(ids, mask, [str(r) for r in rows], [keys.setdefault(tuple(r), len(keys)) for r in rows])


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("min_new", [0, 3])
def test_own_decoding_loop_equals_generate_greedy(arch, min_new, request):
    """tether's loop (static cache, shared prompt prefill) and model.generate: the same greedy tokens, EOS
    stopping and padding after it, logprobs and entropy. EOS's output row becomes a scaled copy of the token
    row 3 picks greedily at step 1, so that row stops there (with min_new_tokens=3, it must not)."""
    path = request.getfixturevalue(arch)
    tok = load_tokenizer(path)
    model = load_causal_lm(path).eval()
    batch = _rollout_batch(tok, [[40, 41, 42], [43, 44, 45, 46, 47], [40, 41, 42], [50, 51], [40, 41, 42], [43, 44, 45, 46, 47]])
    ro = HFRollout(model, tok)
    assert ro._own_loop()
    s = SamplingConfig(max_new_tokens=10, temperature=0, min_new_tokens=min_new)
    x = int(ro._hf_generate(batch.input_ids, batch.attention_mask, dataclasses.replace(s, min_new_tokens=0), batch.group_ids)[0][3, 1])
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight[tok.eos_token_id] = 1.05 * head.weight[x]
        if getattr(head, "bias", None) is not None:
            head.bias[tok.eos_token_id] = head.bias[x] + 0.01
    ours = ro._decode(batch.input_ids, batch.attention_mask, s, batch.group_ids)
    ref = ro._hf_generate(batch.input_ids, batch.attention_mask, s, batch.group_ids)
    assert ours[0].tolist() == ref[0].tolist()
    mask, finished = response_mask_from_tokens(ours[0], ro.eos)
    assert (mask.sum(-1) > min_new).all() if min_new else (finished[3] and mask[3].sum() <= 2)
    m = mask.bool()
    assert torch.allclose(ours[1][m], ref[1][m], atol=1e-4) and torch.allclose(ours[2][m], ref[2][m], atol=1e-4)


@pytest.mark.parametrize("warp", [{"top_k": 5}, {"top_p": 0.6}, {}])
def test_own_sampler_draws_from_the_processed_distribution(tiny_gpt2, warp):
    """4,000 first tokens of one prompt: never outside the top-k / top-p set, frequencies within 0.05 total
    variation of softmax(processed logits / T), and the returned logprobs are that distribution's."""
    tok = load_tokenizer(tiny_gpt2)
    model = load_causal_lm(tiny_gpt2).eval()
    n, temp = 4000, 0.8
    batch = _rollout_batch(tok, [[40, 41, 42, 43]] * n)
    ro = HFRollout(model, tok)
    s = SamplingConfig(max_new_tokens=1, temperature=temp, stop_at_eos=False, **warp)
    torch.manual_seed(0)
    first, logprobs, _ = ro._decode(batch.input_ids, batch.attention_mask, s, batch.group_ids)
    with torch.no_grad():
        scores = model(input_ids=batch.input_ids[:1]).logits[0, -1] / temp
    order = scores.argsort(descending=True)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if "top_k" in warp:
        keep[order[warp["top_k"]:]] = False
    if "top_p" in warp:  # the smallest set of likeliest tokens whose probability reaches top_p
        before = torch.softmax(scores, -1)[order].cumsum(0) - torch.softmax(scores, -1)[order]
        keep[order[before >= warp["top_p"]]] = False
    p = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
    counts = torch.bincount(first[:, 0], minlength=p.numel()).float() / n
    assert (counts[p == 0] == 0).all()
    top = p.argsort(descending=True)[:8]  # the 8 likeliest tokens and "the rest": sampling noise ~0.02
    bucket = lambda q: torch.cat([q[top], (q.sum() - q[top].sum())[None]])  # noqa: E731
    assert 0.5 * (bucket(counts) - bucket(p)).abs().sum() < 0.05
    assert torch.allclose(logprobs[:, 0], torch.log(p[first[:, 0]]), atol=1e-5)
    if warp:
        assert (p > 0).sum() < p.numel()  # the warper really truncated something


def test_inverse_cdf_sampler_never_draws_zero_probability(monkeypatch):
    from tether.rollout import hf

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0], [0.2, 0.0, 0.8, 0.0, 0.0, 0.0]])
    torch.manual_seed(0)
    drawn = torch.stack([hf._inverse_cdf_sample(probs) for _ in range(500)])
    assert set(drawn[:, 0].tolist()) == {1, 3} and set(drawn[:, 1].tolist()) == {0, 2}
    # u * total rounded up to total: the last token with probability > 0, not the last index
    monkeypatch.setattr(hf.torch, "rand", lambda shape, **kw: torch.ones(shape, **kw))
    assert hf._inverse_cdf_sample(probs).tolist() == [3, 2]


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_packed_sft_rows_attend_within_each_example(arch, request):
    """data.packing: examples in one row are told apart only by position_ids restarting at 0; the second
    example's logprobs must equal its own forward pass (no attention to the first)."""
    model = load_causal_lm(request.getfixturevalue(arch)).eval()
    a, b = [5, 6, 7, 8, 9], [10, 11, 12, 13]
    ids = torch.tensor([a + b])
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        packed, _ = causal_logprobs(model, ids, torch.ones_like(ids), position_ids=pos)
        alone, _ = causal_logprobs(model, torch.tensor([b]), torch.ones(1, len(b), dtype=torch.long))
    torch.testing.assert_close(packed[0, len(a) + 1 :], alone[0, 1:], atol=1e-5, rtol=1e-5)
