"""Padding-free, prefix-shared forward passes for any transformers model, through its attention interface.

A batch of B rows (prompt + response, right- or left-padded) becomes one row of N real tokens:

    [prompt | chosen] [rejected]          a preference pair: the prompt is computed once
    [prompt | resp 1] [resp 2] [resp 3]   RL samples of one prompt (GRPO/RLOO groups)
    [row 1] [row 2] ...                   independent rows: just no padding

Rows of a group share their prompt with the group's first row (the "root"), the caller saying which rows
are a group and how long each prompt is (it knows: a pair's prompt was tokenised, a rollout's samples
came from one prompt), so the prompt is never searched for (sharing extends over response tokens that
begin alike); a member row stores only its own tokens, with positions continuing after the shared prefix, and its queries
attend to the root's first `share` keys plus its own keys, causally. A causal model computes the same
hidden state for a token from the same prefix, so every output equals the padded forward's (to float
rounding), while the linear layers - most of the FLOPs - see no padding and no repeated prompt.

Attention (`tether_packed`, registered in transformers' AttentionInterface; outside a packed forward it
is plain `sdpa`) gathers the segments into one padded causal SDPA batch, each member preceded by its
shared prefix's keys (and, to line the causal mask up, the prefix's queries again), so padding and the
repeated prompt exist only inside the attention core, never in the projections and MLPs. The model's own code does everything
else (embeddings, positions from `position_ids`, norms, MLPs), so any architecture whose attention goes
through the interface works. `enable_packing` refuses configurations the segment attention does not
model (sliding windows, soft-capping), and a packed forward that never reached the segment attention
raises instead of returning cross-contaminated outputs.

On the fixed benchmark workload a reward-model batch of 8 pairs loses its padding (16% of the padded
tokens) and half of its prompt tokens (16% of the real ones): 64.6k tokens instead of 91.9k over 50
steps (see benchmarks/README.md). It is on by default on CPU (`engine.padding_free=auto`); on GPUs flash-attention's varlen kernels are
the natural route.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _PackedRowsHaveNoMask(logging.Filter):
    """A packed row is called without an attention mask by design (positions restart per example), and
    transformers warns when such a call's first or last token is the pad id, which is EOS for most
    tokenizers: a false alarm on every packed batch that ends an example with EOS."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_PACKED_FORWARD.get() and "passing in an `attention_mask`" in record.getMessage())


_PACKED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("tether_packed_forward", default=False)
logging.getLogger("transformers.modeling_utils").addFilter(_PackedRowsHaveNoMask())

IMPL = "tether_packed"
_ACTIVE: contextvars.ContextVar["PackedBatch | None"] = contextvars.ContextVar("tether_packed_layout", default=None)


