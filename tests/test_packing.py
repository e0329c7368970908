"""Padding-free, prefix-shared passes (tether.packing) give the padded passes' numbers and gradients."""

import pytest
import torch


def test_pack_layout_by_hand():
    from tether.packing import pack

    # a pair: prompt [1, 2], chosen [3, 4], rejected [5]; the rejected row stores only its own token
    pb = pack([[1, 2, 3, 4], [1, 2, 5]], groups=([0, 0], [2, 2]))
    assert pb.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert pb.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert pb.index.tolist() == [[0, 1, 2, 3], [0, 1, 4, -1]]
    assert pb.segments == [(0, 4, 0, 0), (4, 5, 0, 2)]
    # identical rows: a member keeps at least its last token; other groups never share
    pb = pack([[7, 8], [9, 8], [7, 8]], groups=(["a", "b", "a"], [2, 2, 2]), starts=[1, 0, 1], width=3)
    assert pb.input_ids.tolist() == [[7, 8, 8, 9, 8]]  # group a (rows 0, 2) first, then group b
    assert pb.position_ids.tolist() == [[0, 1, 1, 0, 1]]
    assert pb.index.tolist() == [[-1, 0, 1], [3, 4, -1], [-1, 0, 2]]
    assert pb.segments == [(0, 2, 0, 0), (2, 3, 0, 1), (3, 5, 0, 0)]
    # keys are labels: groups are packed in the order they first appear, whatever the keys' values
    assert pack([[7, 8], [9, 8], [7, 8]], groups=([5, 3, 5], [2, 2, 2])).input_ids.tolist() == [[7, 8, 8, 9, 8]]
    assert pack([[9, 8], [7, 8], [9, 8]], groups=([5, 3, 5], [2, 2, 2])).input_ids.tolist() == [[9, 8, 8, 7, 8]]
    # without groups nothing is shared, only padding goes
    assert pack([[1, 2], [1, 2, 3]]).input_ids.tolist() == [[1, 2, 1, 2, 3]]
    # one causal attention batch: the root [1, 2, 3, 4]; each member's row is the shared prefix's positions
    # [0, 1] then its own, padded by repeating the last; outputs are taken at its own positions only
    plan = pack([[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 7]], groups=([0, 0, 0], [2, 2, 2])).plan("cpu")
    assert plan.idx.tolist() == [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6, 6]]
    assert plan.sel.tolist() == [0, 1, 2, 3, 6, 7, 10]  # packed tokens 0..6 in S x L = 3 x 4
    # the prompt the caller names is shared, and response tokens that begin alike after it
    assert pack([[1, 2, 3, 4], [1, 2, 3, 5]], groups=([0, 0], [2, 2])).input_ids.tolist() == [[1, 2, 3, 4, 5]]
    # a row said to share a prompt it does not have is an error, not a wrong forward pass
    with pytest.raises(ValueError, match="row 1 does not begin with the 2 tokens it is said to share with row 0"):
        pack([[1, 2, 3], [1, 9, 3]], groups=([0, 0], [2, 2]))
    # rounded up to a multiple: a filler segment of its own that no row maps to
    pb = pack([[1, 2, 3, 4], [1, 2, 5]], groups=([0, 0], [2, 2]), multiple=4)
    assert pb.input_ids.tolist() == [[1, 2, 3, 4, 5, 5, 5, 5]] and pb.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 2]]
    assert pb.index.tolist() == [[0, 1, 2, 3], [0, 1, 4, -1]] and pb.segments == [(0, 4, 0, 0), (4, 5, 0, 2), (5, 8, 5, 5)]


def test_gemm_rows_round_up_only_where_onednn_compiles_per_shape(tiny_gpt2):
    from tether.models import load_causal_lm
    from tether.packing import GEMM_ROWS, gemm_multiple, pad_rows

    lm = load_causal_lm(tiny_gpt2)
    assert gemm_multiple(lm, "cpu") == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_multiple(lm, "cpu") == GEMM_ROWS
    assert gemm_multiple(lm.to(torch.bfloat16), "cpu") == GEMM_ROWS and gemm_multiple(lm, "meta") == 1
    x = torch.arange(6.0).view(3, 2)
    assert pad_rows(x, 4).tolist() == [[0, 1], [2, 3], [4, 5], [0, 0]] and pad_rows(x, 3) is x


def test_pack_padded_rejects_holes():
    from tether.packing import pack_padded

    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="row 0: attention mask has holes"):
        pack_padded(ids, torch.tensor([[1, 0, 1]]))


