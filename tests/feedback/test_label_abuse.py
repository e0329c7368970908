"""Abuse without logging in (bounded bodies, login floods) and account control (throttling, audit, revocation)."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
from fastapi.testclient import TestClient

from conftest import ApiClient
from tether.feedback import service as sv
from tether.feedback.app import MAX_BODY, create_app
from tether.feedback.db import Database


def _raw_post(url: str, path: str, headers: dict, first_bytes: bytes, timeout: float = 20) -> tuple[int, str]:
    """Declare a huge body, send only a few bytes, and read the answer (the server must not wait for the rest)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as so:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        so.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + first_bytes)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 10:
            chunk = so.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.decode("latin-1")


def test_oversized_bodies_get_413_without_being_read(live_server_factory):
    srv = live_server_factory()
    big = str(300 * 1024 * 1024)
    status, text = _raw_post(srv.url, "/api/login", {"Content-Type": "application/json", "Content-Length": big}, b'{"user')
    assert status == 413 and "request body too large" in text
    # a multipart upload to an import form without a session: refused before anything is spooled
    status, text = _raw_post(srv.url, "/admin/projects", {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": big},
                             b"--x\r\n")
    assert status == 413 and "request body too large" in text
    # no Content-Length (chunked): the streamed bytes are counted
    def gen():
        yield b"x" * MAX_BODY
        yield b"x" * 65536
    r = httpx.post(srv.url + "/api/login", content=gen(), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "request body too large" in r.json()["error"]
    assert httpx.get(srv.url + "/healthz").status_code == 200


def test_only_admin_sessions_get_the_import_limit(sqlite_db, fast_hasher):
    with sqlite_db.write() as s:
        sv.create_user(s, "root", "rootpass1", role="admin", hasher=fast_hasher)
        p = sv.create_project(s, "big", "compare")
        sv.add_member(s, p, sv.create_user(s, "ann", "annpass12", hasher=fast_hasher))
        pid = p.id
    app = create_app(sqlite_db)
    lines = "".join(json.dumps({"prompt": "p" * 1000, "responses": ["a", "b"], "id": f"i{i}"}) + "\n" for i in range(1500))
    assert len(lines) > MAX_BODY
    anon = TestClient(app)
    r = anon.post(f"/api/admin/projects/{pid}/tasks", content=lines.encode())
    assert r.status_code == 413
    ann = TestClient(app)
    h = {"X-CSRF-Token": ann.post("/api/login", json={"username": "ann", "password": "annpass12"}).json()["csrf_token"]}
    assert ann.post(f"/api/admin/projects/{pid}/tasks", content=lines.encode(), headers=h).status_code == 413
    assert ann.post(f"/api/projects/{pid}/judgments", json={"task_id": 1, "rationale": lines}, headers=h).status_code == 413
    root = TestClient(app)
    h = {"X-CSRF-Token": root.post("/api/login", json={"username": "root", "password": "rootpass1"}).json()["csrf_token"]}
    r = root.post(f"/api/admin/projects/{pid}/tasks", content=lines.encode(), headers=h)
    assert r.status_code == 201 and r.json()["imported"] == 1500


N_FLOOD = 60


def test_login_flood_does_not_starve_other_requests(tmp_path, live_server_factory, fast_hasher):
    """60 wrong logins (real argon2 cost: unknown users are checked against a default-cost hash) are in
    flight while a logged-in annotator judges an item and /healthz answers; the flood does not have to
    drain first."""
    url = f"sqlite:///{tmp_path / 'live.db'}"
    db = Database(url)
    db.migrate()
    with db.write() as s:
        p = sv.create_project(s, "f", "compare", overlap=1)
        sv.add_member(s, p, sv.create_user(s, "ann", "annpass12", hasher=fast_hasher))
        sv.import_tasks(s, p, "".join(json.dumps({"prompt": f"p{i}", "responses": ["a", "b"]}) + "\n" for i in range(5)))
        pid = p.id
    db.dispose()
    srv = live_server_factory(url)
    ann = ApiClient(srv.url, "ann", "annpass12")
    answered: list[int] = []

    async def bad(c: httpx.AsyncClient, i: int) -> None:
        r = await c.post("/api/login", json={"username": f"nobody{i}", "password": "wrong-password"})
        answered.append(r.status_code)

    async def run() -> tuple[int, list[int]]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=httpx.Limits(max_connections=N_FLOOD + 5)) as c:
            flood = [asyncio.create_task(bad(c, i)) for i in range(N_FLOOD)]
            await asyncio.sleep(1.0)  # the flood is queued on the server
            codes = [(await c.get("/healthz")).status_code]
            t = (await asyncio.to_thread(ann.post, f"/api/projects/{pid}/next")).json()["task"]
            codes.append((await asyncio.to_thread(ann.post, f"/api/projects/{pid}/judgments", json={"task_id": t["id"], "choice": "A"})).status_code)
            codes.append((await c.get("/healthz")).status_code)
            done_meanwhile = sum(1 for a in answered if a == 401)
            await asyncio.gather(*flood)
            return done_meanwhile, codes

    done_meanwhile, codes = asyncio.run(run())
    assert codes == [200, 201, 200]
    assert set(answered) <= {401, 429, 503} and len(answered) == N_FLOOD
    assert done_meanwhile < N_FLOOD // 4, f"{done_meanwhile} of {N_FLOOD} bad logins had to finish before the annotator was served"