@dataclass
class _Plan:
    """Every segment as one row of a single causal SDPA batch: the positions of its shared prefix, then its
    own, padded at the end by repeating the last. A member's queries over the prefix are the root's prompt
    queries again (recomputed inside the attention core only; those outputs are dropped), so under SDPA's
    plain causal mask its own query t sees the whole prefix and its own keys up to t, which is exactly its
    attention: no mask tensor, one kernel call, and causal kernels skip the blocks above the diagonal.
    Padding columns come after every real one, so no real query sees them.

    idx  [S, L] packed positions of each segment's keys (= queries)
    sel  [N] flat position in S x L of each packed token's output, in packed order
    """

    idx: Tensor
    sel: Tensor

    @staticmethod
    def build(segments: list[tuple[int, int, int, int]], n: int, device) -> "_Plan":
        rows = [list(range(p0, p1)) + list(range(q0, q1)) for q0, q1, p0, p1 in segments]
        width = max(len(r) for r in rows)
        idx = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], dtype=torch.long)
        # the segments tile [0, n) in order, so their own outputs in segment order are the packed order
        sel = torch.cat([i * width + (p1 - p0) + torch.arange(q1 - q0) for i, (q0, q1, p0, p1) in enumerate(segments)])
        assert sel.numel() == n
        return _Plan(idx.to(device), sel.to(device))

    def queries(self, rows: Tensor) -> "_Queries":
        """The attention batch for the queries at packed positions `rows` only."""
        L = self.idx.shape[1]
        flat = self.sel.index_select(0, rows).tolist()
        by: dict[int, list[tuple[int, int]]] = {}
        for i, f in enumerate(flat):
            by.setdefault(f // L, []).append((f % L, i))
        segs = sorted(by)
        lq = max(len(v) for v in by.values())
        cols = [[c for c, _ in by[s]] + [by[s][-1][0]] * (lq - len(by[s])) for s in segs]
        sel = [0] * len(flat)
        for r, s in enumerate(segs):
            for j, (_, i) in enumerate(by[s]):
                sel[i] = r * lq + j
        dev = self.idx.device
        kidx = self.idx.index_select(0, torch.tensor(segs, device=dev))
        c = torch.tensor(cols, device=dev)
        mask = torch.arange(L, device=dev) <= c[:, :, None]  # [S', Lq, L]: causal within the segment
        return _Queries(kidx, kidx.gather(1, c), mask[:, None], torch.tensor(sel, device=dev), rows)


@dataclass
class _Queries:
    """Some queries of a _Plan: kidx [S', L] keys of the segments holding one, qidx [S', Lq] the queries'
    packed positions (padded by repeating), mask [S', 1, Lq, L], sel [U] each query's flat position in
    S' x Lq, rows [U] their packed positions."""

    kidx: Tensor
    qidx: Tensor
    mask: Tensor
    sel: Tensor
    rows: Tensor


@dataclass
class PackedBatch:
    """B rows packed into one row of N tokens.

    input_ids, position_ids  [1, N]
    index     [B, T] packed position of column t of row b in the caller's padded layout (-1 = padding)
    segments  (q0, q1, p0, p1): queries [q0, q1) attend causally to keys [q0, q1) and fully to the shared
              prefix [p0, p1) (p0 == p1: none); the segments tile [0, N) in order
    """

    input_ids: Tensor
    position_ids: Tensor
    index: Tensor
    segments: list[tuple[int, int, int, int]]
    calls: int = 0
    queries: tuple | None = None  # (attention module, used positions): that module's queries are restricted
    _plans: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.input_ids.shape[1]

    def plan(self, device) -> "_Plan":
        """Index tensors that batch the segments for attention (built once per batch and device)."""
        key = str(device)
        if key not in self._plans:
            self._plans[key] = _Plan.build(self.segments, self.n, device)
        return self._plans[key]

    def to(self, device) -> "PackedBatch":
        self.input_ids, self.position_ids, self.index = (t.to(device) for t in (self.input_ids, self.position_ids, self.index))
        return self


Groups = tuple[list, list[int]]  # (a key per row, how many leading tokens each row shares with its group: its prompt)


def pack(rows: list[list[int]], groups: Groups | None = None, starts: list[int] | None = None, width: int | None = None,
         multiple: int = 1) -> PackedBatch:
    """Pack token rows (real tokens only) into one row.

    groups: (keys, prefix) from where the structure is known (a pair's prompt, one prompt's samples): rows
    with equal keys share their first prefix[b] tokens with the group's first row, and any tokens after
    them that the two rows also have in common (None: no sharing).
    starts/width: where row b's tokens sit in the caller's padded [B, width] layout (default 0 and the
    longest row), so `index` maps the caller's columns to packed positions.
    multiple: N is rounded up to a multiple of it by a last segment of filler tokens that no row maps to
    (gemm_multiple says when that pays).
    """
    B = len(rows)
    width = width if width is not None else max((len(r) for r in rows), default=0)
    starts = starts if starts is not None else [0] * B
    keys, prefix = groups if groups is not None else (None, None)
    first: dict = {}  # a group's rows follow its first row; groups in the order they first appear
    order = sorted(range(B), key=lambda b: first.setdefault(keys[b], b)) if keys is not None else range(B)
    ids: list[int] = []
    pos: list[int] = []
    index = [[-1] * width for _ in range(B)]
    segments: list[tuple[int, int, int, int]] = []
    roots: dict = {}
    for b in order:
        row = rows[b]
        L = len(row)
        if L == 0:
            continue
        share, p0 = 0, 0
        g = keys[b] if keys is not None else None
        if g is not None and g in roots:
            rb, p0 = roots[g]
            root = rows[rb]
            limit = min(len(root), L - 1)  # a row keeps at least its last token
            share = min(prefix[b], limit)
            if root[:share] != row[:share]:
                raise ValueError(f"row {b} does not begin with the {share} tokens it is said to share with row {rb} (group {g!r})")
            while share < limit and root[share] == row[share]:  # responses that begin alike share that too
                share += 1
        q0 = len(ids)
        ids.extend(row[share:])
        pos.extend(range(share, L))
        idx = index[b]
        s = starts[b]
        for t in range(share):
            idx[s + t] = p0 + t
        for t in range(share, L):
            idx[s + t] = q0 + t - share
        segments.append((q0, q0 + L - share, p0, p0 + share))
        if g is not None and g not in roots:
            roots[g] = (b, q0)
    extra = -len(ids) % multiple
    if extra and ids:  # a segment of its own: it attends to nothing else and nothing attends to it
        segments.append((len(ids), len(ids) + extra, len(ids), len(ids)))
        ids.extend([ids[-1]] * extra)
        pos.extend(range(extra))
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        index=torch.tensor(index, dtype=torch.long).reshape(B, width),
        segments=segments,
    )


