"""How the cost grows: seconds per step and peak memory, tether and TRL side by side, as the sequence
doubles (128 -> 1024 tokens on the 4x256 GPT-2) and as the model grows (4x256 -> 12x768, GPT-2-small's
shape, at 128 tokens); a table, and a log-log PNG.

    python -m benchmarks.growth                                  # sft, rm, dpo, rl; fp32; 3 memory modes; 35 min; table + runs/growth.png
    python -m benchmarks.growth --stages sft --seqs 128,256 --shapes 4x256 --steps 2   # a smoke run

Each point is one fresh subprocess per library and stage (benchmarks.compare.run_one, the same runners
and the same workload as the compare table, at that size), run for `--steps` optimizer steps (RL: GRPO in
both libraries, `--steps` iterations of 16 prompts x 4 samples generating seq/4 tokens). Seconds per step
are the loop time over the steps, so the first step's warm-up is in it for both libraries alike. The
largest trainable model in 24 GiB is extrapolated from the memory of the model sweep (a line through peak
MB against parameters, per library, stage and memory mode): a fit, printed as one, not a run at that size.
The model sweep runs once per memory mode (`--modes`): full fine-tuning, activation checkpointing, and
LoRA (rank 16, PEFT's default target modules, in both libraries).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import text_table
from benchmarks.compare import _fmt, have_trl, model_params, run_one
from benchmarks.workload import Workload, build

# stage -> (tether runner stage, TRL runner stage)
STAGES = {"sft": ("sft", "sft"), "rm": ("rm", "rm"), "dpo": ("dpo", "dpo"), "rl": ("grpo", "grpo")}
LIMIT_MB = 24 * 1024
# memory mode -> what it changes in the workload (both libraries)
MODES = {"full": {}, "ckpt": {"grad_ckpt": True}, "lora": {"lora_r": 16}}


def points(seqs: list[int], shapes: list[tuple[int, int]], modes: list[str] = ("full",)) -> list[tuple[str, str, Workload]]:
    """(axis, memory mode, workload): the sequence sweep in full fine-tuning, the model sweep once per mode."""
    from dataclasses import replace

    base = Workload()
    out = [("seq", "full", base.sized(seq=s)) for s in seqs]
    out += [("model", m, replace(base.sized(layers=la, hidden=h, heads=max(1, h // 64)), **MODES[m])) for m in modes for la, h in shapes]
    return out


def fit_largest(rows: list[dict], lib: str, stage: str, mode: str = "full") -> float | None:
    """Parameters at which the model sweep's peak memory in one memory mode, a least-squares line in the
    parameter count, reaches LIMIT_MB."""
    pts = [(r["params"], r[f"{lib}_mb"]) for r in rows
           if r["axis"] == "model" and r["stage"] == stage and r.get("mode", "full") == mode and r.get(f"{lib}_mb")]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(p for p, _ in pts) / n, sum(m for _, m in pts) / n
    slope = sum((p - mx) * (m - my) for p, m in pts) / max(1e-9, sum((p - mx) ** 2 for p, _ in pts))
    return None if slope <= 0 else mx + (LIMIT_MB - my) / slope


def table(rows: list[dict]) -> str:
    head = ("axis", "point", "mode", "params", "stage", "tether s/step", "TRL s/step", "speed-up", "tether MB", "TRL MB")
    lines = [head]
    for r in rows:
        t, b = r.get("tether_s"), r.get("trl_s")
        lines.append((r["axis"], r["point"], r.get("mode", "full"), f"{r['params'] / 1e6:.1f}M", r["stage"], _f(t), _f(b),
                      f"{b / t:.2f}x" if t and b else "-", _f(r.get("tether_mb"), 0), _f(r.get("trl_mb"), 0)))
    return text_table(lines)


def _f(x, p: int = 3) -> str:
    return f"{x:.0f}" if p == 0 and x is not None else _fmt(x, p)


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (axis, xkey, xlabel) in enumerate([("seq", "seq", "sequence length (tokens), 4x256 GPT-2"),
                                                ("model", "params", "matmul parameters, 128 tokens")]):
        for row, (ykey, ylabel) in enumerate([("s", "seconds per step"), ("mb", "peak memory (MB)")]):
            ax = axes[row][col]
            for i, stage in enumerate(STAGES):
                pts = sorted((r[xkey], r.get(f"tether_{ykey}"), r.get(f"trl_{ykey}")) for r in rows
                             if r["axis"] == axis and r["stage"] == stage and r.get("mode", "full") == "full")
                if not pts:
                    continue
                color = f"C{i}"
                ax.plot([p[0] for p in pts if p[1]], [p[1] for p in pts if p[1]], "o-", color=color, label=f"tether {stage}")
                if any(p[2] for p in pts):
                    ax.plot([p[0] for p in pts if p[2]], [p[2] for p in pts if p[2]], "s--", color=color, label=f"TRL {stage}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("tether (solid) vs TRL (dashed): cost as the work grows")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.growth", description=__doc__.strip().splitlines()[0])
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated: " + ",".join(STAGES))
    p.add_argument("--seqs", default="128,256,512,1024", help="sequence lengths for the 4x256 model")
    p.add_argument("--shapes", default="4x256,8x512,12x768", help="GPT-2 layers x width at 128 tokens")
    p.add_argument("--modes", default=",".join(MODES), help="memory modes of the model sweep: " + ",".join(MODES))
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (RL: iterations) per run")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--tether-only", action="store_true")
    p.add_argument("--png", default="runs/growth.png")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    for s in stages:
        if s not in STAGES:
            p.error(f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown memory mode {m!r}; choose from {', '.join(MODES)}")
    seqs = [int(s) for s in args.seqs.split(",") if s]
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",") if s]
    with_trl = have_trl() and not args.tether_only
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="tether-bench-runs-"))
    rows: list[dict] = []
    for k, (axis, mode, w) in enumerate(points(seqs, shapes, modes)):
        w = w.steps(args.steps)
        d = build(Path(tempfile.gettempdir()) / w.label(), w)
        params = sum(model_params(d))
        log(f"{axis}: {w.layers}x{w.hidden}, {w.max_length} tokens, {mode} ({params / 1e6:.1f}M matmul params)")
        for stage in stages:
            row = {"axis": axis, "mode": mode, "point": f"{w.layers}x{w.hidden}" if axis == "model" else f"{w.max_length} tok",
                   "seq": w.max_length, "params": params, "stage": stage}
            libs = ["tether", "trl"] if k % 2 == 0 else ["trl", "tether"]  # alternate, as compare does
            for lib in libs:
                if lib == "trl" and not with_trl:
                    continue
                r = run_one(lib, STAGES[stage][lib == "trl"], args.precision, d, w, work, log)
                if r is not None and r.get("steps"):
                    row[f"{lib}_s"] = r["wall_s"] / r["steps"]
                    row[f"{lib}_mb"] = r["peak_rss_mb"]
            rows.append(row)
    print(f"\ncost growth, {args.precision}, {args.steps} steps per run, {Workload().threads} threads")
    print(table(rows))
    fits = []
    for stage in stages:
        for lib in ("tether", "trl") if with_trl else ("tether",):
            sizes = {m: fit_largest(rows, lib, stage, m) for m in modes}
            if any(sizes.values()):
                fits.append(f"  {lib:6s} {stage:4s} " + "  ".join(f"{m} ~{n / 1e6:,.0f}M" if n else f"{m} -" for m, n in sizes.items()))
    if fits:
        print(f"\nlargest trainable model in {LIMIT_MB // 1024} GiB ({args.precision}, the model sweep's batches at 128 tokens; matmul "
              "parameters), a line through the model sweep's peak memory extrapolated, not a run:\n" + "\n".join(fits))
    plot(rows, Path(args.png))
    print(f"\nplot: {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
