"""Ray placement: every engine and the rollout become Ray actors; the PPO loop is the single controller.

    tether ppo --config configs/ppo_ray.yaml                       # a local cluster on 127.0.0.1
    tether ppo --config configs/ppo_ray.yaml engine.ray.address=auto   # join a running cluster

`engine.backend=ray` makes `make_engine` return `RemoteEngine`: a proxy with the Engine methods
(train_step, forward, global_sum, named_parameters, save_model, load_state_dict, snapshot ...)
whose work runs in an `EngineWorker` actor holding an ordinary local engine. `make_rollout(...)`
asks the policy engine for its sampler, and `RemoteEngine.rollout` starts a `RolloutWorker` actor. So
tether/algo/ppo.py runs unchanged as the controller: it calls the same `make_experience` and
`ppo_update`, and loss functions travel to the actors by cloudpickle.

Placement: one placement group with a bundle per role (policy, ref, reward_model, value, rollout),
`engine.ray.cpus_per_actor` CPUs (and `gpus_per_actor` GPUs) each, packed.

What moves where:
- weights go policy actor -> object store -> rollout actor (`update_weights`), never through the
  controller; with LoRA the policy actor sends merged weights.
- the controller owns the random state: `generate` ships the controller's torch RNG state to the
  rollout worker and takes the advanced state back, so a Ray run samples exactly what the local run
  samples for the same seed, and checkpoints (which save the controller's RNG) resume exactly.
- snapshots for the rollback guard stay inside the actors (the controller holds a token).

A dead actor stops the run with `WorkerLost`, naming the role and telling the user to resume with
`--resume`; checkpoints are written by the actors into the run folder (which must be on storage
every node sees, e.g. the local disk of a one-machine cluster).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Callable, Iterable

import torch
from torch import nn

ROLES = ("policy", "ref", "reward_model", "value", "rollout")

_state: dict[str, Any] = {"pg": None}


class WorkerLost(RuntimeError):
    """A Ray actor died (killed, out of memory, node lost)."""


# ----------------------------------------------------------------------------------------------
# Cluster and placement


def ensure_ray(rcfg) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")}}
    if rcfg.address:
        ray.init(address=rcfg.address, runtime_env=env, log_to_driver=True)
    else:  # a local cluster, reachable only from this machine
        ray.init(num_cpus=rcfg.num_cpus or None, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env=env, log_to_driver=True)


def _bundle(rcfg) -> dict[str, float]:
    b = {"CPU": rcfg.cpus_per_actor}
    if rcfg.gpus_per_actor > 0:
        b["GPU"] = rcfg.gpus_per_actor
    return b


def placement(rcfg, role: str) -> dict:
    """Actor options that put `role` on its bundle of the run's placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if _state["pg"] is None:
        pg = ray.util.placement_group([_bundle(rcfg)] * len(ROLES), strategy="PACK")
        ray.get(pg.ready(), timeout=120)
        _state["pg"] = pg
    opts = {
        "num_cpus": rcfg.cpus_per_actor,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=_state["pg"], placement_group_bundle_index=ROLES.index(role)),
        "max_restarts": 0,
    }
    if rcfg.gpus_per_actor > 0:
        opts["num_gpus"] = rcfg.gpus_per_actor
    return opts


def _role(model: nn.Module, trainable: bool) -> str:
    from tether.backends.lora import _is_scalar

    if _is_scalar(model):
        return "value" if trainable else "reward_model"
    return "policy" if trainable else "ref"


def _call(role: str, ref):
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as e:
        raise WorkerLost(
            f"ray: the '{role}' actor died ({type(e).__name__}); the run stopped. Every checkpoint already "
            f"written is intact: rerun the same command with --resume to continue from the latest one."
        ) from e


def _cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, tuple):
        return tuple(_cpu(v) for v in x)
    if isinstance(x, list):
        return [_cpu(v) for v in x]
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if hasattr(x, "to") and dataclasses.is_dataclass(x):
        return x.to("cpu")
    return x


# ----------------------------------------------------------------------------------------------
# Actors (plain classes; made remote when first used, so importing this module needs no Ray)


