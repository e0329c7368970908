"""Rollout decoding speed: tether's decoding loop against `model.generate` and TRL's generation, same model,
same prompt batch.

    python -m benchmarks.generation                      # tiny and smollm2, fp32 and bf16, median of 3
    python -m benchmarks.generation --model tiny --precision fp32 --quick --json gen.json

Models: `tiny` is the benchmark workload's GPT-2 (benchmarks.workload; 16 of its prompts x 4 samples, 32
new tokens, as one RL iteration of benchmarks.compare); `smollm2` is SmolLM2-135M-Instruct from
~/.cache/tether/models/smollm2-135m-instruct (imported with `tether model import-gguf` when missing), the
same 16 prompts rendered through its chat template, x 4 samples, 64 new tokens. Sampling at temperature 1,
top-p 1, top-k 0, EOS ends a row, prompts left-padded.

The three decoders, each on its own copy of the same weights loaded as that library loads them:
- tether: `HFRollout.generate` built by the policy engine, as `tether ppo` builds it (`load_causal_lm`,
  `make_engine` with 2 threads, `make_rollout`);
- model.generate: transformers' `generate(do_sample=True, temperature=1, top_p=1, top_k=0, use_cache=True)`
  on the model from `from_pretrained(dtype=float32)`;
- TRL: GRPOTrainer's (and RLOOTrainer's) path without vLLM in TRL 1.16: prompts left-padded by
  `trl.trainer.utils.pad`, the model prepared by an `accelerate.Accelerator` and unwrapped by
  `trl.models.unwrap_model_for_generation`, then `generate` with the GenerationConfig GRPOTrainer builds from
  its GRPOConfig's fields (do_sample, temperature, top_p, top_k, min_p, repetition_penalty,
  cache_implementation, disable_compile). That is the same transformers call as the model.generate column;
  its column times TRL's own wrapping of it. TRL's opt-in `use_transformers_continuous_batching`
  (`generate_batch`, which casts the whole model to bf16) is not timed.

bf16: the weights stay float32 and the forward passes run under `torch.autocast("cpu", bfloat16)`, as
tether's engine does for `precision=bf16`: the tether rollout takes the engine's autocast dtype, the
model.generate column runs inside the same autocast context, and TRL's column runs with
`Accelerator(mixed_precision="bf16")`, whose prepared model wraps its forward in that autocast (as TRL's
trainers do with `bf16=True` on CPU).

Counted tokens: per row, the generated tokens up to and including the first EOS (all of them when no
EOS), summed over the batch; a finished row's padding is not counted. tokens/s = that count / seconds of
one generate call (median over the timed runs, after one warm-up). FLOP rate = 2 x matmul parameters
(every Linear / Conv1D weight, the LM head included, embeddings not) x counted tokens / seconds; attention's
score and value products are not counted, nor the prompt's prefill. It is shown as a % of the matmul rate
measured in this process (`benchmarks.compare.matmul_rate`) with the same threads and precision.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import setup_threads
from benchmarks.compare import have_trl, linear_params
from benchmarks.workload import Workload, build, smollm2_path

DECODERS = ("tether", "generate", "trl")


def model_setup(name: str, workdir: Path) -> tuple[Path, object, list[str], int, bool]:
    """(model folder, tokenizer, the 16 prompt texts, max_new_tokens, chat template?) for `tiny` or `smollm2`."""
    from tether.models import load_tokenizer

    w = Workload()
    d = build(workdir)
    texts = [json.loads(line)["prompt"] for line in (d / "prompts.jsonl").read_text().splitlines()[: w.rl_prompts]]
    if name == "tiny":
        return d / "policy", load_tokenizer(d / "policy"), texts, w.rl_new_tokens, False
    src = smollm2_path()
    return src, load_tokenizer(src), texts, 2 * w.rl_new_tokens, True


def prompt_batch(tok, texts: list[str], samples: int, chat: bool):
    """Each prompt `samples` times, left-padded (tether's collate_prompts, as `tether ppo` batches them)."""
    from tether.data import collate_prompts, pad_id

    if chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False) for t in texts]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        ids = [tok(t)["input_ids"] for t in texts]
    rows = [i for i in range(len(ids)) for _ in range(samples)]
    return collate_prompts([ids[i] for i in rows], pad_id(tok), [texts[i] for i in rows])


