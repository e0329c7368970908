"""Phase 0: train a byte-level BPE tokenizer and a small GPT from scratch on a text corpus.

    tether pretrain                                   # movie reviews, cached under ~/.cache/tether/pretrain/
    tether pretrain corpora=movie_reviews,sentence_polarity n_layer=4 n_embd=192 max_steps=600
    tether pretrain out=runs/base                     # also copy the result to a run folder

The corpora are the real review texts in the shared data folder (NLTK zips, read with zipfile; NLTK
itself is not needed). Every line (one sentence in these corpora) becomes a document ending in EOS;
documents are concatenated and cut into `context`-token blocks (GPT-2 style packing). A fraction
`holdout` of the reviews, chosen by a hash of their id, is never trained on: the demo takes its
held-out prompts from them.

The result is an ordinary Hugging Face folder (GPT2LMHeadModel + a fast tokenizer). It is cached in
`$TETHER_CACHE/pretrain/<key>` (else `$XDG_CACHE_HOME/tether/...`, else `~/.cache/tether/...`), the
key being a hash of the config and of the corpus files, so a second run with the same settings
returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tether.cli import cli_main
from tether.config import EngineConfig, OptimConfig, TrackConfig, check, doc, sub, to_dict
from tether.data.corpora import CORPORA, cache_dir, corpus_fingerprint, is_held_out, read_reviews
from tether.terminal import changed_keys

SPECIALS = ["<|endoftext|>", "<|pad|>"]
# -- Config ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainOptimConfig(OptimConfig):
    """OptimConfig's defaults (lr 1e-5) suit fine-tuning; training from scratch needs a large rate."""

    lr: float = doc(3e-3, "peak learning rate (AdamW)")
    weight_decay: float = doc(0.1, "AdamW weight decay (matrices only)")
    betas: tuple[float, float] = doc((0.9, 0.95), "AdamW betas")
    warmup_steps: int = doc(30, "linear warm-up steps")
    schedule: str = doc("cosine", "learning-rate schedule after warm-up: constant, linear, cosine")


@dataclass(frozen=True)
class PretrainConfig:
    corpora: tuple[str, ...] = doc(("movie_reviews", "sentence_polarity"), f"corpora to train on, from: {', '.join(CORPORA)}")
    holdout: float = doc(0.05, "fraction of reviews (by a hash of their id) never trained on; the demo's eval prompts come from them")
    vocab_size: int = doc(4096, "byte-level BPE vocabulary size, special tokens included")
    context: int = doc(64, "block length in tokens (= the model's n_positions)")
    n_layer: int = doc(4, "transformer blocks")
    n_head: int = doc(4, "attention heads")
    n_embd: int = doc(128, "hidden width")
    dropout: float = doc(0.0, "dropout in the model (0 for short runs that never see the data twice)")
    max_steps: int = doc(600, "optimizer steps")
    batch_size: int = doc(32, "blocks per optimizer step")
    eval_blocks: int = doc(64, "held-out blocks for the final eval loss")
    seed: int = doc(0, "random seed")
    out: str = doc("", "also copy the finished model folder here (empty = only the cache)")
    cache: bool = doc(True, "reuse a cached model with the same config and corpus; write the result to the cache")
    optim: PretrainOptimConfig = sub(PretrainOptimConfig, "optimizer and schedule")
    engine: EngineConfig = sub(EngineConfig, "devices, precision, micro-batching")
    track: TrackConfig = sub(TrackConfig, "metrics logging")

    def validate(self, p: str = "") -> None:
        for c in self.corpora:
            check(c in CORPORA, f"{p}corpora", f"unknown corpus {c!r}; choose from {', '.join(CORPORA)}")
        check(len(self.corpora) > 0, f"{p}corpora", "name at least one corpus")
        check(0 <= self.holdout < 1, f"{p}holdout", "must be in [0, 1)")
        check(self.vocab_size >= 256 + len(SPECIALS), f"{p}vocab_size", "must be at least 258 (the 256 bytes + specials)")
        check(self.context >= 8, f"{p}context", "must be >= 8")
        check(self.n_embd % self.n_head == 0, f"{p}n_embd", f"must be divisible by n_head={self.n_head}")
        check(self.max_steps > 0, f"{p}max_steps", "must be positive")
        check(self.batch_size > 0, f"{p}batch_size", "must be positive")


def cache_key(cfg: PretrainConfig) -> str:
    d = to_dict(cfg)
    for k in ("out", "cache", "track"):
        d.pop(k, None)
    # Threads and micro-batching do not change what is trained; the arithmetic precision does.
    from tether.models import resolve_autocast, resolve_device

    d["engine"] = {"autocast": str(resolve_autocast(cfg.engine.precision, resolve_device(cfg.engine.device)))}
    blob = json.dumps(d, sort_keys=True) + corpus_fingerprint(tuple(cfg.corpora))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- Tokenizer and model ---------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=SPECIALS[0], bos_token=SPECIALS[0], pad_token=SPECIALS[1])


