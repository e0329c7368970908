"""tether vs TRL on exactly the same work: speed, memory and loss trajectories, side by side.

    pip install -r benchmarks/requirements.txt          # TRL, pinned (benchmark-only)
    python -m benchmarks.compare                        # every stage, fp32 and bf16, 3 alternating repeats
    python -m benchmarks.compare --stages sft,rm --repeats 5 --precision fp32
    python -m benchmarks.compare --stages kto,orpo,simpo   # the offline losses beside DPO
    python -m benchmarks.compare --stages grpo_loss     # algo=grpo|dr_grpo|dapo|gspo vs GRPOTrainer's loss types
    python -m benchmarks.compare --quick                # smoke test: few steps, one repeat (~2 min)

Each (library, stage, precision) run is a fresh subprocess (`benchmarks.run_tether` / `run_trl`), so peak
RSS is per run and model load is outside the in-process wall clock. The two libraries' runs of a pair
alternate (tether first on even repeats, TRL first on odd ones) so that load from other processes falls on
both. Ratios are tether throughput / TRL throughput per adjacent pair; the table shows their median and
[min, max]; the process columns time each whole subprocess as a user waits for it (start-up, imports,
loading, training, the post-training passes and saving). MFU is nominal model FLOPs (6N per trained token, 2N per forward-only token, N = matmul
parameters incl. the LM head) over the matmul rate measured at the start of this run with the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import text_table
from benchmarks.workload import Workload, build

STAGES = ("sft", "rm", "dpo", "orpo", "simpo", "kto", "rl", "grpo_loss")
# RL: tether's PPO (GAE critic) and its group baselines against TRL's online trainers.
RL_PAIRS = [("ppo", "rloo"), ("ppo", "grpo"), ("rloo", "rloo"), ("grpo", "grpo")]
# grpo_loss: `tether ppo algo=grpo|dr_grpo|dapo|gspo` against GRPOTrainer with the matching loss type
GRPO_LOSS_STAGES = ("algo_grpo", "dr_grpo", "dapo", "gspo")


def have_trl() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("trl") is not None
    except Exception:  # noqa: BLE001
        return False


def have_tether_stage(stage: str) -> bool:
    import importlib.util

    if stage in ("sft", "rm"):
        return True
    if stage in ("dpo", "orpo", "simpo", "kto"):
        return importlib.util.find_spec(f"tether.algo.{'kto' if stage == 'kto' else 'dpo'}") is not None
    return importlib.util.find_spec("tether.algo.ppo") is not None


def matmul_rate(threads: int, dtype_name: str, seconds: float = 1.5) -> float:
    """Practical matmul FLOP/s of this machine now: [1024, 256] @ [256, 1024]-shaped products (the model's)."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(2048, 256, dtype=dtype)
    b = torch.randn(256, 1024, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        dt = time.perf_counter() - t
        best = max(best, 10 * 2 * 2048 * 256 * 1024 / dt)
    return best


def model_params(d: Path) -> tuple[int, int]:
    """(matmul params of the backbone, of the LM head) of the workload's policy, counted on a meta-device copy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(d / "policy")))
    return linear_params(m)


def linear_params(m) -> tuple[int, int]:
    """(weights of every Linear and transformers Conv1D (GPT-2's) but the LM head, the LM head's, tied or not)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = m.get_output_embeddings()
    body = sum(x.weight.numel() for x in m.modules() if isinstance(x, (torch.nn.Linear, Conv1D)) and x is not head)
    return body, head.weight.numel()


def nominal_flops(r: dict, w: Workload, params: tuple[int, int]) -> float:
    body, head = params
    tokens = r.get("tokens", 0)
    stage = r["stage"]
    if stage == "sft":
        return 6 * (body + head) * tokens
    if stage == "rm":
        return 6 * body * tokens
    if stage == "dpo":
        return (6 + 2) * (body + head) * tokens  # policy fwd+bwd, reference fwd
    if stage in ("orpo", "simpo"):
        return 6 * (body + head) * tokens  # policy fwd+bwd, no reference
    if stage == "kto":
        # policy fwd+bwd, reference fwd, and both models' no-grad forward on the batch's mismatched pairs
        return (6 + 2 + 2 + 2) * (body + head) * tokens
    # RL: sampling (1 forward per generated token), then reward, ref, old-policy passes and one update
    # over prompt+response tokens (prompt ~32 per sample).
    gen = r.get("gen_tokens", 0)
    seq = gen + r.get("samples", 0) * sum(w.prompt_len) // 2
    critic = 2 + 6 if stage == "ppo" else 0
    if stage in ("dapo", "gspo"):  # no KL term: the reference pass is TRL-skipped work (tether still logs KL)
        return 2 * (body + head) * gen + (2 + 6) * (body + head) * seq + 2 * body * seq
    return 2 * (body + head) * gen + (2 + 2 + 6) * (body + head) * seq + (2 + critic) * body * seq


def run_one(lib: str, stage: str, precision: str, d: Path, w: Workload, work: Path, log) -> dict | None:
    out = work / f"{lib}-{stage}-{precision}-{time.time_ns()}.json"
    # a scratch folder per run: a repeat must not find the previous run's outputs (DPO's reference-logprob cache)
    cmd = [sys.executable, "-m", f"benchmarks.run_{lib}", "--stage", stage, "--dir", str(d), "--precision", precision,
           "--out", str(out), "--work", str(work / out.stem), "--workload", w.to_json()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(Workload().threads), CI="1")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(Path(__file__).resolve().parent.parent), env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        log(f"  {lib} {stage} {precision}: FAILED (rc {proc.returncode})\n" + proc.stderr[-3000:])
        return None
    r = json.loads(out.read_text())
    r["whole_s"] = time.perf_counter() - t  # as the user waits: interpreter, imports, loading, training, saving
    shutil.rmtree(work / out.stem, ignore_errors=True)  # the run's saved model: 2 GB a run at 135M (a failed run's stays)
    log(f"  {lib:6s} {stage:5s} {precision}: {r['wall_s']:7.1f}s loop, {r['whole_s']:6.1f}s process, "
        f"peak {r['peak_rss_mb']:.0f} MB, loss {_fmt(_first(r))} -> {_fmt(_last(r))}")
    return r


def _first(r: dict):
    ls = [x for x in r.get("losses", []) if x is not None]
    return ls[0] if ls else None


def _last(r: dict):
    ls = [x for x in r.get("losses", []) if x is not None]
    return ls[-1] if ls else None


def _fmt(x, p: int = 4) -> str:
    return "-" if x is None else f"{x:.{p}g}"


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarise(rows: list[tuple[str, str, str, list[dict], list[dict]]], w: Workload, rates: dict[str, float], params: tuple[int, int]) -> str:
    """rows: (label, tether_stage, precision, tether runs, trl runs) -> the table as text."""
    head = ("stage", "prec", "tether s", "TRL s", "speed-up t/TRL med [min-max]", "process s t|TRL", "process speed-up", "CPU-s speed-up", "samples/s t|TRL", "tok/s t|TRL",
            "gen tok/s t|TRL", "peak MB t|TRL", "MFU t|TRL", "loss0 t|TRL", "loss_end t|TRL")
    lines = [head]
    for label, _stage, prec, ts, rs in rows:
        tw = [r["wall_s"] for r in ts]
        rw = [r["wall_s"] for r in rs]
        ratios = [b["wall_s"] / a["wall_s"] * (a["samples"] / b["samples"]) for a, b in zip(ts, rs)] if rs else []
        # samples per second; equal work means equal samples, so the speed-up is the time ratio
        def rate(runs, key):
            vals = [r.get(key, 0) / r["wall_s"] for r in runs if r["wall_s"] > 0]
            return _med(vals) if vals else None

        def mfu(runs):
            vals = [nominal_flops(r, w, params) / r["wall_s"] / rates[prec] for r in runs if r["wall_s"] > 0]
            return _med(vals) if vals else None

        def pair(a, b, p=3, pct=False):
            f = (lambda x: "-" if x is None else f"{100 * x:.1f}%") if pct else (lambda x: _fmt(x, p))
            return f"{f(a)} | {f(b)}" if rs else f(a)

        sp = f"{_med(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]" if ratios else "-"
        cpu_ratios = [b["cpu_s"] / a["cpu_s"] * (a["samples"] / b["samples"]) for a, b in zip(ts, rs) if a.get("cpu_s") and b.get("cpu_s")]
        cpu_sp = f"{_med(cpu_ratios):.2f}x [{min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}]" if cpu_ratios else "-"
        whole = [b["whole_s"] / a["whole_s"] for a, b in zip(ts, rs) if a.get("whole_s") and b.get("whole_s")]
        whole_sp = f"{_med(whole):.2f}x [{min(whole):.2f}-{max(whole):.2f}]" if whole else "-"
        gen_t = rate(ts, "gen_tokens") if ts and ts[0].get("gen_tokens") else None
        gen_r = rate(rs, "gen_tokens") if rs and rs[0].get("gen_tokens") else None
        lines.append((
            label, prec, f"{_med(tw):.1f}", f"{_med(rw):.1f}" if rw else "-", sp,
            pair(_med([r.get("whole_s", 0.0) for r in ts]), _med([r.get("whole_s", 0.0) for r in rs]) if rs else None, 3), whole_sp, cpu_sp,
            pair(rate(ts, "samples"), rate(rs, "samples") if rs else None, 3),
            pair(rate(ts, "tokens"), rate(rs, "tokens") if rs else None, 4),
            pair(gen_t, gen_r, 4) if (gen_t or gen_r) else "-",
            pair(_med([r["peak_rss_mb"] for r in ts]), _med([r["peak_rss_mb"] for r in rs]) if rs else None, 4),
            pair(mfu(ts), mfu(rs) if rs else None, pct=True),
            pair(_first(ts[0]), _first(rs[0]) if rs else None, 6),
            pair(_last(ts[0]), _last(rs[0]) if rs else None, 5),
        ))
    return text_table(lines)


def phases_text(runs: dict) -> str:
    lines = []
    for (lib, stage, prec), rs in sorted(runs.items()):
        ph = [r.get("phases") or {} for r in rs]
        if lib != "tether" or stage not in ("ppo", "rloo", "grpo", *GRPO_LOSS_STAGES) or not ph or not ph[0]:
            continue
        keys = sorted({k for p in ph for k in p})
        wall = _med([r["wall_s"] for r in rs])
        parts = [f"{k} {_med([p.get(k, 0.0) for p in ph]):.1f}s ({100 * _med([p.get(k, 0.0) for p in ph]) / wall:.0f}%)" for k in keys]
        lines.append(f"  tether {stage} {prec} (loop {wall:.1f}s): " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.strip().splitlines()[0])
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated: " + ",".join(STAGES))
    p.add_argument("--repeats", type=int, default=None, help="alternating runs per library and stage (default 3; 1 with --quick)")
    p.add_argument("--precision", default="auto", help="comma-separated: fp32,bf16 (auto: fp32, and bf16 where the CPU has bf16 instructions)")
    p.add_argument("--quick", action="store_true", help="few steps, one repeat: a smoke test of the harness")
    p.add_argument("--tether-only", action="store_true", help="do not run TRL even if it is installed")
    p.add_argument("--dir", default="", help="workload folder (default: a cached folder in the temp dir)")
    p.add_argument("--json", default="", help="also write every run's record to this file")
    p.add_argument("--model", default="gpt2", choices=["gpt2", "smollm2"],
                   help="gpt2: the random 4x256 GPT-2 (or --shape); smollm2: the real SmolLM2-135M-Instruct (chat template)")
    p.add_argument("--shape", default="", help="GPT-2 layers x width, e.g. 12x768 (heads: width / 64)")
    p.add_argument("--seq", type=int, default=0, help="longest sequence in tokens (default 128; prompt ~5/16, response ~1/2 of it)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank in both libraries (0: full fine-tuning)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run (RL: iterations); default the workload's 50 (RL 10)")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    precs = [s.strip() for s in args.precision.split(",") if s.strip()]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if precs == ["auto"]:
        from tether.models import cpu_has_bf16

        precs = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
        if len(precs) == 1:
            import torch

            log(f"bf16 rows skipped: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 instructions, so torch "
                "emulates bf16 matmuls (~100x slower than fp32) for both libraries; --precision fp32,bf16 runs them anyway")
    for s in stages:
        if s not in STAGES:
            p.error(f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
    repeats = args.repeats or (1 if args.quick else 3)
    w = workload_of(args)
    with_trl = have_trl() and not args.tether_only
    if not with_trl:
        log("TRL is not installed (pip install -r benchmarks/requirements.txt): tether only")
    d = Path(args.dir or Path(tempfile.gettempdir()) / w.label())
    build(d, w)
    params = model_params(d)
    work = Path(tempfile.mkdtemp(prefix="tether-bench-runs-"))
    rates = {pr: matmul_rate(w.threads, pr) for pr in precs}
    log("matmul rate (2048x256 @ 256x1024, %d threads): " % w.threads + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()))

    # (label, tether stage, trl stage)
    plan: list[tuple[str, str, str | None]] = []
    for s in stages:
        if s == "rl":
            plan += [(f"rl:{a}~{b}", a, b) for a, b in RL_PAIRS]
        elif s == "grpo_loss":
            plan += [(f"rl:{a}", a, a) for a in GRPO_LOSS_STAGES]
        else:
            plan.append((s, s, s))
    runs: dict[tuple[str, str, str], list[dict]] = {}
    pairs: dict[tuple[str, str], list[tuple[dict, dict | None]]] = {}
    done_tether: dict[tuple[str, str, int], dict] = {}
    done_trl: dict[tuple[str, str, int], dict] = {}
    for rep in range(repeats):
        for label, ts, rs in plan:
            if not have_tether_stage(ts):
                log(f"  tether has no {ts} stage yet: skipping {label}")
                continue
            for prec in precs:
                order = ["tether", "trl"] if rep % 2 == 0 else ["trl", "tether"]
                for lib in order:
                    if lib == "trl" and not with_trl:
                        continue
                    stage = ts if lib == "tether" else rs
                    cache = done_tether if lib == "tether" else done_trl
                    if (stage, prec, rep) in cache:  # an RL run shared by two pairs
                        continue
                    r = run_one(lib, stage, prec, d, w, work, log)
                    cache[(stage, prec, rep)] = r
                    if r is not None:
                        runs.setdefault((lib, stage, prec), []).append(r)
                a = done_tether.get((ts, prec, rep))
                b = done_trl.get((rs, prec, rep)) if with_trl else None
                if a is not None:
                    pairs.setdefault((label, prec), []).append((a, b))

    rows = []
    for label, ts, _rs in plan:
        for prec in precs:
            ps = pairs.get((label, prec), [])
            if not ps:
                continue
            tl = [a for a, _ in ps]
            rl = [b for _, b in ps if b is not None] if with_trl else []
            if with_trl and len(rl) != len(tl):
                tl = [a for a, b in ps if b is not None]
            rows.append((label, ts, prec, tl, rl))
    print(f"\ntether vs TRL {_trl_version() if with_trl else '(not installed)'}, torch {_torch_version()}, "
          f"{w.threads} threads, {repeats} repeat(s){' (quick)' if args.quick else ''}; {describe(w, params)}; "
          "matmul " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
    print(summarise(rows, w, rates, params))
    ph = phases_text(runs)
    if ph:
        print("\nRL phase split (median seconds, share of the loop):\n" + ph)
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": rates, "runs": {"|".join(k): v for k, v in runs.items()}}, indent=1))
    return 0


def workload_of(args) -> Workload:
    w = Workload(model=args.model, lora_r=args.lora)
    if args.shape:
        layers, hidden = (int(x) for x in args.shape.lower().split("x"))
        w = w.sized(layers=layers, hidden=hidden, heads=max(1, hidden // 64))
    if args.seq:
        w = w.sized(seq=args.seq)
    if args.quick:
        w = w.quick()
    if args.steps:
        w = w.steps(args.steps)
    return w


def describe(w: Workload, params: tuple[int, int]) -> str:
    model = "SmolLM2-135M-Instruct" if w.model == "smollm2" else f"GPT-2 {w.layers}x{w.hidden}"
    lora = f", LoRA r={w.lora_r}" if w.lora_r else ", full fine-tuning"
    return f"{model} ({(params[0] + params[1]) / 1e6:.1f}M matmul params), sequences <= {w.max_length} tokens{lora}"


def _trl_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("trl")
    except Exception:  # noqa: BLE001
        return "?"


def _torch_version() -> str:
    import importlib.metadata as md

    return md.version("torch")


if __name__ == "__main__":
    sys.exit(main())