def matmul_params(model) -> int:
    """Weights of every Linear and transformers Conv1D (GPT-2's), the LM head included even when tied."""
    return sum(linear_params(model))


def stop_ids(path: Path, tok) -> list[int]:
    """The EOS ids every decoder stops at and counts: the tokenizer's and the model's generation config's
    (tether's `eos_ids`), so that the three columns end rows at the same tokens."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from tether.models import eos_ids

    try:
        gen = GenerationConfig.from_pretrained(str(path))
    except OSError:
        gen = None
    return eos_ids(tok, SimpleNamespace(generation_config=gen))


def counted_tokens(resp, eos: list[int]) -> int:
    """Generated tokens [B, R] up to and including each row's first EOS."""
    from tether.rollout.base import response_mask_from_tokens

    return int(response_mask_from_tokens(resp, eos)[0].sum())


def _autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def tether_decoder(path: Path, tok, precision: str, threads: int):
    """-> (generate(batch, max_new_tokens, greedy) -> response ids [B, R], model)."""
    from tether.config import EngineConfig
    from tether.engine import make_engine
    from tether.models import load_causal_lm
    from tether.rollout import SamplingConfig, make_rollout

    engine = make_engine(load_causal_lm(path), EngineConfig(device="cpu", precision=precision, threads=threads), trainable=False)
    rollout = make_rollout("hf", engine, tok)

    def generate(batch, max_new_tokens: int, greedy: bool = False):
        ro = rollout.generate(batch, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0 if greedy else 1.0, top_p=1.0, top_k=0))
        return ro.sequences[:, ro.prompt_length:]

    return generate, engine.model


def _gen_config(tok, eos: list[int], max_new_tokens: int, greedy: bool):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=None if greedy else 1.0,
                            top_p=None if greedy else 1.0, top_k=None if greedy else 0, eos_token_id=eos,
                            pad_token_id=tok.pad_token_id, use_cache=True)


