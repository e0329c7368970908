"""Load policy / ref / value / reward_model from a local Hugging Face folder, and run them.

- Causal LMs load with AutoModelForCausalLM (any architecture transformers can load).
- Scalar models (reward model, critic) are AutoModelForSequenceClassification with num_labels=1:
  the LM backbone plus a linear `score` head, so a saved tether reward model also loads in plain
  transformers. tether pools the head at the last *attention-mask* token itself (not by searching for
  pad ids, which breaks when pad == eos), and the critic applies the same head at every position.
- Log-probabilities are computed only at the positions asked for, without a [B, T, V] log-softmax.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from tether.losses import entropy_from_logits, token_logprobs
from tether.packing import Groups, gemm_multiple, pack_padded, packed_hidden, packing_enabled, pad_rows

RM_STATS_FILE = "tether_reward.json"


class ModelError(ValueError):
    pass


def resolve_device(name: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def cpu_has_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 or AMX); without them torch emulates bf16."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - an older torch without the probes
        return False


_warned_bf16 = False


def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting (None = full fp32). Master weights stay fp32."""
    global _warned_bf16
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_bf16() and not _warned_bf16:
            import warnings

            _warned_bf16 = True
            warnings.warn(f"precision=bf16 on a CPU without bf16 instructions ({torch.backends.cpu.get_cpu_capability()}): "
                          "torch emulates bf16 matmuls, about 100x slower than float32 here; use precision=fp32", stacklevel=2)
        return torch.bfloat16
    # auto: bf16 on GPUs that support it; fp32 on CPU (bf16 on CPU is opt-in: precision=bf16)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def _check_dir(path: str | Path) -> Path:
    p = Path(path)
    if not str(path):
        raise ModelError("no model given: set `model=<a local Hugging Face model folder>`")
    if not p.is_dir():
        raise ModelError(f"model folder {p} does not exist (give a local Hugging Face model folder, e.g. the `final/` of an earlier run)")
    if not (p / "config.json").exists():
        raise ModelError(f"model folder {p} has no config.json (expected a local Hugging Face model folder)")
    return p


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_check_dir(path)))
    if tok.pad_token_id is None:
        # No pad token: pad with EOS. Every tether pass uses attention masks, so the id is inert.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(_check_dir(path)), dtype=torch.float32)
    return fuse_activations(model).to(device)