class EngineWorker:
    """Holds one local engine (LoRA applied here when configured)."""

    def __init__(self, model: nn.Module, engine_cfg, optim_cfg, total_steps: int, trainable: bool, role: str):
        from tether.engine import make_engine

        if engine_cfg.threads:
            torch.set_num_threads(engine_cfg.threads)
        self.role = role
        local = dataclasses.replace(engine_cfg, backend="local")
        self.engine = make_engine(model, local, optim_cfg, total_steps=total_steps, trainable=trainable)
        self._policy = None
        self._snaps: dict[int, dict] = {}
        self._ids = itertools.count()

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        return {"device": str(self.engine.device), "autocast": getattr(self.engine, "autocast_dtype", None)}

    def train_step(self, batch, loss_fn):
        return self.engine.train_step(batch, loss_fn)

    def forward(self, batch, fn, micro_batch_size=None, reference: bool = False):
        if reference:  # LoRA: the policy with adapters disabled is the reference
            self._policy = self._policy or self.engine.without_adapters()
            return _cpu(self._policy.forward(batch, fn, micro_batch_size))
        return _cpu(self.engine.forward(batch, fn, micro_batch_size))

    def rollout_state(self) -> dict:
        from tether.backends.lora import merged_state_dict

        return {k: v.cpu() for k, v in merged_state_dict(self.engine.model).items()}

    def named_parameters(self) -> list:
        return [(k, v.detach().cpu()) for k, v in self.engine.named_parameters()]

    def optimizer_state(self):
        return _cpu(self.engine.optimizer_state())

    def load_optimizer_state(self, state):
        self.engine.load_optimizer_state(state)

    def load_state_dict(self, sd) -> None:
        self.engine.load_state_dict(sd)

    def save_model(self, path: str, tokenizer=None, merged: bool = True) -> None:
        self.engine.save_model(path, tokenizer, merged)

    def has_adapter(self) -> bool:
        return self.engine.without_adapters() is not None

    def scale_lr(self, factor: float) -> None:
        self.engine.scale_lr(factor)

    def snapshot(self, with_optimizer: bool = True) -> int:
        i = next(self._ids)
        self._snaps = {i: self.engine.snapshot(with_optimizer)}  # keep only the latest
        return i

    def restore(self, token: int) -> None:
        self.engine.restore(self._snaps[token])


class RolloutWorker:
    """A sampler with its own copy of the policy weights, refreshed by `update_weights`."""

    def __init__(self, cls, model: nn.Module, tokenizer, threads: int = 0):
        from tether.models import resolve_device

        if threads:
            torch.set_num_threads(threads)
        device = resolve_device("auto")
        self.model = model.to(device)
        self.rollout = cls(self.model, tokenizer, device, None)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, prompts, sampling, rng_state):
        torch.set_rng_state(rng_state)
        ro = self.rollout.generate(prompts, sampling)
        return ro.to("cpu"), torch.get_rng_state()

    def update_weights(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=False)
        self.rollout.update_weights(self.model.named_parameters())


# ----------------------------------------------------------------------------------------------
# Controller-side proxies


class RemoteParameters:
    """`engine.named_parameters()` of a remote engine: iterating pulls them; a rollout worker takes
    them straight from the object store instead (`object_ref`)."""

    def __init__(self, actor, role: str):
        self.actor, self.role = actor, role

    def object_ref(self):
        return self.actor.rollout_state.remote()

    def __iter__(self):
        return iter(_call(self.role, self.actor.named_parameters.remote()))


