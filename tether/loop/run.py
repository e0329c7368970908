"""Iterative RLHF: rounds of sample -> select -> collect -> reward model -> policy -> evaluate.

    tether loop --config loop.yaml            # R rounds; every stage resumable
    tether loop --quick --out runs/loop-quick  # 2 tiny rounds with simulated annotators (what CI runs)
    tether loop select=margin rounds=4 labels_per_round=400 collect.source=app collect.members=[ann1,ann2]

Each round r, from the current policy (round r-1's, the SFT model in round 1):
  samples  K responses to a fresh batch of prompts (a share from earlier policies with earlier_share)
  tasks    the round's labelling budget of pairs: random, or the reward model's most uncertain pairs
           (select=margin: |r_a - r_b| smallest; select=ensemble: rm_ensemble models disagree most)
  labels   from simulated annotators, the feedback app (a project per round; waits for its quota), or an AI judge
  rm       a reward model on every label so far (rm_mode=retrain from the SFT model, or continue from the last
           RM), early stopping on held-out labels; shift.json: the old and new RM on this round's fresh pairs
  policy   PPO against that RM (or iterative DPO on the round's labels) from the current policy, KL to SFT
  eval     held-out prompts: gold reward, win rate against SFT and the previous round, KL to SFT, length,
           the RM's accuracy on the new policy's samples, reward-hacking flags
Everything lands in <out>/round_<r>/<stage>/ (stage.json marks a finished stage: a rerun skips it, and a
stage that was interrupted is redone from its start; TETHER_LOOP_KILL_AT=<round>/<stage> SIGKILLs the
process just before that stage is marked, which is how the tests kill it). report.md, metrics.json and rounds.png at the end.
Without sft_model the loop first runs the demo's pretraining (cached) and SFT into <out>/setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.config import ConfigError, RunStopped, check, doc, load_config, save_config, sub
from tether.demo.io import read_jsonl, write_json, write_jsonl
from tether.judges.annotators import AnnotatorConfig
from tether.loop.collect import CollectConfig
from tether.loop.select import RULES

STAGES = ("samples", "tasks", "labels", "rm", "policy", "eval")

# The loop's settings of the stages it trains, over the demo's (tether demo --help): PPO per round is
# shorter than the demo's single run.
LOOP_SETTINGS = {"rm": {}, "ppo": {"max_steps": 20}, "dpo": {}}


@dataclass(frozen=True)
class LoopConfig:
    out: str = doc("runs/loop", "run folder: setup/, round_<r>/<stage>/, report.md, metrics.json, rounds.png")
    seed: int = doc(0, "random seed of every stage (round r trains with seed + r)")
    rounds: int = doc(3, "rounds of collect -> reward model -> policy")
    prompts_per_round: int = doc(200, "fresh prompts sampled each round (rounds x this many must exist)")
    samples_per_prompt: int = doc(4, "responses per prompt; every distinct pair of them is a candidate")
    labels_per_round: int = doc(400, "pairs sent for labelling each round (the budget)")
    earlier_share: float = doc(0.0, "share of each prompt's responses sampled from an earlier policy (SFT included), for coverage")
    select: str = doc("random", "which pairs get labelled: random, margin (smallest |r_a - r_b| under the last RM) or ensemble (largest disagreement of rm_ensemble RMs); round 1 has no RM yet and is random")
    rm_ensemble: int = doc(1, "reward models trained per round (bootstrap resamples, other seeds); select=ensemble needs >= 2")
    rm_mode: str = doc("retrain", "retrain: a fresh RM from the SFT model on all labels so far; continue: from the last round's RM, on all labels so far")
    rm_holdout: float = doc(0.2, "share of each round's labels held out (early stopping and the shift figures)")
    policy: str = doc("ppo", "ppo: PPO against the round's RM; dpo: iterative DPO on the round's labels; both from the current policy, KL to the SFT model")
    gold: str = doc("vader", "the gold judge (tether.judges spec): simulated annotators, gold items and the evaluation")
    n_eval_prompts: int = doc(200, "held-out prompts of every round's evaluation (the same each round)")
    sft_model: str = doc("", "the SFT policy folder (empty = run the demo's pretraining and SFT into <out>/setup)")
    prompts: str = doc("", "jsonl of training prompts ('prompt' field); empty = the setup's feedback prompts")
    eval_prompts: str = doc("", "jsonl of held-out prompts; empty = the setup's eval prompts")
    setup: dict = doc({}, "keys of `tether demo --help` for the setup and the sampling settings (max_new_tokens, precision, pretrain.*, sft.*)")
    rm: dict = doc({}, "the reward-model stage: keys of `tether rm --help` (over the demo's settings)")
    ppo: dict = doc({}, "the PPO stage: keys of `tether ppo --help` (over the demo's settings, max_steps=20 a round)")
    dpo: dict = doc({}, "the DPO stage: keys of `tether dpo --help` (over the demo's settings)")
    annotators: AnnotatorConfig = sub(AnnotatorConfig, "collect.source=simulated: the simulated annotators")
    collect: CollectConfig = sub(CollectConfig, "where labels come from")

    def validate(self, p: str = "") -> None:
        check(self.rounds >= 1, f"{p}rounds", "must be >= 1")
        check(self.samples_per_prompt >= 2, f"{p}samples_per_prompt", "must be >= 2 (pairs are compared)")
        check(self.prompts_per_round >= 1 and self.labels_per_round >= 1, f"{p}labels_per_round", "budgets must be >= 1")
        check(0 <= self.earlier_share < 1, f"{p}earlier_share", "must be in [0, 1)")
        check(self.select in RULES, f"{p}select", f"must be one of {', '.join(RULES)}")
        check(self.select != "ensemble" or self.rm_ensemble >= 2, f"{p}rm_ensemble", "select=ensemble needs rm_ensemble >= 2")
        check(self.rm_mode in ("retrain", "continue"), f"{p}rm_mode", "must be retrain or continue")
        check(0 < self.rm_holdout < 1, f"{p}rm_holdout", "must be in (0, 1)")
        check(self.policy in ("ppo", "dpo"), f"{p}policy", "must be ppo or dpo")
        check(bool(self.prompts) == bool(self.eval_prompts) and (not self.prompts or bool(self.sft_model)), f"{p}prompts",
              "set sft_model, prompts and eval_prompts together (or none: the demo's setup makes all three)")


QUICK = ["rounds=2", "prompts_per_round=24", "samples_per_prompt=4", "labels_per_round=48", "collect.min_labels=4", "n_eval_prompts=16",
         "ppo.max_steps=2", "ppo.batch_size=8", "ppo.ppo.minibatch_size=8", "ppo.ppo.epochs=1", "rm.max_steps=6",
         "dpo.max_steps=4", "annotators.pool_size=6", "collect.gold_items=3", "setup.n_eval_prompts=16"]


def demo_config(cfg: LoopConfig, seed: int):
    """The demo's config that the loop's stages are built from: setup keys, the loop's stage keys."""
    from tether.config import _build
    from tether.demo.sentiment import QUICK as DEMO_QUICK, DemoConfig, _merge
    from tether.config import _parse_override, _set

    tree: dict = {}
    for item in DEMO_QUICK if cfg.setup.get("quick") else []:
        k, v = _parse_override(item)
        _set(tree, k, v)
    tree = _merge(tree, {k: v for k, v in cfg.setup.items() if k != "quick"})
    stages = {name: _merge(_merge(LOOP_SETTINGS[name], tree.get(name, {})), getattr(cfg, name)) for name in ("rm", "ppo", "dpo")}
    tree = _merge(tree, {"out": str(Path(cfg.out) / "setup"), "seed": seed, "n_feedback_prompts": max(
        tree.get("n_feedback_prompts", 0), cfg.rounds * cfg.prompts_per_round), **stages})
    try:
        return _build(DemoConfig, tree, "")
    except ConfigError as e:
        raise ConfigError(str(e).replace("config key '", "config key 'setup.", 1) if not any(
            f"'{n}." in str(e) for n in ("rm", "ppo", "dpo")) else str(e)) from None


