"""One TRL stage on the fixed workload, in this process; writes a result JSON (benchmark-only dependency).

    python -m benchmarks.run_trl --stage sft --dir /tmp/tether-bench --out r.json [--precision bf16]

Settings that define the workload are set to tether's values (data order, batch, lr, AdamW betas/eps,
weight decay 0, constant schedule, no warm-up, clip 1.0, seed, max length, dropout 0, no activation
checkpointing); everything else is TRL's default. The only change to TRL's behaviour is a sequential sampler, so both libraries see the
same examples in the same order (TRL shuffles by default; tether is run with data.shuffle=false).
The clock starts at `on_train_begin` (after model load and tokenisation) and stops at the last
`on_step_end`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Clock, current_rss_mb, pair_tokens, runner_args, setup_threads, sft_tokens, write_result
from benchmarks.workload import Workload


def _callback(clock: Clock, record: dict):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            record.setdefault("rss_before_loop_mb", current_rss_mb())
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "train_runtime" not in logs:
                record["metrics"].append({k: v for k, v in logs.items() if isinstance(v, (int, float))})

    return Timer()


def _sequential(cls):
    """`cls` with a sequential sampler (same order as tether with data.shuffle=false)."""
    from torch.utils.data import SequentialSampler

    class Seq(cls):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    Seq.__name__ = cls.__name__
    return Seq


def _args(w: Workload, out: Path, precision: str, steps: int, batch: int, lr: float | None = None) -> dict:
    return dict(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=lr or w.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=w.betas[0], adam_beta2=w.betas[1], adam_epsilon=w.eps, max_grad_norm=w.grad_clip,
        seed=w.seed, data_seed=w.seed, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        bf16=precision == "bf16", dataloader_num_workers=0, disable_tqdm=True,
        # TRL's default is activation checkpointing (a forward recomputed in every backward); tether's is
        # off. The workload sets it for both sides, so the compute is the same and memory compares like for like.
        gradient_checkpointing=w.grad_ckpt,
    )


def _peft(w: Workload, task: str) -> dict:
    """TRL's peft_config for a LoRA workload, as tether's engine.lora sets it: rank lora_r, alpha 16, no
    dropout, PEFT's default target modules; a reward model's score head trained in full (SEQ_CLS)."""
    if not w.lora_r:
        return {}
    from peft import LoraConfig

    return {"peft_config": LoraConfig(r=w.lora_r, lora_alpha=16, lora_dropout=0.0, bias="none", task_type=task)}


def _dataset(file: Path):
    from datasets import Dataset

    return Dataset.from_list([json.loads(line) for line in open(file)])


def run(stage: str, d: Path, precision: str, w: Workload, work: Path) -> dict:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    setup_threads(w.threads)
    torch.manual_seed(w.seed)
    clock = Clock()
    record: dict = {"lib": "trl", "stage": stage, "precision": precision, "metrics": []}
    out = work / f"trl-{stage}-{precision}"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d / "policy"))
    cb = _callback(clock, record)

    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**_args(w, out, precision, w.sft_steps, w.sft_batch), max_length=w.max_length)
        _train_policy(SFTTrainer, args, d / "sft.jsonl", d, tok, cb, w)
        seq, tgt = sft_tokens(d, w.sft_steps * w.sft_batch)
        record |= {"samples": w.sft_steps * w.sft_batch, "tokens": seq, "target_tokens": tgt}
    elif stage == "rm":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(str(d / "reward"), num_labels=1, dtype=torch.float32)
        args = RewardConfig(**_args(w, out, precision, w.rm_steps, w.rm_batch), max_length=w.max_length)
        trainer = _sequential(RewardTrainer)(model=model, args=args, train_dataset=_dataset(d / "prefs.jsonl"), processing_class=tok,
                                             callbacks=[cb], **_peft(w, "SEQ_CLS"))
        _train_and_save(trainer)
        record |= {"samples": w.rm_steps * w.rm_batch, "tokens": pair_tokens(d, w.rm_steps * w.rm_batch)}
    elif stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**_args(w, out, precision, w.dpo_steps, w.dpo_batch), max_length=w.max_length, beta=w.dpo_beta)
        _train_policy(DPOTrainer, args, d / "prefs.jsonl", d, tok, cb, w, reference=True)
        record |= {"samples": w.dpo_steps * w.dpo_batch, "tokens": pair_tokens(d, w.dpo_steps * w.dpo_batch)}
    elif stage in ("orpo", "simpo"):
        _train_policy(*_reference_free(stage, w, out, precision), d / "prefs.jsonl", d, tok, cb, w)
        record |= {"samples": w.dpo_steps * w.dpo_batch, "tokens": pair_tokens(d, w.dpo_steps * w.dpo_batch)}
    elif stage == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**_args(w, out, precision, w.kto_steps, w.kto_batch), max_length=w.max_length, beta=w.kto_beta)
        _train_policy(KTOTrainer, args, d / "kto.jsonl", d, tok, cb, w, reference=True)
        seq, tgt = sft_tokens(d, w.kto_steps * w.kto_batch, "kto.jsonl")
        record |= {"samples": w.kto_steps * w.kto_batch, "tokens": seq, "target_tokens": tgt}
    elif stage in ("rloo", "grpo", *GRPO_LOSSES):
        _run_online(stage, w, d, out, precision, tok, cb, record)
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    record |= {"wall_s": clock.wall, "cpu_s": clock.cpu, "steps": len(clock.step_ends), "phases": clock.phases}
    record["losses"] = [m.get("loss") for m in record["metrics"]]
    return record


def _train_and_save(trainer) -> None:
    """Train, then save the model as a user would (tether saves its final weights too; the loop clock has
    stopped by then, the process time includes it)."""
    trainer.train()
    trainer.save_model()


def _train_policy(trainer_cls, args, data: Path, d: Path, tok, cb, w: Workload, reference: bool = False) -> None:
    """One TRL trainer on the workload's policy (float32) and `data`, with a second copy of it as the frozen
    reference where the method has one (DPO, KTO: TRL's default precompute_ref_log_probs=False keeps it loaded);
    under LoRA the reference is the policy with its adapters off, in TRL as in tether."""
    import torch
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(str(d / "policy"), dtype=torch.float32)

    model = load()
    extra = _peft(w, "CAUSAL_LM") or ({"ref_model": load()} if reference else {})
    trainer = _sequential(trainer_cls)(model=model, args=args, train_dataset=_dataset(data), processing_class=tok, callbacks=[cb], **extra)
    _train_and_save(trainer)


def _reference_free(stage: str, w: Workload, out: Path, precision: str) -> tuple:
    """(trainer class, args) for ORPO (trl.experimental.orpo) and SimPO, which TRL 1.16 runs as CPOTrainer
    with loss_type="simpo" and cpo_alpha=0 (no behaviour-cloning term: the SimPO loss alone, as tether's loss=simpo)."""
    common = dict(**_args(w, out, precision, w.dpo_steps, w.dpo_batch), max_length=w.max_length)
    if stage == "orpo":
        from trl.experimental.orpo import ORPOConfig as Cfg, ORPOTrainer as Tr

        args = Cfg(**common, beta=w.orpo_lambda)
    else:
        from trl.experimental.cpo import CPOConfig as Cfg, CPOTrainer as Tr

        args = Cfg(**common, loss_type="simpo", cpo_alpha=0.0, beta=w.simpo_beta, simpo_gamma=w.simpo_gamma)
    return Tr, args


# GRPOTrainer's loss types set as tether's `algo=` presets set them (rl_tether.ALGO_STAGES): GRPO's
# per-sequence mean with k3 KL at beta 0.04; Dr. GRPO without std scaling, over max_completion_length;
# DAPO's token mean and clip-higher without KL; GSPO's sequence ratio with its 3e-4/4e-4 clip.
GRPO_LOSSES = {
    "algo_grpo": dict(loss_type="grpo", beta=0.04),
    "dr_grpo": dict(loss_type="dr_grpo", scale_rewards="none", beta=0.04),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28, beta=0.0),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, beta=0.0),
}