def pack_padded(input_ids: Tensor, attention_mask: Tensor, groups: Groups | None = None, multiple: int = 1) -> PackedBatch:
    """Pack a padded [B, T] batch whose real tokens are contiguous in each row (left, right or both sides
    padded, as rollouts are). Raises on a row with holes in its attention mask."""
    ids = input_ids.tolist()
    mask = attention_mask.tolist()
    rows, starts = [], []
    for b, (r, m) in enumerate(zip(ids, mask)):
        cols = [t for t, v in enumerate(m) if v]
        if cols and cols[-1] - cols[0] + 1 != len(cols):
            raise ValueError(f"row {b}: attention mask has holes; cannot pack it")
        starts.append(cols[0] if cols else 0)
        rows.append([r[t] for t in cols])
    return pack(rows, groups, starts, input_ids.shape[1], multiple).to(input_ids.device)


GEMM_ROWS = 64


def gemm_multiple(model: nn.Module, device) -> int:
    """The multiple to round a matmul's row count up to: GEMM_ROWS where the model's matmuls run in bf16 or
    fp16 on a CPU, else 1. There torch's matmuls go to oneDNN, which compiles a kernel for every new shape
    and caches it; a packed batch has a new token count every step, so every product of every step paid
    the compile (benchmarks/README, bf16). Rounded up, the shapes repeat. float32 goes to MKL, which
    compiles nothing, so it is left exact."""
    if torch.device(device).type != "cpu":
        return 1
    low = (torch.bfloat16, torch.float16)
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low:
        return GEMM_ROWS
    p = next(model.parameters(), None)
    return GEMM_ROWS if p is not None and p.dtype in low else 1


def pad_rows(x: Tensor, multiple: int, dim: int = 0) -> Tensor:
    """x with zero rows appended along dim up to a multiple of `multiple` (the caller slices them off)."""
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


# ----------------------------------------------------------------------------------------------
# The attention function and its mask function, registered in transformers' interfaces


def _attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = _ACTIVE.get()
    dtype = query.dtype
    upcast = _upcast(query, attention_mask)
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    # autocast would cast the float32 inputs straight back to bf16 for SDPA
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        if layout is None:
            out, w = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
        else:
            rows = layout.queries[1] if layout.queries is not None and layout.queries[0] is module else None
            out, w = _segment_attention(layout, query, key, value, dropout, scaling, kwargs, rows)
    return out.to(dtype), w


def _upcast(query: Tensor, attention_mask) -> bool:
    """bf16/fp16 attention on CPU runs in float32: torch's CPU SDPA kernels are slower in bf16 than in
    float32 (fwd+bwd, 2 threads: a [16, 4, 120, 64] causal attention 18.5 ms bf16 flash, 16.1 ms bf16
    math, 15.3 ms float32 with the casts; one 100-token segment 1.64 / 1.40 / 0.98 ms). Only the
    attention core is upcast; the projections around it stay in the autocast dtype."""
    return (query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)
            and (attention_mask is None or attention_mask.dtype == torch.bool))


