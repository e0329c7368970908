"""The vLLM rollout (rollout.backend=vllm) against the HF rollout and the trainer, on vLLM's CPU build.

These run in their own environment (.venv-vllm, built by scripts/setup_vllm.sh; scripts/test.sh runs them
there): vLLM pins its own packages. Tiny models have head_dim 64 (vLLM's CPU attention refuses 16)."""

import json

import pytest
import torch

from tether.backends.vllm_rollout import VLLMRollout
from tether.data.tokenize import collate_prompts
from tether.models import causal_logprobs, load_causal_lm, load_tokenizer
from tether.rollout.base import SamplingConfig
from tether.rollout.hf import HFRollout

PROMPTS = ["the movie was", "hello world", "i loved the ending and the music", "a film"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("llama64"), "llama", hidden=128, seed=1)


@pytest.fixture(scope="module")
def policy(llama):
    return load_causal_lm(str(llama)), load_tokenizer(str(llama))


@pytest.fixture(scope="module")
def vllm_rollout(policy):
    model, tok = policy
    return VLLMRollout(model, tok)


def _batch(tok, prompts=PROMPTS, repeat=1):
    ids = [tok(p).input_ids for p in prompts for _ in range(repeat)]
    return collate_prompts(ids, tok.pad_token_id, [p for p in prompts for _ in range(repeat)])


def _trainer_logprobs(model, ro, temperature=1.0):
    with torch.no_grad():
        return causal_logprobs(model, ro.sequences, ro.attention_mask, num_response=ro.response_mask.shape[1], temperature=temperature)[0] * ro.response_mask


def test_greedy_tokens_equal_the_hf_rollout(policy, vllm_rollout):
    model, tok = policy
    greedy = SamplingConfig(max_new_tokens=16, temperature=0)
    ours = vllm_rollout.generate(_batch(tok), greedy)
    ref = HFRollout(model, tok).generate(_batch(tok), greedy)
    assert ours.sequences.tolist() == ref.sequences.tolist() and ours.responses == ref.responses
    assert torch.equal(ours.response_mask, ref.response_mask) and torch.equal(ours.attention_mask, ref.attention_mask)
    assert torch.allclose(ours.logprobs, ref.logprobs, atol=1e-4), (ours.logprobs - ref.logprobs).abs().max()


def test_sampled_logprobs_agree_with_the_trainer(policy, vllm_rollout):
    """Sampling at temperature 0.7: the sampler's logprobs of its own tokens are the trainer's at that temperature
    (float32 on both sides; other kernels, so equal within 1e-4, not bitwise)."""
    model, tok = policy
    torch.manual_seed(0)
    ro = vllm_rollout.generate(_batch(tok, repeat=4), SamplingConfig(max_new_tokens=16, temperature=0.7))
    assert ro.response_mask.sum() > 32 and len(set(map(tuple, ro.sequences.tolist()))) > len(PROMPTS)  # it sampled
    trainer = _trainer_logprobs(model, ro, temperature=0.7)
    assert (ro.logprobs - trainer).abs().max() < 1e-4
    torch.manual_seed(0)  # seeds come from torch's generator: the same seed samples the same tokens
    again = vllm_rollout.generate(_batch(tok, repeat=4), SamplingConfig(max_new_tokens=16, temperature=0.7))
    assert again.sequences.tolist() == ro.sequences.tolist()


def test_update_weights_in_place(llama):
    model, tok = load_causal_lm(str(llama)), load_tokenizer(str(llama))
    vr = VLLMRollout(model, tok)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    before = vr.generate(_batch(tok), greedy)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    stale = vr.generate(_batch(tok), greedy)
    assert stale.sequences.tolist() == before.sequences.tolist()  # nothing pushed yet: the engine holds a copy
    vr.update_weights(model.named_parameters())
    after = vr.generate(_batch(tok), greedy)
    assert after.sequences.tolist() == HFRollout(model, tok).generate(_batch(tok), greedy).sequences.tolist()
    assert after.sequences.tolist() != before.sequences.tolist()
    assert len(vr.push_seconds) == 1 and vr.push_seconds[0] < 30


