"""The reward of a rollout (PPO's step 2): a frozen reward model from `tether rm`, normalised with the
statistics it saved (Ziegler et al. 2019), or a Python function (tether.rewards); then optional clipping
and a penalty for a response that never reached EOS (Huang et al. 2024's "EOS trick"). A reward model
scores a response as it was trained (`models.as_trained`: a cut response gets its EOS), so that an
eval score is the score PPO sees.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from tether.config import check, doc
from tether.engine import make_engine
from tether.models import as_trained, disable_dropout, load_reward_stats, load_scalar_model, load_tokenizer, sequence_scores
from tether.types import RolloutBatch, prompt_groups


@dataclass(frozen=True)
class RewardConfig:
    model: str = doc("", "reward model folder from `tether rm` (its tether_reward.json holds the normalisation statistics)")
    fn: str = doc("", "a Python reward instead of a model: package.module:function(prompts, responses, **kwargs) -> floats")
    kwargs: dict = doc({}, "keyword arguments passed to reward.fn")
    normalize: bool = doc(True, "score = (r - mean) / std with the statistics saved by `tether rm` (Ziegler et al. 2019)")
    clip: float = doc(0.0, "clip the normalised score to [-clip, clip] (0 = off)")
    missing_eos_penalty: float = doc(1.0, "subtract this from the score of a response that never reached EOS (Huang et al. 2024's 'EOS trick'; 0 = off); the RM scores such a response with EOS appended, as it was trained (models.as_trained)")

    def validate(self, p: str) -> None:
        check(bool(self.model) != bool(self.fn), f"{p}model", "set exactly one of reward.model (a reward model folder) and reward.fn (module:function)")
        check(self.clip >= 0, f"{p}clip", "must be >= 0")
        check(self.missing_eos_penalty >= 0, f"{p}missing_eos_penalty", "must be >= 0")


class Scorer:
    """Scores rollouts: a frozen reward-model engine or a Python reward function -> raw rewards [B]."""

    def __init__(self, cfg: RewardConfig, engine=None, fn=None, tokenizer=None, rm_tokenizer=None, eos: list[int] | None = None):
        self.cfg, self.engine, self.fn = cfg, engine, fn
        self.eos = set(eos or [])
        self.tok, self.rm_tok = tokenizer, rm_tokenizer
        self.stats = load_reward_stats(cfg.model) if cfg.model else {"mean": 0.0, "std": 1.0}

    @classmethod
    def build(cls, cfg: RewardConfig, engine_cfg, tokenizer, pad: int, eos: list[int], dropout: bool = False) -> "Scorer":
        """The reward model as a frozen engine (rm_tok: its own tokenizer when it differs), or the function."""
        if not cfg.model:
            from tether.rewards import load_reward_fn

            return cls(cfg, fn=load_reward_fn(cfg.fn), tokenizer=tokenizer, eos=eos)
        rm = load_scalar_model(cfg.model, pad_token_id=pad)
        disable_dropout(rm, dropout)
        other = load_tokenizer(cfg.model)
        return cls(cfg, make_engine(rm, engine_cfg, None, trainable=False), None, tokenizer,
                   None if other.get_vocab() == tokenizer.get_vocab() else other, eos)

    def raw(self, ro: RolloutBatch) -> Tensor:
        if self.fn is not None:
            from tether.rewards import call_reward_fn

            R = ro.response_mask.shape[1]
            resp = ro.sequences[:, -R:].tolist()
            ids = [[t for t, m in zip(row, mask) if m and t not in self.eos] for row, mask in zip(resp, ro.response_mask.tolist())]
            return torch.tensor(call_reward_fn(self.fn, ro.prompts, ro.responses, ids, self.cfg.kwargs), dtype=torch.float)
        from tether.data import pad_id

        if self.rm_tok is None:  # scored as the RM was trained: a cut response gets its EOS (models.as_trained)
            seqs, attn = as_trained(ro.sequences, ro.attention_mask, ro.finished, self.tok.eos_token_id, pad_id(self.tok))
            batch = dataclasses.replace(ro, sequences=seqs, attention_mask=attn)
        else:
            batch = self._retokenize(ro)
        return self.engine.forward(batch, lambda m, b: sequence_scores(m, b.sequences, b.attention_mask, prompt_groups(b))).float().cpu()

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

    def score(self, ro: RolloutBatch) -> tuple[Tensor, Tensor, dict[str, float]]:
        """-> (raw [B], score [B] used in the reward, metrics)."""
        raw = self.raw(ro)
        s = (raw - self.stats["mean"]) / self.stats["std"] if self.cfg.normalize else raw.clone()
        if self.cfg.clip > 0:
            s = s.clamp(-self.cfg.clip, self.cfg.clip)
        finished = ro.finished.cpu() if ro.finished is not None else torch.ones_like(s, dtype=torch.bool)
        if self.cfg.missing_eos_penalty > 0:
            s = s - self.cfg.missing_eos_penalty * (~finished).float()
        return raw, s, {
            "rewards/raw_mean": float(raw.mean()), "rewards/raw_std": float(raw.std()) if len(raw) > 1 else 0.0,
            "rewards/mean": float(s.mean()), "rewards/std": float(s.std()) if len(s) > 1 else 0.0,
        }