def generate_decoder(path: Path, tok, precision: str, eos: list[int]):
    """Plain `model.generate` on the model as transformers loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    @torch.no_grad()
    def generate(batch, max_new_tokens: int, greedy: bool = False):
        with _autocast(precision):
            out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 generation_config=_gen_config(tok, eos, max_new_tokens, greedy))
        return out[:, batch.input_ids.shape[1]:]

    return generate, model


def trl_decoder(path: Path, tok, precision: str, eos: list[int], max_new_tokens: int, workdir: Path):
    """GRPOTrainer._generate_single_turn's non-vLLM branch through TRL's own helpers and config."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, GenerationConfig
    from trl import GRPOConfig
    from trl.models import unwrap_model_for_generation
    from trl.trainer.utils import pad

    args = GRPOConfig(output_dir=str(workdir / "trl"), use_cpu=True, bf16=precision == "bf16", report_to=[],
                      max_completion_length=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    AcceleratorState._reset_state(reset_partial_state=True)  # each precision gets its own mixed-precision state
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if args.bf16 else "no")
    model = accelerator.prepare(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32))
    model.generation_config.pad_token_id = tok.pad_token_id
    # GRPOTrainer's generation_kwargs, field for field from its config (TRL 1.16, no vLLM)
    kwargs = {"max_new_tokens": args.max_completion_length, "do_sample": True, "pad_token_id": tok.pad_token_id,
              "bos_token_id": tok.bos_token_id, "eos_token_id": eos, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
              "cache_implementation": args.cache_implementation}
    multiple = None if args.pad_to_multiple_of == "auto" else args.pad_to_multiple_of  # "auto" pads only on Neuron

    def generate(batch, max_new_tokens: int, greedy: bool = False):
        kw = dict(kwargs, max_new_tokens=max_new_tokens) | ({"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if greedy else {})
        config = GenerationConfig(**kw, disable_compile=True)
        rows = [torch.tensor(r[m.bool()].tolist()) for r, m in zip(batch.input_ids, batch.attention_mask)]
        ids = pad(rows, padding_value=tok.pad_token_id, padding_side="left", pad_to_multiple_of=multiple)
        mask = pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side="left", pad_to_multiple_of=multiple)
        with unwrap_model_for_generation(model, accelerator, generation_kwargs=kw) as unwrapped, torch.no_grad():
            out = unwrapped.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return out[:, ids.shape[1]:]

    return generate, model


def time_decoder(generate, batch, max_new_tokens: int, eos: list[int], repeats: int, seed: int) -> dict:
    """One warm-up, then `repeats` timed calls -> median seconds and counted tokens, and every run."""
    import torch

    torch.manual_seed(seed)
    generate(batch, max_new_tokens)
    runs = []
    for i in range(repeats):
        torch.manual_seed(seed + 1 + i)
        t = time.perf_counter()
        resp = generate(batch, max_new_tokens)
        dt = time.perf_counter() - t
        runs.append({"seconds": dt, "tokens": counted_tokens(resp, eos), "sequences": int(resp.shape[0])})
    med = sorted(runs, key=lambda r: r["tokens"] / r["seconds"])[len(runs) // 2]  # the run of median tokens/s
    return {**med, "tokens_per_s": med["tokens"] / med["seconds"], "runs": runs}


def measure(model_name: str, precision: str, workdir: Path, repeats: int, decoders=DECODERS, log=print) -> list[dict]:
    """Every decoder on one (model, precision) -> one row each."""
    from benchmarks.compare import matmul_rate

    w = Workload()
    setup_threads(w.threads)
    path, tok, texts, new_tokens, chat = model_setup(model_name, workdir)
    batch = prompt_batch(tok, texts, w.rl_samples, chat)
    eos = stop_ids(path, tok)
    rate = matmul_rate(w.threads, precision)
    rows = []
    for name in decoders:
        if name == "trl" and not have_trl():
            log(f"  {model_name} {precision} trl: TRL is not importable; column skipped")
            continue
        if name == "tether":
            gen, model = tether_decoder(path, tok, precision, w.threads)
        elif name == "generate":
            gen, model = generate_decoder(path, tok, precision, eos)
        else:
            gen, model = trl_decoder(path, tok, precision, eos, new_tokens, workdir)
        r = time_decoder(gen, batch, new_tokens, eos, repeats, w.seed)
        n = matmul_params(model)
        r |= {"model": model_name, "precision": precision, "decoder": name, "matmul_params": n, "batch": int(batch.input_ids.shape[0]),
              "max_new_tokens": new_tokens, "flops_per_s": 2 * n * r["tokens"] / r["seconds"], "matmul_rate": rate}
        r["mfu"] = r["flops_per_s"] / rate
        log(f"  {model_name:7s} {precision} {name:8s}: {r['tokens']} tokens in {r['seconds']:.2f}s, {r['tokens_per_s']:.0f} tok/s, "
            f"{100 * r['mfu']:.1f}% of {rate / 1e9:.0f} GFLOP/s")
        rows.append(r)
        del gen, model
    return rows


def table(rows: list[dict]) -> str:
    head = "| model | precision | decoder | sequences | tokens | seconds | tokens/s | GFLOP/s | % of matmul | tether / this |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t = next((x for x in rows if x["decoder"] == "tether" and x["model"] == r["model"] and x["precision"] == r["precision"]), None)
        ratio = "-" if t is None or r["decoder"] == "tether" else f"{t['tokens_per_s'] / r['tokens_per_s']:.2f}x"
        out.append(f"| {r['model']} | {r['precision']} | {r['decoder']} | {r['sequences']} | {r['tokens']} | {r['seconds']:.2f} | "
                   f"{r['tokens_per_s']:.0f} | {r['flops_per_s'] / 1e9:.1f} | {100 * r['mfu']:.1f}% | {ratio} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="both", choices=["tiny", "smollm2", "both"])
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--quick", action="store_true", help="one timed run instead of the median of 3")
    p.add_argument("--dir", default="", help="workload folder (default: a temporary one)")
    p.add_argument("--json", default="", help="write every row (and each timed run) to this file")
    args = p.parse_args(argv)
    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    if any(x not in ("fp32", "bf16") for x in precisions):
        p.error(f"--precision: {args.precision!r}: each must be fp32 or bf16")
    models = ["tiny", "smollm2"] if args.model == "both" else [args.model]
    if not have_trl():
        print("TRL is not importable: the trl column is skipped (pip install -r benchmarks/requirements.txt)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.dir) if args.dir else Path(tmp) / "workload"
        rows = [r for m in models for prec in precisions for r in measure(m, prec, workdir, 1 if args.quick else 3)]
    if any(r["decoder"] == "trl" for r in rows):
        print("\nTRL 1.16 without vLLM calls transformers' model.generate with the same sampling settings: its column is "
              "that call through TRL's own padding, unwrapping and GenerationConfig.")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
