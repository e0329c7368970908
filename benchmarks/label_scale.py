"""How `tether label`'s assignment scales with project size: /next + submit for one annotator at 1k, 20k
and 100k items, the import's time (the write lock it holds), on SQLite or PostgreSQL.

    .venv/bin/python -m benchmarks.label_scale [--db sqlite|URL] [--sizes 1000,20000,100000] [--rounds 200]

Prints, per size: the import's parse seconds and the seconds it holds the write transaction, and p50/p95 milliseconds of next_task and of submit (service calls in
one process: the database's share of a request, without HTTP).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def measure(url: str, n: int, rounds: int) -> dict:
    from tether.feedback import service as sv
    from tether.feedback.db import Database

    from argon2 import PasswordHasher

    db = Database(url)
    db.migrate()
    with db.write() as s:
        p = sv.create_project(s, f"scale-{n}-{time.time_ns()}", "compare", "", 2)
        users = [sv.create_user(s, f"a{n}-{i}-{time.time_ns()}", "password-123", hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)) for i in range(2)]
        for u in users:
            sv.add_member(s, p, u)
        pid, uids = p.id, [u.id for u in users]
    text = "".join(json.dumps({"prompt": f"prompt {i}", "responses": ["a", "b"], "id": f"t{i}"}) + "\n" for i in range(n))
    t = time.perf_counter()
    parsed = sv.parse_import("compare", text).prepare(db.engine.dialect)  # as the app and the CLI do: before the write transaction
    parse = time.perf_counter() - t
    t = time.perf_counter()
    with db.write() as s:
        sv.import_tasks(s, s.get(sv.Project, pid), parsed)
    imp = time.perf_counter() - t
    nxt, sub = [], []
    for r in range(rounds):
        uid = uids[r % 2]
        t = time.perf_counter()
        with db.write() as s:
            task = sv.next_task(s, s.get(sv.Project, pid), s.get(sv.User, uid))
            tid = task.id
        nxt.append(time.perf_counter() - t)
        t = time.perf_counter()
        sv.submit(db, pid, uid, tid, {"choice": "A"})
        sub.append(time.perf_counter() - t)
    db.dispose()
    q = lambda xs, f: 1000 * statistics.quantiles(xs, n=20)[18] if f == 95 else 1000 * statistics.median(xs)  # noqa: E731
    return {"items": n, "parse_s": round(parse, 2), "import_write_lock_s": round(imp, 2), "next_p50_ms": round(q(nxt, 50), 2), "next_p95_ms": round(q(nxt, 95), 2),
            "submit_p50_ms": round(q(sub, 50), 2), "submit_p95_ms": round(q(sub, 95), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="sqlite", help="sqlite (a temporary file) or a database URL")
    ap.add_argument("--sizes", default="1000,20000,100000")
    ap.add_argument("--rounds", type=int, default=200)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, a.sizes.split(",")):
            url = f"sqlite:///{Path(tmp) / f'label-{n}.db'}" if a.db == "sqlite" else a.db
            print(json.dumps(measure(url, n, a.rounds)), flush=True)


if __name__ == "__main__":
    main()
