"""DPO: loss invariance under micro-batching, learning on a synthetic preference set, the reference
cache, resume equivalence, config errors, and one step on the real SmolLM2-135M."""

import copy
import random

import pytest
import torch

from helpers import write_jsonl

from tether.algo import dpo
from tether.config import ConfigError, EngineConfig, OptimConfig, load_config
from tether.engine.local import LocalEngine
from tether.models import load_causal_lm
from tether.track import read_metrics
from tether.types import PairBatch

POSITIVE = "good great wonderful amazing excellent brilliant fun nice".split()
NEGATIVE = "bad awful terrible boring dull poor worst sad".split()
TOPICS = "movie film story plot actor scene music camera director cast ending role".split()


def _pairs(path, n, seed):
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        recs.append({
            "prompt": f"the {topic} was",
            "chosen": " " + " ".join(rng.choice(POSITIVE) for _ in range(rng.randint(1, 3))),
            "rejected": " " + " ".join(rng.choice(NEGATIVE) for _ in range(rng.randint(1, 3))),
        })
    return write_jsonl(path, recs)


def _cfg(model, tmp_path, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config(dpo.DPOConfig, None, [
        f"model={model}", f"data.train={_pairs(tmp_path / 'train.jsonl', 48, 0)}", f"data.eval={_pairs(tmp_path / 'eval.jsonl', 32, 1)}",
        f"out={tmp_path / 'run'}", "batch_size=8", "optim.lr=1e-3", "engine.threads=1", "track.progress=false", "beta=0.1",
        *overrides,
    ])


def _batch(V, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 9
    fields = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(5, V, (B, T), generator=g)
        attn = torch.ones(B, T, dtype=torch.long)
        attn[::2, 6:] = 0  # right padding, different lengths
        loss_mask = attn.float().clone()
        loss_mask[:, :3] = 0  # prompt
        fields |= {f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_loss_mask": loss_mask}
    return PairBatch(**fields, ref_chosen_logps=-20 - torch.rand(B, generator=g), ref_rejected_logps=-20 - torch.rand(B, generator=g))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_loss_microbatch_invariance(tiny_gpt2, loss):
    cfg = load_config(dpo.DPOConfig, None, [f"loss={loss}"] + (["label_smoothing=0.1"] if loss == "sigmoid" else []))
    base = load_causal_lm(tiny_gpt2)
    dpo.disable_dropout(base)
    batch = _batch(base.config.vocab_size)
    results = []
    for micro in (0, 4):
        eng = LocalEngine(copy.deepcopy(base), EngineConfig(micro_batch_size=micro), OptimConfig(lr=1e-2, grad_clip=0.0, eps=1e-3))
        grads = {}
        orig = eng._step

        def spy(metrics, eng=eng, grads=grads, orig=orig):
            grads.update({k: p.grad.detach().clone() for k, p in eng.model.named_parameters() if p.grad is not None})
            return orig(metrics)

        eng._step = spy
        results.append((eng.train_step(batch, dpo.dpo_loss_fn(cfg, float(len(batch)))), grads))
    (m8, g8), (m4, g4) = results
    assert m8["loss/dpo"] == pytest.approx(m4["loss/dpo"], rel=1e-6, abs=1e-6)
    assert abs(m8["rewards/margin"] - m4["rewards/margin"]) < 1e-6
    assert g8 and g8.keys() == g4.keys()
    for k in g8:
        assert torch.allclose(g8[k], g4[k], atol=1e-6, rtol=1e-4), k


def test_dpo_learns_synthetic_preferences(tiny_gpt2, tmp_path):
    summary = dpo.train(_cfg(tiny_gpt2, tmp_path, "max_steps=30", "eval_every=10"))
    rows = read_metrics(tmp_path / "run")
    evals = [r["eval/rewards_accuracy"] for r in rows if "eval/rewards_accuracy" in r]
    assert evals[-1] > 0.9, evals  # held-out pairs, implicit reward accuracy
    assert summary["eval/rewards_margin"] > 0
    assert rows[-1]["loss/dpo"] < rows[0]["loss/dpo"] - 0.1
    for key in ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in rows[-1], key
    assert (tmp_path / "run" / dpo.REF_CACHE).exists()


def test_dpo_resume_equivalence_reuses_reference_cache(tiny_gpt2, tmp_path):
    dpo.train(_cfg(tiny_gpt2, tmp_path / "a", "max_steps=4", "loss=ipo"))
    dpo.train(_cfg(tiny_gpt2, tmp_path / "b", "max_steps=2", "save_every=2", "loss=ipo"))
    cache = tmp_path / "b" / "run" / dpo.REF_CACHE
    mtime = cache.stat().st_mtime_ns
    dpo.train(_cfg(tiny_gpt2, tmp_path / "b", "max_steps=4", "save_every=2", "loss=ipo", "resume=true"))
    assert cache.stat().st_mtime_ns == mtime
    a, b = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    def keep(rows):  # the interrupted run also evaluated at its last step (2)
        return [{k: v for k, v in r.items() if not k.startswith(("time", "speed/", "eval/"))} for r in rows]

    assert keep(a) == keep(b)
    wa, wb = load_causal_lm(tmp_path / "a" / "run" / "final").state_dict(), load_causal_lm(tmp_path / "b" / "run" / "final").state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_dpo_config_errors():
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(dpo.DPOConfig, None, ["loss=ipo", "label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="'loss'"):
        load_config(dpo.DPOConfig, None, ["loss=kto"])
    with pytest.raises(ConfigError, match="beta"):
        load_config(dpo.DPOConfig, None, ["beta=0"])


@pytest.mark.slow
def test_one_step_on_smollm2(request, tmp_path):
    try:
        model = request.getfixturevalue("smollm2_dir")
    except pytest.FixtureLookupError:
        pytest.skip("the smollm2_dir fixture (tests/conftest.py) is not available")
    data = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": [{"role": "user", "content": "Say something kind."}],
         "chosen": [{"role": "assistant", "content": "You are doing great."}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
    ] * 2)
    cfg = load_config(dpo.DPOConfig, None, [
        f"model={model}", f"data.train={data}", f"out={tmp_path / 'run'}", "max_steps=1", "batch_size=2",
        "optim.lr=1e-6", "track.progress=false",
    ])
    summary = dpo.train(cfg)
    r = read_metrics(tmp_path / "run")[-1]
    assert summary["steps"] == 1
    assert r["loss/dpo"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step: -log sigma(0)


@pytest.mark.slow
def test_bf16_policy_equal_to_its_reference_has_zero_margin_on_smollm2(smollm2_dir, tmp_path):
    # The reference pass scored the pairs in eval_batch_size batches (16), the training pass in batch_size
    # ones (4). Under bf16 a product's rounding depends on its shape (oneDNN picks kernels by shape), so
    # at step 1, with the policy equal to its reference, the implicit rewards were bf16 noise instead of
    # 0 (the benchmark's SmolLM2 run: loss 0.7062 where log 2 = 0.6931; here a chosen reward of 0.0197). Scored in the
    # training batches, the two passes are the same computation. (float32, and the tiny test models even
    # in bf16, give exactly 0 either way: the bug needs the real model.)
    rng = random.Random(3)
    words = (POSITIVE + NEGATIVE + TOPICS) * 2
    text = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": text(6, 12), "chosen": " " + text(8, 24), "rejected": " " + text(8, 24)} for _ in range(8)])
    cfg = load_config(dpo.DPOConfig, None, [
        f"model={smollm2_dir}", f"data.train={data}", f"out={tmp_path / 'run'}", "max_steps=2", "batch_size=4", "eval_batch_size=16",
        "data.shuffle=false", "engine.precision=bf16", "optim.lr=1e-6", "track.progress=false",
    ])
    dpo.train(cfg)
    r = read_metrics(tmp_path / "run")[0]
    assert r["rewards/chosen"] == 0.0 and r["rewards/rejected"] == 0.0 and r["rewards/margin"] == 0.0, r
