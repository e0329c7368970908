"""The `tether` command.

Each sub-command lives in its own module and is imported only when it is run, so `tether label`
never imports torch and `tether --help` is instant. A sub-command module exposes `main(argv) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

# name -> (module:function, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("tether.algo.pretrain:main", "train a tokenizer and a small GPT from scratch on a text corpus"),
    "sft": ("tether.algo.sft:main", "supervised fine-tuning on demonstrations"),
    "rm": ("tether.algo.rm:main", "train a reward model on preference pairs (Bradley-Terry)"),
    "dpo": ("tether.algo.dpo:main", "offline preference optimisation on pairs (DPO / IPO / cDPO / R-DPO / SimPO / ORPO)"),
    "kto": ("tether.algo.kto:main", "Kahneman-Tversky optimisation on unpaired desirable / undesirable examples"),
    "ppo": ("tether.algo.ppo:main", "PPO against a reward model with a KL penalty to the reference"),
    "rsft": ("tether.algo.rsft:main", "rejection-sampling fine-tuning: SFT on the best of N samples under a reward or verifier, in rounds"),
    "generate": ("tether.generate:main", "sample from a checkpoint, writing jsonl"),
    "serve": ("tether.serve:main", "an OpenAI-compatible HTTP server for a checkpoint or a reward model"),
    "pipeline": ("tether.algo.pipeline:main", "run SFT -> RM -> PPO (or SFT -> DPO) in order, resumable"),
    "loop": ("tether.loop.run:main", "iterative RLHF: rounds of sample -> label -> reward model -> policy, resumable"),
    "demo": ("tether.demo.sentiment:main", "the controlled-sentiment RLHF experiment, end to end on a CPU"),
    "redteam": ("tether.redteam:main", "collect a red-team policy's findings against a target: failing prompts, preference tasks"),
    "eval": ("tether.eval.cli:main", "reward-model, policy, sycophancy and preference-data reports"),
    "ai": ("tether.ai.cli:main", "AI feedback: label preference pairs with a judge model and a constitution"),
    "label": ("tether.feedback.cli:main", "the annotation web app: serve, import, generate, export"),
    "model": ("tether.models_cli:main", "model utilities (import-gguf, info)"),
}


def parse_cli(cls, argv: list[str], prog: str, description: str):
    """`tether <stage> [--config cfg.yaml] [--resume] [key=value ...]` -> config."""
    from tether.config import config_help, load_config

    epilog = "config keys (set in YAML or as key=value):\n" + "\n".join(config_help(cls))
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", "-c", help="YAML config file")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in `out`")
    parser.add_argument("--verbose", action="store_true", help="a Python traceback instead of the one-line error")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4")
    args = parser.parse_intermixed_args(argv)  # flags may come after key=value overrides
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=true")
    return load_config(cls, args.config, overrides)


def user_errors() -> tuple[type[Exception], ...]:
    """What a user can cause (a config key, a data record, a model folder): one line, exit 2."""
    from tether.config import ConfigError
    from tether.data.records import DataError
    from tether.models import ModelError

    return ConfigError, DataError, ModelError


def one_line(prog: str, run: Callable[[], object], verbose: bool = False) -> int:
    """run(); a user error is `prog: message` on stderr, exit 2 (a traceback with --verbose); a run a
    guard stopped (config.RunStopped) exits 3."""
    from tether.config import RunStopped

    from tether.terminal import verbose as verbose_flag

    try:
        return int(run() or 0)
    except (*user_errors(), RunStopped) as e:
        if verbose or verbose_flag():
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        return 3 if isinstance(e, RunStopped) else 2


def cli_main(cls, run: Callable, argv: list[str], prog: str, description: str) -> int:
    """A stage's entry point: parse, run; a bad config, data record or model folder is one line (exit 2)."""
    return one_line(prog, lambda: run(parse_cli(cls, argv, prog, description)) and 0, verbose="--verbose" in argv)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tether <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run `tether <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from tether import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tether: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from tether.terminal import hint, quiet

    verbose = "--verbose" in rest  # every command takes it, anywhere on its line
    rest = [a for a in rest if a != "--verbose"]
    module_name, func_name = COMMANDS[name][0].split(":")
    with quiet(verbose):
        try:
            func = getattr(importlib.import_module(module_name), func_name)
            return int(func(rest) or 0)
        except KeyboardInterrupt:
            if verbose:
                raise
            print(f"tether {name}: interrupted (a training stage continues from its last checkpoint with --resume)", file=sys.stderr)
            return 130
        except Exception as e:  # a user's mistake is already one line (one_line); this is everything else
            if verbose:
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"tether {name}: {type(e).__name__}{': ' + first if first else ''}\n  hint: {hint(e)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
