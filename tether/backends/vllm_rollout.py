"""vLLM rollout (`pip install tether[vllm]`, CUDA only): NOT IMPLEMENTED YET.

Status: blocked. The official vLLM wheel needs CUDA (installing it replaces the CPU torch build),
and no GPU machine was available to build and test this backend, so it is left as a stub rather
than shipped untested. What remains, against the `Rollout` protocol (tether/rollout/base.py):
- `generate(prompts, sampling)`: `vllm.LLM.generate` on prompt token ids with
  `SamplingParams(temperature, top_p, top_k, max_tokens, min_tokens, logprobs=0)`, returning a
  RolloutBatch with the sampler's own logprobs of the sampled tokens (so that PPO's
  `rollout/logprob_drift` measures sampler-vs-trainer drift, optionally corrected by importance weights);
- `update_weights(named_parameters)`: push the trainer's weights after each update
  (`llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(...)` or the
  collective-RPC weight-sync API of the installed vLLM version; merged weights when LoRA is on);
- a GPU test: tokens/s of vLLM vs HF generate on the same model, and the drift of its logprobs.
"""

from __future__ import annotations


class VLLMRollout:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            "rollout.backend=vllm is not available yet: the vLLM rollout needs a CUDA machine to be built and "
            "verified (see tether/backends/vllm_rollout.py). Use rollout.backend=hf."
        )