def _pairs(V, pad, seed=0):
    """4 pairs with a shared prompt, right-padded like collate_pairs; chosen rows then rejected rows."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for side in range(2):
        for i in range(4):
            prompt = torch.randint(4, V, (3 + i,), generator=torch.Generator().manual_seed(100 + i)).tolist()
            resp = torch.randint(4, V, (2 + (i + side) % 3 + 3 * side,), generator=g).tolist()
            rows.append((prompt, prompt + resp))
    T = max(len(r) for _, r in rows)
    ids = torch.full((8, T), pad, dtype=torch.long)
    mask = torch.zeros(8, T, dtype=torch.long)
    targets = torch.zeros(8, T)
    for b, (p, r) in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
        targets[b, len(p) : len(r)] = 1
    return ids, mask, targets, (list(range(4)) * 2, [3, 4, 5, 6] * 2)


def _rollouts(V, pad, seed=1):
    """3 prompts x 2 samples: left-padded prompts, responses padded after their end (like HFRollout)."""
    g = torch.Generator().manual_seed(seed)
    P, R = 6, 5
    ids = torch.full((6, P + R), pad, dtype=torch.long)
    mask = torch.zeros(6, P + R, dtype=torch.long)
    for b in range(6):
        plen = 3 + b // 2
        prompt = torch.randint(4, V, (plen,), generator=torch.Generator().manual_seed(b // 2)).tolist()
        ids[b, P - plen : P] = torch.tensor(prompt)
        rlen = [5, 3, 4, 5, 1, 2][b]
        resp = torch.randint(4, V, (rlen,), generator=g)
        if b == 1:
            resp[:2] = ids[0, P : P + 2]  # shares 2 response tokens with its group's first row too
        ids[b, P : P + rlen] = resp
        mask[b, P - plen : P + rlen] = 1
    return ids, mask, P, R


@pytest.fixture(params=[1, 64], ids=["exact", "rows_rounded"])
def rows_multiple(request, monkeypatch):
    """Packed passes with the token count and the head's rows left exact, and rounded up to 64 as bf16 on a
    CPU has them (forced here in float32, where the numbers must not move)."""
    import tether.models
    import tether.packing

    if request.param > 1:
        for mod in (tether.models, tether.packing):
            monkeypatch.setattr(mod, "gemm_multiple", lambda model, device: request.param)
    return request.param


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_packed_passes_equal_padded(arch, request, rows_multiple):
    from tether.models import causal_logprobs, load_causal_lm, load_scalar_model, load_tokenizer, scalar_values, sequence_scores
    from tether.packing import enable_packing, packing_enabled
    from tether.types import RolloutBatch, prompt_groups

    path = request.getfixturevalue(arch)
    tok = load_tokenizer(path)
    V, pad = len(tok), tok.pad_token_id
    lm = load_causal_lm(path).eval()
    torch.manual_seed(0)
    rm = load_scalar_model(path, pad_token_id=pad).eval()
    ids, mask, targets, pair_groups = _pairs(V, pad)
    rids, rmask, P, R = _rollouts(V, pad)
    ro = RolloutBatch(rids, rmask, rmask[:, -R:].float(), torch.zeros(6, R), prompt_length=P, group_ids=[0, 0, 1, 1, 2, 2])
    groups = prompt_groups(ro)
    assert groups == ([0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5])  # the ids it was given, each row's real prompt tokens
    real = rmask[:, -R:].bool()

    def run():
        with torch.no_grad():
            return {
                "targets": causal_logprobs(lm, ids, mask, targets=targets, groups=pair_groups)[0] * targets,
                "full": causal_logprobs(lm, ids, mask, groups=pair_groups)[0] * mask,
                "response": [x * real for x in causal_logprobs(lm, rids, rmask, num_response=R, temperature=0.7, with_entropy=True, groups=groups)],
                "scores": sequence_scores(rm, ids, mask, groups=pair_groups),
                "rollout_scores": sequence_scores(rm, rids, rmask, groups=groups),
                "values": scalar_values(rm, rids, rmask, groups=groups) * rmask,
            }

    padded = run()
    assert enable_packing(lm) and enable_packing(rm) and packing_enabled(lm)
    packed = run()
    for k in padded:
        torch.testing.assert_close(packed[k], padded[k], atol=2e-5, rtol=1e-4, msg=k)
    # the packed rows really are shorter: no padding, each pair's prompt once
    from tether.packing import pack_padded

    assert pack_padded(ids, mask, pair_groups).n < int(mask.sum()) < ids.numel()
    assert pack_padded(ids, mask, pair_groups, rows_multiple).n % rows_multiple == 0


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_packed_gradients_equal_padded(arch, request, rows_multiple):
    from tether.losses import bradley_terry_loss
    from tether.models import causal_logprobs, load_causal_lm, load_scalar_model, load_tokenizer, sequence_scores
    from tether.packing import enable_packing

    path = request.getfixturevalue(arch)
    tok = load_tokenizer(path)
    ids, mask, targets, groups = _pairs(len(tok), tok.pad_token_id)
    grads = {}
    for packed in (False, True):
        torch.manual_seed(0)
        rm = load_scalar_model(path, pad_token_id=tok.pad_token_id)
        lm = load_causal_lm(path)
        if packed:
            enable_packing(rm), enable_packing(lm)
        s = sequence_scores(rm, ids, mask, groups=groups)
        loss, _ = bradley_terry_loss(s[:4], s[4:], 4.0)
        lp, _ = causal_logprobs(lm, ids, mask, targets=targets, groups=groups)
        (loss + (lp * targets).sum()).backward()
        grads[packed] = torch.cat([p.grad.flatten() for m in (rm, lm) for p in m.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[True], grads[False], atol=1e-5, rtol=1e-4)


def test_packed_forward_that_bypasses_the_interface_raises(tiny_gpt2):
    from tether.models import load_scalar_model, load_tokenizer, sequence_scores
    from tether.packing import enable_packing

    tok = load_tokenizer(tiny_gpt2)
    rm = load_scalar_model(tiny_gpt2, pad_token_id=tok.pad_token_id)
    assert enable_packing(rm)
    rm.set_attn_implementation("eager")  # attention no longer reaches the segment function
    ids, mask, _, groups = _pairs(len(tok), tok.pad_token_id)
    with pytest.raises(RuntimeError, match="would mix rows"):
        sequence_scores(rm, ids, mask, groups=groups)


def test_engine_turns_packing_on_for_cpu_only_when_allowed(tiny_gpt2):
    from tether.config import EngineConfig, OptimConfig
    from tether.engine import make_engine
    from tether.models import load_causal_lm
    from tether.packing import packing_enabled

    def on(**kw):
        m = load_causal_lm(tiny_gpt2)
        make_engine(m, EngineConfig(device="cpu", **kw), OptimConfig(), total_steps=1)
        return packing_enabled(m)

    assert on()  # auto on CPU
    assert not on(padding_free="off")
    assert not on(gradient_checkpointing=True)  # the recomputation would run outside the packed context


def test_on_off_overrides_are_not_read_as_booleans():
    from tether.algo.ppo import PPOConfig
    from tether.config import ConfigError, load_config

    cfg = load_config(PPOConfig, None, ["engine.padding_free=off", "rollout.reuse_logprobs=off", "reward.fn=m:f"])
    assert cfg.engine.padding_free == "off" and cfg.rollout.reuse_logprobs == "off"
    assert load_config(PPOConfig, None, ["engine.padding_free=on", "reward.fn=m:f"]).engine.padding_free == "on"
    with pytest.raises(ConfigError, match="'engine.padding_free': must be one of auto, on, off; got 'sometimes'"):
        load_config(PPOConfig, None, ["engine.padding_free=sometimes", "reward.fn=m:f"])


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_last_layer_runs_on_the_used_positions_only(arch, request):
    """A reward model's packed pass runs its last layer's MLP, attention queries and attention output
    projection on the pooled tokens only (the other layers on every packed token); a LM pass, which scores
    most tokens, its last MLP on the scoring positions only; the modules' own forwards come back after."""
    from tether import packing
    from tether.models import causal_logprobs, load_causal_lm, load_scalar_model, load_tokenizer, sequence_scores
    from tether.packing import _attention_module, _last_block, enable_packing, pack_padded

    path = request.getfixturevalue(arch)
    tok = load_tokenizer(path)
    ids, mask, targets, groups = _pairs(len(tok), tok.pad_token_id)
    pb = pack_padded(ids, mask, groups)
    n = pb.n
    for model in (load_scalar_model(path, pad_token_id=tok.pad_token_id), load_causal_lm(path)):
        enable_packing(model)
        body = model.base_model
        block = _last_block(body)
        first = next(m for m in body.modules() if type(m).__name__ in body._no_split_modules)
        assert block is not None and first is not block
        out_proj = {"gpt2": "c_proj", "llama": "o_proj"}[model.config.model_type]
        watched = {"first mlp": next(first.mlp.children()), "last mlp": next(block.mlp.children()),
                   "first out": getattr(_attention_module(first), out_proj), "last out": getattr(_attention_module(block), out_proj)}
        if model.config.model_type == "llama":
            watched["last q"] = block.self_attn.q_proj
        rows = {}

        def seen(k, a, out):  # the MLPs' first projections (GPT-2 c_fc, Llama gate_proj): their input rows;
            # the projections computed on some rows only (zeros elsewhere): their non-zero output rows
            rows[k] = a[0].shape[1] if "mlp" in k else int(out[0].abs().sum(-1).ne(0).sum())

        hooks = [m.register_forward_hook(lambda mod, a, out, k=k: seen(k, a, out)) for k, m in watched.items()]
        queries = []
        real = packing._query_attention
        packing._query_attention = lambda qp, q, *a: queries.append(qp.rows.numel()) or real(qp, q, *a)
        try:
            if hasattr(model, "score"):
                sequence_scores(model, ids, mask, groups=groups)
                used = len(ids)  # one pooled token per row
                expect = {"first mlp": n, "last mlp": used, "first out": n, "last out": used, "last q": used}
                assert queries == [used]  # one restricted attention: the last layer's
            else:
                causal_logprobs(model, ids, mask, targets=targets, groups=groups)
                # position t-1 predicts target t; a pair's shared prompt's last token predicts both first response tokens
                scored = (targets[:, 1:] != 0) & (pb.index[:, 1:] >= 0)
                used = pb.index[:, :-1][scored].unique().numel()
                assert used < int(scored.sum()) and 4 * used > n
                expect = {"first mlp": n, "last mlp": used, "first out": n, "last out": n, "last q": n}
                assert queries == []  # most tokens are scored: the attention stays whole
        finally:
            packing._query_attention = real
            for h in hooks:
                h.remove()
        assert rows == {k: v for k, v in expect.items() if k in watched} and used < n
        assert all("forward" not in vars(m) for m in watched.values())


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_restricted_last_layer_equals_the_whole_pass_at_any_used_positions(arch, request):
    """Used positions anywhere in the segments (several in one segment, none in others, a member's first
    token right after its shared prefix): their final hidden states and the gradients through them equal
    the unrestricted packed pass's."""
    from tether import packing
    from tether.models import load_scalar_model, load_tokenizer
    from tether.packing import enable_packing, pack_padded, packed_hidden

    path = request.getfixturevalue(arch)
    tok = load_tokenizer(path)
    ids, mask, _, groups = _pairs(len(tok), tok.pad_token_id)
    pb = pack_padded(ids, mask, groups)
    member_first = pb.segments[1][0]  # the first own token of a row that shares its group's prompt
    used = torch.tensor(sorted({0, 2, 3, member_first, pb.n - 1}))
    assert 4 * used.numel() <= pb.n and pb.segments[1][3] > pb.segments[1][2]
    out = {}
    for restricted in (False, True):
        torch.manual_seed(0)
        rm = load_scalar_model(path, pad_token_id=tok.pad_token_id)
        enable_packing(rm)
        calls = []
        real = packing._query_attention
        packing._query_attention = lambda qp, *a: calls.append(qp.mask.shape) or real(qp, *a)
        try:
            h = packed_hidden(rm.base_model, pb, used=used if restricted else None)[used]
        finally:
            packing._query_attention = real
        (h * torch.linspace(-1, 1, h.shape[-1])).sum().backward()
        out[restricted] = (h.detach(), torch.cat([p.grad.flatten() for p in rm.parameters() if p.grad is not None]))
        assert len(calls) == int(restricted)
    assert calls[0][2] >= 2  # one segment holds several used queries
    torch.testing.assert_close(out[True][0], out[False][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-4)


def test_a_packed_row_ending_in_eos_draws_no_attention_mask_warning(tiny_gpt2):
    """A packed forward passes no attention mask by design; transformers warned ("We strongly recommend
    passing in an `attention_mask`") whenever the packed row began or ended with the pad id, which is
    EOS here: once per run, in the demo's terminal. A plain call without a mask still warns."""
    import logging

    from transformers.utils import logging as hf_logging

    from tether.models import causal_logprobs, load_causal_lm, load_tokenizer
    from tether.packing import enable_packing

    tok = load_tokenizer(tiny_gpt2)
    lm = load_causal_lm(tiny_gpt2).eval()
    eos = tok.eos_token_id
    lm.config.pad_token_id = eos
    ids = torch.tensor([[5, 6, 7, eos], [8, 9, 10, eos]])
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("transformers.modeling_utils")
    log.addHandler(handler)
    try:
        assert enable_packing(lm)
        hf_logging.get_logger("transformers.modeling_utils").warning_once.cache_clear()
        with torch.no_grad():
            causal_logprobs(lm, ids, torch.ones_like(ids))
        assert not any("attention_mask" in m for m in seen), seen
        hf_logging.get_logger("transformers.modeling_utils").warning_once.cache_clear()
        with torch.no_grad():
            lm(input_ids=ids)  # the check itself still works outside packed passes
        assert any("attention_mask" in m for m in seen), seen
    finally:
        log.removeHandler(handler)
