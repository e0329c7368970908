"""Label sources of `tether loop`: simulated annotators, the feedback app, an AI labeler.

Every source turns the round's tasks (two responses to a prompt, with provenance in `meta`) into
preference records in `tether label export`'s schema, with the task's provenance carried into
`meta.provenance` and who labelled it in `meta.annotators` / `meta.labeler`.

The app source is the admin side of `tether label`: it creates the round's project and tasks in one
transaction (once: a resumed round finds them), and reads judgments back; annotators work in the browser
(or, in tests and `--quick` runs with `collect.source=app`, `HttpAnnotators` drive the same JSON API).
Annotators whose accuracy on the gold items is below `min_gold_accuracy` are left out of the export,
and counted.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

from tether.config import RunStopped, check, doc
from tether.judges.annotators import AnnotatorConfig, annotate, sigmoid


@dataclass(frozen=True)
class CollectConfig:
    source: str = doc("simulated", "who labels: simulated (annotators on the gold judge), app (the feedback app: people, or anyone using its API), ai (`tether ai label`'s judge)")
    min_labels: int = doc(0, "a round needs at least this many preference records to go on (0 = half the budget)")
    db: str = doc("", "app: the feedback app's database (SQLAlchemy URL or SQLite file; empty = <out>/label.db)")
    url: str = doc("http://127.0.0.1:8000", "app: where annotators reach `tether label serve` (printed with each round's project)")
    members: list[str] = doc([], "app: annotators (existing users) added to each round's project")
    overlap: int = doc(3, "app: distinct annotators per pair")
    gold_items: int = doc(6, "app: gold items per round (pairs the gold judge separates most, its side as the answer); 0 = none")
    min_gold_accuracy: float = doc(0.7, "app: annotators below this accuracy on gold items are excluded from the labels (and counted)")
    timeout_minutes: float = doc(60.0, "app: how long a round waits for its quota; then it goes on with >= min_labels or stops (resumable)")
    poll_seconds: float = doc(2.0, "app: how often the database is read while waiting")
    judge: str = doc("", "ai: a local model folder or an OpenAI-compatible URL (see `tether ai label --help`)")
    constitution: str = doc("", "ai: constitution YAML (empty = tether's default principles)")

    def validate(self, p: str = "") -> None:
        check(self.source in ("simulated", "app", "ai"), f"{p}source", "must be simulated, app or ai")
        check(self.min_labels >= 0, f"{p}min_labels", "must be >= 0")
        check(self.overlap >= 1, f"{p}overlap", "must be >= 1")
        check(0 <= self.min_gold_accuracy <= 1, f"{p}min_gold_accuracy", "must be in [0, 1]")
        check(self.timeout_minutes > 0, f"{p}timeout_minutes", "must be > 0")
        check(self.source != "ai" or bool(self.judge), f"{p}judge", "collect.source=ai needs collect.judge (a model folder or URL)")


def _provenance(rec: dict, task: dict, chosen_first: bool) -> dict:
    meta = task["meta"]
    order = (0, 1) if chosen_first else (1, 0)
    rec["meta"]["provenance"] = {"round": meta["round"], "task": task["id"], "prompt_id": meta["prompt_id"],
                                 "sample_ids": [meta["sample_ids"][k] for k in order], "policies": [meta["policies"][k] for k in order]}
    return rec


def simulated(tasks: list[dict], gold: Callable, cfg: AnnotatorConfig, seed: int) -> tuple[list[dict], dict]:
    """Each task is judged by `votes_per_pair` annotators of the simulated pool (Bradley-Terry on gold)."""
    import dataclasses

    records, stats = annotate([t["prompt"] for t in tasks], [t["responses"] for t in tasks], gold,
                              dataclasses.replace(cfg, seed=seed), source="tether-loop:simulated-annotators", id_prefix="sim")
    out = []
    for rec in records:
        k = int(rec["id"].split("/")[1])  # sim/<task index>/<chosen>-<rejected>
        task = tasks[k]
        rec["id"] = f"{task['id']}/sim"
        out.append(_provenance(rec, task, rec["meta"]["response_ids"][0] == 0))
    return out, stats


def ai(tasks: list[dict], cfg: CollectConfig, seed: int) -> tuple[list[dict], dict]:
    """`tether ai label` on the tasks: the judge's debiased choice (both orders), ties dropped and counted."""
    from tether.ai.constitution import load_constitution
    from tether.ai.judge import Item, label, make_judge, to_record

    items = [Item(t["id"], (t["prompt"], *t["responses"]), (0, 1), group=t["meta"]["prompt_id"]) for t in tasks]
    results = label(items, make_judge(cfg.judge, device="cpu"), load_constitution(cfg.constitution or None), seed=seed)
    out, ties, errors = [], 0, 0
    for t, r in zip(tasks, results):
        rec = to_record(r, cfg.judge.rstrip("/").rsplit("/", 1)[-1])
        if rec is None:
            errors += bool(r.errors)
            ties += not r.errors
            continue
        out.append(_provenance(rec, t, rec["meta"]["response_ids"][0] == 0))
    return out, {"tasks": len(tasks), "records": len(out), "ties": ties, "errors": errors,
                 "flips": sum(r.flip for r in results)}