class RemoteEngine:
    """The Engine protocol, served by an EngineWorker actor."""

    def __init__(self, model: nn.Module, engine_cfg, optim_cfg=None, total_steps: int = 0, trainable: bool = True, role: str | None = None):
        import ray

        ensure_ray(engine_cfg.ray)
        self.cfg = engine_cfg
        self.role = role or _role(model, trainable and optim_cfg is not None)
        self.trainable = trainable and optim_cfg is not None
        self.model_ref = ray.put(model)
        worker = ray.remote(EngineWorker).options(name=None, **placement(engine_cfg.ray, self.role))
        self.actor = worker.remote(self.model_ref, engine_cfg, optim_cfg, total_steps, trainable, self.role)
        # not awaited here, so the actors of a stage start in parallel
        self._info_ref, self._pid_ref, self._ready = self.actor.info.remote(), self.actor.pid.remote(), False
        self.device = torch.device("cpu")  # where results arrive on the controller
        self.autocast_dtype = None
        model.to("meta")  # the controller keeps no copy of the weights

    def rollout(self, cls, tokenizer):
        """A RolloutWorker actor on the rollout bundle, started from this engine's weights."""
        return RemoteRollout(self, cls, tokenizer)

    @property
    def _info(self) -> dict:
        if not self._ready:
            self._info_v = _call(self.role, self._info_ref)
            _announce(self.role, _call(self.role, self._pid_ref))
            self._ready = True
        return self._info_v

    def train_step(self, batch, loss_fn: Callable) -> dict[str, float]:
        self._info
        return _call(self.role, self.actor.train_step.remote(batch, loss_fn))

    def forward(self, batch, fn: Callable, micro_batch_size: int | None = None) -> Any:
        self._info
        return _call(self.role, self.actor.forward.remote(batch, fn, micro_batch_size))

    def global_sum(self, value: float) -> float:
        return float(value)  # each actor sees the whole batch

    def named_parameters(self) -> RemoteParameters:
        return RemoteParameters(self.actor, self.role)

    def load_state_dict(self, state_dict: dict) -> None:
        _call(self.role, self.actor.load_state_dict.remote(state_dict))

    def save_model(self, path, tokenizer=None, merged: bool = True) -> None:
        _call(self.role, self.actor.save_model.remote(str(path), tokenizer, merged))

    def without_adapters(self) -> "RemoteReference | None":
        return RemoteReference(self) if _call(self.role, self.actor.has_adapter.remote()) else None

    def optimizer_state(self) -> dict | None:
        return _call(self.role, self.actor.optimizer_state.remote())

    def load_optimizer_state(self, state: dict) -> None:
        _call(self.role, self.actor.load_optimizer_state.remote(state))

    def scale_lr(self, factor: float) -> None:
        _call(self.role, self.actor.scale_lr.remote(factor))

    def snapshot(self, with_optimizer: bool = True) -> int:
        return _call(self.role, self.actor.snapshot.remote(with_optimizer))

    def restore(self, token: int) -> None:
        _call(self.role, self.actor.restore.remote(token))


class RemoteReference(RemoteEngine):
    """LoRA on Ray: the reference is the policy actor with its adapters disabled."""

    def __init__(self, policy: RemoteEngine):
        self.cfg, self.role, self.trainable = policy.cfg, "ref", False
        self.actor, self.device, self.autocast_dtype = policy.actor, policy.device, None
        self._info_v, self._ready = {}, True
        self.model_ref = None

    def forward(self, batch, fn: Callable, micro_batch_size: int | None = None) -> Any:
        return _call("policy", self.actor.forward.remote(batch, fn, micro_batch_size, True))

    def train_step(self, batch, loss_fn):
        raise RuntimeError("the reference is frozen")

    def named_parameters(self):
        return iter(())

    def optimizer_state(self):
        return None

    def snapshot(self, with_optimizer: bool = True):
        return 0

    def restore(self, token) -> None:
        pass

    def without_adapters(self) -> "RemoteReference":
        return self


class RemoteRollout:
    """The Rollout protocol, served by a RolloutWorker actor on the rollout bundle."""

    def __init__(self, policy: RemoteEngine, cls, tokenizer):
        import ray

        cfg = policy.cfg
        worker = ray.remote(RolloutWorker).options(**placement(cfg.ray, "rollout"))
        self.actor = worker.remote(cls, policy.model_ref, tokenizer, cfg.threads)
        self._pid_ref, self._ready = self.actor.pid.remote(), False
        # start from the policy's current weights (merged, if LoRA)
        self.update_weights(policy.named_parameters())

    def generate(self, prompts, sampling):
        if not self._ready:
            _announce("rollout", _call("rollout", self._pid_ref))
            self._ready = True
        ro, rng = _call("rollout", self.actor.generate.remote(prompts, sampling, torch.get_rng_state()))
        torch.set_rng_state(rng)  # the controller's random stream advances as if it had sampled
        return ro

    def update_weights(self, named_parameters: Iterable) -> None:
        if isinstance(named_parameters, RemoteParameters):
            ref = named_parameters.object_ref()  # actor -> object store -> actor
        else:
            ref = {k: v.detach().cpu() for k, v in named_parameters}
        _call("rollout", self.actor.update_weights.remote(ref))


def _announce(role: str, pid: int) -> None:
    from tether.track import console

    console.print(f"ray: actor {role} pid {pid}", highlight=False)


def remote_engine(model: nn.Module, engine_cfg, optim_cfg=None, total_steps: int = 0, trainable: bool = True):
    """`make_engine` for engine.backend=ray."""
    return RemoteEngine(model, engine_cfg, optim_cfg, total_steps, trainable, _role(model, trainable and optim_cfg is not None))
