"""What a tether command shows on the terminal: its own lines, not the libraries'.

`tether <command>` runs inside `quiet(verbose)`: transformers' and huggingface_hub's progress bars and
log lines, the warnings that third-party packages raise about themselves (deprecations inside transformers,
peft's notes on the layers it wraps), W&B's and MLflow's console lines are switched off through each
library's own controls, and restored when the command returns (the tests call commands in one process).
`--verbose` (anywhere on the command line) leaves every library at its default and turns tether's one-line
errors into tracebacks. A warning that a library raises about tether's own call still shows (it points at
tether's code, which is the thing to fix).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from typing import Any, Iterator

# The packages whose own warnings (raised from inside them, about them) a tether run does not show.
THIRD_PARTY = ("transformers", "peft", "huggingface_hub", "accelerate", "torch", "tokenizers", "datasets", "wandb",
               "mlflow", "tensorboard", "google.protobuf", "sqlalchemy", "alembic", "ray", "vllm", "openai", "httpx")
_LOGGERS = ("mlflow", "alembic", "wandb", "httpx", "ray", "vllm", "torch.distributed")

_verbose = False


def verbose() -> bool:
    """Whether this command was given --verbose (the flag is taken off the command line by `tether.cli`)."""
    return _verbose


@contextlib.contextmanager
def quiet(is_verbose: bool = False) -> Iterator[None]:
    """Run a command with third-party output off (or, is_verbose, on at the libraries' defaults)."""
    global _verbose
    env = {k: os.environ.get(k) for k in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "WANDB_SILENT", "MLFLOW_LOGGING_LEVEL")}
    before, _verbose = _verbose, is_verbose
    # the environment reaches the libraries imported later in this process and every worker it starts
    if is_verbose:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0"
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    restore = _libraries(is_verbose)
    try:
        with warnings.catch_warnings():
            if not is_verbose:
                warnings.filterwarnings("ignore", module=rf"({'|'.join(map(re.escape, THIRD_PARTY))})(\.|$)")
            yield
    finally:
        restore()
        _verbose = before
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _libraries(is_verbose: bool):
    """Set the verbosity of the libraries already imported (the env vars cover the ones imported later);
    returns the function that puts them back."""
    undo: list = []
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        if not is_verbose:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        undo += [lambda: hf_logging.set_verbosity(level), (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)]
    if "huggingface_hub" in sys.modules:  # imported before --verbose set its variable: the variable wins there
        from huggingface_hub import constants
        from huggingface_hub import utils as hub

        bars = not hub.are_progress_bars_disabled()
        if not is_verbose or not constants.HF_HUB_DISABLE_PROGRESS_BARS:
            (hub.enable_progress_bars if is_verbose else hub.disable_progress_bars)()
            undo.append(hub.enable_progress_bars if bars else hub.disable_progress_bars)
    if not is_verbose:
        for name in _LOGGERS:
            log = logging.getLogger(name)
            undo.append(lambda log=log, level=log.level: log.setLevel(level))
            log.setLevel(logging.ERROR)

    def restore() -> None:
        for fn in reversed(undo):
            fn()

    return restore


def changed_keys(cfg: Any, width: int = 60) -> str:
    """The config keys whose values differ from the defaults of its class, as `key=value` (dotted, in field
    order; a long list or table shortened). The whole resolved config is the run folder's config.json."""
    from tether.config import flat_keys, to_dict

    try:
        default = flat_keys(to_dict(type(cfg)()))
    except TypeError:  # a config class with required fields: show every key
        default = {}
    items = [f"{k}={_short(v, width)}" for k, v in flat_keys(to_dict(cfg)).items() if default.get(k, object()) != v]
    return "  ".join(items) if items else "(all defaults)"



def _short(v: Any, width: int) -> str:
    # as it would be typed: engine.lora.target_modules=q_proj,v_proj  track.wandb=true
    s = ",".join(map(str, v)) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) or v is None else str(v)
    return s if isinstance(v, str) or len(s) <= width else s[: width - 3] + "..."  # a path is shown whole


# beside the losses; PPO's reward as its samples show it (raw, before normalisation) where it logs that
_SHOWN = {"rm/accuracy": "accuracy", "rewards/raw_mean": "reward", "rewards/mean": "reward", "objective/kl": "kl"}


def progress_info(stage: str, metrics: dict[str, Any], rate: float) -> str | None:
    """A training step's numbers on the progress line: its losses (a single one, or the stage's own, as `loss`), the reward
    model's accuracy, PPO's reward and KL, and steps/s (rate, 0 = not known yet); None for a record with none
    of them (an evaluation's)."""
    losses = [k for k in metrics if k.startswith("loss/")]
    keys = {k: "loss" if len(losses) == 1 or k == f"loss/{stage}" else k.split("/")[-1] + "_loss" for k in losses[:2]}
    for k, n in _SHOWN.items():
        if k in metrics and n not in keys.values():
            keys[k] = n
    if not keys:
        return None
    return "  ".join([f"{n}={_number(metrics[k])}" for k, n in keys.items()] + [f"{rate:.3g} steps/s"] * (rate > 0))


def _number(v: Any) -> str:
    v = v.item() if hasattr(v, "item") else v
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def hint(e: BaseException) -> str:
    """The one line after an unexpected error's message: what to try."""
    if isinstance(e, ModuleNotFoundError):
        return f"the package {e.name!r} is not installed (scripts/setup.sh installs every extra); --verbose shows the traceback"
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return "lower batch_size or engine.micro_batch_size (or use a smaller model); --verbose shows the traceback"
    if isinstance(e, OSError) and "MB free on its disk" in str(e):
        return "free space on that disk, or keep fewer checkpoints (keep_checkpoints=1, save_every=0); --verbose shows the traceback"
    if isinstance(e, OSError):
        return "check the path and its permissions; --verbose shows the traceback"
    return "run again with --verbose for the traceback (and include it when you report a bug)"
