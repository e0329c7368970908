"""`tether loop` with collect.source=app: a round's labels come through the real feedback app (a server
process on 127.0.0.1, SQLite), from simulated annotators who use its JSON API over HTTP. Too few labels
by the deadline stops the run (exit 3); the rerun finds the same project and goes on. A contrarian who
fails the gold items is left out of the labels and counted."""

from __future__ import annotations

import json

from tether.feedback import service as sv
from tether.feedback.db import Database
from tether.judges import get_judge
from tether.loop.collect import HttpAnnotators
from tether.loop.run import main

USERS = [("ann0", "pass-ann0", False), ("ann1", "pass-ann1", False), ("ann2", "pass-ann2", False), ("contra", "pass-contra", True)]


def test_a_round_collected_through_the_app_over_http(tmp_path, live_server_factory, fast_hasher, capsys):
    url = f"sqlite:///{tmp_path / 'label.db'}"
    srv = live_server_factory(url)
    db = Database(url)
    with db.write() as s:
        for name, password, _ in USERS:
            sv.create_user(s, name, password, hasher=fast_hasher)
    out = tmp_path / "loop"
    args = ["--quick", "--out", str(out), "rounds=1", "collect.source=app", f"collect.db={url}", f"collect.url={srv.url}",
            "collect.members=[ann0,ann1,ann2,contra]", "collect.poll_seconds=0.1"]

    # nobody labels: the deadline passes with 0 labels -> a clear stop, exit 3, nothing marked done
    assert main([*args, "collect.timeout_minutes=0.01"]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress goes to stderr too; the stop is its last line
    assert err.startswith("tether loop: ") and "loop-round1" in err and "fewer than the 4 needed" in err and "rerun" in err, err
    assert not (out / "round_1" / "labels" / "stage.json").exists()
    with db.read() as s:
        p = sv.get_project(s, "loop-round1")
        n_tasks = sv.project_stats(s, p)["counts"]["items"]

    # the annotators log in and work while the rerun waits; the rerun finds the project, creates nothing new
    people = HttpAnnotators(srv.url, USERS, get_judge("vader"), "loop-round1", rationality=50.0).start()
    assert main([*args, "collect.timeout_minutes=5"]) == 0
    people.join(60)
    assert people.errors == [] and people.submitted > 0
    printed = capsys.readouterr().err
    assert "project 'loop-round1' found" in printed
    with db.read() as s:
        assert sv.project_stats(s, sv.get_project(s, "loop-round1"))["counts"]["items"] == n_tasks

    stats = json.loads((out / "round_1" / "labels" / "stats.json").read_text())
    assert stats["source"] == "app" and stats["excluded_annotators"] == ["contra"] and stats["excluded_judgments"] > 0
    assert stats["gold_accuracy"]["contra"] < 0.7 <= min(stats["gold_accuracy"][f"ann{i}"] for i in range(3))
    labels = [json.loads(x) for x in (out / "round_1" / "labels" / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == stats["records"] >= 4
    tasks = {json.loads(x)["id"]: json.loads(x) for x in (out / "round_1" / "tasks" / "tasks.jsonl").read_text().splitlines()}
    for rec in labels:
        prov = rec["meta"]["provenance"]
        assert "contra" not in rec["meta"]["annotators"] and set(rec["meta"]["annotators"]) <= {"ann0", "ann1", "ann2"}
        t = tasks[prov["task"]]
        assert {rec["chosen"], rec["rejected"]} == set(t["responses"]) and prov["policies"] == ["sft", "sft"]
    assert (out / "round_1" / "eval" / "stage.json").exists() and (out / "report.md").exists()
    db.dispose()
