"""The web app in-process (FastAPI TestClient on SQLite): pages, JSON API, and security."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from tether.feedback import service as sv
from tether.feedback.app import create_app

XSS_PROMPT = '<script>alert("prompt")</script>'
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}  # what a browser sends following a link on the site (a GET reserves then)
XSS = ['<script>alert("xss")</script>', '<img src=x onerror="alert(1)">', '"><svg onload=alert(3)>']


@pytest.fixture
def env(sqlite_db, fast_hasher):
    with sqlite_db.write() as s:
        admin = sv.create_user(s, "root", "rootpass1", role="admin", hasher=fast_hasher)
        ann = sv.create_user(s, "ann", "annpass12", hasher=fast_hasher)
        other = sv.create_user(s, "bob", "bobpass12", hasher=fast_hasher)
        p = sv.create_project(s, "mine", "compare", "## Rules\n<script>alert('g')</script> be **fair**")
        q = sv.create_project(s, "secret", "rate")
        sv.import_tasks(s, p, json.dumps({"prompt": XSS_PROMPT, "responses": XSS[:2], "id": "x"}) + "\n")
        sv.import_tasks(s, q, json.dumps({"prompt": "secret prompt", "responses": ["classified"]}) + "\n")
        sv.add_member(s, p, ann)
        sv.add_member(s, q, other)
        ids = {"p": p.id, "q": q.id, "admin": admin.id}
    app = create_app(sqlite_db)
    return app, ids


def login(app, user, pw) -> tuple[TestClient, str]:
    c = TestClient(app, follow_redirects=False)
    page = c.get("/login")
    tok = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post("/login", data={"username": user, "password": pw, "csrf_token": tok, "next": "/"})
    assert r.status_code == 303 and r.headers["location"] == "/", r.text
    csrf = c.get("/api/me").json()["csrf_token"]
    return c, csrf


def test_login_logout_and_wrong_password(env):
    app, _ = env
    c = TestClient(app, follow_redirects=False)
    assert c.get("/").status_code == 303 and c.get("/").headers["location"].startswith("/login")
    tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"username": "ann", "password": "nope-nope", "csrf_token": tok})
    assert r.status_code == 303 and "error=1" in r.headers["location"]
    assert c.cookies.get("tether_session") is None
    # login without the login-form token (login CSRF) is refused
    c2 = TestClient(app, follow_redirects=False)
    assert c2.post("/login", data={"username": "ann", "password": "annpass12"}).status_code == 403
    c, csrf = login(app, "ann", "annpass12")
    assert c.get("/").status_code == 200
    cookie = c.cookies.get("tether_session")
    assert c.post("/logout", data={"csrf_token": csrf}).status_code == 303
    # the old cookie no longer works (server-side session deleted)
    c3 = TestClient(app, follow_redirects=False, cookies={"tether_session": cookie})
    assert c3.get("/api/me").status_code == 401


def test_session_cookie_flags(env):
    app, _ = env
    c = TestClient(app, follow_redirects=False)
    r = c.post("/api/login", json={"username": "ann", "password": "annpass12"})
    sc = r.headers["set-cookie"].lower()
    assert "httponly" in sc and "samesite=lax" in sc
    https = TestClient(app, base_url="https://testserver", follow_redirects=False)
    assert "secure" in https.post("/api/login", json={"username": "ann", "password": "annpass12"}).headers["set-cookie"].lower()


def test_xss_payloads_render_escaped(env):
    app, ids = env
    c, _ = login(app, "ann", "annpass12")
    r = c.get(f"/p/{ids['p']}", headers=SAME_ORIGIN)
    assert r.status_code == 200
    html = r.text
    for payload in [XSS_PROMPT, *XSS[:2]]:
        assert payload not in html
    assert "&lt;script&gt;alert(&#34;prompt&#34;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    assert "<script>alert" not in html and "<img" not in html
    # Markdown guidelines: formatting kept, raw HTML escaped
    assert "<strong>fair</strong>" in html and "&lt;script&gt;alert('g')" in html
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"


def test_csrf_and_session_required_for_every_state_change(env):
    app, ids = env
    anon = TestClient(app, follow_redirects=False)
    pid = ids["p"]
    assert anon.post(f"/p/{pid}/submit", data={"task_id": 1, "choice": "A"}).status_code == 401
    assert anon.post(f"/api/projects/{pid}/judgments", json={"task_id": 1, "choice": "A"}).status_code == 401
    assert anon.post("/admin/users", data={"username": "x", "password": "password1"}).status_code == 401
    c, csrf = login(app, "ann", "annpass12")
    task_id = int(re.search(r'name="task_id" value="(\d+)"', c.get(f"/p/{pid}", headers=SAME_ORIGIN).text).group(1))
    # no token / wrong token
    assert c.post(f"/p/{pid}/submit", data={"task_id": task_id, "choice": "A"}).status_code == 403
    assert c.post(f"/p/{pid}/submit", data={"task_id": task_id, "choice": "A", "csrf_token": "x" * 43}).status_code == 403
    assert c.post(f"/api/projects/{pid}/judgments", json={"task_id": task_id, "choice": "A"}).status_code == 403
    assert c.post("/logout").status_code == 403
    # a cross-origin POST is refused even with a valid token
    r = c.post(f"/p/{pid}/submit", data={"task_id": task_id, "choice": "A", "csrf_token": csrf},
               headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    # JSON login refuses form encodings (a cross-site form cannot send application/json)
    assert anon.post("/api/login", data={"username": "ann", "password": "annpass12"}).status_code == 415
    with sv_read(app) as s:
        assert s.scalar(sv.select(sv.func.count(sv.Judgment.id))) == 0
    # with the token it works, and a double submit (back button) is acknowledged once
    for _ in range(2):
        r = c.post(f"/p/{pid}/submit", data={"task_id": task_id, "choice": "B", "csrf_token": csrf, "rationale": "x"})
        assert r.status_code == 303
    assert r.headers["location"].endswith("msg=dup")
    with sv_read(app) as s:
        assert s.scalar(sv.select(sv.func.count(sv.Judgment.id))) == 1


def sv_read(app):
    return app.state.db.read()


def test_annotator_cannot_reach_admin_or_other_projects(env):
    app, ids = env
    c, csrf = login(app, "ann", "annpass12")
    for path in ["/admin", f"/admin/p/{ids['p']}", f"/admin/p/{ids['p']}/export", f"/api/admin/projects/{ids['p']}/stats",
                 f"/api/admin/projects/{ids['p']}/export", f"/api/admin/projects/{ids['p']}/judgments", "/api/admin/projects"]:
        assert c.get(path).status_code == 403, path
    assert c.post("/admin/users", data={"username": "evil", "password": "password1", "role": "admin", "csrf_token": csrf}).status_code == 403
    assert c.post("/api/admin/users", json={"username": "evil", "password": "password1", "role": "admin"},
                  headers={"X-CSRF-Token": csrf}).status_code == 403
    assert c.post(f"/api/admin/projects/{ids['p']}/tasks", content=b'{"prompt":"p","responses":["a","b"]}',
                  headers={"X-CSRF-Token": csrf}).status_code == 403
    # another project's data: 404, as if it did not exist
    q = ids["q"]
    assert c.get(f"/p/{q}").status_code == 404
    assert "secret prompt" not in c.get(f"/p/{q}").text
    assert c.get(f"/api/projects/{q}/progress").status_code == 404
    assert c.post(f"/api/projects/{q}/next", headers={"X-CSRF-Token": csrf}).status_code == 404
    assert c.post(f"/api/projects/{q}/judgments", json={"task_id": 2, "rating": 5}, headers={"X-CSRF-Token": csrf}).status_code == 404
    assert [p["name"] for p in c.get("/api/projects").json()["projects"]] == ["mine"]


def test_admin_flow_and_json_api(env):
    app, ids = env
    c, csrf = login(app, "root", "rootpass1")
    h = {"X-CSRF-Token": csrf}
    r = c.post("/api/admin/projects", json={"name": "api", "kind": "rank", "overlap": 2,
                                            "tasks": json.dumps({"prompt": "p", "responses": list("abcd")})}, headers=h)
    assert r.status_code == 201 and r.json()["imported"] == 1
    pid = r.json()["id"]
    bad = b'{"prompt": "p", "responses": ["a", "b"]}\n{"prompt": "q", "responses": list}\n'
    r = c.post(f"/api/admin/projects/{pid}/tasks", content=bad, headers=h)
    assert r.status_code == 422
    assert [e["line"] for e in r.json()["errors"]] == [1, 2]
    assert c.post("/api/admin/users", json={"username": "carol", "password": "carolpass", "projects": ["api"]}, headers=h).status_code == 201
    carol = TestClient(app, follow_redirects=False)
    ccsrf = carol.post("/api/login", json={"username": "carol", "password": "carolpass"}).json()["csrf_token"]
    t = carol.post(f"/api/projects/{pid}/next", headers={"X-CSRF-Token": ccsrf}).json()["task"]
    assert t["kind"] == "rank" and len(t["responses"]) == 4
    r = carol.post(f"/api/projects/{pid}/judgments", json={"task_id": t["id"], "ranking": [3, 1, 2, 0]}, headers={"X-CSRF-Token": ccsrf})
    assert r.status_code == 201 and not r.json()["duplicate"]
    r = carol.post(f"/api/projects/{pid}/judgments", json={"task_id": t["id"], "ranking": [0, 1, 2, 3]}, headers={"X-CSRF-Token": ccsrf})
    assert r.status_code == 200 and r.json()["duplicate"] and r.json()["value"] == {"ranking": [3, 1, 2, 0]}
    assert carol.get(f"/api/projects/{pid}/progress").json()["done"] == 1
    stats = c.get(f"/api/admin/projects/{pid}/stats").json()
    assert stats["counts"]["judgments"] == 1
    recs = c.get(f"/api/admin/projects/{pid}/export?policy=all").json()["records"]
    assert len(recs) == 6 and recs[0]["prompt"] == "p"
    body = c.get(f"/admin/p/{pid}/export?policy=all").text.splitlines()
    assert [json.loads(x) for x in body] == recs
    assert len(c.get(f"/api/admin/projects/{pid}/judgments").json()["judgments"]) == 1
    page = c.get(f"/admin/p/{pid}")
    assert page.status_code == 200 and "Krippendorff" in page.text and "carol" in page.text


def test_admin_html_forms(env):
    app, ids = env
    c, csrf = login(app, "root", "rootpass1")
    tasks = "\n".join(json.dumps({"prompt": f"p{i}", "responses": ["a"]}) for i in range(3))
    r = c.post("/admin/projects", data={"name": "rated", "kind": "rate", "overlap": "1", "guidelines": "x", "csrf_token": csrf},
               files={"tasks": ("t.jsonl", tasks.encode())})
    assert r.status_code == 303, r.text
    pid = int(r.headers["location"].split("/")[3].split("?")[0])
    r = c.post(f"/admin/p/{pid}/import", data={"csrf_token": csrf}, files={"tasks": ("t.jsonl", b'{"prompt": "x"}\n')})
    assert r.status_code == 422 and "missing field" in r.text and "Nothing was imported" in r.text, r.text[r.text.find("<main>"):]
    r = c.post("/admin/projects", data={"name": "broken", "kind": "compare", "csrf_token": csrf},
               files={"tasks": ("t.jsonl", b'{"prompt": "x", "responses": ["one"]}\n')})
    assert r.status_code == 422 and "at least 2 responses" in r.text
    assert "broken" not in c.get("/admin").text  # the project was not created either
    assert c.post("/admin/users", data={"username": "dave", "password": "davepass1", "csrf_token": csrf}).status_code == 303
    assert c.post(f"/admin/p/{pid}/members", data={"username": "dave", "csrf_token": csrf}).status_code == 303
    d, _ = login(app, "dave", "davepass1")
    assert "rated" in d.get("/").text and d.get(f"/p/{pid}").status_code == 200
