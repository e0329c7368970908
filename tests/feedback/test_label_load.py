"""Load and crash test against the real server on 127.0.0.1, on SQLite and on PostgreSQL.

50 simulated annotators (asyncio + httpx) label 200 comparison items with overlap 3 (600 judgments),
re-submitting about 10% of their judgments (back button / retry). When a third of the judgments are in,
the server is SIGKILLed mid-traffic and restarted on the same port and database; clients retry what was
in flight. Afterwards every acknowledged judgment is in the database exactly once and the assignment
rules held, and no annotator was told "nothing left" while an item they may judge was free (the end of
the run is 50 annotators competing for the last slots). Bounded: at most 6000 requests and 120 s.
Figures go to outputs/label_load_<database>.json."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
from sqlalchemy import func, select

from conftest import REPO, LiveServer
from tether.feedback import service as sv
from tether.feedback.db import Database
from tether.feedback.models import Assignment, Judgment, Task

N_USERS, N_ITEMS, OVERLAP = 50, 200, 3
MAX_REQUESTS, TIME_LIMIT = 6000, 120.0


def test_load_50_annotators_with_a_crash(db_url, tmp_path, fast_hasher):
    url = db_url
    db = Database(url)
    db.migrate()
    with db.write() as s:
        p = sv.create_project(s, "load", "compare", overlap=OVERLAP)
        users = [sv.create_user(s, f"ann{i:02d}", f"password-{i:02d}", hasher=fast_hasher) for i in range(N_USERS)]
        for u in users:
            sv.add_member(s, p, u)
        sv.import_tasks(s, p, "".join(json.dumps({"prompt": f"prompt {i}", "responses": [f"a{i}", f"b{i}"], "id": f"i{i}"}) + "\n"
                                      for i in range(N_ITEMS)))
        pid = p.id
    db.dispose()

    srv = LiveServer(url, tmp_path / "server.log")
    srv.start()
    stats = {"requests": 0, "dup_resubmits": 0, "dup_acks": 0, "conflicts": 0, "conn_errors": 0, "none_while_work_remained": 0}
    latencies: list[float] = []
    by_route: dict[str, list[float]] = {"next": [], "judgments": []}
    acked: dict[tuple[int, str], str] = {}
    crash = {"done": False, "at": None, "down_s": 0.0}
    t_start = time.perf_counter()

    async def call(client, method, path, **kw):
        """Send until the server answers (retrying across the crash); returns the response."""
        while True:
            if stats["requests"] >= MAX_REQUESTS or time.perf_counter() - t_start > TIME_LIMIT:
                raise TimeoutError("load test bound reached")
            stats["requests"] += 1
            t0 = time.perf_counter()
            try:
                r = await client.request(method, path, **kw)
            except (httpx.TransportError,) :
                stats["conn_errors"] += 1
                await asyncio.sleep(0.2)
                continue
            latencies.append(time.perf_counter() - t0)
            route = path.rsplit("/", 1)[-1]
            if route in by_route:
                by_route[route].append(latencies[-1])
            return r

    async def annotator(i: int):
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            r = await call(c, "POST", "/api/login", json={"username": f"ann{i:02d}", "password": f"password-{i:02d}"})
            r.raise_for_status()
            h = {"X-CSRF-Token": r.json()["csrf_token"]}
            while True:
                r = await call(c, "POST", f"/api/projects/{pid}/next", headers=h)
                assert r.status_code == 200, r.text
                task = r.json()["task"]
                if task is None:
                    # claims only grow in this run (no lease expires): work left now was left then
                    prog = (await call(c, "GET", f"/api/projects/{pid}/progress")).json()
                    stats["none_while_work_remained"] += prog["available"] > 0
                    return
                choice = rng.choice(["A", "A", "B", "tie"])
                body = {"task_id": task["id"], "choice": choice, "submission_id": f"{i}-{task['id']}", "client_ms": rng.randint(500, 9000)}
                r = await call(c, "POST", f"/api/projects/{pid}/judgments", json=body, headers=h)
                if r.status_code == 409:
                    stats["conflicts"] += 1
                    continue
                assert r.status_code in (200, 201), r.text
                stats["dup_acks"] += r.status_code == 200  # a retry after the crash found it stored
                acked[(task["id"], f"ann{i:02d}")] = r.json()["value"]["choice"]
                assert r.json()["value"]["choice"] == choice
                if rng.random() < 0.1:  # double submit: must be acknowledged as the same judgment
                    stats["dup_resubmits"] += 1
                    r2 = await call(c, "POST", f"/api/projects/{pid}/judgments", json={**body, "choice": "B"}, headers=h)
                    assert r2.status_code == 200 and r2.json()["duplicate"] and r2.json()["value"]["choice"] == choice

    async def crasher():
        while len(acked) < N_ITEMS * OVERLAP // 3:
            await asyncio.sleep(0.02)
        crash["at"] = len(acked)
        t0 = time.perf_counter()
        srv.kill()  # SIGKILL while requests are in flight
        await asyncio.to_thread(srv.start)  # same port, same database
        crash["down_s"] = time.perf_counter() - t0
        crash["done"] = True

    async def main():
        await asyncio.gather(crasher(), *(annotator(i) for i in range(N_USERS)))

    try:
        asyncio.run(main())
    finally:
        elapsed = time.perf_counter() - t_start
        srv.stop()

    db = Database(url)
    with db.read() as s:
        rows = s.execute(select(Judgment.task_id, Judgment.user_id, Judgment.value)).all()
        names = {u.id: u.username for u in s.scalars(select(sv.User))}
        stored = {(t, names[u]): v["choice"] for t, u, v in rows}
        per_task = dict(s.execute(select(Judgment.task_id, func.count()).group_by(Judgment.task_id)).all())
        n_claims = dict(s.execute(select(Task.id, Task.n_claims)).all())
        leftover = s.scalar(select(func.count(Assignment.id)))
    db.dispose()

    lost = [k for k in acked if k not in stored]
    wrong = [k for k, v in acked.items() if stored.get(k) != v]
    lat = sorted(latencies)
    figures = {
        "annotators": N_USERS, "items": N_ITEMS, "overlap": OVERLAP,
        "acknowledged": len(acked), "stored": len(rows), "lost": len(lost), "changed": len(wrong),
        "elapsed_s": round(elapsed, 2), "server_down_s": round(crash["down_s"], 2),
        "judgments_per_s": round(len(acked) / elapsed, 1),
        "judgments_per_s_excluding_restart": round(len(acked) / (elapsed - crash["down_s"]), 1),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_p50_ms": round(1000 * lat[len(lat) // 2], 1),
        "latency_p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1),
        "latency_max_ms": round(1000 * lat[-1], 1),
        **{f"{k}_p{q}_ms": round(1000 * sorted(v)[int(q / 100 * (len(v) - 1))], 1) for k, v in by_route.items() for q in (50, 95)},
        "database": url.split(":", 1)[0],
        "crash_after_acks": crash["at"], **stats,
    }
    out = REPO / "outputs" / f"label_load_{url.split(':', 1)[0].split('+')[0]}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print("\nload figures:", json.dumps(figures))

    assert crash["done"]
    assert stats["none_while_work_remained"] == 0, stats
    assert lost == [] and wrong == []
    assert len(rows) == len(stored) == len(acked) == N_ITEMS * OVERLAP  # exactly once each, nothing extra
    assert all(c == OVERLAP for c in per_task.values()) and len(per_task) == N_ITEMS
    assert all(n_claims[t] == per_task[t] for t in per_task) and leftover == 0
