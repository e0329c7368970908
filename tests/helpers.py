"""Reusable test builders. No downloads: tokenizers are trained here on a few hundred words."""

from __future__ import annotations

import functools
import json
from pathlib import Path

CORPUS_WORDS = (
    "the a movie film story plot actor actress scene was is were are good great bad awful boring fun "
    "wonderful terrible love hate loved hated it this that and but or not very really quite so too "
    "i you we they he she of to in on for with at by from about as an be been have has had do does "
    "did will would can could should may might must one two three four five best worst amazing "
    "excellent poor fine nice dull brilliant funny sad happy ending music camera director cast role "
    "human assistant question answer yes no please thanks hello world cat dog red blue green what why "
    "how where when who which tell me write poem short long explain sure here is your reply system user"
).split()

# A small ChatML-like template. Its end-of-turn <|im_end|> is the EOS of the chat tokenizer.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=None)
def _trained(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = CORPUS_WORDS
    tk.train_from_iterator([" ".join(words[i:] + words[:i]) for i in range(0, len(words), 5)] * 3, trainer)
    return tk.to_str()


def make_tokenizer(chat_template: bool = False, vocab_size: int = 300, pad: bool = True):
    """A byte-level BPE tokenizer (exact decode round trip) wrapped in PreTrainedTokenizerFast.

    chat_template=False: eos <|endoftext|>, no chat template.
    chat_template=True: a ChatML template and eos <|im_end|> (the template's end-of-turn).
    pad=False: no pad token (pad_id falls back to eos).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(vocab_size)),
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<|pad|>" if pad else None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"] if chat_template else None,
        clean_up_tokenization_spaces=False,
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def write_jsonl(path: str | Path, records: list) -> Path:
    path = Path(path)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# A test backend (`engine.backend=nan_once`, registered by the test in tether.engine.BACKENDS): a local
# engine whose language-model (not scalar-head) engine multiplies its loss by NaN on the optimizer step
# numbered NanOnceEngine.at (1-based), to exercise PPO's rollback guard through the engine seam.
def _nan_once_engine():
    from tether.backends.lora import _is_scalar
    from tether.engine.local import LocalEngine

    class NanOnceEngine(LocalEngine):
        at = 0

        def train_step(self, batch, loss_fn):
            self.calls = getattr(self, "calls", 0) + 1
            if not _is_scalar(self.model) and self.calls == NanOnceEngine.at:
                inner = loss_fn

                def loss_fn(model, mb):
                    loss, metrics = inner(model, mb)
                    return loss * float("nan"), metrics

            return super().train_step(batch, loss_fn)

    return NanOnceEngine


def __getattr__(name):  # the class is built on first use, so importing helpers does not import torch
    if name == "NanOnceEngine":
        globals()[name] = _nan_once_engine()
        return globals()[name]
    raise AttributeError(name)
