"""Optional scale-out backends: the two seams (Engine, Rollout) implemented on existing systems.

    ddp.py            DDPEngine, FSDPEngine (torch.distributed, launched with torchrun)
    lora.py           PEFT LoRA for policy / critic / reward model; reference = adapters disabled
    ray_ppo.py        Ray actors with the local objects' method names; PPO as a single controller
    reward_server.py  a reward model behind HTTP, and a client usable as a reward function
    vllm_rollout.py   generation in vLLM (CUDA only; unverified on CPU machines)

Nothing in the core imports these modules except through the backend tables (tether.engine,
tether.rollout). The rank helpers live in tether.ranks.
"""

