"""Offline preference optimisation beyond DPO (issue 22): R-DPO, SimPO and ORPO as `tether dpo` loss types,
KTO as `tether kto`. Hand-derived loss values, micro-batch invariance, learning on a tiny model, no
reference model for the reference-free losses, one-line bad-record errors, one step each on SmolLM2."""

import copy
import json
import math
import random

import pytest
import torch

from helpers import write_jsonl

from tether import losses as L
from tether.algo import dpo, kto
from tether.cli import main as cli
from tether.config import ConfigError, EngineConfig, OptimConfig, load_config
from tether.data import DataError, load_kto
from tether.engine.local import LocalEngine
from tether.models import load_causal_lm
from tether.track import read_metrics
from tether.types import KTOBatch, PairBatch

POSITIVE = "good great wonderful amazing excellent brilliant fun nice".split()
NEGATIVE = "bad awful terrible boring dull poor worst sad".split()
TOPICS = "movie film story plot actor scene music camera director cast ending role".split()


def sig(x):
    return 1 / (1 + math.exp(-x))


# -- hand-derived values -----------------------------------------------------------------------------


def test_rdpo_hand():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])
    h, beta, alpha = (-1 + 2) - (-3 + 2.5), 0.5, 0.1  # h = 1.5
    # chosen 5 response tokens, rejected 3: the longer winner pays alpha * 2 inside the sigmoid
    loss, m = L.dpo_loss(pc, pr, rc, rr, 1, beta, L.DPOLoss.RDPO, alpha=alpha, length_diff=torch.tensor([2.0]))
    assert loss.item() == pytest.approx(-math.log(sig(beta * h - alpha * 2)), rel=1e-6)
    assert m["rewards/margin"].item() == pytest.approx(beta * h)
    plain, _ = L.dpo_loss(pc, pr, rc, rr, 1, beta, L.DPOLoss.RDPO, alpha=0.0, length_diff=torch.tensor([2.0]))
    assert plain.item() == pytest.approx(-math.log(sig(beta * h)), rel=1e-6)  # alpha = 0 is DPO


def test_rpo_nll_term_hand():
    # two pairs; chosen sums -6 over 3 tokens and -2 over 4: DPO plus 0.5 x the mean per-token NLL (2 and 0.5)
    pc, pr, rc, rr = torch.tensor([-6.0, -2.0]), torch.tensor([-7.0, -1.0]), torch.tensor([-5.0, -2.0]), torch.tensor([-5.0, -2.0])
    beta = 0.1
    plain = (-math.log(sig(beta * (-1 + 2))) - math.log(sig(beta * (0 - 1)))) / 2
    loss, m = L.dpo_loss(pc, pr, rc, rr, 2, beta, nll_coef=0.5, chosen_tokens=torch.tensor([3.0, 4.0]))
    assert loss.item() == pytest.approx(plain + 0.5 * (2.0 + 0.5) / 2, rel=1e-6)
    assert m["loss/rpo_nll"].item() == pytest.approx(1.25)
    # already averaged per token (SimPO): the term is -log pi itself
    loss_s, _ = L.dpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), None, None, 1, 2.0, L.DPOLoss.SIMPO, gamma=0.5, nll_coef=1.0)
    assert loss_s.item() == pytest.approx(-math.log(sig(2.0 * 0.5 - 0.5)) + 0.5, rel=1e-6)
    with pytest.raises(ConfigError, match="config key 'nll_coef': loss=orpo has its own NLL term"):
        load_config(dpo.DPOConfig, None, ["loss=orpo", "nll_coef=1"])


