"""Rejection-sampling fine-tuning (expert iteration): sample N responses per prompt from the policy, score
them with a reward model or a reward function (a verifier: tether.rewards:exact_number), keep each prompt's
best (or every sample at or above min_reward), and fine-tune on them with `tether sft`'s loop; each
round samples from the last round's model (Llama 2's rejection sampling, Touvron et al. 2023; RAFT, Dong
et al. 2023).

    tether rsft model=runs/sft/final data.train=prompts.jsonl reward.fn=tether.rewards:exact_number min_reward=1 rounds=3 out=runs/rsft

Each round r writes out/round_<r>/samples.jsonl (every sample with its reward and whether it was kept),
sft.jsonl (the kept ones as SFT records), sft/ (the SFT run; sft/final is the round's model) and
round.json (its figures, written last). With `resume` (--resume) a finished round is not run again, so a
rerun goes on at the first unfinished one. out/final links to the last round's model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from typing import Literal

import torch

from tether.algo.common import require_examples, start_run, write_summary
from tether.algo.reward import RewardConfig, Rewards
from tether.algo.rl_config import RolloutConfig
from tether.algo.sft import SFTConfig
from tether.algo.sft import train as sft_train
from tether.atomic import atomic_write_text
from tether.cli import cli_main
from tether.config import ConfigError, RunConfig, check, doc, sub, to_dict
from tether.engine import make_engine
from tether.models import eos_ids, load_causal_lm, load_tokenizer
from tether.rollout import make_rollout
from tether.track import Tracker


@dataclass(frozen=True)
class RSFTConfig(RunConfig):
    rounds: int = doc(1, "sample -> select -> SFT rounds, each sampling from the previous round's model")
    samples_per_prompt: int = doc(8, "N: responses sampled per prompt")
    keep: Literal["best", "all"] = doc("best", "best: each prompt's highest-reward sample (RAFT, Llama 2); all: every sample that reaches min_reward")
    min_reward: float | None = doc(None, "keep only samples whose reward is at least this (a verifier's 1 = correct); none = no floor")
    prompts_per_round: int = doc(0, "prompts sampled each round, drawn anew per round (0 = every prompt)")
    prompts_per_batch: int = doc(16, "prompts per sampling call (x samples_per_prompt rows)")
    rollout: RolloutConfig = sub(RolloutConfig, "sampling")
    reward: RewardConfig = sub(RewardConfig, "the reward that ranks the samples: reward.model, reward.fn (it gets each prompt record's other fields) or reward.sources")

    def validate(self, p: str = "") -> None:
        super().validate(p)
        check(self.rounds > 0, f"{p}rounds", "must be positive")
        check(self.samples_per_prompt > 0, f"{p}samples_per_prompt", "must be positive")
        check(self.keep == "best" or self.min_reward is not None, f"{p}min_reward", "keep=all needs a floor (e.g. min_reward=1 for a verifier)")


def sample_and_score(model_dir: str, cfg: RSFTConfig, prompt_ids: list, texts: list, fields: list, chosen: list[int]) -> tuple[list, list[float]]:
    """samples_per_prompt responses for each chosen prompt through the Rollout seam, scored. -> (rollout rows, rewards)."""
    from tether.data import collate_prompts, pad_id

    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    rollout, pad = make_rollout(cfg.rollout.backend, make_engine(model, cfg.engine, None, trainable=False), tok), pad_id(tok)
    scorer = Rewards.build(cfg.reward, cfg.engine, tok, pad, eos_ids(tok, model), cfg.dropout, cfg.samples_per_prompt)
    rows, rewards = [], []
    for s in range(0, len(chosen), cfg.prompts_per_batch):
        idx = [i for i in chosen[s : s + cfg.prompts_per_batch] for _ in range(cfg.samples_per_prompt)]
        ro = rollout.generate(collate_prompts([prompt_ids[i] for i in idx], pad, [texts[i] for i in idx], [fields[i] for i in idx]), cfg.rollout).to("cpu")
        _, score, _ = scorer.score(ro)  # with reward.missing_eos_penalty: a cut response is not a demonstration
        rows += [(i, r, bool(f)) for i, r, f in zip(idx, ro.responses, ro.finished.tolist())]
        rewards += score.tolist()
    return rows, rewards


def select(rows: list, rewards: list[float], keep: str, min_reward: float | None) -> list[bool]:
    """Which samples become SFT data: each prompt's first highest-reward sample (best) or all, at or above min_reward.
    An empty response is never kept: it is no demonstration (and SFT refuses an empty completion)."""
    ok = [(min_reward is None or r >= min_reward) and bool(row[1].strip()) for row, r in zip(rows, rewards)]
    if keep == "all":
        return ok
    best: dict[int, int] = {}
    for j, (i, _, _) in enumerate(rows):
        if ok[j] and (i not in best or rewards[j] > rewards[best[i]]):
            best[i] = j
    return [j in set(best.values()) for j in range(len(rows))]


def train(cfg: RSFTConfig) -> dict:
    from tether.data import load_prompts, prompt_text, tokenize_prompts

    out, _ = start_run(cfg, "rsft")
    if not cfg.data.train:
        raise ConfigError("config key 'data.train': required (a prompt file)")
    prompts, report = load_prompts(cfg.data.train, cfg.data.on_bad_record)
    kept_idx: list[int] = []
    prompt_ids = require_examples(tokenize_prompts(prompts, load_tokenizer(cfg.model), cfg.data, report, kept_idx), cfg, report)
    examples = [prompts[i] for i in kept_idx]
    texts, fields = [prompt_text(e.prompt) for e in examples], [e.meta for e in examples]
    tracker = Tracker(out, cfg.track, to_dict(cfg), cfg.rounds, "rsft", resume=cfg.resume)
    base = SFTConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SFTConfig)})
    current, rounds = cfg.model, []
    for r in range(cfg.rounds):
        folder = out / f"round_{r}"
        chosen = list(range(len(prompt_ids)))
        if cfg.prompts_per_round and cfg.prompts_per_round < len(chosen):
            chosen = sorted(random.Random(cfg.seed * 1_000_003 + r).sample(chosen, cfg.prompts_per_round))
        done = folder / "round.json"
        if cfg.resume and done.exists():  # this round finished earlier: its model and figures stand
            rounds.append(json.loads(done.read_text()))
            current = rounds[-1]["model"]
            continue
        torch.manual_seed(cfg.seed * 1_000_003 + r)
        rows, rewards = sample_and_score(current, cfg, prompt_ids, texts, fields, chosen)
        kept = select(rows, rewards, cfg.keep, cfg.min_reward)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "samples.jsonl", "".join(json.dumps({"prompt": texts[i], "response": resp, "reward": w, "finished": f, "kept": k}) + "\n"
                                                            for (i, resp, f), w, k in zip(rows, rewards, kept)))
        demos = [{"messages": examples[i].prompt + [{"role": "assistant", "content": resp}]} if isinstance(examples[i].prompt, list)
                 else {"prompt": examples[i].prompt, "completion": resp} for (i, resp, _), k in zip(rows, kept) if k]
        stats = {"round": r, "reward_mean": sum(rewards) / len(rewards), "kept": len(demos), "samples": len(rows),
                 "prompts_kept": len({rows[j][0] for j in range(len(rows)) if kept[j]}) / len(chosen)}
        if cfg.min_reward is not None:
            stats["reward_at_least_min"] = sum(w >= cfg.min_reward for w in rewards) / len(rewards)
        if demos:  # nothing reached the floor: the model stays as it was for the next round
            atomic_write_text(folder / "sft.jsonl", "".join(json.dumps(d) + "\n" for d in demos))
            data = dataclasses.replace(cfg.data, train=str(folder / "sft.jsonl"), eval="", eval_fraction=0.0)
            summary = sft_train(dataclasses.replace(base, model=current, out=str(folder / "sft"), data=data, seed=cfg.seed + r, resume=cfg.resume))
            current = str(folder / "sft" / "final")
            stats["sft_loss"] = summary.get("loss/sft")
        else:
            tracker.event(f"rsft: round {r}: no sample reached min_reward={cfg.min_reward}; the model is unchanged")
        rounds.append(stats | {"model": current})
        atomic_write_text(done, json.dumps(rounds[-1]) + "\n")
        tracker.log(r + 1, {f"rsft/{k}": v for k, v in stats.items() if k != "round"}, force=True)
        tracker.event(f"rsft: round {r}: reward {stats['reward_mean']:.4g}, kept {len(demos)} of {len(rows)} samples, "
                      f"{100 * stats['prompts_kept']:.0f}% of prompts with a kept sample")
    tracker.close()
    link = out / "final.tmp"  # out/final: a link to the last round's model, not a second copy of its weights
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(current, out) if current != cfg.model else os.path.abspath(current))
    os.replace(link, out / "final")
    return write_summary(out, {"stage": "rsft", "rounds": rounds, "model": current, "reward_first": rounds[0]["reward_mean"], "reward_last": rounds[-1]["reward_mean"]})


def main(argv: list[str]) -> int:
    return cli_main(RSFTConfig, train, argv, "tether rsft", __doc__.strip().splitlines()[0])
