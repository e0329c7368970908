"""Tiny random models and tokenizers built from configs, saved as ordinary HF folders. No downloads."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the a movie film story plot actor actress scene was is were are good great bad awful boring fun "
    "wonderful terrible love hate loved hated it this that and but or not very really quite so too "
    "i you we they he she of to in on for with at by from about as an be been have has had do does "
    "did will would can could should may might must one two three four five best worst amazing "
    "excellent poor fine nice dull brilliant funny sad happy ending music camera director cast role "
    "human assistant question answer yes no please thanks hello world cat dog red blue green"
).split()

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: bool = False, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a small fixed corpus, with eos/pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, len(WORDS), 7)] * 3
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>")
    if chat_template:
        tok.chat_template = CHATML
    return tok


def make_tiny_model_dir(path: str | Path, arch: str = "gpt2", chat_template: bool = False, seed: int = 0, **kw) -> Path:
    """Save a tiny random causal LM (gpt2 or llama) with its tokenizer into `path`."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    path = Path(path)
    tok = make_tokenizer(chat_template=chat_template)
    V = len(tok)
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=V, n_positions=256, n_embd=kw.get("hidden", 32), n_layer=kw.get("layers", 2), n_head=2,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    elif arch == "llama":
        cfg = LlamaConfig(
            vocab_size=V, hidden_size=kw.get("hidden", 32), intermediate_size=64, num_hidden_layers=kw.get("layers", 2),
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def make_digits_model_dir(path: str | Path, seed: int = 0) -> Path:
    """A tiny random GPT-2 over 16 tokens (the digits, + = ? and space, EOS, pad), one token per character:
    a digit answer is about 1 in 16 at the start, so a checkable task ("7" -> "7") is learnable in seconds."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<eos>", "<pad>"] + list("0123456789+=? "))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", clean_up_tokenization_spaces=False)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return Path(path)


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    import json

    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
