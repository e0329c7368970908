"""AI pre-labels in the feedback app: import, suggestions hidden or shown per project setting, routing by
confidence, AI-human Cohen's kappa on hand-built votes, and exports that mark auto labels."""

from __future__ import annotations

import json
import re

import pytest
from test_label_storage import jl, setup
from test_label_web import SAME_ORIGIN, login

from tether.feedback import service as sv


def _tasks(n):
    return jl(*[{"prompt": f"q{k}", "responses": [f"a{k}", f"b{k}"], "id": f"t{k}"} for k in range(n)])


def _ai_record(task, chosen_idx, confidence, agent="hf:judge", principles=("helpfulness",)):
    """A line as `tether ai label` writes it for a 2-response task (response ids are indices 0 and 1)."""
    return {"prompt": "q", "chosen": "x", "rejected": "y", "id": f"ai/{task}", "source": f"tether-ai:{agent}",
            "meta": {"task": task, "response_ids": [chosen_idx, 1 - chosen_idx], "labeler": agent, "confidence": confidence,
                     "principles": list(principles)}}


def _take_all(db, pid, uid):
    got = []
    while True:
        with db.write() as s:
            t = sv.next_task(s, s.get(sv.Project, pid), s.get(sv.User, uid))
            if t is None:
                return got
            got.append(t.external_id)
        sv.submit(db, pid, uid, t.id, {"choice": "skip"})


def test_routing_thresholds_and_exports_mark_auto_labels(db, fast_hasher):
    pid, (u0, u1) = setup(db, fast_hasher, overlap=1, n_users=2, tasks=_tasks(7))
    labels = jl(_ai_record("t0", 0, 0.95), _ai_record("t1", 1, 0.9), {"task": "t2", "choice": "A", "confidence": 0.7, "agent": "rules"},
                {"task": "t3", "choice": "tie", "confidence": 0.99, "agent": "rules"}, _ai_record("t4", 1, 0.85), _ai_record("t6", 0, 0.97))
    with db.write() as s:
        p = sv.get_project(s, pid)
        assert sv.import_ai_labels(s, p, labels) == 6
        assert p.show_ai is False and p.ai_threshold is None  # the defaults: hidden, no routing
        assert sv.progress(s, p, s.get(sv.User, u0))["available"] == 7
        # a person judges t6 before routing is turned on: their vote, not the AI's, is t6's label
    with db.read() as s:
        t6 = s.scalar(sv.select(sv.Task).where(sv.Task.external_id == "t6"))
    sv.submit(db, pid, u1, t6.id, {"choice": "B"})
    with db.write() as s:
        assert sv.set_ai_settings(s, sv.get_project(s, pid), None, 0.85) == {"show_ai": False, "ai_threshold": 0.85}
    with db.read() as s:
        p = sv.get_project(s, pid)
        assert sv.progress(s, p, s.get(sv.User, u0))["available"] == 2  # t2 (0.7) and t5 (no label); t6 has its one judgment
        assert sv.project_stats(s, p)["ai"]["auto_labelled"] == 5  # t0, t1, t3, t4, t6 are at or above 0.85
    assert sorted(_take_all(db, pid, u0)) == ["t2", "t5"]  # the confident ones never reach a person
    with db.read() as s:
        recs = {r["id"]: r for r in sv.export_preferences(s, sv.get_project(s, pid))}
    # t0: A (chosen index 0); t1 and t4: B; t3 is an AI tie (no pair); t6 has a human vote (B), which wins
    assert set(recs) == {"p-compare/t0/ai", "p-compare/t1/ai", "p-compare/t4/ai", "p-compare/t6"}
    assert recs["p-compare/t0/ai"]["chosen"] == "a0" and recs["p-compare/t1/ai"]["chosen"] == "b1" and recs["p-compare/t4/ai"]["chosen"] == "b4"
    assert recs["p-compare/t6"]["chosen"] == "b6" and "auto_labelled" not in recs["p-compare/t6"]["meta"]
    m = recs["p-compare/t0/ai"]["meta"]
    assert m["auto_labelled"] is True and m["ai"] == {"agent": "hf:judge", "confidence": 0.95, "principle": "helpfulness"}
    # a higher threshold gives items back to people (the boundary itself is routed); off gives all back
    with db.write() as s:
        sv.set_ai_settings(s, sv.get_project(s, pid), None, 0.9)
    with db.read() as s:
        assert sv.project_stats(s, sv.get_project(s, pid))["ai"]["auto_labelled"] == 4  # t0, t1 (0.9), t3, t6
    assert _take_all(db, pid, u1) == ["t4"]  # u0 skipped t2, t5 (overlap 1: they are full)
    with db.write() as s:
        sv.set_ai_settings(s, sv.get_project(s, pid), None, None)
    with db.read() as s:
        assert not any(r["meta"].get("auto_labelled") for r in sv.export_preferences(s, sv.get_project(s, pid)))
    assert sorted(_take_all(db, pid, u1)) == ["t0", "t1", "t3"]


