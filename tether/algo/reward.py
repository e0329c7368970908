"""The reward of a rollout (PPO's step 2): a frozen reward model from `tether rm`, normalised with the
statistics it saved (Ziegler et al. 2019), or a Python function (tether.rewards), or several named
sources combined; then optional clipping and a penalty for a response that never reached EOS (Huang et
al. 2024's "EOS trick"). A reward model scores a response as it was trained (`models.as_trained`: a cut
response gets its EOS), so that an eval score is the score PPO sees.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tether.advantages import combine_rewards
from tether.config import ConfigError, check, doc
from tether.engine import make_engine
from tether.models import as_trained, disable_dropout, load_reward_stats, load_scalar_model, load_tokenizer, reward_heads, sequence_scores
from tether.types import RolloutBatch, prompt_groups


@dataclass(frozen=True)
class RewardSource:
    name: str = doc("", "its name in the logs: rewards/<name>/mean, .../std, .../contribution")
    model: str = doc("", "a reward model folder from `tether rm`")
    head: str = doc("", "which head of a multi-objective reward model (`tether rm heads=[...]`) this source reads")
    fn: str = doc("", "or a Python reward: package.module:function(prompts, responses, **kwargs) -> floats")
    kwargs: dict = doc({}, "keyword arguments passed to fn")
    weight: float = doc(1.0, "its weight in the combined reward (negative = a penalty)")
    normalize: Literal["auto", "stats", "batch", "none"] = doc("auto", "stats: (r - mean) / std with the statistics saved by `tether rm`; batch: over each rollout batch; none; auto = stats for a model, none for a function")
    clip: float = doc(0.0, "clip the normalised score to [-clip, clip] (0 = off)")

    def validate(self, p: str) -> None:
        check(self.name.replace("_", "").replace("-", "").isalnum(), f"{p}name", "required: letters, digits, _ or - (it names the logged metrics)")
        check(bool(self.model) != bool(self.fn), f"{p}model", "set exactly one of model (a reward model folder) and fn (module:function)")
        check(self.normalize != "stats" or bool(self.model), f"{p}normalize", "stats needs a reward model (fn has no saved statistics)")
        check(not self.head or bool(self.model), f"{p}head", "names a head of a reward model; set model too")
        check(self.clip >= 0, f"{p}clip", "must be >= 0")

    @property
    def mode(self) -> str:
        return ("stats" if self.model else "none") if self.normalize == "auto" else self.normalize


@dataclass(frozen=True)
class RewardConfig:
    model: str = doc("", "reward model folder from `tether rm` (its tether_reward.json holds the normalisation statistics)")
    fn: str = doc("", "a Python reward instead of a model: package.module:function(prompts, responses, **kwargs) -> floats")
    kwargs: dict = doc({}, "keyword arguments passed to reward.fn")
    normalize: bool = doc(True, "score = (r - mean) / std with the statistics saved by `tether rm` (Ziegler et al. 2019)")
    clip: float = doc(0.0, "clip the normalised score to [-clip, clip] (0 = off)")
    missing_eos_penalty: float = doc(1.0, "subtract this from the score of a response that never reached EOS (Huang et al. 2024's 'EOS trick'; 0 = off); the RM scores such a response with EOS appended, as it was trained (models.as_trained)")
    sources: list[RewardSource] = doc([], "several named rewards instead of model/fn, e.g. [{name: helpful, model: runs/rm/final}, {name: brevity, fn: tether.rewards:length_penalty, weight: 0.3}]")
    combine: Literal["sum", "gdpo"] = doc("sum", "several sources: sum = the weighted sum of their normalised scores; gdpo = each normalised within its prompt's samples first (Liu et al. 2026; needs samples_per_prompt >= 2)")

    def validate(self, p: str) -> None:
        check((bool(self.model) + bool(self.fn) + bool(self.sources)) == 1, f"{p}model",
              "set exactly one of reward.model (a reward model folder), reward.fn (module:function) and reward.sources (a list)")
        names = [s.name for s in self.sources]
        check(len(set(names)) == len(names), f"{p}sources", f"each source needs its own name; got {names}")
        check(self.clip >= 0, f"{p}clip", "must be >= 0")
        check(self.missing_eos_penalty >= 0, f"{p}missing_eos_penalty", "must be >= 0")


class Scorer:
    """One source's raw scores: a frozen reward-model engine (one of its heads, for a multi-objective
    model) or a Python reward function -> [B]."""

    def __init__(self, cfg: RewardConfig, engine=None, fn=None, tokenizer=None, rm_tokenizer=None, eos: list[int] | None = None, head: int | None = None):
        self.cfg, self.engine, self.fn, self.head = cfg, engine, fn, head
        self.eos = set(eos or [])
        self.tok, self.rm_tok = tokenizer, rm_tokenizer
        self.stats = load_reward_stats(cfg.model) if cfg.model else {"mean": 0.0, "std": 1.0}
        if head is not None:  # a multi-objective model saves one mean and std per head
            self.stats = {"mean": self.stats["mean"][head], "std": self.stats["std"][head]}

    @classmethod
    def build(cls, cfg: RewardConfig, engine_cfg, tokenizer, pad: int, eos: list[int], dropout: bool = False, head: str = "", what: str = "reward.model") -> "Scorer":
        """The reward model (cfg.model) as a frozen engine (rm_tok: its own tokenizer when it differs), or the function."""
        if not cfg.model:
            from tether.rewards import load_reward_fn

            return cls(cfg, fn=load_reward_fn(cfg.fn), tokenizer=tokenizer, eos=eos)
        names = reward_heads(cfg.model)
        if head and head not in names:
            raise ConfigError(f"config key '{what}': {cfg.model} has " + (f"the heads {', '.join(names)}, not {head!r}" if names else f"one unnamed head; drop head: {head}"))
        if names and not head:
            raise ConfigError(f"config key '{what}': {cfg.model} has the heads {', '.join(names)}; read one as a reward source: "
                              f"reward.sources=[{{name: {names[0]}, model: {cfg.model}, head: {names[0]}}}, ...]")
        rm = load_scalar_model(cfg.model, pad_token_id=pad)
        disable_dropout(rm, dropout)
        other = load_tokenizer(cfg.model)
        return cls(cfg, make_engine(rm, engine_cfg, None, trainable=False), None, tokenizer,
                   None if other.get_vocab() == tokenizer.get_vocab() else other, eos, names.index(head) if head else None)

    def raw(self, ro: RolloutBatch) -> Tensor:
        if self.fn is not None:
            from tether.rewards import call_reward_fn

            R = ro.response_mask.shape[1]
            resp = ro.sequences[:, -R:].tolist()
            ids = [[t for t, m in zip(row, mask) if m and t not in self.eos] for row, mask in zip(resp, ro.response_mask.tolist())]
            return torch.tensor(call_reward_fn(self.fn, ro.prompts, ro.responses, ids, self.cfg.kwargs, ro.fields), dtype=torch.float)
        from tether.data import pad_id

        if self.rm_tok is None:  # scored as the RM was trained: a cut response gets its EOS (models.as_trained)
            seqs, attn = as_trained(ro.sequences, ro.attention_mask, ro.finished, self.tok.eos_token_id, pad_id(self.tok))
            batch = dataclasses.replace(ro, sequences=seqs, attention_mask=attn)
        else:
            batch = self._retokenize(ro)
        scores = self.engine.forward(batch, lambda m, b: sequence_scores(m, b.sequences, b.attention_mask, prompt_groups(b))).float().cpu()
        return scores[:, self.head] if self.head is not None else scores

    def _retokenize(self, ro: RolloutBatch) -> RolloutBatch:
        """The RM has its own tokenizer: decode and encode again, its EOS after a cut response (as_trained)."""
        rows = []
        cut = (~ro.finished).tolist() if ro.finished is not None else [False] * len(ro.sequences)
        for ids, mask, c in zip(ro.sequences.tolist(), ro.attention_mask.tolist(), cut):
            text = self.tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
            rows.append(self.rm_tok(text, add_special_tokens=False)["input_ids"] + ([self.rm_tok.eos_token_id] if c else []))
        width = max(len(r) for r in rows)
        pad = self.rm_tok.pad_token_id or 0
        seqs = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return dataclasses.replace(ro, sequences=seqs, attention_mask=attn, group_ids=[])  # its prompt boundary is not known


class Rewards:
    """The reward of each rollout: every source's raw score, normalised (its statistics, the batch's, or not
    at all) and clipped, combined (reward.combine), minus the EOS penalty. One source (reward.model or
    reward.fn) is the case of a single source of weight 1."""

    def __init__(self, cfg: RewardConfig, parts: list[tuple[RewardSource, Scorer]], group_size: int = 0):
        self.cfg, self.parts, self.group_size = cfg, parts, group_size
        self.rm_tok = parts[0][1].rm_tok if not cfg.sources else None  # the critic starts from the policy with several

    @classmethod
    def build(cls, cfg: RewardConfig, engine_cfg, tokenizer, pad: int, eos: list[int], dropout: bool = False, group_size: int = 0) -> "Rewards":
        sources = cfg.sources or [RewardSource(name="reward", model=cfg.model, fn=cfg.fn, kwargs=cfg.kwargs, normalize="stats" if cfg.normalize and cfg.model else "none", clip=cfg.clip)]
        return cls(cfg, [(src, Scorer.build(RewardConfig(model=src.model, fn=src.fn, kwargs=src.kwargs), engine_cfg, tokenizer, pad, eos, dropout,
                                            src.head, f"reward.sources[{k}]" if cfg.sources else "reward.model"))
                         for k, src in enumerate(sources)], group_size)

    def score(self, ro: RolloutBatch) -> tuple[Tensor, Tensor, dict[str, float]]:
        """-> (raw [B]: one source's raw score, or the combination before the EOS penalty; the score in the
        reward [B]; metrics, with each named source's raw mean, normalised mean and std, and contribution)."""
        metrics: dict[str, float] = {}
        normed = []
        for src, scorer in self.parts:
            raw = scorer.raw(ro)
            if src.mode == "stats":
                s = (raw - scorer.stats["mean"]) / scorer.stats["std"]
            else:
                s = (raw - raw.mean()) / (raw.std() + 1e-6) if src.mode == "batch" and len(raw) > 1 else raw.clone()
            normed.append(s.clamp(-src.clip, src.clip) if src.clip > 0 else s)
            if self.cfg.sources:
                metrics |= {f"rewards/{src.name}/raw_mean": float(raw.mean()), f"rewards/{src.name}/mean": float(normed[-1].mean()),
                            f"rewards/{src.name}/std": _std(normed[-1])}
        stacked, weights = torch.stack(normed), torch.tensor([src.weight for src, _ in self.parts])
        gdpo = self.group_size if self.cfg.combine == "gdpo" else 0
        combined = combine_rewards(stacked, weights, gdpo)
        for k, (src, _) in enumerate(self.parts if self.cfg.sources else []):  # what each adds to the combined score, on average
            metrics[f"rewards/{src.name}/contribution"] = float(combine_rewards(stacked[k : k + 1], weights[k : k + 1], gdpo).mean())
        raw = combined if self.cfg.sources else raw
        finished = ro.finished.cpu() if ro.finished is not None else torch.ones_like(combined, dtype=torch.bool)
        s = combined - self.cfg.missing_eos_penalty * (~finished).float() if self.cfg.missing_eos_penalty > 0 else combined
        return raw, s, metrics | {"rewards/raw_mean": float(raw.mean()), "rewards/raw_std": _std(raw), "rewards/mean": float(s.mean()), "rewards/std": _std(s)}


def _std(x: Tensor) -> float:
    return float(x.std()) if len(x) > 1 else 0.0
