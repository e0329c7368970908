"""Abuse without logging in (bounded bodies, login floods) and account control (throttling, audit, revocation)."""

from __future__ import annotations

import asyncio
import json
import re
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
    assert "default-src 'none'" in r.headers["content-security-policy"] and r.headers["x-frame-options"] == "DENY"
    assert "content-security-policy: default-src 'none'" in text.lower()  # also when refused before the app runs
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
    drain first. Then the address is throttled (429)."""
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
    r = httpx.post(srv.url + "/api/login", json={"username": "nobody", "password": "wrong-password"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "too many failed logins" in r.json()["error"]


# ---------------------------------------------------------------- throttling, audit, revocation


def _audit(db, action: str) -> list:
    with db.read() as s:
        return list(s.scalars(sv.select(sv.AuditEvent).where(sv.AuditEvent.action == action).order_by(sv.AuditEvent.id)))


def _login(c: TestClient, user: str, pw: str):  # noqa: ANN202
    return c.post("/api/login", json={"username": user, "password": pw})


def test_login_throttled_per_account_and_per_address(db, fast_hasher):
    with db.write() as s:
        sv.create_user(s, "ann", "annpass12", hasher=fast_hasher)
    app = create_app(db)
    c = TestClient(app)
    codes = [_login(c, "ann", f"wrong{i}").status_code for i in range(100)]
    assert codes == [401] * 5 + [429] * 95
    r = _login(c, "ann", "annpass12")  # the right password too, while the account is locked
    assert r.status_code == 429 and "too many failed logins" in r.json()["error"]
    assert 0 < int(r.headers["retry-after"]) <= 15 * 60
    assert len(_audit(db, "login_failed")) == 5 and [e.target for e in _audit(db, "login_locked")] == ["ann"]
    # the form login is throttled too
    tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"username": "ann", "password": "annpass12", "csrf_token": tok})
    assert r.status_code == 429 and "too many failed logins" in r.text
    later = app.state.throttle.clock() + 15 * 60 + 1
    app.state.throttle.clock = lambda: later
    assert _login(c, "ann", "annpass12").status_code == 200
    assert [(e.actor, e.address) for e in _audit(db, "login")] == [("ann", "testclient")]
    # one address trying many accounts: 20 failures, then refused whatever the account
    codes = [_login(c, f"user{i}", "wrong-password").status_code for i in range(21)]
    assert codes == [401] * 20 + [429]
    assert _login(c, "ann", "annpass12").status_code == 429
    assert "address testclient" in [e.target for e in _audit(db, "login_locked")]


def test_admin_ends_sessions_resets_removes_and_deactivates(db, fast_hasher):
    with db.write() as s:
        sv.create_user(s, "root", "rootpass1", role="admin", hasher=fast_hasher)
        ann = sv.create_user(s, "ann", "annpass12", hasher=fast_hasher)
        p = sv.create_project(s, "p", "compare")
        sv.import_tasks(s, p, json.dumps({"prompt": "x", "responses": ["a", "b"]}) + "\n")
        sv.add_member(s, p, ann)
        pid, uid = p.id, ann.id
    app = create_app(db)
    root = TestClient(app, follow_redirects=False)
    rcsrf = _login(root, "root", "rootpass1").json()["csrf_token"]
    a1, a2 = TestClient(app), TestClient(app)
    acsrf = _login(a1, "ann", "annpass12").json()["csrf_token"]
    _login(a2, "ann", "annpass12")
    # an annotator cannot use the admin routes
    for path in [f"/admin/users/{uid}/end-sessions", f"/admin/users/{uid}/deactivate", f"/admin/p/{pid}/members/{uid}/remove"]:
        assert a1.post(path, data={"csrf_token": acsrf}).status_code == 403
    assert a1.get("/admin/audit").status_code == 403 and a1.get("/api/admin/audit").status_code == 403

    assert root.post(f"/admin/users/{uid}/end-sessions", data={"csrf_token": rcsrf}).status_code == 303
    assert a1.get("/api/me").status_code == 401 and a2.get("/api/me").status_code == 401
    _login(a1, "ann", "annpass12")
    r = root.post(f"/admin/users/{uid}/reset-password", data={"csrf_token": rcsrf, "password": "fresh-pass-1"})
    assert r.status_code == 303
    assert a1.get("/api/me").status_code == 401  # a reset ends the sessions too
    assert _login(a1, "ann", "annpass12").status_code == 401
    assert _login(a1, "ann", "fresh-pass-1").status_code == 200 and a1.get(f"/p/{pid}").status_code == 200
    assert root.post(f"/admin/p/{pid}/members/{uid}/remove", data={"csrf_token": rcsrf}).status_code == 303
    assert a1.get(f"/p/{pid}").status_code == 404 and a1.get("/api/projects").json()["projects"] == []
    assert root.post(f"/admin/users/{uid}/deactivate", data={"csrf_token": rcsrf}).status_code == 303
    assert a1.get("/api/me").status_code == 401  # refused at once
    assert _login(a1, "ann", "fresh-pass-1").status_code == 401
    with db.read() as s:
        root_id = sv.get_user(s, "root").id
    assert root.post(f"/admin/users/{root_id}/deactivate", data={"csrf_token": rcsrf}).status_code == 422  # not yourself
    page = root.get("/admin/audit").text
    for action in ("end_sessions", "reset_password", "remove_member", "deactivate_user", "login", "login_failed"):
        assert action in page
    events = root.get("/api/admin/audit").json()["events"]
    assert [e["action"] for e in events if e["actor"] == "root" and e["target"] == "ann"] == [
        "deactivate_user", "remove_member", "reset_password", "end_sessions"]  # newest first
    assert "fresh-pass-1" not in page and "deactivate" in root.get("/admin").text


def test_expired_sessions_are_refused_and_purged(db, fast_hasher):
    from datetime import timedelta

    from tether.feedback.models import LoginSession, utcnow
    from tether.feedback.security import create_session

    with db.write() as s:
        u = sv.create_user(s, "ann", "annpass12", hasher=fast_hasher)
        token, row = create_session(s, u)
        row.expires_at = utcnow() - timedelta(seconds=1)
    c = TestClient(create_app(db))
    c.cookies.set("tether_session", token)
    assert c.get("/api/me").status_code == 401
    assert _login(c, "ann", "annpass12").status_code == 200
    with db.read() as s:
        assert s.scalar(sv.select(sv.func.count()).select_from(LoginSession)) == 1  # the expired row is gone


def test_cli_account_commands(tmp_path, monkeypatch, capsys):
    import io
    import sys

    from tether.feedback.cli import main
    from tether.feedback.models import LoginSession
    from tether.feedback.security import create_session

    dbf = str(tmp_path / "l.db")
    assert main(["create-project", "p", "--kind", "compare", "--db", dbf]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("annpass12\n"))
    assert main(["create-user", "ann", "--password-stdin", "--project", "p", "--db", dbf]) == 0
    db = Database(dbf)

    def sessions() -> int:
        with db.read() as s:
            return s.scalar(sv.select(sv.func.count()).select_from(LoginSession))

    with db.write() as s:
        create_session(s, sv.get_user(s, "ann"))
    assert main(["end-sessions", "ann", "--db", dbf]) == 0 and sessions() == 0
    with db.write() as s:
        create_session(s, sv.get_user(s, "ann"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("newpass123\n"))
    assert main(["reset-password", "ann", "--password-stdin", "--db", dbf]) == 0 and sessions() == 0
    from tether.feedback.security import verify_password

    with db.read() as s:
        assert verify_password(sv.get_user(s, "ann").password_hash, "newpass123")
    assert main(["remove-member", "--project", "p", "ann", "--db", dbf]) == 0
    with db.read() as s:
        assert sv.projects_for(s, sv.get_user(s, "ann")) == []
    assert main(["deactivate-user", "ann", "--db", dbf]) == 0
    with db.read() as s:
        assert not sv.get_user(s, "ann").active
    assert main(["deactivate-user", "nobody", "--db", dbf]) == 1
    capsys.readouterr()
    assert main(["audit", "--db", dbf]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1:4] for line in out[:4]] == [
        ["deactivate_user", "cli", "ann"], ["remove_member", "cli", "ann"], ["reset_password", "cli", "ann"], ["end_sessions", "cli", "ann"]]