@pytest.mark.parametrize("shape", ["peft_model", "tether_engine"])
def test_a_lora_policy_pushes_merged_weights(llama, shape):
    """Both shapes a LoRA policy comes in: a PeftModel, and the module with LoRA layers injected that tether's
    LoRA engine trains (`engine.lora.r`)."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from tether.backends.lora import apply_lora

    model, tok = load_causal_lm(str(llama)), load_tokenizer(str(llama))
    if shape == "peft_model":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    else:
        model = apply_lora(model, SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at 0: give the adapters a delta first, so that merging matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.3)
    vr = VLLMRollout(model, tok)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    hf = HFRollout(model, tok).generate(_batch(tok), greedy)
    assert vr.generate(_batch(tok), greedy).sequences.tolist() == hf.sequences.tolist()  # built from the merged weights
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(-3)
    vr.update_weights(model.named_parameters())  # the adapter's parameters: the rollout merges them
    after = vr.generate(_batch(tok), greedy).sequences.tolist()
    assert after == HFRollout(model, tok).generate(_batch(tok), greedy).sequences.tolist() and after != hf.sequences.tolist()


def _ppo(llama, tmp_path, backend, *extra):
    from test_ppo import _cfg

    from tether.algo import ppo

    cfg = _cfg(str(llama), tmp_path / backend, "max_steps=3", "batch_size=8", f"rollout.backend={backend}", "engine.threads=2", *extra)
    ppo.train(cfg)
    return [json.loads(x) for x in (tmp_path / backend / "run" / "metrics.jsonl").read_text().splitlines() if '"rewards/raw_mean"' in x]


def test_ppo_with_the_vllm_rollout_matches_the_hf_rollout(llama, tmp_path):
    """Greedy rollouts: both samplers write the same tokens, so the runs differ only by the logprob drift
    (the trainer recomputes vLLM's; the hf sampler's are reused), a few 1e-6 in the losses."""
    runs = {b: _ppo(llama, tmp_path, b, "rollout.temperature=0") for b in ("hf", "vllm")}
    assert len(runs["hf"]) == len(runs["vllm"]) == 3
    for hf, vl in zip(runs["hf"], runs["vllm"]):
        assert hf["rewards/raw_mean"] == vl["rewards/raw_mean"] and hf["response/length_mean"] == vl["response/length_mean"]
        for key in ("objective/kl", "policy/approx_kl", "policy/clipfrac", "loss/policy"):
            if key in hf:
                assert abs(hf[key] - vl[key]) < 1e-4, (key, hf[key], vl[key])
        assert vl["rollout/logprob_drift_max"] < 1e-4 and vl["timing/weight_push"] > 0


def test_ppo_sampling_logs_drift_and_tis(llama, tmp_path):
    rows = _ppo(llama, tmp_path, "vllm", "rollout.tis_cap=2")
    for m in rows:
        assert 0 <= m["rollout/logprob_drift"] < 1e-4 and m["rollout/logprob_drift_share"] == 0.0
        assert abs(m["rollout/tis_weight_mean"] - 1) < 1e-3  # float32 on both sides: weights ~1


def test_tether_ppo_command_with_the_vllm_rollout(llama, tmp_path):
    """As a user runs it: `tether ppo ... rollout.backend=vllm` from the vLLM environment, checkpoint folder written."""
    import subprocess
    import sys

    from test_ppo import _prompts

    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "tether.cli", "ppo", f"model={llama}", f"data.train={_prompts(tmp_path / 'p.jsonl', n=16)}",
                        f"out={out}", "reward.fn=tether.rewards:token_fraction", "reward.kwargs={tokens: [10, 11, 12]}", "max_steps=2",
                        "batch_size=4", "rollout.max_new_tokens=6", "rollout.backend=vllm", "track.progress=false"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "final" / "config.json").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"timing/weight_push"' in x]
    assert len(rows) == 2 and all(m["rollout/logprob_drift"] < 1e-4 for m in rows)


def test_serve_with_the_vllm_backend_answers_as_the_hf_backend(llama, tmp_path):
    from test_serve import Server

    answers = {}
    for backend in ("hf", "vllm"):
        server = Server(llama, tmp_path / f"{backend}.log", "--backend", backend).wait(300)
        try:
            r = server.client().completions.create(model=str(llama), prompt="the movie was", max_tokens=12, temperature=0)
            answers[backend] = r.choices[0].text
        finally:
            server.stop()
    assert answers["vllm"] == answers["hf"] and answers["hf"]


def test_the_engine_leaves_the_trainers_threads_alone(policy, vllm_rollout):
    """vLLM's CPU worker pins the process and patches torch.set_num_threads; the trainer in the same process keeps its own."""
    import os

    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2 and len(os.sched_getaffinity(0)) == os.cpu_count()
