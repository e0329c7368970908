"""Storage and labelling rules, each run against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from tether.feedback import service as sv
from tether.feedback.models import Assignment, Judgment, Task


def jl(*objs) -> str:
    return "\n".join(json.dumps(o) for o in objs) + "\n"


def setup(db, hasher, kind="compare", overlap=2, n_users=3, tasks=None):
    with db.write() as s:
        p = sv.create_project(s, f"p-{kind}", kind, "be *kind*", overlap)
        users = [sv.create_user(s, f"u{i}", f"password{i}", hasher=hasher) for i in range(n_users)]
        for u in users:
            sv.add_member(s, p, u)
        if tasks is not None:
            sv.import_tasks(s, p, tasks)
        return p.id, [u.id for u in users]


def take(db, pid, uid, lease=sv.DEFAULT_LEASE):
    with db.write() as s:
        t = sv.next_task(s, s.get(sv.Project, pid), s.get(sv.User, uid), lease)
        return None if t is None else t.id


def test_migrations_match_models_and_downgrade(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from tether.feedback.db import downgrade, upgrade
    from tether.feedback.models import Base

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    downgrade(db.engine, "base")
    upgrade(db.engine, "head")
    with db.read() as s:
        assert s.scalar(select(func.count(Task.id))) == 0


def test_import_rejects_bad_lines_atomically(db, fast_hasher):
    pid, _ = setup(db, fast_hasher)
    bad = (
        jl({"prompt": "ok", "responses": ["a", "b"], "id": "1"})
        + "{not json\n"
        + jl({"responses": ["a", "b"]}, {"prompt": "p", "responses": ["only one"]}, {"prompt": "p", "responses": "ab"},
             {"prompt": "ok", "responses": ["a", "b"], "id": "1"}, {"prompt": "p", "responses": ["a", "b"], "gold": "C"})
    )
    with pytest.raises(sv.ImportRejected) as ei:
        with db.write() as s:
            sv.import_tasks(s, s.get(sv.Project, pid), bad)
    errs = dict(ei.value.errors)
    assert set(errs) == {2, 3, 4, 5, 6, 7}
    assert "invalid JSON" in errs[2] and "missing field 'prompt'" in errs[3]
    assert "at least 2 responses" in errs[4] and "list of strings" in errs[5]
    assert "duplicate id '1'" in errs[6] and "gold" in errs[7]
    with db.read() as s:
        assert s.scalar(select(func.count(Task.id))) == 0  # line 1 was valid but nothing went in
    # re-importing an id that exists is refused too
    with db.write() as s:
        assert sv.import_tasks(s, s.get(sv.Project, pid), jl({"prompt": "ok", "responses": ["a", "b"], "id": "1"})) == 1
    with pytest.raises(sv.ImportRejected, match="already in project"):
        with db.write() as s:
            sv.import_tasks(s, s.get(sv.Project, pid), jl({"prompt": "x", "responses": ["a", "b"], "id": "2"},
                                                          {"prompt": "ok", "responses": ["a", "b"], "id": "1"}))
    with db.read() as s:
        assert s.scalar(select(func.count(Task.id))) == 1


def test_rank_and_rate_import_shapes(db, fast_hasher):
    with db.write() as s:
        rank = sv.create_project(s, "r", "rank")
        rate = sv.create_project(s, "t", "rate")
        cmp_ = sv.create_project(s, "c", "compare")
        with pytest.raises(sv.ImportRejected, match="4 to 7 responses"):
            with s.begin_nested():
                sv.import_tasks(s, rank, jl({"prompt": "p", "responses": ["a", "b", "c"]}))
        assert sv.import_tasks(s, rank, jl({"prompt": "p", "responses": list("abcd"), "gold": [3, 2, 1, 0]})) == 1
        # a rating line with 3 responses becomes 3 one-response items of the same group
        assert sv.import_tasks(s, rate, jl({"prompt": "p", "responses": list("xyz"), "id": "g", "gold": [5, 3, 1]})) == 3
        # a comparison line with 3 responses becomes its 3 pairs
        assert sv.import_tasks(s, cmp_, jl({"prompt": "p", "responses": list("xyz"), "id": "c1"})) == 3
        items = s.scalars(select(Task).where(Task.project_id == rate.id).order_by(Task.id)).all()
        assert [t.external_id for t in items] == ["g#0", "g#1", "g#2"] and [t.gold for t in items] == [5, 3, 1]
        pairs = s.scalars(select(Task).where(Task.project_id == cmp_.id).order_by(Task.id)).all()
        assert [t.response_ids for t in pairs] == [[0, 1], [0, 2], [1, 2]]


def test_overlap_and_never_twice(db, fast_hasher):
    tasks = jl(*[{"prompt": f"p{i}", "responses": ["a", "b"], "id": f"t{i}"} for i in range(4)],
               {"prompt": "gold", "responses": ["good", "bad"], "id": "g", "gold": "A"})
    pid, users = setup(db, fast_hasher, overlap=2, n_users=3, tasks=tasks)
    seen = {u: [] for u in users}
    for _round in range(10):
        for u in users:
            tid = take(db, pid, u)
            if tid is None:
                continue
            assert take(db, pid, u) == tid  # the open item comes back until it is judged
            seen[u].append(tid)
            assert not sv.submit(db, pid, u, tid, {"choice": "A"}).duplicate
    with db.read() as s:
        gold = s.scalar(select(Task.id).where(Task.external_id == "g"))
        per_task = dict(s.execute(select(Judgment.task_id, func.count()).group_by(Judgment.task_id)).all())
        assert s.scalar(select(func.count(Assignment.id))) == 0
        assert all(t.n_claims == per_task.get(t.id, 0) for t in s.scalars(select(Task)))
    for u, ts in seen.items():
        assert len(ts) == len(set(ts))  # never twice to the same annotator
        assert gold in ts  # gold goes to everyone
    assert per_task[gold] == 3
    assert all(c == 2 for t, c in per_task.items() if t != gold)  # every regular item exactly `overlap` times


def test_double_submit_is_idempotent(db, fast_hasher):
    pid, (u, *_rest) = setup(db, fast_hasher, tasks=jl({"prompt": "p", "responses": ["a", "b"]}))
    tid = take(db, pid, u)
    first = sv.submit(db, pid, u, tid, {"choice": "B", "rationale": "b is better", "submission_id": "x1"})
    again = sv.submit(db, pid, u, tid, {"choice": "A", "submission_id": "x2"})  # back button + changed mind
    assert not first.duplicate and again.duplicate
    assert again.judgment.id == first.judgment.id and again.judgment.value == {"choice": "B"}
    with db.read() as s:
        assert s.scalar(select(func.count(Judgment.id))) == 1
        assert s.get(Task, tid).n_claims == 1


def test_concurrent_submissions(db, fast_hasher):
    """Races: the same judgment submitted from 8 threads at once, and 6 annotators racing for 2 slots."""
    pid, users = setup(db, fast_hasher, overlap=2, n_users=6,
                       tasks=jl({"prompt": "p", "responses": ["a", "b"], "id": "one"}, {"prompt": "q", "responses": ["a", "b"], "id": "two"}))
    with db.read() as s:
        t1, t2 = s.scalars(select(Task.id).order_by(Task.id)).all()
    barrier = threading.Barrier(8)

    def dup(_i):
        barrier.wait()
        return sv.submit(db, pid, users[0], t1, {"choice": "A"})

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(dup, range(8)))
    assert sum(not r.duplicate for r in results) == 1
    assert len({r.judgment.id for r in results}) == 1

    barrier6 = threading.Barrier(6)

    def race(u):  # nobody reserved t2: each tries to judge it directly (an API client skipping /next)
        barrier6.wait()
        try:
            return sv.submit(db, pid, u, t2, {"choice": "B"})
        except sv.Conflict:
            return None

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(race, users))
    assert sum(r is not None for r in results) == 2
    with db.read() as s:
        assert s.scalar(select(func.count(Judgment.id)).where(Judgment.task_id == t2)) == 2
        assert s.get(Task, t2).n_claims == 2


def test_expired_reservation_frees_its_slot(db, fast_hasher):
    pid, (a, b, c) = setup(db, fast_hasher, overlap=1, tasks=jl({"prompt": "p", "responses": ["x", "y"]}))
    tid = take(db, pid, a, lease=timedelta(seconds=-1))  # expires at once
    assert take(db, pid, b) == tid  # a's slot went back, b gets it
    assert take(db, pid, c) is None
    # a submits late: the item has its one judgment-to-be reserved by b -> refused, nothing stored
    with pytest.raises(sv.Conflict):
        sv.submit(db, pid, a, tid, {"choice": "A"})
    assert not sv.submit(db, pid, b, tid, {"choice": "A"}).duplicate
    with db.read() as s:
        assert s.get(Task, tid).n_claims == 1 and s.scalar(select(func.count(Judgment.id))) == 1


def test_invalid_values_are_refused(db, fast_hasher):
    with db.write() as s:
        rank = sv.create_project(s, "r", "rank")
        rate = sv.create_project(s, "t", "rate")
        u = sv.create_user(s, "u", "password1", hasher=fast_hasher)
        sv.import_tasks(s, rank, jl({"prompt": "p", "responses": list("abcd")}))
        sv.import_tasks(s, rate, jl({"prompt": "p", "responses": ["a"]}))
        ids = (rank.id, rate.id, u.id)
    rank_id, rate_id, uid = ids
    tr, tt = take(db, rank_id, uid), take(db, rate_id, uid)
    for bad in ({"ranking": [0, 1, 2]}, {"ranking": [0, 0, 1, 2]}, {"ranking": "3,2,x,0"}, {}):
        with pytest.raises(sv.Invalid):
            sv.submit(db, rank_id, uid, tr, bad)
    for bad in ({"rating": 0}, {"rating": 6}, {"rating": "x"}, {"rating": 2.5}):
        with pytest.raises(sv.Invalid):
            sv.submit(db, rate_id, uid, tt, bad)
    with pytest.raises(sv.NotFound):
        sv.submit(db, rate_id, uid, tr, {"rating": 3})  # item of another project
    assert sv.submit(db, rank_id, uid, tr, {"ranking": "3,2,1,0"}).judgment.value == {"ranking": [3, 2, 1, 0]}
    with db.read() as s:
        assert s.scalar(select(func.count(Judgment.id))) == 1


def _label_all(db, pid, votes: dict[int, list]):
    """votes[user] = values to submit in the order items come."""
    for u, vals in votes.items():
        for v in vals:
            tid = take(db, pid, u)
            assert tid is not None
            sv.submit(db, pid, u, tid, v)


def test_export_compare(db, fast_hasher):
    tasks = jl({"prompt": "p1", "responses": ["r0", "r1"], "id": "a"}, {"prompt": "p2", "responses": ["s0", "s1"], "id": "b"},
               {"prompt": "p3", "responses": ["z0", "z1"], "id": "c"})
    pid, (u0, u1, u2) = setup(db, fast_hasher, overlap=3, tasks=tasks)
    _label_all(db, pid, {u0: [{"choice": "A"}, {"choice": "B"}, {"choice": "tie"}],
                         u1: [{"choice": "A"}, {"choice": "A"}, {"choice": "skip"}],
                         u2: [{"choice": "B"}, {"choice": "B"}, {"choice": "tie"}]})
    with db.read() as s:
        p = s.get(sv.Project, pid)
        maj = sv.export_preferences(s, p, "majority")
        allv = sv.export_preferences(s, p, "all")
        raw = sv.export_raw(s, p)
        stats = sv.project_stats(s, p)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in maj] == [("p1", "r0", "r1"), ("p2", "s1", "s0")]
    assert maj[0]["meta"]["votes"] == {"A": 2, "B": 1, "tie": 0, "skip": 0} and maj[0]["meta"]["agreement"] == pytest.approx(2 / 3)
    assert all(set(r) == {"prompt", "chosen", "rejected", "id", "source", "meta"} for r in maj)
    assert len(allv) == 6 and len({r["id"] for r in allv}) == 6  # ties and skips excluded
    assert len(raw) == 9 and sum(r["skipped"] for r in raw) == 1
    assert stats["counts"]["judgments"] == 9 and stats["agreement"]["units"] == 3


def test_export_rank_and_rate(db, fast_hasher):
    with db.write() as s:
        rank = sv.create_project(s, "r", "rank", overlap=2)
        rate = sv.create_project(s, "t", "rate", overlap=2)
        us = [sv.create_user(s, f"u{i}", "password1", hasher=fast_hasher) for i in range(2)]
        sv.import_tasks(s, rank, jl({"prompt": "rp", "responses": ["w", "x", "y", "z"], "id": "r1"}))
        sv.import_tasks(s, rate, jl({"prompt": "tp", "responses": ["good", "ok", "bad"], "id": "g1"}))
        rank_id, rate_id, (a, b) = rank.id, rate.id, [u.id for u in us]
    _label_all(db, rank_id, {a: [{"ranking": [0, 1, 2, 3]}], b: [{"ranking": [1, 0, 2, 3]}]})
    by_resp = {}
    for u, ratings in ((a, {0: 5, 1: 3, 2: 1}), (b, {0: 4, 1: 4, 2: 2})):
        for _ in range(3):
            tid = take(db, rate_id, u)
            with db.read() as s:
                idx = s.get(Task, tid).response_ids[0]
            by_resp.setdefault(idx, []).append(ratings[idx])
            sv.submit(db, rate_id, u, tid, {"rating": ratings[idx]})
    with db.read() as s:
        rk = sv.export_preferences(s, s.get(sv.Project, rank_id), "majority")
        rk_all = sv.export_preferences(s, s.get(sv.Project, rank_id), "all")
        rt = sv.export_preferences(s, s.get(sv.Project, rate_id), "majority")
        rt_all = sv.export_preferences(s, s.get(sv.Project, rate_id), "all")
        st = sv.project_stats(s, s.get(sv.Project, rank_id))
    # 6 pairs; (w, x) is split 1-1 and dropped
    assert sorted((r["chosen"], r["rejected"]) for r in rk) == sorted(
        [("w", "y"), ("w", "z"), ("x", "y"), ("x", "z"), ("y", "z")])
    assert len(rk_all) == 12
    assert st["agreement"]["units"] == 6 and st["agreement"]["unit"] == "response pair"
    # means: good 4.5, ok 3.5, bad 1.5
    assert sorted((r["chosen"], r["rejected"]) for r in rt) == sorted([("good", "ok"), ("good", "bad"), ("ok", "bad")])
    # all votes: a gives 3 pairs, b ties good/ok -> 2 pairs
    assert len(rt_all) == 5


def test_annotators_racing_for_the_last_slots_never_hear_none_while_work_remains(db, fast_hasher):
    """40 annotators ask for an item at the same moment. With 50 free items each gets one; with 25, exactly
    25 do. On PostgreSQL every request used to try the same 8 candidates and give up when they were
    taken: 17-25 of 50 heard "nothing left" while hundreds of slots were open."""
    n = 40
    for items, served in ((50, n), (25, 25)):
        db_tasks = jl(*[{"prompt": f"p{i}", "responses": ["a", "b"], "id": f"t{items}-{i}"} for i in range(items)])
        with db.write() as s:
            p = sv.create_project(s, f"race-{items}", "compare", "", 1)
            users = [sv.create_user(s, f"r{items}-{i}", f"password{i}", hasher=fast_hasher) for i in range(n)]
            for u in users:
                sv.add_member(s, p, u)
            sv.import_tasks(s, p, db_tasks)
            pid, uids = p.id, [u.id for u in users]
        barrier = threading.Barrier(n)

        def ask(uid):
            barrier.wait()
            return take(db, pid, uid)

        with ThreadPoolExecutor(n) as ex:
            got = list(ex.map(ask, uids))
        assert sum(t is not None for t in got) == served, got
        assert len({t for t in got if t is not None}) == served  # overlap 1: never one item twice
        with db.read() as s:
            assert s.scalar(select(func.sum(Task.n_claims)).where(Task.project_id == pid)) == served


def test_a_double_click_at_overlap_one_is_a_duplicate_not_a_conflict(db, fast_hasher):
    """The same judgment sent 4 times at once, at overlap 1, for 12 items (half reserved by /next first,
    half not): one is stored per item, the others answer the stored judgment (on PostgreSQL most
    answered 409 "already has all the judgments")."""
    pid, (u, *_rest) = setup(db, fast_hasher, overlap=1, n_users=2,
                             tasks=jl(*[{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(12)]))
    with db.read() as s:
        tids = s.scalars(select(Task.id).order_by(Task.id)).all()
    barrier = threading.Barrier(4)

    def send(tid):
        barrier.wait()
        try:
            return sv.submit(db, pid, u, tid, {"choice": "A"})
        except sv.Conflict as e:
            return e

    for k, tid in enumerate(tids):
        if k % 2 == 0:
            assert take(db, pid, u) == tid
        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(send, [tid] * 4))
        assert not any(isinstance(r, sv.Conflict) for r in results), (k, results)
        assert sum(not r.duplicate for r in results) == 1 and len({r.judgment.id for r in results}) == 1
    with db.read() as s:
        assert {t.n_claims for t in s.scalars(select(Task))} == {1} and s.scalar(select(func.count(Assignment.id))) == 0


def test_next_walks_an_index_instead_of_sorting_the_project(sqlite_db, fast_hasher):
    """/next's cost must not grow with the project (SQLite: 3 / 12 / 50 ms at 1k / 20k / 100k items when
    one query sorted every open item). Every query next_task sends is planned as an index search with
    no sort; benchmarks/label_scale.py measures the times."""
    from sqlalchemy import event

    pid, (u, *_rest) = setup(sqlite_db, fast_hasher, overlap=3, n_users=1,
                             tasks=jl(*[{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(50)], {"prompt": "g", "responses": ["a", "b"], "gold": "A"}))
    sent = []
    listener = lambda conn, cur, stmt, params, ctx, many: sent.append((stmt, params)) if stmt.lstrip().startswith("SELECT") else None  # noqa: E731
    event.listen(sqlite_db.engine, "before_cursor_execute", listener)
    try:
        for _ in range(3):
            tid = take(sqlite_db, pid, u)
            sv.submit(sqlite_db, pid, u, tid, {"choice": "A"})
    finally:
        event.remove(sqlite_db.engine, "before_cursor_execute", listener)
    plans = []
    with sqlite_db.engine.connect() as conn:
        for stmt, params in sent:
            if "FROM tasks" in stmt:
                plans.append(" / ".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + stmt, params).all()))
    walks = [p for p in plans if p.startswith("SEARCH tasks USING COVERING INDEX ix_tasks_next")]
    assert len(walks) >= 3 and all("TEMP B-TREE" not in p for p in walks), plans
    # the rest: primary-key lookups, and the annotator's own open reservation (a sort of their few rows)
    assert all(p in walks or p.startswith(("SEARCH tasks USING INTEGER PRIMARY KEY", "SEARCH assignments USING INDEX ix_assignments_user_id"))
               for p in plans), plans


def test_an_import_of_more_items_than_postgresql_takes_parameters(db, fast_hasher):
    """70,000 items in one file: PostgreSQL takes at most 65,535 bound parameters per statement, and the
    import's check for ids already in the project sent one per item (the import failed with a 500)."""
    n = 70_000
    pid, _ = setup(db, fast_hasher, n_users=1)
    with db.write() as s:
        assert sv.import_tasks(s, s.get(sv.Project, pid), "".join(f'{{"prompt": "p{i}", "responses": ["a", "b"], "id": "t{i}"}}\n' for i in range(n))) == n
    with db.write() as s:  # and an id already there is still found, by line
        with pytest.raises(sv.ImportRejected, match="line 2: id 't69999' is already in project"):
            sv.import_tasks(s, s.get(sv.Project, pid), jl({"prompt": "new", "responses": ["a", "b"], "id": "new"},
                                                          {"prompt": "p", "responses": ["a", "b"], "id": "t69999"}))
    with db.read() as s:
        assert s.scalar(select(func.count(Task.id)).where(Task.project_id == pid)) == n


