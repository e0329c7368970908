"""The data layer: readers, format adapters, tokenisation with chat templates, collators.

    records  = load_sft(spec) | load_kto(spec) | load_preferences(spec) | load_prompts(spec)   -> (items, DataReport)
    train, eval = split_eval(records, fraction, seed)
    tokenized = tokenize_sft | tokenize_pairs | tokenize_prompts (items, tokenizer, cfg.data, report)
    batch = collate_sft | collate_pairs | collate_prompts (chunk, pad_id(tokenizer))

Record formats: tether/data/formats.py. Text vs chat, loss masks, EOS and truncation: tether/data/tokenize.py.
Bad records raise DataError("{path}:{line}: {problem}") or, with on_bad_record=skip, are counted by reason.
"""

from tether.data.formats import load_kto, load_preferences, load_prompts, load_sft, split_eval, split_transcripts
from tether.data.records import DataError, DataReport, Messages, PreferencePair, PromptExample, SFTExample, TokenizedPair
# The tokenisers and collators import torch; they load on first use so that the readers, DataError and
# the converters work without torch (the annotation app imports no torch).
_TOKENIZE = {
    "collate_pairs", "collate_prompts", "collate_sft", "encode_conversation", "encode_prompt", "pack_rows",
    "pad_id", "prompt_text", "render_prompt", "tokenize_pairs", "tokenize_prompts", "tokenize_sft", "use_template",
}


def __getattr__(name: str):
    if name in _TOKENIZE:
        from tether.data import tokenize

        return getattr(tokenize, name)
    raise AttributeError(f"module 'tether.data' has no attribute {name!r}")


__all__ = [
    "DataError", "DataReport", "Messages", "PreferencePair", "PromptExample", "SFTExample", "TokenizedPair",
    "load_sft", "load_kto", "load_preferences", "load_prompts", "split_eval", "split_transcripts",
    "pad_id", "render_prompt", "encode_prompt", "encode_conversation", "prompt_text", "use_template",
    "tokenize_sft", "tokenize_pairs", "tokenize_prompts", "collate_sft", "collate_pairs", "collate_prompts", "pack_rows",
]
