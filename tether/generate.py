"""Sample from any checkpoint, writing jsonl.

    tether generate --model runs/ppo/final --prompt "The movie was" -n 4
    tether generate --model runs/sft/final --prompts prompts.jsonl --out samples.jsonl --temperature 0.7 --top-p 0.9

Prompt files take every format the data readers take (jsonl/json/.txt, `prompt` or `messages`):
message lists go through the model's chat template, plain strings are sent as they are. A `--prompt`
text is sent as a user turn when the model has a chat template (`--raw` sends it as is). Each output line is
{"prompt", "response", "sample"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tether.rollout.base import SamplingConfig


def _batches(prompts: list, tokenizer, batch_size: int, max_prompt_length: int):
    from tether.data import collate_prompts, encode_prompt, pad_id, prompt_text

    pad = pad_id(tokenizer)
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        # the exact ids training sees before a response (BOS and chat template included)
        ids = [encode_prompt(tokenizer, p)[-max_prompt_length:] for p in chunk]
        ids = [i if i else [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad] for i in ids]
        yield chunk, collate_prompts(ids, pad, [prompt_text(p) for p in chunk])


def context_length(model) -> int | None:  # noqa: ANN001
    """The model's context in tokens (GPT-2's n_positions, most others' max_position_embeddings)."""
    return getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)


class Sampler:
    """A checkpoint loaded once that samples responses: `tether generate`, the label app's generator, and
    red teaming's target model (called on every PPO batch, so it must not reload)."""

    def __init__(self, model_dir: str, device: str = "auto", max_prompt_length: int = 512):
        from tether.models import load_causal_lm, load_tokenizer, resolve_device
        from tether.rollout.hf import HFRollout

        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(model_dir)
        self.rollout = HFRollout(load_causal_lm(model_dir, self.device).eval(), self.tokenizer, self.device)
        self.max_prompt_length = max_prompt_length

    def __call__(self, prompts: list, k: int = 1, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, batch_size: int = 16, min_new_tokens: int = 0) -> list[list[str]]:
        """k sampled responses for each prompt (a string or a message list); temperature 0 = greedy."""
        torch.manual_seed(seed)
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, temperature=temperature, top_p=top_p)
        repeated = [p for p in prompts for _ in range(k)]
        responses: list[str] = []
        ctx = context_length(self.rollout.model) or self.max_prompt_length + max_new_tokens
        if max_new_tokens >= ctx:
            raise ValueError(f"{max_new_tokens} new tokens leave no room for a prompt in the model's context of {ctx}")
        # a prompt keeps its last tokens: the answer must fit in the model's context
        for _, batch in _batches(repeated, self.tokenizer, batch_size, min(self.max_prompt_length, ctx - max_new_tokens)):
            responses += self.rollout.generate(batch, sampling).responses
        return [responses[i * k : (i + 1) * k] for i in range(len(prompts))]


def sample_responses(
    model_dir: str,
    prompts: list,
    k: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    max_prompt_length: int = 512,
    device: str = "auto",
) -> list[list[str]]:
    """k sampled responses for each prompt (a string or a message list)."""
    return Sampler(model_dir, device, max_prompt_length)(prompts, k, max_new_tokens, temperature, top_p, seed, batch_size)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tether generate", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", required=True, help="a local HF model folder (e.g. runs/ppo/final)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="a prompt file (jsonl/json/txt)")
    src.add_argument("--prompt", action="append", help="a prompt text (repeatable)")
    parser.add_argument("--out", default="-", help="output jsonl (default: stdout)")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--raw", action="store_true", help="with --prompt: send the text as is, not as a user turn of the chat template")
    parser.add_argument("--verbose", action="store_true", help="a Python traceback instead of the one-line error")
    args = parser.parse_args(argv)
    from tether.cli import one_line

    return one_line("tether generate", lambda: _run(args), args.verbose)


def _run(args) -> int:
    from tether.data import load_prompts

    if args.prompts:
        examples, report = load_prompts(args.prompts)
        prompts = [e.prompt for e in examples]
    else:
        from tether.models import load_tokenizer

        # A --prompt text is a user turn when the model has a chat template (instruct models answer
        # nothing useful to bare text); --raw keeps it as plain text.
        chat = not args.raw and bool(getattr(load_tokenizer(args.model), "chat_template", None))
        prompts = [[{"role": "user", "content": p}] if chat else p for p in args.prompt]
    results = sample_responses(
        args.model, prompts, args.num_samples, args.max_new_tokens, args.temperature, args.top_p, args.seed,
        args.batch_size, device=args.device,
    )
    lines = []
    for p, responses in zip(prompts, results):
        for j, r in enumerate(responses):
            lines.append(json.dumps({"prompt": p if isinstance(p, str) else p[-1]["content"], "response": r, "sample": j}))
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {len(lines)} samples to {args.out}", file=sys.stderr)
    return 0
