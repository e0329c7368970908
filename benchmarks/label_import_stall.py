"""How long judging stalls while an admin imports a big file, over HTTP against a real server on 127.0.0.1
(SQLite: an import's write transaction blocks writes in every project).

    .venv/bin/python -m benchmarks.label_import_stall [--items 100000]        # about 30 s

One annotator judges in project A in a loop while the admin imports N items into project B through
`POST /api/admin/projects/<id>/tasks`; prints the import's time and the annotator's longest judgment
(next + submit) during it, against its median outside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    a = ap.parse_args()
    from argon2 import PasswordHasher

    from tether.feedback import service as sv
    from tether.feedback.db import Database

    tmp = Path(tempfile.mkdtemp())
    url = f"sqlite:///{tmp / 'label.db'}"
    db = Database(url)
    db.migrate()
    fast = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    with db.write() as s:
        sv.create_user(s, "root", "rootpass1", role="admin", hasher=fast)
        pa = sv.create_project(s, "A", "compare", overlap=1)
        sv.add_member(s, pa, sv.create_user(s, "ann", "annpass12", hasher=fast))
        sv.import_tasks(s, pa, "".join(json.dumps({"prompt": f"a{i}", "responses": ["x", "y"]}) + "\n" for i in range(5000)))
        pa_id, pb_id = pa.id, sv.create_project(s, "B", "compare").id
    db.dispose()
    port = 8731
    srv = subprocess.Popen([sys.executable, "-m", "tether.feedback.cli", "serve", "--db", url, "--port", str(port), "--log-level", "warning"],
                           env={**os.environ, "TETHER_LABEL_ADMIN_PASSWORD": "unused-admin-pass"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        ann, root = httpx.Client(base_url=base, timeout=60), httpx.Client(base_url=base, timeout=300)
        ha = {"X-CSRF-Token": ann.post("/api/login", json={"username": "ann", "password": "annpass12"}).json()["csrf_token"]}
        hr = {"X-CSRF-Token": root.post("/api/login", json={"username": "root", "password": "rootpass1"}).json()["csrf_token"]}
        lines = "".join(json.dumps({"prompt": f"b{i}", "responses": ["x", "y"]}) + "\n" for i in range(a.items))
        times: list[tuple[float, float]] = []
        stop = threading.Event()

        def annotate() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                task = ann.post(f"/api/projects/{pa_id}/next", headers=ha).json()["task"]
                ann.post(f"/api/projects/{pa_id}/judgments", json={"task_id": task["id"], "choice": "A"}, headers=ha).raise_for_status()
                times.append((t0, time.perf_counter() - t0))

        th = threading.Thread(target=annotate)
        th.start()
        time.sleep(2)
        t0 = time.perf_counter()
        r = root.post(f"/api/admin/projects/{pb_id}/tasks", content=lines.encode(), headers=hr)
        t1 = time.perf_counter()
        time.sleep(1)
        stop.set()
        th.join()
        assert r.status_code == 201, r.text
        during = [d for s, d in times if t0 <= s + d and s <= t1]
        outside = [d for s, d in times if s + d < t0 or s > t1]
        print(json.dumps({"items": a.items, "import_s": round(t1 - t0, 2), "judgment_max_during_import_ms": round(1000 * max(during), 1),
                          "judgments_during_import": len(during), "judgment_median_outside_ms": round(1000 * statistics.median(outside), 1)}))
    finally:
        srv.terminate()
        srv.wait(10)


if __name__ == "__main__":
    main()
