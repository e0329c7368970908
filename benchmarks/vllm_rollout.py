"""The vLLM rollout against the HF rollout: generated tokens/s, the weight push, and the logprob drift.

    .venv-vllm/bin/python -m benchmarks.vllm_rollout                       # tiny Llama, then SmolLM2-135M-Instruct
    .venv-vllm/bin/python -m benchmarks.vllm_rollout --models tiny --rows 16 --tokens 32

Run from the vLLM environment (bash scripts/setup_vllm.sh). For each model: one warm-up batch per sampler, then
--repeats batches of --rows prompts (4 distinct prompts, rows/4 samples each, temperature 1, --tokens new tokens,
EOS ignored so both write the same number of tokens); tokens/s is those tokens over the median batch time. The
weight push is `update_weights` with the trainer's full weights (median of --repeats). Drift: the sampler's
logprobs of its own tokens against the trainer's float32 recomputation (mean and max |difference|, and the share
of tokens over 0.01), for vLLM in float32 and, where the CPU has bf16 instructions, vLLM in bfloat16.
SmolLM2 comes from $TETHER_CACHE/models/smollm2-135m-instruct (`tether model import-gguf` writes it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _models(which: list[str]) -> dict[str, str]:
    out = {}
    if "tiny" in which:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny import make_tiny_model_dir

        out["tiny Llama (2x128, head_dim 64)"] = str(make_tiny_model_dir(tempfile.mkdtemp(), "llama", hidden=128))
    if "smollm2" in which:
        from benchmarks.workload import smollm2_path

        out["SmolLM2-135M-Instruct"] = str(smollm2_path())
    return out


def _timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), res


def _drift(model, ro) -> tuple[float, float, float]:
    from tether.models import causal_logprobs

    with torch.no_grad():
        lp = causal_logprobs(model, ro.sequences, ro.attention_mask, num_response=ro.response_mask.shape[1])[0]
    m = ro.response_mask.bool()
    d = (ro.logprobs - lp).abs()[m]
    return float(d.mean()), float(d.max()), float((d > 0.01).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from tether.backends.vllm_rollout import VLLMRollout
    from tether.data.tokenize import collate_prompts
    from tether.models import load_causal_lm, load_tokenizer
    from tether.rollout.base import SamplingConfig
    from tether.rollout.hf import HFRollout

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    bf16 = torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") or "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    print(f"threads {torch.get_num_threads()}, bf16 instructions: {bf16}")
    prompts = ["Give me a tip for learning Python.", "What is the capital of France?", "Write a haiku about rain.", "the movie was"]
    sampling = SamplingConfig(max_new_tokens=args.tokens, temperature=1.0, stop_at_eos=False)
    for name, path in _models(args.models.split(",")).items():
        model, tok = load_causal_lm(path), load_tokenizer(path)
        ids = [tok(p).input_ids for p in prompts for _ in range(args.rows // len(prompts))]
        batch = collate_prompts(ids, tok.pad_token_id if tok.pad_token_id is not None else 0, [p for p in prompts for _ in range(args.rows // len(prompts))])
        n_tok = len(ids) * args.tokens
        t_hf, _ = _timed(lambda: HFRollout(model, tok).generate(batch, sampling), args.repeats)
        t0 = time.perf_counter()
        vr = VLLMRollout(model, tok)
        build = time.perf_counter() - t0
        t_vl, ro = _timed(lambda: vr.generate(batch, sampling), args.repeats)
        named = list(model.named_parameters())
        for _ in range(args.repeats):
            vr.update_weights(named)
        push = statistics.median(vr.push_seconds)
        mean, mx, share = _drift(model, ro)
        params = sum(p.numel() for _, p in named) / 1e6
        print(f"{name}: {len(ids)} rows x {args.tokens} tokens | HF rollout {n_tok / t_hf:.0f} tok/s | vLLM {n_tok / t_vl:.0f} tok/s "
              f"({t_hf / t_vl:.2f}x) | engine build {build:.1f} s | weight push {push:.3f} s ({params:.1f}M parameters) | "
              f"drift fp32: mean {mean:.2e}, max {mx:.2e}, share > 0.01 {share:.3f}")
        del vr
        if bf16:
            vb = VLLMRollout(model, tok, autocast_dtype=torch.bfloat16)
            torch.manual_seed(0)
            mean, mx, share = _drift(model, vb.generate(batch, sampling))
            print(f"{name}: drift with vLLM in bf16 against the fp32 trainer: mean {mean:.3f}, max {mx:.3f}, share > 0.01 {share:.3f}")
            del vb
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