def _console():
    from tether.track import console

    return console


def _held_out(task_id: str, share: float) -> bool:
    return int(hashlib.sha256(task_id.encode()).hexdigest()[:8], 16) % 10_000 < share * 10_000


def pair_accuracy(scores: list[tuple[float, float]], gold: list[tuple[float, float]]) -> dict:
    """Share of pairs the scores order as gold does (gold ties left out), and how many were compared."""
    n = right = 0
    for (a, b), (ga, gb) in zip(scores, gold):
        if ga != gb:
            n += 1
            right += (a - b) * (ga - gb) > 0
    return {"accuracy": right / n if n else None, "pairs": n}


class Loop:
    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.demo = demo_config(cfg, cfg.seed)
        from tether.judges import get_judge

        self.gold = get_judge(cfg.gold)

    def d(self, r: int, stage: str) -> Path:
        return self.out / f"round_{r}" / stage

    def stage(self, r: int, name: str, fn) -> Any:
        """Run fn once: a finished stage (stage.json) is reused; an unfinished one starts again from empty."""
        folder = self.d(r, name)
        done = folder / "stage.json"
        console = _console()
        if done.exists():
            console.print(f"round {r} {name}: done (reused)", highlight=False)
            return json.loads(done.read_text())["result"]
        console.rule(f"[bold]round {r}/{self.cfg.rounds}: {name}[/bold]")
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        t = time.perf_counter()
        result = fn(folder)
        if os.environ.get("TETHER_LOOP_KILL_AT") == f"{r}/{name}":  # fault injection for the resume tests: a real SIGKILL
            os.kill(os.getpid(), signal.SIGKILL)  # at the worst moment (every output written, the stage not yet marked)
        write_json(done, {"stage": name, "round": r, "wall_s": round(time.perf_counter() - t, 1), "result": result})
        return result

    # -- the starting point ---------------------------------------------------------------------
    def setup(self) -> dict:
        """The SFT policy, the prompts and the SFT model's held-out samples every round is compared with."""
        cfg = self.cfg
        if cfg.sft_model:
            paths = {"sft": cfg.sft_model, "prompts": cfg.prompts, "eval_prompts": cfg.eval_prompts}
        else:
            from tether.demo.sentiment import Demo

            demo = Demo(self.demo, start_from="sample")  # finished pretrain / sft stages are reused
            demo.n_stages = 2
            base = demo.run_stage(1, "pretrain", demo.pretrain)["model"]
            sft = demo.run_stage(2, "sft", lambda: demo.sft(base))["model"]
            data = Path(self.demo.out) / "data"
            paths = {"sft": sft, "prompts": str(data / "prompts_feedback.jsonl"), "eval_prompts": str(data / "prompts_eval.jsonl")}
        for key in ("prompts", "eval_prompts"):
            if not Path(paths[key]).exists():
                raise ConfigError(f"{key}: {paths[key]} does not exist")
        self.sft_dir = paths["sft"]
        self.prompts = [r["prompt"] for r in read_jsonl(Path(paths["prompts"]))]
        self.eval_prompts = [r["prompt"] for r in read_jsonl(Path(paths["eval_prompts"]))][: cfg.n_eval_prompts]
        self.paths = paths
        need = cfg.rounds * cfg.prompts_per_round
        if len(self.prompts) < need:
            raise ConfigError(f"prompts: {paths['prompts']} has {len(self.prompts)} prompts; rounds x prompts_per_round needs {need}")
        return self.stage(0, "eval", self._sft_eval)

    def _sft_eval(self, folder: Path) -> dict:
        from tether.demo.sentiment import Models

        m = Models(self.demo, self.sft_dir)
        gen = m.generate(m.sft, self.eval_prompts, k=2, seed=self.cfg.seed + 100, want_logprobs=True)
        gold = self.gold([p for p in self.eval_prompts for _ in range(2)], gen["responses"])
        write_jsonl(folder / "samples.jsonl", [{"prompt": p, "responses": gen["responses"][2 * i : 2 * i + 2], "gold": gold[2 * i : 2 * i + 2],
                                                 "lengths": gen["lengths"][2 * i : 2 * i + 2]} for i, p in enumerate(self.eval_prompts)])
        first = gold[::2]
        return {"gold_mean": sum(first) / len(first), "length_mean": sum(gen["lengths"][::2]) / len(first)}

    # -- one round ------------------------------------------------------------------------------
    def policy_dir(self, r: int) -> str:
        return self.sft_dir if r == 0 else str(self.d(r, "policy") / "final")

    def rm_dirs(self, r: int) -> list[str]:
        """Round r's reward models: the main one first, then the ensemble's other members."""
        if r == 0:
            return []
        rm = self.d(r, "rm")
        return [str(rm / "final")] + [str(rm / f"member_{m}" / "final") for m in range(1, self.cfg.rm_ensemble)]

    def samples(self, r: int, folder: Path) -> dict:
        from tether.demo.sentiment import Models
        from tether.models import load_causal_lm

        cfg = self.cfg
        lo = (r - 1) * cfg.prompts_per_round
        prompts = self.prompts[lo : lo + cfg.prompts_per_round]
        k = cfg.samples_per_prompt
        n_old = round(k * cfg.earlier_share) if r > 1 else 0
        m = Models(self.demo, self.sft_dir)
        rows = [{"prompt_id": f"p{lo + i}", "prompt": p, "responses": [], "sample_ids": [], "policies": []} for i, p in enumerate(prompts)]
        plan = [(r - 1, k - n_old)] + ([] if not n_old else [((r - 2) % (r - 1), n_old)])  # (policy round, samples); earlier: round r-2 or SFT
        for which, n in plan:
            name = "sft" if which == 0 else f"round_{which}/policy"
            model = m.sft if which == 0 else load_causal_lm(self.policy_dir(which)).eval()
            gen = m.generate(model, prompts, k=n, seed=cfg.seed + 1000 * r + which)
            for i, row in enumerate(rows):
                for j, text in enumerate(gen["responses"][i * n : (i + 1) * n]):
                    row["sample_ids"].append(f"r{r}/{row['prompt_id']}/{name.split('/')[0]}/{j}")
                    row["responses"].append(text)
                    row["policies"].append(name)
        write_jsonl(folder / "samples.jsonl", rows)
        return {"prompts": len(rows), "responses": sum(len(x["responses"]) for x in rows), "from": [p for p, _ in plan]}

    def tasks(self, r: int, folder: Path) -> dict:
        from tether.eval.scoring import Scorer
        from tether.loop.select import candidates, select

        cfg = self.cfg
        rows = read_jsonl(self.d(r, "samples") / "samples.jsonl")
        groups = [x["responses"] for x in rows]
        pairs = candidates(groups)
        rule = cfg.select if r > 1 else "random"
        scores = None
        if rule != "random":
            scores = []
            for rm in self.rm_dirs(r - 1):
                s = Scorer.load(rm, device="cpu", batch_size=self.demo.eval_batch_size, **self._lengths())
                flat = s.score_responses([x["prompt"] for x in rows for _ in x["responses"]], [t for g in groups for t in g])
                it = iter(flat)
                scores.append([[next(it) for _ in g] for g in groups])
        chosen, u = select(pairs, cfg.labels_per_round, rule, cfg.seed + r, scores)
        tasks = []
        for k in chosen:
            g, i, j = pairs[k]
            x = rows[g]
            meta = {"round": r, "prompt_id": x["prompt_id"], "sample_ids": [x["sample_ids"][i], x["sample_ids"][j]],
                    "policies": [x["policies"][i], x["policies"][j]]}
            if u is not None:
                meta["uncertainty"] = u[k]
            tasks.append({"id": f"round{r}/{x['prompt_id']}/{i}-{j}", "prompt": x["prompt"], "responses": [x["responses"][i], x["responses"][j]], "meta": meta})
        write_jsonl(folder / "tasks.jsonl", tasks)
        return {"candidates": len(pairs), "selected": len(tasks), "rule": rule}

    def _lengths(self) -> dict:
        from tether.demo.sentiment import Demo

        d = Demo(self.demo)._data(self.sft_dir)
        return {"max_length": d["max_length"], "max_prompt_length": d["max_prompt_length"]}

    def labels(self, r: int, folder: Path) -> dict:
        from tether.loop import collect as C

        cfg = self.cfg
        tasks = read_jsonl(self.d(r, "tasks") / "tasks.jsonl")
        need = cfg.collect.min_labels or max(1, len(tasks) // 2)
        source = cfg.collect.source
        if source == "simulated":
            records, stats = C.simulated(tasks, self.gold, cfg.annotators, cfg.seed + r)
        elif source == "ai":
            records, stats = C.ai(tasks, cfg.collect, cfg.seed + r)
        else:
            url = cfg.collect.db or f"sqlite:///{(self.out / 'label.db').resolve()}"
            app = C.App(url)
            name = f"{self.out.name}-round{r}"
            g = [tuple(self.gold([t["prompt"]] * 2, t["responses"])) for t in tasks]
            golds = C.gold_tasks(tasks, g, cfg.collect.gold_items)
            pid, created = app.ensure_project(name, tasks, golds, cfg.collect)
            _console().print(f"collect: project {name!r} {'created' if created else 'found'} with {len(tasks)} pairs and {len(golds)} gold items; "
                             f"annotators open {cfg.collect.url.rstrip('/')}/p/{pid} (add people with `tether label add-member --project {name} USER`)",
                             highlight=False)
            records, stats = app.wait(name, len(tasks), need, cfg.collect, lambda s: _console().print(s, highlight=False))
            by_task = {t["id"]: t for t in tasks}
            for rec in records:
                task = by_task[rec["meta"]["task"]]
                C._provenance(rec, task, rec["chosen"] == task["responses"][0])
            stats |= {"project": name, "project_id": pid}
        if len(records) < need:
            raise RunStopped(f"round {r}: {len(records)} labels from {source}, fewer than the {need} needed (collect.min_labels)")
        split = {"train": [], "heldout": []}
        for rec in records:
            split["heldout" if _held_out(rec["meta"]["provenance"]["task"], cfg.rm_holdout) else "train"].append(rec)
        write_jsonl(folder / "labels.jsonl", records)
        for name, recs in split.items():
            write_jsonl(folder / f"{name}.jsonl", recs)
        stats = {"source": source, "records": len(records), "train": len(split["train"]), "heldout": len(split["heldout"]), **stats}
        write_json(folder / "stats.json", stats)
        return {k: stats[k] for k in ("source", "records", "train", "heldout")}

    def _gold_pairs(self, recs: list[dict]) -> list[tuple[float, float]]:
        g = self.gold([x["prompt"] for x in recs for _ in range(2)], [t for x in recs for t in (x["chosen"], x["rejected"])])
        return list(zip(g[::2], g[1::2]))

    def _rm_on(self, rm_dir: str, recs: list[dict]) -> dict:
        """One RM on labelled pairs: accuracy against the labels and against the gold judge."""
        from tether.eval.scoring import Scorer

        s = Scorer.load(rm_dir, device="cpu", batch_size=self.demo.eval_batch_size, **self._lengths())
        flat = s.score_responses([x["prompt"] for x in recs for _ in range(2)], [t for x in recs for t in (x["chosen"], x["rejected"])])
        sc = list(zip(flat[::2], flat[1::2]))
        vs_labels = sum(a > b for a, b in sc) / len(sc) if sc else None
        return {"label_accuracy": vs_labels, "gold": pair_accuracy(sc, self._gold_pairs(recs))}

    def rm(self, r: int, folder: Path) -> dict:
        import random

        from tether.algo.rm import train
        from tether.demo.sentiment import Demo, stage_config

        cfg = self.cfg
        rounds = range(1, r + 1)
        train_recs = [x for q in rounds for x in read_jsonl(self.d(q, "labels") / "train.jsonl")]
        held = [x for q in rounds for x in read_jsonl(self.d(q, "labels") / "heldout.jsonl")]
        fresh = read_jsonl(self.d(r, "labels") / "heldout.jsonl") or read_jsonl(self.d(r, "labels") / "labels.jsonl")
        members = []
        for m in range(cfg.rm_ensemble):
            recs = train_recs if m == 0 else [random.Random(cfg.seed * 7919 + 31 * r + m).choice(train_recs) for _ in train_recs]
            out = folder if m == 0 else folder / f"member_{m}"
            write_jsonl(out / "data" / "train.jsonl", recs)
            write_jsonl(out / "data" / "heldout.jsonl", held)
            base = self.rm_dirs(r - 1)[0] if cfg.rm_mode == "continue" and r > 1 else self.sft_dir
            dcfg = dataclasses.replace(self.demo, seed=cfg.seed + r + 100 * m)
            data = Demo(dcfg)._data(self.sft_dir, train=str(out / "data" / "train.jsonl"), eval=str(out / "data" / "heldout.jsonl"))
            evals = self.demo.rm_evals
            c = stage_config(dcfg, "rm", {"model": base, "out": str(out), "data": data}, len(recs),
                             lambda steps: {"eval_every": max(1, steps // evals) if evals else 0, "keep_best": evals > 0})
            members.append(train(c))
        shift = {"fresh_pairs": len(fresh),
                 "before": self._rm_on(self.rm_dirs(r - 1)[0], fresh) if r > 1 else None,
                 "after": self._rm_on(self.rm_dirs(r)[0], fresh)}
        write_json(folder / "shift.json", shift)
        return {"train_pairs": len(train_recs), "heldout_pairs": len(held), "eval_accuracy": members[0].get("eval/accuracy"), "shift": shift}

    def policy(self, r: int, folder: Path) -> dict:
        from tether.demo.sentiment import Demo, stage_config

        cfg = self.cfg
        dcfg = dataclasses.replace(self.demo, seed=cfg.seed + r)
        start = self.policy_dir(r - 1)
        if cfg.policy == "ppo":
            from tether.algo.ppo import train

            wired = {"model": start, "ref_model": self.sft_dir, "out": str(folder),
                     "data": Demo(dcfg)._data(self.sft_dir, train=self.paths["prompts"]),
                     "reward": {"model": self.rm_dirs(r)[0]}, "rollout": {"max_new_tokens": self.demo.max_new_tokens}}
            c = stage_config(dcfg, "ppo", wired)
        else:
            from tether.algo.dpo import train

            lab = self.d(r, "labels")
            n = len(read_jsonl(lab / "train.jsonl"))
            data = Demo(dcfg)._data(self.sft_dir, train=str(lab / "train.jsonl"), eval=str(lab / "heldout.jsonl"))
            c = stage_config(dcfg, "dpo", {"model": start, "ref_model": self.sft_dir, "out": str(folder), "data": data}, n)
        summary = train(c)
        return {"algo": cfg.policy, "start": start, "steps": summary.get("steps")}

    def eval(self, r: int, folder: Path) -> dict:
        from tether.eval.metrics import hacking_flags, win_rate
        from tether.demo.sentiment import Models
        from tether.eval.scoring import Scorer
        from tether.models import load_causal_lm

        cfg = self.cfg
        prompts = self.eval_prompts
        m = Models(self.demo, self.sft_dir)
        policy = load_causal_lm(self.policy_dir(r)).eval()
        gen = m.generate(policy, prompts, k=2, seed=cfg.seed + 100 + r, want_logprobs=True)
        gold = self.gold([p for p in prompts for _ in range(2)], gen["responses"])
        sft = read_jsonl(self.d(0, "eval") / "samples.jsonl")
        sft_gold = [x["gold"][0] for x in sft]
        prev_gold = sft_gold if r == 1 else [x["gold"][0] for x in read_jsonl(self.d(r - 1, "eval") / "samples.jsonl")]
        scorer = Scorer.load(self.rm_dirs(r)[0], device="cpu", batch_size=self.demo.eval_batch_size, **self._lengths())
        proxy = scorer.score_responses([p for p in prompts for _ in range(2)], gen["responses"])
        sft_proxy = scorer.score_responses([p for p in prompts for _ in range(2)], [t for x in sft for t in x["responses"]])
        pairs = lambda v: list(zip(v[::2], v[1::2]))  # noqa: E731 (the two samples of each prompt)
        kl = [a - b for a, b in zip(gen["logp"][::2], gen["logp_sft"][::2])]
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        first = gold[::2]
        res = {
            "round": r, "gold_mean": mean(first), "win_vs_sft": win_rate(first, sft_gold)["win_rate"],
            "win_vs_previous": win_rate(first, prev_gold)["win_rate"], "kl": mean(kl), "length_mean": mean(gen["lengths"][::2]),
            "proxy_mean": mean(proxy[::2]), "sft_proxy_mean": mean(sft_proxy[::2]),
            "rm_accuracy_fresh": pair_accuracy(pairs(proxy), pairs(gold)),
            "rm_accuracy_sft_heldout": pair_accuracy(pairs(sft_proxy), [tuple(x["gold"]) for x in sft]),
        }
        sft_len = mean([x["lengths"][0] for x in sft])
        res["flags"] = hacking_flags([0, 1], proxy=[res["sft_proxy_mean"], res["proxy_mean"]], gold={cfg.gold: [mean(sft_gold), res["gold_mean"]]},
                                     length=[sft_len, res["length_mean"]])
        write_jsonl(folder / "samples.jsonl", [{"prompt": p, "responses": gen["responses"][2 * i : 2 * i + 2], "gold": gold[2 * i : 2 * i + 2],
                                                 "proxy": proxy[2 * i : 2 * i + 2]} for i, p in enumerate(prompts)])
        write_json(folder / "metrics.json", res)
        _console().print(f"eval round {r}: gold {res['gold_mean']:.3f}  win vs SFT {res['win_vs_sft']:.3f}  vs previous {res['win_vs_previous']:.3f}  "
                         f"KL {res['kl']:.2f}  RM accuracy on fresh samples {res['rm_accuracy_fresh']['accuracy']}", highlight=False)
        return res

    # -- the whole loop -------------------------------------------------------------------------
    def check_same_config(self) -> None:
        """A rerun reuses finished stages, so it must not change what they were computed with (more rounds,
        a longer wait for the app or another URL are fine)."""
        from tether.config import ConfigError, flat_keys, to_dict

        path = self.out / "config.json"
        if not path.exists():
            return

        old, new = flat_keys(json.loads(path.read_text())), flat_keys(to_dict(self.cfg))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RERUN_MAY_CHANGE)
        if changed:
            shown = ", ".join(f"{k}={old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4]) + (" ..." if len(changed) > 4 else "")
            raise ConfigError(f"{self.out} holds a run with other settings ({shown}): its finished stages would be reused; "
                              f"use another --out, or the same keys")

    def run(self) -> dict:
        from tether.loop.report import write_report

        self.out.mkdir(parents=True, exist_ok=True)
        self.check_same_config()
        save_config(self.cfg, self.out / "config.json")
        self.setup()
        for r in range(1, self.cfg.rounds + 1):
            for name in STAGES:
                self.stage(r, name, lambda folder, name=name, r=r: getattr(self, name)(r, folder))
        return write_report(self)


RERUN_MAY_CHANGE = {"rounds", "collect.timeout_minutes", "collect.poll_seconds", "collect.url", "collect.min_labels", "collect.members", "out"}


def parse(argv: list[str]) -> LoopConfig:
    from tether.config import config_help

    ap = argparse.ArgumentParser(prog="tether loop", description=__doc__.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2] + "\nconfig keys (key=value):\n" + "\n".join(config_help(LoopConfig)))
    ap.add_argument("--config", "-c", help="YAML file of the keys below")
    ap.add_argument("--quick", action="store_true", help="2 tiny rounds on the demo's tiny model (what CI runs)")
    ap.add_argument("--out", help="run folder (default runs/loop, runs/loop-quick with --quick)")
    ap.add_argument("--verbose", action="store_true", help="a traceback instead of the one-line error")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    a = ap.parse_args(argv)
    over = (QUICK + ["setup.quick=true"] if a.quick else []) + list(a.overrides)
    if a.out or a.quick:
        over.append(f"out={a.out or 'runs/loop-quick'}")
    return load_config(LoopConfig, a.config, over)


def main(argv: list[str]) -> int:
    from tether.cli import one_line

    def run() -> int:
        cfg = parse(argv)
        report = Loop(cfg).run()
        print(report["table"])
        print(f"report: {report['path']}")
        return 0

    return one_line("tether loop", run, verbose="--verbose" in argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