def load_scalar_model(path: str | Path, device: torch.device | str = "cpu", pad_token_id: int | None = None,
                      heads: list[str] | None = None) -> nn.Module:
    """A reward model or critic: the backbone of `path` with a `score` head of one output, or one per
    named head (a multi-objective reward model; a saved one loads with the heads it was trained with).

    From a causal-LM folder the head is new and initialised N(0, 1/(d+1)) as in Stiennon et al. 2020;
    from a tether reward-model folder the trained head loads as saved.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    p = _check_dir(path)
    saved = (p / RM_STATS_FILE).exists()
    names = reward_heads(p) if saved else []
    if saved and heads is not None and list(heads) != names:
        raise ModelError(f"{p}: a reward model with heads {names or '(one, unnamed)'}; heads={list(heads)} needs a causal LM or SFT folder to start from")
    names = list(heads) if heads else names
    config = AutoConfig.from_pretrained(str(p), num_labels=max(1, len(names)))
    if names:  # transformers users read the outputs' names from the config
        config.id2label = dict(enumerate(names))
        config.label2id = {h: i for i, h in enumerate(names)}
    if config.pad_token_id is None:
        config.pad_token_id = pad_token_id if pad_token_id is not None else getattr(config, "eos_token_id", 0)
        if isinstance(config.pad_token_id, list):
            config.pad_token_id = config.pad_token_id[0]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialised score head" warning is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(p), config=config, dtype=torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if not saved:
        head = score_head(model)
        nn.init.normal_(head.weight, std=1 / math.sqrt(head.weight.shape[1] + 1))
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    return fuse_activations(model).to(device)


def fuse_activations(model: nn.Module) -> nn.Module:
    """Swap transformers' `NewGELUActivation` (GPT-2's tanh GELU written as ~8 elementwise ops, each a
    pass over the [B, T, 4H] activations, forward and backward) for torch's one-kernel
    `nn.GELU(approximate="tanh")`: the same function (max difference ~2e-7), about 30% of the
    non-matmul time of a GPT-2 training step on CPU. Parameters and state dict are unchanged."""
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:  # pragma: no cover
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, nn.GELU(approximate="tanh"))
    return model


def score_head(model: nn.Module) -> nn.Linear:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ModelError(f"{type(model).__name__} has no linear score head")


def backbone(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as HF generate computes them: [B, T] -> [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def is_right_padded(attention_mask: Tensor) -> bool:
    """True when every row is ones then zeros (no left padding, no holes)."""
    lengths = attention_mask.sum(-1, keepdim=True)  # [B, 1]
    cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool(torch.equal(attention_mask.bool(), cols[None, :] < lengths))


def _inputs(input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> dict:
    if position_ids is None and attention_mask is not None and not is_right_padded(attention_mask):
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}
    # Right padding under a causal mask: no real token attends to a pad (pads come after it), and
    # positions are 0..T-1 either way. Without a padding mask, attention takes SDPA's causal fast
    # path instead of a materialised [B, 1, T, T] mask. Outputs at pad positions are unused.
    # Packed rows (position_ids given): positions restart per example, and transformers builds the
    # block-diagonal causal mask from them when no 2D mask is given (masking_utils.find_packed_sequence_indices).
    return {"input_ids": input_ids, "attention_mask": None, "position_ids": position_ids}


def scalar_values(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None, groups: Groups | None = None) -> Tensor:
    """The score head at every position: [B, T] -> [B, T] float32 (the critic's V_t; 0 at padding when packed).

    groups: (keys, prompt lengths): rows with equal keys share their prompt in a packed pass (tether.packing)."""
    if position_ids is None and packing_enabled(model):
        pb = pack_padded(input_ids, attention_mask, groups, gemm_multiple(model, input_ids.device))
        v = score_head(model)(packed_hidden(backbone(model), pb)).squeeze(-1).float()  # [N]
        return torch.where(pb.index >= 0, v[pb.index.clamp(min=0)], torch.zeros((), dtype=v.dtype, device=v.device))
    hidden = backbone(model)(**_inputs(input_ids, attention_mask, position_ids), use_cache=False).last_hidden_state
    return score_head(model)(hidden).squeeze(-1).float()


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, groups: Groups | None = None) -> Tensor:
    """Reward: the score head on the hidden state of the last non-padding token. [B, T] -> [B].

    Works for right padding, left padding and both (rollouts): the last 1 of the attention mask.
    groups: (keys, prompt lengths): rows with equal keys (a pair's chosen and rejected, one prompt's
    samples) share their prompt in a packed pass (tether.packing).
    """
    T = attention_mask.shape[1]
    last = (T - 1) - attention_mask.flip(-1).long().argmax(-1)  # [B]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if packing_enabled(model):
        pb = pack_padded(input_ids, attention_mask, groups, gemm_multiple(model, input_ids.device))
        pooled = pb.index[rows, last]  # [B] packed positions of the scored tokens
        h = packed_hidden(backbone(model), pb, used=pooled)[pooled]  # [B, H]
    else:
        hidden = backbone(model)(**_inputs(input_ids, attention_mask, None), use_cache=False).last_hidden_state
        h = hidden[rows, last]  # [B, H]
    return score_head(model)(h).squeeze(-1).float()


def causal_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None, num_response: int = 0, temperature: float = 1.0,
                    with_entropy: bool | str = False, targets: Tensor | None = None, groups: Groups | None = None) -> tuple[Tensor, Tensor | None]:
    """Log-probability of each token given its prefix.

    targets [B, T] (optional, with num_response = 0): only tokens where targets != 0 are scored; the LM
    head and log-softmax run on those positions alone (the prompt and the padding never reach the
    [*, V] projection) and other columns are 0. Same values as without it at the target positions.

    num_response = 0: returns [B, T] where column t is log p(x_t | x_<t) (column 0 is 0).
    num_response = R > 0: only the last R tokens, [B, R] (the response of a rollout); the model then
    computes logits for the last R+1 positions only (`logits_to_keep`), which saves the [B, T, V]
    projection over the prompt.

    Columns where the token or the one before it is padding are 0 (entropy too). with_entropy="detached":
    the entropy without autograd (a metric: no [n, V] softmax kept for a backward). On a packing-enabled
    model (tether.packing) the rows are packed without padding, rows with equal `groups` keys sharing
    their prompt, and the head runs on real scored tokens only.
    """
    if position_ids is None and packing_enabled(model) and _plain_head(model):
        return _packed_logprobs(model, input_ids, attention_mask, num_response, temperature, with_entropy, targets, groups)
    kwargs = _inputs(input_ids, attention_mask, position_ids)
    if targets is not None and num_response == 0 and not with_entropy and _plain_head(model):
        hidden = backbone(model)(**kwargs, use_cache=False).last_hidden_state  # [B, T, H]
        sel = targets[:, 1:] != 0  # [B, T-1]: position t-1 predicts token t
        return _head_at(model, hidden[:, :-1][sel], input_ids[:, 1:][sel], sel, temperature, False, True)
    if num_response > 0:
        out = model(**kwargs, use_cache=False, logits_to_keep=num_response + 1)
        logits = out.logits[:, :-1]  # [B, R, V] predicts the last R tokens
        labels = input_ids[:, -num_response:]
    else:
        logits = model(**kwargs, use_cache=False).logits[:, :-1]  # [B, T-1, V]
        labels = input_ids[:, 1:]
    lp = token_logprobs(logits, labels, temperature)
    ent = entropy_from_logits(_for_entropy(logits, temperature, with_entropy)) if with_entropy else None
    if attention_mask is not None:  # 0 where the token or its predecessor is padding, as the packed path
        K = lp.shape[1]
        real = (attention_mask[:, -K:] != 0) & (attention_mask[:, -K - 1 : -1] != 0)
        lp = lp.masked_fill(~real, 0.0)
        ent = ent.masked_fill(~real, 0.0) if ent is not None else None
    if num_response == 0:
        lp = torch.nn.functional.pad(lp, (1, 0))
        ent = torch.nn.functional.pad(ent, (1, 0)) if ent is not None else None
    return lp, ent


def _packed_logprobs(model, input_ids, attention_mask, num_response, temperature, with_entropy, targets, groups):
    pb = pack_padded(input_ids, attention_mask, groups, gemm_multiple(model, input_ids.device))
    K = num_response if num_response > 0 else input_ids.shape[1] - 1  # scored columns: the last K
    pred = pb.index[:, -K - 1 : -1]  # [B, K] packed position of the token that predicts each scored one
    sel = (pb.index[:, -K:] >= 0) & (pred >= 0)  # real token with a real predecessor
    if targets is not None and num_response == 0:
        sel = sel & (targets[:, -K:] != 0)
    used = pred[sel]  # [n] a shared prompt's last token predicts every sample's first token: repeats allowed
    hidden = packed_hidden(backbone(model), pb, used=torch.unique(used))  # [N, H], meaningful at `used`
    return _head_at(model, hidden[used], input_ids[:, -K:][sel], sel, temperature, with_entropy, num_response == 0)


def _for_entropy(logits: Tensor, temperature: float, with_entropy: bool | str) -> Tensor:
    logits = logits.detach() if with_entropy == "detached" else logits
    return logits / temperature if temperature != 1.0 else logits


def _head_at(model, h: Tensor, labels: Tensor, sel: Tensor, temperature: float, with_entropy: bool | str, full: bool) -> tuple[Tensor, Tensor | None]:
    """The LM head and log-softmax on the selected hidden states only: h [n, H] predicting labels [n] at
    the True places of sel [B, K]; other places are 0. full: a zero column 0 is added ([B, K+1] = [B, T])."""
    m, n = gemm_multiple(model, h.device), h.shape[0]
    logits = model.get_output_embeddings()(pad_rows(h, m))  # [n + pad, V]: no slice, whose backward zero-fills [n + pad, V]
    lp_sel = token_logprobs(logits[None], pad_rows(labels, m)[None], temperature)[0][:n]  # [n]
    lp = torch.zeros(sel.shape, dtype=lp_sel.dtype, device=lp_sel.device).masked_scatter(sel, lp_sel)  # [B, K]
    ent = None
    if with_entropy:
        e = entropy_from_logits(_for_entropy(logits, temperature, with_entropy)[None])[0][:n]
        ent = torch.zeros(sel.shape, dtype=e.dtype, device=e.device).masked_scatter(sel, e)
    if full:
        lp = torch.nn.functional.pad(lp, (1, 0))
        ent = torch.nn.functional.pad(ent, (1, 0)) if ent is not None else None
    return lp, ent


def _plain_head(model: nn.Module) -> bool:
    """True when the model's logits are exactly output_embeddings(last_hidden_state) (no soft-capping or
    logit scaling that its own forward would apply), so the head can be run on selected positions."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text, attr, None) not in (None, 1.0):
            return False
    return model.get_output_embeddings() is not None and hasattr(model, "base_model_prefix")