def test_bad_ai_labels_are_rejected_whole_with_their_lines(db, fast_hasher):
    pid, _ = setup(db, fast_hasher, tasks=_tasks(2))
    bad = jl({"task": "t0", "choice": "A", "confidence": 0.8, "agent": "a"}, {"task": "nope", "choice": "A", "confidence": 0.8, "agent": "a"},
             {"task": "t1", "choice": "C", "confidence": 0.8, "agent": "a"}, {"task": "t1", "choice": "A", "confidence": 1.5, "agent": "a"},
             _ai_record("t1", 0, 0.8) | {"meta": {**_ai_record("t1", 0, 0.8)["meta"], "response_ids": [0, 7]}},
             {"task": "t0", "choice": "B", "confidence": 0.9, "agent": "a"}) + "{oops\n"
    with db.write() as s, pytest.raises(sv.ImportRejected) as e:
        sv.import_ai_labels(s, sv.get_project(s, pid), bad)
    lines = dict(e.value.errors)
    assert sorted(lines) == [2, 3, 4, 5, 6, 7]
    assert "no item 'nope'" in lines[2] and "choice" in lines[3] and "confidence" in lines[4] and "response_ids" in lines[5]
    assert "second label" in lines[6] and "invalid JSON" in lines[7]
    with db.read() as s:
        assert sv.ai_stats(s, sv.get_project(s, pid))["labels"] == 0  # all or nothing
    with db.write() as s, pytest.raises(sv.Invalid, match=r"threshold must be a number in \[0.5, 1\]"):
        sv.set_ai_settings(s, sv.get_project(s, pid), None, 0.3)


def test_ai_human_kappa_per_project_and_principle_on_hand_built_votes(db, fast_hasher):
    pid, (u0, u1) = setup(db, fast_hasher, overlap=2, n_users=2, tasks=_tasks(10))
    ai = ["A", "A", "B", "B", "A", "A", "B", "tie", "A", "B"]
    human = ["A", "B", "B", "B", "A", "A", "A", "tie"]  # t8: a skip only; t9: a tied human vote (A vs B): neither counts
    labels = [{"task": f"t{k}", "choice": c, "confidence": 0.8, "agent": "judge", "principle": "helpfulness" if k < 4 else "harmlessness"}
              for k, c in enumerate(ai)]
    with db.write() as s:
        sv.import_ai_labels(s, sv.get_project(s, pid), jl(*labels))
        ids = {t.external_id: t.id for t in s.scalars(sv.select(sv.Task).where(sv.Task.project_id == pid))}
    for k, h in enumerate(human):
        sv.submit(db, pid, u0, ids[f"t{k}"], {"choice": h})
    sv.submit(db, pid, u0, ids["t8"], {"choice": "skip"})
    sv.submit(db, pid, u0, ids["t9"], {"choice": "A"})
    sv.submit(db, pid, u1, ids["t9"], {"choice": "B"})
    with db.read() as s:
        a = sv.project_stats(s, sv.get_project(s, pid))["ai"]["agreement"]
    # by hand: 8 items, 6 agree (po = 3/4); AI marginals A4 B3 tie1, human A4 B3 tie1: pe = 26/64; kappa = 11/19
    assert a["n"] == 8 and a["agreement"] == 0.75 and a["cohen_kappa"] == pytest.approx(11 / 19)
    # helpfulness (t0-t3): po 3/4, AI A2 B2, human A1 B3: pe 1/2, kappa 1/2
    # harmlessness (t4-t7): po 3/4, AI A2 B1 tie1, human A3 tie1: pe 7/16, kappa 5/9
    assert a["per_principle"]["helpfulness"] == {"n": 4, "agreement": 0.75, "cohen_kappa": pytest.approx(0.5)}
    assert a["per_principle"]["harmlessness"] == {"n": 4, "agreement": 0.75, "cohen_kappa": pytest.approx(5 / 9)}
    assert a["per_agent"]["judge"]["cohen_kappa"] == pytest.approx(11 / 19)