def test_judging_goes_on_while_an_import_is_read(sqlite_db, fast_hasher, monkeypatch):
    """An import's file is parsed before its write transaction begins: on SQLite a judgment in another
    project is stored while the parser runs (it used to wait for the whole import: 10 s at 100k items)."""
    import time

    from fastapi.testclient import TestClient

    from tether.feedback.app import create_app

    pid, (u, *_rest) = setup(sqlite_db, fast_hasher, overlap=1, n_users=1, tasks=jl({"prompt": "p", "responses": ["a", "b"]}))
    with sqlite_db.write() as s:
        sv.create_user(s, "root", "rootpass1", role="admin", hasher=fast_hasher)
        other = sv.create_project(s, "other", "compare").id
    tid = take(sqlite_db, pid, u)
    stored: list[float] = []
    real = sv.parse_task_lines

    def slow_parse(kind, text):  # noqa: ANN001, ANN202
        t = threading.Thread(target=lambda: stored.append(sv.submit(sqlite_db, pid, u, tid, {"choice": "A"}).judgment.id))
        t.start()
        t.join(5)  # the judgment's write waits for any open write transaction
        stored.append(time.monotonic())
        return real(kind, text)

    monkeypatch.setattr(sv, "parse_task_lines", slow_parse)
    c = TestClient(create_app(sqlite_db))
    h = {"X-CSRF-Token": c.post("/api/login", json={"username": "root", "password": "rootpass1"}).json()["csrf_token"]}
    r = c.post(f"/api/admin/projects/{other}/tasks", content=jl({"prompt": "q", "responses": ["a", "b"]}), headers=h)
    assert r.status_code == 201 and r.json() == {"imported": 1}
    assert len(stored) == 2 and isinstance(stored[0], int), "the judgment waited for the import's write lock"
