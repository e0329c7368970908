"""Parity with Hugging Face: logprobs, rewards, generation."""

import pytest
import torch

from tether.models import (
    causal_logprobs, load_causal_lm, load_scalar_model, load_tokenizer, position_ids_from_mask, scalar_values, sequence_scores,
)
from tether.rollout.base import SamplingConfig
from tether.rollout.hf import HFRollout, response_mask_from_tokens
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