def test_suggestions_are_hidden_until_the_admin_shows_them(sqlite_db, fast_hasher):
    from tether.feedback.app import create_app

    with sqlite_db.write() as s:
        sv.create_user(s, "root", "rootpass1", role="admin", hasher=fast_hasher)
        ann = sv.create_user(s, "ann", "annpass12", hasher=fast_hasher)
        p = sv.create_project(s, "mine", "compare")
        sv.import_tasks(s, p, _tasks(1))
        sv.add_member(s, p, ann)
        sv.import_ai_labels(s, p, jl(_ai_record("t0", 1, 0.83, agent="hf:smol", principles=("honesty",))))
        pid = p.id
    app = create_app(sqlite_db)
    c, csrf = login(app, "ann", "annpass12")
    page = c.get(f"/p/{pid}", headers=SAME_ORIGIN).text
    assert "b0" in page and "AI suggestion" not in page and "hf:smol" not in page  # hidden by default
    assert "ai_suggestion" not in c.post(f"/api/projects/{pid}/next", headers={"X-CSRF-Token": csrf}).json()["task"]
    admin, acsrf = login(app, "root", "rootpass1")
    assert c.post(f"/admin/p/{pid}/ai", data={"csrf_token": csrf, "show_ai": "on"}).status_code == 403  # annotators cannot
    r = admin.post(f"/admin/p/{pid}/ai", data={"csrf_token": acsrf, "show_ai": "on", "threshold": ""})
    assert r.status_code == 303
    page = c.get(f"/p/{pid}", headers=SAME_ORIGIN).text
    shown = re.findall(r'<h2>Response \d</h2>\s*<pre class="text">(\w+)</pre>', page)
    side = shown.index("b0") + 1  # the AI chose response 1 (b0), wherever the page shows it
    assert re.search(rf"AI suggestion \(hf:smol, confidence 0\.83, honesty\):\s+Response {side} is better", page)
    assert c.post(f"/api/projects/{pid}/next", headers={"X-CSRF-Token": csrf}).json()["task"]["ai_suggestion"] == {
        "choice": "B", "agent": "hf:smol", "confidence": 0.83, "principle": "honesty"}
    dash = admin.get(f"/admin/p/{pid}").text
    assert 'id="ai"' in dash and "1 on 1 items" in dash and "checked" in dash
    # the JSON API turns it off again and sets routing; a bad threshold is a 4xx with the reason
    assert admin.post(f"/api/admin/projects/{pid}/ai", json={"show_ai": False, "threshold": 0.8}, headers={"X-CSRF-Token": acsrf}).json() == {
        "show_ai": False, "ai_threshold": 0.8}
    assert "AI suggestion" not in c.get(f"/p/{pid}", headers=SAME_ORIGIN).text
    bad = admin.post(f"/api/admin/projects/{pid}/ai", json={"threshold": 2}, headers={"X-CSRF-Token": acsrf})
    assert 400 <= bad.status_code < 500 and "threshold" in bad.text


def test_cli_imports_ai_labels_and_sets_routing(tmp_path, fast_hasher, capsys):
    from tether.feedback.cli import main

    url = f"sqlite:///{tmp_path / 'l.db'}"
    (tmp_path / "t.jsonl").write_text(_tasks(2))
    (tmp_path / "ai.jsonl").write_text(jl(_ai_record("t0", 0, 0.9), _ai_record("t1", 1, 0.6)))
    assert main(["create-project", "--db", url, "p", "--kind", "compare", "--tasks", str(tmp_path / "t.jsonl")]) == 0
    assert main(["ai-import", "--db", url, "--project", "p", str(tmp_path / "ai.jsonl")]) == 0
    assert main(["ai-settings", "--db", url, "--project", "p", "--threshold", "0.8"]) == 0
    assert "routing items with AI confidence >= 0.8 to the AI" in capsys.readouterr().out
    assert main(["export", "--db", url, "--project", "p", "--out", str(tmp_path / "prefs.jsonl")]) == 0
    (rec,) = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert rec["chosen"] == "a0" and rec["meta"]["auto_labelled"] is True
    assert main(["ai-settings", "--db", url, "--project", "p", "--threshold", "0.2"]) == 1
    assert "threshold must be a number" in capsys.readouterr().err


def test_tether_ai_label_output_imports_into_the_project_made_from_the_same_tasks(tiny_llama, tmp_path, fast_hasher, sqlite_db):
    """No ids in the task file and a 3-response task: the labeler and the app name the items alike."""
    from tether.cli import main

    tasks = jl({"prompt": "hello", "responses": ["the movie was good", "bad", "fun"]}, {"prompt": "hi", "responses": ["yes", "no"]})
    (tmp_path / "t.jsonl").write_text(tasks)
    assert main(["ai", "label", "--model", str(tiny_llama), "--data", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "ai.jsonl"),
                 "--device", "cpu", "--principles", "honesty"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "ai.jsonl").read_text().splitlines()]
    with sqlite_db.write() as s:
        p = sv.create_project(s, "p", "compare")
        assert sv.import_tasks(s, p, tasks) == 4
        assert sv.import_ai_labels(s, p, (tmp_path / "ai.jsonl").read_text()) == len(recs) == 4
        by_ext = {t.external_id: t for t in s.scalars(sv.select(sv.Task).where(sv.Task.project_id == p.id))}
        for r, a in zip(recs, s.scalars(sv.select(sv.AILabel).order_by(sv.AILabel.id))):
            t = by_ext[r["meta"]["task"]]
            assert a.task_id == t.id and t.responses[0 if a.choice == "A" else 1] == r["chosen"]
            assert a.confidence == r["meta"]["confidence"] and a.principle == "honesty" and a.agent == f"hf:{tiny_llama.name}"