def gold_tasks(tasks: list[dict], gold_scores: list[tuple[float, float]], n: int) -> list[dict]:
    """The n tasks the gold judge separates most, as app gold items (answer: the gold judge's side)."""
    order = sorted(range(len(tasks)), key=lambda k: -abs(gold_scores[k][0] - gold_scores[k][1]))[:n]
    return [{"id": f"{tasks[k]['id']}/gold", "prompt": tasks[k]["prompt"], "responses": tasks[k]["responses"],
             "gold": "A" if gold_scores[k][0] > gold_scores[k][1] else "B", "meta": tasks[k]["meta"]} for k in order
            if gold_scores[k][0] != gold_scores[k][1]]


class App:
    """The round's project in the feedback app's database: create once, count, export."""

    def __init__(self, url: str):
        from tether.feedback.db import Database

        self.db = Database(url)
        self.db.migrate()

    def ensure_project(self, name: str, tasks: list[dict], golds: list[dict], cfg: CollectConfig) -> tuple[int, bool]:
        """(project id, created now). The project, its tasks and members are one transaction."""
        import json

        from tether.feedback import service as sv

        with self.db.write() as s:
            try:
                return sv.get_project(s, name).id, False
            except sv.NotFound:
                pass
            p = sv.create_project(s, name, "compare", "Which continuation is more positive and fluent? (tether loop)", cfg.overlap)
            sv.import_tasks(s, p, "".join(json.dumps(t) + "\n" for t in tasks + golds))
            for who in cfg.members:
                sv.add_member(s, p, sv.get_user(s, who))
            return p.id, True

    def export(self, name: str, min_gold_accuracy: float) -> tuple[list[dict], dict]:
        """Majority records without the annotators who failed the gold items; the stats say who and how many."""
        from tether.feedback import service as sv

        with self.db.read() as s:
            p = sv.get_project(s, name)
            st = sv.project_stats(s, p)
            failed = {a["annotator"] for a in st["annotators"] if a["gold_accuracy"] is not None and a["gold_accuracy"] < min_gold_accuracy}
            votes = {a["annotator"]: a["judgments"] - a["gold_items"] for a in st["annotators"]}
            records = sv.export_preferences(s, p, "majority", exclude=frozenset(failed))
        return records, {"judgments": st["counts"]["judgments"], "annotators": st["counts"]["annotators"],
                         "excluded_annotators": sorted(failed), "excluded_judgments": sum(votes[a] for a in failed),
                         "gold_accuracy": {a["annotator"]: a["gold_accuracy"] for a in st["annotators"]},
                         "records": len(records), "agreement": st["agreement"]["krippendorff_alpha"]}

    def complete(self, name: str) -> bool:
        """Every regular item has all its judgments."""
        from tether.feedback import service as sv

        with self.db.read() as s:
            c = sv.project_stats(s, sv.get_project(s, name))["counts"]
        return c["items_complete"] >= c["items"] - c["gold_items"]

    def wait(self, name: str, quota: int, min_labels: int, cfg: CollectConfig, say: Callable[[str], None]) -> tuple[list[dict], dict]:
        """Poll until `quota` records (or every item is done), or the deadline; fewer than min_labels by
        then stops the run (RunStopped): the judgments are in the database and a rerun waits again."""
        deadline = time.monotonic() + cfg.timeout_minutes * 60
        last = -1
        while True:
            records, stats = self.export(name, cfg.min_gold_accuracy)
            if len(records) != last:
                say(f"collect: {len(records)}/{quota} labels in project {name!r} ({stats['judgments']} judgments)")
                last = len(records)
            if len(records) >= quota or self.complete(name):
                break
            if time.monotonic() >= deadline:
                if len(records) >= min_labels:
                    break
                raise RunStopped(f"project {name!r}: {len(records)} labels by the deadline (collect.timeout_minutes="
                                 f"{cfg.timeout_minutes:g}), fewer than the {min_labels} needed; the judgments are saved: "
                                 f"rerun the same command to wait again")
            time.sleep(cfg.poll_seconds)
        if len(records) < min_labels:
            raise RunStopped(f"project {name!r}: every item is judged but only {len(records)} labels came of it (min {min_labels}); "
                             "lower collect.min_labels or raise collect.overlap")
        return records, stats