def _segment_attention(layout: "PackedBatch", query: Tensor, key: Tensor, value: Tensor, dropout: float, scaling, kwargs: dict, rows: Tensor | None = None):
    from transformers.integrations.sdpa_attention import repeat_kv

    if query.shape[0] != 1 or query.shape[2] != layout.n or key.shape[2] != layout.n:
        raise RuntimeError(f"packed attention: expected one row of {layout.n} tokens, got query {tuple(query.shape)}, key {tuple(key.shape)} (a KV cache cannot be used with packing)")
    for name in ("position_bias", "softcap", "sliding_window"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"packed attention does not support {name}; set engine.padding_free=off")
    layout.calls += 1
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    plan = layout.plan(query.device)
    if rows is not None:
        return _query_attention(plan.queries(rows), query, key, value, dropout, scaling, layout.n), None
    q, k, v = (_take(t[0].transpose(0, 1), plan.idx) for t in (query, key, value))  # [N, H, D] -> [S, H, L, D]
    # index_select everywhere: its backward is index_add, where fancy indexing's would be a sorting index_put
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
    return _rows(o, plan.sel)[None], None  # [1, N, H, D]


def _query_attention(qp: "_Queries", query: Tensor, key: Tensor, value: Tensor, dropout: float, scaling, n: int) -> Tensor:
    """Attention outputs at the used positions only (zeros elsewhere): [1, N, H, D]. Only the segments that
    hold a used position take part; each of its used queries sees the keys the causal mask gives it."""
    q = _take(query[0].transpose(0, 1), qp.qidx)  # [S', H, Lq, D]
    k, v = (_take(t[0].transpose(0, 1), qp.kidx) for t in (key, value))  # [S', H, L, D]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=qp.mask, dropout_p=dropout, scale=scaling)
    out = _rows(o, qp.sel)  # [U, H, D] in the order of `rows`
    return out.new_zeros(n, *out.shape[1:]).index_copy(0, qp.rows, out)[None]


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """t [N, H, D] at idx [S, L] -> [S, H, L, D]."""
    return t.index_select(0, idx.reshape(-1)).view(*idx.shape, *t.shape[1:]).transpose(1, 2)


def _rows(o: Tensor, sel: Tensor) -> Tensor:
    """Attention output [S, H, L, D] -> the real rows [n, H, D] (sel: their flat positions in S x L)."""
    S, H, L, D = o.shape
    return o.transpose(1, 2).reshape(S * L, H, D).index_select(0, sel)


def _mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    if _ACTIVE.get() is not None:
        return None  # the segments are the mask
    return sdpa_mask(*args, **kwargs)


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL, _attention)
    AttentionMaskInterface.register(IMPL, _mask)
    _registered = True


def _unsupported(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "set_attn_implementation"):
        return "not a transformers model"
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "is_encoder_decoder", False):
        return "encoder-decoder"
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return "sliding-window attention"
    for attr in ("attn_logit_softcapping", "alibi", "position_embedding_type"):
        v = getattr(text, attr, None)
        if v not in (None, False, "absolute", "rope"):
            return f"{attr}={v}"
    if getattr(text, "_attn_implementation", "sdpa") not in ("sdpa", IMPL, None):
        return f"attention implementation {text._attn_implementation!r}"
    return ""


def enable_packing(model: nn.Module) -> bool:
    """Route the model's attention through `tether_packed` (plain SDPA unless a packed forward is running)
    and mark it for packed passes. Returns False, leaving the model as it was, when it cannot be packed."""
    if getattr(model, "_tether_packing", False):
        return True
    if _unsupported(model):
        return False
    _register()
    try:
        model.set_attn_implementation(IMPL)
    except (ValueError, TypeError, AttributeError, ImportError):
        return False
    model._tether_packing = True
    return True


def packing_enabled(model: nn.Module) -> bool:
    return bool(getattr(model, "_tether_packing", False))


@contextlib.contextmanager
def active(layout: PackedBatch):
    token = _ACTIVE.set(layout)
    try:
        yield layout
    finally:
        _ACTIVE.reset(token)