def build_model(cfg: PretrainConfig, tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    mc = GPT2Config(
        vocab_size=len(tok), n_positions=cfg.context, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(mc)


def _blocks(ids: list[list[int]], eos: int, context: int):
    import torch

    flat = [t for doc_ids in ids for t in (*doc_ids, eos)]
    n = len(flat) // context
    return torch.tensor(flat[: n * context], dtype=torch.long).view(n, context)  # [N, context]


# -- Training --------------------------------------------------------------------------------------


def train(cfg: PretrainConfig) -> dict:
    """Train (or fetch from the cache) and return {"model": folder, ...summary}."""
    import torch

    from tether.checkpoint import atomic_write_text, seed_everything
    from tether.config import save_config
    from tether.engine import make_engine
    from tether.losses import sft_loss
    from tether.models import causal_logprobs
    from tether.track import Tracker, console
    from tether.types import SFTBatch

    key = cache_key(cfg)
    final = cache_dir() / "pretrain" / key
    if cfg.cache and (final / "summary.json").exists():
        summary = json.loads((final / "summary.json").read_text())
        console.print(f"[bold]tether pretrain[/bold]: cached model {final} (eval loss {summary.get('eval/loss', float('nan')):.3f})", highlight=False)
        _copy_out(cfg, final)
        return {**summary, "model": str(final), "cached": True}

    t_start = time.perf_counter()
    work = final.with_name(f"{key}.tmp-{os.getpid()}") if cfg.cache else Path(cfg.out or "runs/pretrain")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    console.print(f"tether pretrain -> {final if cfg.cache else work}  config, keys set: {changed_keys(cfg)}", highlight=False, markup=False)
    save_config(cfg, work / "config.json")
    seed_everything(cfg.seed)
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)

    reviews = [r for name in cfg.corpora for r in read_reviews(name)]
    train_docs = [line for r in reviews if not is_held_out(r.id, cfg.holdout) for line in r.lines]
    eval_docs = [line for r in reviews if is_held_out(r.id, cfg.holdout) for line in r.lines]
    t0 = time.perf_counter()
    tok = train_tokenizer(train_docs, cfg.vocab_size)
    t_tok = time.perf_counter() - t0
    eos = tok.eos_token_id
    train_ids = tok(train_docs, add_special_tokens=False)["input_ids"]
    eval_ids = tok(eval_docs[:4000], add_special_tokens=False)["input_ids"]
    train_blocks = _blocks(train_ids, eos, cfg.context)  # [N, C]
    eval_blocks = _blocks(eval_ids, eos, cfg.context)[: cfg.eval_blocks]
    n_tokens = int(train_blocks.numel())
    console.print(
        f"pretrain: {len(reviews)} reviews, {len(train_docs)} train lines -> {n_tokens:,} tokens "
        f"({n_tokens / max(1, sum(len(d.split()) for d in train_docs)):.2f} per word), tokenizer {len(tok)} in {t_tok:.1f}s",
        highlight=False,
    )

    model = build_model(cfg, tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    engine = make_engine(model, cfg.engine, cfg.optim, total_steps=cfg.max_steps)
    tracker = Tracker(work, cfg.track, to_dict(cfg), cfg.max_steps, "pretrain")
    tracker.event(f"pretrain: GPT-2 {cfg.n_layer}x{cfg.n_embd}, {n_params / 1e6:.2f}M parameters, {cfg.max_steps} steps x {cfg.batch_size} x {cfg.context} tokens "
                  f"({cfg.max_steps * cfg.batch_size * cfg.context / n_tokens:.2f} epochs)")

    def loss_fn_for(num_tokens: float):
        def loss_fn(m, mb):
            lp, _ = causal_logprobs(m, mb.input_ids, mb.attention_mask)
            return sft_loss(lp, mb.loss_mask, num_tokens)

        return loss_fn

    def as_batch(x):
        ones = torch.ones_like(x)
        loss_mask = ones.float()
        loss_mask[:, 0] = 0  # the first token has no prefix
        return SFTBatch(input_ids=x, attention_mask=ones, loss_mask=loss_mask)

    g = torch.Generator().manual_seed(cfg.seed)
    metrics: dict = {}
    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        idx = torch.randint(len(train_blocks), (cfg.batch_size,), generator=g)
        batch = as_batch(train_blocks[idx])
        metrics = engine.train_step(batch, loss_fn_for(float(batch.loss_mask.sum())))
        metrics["speed/tokens_per_s"] = batch.input_ids.numel() / (time.perf_counter() - t0)
        if step == cfg.max_steps and len(eval_blocks):
            eb = as_batch(eval_blocks)
            lp = engine.forward(eb, lambda m, mb: causal_logprobs(m, mb.input_ids, mb.attention_mask)[0])
            metrics["eval/loss"] = float(-(lp * eb.loss_mask).sum() / eb.loss_mask.sum())
        tracker.log(step, metrics, force=step == cfg.max_steps)
    tracker.close()

    engine.save_model(work / "model_tmp", tok)
    for f in (work / "model_tmp").iterdir():  # the HF folder is the cache entry itself
        os.replace(f, work / f.name)
    (work / "model_tmp").rmdir()
    summary = {
        "stage": "pretrain", "steps": cfg.max_steps, "parameters": n_params, "train_tokens": n_tokens,
        "vocab_size": len(tok), "loss/sft": metrics.get("loss/sft"), "eval/loss": metrics.get("eval/loss"),
        "seconds": round(time.perf_counter() - t_start, 1), "key": key,
    }
    atomic_write_text(work / "summary.json", json.dumps(summary, indent=2) + "\n")
    if cfg.cache:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)  # atomic: a half-trained folder is never named by the key
        _copy_out(cfg, final)
    else:
        final = work
    console.print(f"pretrain: eval loss {summary['eval/loss']:.3f} in {summary['seconds']:.0f}s -> {final}", highlight=False)
    return {**summary, "model": str(final), "cached": False}


def _copy_out(cfg: PretrainConfig, final: Path) -> None:
    if cfg.out and Path(cfg.out).resolve() != final.resolve():
        dst = Path(cfg.out)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(final, dst)


def main(argv: list[str]) -> int:
    return cli_main(PretrainConfig, train, argv, "tether pretrain", __doc__.strip().splitlines()[0])