class HttpAnnotators:
    """Simulated annotators that use the feedback app like people do: log in over HTTP, take the next item,
    vote (Bradley-Terry on the gold judge; a contrarian votes the other way), submit. One thread each."""

    def __init__(self, url: str, users: list[tuple[str, str, bool]], gold: Callable, project: str,
                 rationality: float = 8.0, seed: int = 0, pause: float = 0.0):
        self.url, self.users, self.gold, self.project = url, users, gold, project
        self.rationality, self.seed, self.pause = rationality, seed, pause
        self.submitted = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, args=(u,), daemon=True) for u in users]

    def start(self) -> "HttpAnnotators":
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        for t in self.threads:
            t.join(timeout)

    def _work(self, user: tuple[str, str, bool]) -> None:
        import httpx

        name, password, contrarian = user
        rng = random.Random(f"{self.seed}:{name}")
        try:
            with httpx.Client(base_url=self.url, timeout=30) as c:
                r = c.post("/api/login", json={"username": name, "password": password})
                r.raise_for_status()
                h = {"X-CSRF-Token": r.json()["csrf_token"]}
                pid = None
                while pid is None:  # the loop creates the round's project when its collect stage starts
                    pid = next((p["id"] for p in c.get("/api/projects").json()["projects"] if p["name"] == self.project), None)
                    time.sleep(0.2 if pid is None else 0)
                while True:
                    task = c.post(f"/api/projects/{pid}/next", headers=h).json()["task"]
                    if task is None:
                        return
                    ga, gb = self.gold([task["prompt"]] * 2, task["responses"])
                    p_a = sigmoid((-1.0 if contrarian else 1.0) * self.rationality * (ga - gb))
                    body = {"task_id": task["id"], "choice": "A" if rng.random() < p_a else "B", "submission_id": f"{name}-{task['id']}"}
                    r = c.post(f"/api/projects/{pid}/judgments", json=body, headers=h)
                    if r.status_code == 409:  # the item filled up while this annotator held it
                        continue
                    r.raise_for_status()
                    with self._lock:
                        self.submitted += 1
                    time.sleep(self.pause)
        except Exception as e:  # noqa: BLE001 (reported to the caller, which asserts on it)
            self.errors.append(f"{name}: {e}")