def test_simpo_hand():
    # average per-token logprobs; no reference
    pc, pr = torch.tensor([-0.5, -2.0]), torch.tensor([-1.25, -1.0])
    beta, gamma = 2.0, 0.5
    loss, m = L.dpo_loss(pc, pr, None, None, 2, beta, L.DPOLoss.SIMPO, gamma=gamma)
    expected = (-math.log(sig(2.0 * 0.75 - 0.5)) - math.log(sig(2.0 * -1.0 - 0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx((-1.0 - 4.0) / 2)  # beta * average logprob
    assert m["rewards/accuracy"].item() == 0.5


def test_orpo_hand():
    pc, pr = torch.log(torch.tensor([0.4, 0.5])), torch.log(torch.tensor([0.2, 0.6]))
    lam = 0.1
    loss, m = L.dpo_loss(pc, pr, None, None, 2, lam, L.DPOLoss.ORPO)
    lor = [math.log((0.4 / 0.6) / (0.2 / 0.8)), math.log((0.5 / 0.5) / (0.6 / 0.4))]
    nll = [-math.log(0.4), -math.log(0.5)]
    expected = sum(n - lam * math.log(sig(x)) for n, x in zip(nll, lor)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["loss/nll"].item() == pytest.approx(sum(nll) / 2, rel=1e-6)
    assert m["orpo/log_odds_ratio"].item() == pytest.approx(sum(lor) / 2, rel=1e-6)


def test_kto_hand():
    lp, ref = torch.tensor([-2.0, -3.0, -1.0]), torch.tensor([-2.5, -2.0, -1.0])
    desirable = torch.tensor([True, False, False])
    z0, beta, wd, wu = 0.2, 0.5, 1.0, 1.5
    loss, m = L.kto_loss(lp, ref, desirable, z0, 3, beta, wd, wu)
    r = [0.5, -1.0, 0.0]
    expected = ((wd - wd * sig(beta * (r[0] - z0))) + (wu - wu * sig(beta * (z0 - r[1]))) + (wu - wu * sig(beta * (z0 - r[2])))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rewards/accuracy"].item() == pytest.approx(1.0)  # 0.5 > z0 desirable; -1, 0 < z0 undesirable
    assert m["rewards/desirable"].item() == pytest.approx(beta * 0.5)
    assert m["rewards/undesirable"].item() == pytest.approx(beta * -0.5)
    # policy == reference and z0 = 0: every example loses half its weight
    loss0, _ = L.kto_loss(ref, ref, desirable, 0.0, 3, beta, wd, wu)
    assert loss0.item() == pytest.approx((wd + 2 * wu) / 2 / 3, rel=1e-6)


def test_the_enum_answers_needs_reference():
    assert {k.value for k in L.DPOLoss if not k.needs_reference} == {"simpo", "orpo"}
    assert {k.value for k in L.DPOLoss if k.length_normalised} == {"ipo", "simpo", "orpo"}


def test_config_errors():
    with pytest.raises(ConfigError, match="'alpha'.*only applies to loss=rdpo"):
        load_config(dpo.DPOConfig, None, ["loss=sigmoid", "alpha=0.1"])
    with pytest.raises(ConfigError, match="'ref_model'.*loss=orpo uses no reference model"):
        load_config(dpo.DPOConfig, None, ["loss=orpo", "ref_model=somewhere"])
    with pytest.raises(ConfigError, match="'batch_size'.*at least 2"):
        load_config(kto.KTOConfig, None, ["batch_size=1"])


def test_help_lists_the_new_keys(capsys):
    for stage, keys in (("dpo", ("loss (sigmoid|ipo|hinge|rdpo|simpo|orpo", "gamma (float", "alpha (float", "nll_coef (float", "ORPO's lambda")),
                        ("kto", ("beta (float", "desirable_weight (float", "undesirable_weight (float", "ref_model (str"))):
        with pytest.raises(SystemExit):
            cli([stage, "--help"])
        out = capsys.readouterr().out
        for k in keys:
            assert k in out, (stage, k)


# -- micro-batch invariance ----------------------------------------------------------------------------


def _grads_and_metrics(base, batch, loss_fn_for, micros=(0, 3)):
    out = []
    for micro in micros:
        eng = LocalEngine(copy.deepcopy(base), EngineConfig(micro_batch_size=micro), OptimConfig(lr=1e-2, grad_clip=0.0, eps=1e-3))
        grads, orig = {}, eng._step

        def spy(metrics, eng=eng, grads=grads, orig=orig):
            grads.update({k: p.grad.detach().clone() for k, p in eng.model.named_parameters() if p.grad is not None})
            return orig(metrics)

        eng._step = spy
        out.append((eng.train_step(batch, loss_fn_for(len(batch))), grads))
    return out


def _pair_batch(V, seed=0, with_ref=True):
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 9
    fields = {}
    for side, cut in (("chosen", 6), ("rejected", 4)):
        attn = torch.ones(B, T, dtype=torch.long)
        attn[::2, cut:] = 0  # right padding, different lengths per side (R-DPO sees a length difference)
        loss_mask = attn.float().clone()
        loss_mask[:, :3] = 0  # prompt
        fields |= {f"{side}_input_ids": torch.randint(5, V, (B, T), generator=g), f"{side}_attention_mask": attn, f"{side}_loss_mask": loss_mask}
    ref = {"ref_chosen_logps": -20 - torch.rand(B, generator=g), "ref_rejected_logps": -20 - torch.rand(B, generator=g)} if with_ref else {}
    return PairBatch(**fields, **ref)


@pytest.mark.parametrize("loss,extra", [("rdpo", ["alpha=0.05"]), ("simpo", ["beta=2", "gamma=0.5"]), ("orpo", [])])
def test_microbatch_invariance_dpo_family(tiny_gpt2, loss, extra):
    cfg = load_config(dpo.DPOConfig, None, [f"loss={loss}", *extra])
    base = load_causal_lm(tiny_gpt2)
    dpo.disable_dropout(base)
    batch = _pair_batch(base.config.vocab_size, with_ref=cfg.kind.needs_reference)
    (m8, g8), (m3, g3) = _grads_and_metrics(base, batch, lambda n: dpo.dpo_loss_fn(cfg, float(n)))
    assert m8["loss/dpo"] == pytest.approx(m3["loss/dpo"], rel=1e-6, abs=1e-6)
    assert g8 and g8.keys() == g3.keys()
    for k in g8:
        assert torch.allclose(g8[k], g3[k], atol=1e-6, rtol=1e-4), k


def test_microbatch_invariance_kto(tiny_gpt2):
    cfg = load_config(kto.KTOConfig, None, ["beta=0.5", "undesirable_weight=1.3"])
    base = load_causal_lm(tiny_gpt2)
    dpo.disable_dropout(base)
    pb = _pair_batch(base.config.vocab_size)
    batch = KTOBatch(pb.chosen_input_ids, pb.chosen_attention_mask, pb.chosen_loss_mask,
                     torch.tensor([True, False, False, True, True, False, True, False]), pb.ref_chosen_logps)
    (m8, g8), (m3, g3) = _grads_and_metrics(base, batch, lambda n: kto.kto_loss_fn(cfg, 0.3, float(n)))
    assert m8["loss/kto"] == pytest.approx(m3["loss/kto"], rel=1e-6, abs=1e-6)
    assert g8 and g8.keys() == g3.keys()
    for k in g8:
        assert torch.allclose(g8[k], g3[k], atol=1e-6, rtol=1e-4), k


# -- learning on a tiny model ------------------------------------------------------------------------


def _pairs(path, n, seed):
    rng = random.Random(seed)
    return write_jsonl(path, [{"prompt": f"the {rng.choice(TOPICS)} was",
                               "chosen": " " + " ".join(rng.choice(POSITIVE) for _ in range(rng.randint(1, 3))),
                               "rejected": " " + " ".join(rng.choice(NEGATIVE) for _ in range(rng.randint(1, 3)))} for _ in range(n)])


def _unpaired(path, n, seed):
    """Thumbs up for positive words, down for negative ones; no two records form a pair on purpose."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        good = i % 2 == 0
        words = POSITIVE if good else NEGATIVE
        recs.append({"prompt": f"the {rng.choice(TOPICS)} was", "completion": " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 3))),
                     "label": good})
    return write_jsonl(path, recs)


COMMON = ["batch_size=8", "optim.lr=1e-3", "engine.threads=1", "track.progress=false", "max_steps=30", "eval_every=10"]


@pytest.mark.parametrize("loss,extra", [("simpo", ["beta=2", "gamma=0.5"]), ("orpo", ["beta=0.5"])])
def test_reference_free_losses_learn_without_loading_a_reference(tiny_gpt2, tmp_path, monkeypatch, loss, extra):
    loads = []

    def counted(*a, **k):
        loads.append(a)
        return load_causal_lm(*a, **k)

    def forbidden(*a, **k):
        raise AssertionError("a reference-free loss must not compute reference logprobs")

    monkeypatch.setattr(dpo, "load_causal_lm", counted)
    monkeypatch.setattr(dpo, "make_reference", forbidden)
    monkeypatch.setattr(dpo, "reference_logps", forbidden)
    cfg = load_config(dpo.DPOConfig, None, [f"model={tiny_gpt2}", f"data.train={_pairs(tmp_path / 't.jsonl', 48, 0)}",
                                            f"data.eval={_pairs(tmp_path / 'e.jsonl', 32, 1)}", f"out={tmp_path / 'run'}", f"loss={loss}", *extra, *COMMON])
    summary = dpo.train(cfg)
    assert len(loads) == 1  # the policy only
    assert not (tmp_path / "run" / dpo.REF_CACHE).exists()
    rows = read_metrics(tmp_path / "run")
    evals = [r["eval/rewards_accuracy"] for r in rows if "eval/rewards_accuracy" in r]
    assert evals[-1] > 0.9, evals  # held-out pairs: chosen's (length-normalised) reward above rejected's
    assert summary["eval/rewards_margin"] > 0
    assert rows[-1]["loss/dpo"] < rows[0]["loss/dpo"] - 0.1


def test_rdpo_learns(tiny_gpt2, tmp_path):
    cfg = load_config(dpo.DPOConfig, None, [f"model={tiny_gpt2}", f"data.train={_pairs(tmp_path / 't.jsonl', 48, 0)}",
                                            f"data.eval={_pairs(tmp_path / 'e.jsonl', 32, 1)}", f"out={tmp_path / 'run'}", "loss=rdpo", "alpha=0.05", *COMMON])
    dpo.train(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["eval/rewards_accuracy"] for r in rows if "eval/rewards_accuracy" in r][-1] > 0.9
    assert (tmp_path / "run" / dpo.REF_CACHE).exists()  # R-DPO has a reference


def test_kto_learns_from_unpaired_labels(tiny_gpt2, tmp_path):
    cfg = load_config(kto.KTOConfig, None, [f"model={tiny_gpt2}", f"data.train={_unpaired(tmp_path / 't.jsonl', 64, 0)}",
                                            f"data.eval={_unpaired(tmp_path / 'e.jsonl', 32, 1)}", f"out={tmp_path / 'run'}", *COMMON])
    summary = kto.train(cfg)
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["kto/z0"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    assert rows[0]["loss/kto"] == pytest.approx(0.5, abs=1e-4)  # lambda_y - lambda_y sigma(0)
    # at the start every example's loss is 0.5 and the accuracy the share of undesirable ones (r = z0 = 0): 0.5
    assert rows[-1]["eval/loss_kto"] < 0.42
    evals = [r["eval/rewards_accuracy"] for r in rows if "eval/rewards_accuracy" in r]
    assert evals[-1] > 0.9, evals  # held-out examples whose implicit reward is on their label's side of z0
    assert summary["eval/rewards_desirable"] > 0 > summary["eval/rewards_undesirable"]


def test_kto_resume_equivalence(tiny_gpt2, tmp_path):
    data = _unpaired(tmp_path / "t.jsonl", 32, 0)

    def run(out, *extra):
        kto.train(load_config(kto.KTOConfig, None, [f"model={tiny_gpt2}", f"data.train={data}", f"out={out}", "batch_size=8", "optim.lr=1e-3",
                                                    "track.progress=false", "save_every=2", *extra]))

    run(tmp_path / "a", "max_steps=4")
    run(tmp_path / "b", "max_steps=2")
    run(tmp_path / "b", "max_steps=4", "resume=true")
    def keep(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("time", "speed/"))} for r in rows]

    assert keep(read_metrics(tmp_path / "a")) == keep(read_metrics(tmp_path / "b"))
    wa, wb = load_causal_lm(tmp_path / "a" / "final").state_dict(), load_causal_lm(tmp_path / "b" / "final").state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# -- data errors ---------------------------------------------------------------------------------------


def test_kto_bad_records_are_one_line(tiny_gpt2, tmp_path, capsys):
    f = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "a", "completion": " b", "label": True}, {"prompt": "a", "completion": " c"}])
    with pytest.raises(DataError, match=rf"^{f}:2: field 'label' is missing \(true = desirable, false = undesirable\)"):
        load_kto(str(f))
    g = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "completion": " b", "label": "yes"}])
    with pytest.raises(DataError, match=rf"^{g}:1: field 'label' must be true or false, got 'yes'"):
        load_kto(str(g))
    h = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c", "label": True}])
    with pytest.raises(DataError, match=rf"^{h}:1: field 'completion' is missing"):  # a preference pair is not a KTO record
        load_kto(str(h))
    items, report = load_kto(f"{f},{g}", "skip")
    assert len(items) == 1 and items[0].label is True and sum(report.skipped.values()) == 2
    assert cli(["kto", f"model={tiny_gpt2}", f"data.train={f}", f"out={tmp_path / 'run'}", "max_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"tether kto: {f}:2: field 'label' is missing") and not any("Traceback" in x for x in err)
    assert not (tmp_path / "run" / "final").exists()


def test_kto_held_out_split_reads_back(tiny_gpt2, tmp_path):
    cfg = load_config(kto.KTOConfig, None, [f"model={tiny_gpt2}", f"data.train={_unpaired(tmp_path / 't.jsonl', 12, 0)}", "data.eval_fraction=0.25",
                                            f"out={tmp_path / 'run'}", "batch_size=4", "max_steps=1", "track.progress=false"])
    kto.train(cfg)
    held, _ = load_kto(str(tmp_path / "run" / "held_out.jsonl"))
    assert len(held) == 3 and all(isinstance(x.label, bool) for x in held)


# -- one step each on SmolLM2 ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rdpo", "simpo", "orpo", "kto"])
def test_one_step_on_smollm2(smollm2_dir, tmp_path, method):
    msgs = [{"role": "user", "content": "Say something kind."}]
    good, bad = [{"role": "assistant", "content": "You are doing great."}], [{"role": "assistant", "content": "Go away."}]
    args = [f"model={smollm2_dir}", "max_steps=1", "batch_size=2", "optim.lr=1e-6", "track.progress=false", f"out={tmp_path / 'run'}"]
    if method == "kto":
        data = write_jsonl(tmp_path / "k.jsonl", [{"prompt": msgs, "completion": good, "label": True}, {"prompt": msgs, "completion": bad, "label": False}])
        summary = kto.train(load_config(kto.KTOConfig, None, [*args, f"data.train={data}"]))
        r = read_metrics(tmp_path / "run")[-1]
        assert r["kto/z0"] == pytest.approx(0.0, abs=1e-4) and r["loss/kto"] == pytest.approx(0.5, abs=1e-3)  # policy == reference
    else:
        data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": msgs, "chosen": good, "rejected": bad}] * 2)
        summary = dpo.train(load_config(dpo.DPOConfig, None, [*args, f"data.train={data}", f"loss={method}"]))
        r = read_metrics(tmp_path / "run")[-1]
        assert math.isfinite(r["loss/dpo"]) and (tmp_path / "run" / dpo.REF_CACHE).exists() == (method == "rdpo")
        if method == "rdpo":  # policy == reference: -log sigma(-alpha (|y_c| - |y_r|)) with alpha = 0
            assert r["loss/dpo"] == pytest.approx(0.6931, abs=1e-3)
    assert summary["steps"] == 1 and (tmp_path / "run" / "final" / "config.json").exists()
