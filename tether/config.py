"""One config system: typed, nested, frozen dataclasses; YAML plus dotted `key=value` overrides.

Every field carries a one-line doc (`doc(...)`) that `tether <stage> --help` prints with its default.
Validation names the offending key and never rewrites a user's value. The resolved config is saved
as `config.json` in the run folder and next to every checkpoint.

Key names are the same in every stage: `model`, `out`, `seed`, `max_steps`, `data.train`,
`data.eval`, `optim.lr`, `engine.precision`, `track.mlflow` ...
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config key or value is wrong. The message names the key."""


class RunStopped(RuntimeError):
    """A guard stopped a run that was not training (e.g. PPO rolled back too many updates in a row)."""


def doc(default: Any, text: str, **kw: Any) -> Any:
    """A dataclass field with a default and a one-line doc shown by --help."""
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: type(d)(d)) if not dataclasses.is_dataclass(default) else (lambda d=default: dataclasses.replace(d))
        return field(default_factory=factory, metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


def sub(cls: type, text: str) -> Any:
    """A nested config section."""
    return field(default_factory=cls, metadata={"doc": text})


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


# -- Sections shared by the stages -----------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    train: str = doc("", "training data: a .jsonl/.json/.jsonl.gz file, an HF dataset saved to disk, or several joined by ','")
    eval: str = doc("", "held-out data in the same formats; empty = split eval_fraction off the training data")
    eval_fraction: float = doc(0.0, "fraction of training records held out for evaluation when data.eval is empty")
    max_length: int = doc(512, "maximum tokens of prompt+response; longer examples are truncated (and counted)")
    max_prompt_length: int = doc(256, "maximum prompt tokens; a longer prompt is a bad record")
    on_bad_record: Literal["error", "skip"] = doc("error", "error: stop at the first bad record; skip: skip and report counts by reason")
    packing: bool = doc(False, "SFT only: pack several examples into each row (attention never crosses examples)")
    chat_template: Literal["auto", "model", "plain"] = doc("auto", "auto: the tokenizer's chat template when it has one, else 'Human:/Assistant:'")
    shuffle: bool = doc(True, "shuffle training examples each epoch (seeded)")

    def validate(self, p: str) -> None:
        check(0.0 <= self.eval_fraction < 1.0, f"{p}eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        check(self.max_length > 0, f"{p}max_length", f"must be positive, got {self.max_length}")
        check(0 < self.max_prompt_length <= self.max_length, f"{p}max_prompt_length", f"must be in (0, data.max_length], got {self.max_prompt_length}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = doc(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    betas: tuple[float, float] = doc((0.9, 0.999), "AdamW betas")
    eps: float = doc(1e-8, "AdamW epsilon")
    warmup_steps: int = doc(0, "linear warm-up steps")
    schedule: Literal["constant", "linear", "cosine"] = doc("constant", "learning-rate schedule after warm-up")
    grad_clip: float = doc(1.0, "clip the global gradient norm to this value (0 = off)")

    def validate(self, p: str) -> None:
        check(self.lr > 0, f"{p}lr", f"must be positive, got {self.lr}")
        check(self.warmup_steps >= 0, f"{p}warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.grad_clip >= 0, f"{p}grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class LoRAConfig:
    r: int = doc(0, "LoRA rank for every trained model (policy, critic, reward model); 0 = train all weights (pip install tether[lora])")
    alpha: float = doc(16.0, "LoRA scale numerator: the update is (alpha / r) * B A")
    dropout: float = doc(0.0, "dropout on the LoRA input")
    target_modules: list[str] = doc([], "module names to adapt, e.g. q_proj,v_proj; empty = PEFT's default for the architecture")
    shared_reference: bool = doc(True, "the frozen reference is the policy with its adapters disabled (one copy of the base weights)")

    def validate(self, p: str) -> None:
        check(self.r >= 0, f"{p}r", "must be >= 0")
        check(self.alpha > 0, f"{p}alpha", "must be positive")
        check(0 <= self.dropout < 1, f"{p}dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class RayConfig:
    address: str = doc("", "Ray cluster to join (ray.init(address=...), e.g. auto or ray://host:10001); empty = start a local one on 127.0.0.1")
    num_cpus: int = doc(0, "CPUs of a local cluster started by tether (0 = all of this machine's)")
    cpus_per_actor: float = doc(0.4, "CPUs reserved for each actor (policy, ref, reward model, critic, rollout) in the placement group")
    gpus_per_actor: float = doc(0.0, "GPUs reserved for each actor (fractions share a GPU)")

    def validate(self, p: str) -> None:
        check(self.num_cpus >= 0, f"{p}num_cpus", "must be >= 0")
        check(self.cpus_per_actor > 0, f"{p}cpus_per_actor", "must be positive")
        check(self.gpus_per_actor >= 0, f"{p}gpus_per_actor", "must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    backend: str = doc("local", "training engine: local (one process; CPU or one GPU), ddp, fsdp, ray")
    device: str = doc("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = doc("auto", "auto: bf16 autocast on GPUs that support it, else fp32")
    micro_batch_size: int = doc(0, "split each batch into micro-batches of this size with gradient accumulation (0 = whole batch)")
    threads: int = doc(0, "torch CPU threads (0 = torch default)")
    gradient_checkpointing: bool = doc(False, "recompute activations in the backward pass to save memory")
    padding_free: Literal["auto", "on", "off"] = doc("auto", "pack each batch into one row without padding, a pair's or a prompt's rows sharing the prompt (tether.packing); auto = on for CPU")
    lora: LoRAConfig = sub(LoRAConfig, "LoRA adapters (PEFT) instead of full fine-tuning")
    ray: RayConfig = sub(RayConfig, "Ray placement when backend=ray")

    def validate(self, p: str) -> None:
        check(self.micro_batch_size >= 0, f"{p}micro_batch_size", "must be >= 0")


@dataclass(frozen=True)
class TrackConfig:
    mlflow: bool = doc(False, "also log params and metrics to MLflow (pip install tether[mlflow])")
    mlflow_uri: str = doc("", "MLflow tracking URI; empty = sqlite:///<out>/mlflow.db")
    experiment: str = doc("tether", "MLflow experiment name; also the W&B project")
    wandb: bool = doc(False, "also log to Weights & Biases (pip install tether[wandb]; WANDB_MODE=offline needs no network)")
    tensorboard: bool = doc(False, "also write TensorBoard event files to <out>/tensorboard (pip install tether[tensorboard])")
    log_every: int = doc(1, "log metrics every N steps")
    progress: bool = doc(True, "show a progress bar on the terminal")


@dataclass(frozen=True)
class RunConfig:
    """Fields every training stage has."""

    model: str = doc("", "a local Hugging Face model folder (the policy / the model to train)")
    out: str = doc("runs/run", "run folder: config.json, metrics.jsonl, checkpoints, final model")
    seed: int = doc(0, "random seed; a run is reproducible from its config")
    max_steps: int = doc(0, "optimizer steps to run (0 = run `epochs` epochs)")
    epochs: float = doc(1.0, "passes over the training data when max_steps is 0")
    batch_size: int = doc(8, "examples (or pairs) per optimizer step")
    eval_every: int = doc(0, "evaluate on held-out data every N steps (0 = only at the end)")
    eval_batch_size: int = doc(16, "examples per forward pass during evaluation")
    save_every: int = doc(0, "write a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = doc(2, "how many step checkpoints to keep")
    resume: bool = doc(False, "continue from the latest checkpoint in `out` (also: --resume)")
    dropout: bool = doc(False, "keep the model config's dropout in training; off (the default) in every stage: the same weights give the same numbers, so resumes and torchrun match one process, and RL/DPO ratios start at 1")
    data: DataConfig = sub(DataConfig, "data files and tokenisation")
    optim: OptimConfig = sub(OptimConfig, "optimizer and schedule")
    engine: EngineConfig = sub(EngineConfig, "devices, precision, micro-batching")
    track: TrackConfig = sub(TrackConfig, "metrics logging")

    def validate(self, p: str = "") -> None:
        check(self.batch_size > 0, f"{p}batch_size", f"must be positive, got {self.batch_size}")
        check(self.max_steps >= 0, f"{p}max_steps", f"must be >= 0, got {self.max_steps}")
        check(self.epochs > 0, f"{p}epochs", f"must be positive, got {self.epochs}")


# -- Loading ---------------------------------------------------------------------------------------


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def _scalar(text: str) -> Any:
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return v if isinstance(v, (int, float, bool, str)) else text


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/override value to the field's type, or raise ConfigError naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_config(tp):  # a section inside a list, e.g. reward.sources=[{name: helpful, model: ...}]
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, f"{key}.")
    if origin is Literal:
        if isinstance(value, bool) and value not in args:  # YAML 1.1 reads on/off/yes/no as booleans
            value = next((a for a in args if isinstance(a, str) and a.lower() in (("on", "yes", "true") if value else ("off", "no", "false"))), value)
        if value not in args:
            raise ConfigError(f"config key '{key}': must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):  # "1,2,4" from the command line: parse each item like a YAML scalar
            value = [_scalar(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, f"{key}[{i}]" if _is_config(inner) else key) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return "" if value is None else str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return value
    return value


def _build(cls: type[C], values: dict[str, Any], prefix: str) -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    key, table = getattr(cls, "PRESETS", ("", {}))  # a method preset (e.g. `tether ppo algo=grpo`): its keys under the user's
    preset = table.get(values.get(key), []) if isinstance(values.get(key), str) else []
    values = {k: dict(x) if isinstance(x, dict) else x for k, x in values.items()} if preset else values  # the caller's tree stays as given
    for path, v in map(_parse_override, preset):
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(path[-1], v)
    kw: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint} (see --help for the keys)")
        tp = hints[key]
        if _is_config(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}': is a section; set its keys, e.g. {full}.<key>=...")
            kw[key] = _build(tp, value, f"{full}.")
        else:
            kw[key] = _coerce(value, tp, full)
    obj = cls(**kw)
    getattr(obj, "validate", lambda p: None)(prefix)
    for name in fields:  # nested sections left at their defaults are validated too
        if _is_config(hints[name]) and name not in values:
            getattr(getattr(obj, name), "validate", lambda p: None)(f"{prefix}{name}.")
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    if not (key := key.strip()):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    # Keep path-like and version-like strings as strings.
    if isinstance(value, (dict,)) and not raw.strip().startswith("{"):
        value = raw
    return key.split("."), value


def _set(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{'.'.join(path)}': '{part}' is not a section")
        node = nxt
    node[path[-1]] = value


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """YAML file (optional) + dotted overrides -> a frozen, validated config of type `cls`."""
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of keys")
    for item in overrides or []:
        _set(tree, *_parse_override(item))
    return _build(cls, tree, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def flat_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict (a config's to_dict) as {dotted key: value}, the names overrides use."""
    return {k2: v2 for k, v in tree.items() for k2, v2 in (flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}).items()}


def save_config(cfg: Any, path: str | Path) -> None:
    from tether.atomic import atomic_write_text

    atomic_write_text(Path(path), json.dumps(to_dict(cfg), indent=2) + "\n")


def config_help(cls: type, prefix: str = "") -> list[str]:
    """Lines `key (type, default): doc` for every field, nested sections flattened."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        text = f.metadata.get("doc", "")
        if _is_config(tp):
            lines += ["", f"{prefix}{f.name}.*  {text}", *config_help(tp, f"{prefix}{f.name}.")]
        else:
            default = getattr(inst, f.name)
            d = json.dumps(default) if not isinstance(default, str) else (repr(default) if default == "" else default)
            lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {d}): {text}")
            item = (typing.get_args(tp) or [None])[0]
            lines += config_help(item, f"  {prefix}{f.name}[].") if typing.get_origin(tp) is list and _is_config(item) else []
    return lines
