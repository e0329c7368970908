"""Model passes the eval reports share: reward-model scores of pairs and of single responses, sampling
with the HF rollout, and per-sequence KL(P || R) on P's own samples. Tokenisation is exactly the
training one (tether.data.tokenize_pairs / tokenize_prompts), so an eval score is the score PPO sees.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import DataConfig, EngineConfig
from tether.data import PreferencePair


def is_reward_model(path: str | Path) -> bool:
    """A tether reward model (tether_reward.json) or any *ForSequenceClassification folder."""
    from tether.models import RM_STATS_FILE

    p = Path(path)
    if (p / RM_STATS_FILE).exists():
        return True
    try:
        archs = json.loads((p / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in archs)


@dataclass
class Scorer:
    """A reward model with its tokenizer, an inference engine and the data settings used to tokenise."""

    model: torch.nn.Module
    tokenizer: object
    engine: object
    data: DataConfig
    batch_size: int
    stats: dict
    heads: list[str] = dataclasses.field(default_factory=list)  # a multi-objective model's named heads
    head: int | None = None  # which of them the scores read (None: a one-output model)

    def use_head(self, name: str) -> "Scorer":
        """Read the named head of a multi-objective reward model (from here on)."""
        if name not in self.heads:
            raise ValueError(f"the reward model's heads are {self.heads or '(one, unnamed)'}; no head {name!r}")
        self.head = self.heads.index(name)
        return self

    def _col(self, scores):
        if scores.dim() == 2 and self.head is None:
            raise ValueError(f"the reward model has the heads {self.heads}; choose one (--head)")
        return scores[:, self.head] if self.head is not None else scores

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", batch_size: int = 16, max_length: int = 512, max_prompt_length: int = 384) -> "Scorer":
        from tether.data import pad_id
        from tether.engine import make_engine
        from tether.models import load_reward_stats, load_scalar_model, load_tokenizer, reward_heads

        tok = load_tokenizer(path)
        model = load_scalar_model(path, pad_token_id=pad_id(tok))
        engine = make_engine(model, EngineConfig(device=device), trainable=False)
        data = DataConfig(max_length=max_length, max_prompt_length=max_prompt_length, on_bad_record="skip")
        return cls(model, tok, engine, data, batch_size, load_reward_stats(path), reward_heads(path))

    def _ordered(self, lengths: list[int]) -> list[int]:
        return sorted(range(len(lengths)), key=lambda i: lengths[i])  # batch similar lengths: less padding

    def score_pairs(self, pairs: list[PreferencePair]) -> dict:
        """Scores of every pair that tokenises (too-long prompts are skipped and counted).

        Returns {"index": kept pair indices, "chosen", "rejected": scores, "chosen_tokens",
        "rejected_tokens": response lengths in tokens, "skipped": count}.
        """
        from tether.algo.rm import score_pairs
        from tether.data import pad_id, tokenize_pairs

        kept: list[int] = []
        items = tokenize_pairs(pairs, self.tokenizer, self.data, kept=kept)
        order = self._ordered([len(it.prompt_ids) + max(len(it.chosen_ids), len(it.rejected_ids)) for it in items])
        rc = [0.0] * len(items)
        rr = [0.0] * len(items)
        if items:
            c, r = score_pairs(self.engine, [items[i] for i in order], pad_id(self.tokenizer), self.batch_size)
            c, r = self._col(c), self._col(r)
            for k, i in enumerate(order):
                rc[i], rr[i] = float(c[k]), float(r[k])
        return {"index": kept, "chosen": rc, "rejected": rr, "chosen_tokens": [len(it.chosen_ids) for it in items],
                "rejected_tokens": [len(it.rejected_ids) for it in items], "skipped": len(pairs) - len(items)}

    def score_responses(self, prompts: list, responses: list[str]) -> list[float]:
        """The reward of each (prompt, response); prompts are strings or message lists."""
        from tether.data import collate_prompts, pad_id, tokenize_pairs
        from tether.models import sequence_scores

        pairs = []
        for p, r in zip(prompts, responses):
            r = r if r.strip() else " "
            if isinstance(p, str):
                pairs.append(PreferencePair(p, r, r, ""))
            else:
                turn = [{"role": "assistant", "content": r}]
                pairs.append(PreferencePair(p, turn, turn, ""))
        # A long prompt is kept (the response is truncated to fit) rather than dropped: every response gets a score.
        data = DataConfig(max_length=self.data.max_length, max_prompt_length=max(self.data.max_prompt_length, self.data.max_length - 16),
                          on_bad_record="error")
        items = tokenize_pairs(pairs, self.tokenizer, data)
        seqs = [it.prompt_ids + it.chosen_ids for it in items]
        order = self._ordered([len(s) for s in seqs])
        out = [0.0] * len(seqs)
        pad = pad_id(self.tokenizer)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            batch = collate_prompts([seqs[i] for i in idx], pad)  # left-padded; scores read the last real token
            scores = self._col(self.engine.forward(batch, lambda m, b: sequence_scores(m, b.input_ids, b.attention_mask)))
            for i, v in zip(idx, scores.float().cpu().tolist()):
                out[i] = v
        return out


def tokenizer_from(path: str | Path):
    """The tokenizer of a model folder, or of a bare tokenizer folder (a checkpoint's step_N/tokenizer)."""
    from tether.models import load_tokenizer

    if (Path(path) / "config.json").exists():
        return load_tokenizer(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class Samples:
    prompts: list  # N prompts as given (strings or message lists), each repeated k times
    prompt_texts: list[str]
    responses: list[str]
    num_tokens: list[int]  # response tokens (up to and including EOS)
    kl_k1: list[float] | None = None  # per sequence: sum_t log p(y_t) - log r(y_t)
    kl_k3: list[float] | None = None  # per sequence: mean_t of k3 = (r/p - 1) - log(r/p)
    ref_nll: list[float] | None = None  # per sequence: -sum_t log r(y_t), the response's surprise to the reference

    @property
    def ref_perplexity(self) -> float | None:
        """exp(mean over response tokens of -log r(y_t)): how plausible the reference finds these outputs."""
        return math.exp(sum(self.ref_nll) / max(1, sum(self.num_tokens))) if self.ref_nll else None


def sample(model_dir: str | Path, prompts: list, k: int = 1, max_new_tokens: int = 64, temperature: float = 1.0,
           top_p: float = 1.0, seed: int = 0, batch_size: int = 16, device: str = "auto",
           ref_dir: str | Path | None = None, max_prompt_length: int = 256, tokenizer_dir: str | Path | None = None) -> Samples:
    """k samples per prompt from `model_dir` with the HF rollout; with ref_dir, also KL(P || R) on them.

    KL is estimated on P's own samples from per-token log-probability differences under P and R
    (Schulman 2020): k1 = sum_t log P(y_t|.) - log R(y_t|.) per sequence (unbiased for the sequence KL
    when sampling at temperature 1 with top_p 1), and k3 averaged per token (always >= 0).
    """
    from tether.data import PromptExample, collate_prompts, pad_id, prompt_text, tokenize_prompts
    from tether.losses import KLEstimator, kl_estimate
    from tether.generate import context_length
    from tether.models import causal_logprobs, load_causal_lm, resolve_device
    from tether.rollout import SamplingConfig
    from tether.rollout.hf import HFRollout

    torch.manual_seed(seed)
    dev = resolve_device(device)
    tok = tokenizer_from(tokenizer_dir or model_dir)
    model = load_causal_lm(model_dir, dev).eval()
    ref = None
    if ref_dir is not None:
        ref_tok = tokenizer_from(ref_dir)
        if ref_tok.get_vocab() != tok.get_vocab():
            raise ValueError(f"KL needs the same tokenizer: {model_dir} and {ref_dir} have different vocabularies")
        ref = model if Path(ref_dir).resolve() == Path(model_dir).resolve() else load_causal_lm(ref_dir, dev).eval()
    repeated = [p for p in prompts for _ in range(k)]
    cfg = DataConfig(max_length=max_prompt_length + max_new_tokens, max_prompt_length=max_prompt_length)
    ids = tokenize_prompts([PromptExample(p, f"prompt[{i}]") for i, p in enumerate(repeated)], tok, cfg)
    ctx = context_length(model)
    longest = max((len(i) for i in ids), default=0)
    if ctx and longest + max_new_tokens > ctx:
        raise ValueError(f"{model_dir}: the longest prompt is {longest} tokens, and {max_new_tokens} new tokens would reach "
                         f"{longest + max_new_tokens}, past the model's context of {ctx}; lower the new tokens to {max(ctx - longest, 0)} or fewer")
    pad = pad_id(tok)
    rollout = HFRollout(model, tok, dev)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    out = Samples(repeated, [prompt_text(p) for p in repeated], [], [], *([[], [], []] if ref is not None else [None] * 3))
    for s in range(0, len(ids), batch_size):
        batch = collate_prompts(ids[s : s + batch_size], pad, out.prompt_texts[s : s + batch_size])
        ro = rollout.generate(batch, sampling)
        out.responses += ro.responses
        out.num_tokens += ro.response_mask.sum(-1).long().tolist()
        if ref is not None:
            R = ro.response_mask.shape[1]
            with torch.no_grad():
                lp, _ = causal_logprobs(model, ro.sequences, ro.attention_mask, num_response=R)
                lr = lp if ref is model else causal_logprobs(ref, ro.sequences, ro.attention_mask, num_response=R)[0]
            mask = ro.response_mask
            out.ref_nll += (-lr * mask).sum(-1).tolist()
            out.kl_k1 += (kl_estimate(lp, lr, KLEstimator.K1) * mask).sum(-1).tolist()
            out.kl_k3 += ((kl_estimate(lp, lr, KLEstimator.K3) * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
    return out