def _run_online(stage: str, w: Workload, d: Path, out: Path, precision: str, tok, cb, record: dict) -> None:
    """RLOO / GRPO: per iteration 16 prompts x 4 samples = one optimizer step of 64 completions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    n = w.rl_prompts * w.rl_samples
    common = dict(
        **_args(w, out, precision, w.rl_iterations, n, lr=w.rl_lr),
        num_generations=w.rl_samples, max_completion_length=w.rl_new_tokens, temperature=w.rl_temperature,
        beta=w.rl_kl_coef, num_iterations=1, steps_per_generation=1,
    )
    model = AutoModelForCausalLM.from_pretrained(str(d / "policy"), dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(str(d / "reward"), num_labels=1, dtype=torch.float32)
    prompts = _dataset(d / "prompts.jsonl")
    if stage == "rloo":
        from trl import RLOOConfig as Cfg, RLOOTrainer as Tr
    else:
        from trl import GRPOConfig as Cfg, GRPOTrainer as Tr
    cfg = Cfg(**(common | GRPO_LOSSES.get(stage, {})))
    trainer = _sequential(Tr)(model=model, reward_funcs=rm, args=cfg, train_dataset=prompts, processing_class=tok, callbacks=[cb],
                              **_peft(w, "CAUSAL_LM"))
    _train_and_save(trainer)
    lens = [m.get("completions/mean_length", 0.0) for m in record["metrics"]]
    record["gen_tokens"] = int(round(sum(lens) * n))
    record["samples"] = w.rl_iterations * n
    record["tokens"] = record["gen_tokens"]
    record["rewards"] = [m.get("reward") for m in record["metrics"]]


def main(argv: list[str] | None = None) -> int:
    args = runner_args(argv, "trl")
    work = Path(args.work or tempfile.mkdtemp(prefix="trl-bench-"))
    t = time.perf_counter()
    result = run(args.stage, Path(args.dir), args.precision, args.w, work)
    result["process_s"] = time.perf_counter() - t
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