def save_reward_stats(path: str | Path, mean: float, std: float, extra: dict | None = None) -> None:
    from tether.atomic import atomic_write_text

    atomic_write_text(Path(path) / RM_STATS_FILE, json.dumps({"mean": mean, "std": std, **(extra or {})}, indent=2))


def reward_heads(path: str | Path) -> list[str]:
    """The named heads of a multi-objective reward model, in output order; [] for a one-output model."""
    return list(load_reward_stats(path).get("heads", []))


def load_reward_stats(path: str | Path) -> dict:
    f = Path(path) / RM_STATS_FILE
    return json.loads(f.read_text()) if f.exists() else {"mean": 0.0, "std": 1.0}


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def disable_dropout(model, keep: bool = False) -> None:
    """RL and preference losses compare log-probabilities across passes; dropout would make the
    same weights give different numbers (TRL and OpenRLHF disable it too). keep=True (config key
    `dropout`) leaves the model as configured."""
    for m in () if keep else model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = None if keep else getattr(model, "config", None)
    for name in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout", "dropout", "summary_first_dropout"):
        if cfg is not None and isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, 0.0)


def eos_ids(tokenizer, model=None) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        ids.update([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else gen.eos_token_id)
    return sorted(ids)


def as_trained(sequences: Tensor, attention_mask: Tensor, finished: Tensor | None, eos: int, pad: int) -> tuple[Tensor, Tensor]:
    """The one scoring convention (PPO, `tether eval`, the demo): a reward model reads prompt, response and
    one EOS, as its training records were written; a response cut at the length limit (finished False;
    None = all finished) gets its EOS here, after its last real token. -> (sequences, attention_mask) [B, T+1]."""
    B, T = sequences.shape
    cut = ~finished.to(sequences.device) if finished is not None else torch.zeros(B, dtype=torch.bool, device=sequences.device)
    seqs = torch.cat([sequences, sequences.new_full((B, 1), pad)], 1)  # [B, T+1]
    attn = torch.cat([attention_mask, attention_mask.new_zeros(B, 1)], 1)
    rows = cut.nonzero().squeeze(1)
    after = T - attention_mask[rows].flip(1).argmax(1)  # the column after each cut row's last real token
    seqs[rows, after], attn[rows, after] = eos, 1
    return seqs, attn