def packed_hidden(body: nn.Module, layout: PackedBatch, used: Tensor | None = None) -> Tensor:
    """Last hidden states of a packed forward of the backbone `body`: [N, H].

    used [n] (optional, distinct): the packed positions whose final hidden state the caller reads (a reward
    model's pooled tokens, the tokens a LM head scores). The last decoder layer then computes its MLP on
    those rows only, and, when they are few (at most a quarter of the tokens, as pooled tokens are), also its
    attention's queries, attention core and output projection: every other position of the last layer only
    provides keys and values. The other rows of the result are not meaningful. Exact: in the last layer a
    position's query, attention output and MLP reach nothing but that position's own final hidden state.
    An RM step on the benchmark runs the last MLP on 16 rows instead of ~1,300 (its MLP is two thirds of a
    GPT-2 layer's linear FLOPs)."""
    layout.calls = 0
    with active(layout), contextlib.ExitStack() as stack:
        if used is not None:
            block = _last_block(body)
            attn = _attention_module(block) if 4 * used.numel() <= layout.n else None
            if attn is not None:
                layout.queries = (attn, used)
                stack.callback(setattr, layout, "queries", None)  # also when the forward raises
            multiple = gemm_multiple(body, layout.input_ids.device)
            for m in _row_local(block, attn):
                stack.enter_context(_on_rows(m, used, multiple))
        token = _PACKED_FORWARD.set(True)
        stack.callback(_PACKED_FORWARD.reset, token)
        hidden = body(input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=False).last_hidden_state
    if layout.calls == 0:
        raise RuntimeError(f"{type(body).__name__}: attention did not go through transformers' attention interface, so a packed "
                           "forward would mix rows; set engine.padding_free=off")
    return hidden[0]


def _last_block(body: nn.Module) -> nn.Module | None:
    """The backbone's last decoder layer (the last of the model's `_no_split_modules` blocks), or None.
    Found once per model (a walk over every module) and kept on it."""
    cached = body.__dict__.get("_tether_last_block")
    if cached is None:
        blocks = set(getattr(body, "_no_split_modules", None) or [])
        last = None
        for m in body.modules():
            if type(m).__name__ in blocks:
                last = m
        cached = body.__dict__["_tether_last_block"] = (last,)  # a tuple: not registered as a submodule
    return cached[0]


def _child(module: nn.Module | None, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        m = getattr(module, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


def _attention_module(block: nn.Module | None) -> nn.Module | None:
    """The block's self-attention module (the `module` transformers passes to the attention function), when
    its output projection is a separate child that can run on some rows; else None."""
    attn = _child(block, ("self_attn", "attn", "attention"))
    return attn if _child(attn, _OUT_PROJ) is not None else None


_OUT_PROJ = ("o_proj", "c_proj", "out_proj", "dense")


def _row_local(block: nn.Module | None, attn: nn.Module | None) -> list[nn.Module]:
    """The last block's modules that act on each position alone and whose output at a position reaches only
    that position's final hidden state: its MLP, and, with the attention restricted to the used queries, the
    attention's output projection and (where it is separate from the keys' and values') query projection."""
    mods = [_child(block, ("mlp",))]
    if attn is not None:
        mods += [_child(attn, _OUT_PROJ), _child(attn, ("q_proj",))]
    return [m for m in mods if m is not None]


@contextlib.contextmanager
def _on_rows(module: nn.Module, rows: Tensor, multiple: int = 1):
    """module(x) for x [1, N, H] computed on x[:, rows] only (zeros elsewhere), for the duration of the block;
    the selected rows padded with zeros to a multiple of `multiple` (gemm_multiple)."""
    full = module.forward

    def forward(x, *args, **kwargs):
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[0] != 1:
            return full(x, *args, **kwargs)
        y = full(pad_rows(x.index_select(1, rows), multiple, 1), *args, **kwargs)
        if not isinstance(y, Tensor):  # e.g. a mixture-of-experts block that also returns router logits
            return full(x, *args, **kwargs)
        return y.new_zeros(1, x.shape[1], y.shape[-1]).index_copy(1, rows, y[:, : rows.numel()])

    module.forward = forward
    try:
        yield
    finally:
        del module.forward  # back to the class's forward
