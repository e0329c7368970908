"""Bad input answers 4xx with a one-line message naming the field (or the import's line), never a 500, on
SQLite and PostgreSQL; the JSON API and the HTML forms share one strict schema; every response, a 500
included, carries the security headers; opening the label page reserves an item only on a POST or a
same-origin navigation."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tether.feedback import service as sv
from tether.feedback.app import create_app
from tether.feedback.models import Assignment, Judgment, Project, Task, User


@pytest.fixture
def env(db, fast_hasher):
    with db.write() as s:
        sv.create_user(s, "root", "rootpass1", role="admin", hasher=fast_hasher)
        ann = sv.create_user(s, "ann", "annpass12", hasher=fast_hasher)
        rate, rank = sv.create_project(s, "rate", "rate"), sv.create_project(s, "rank", "rank")
        sv.import_tasks(s, rate, json.dumps({"prompt": "p", "responses": ["x", "y"], "id": "t"}) + "\n")
        sv.import_tasks(s, rank, json.dumps({"prompt": "p", "responses": list("abcd"), "id": "r"}) + "\n")
        sv.add_member(s, rate, ann)
        sv.add_member(s, rank, ann)
        tasks: dict = {}
        for t in s.scalars(select(Task).order_by(Task.id)):
            tasks.setdefault(t.project_id, t.id)  # the first item of each project (the one opened first)
        ids = {"rate": rate.id, "rank": rank.id, "t": tasks[rate.id], "r": tasks[rank.id]}
    return create_app(db), db, ids


def client(app, user="ann", pw="annpass12"):
    c = TestClient(app, follow_redirects=False, raise_server_exceptions=False)
    r = c.post("/api/login", json={"username": user, "password": pw})
    return c, {"X-CSRF-Token": r.json()["csrf_token"]}


def secure(r):
    assert "default-src 'none'" in r.headers.get("content-security-policy", ""), (r.status_code, r.headers)
    assert r.headers.get("x-content-type-options") == "nosniff" and r.headers.get("x-frame-options") == "DENY"


def refused(r, *words):
    assert r.status_code in (400, 404, 409, 413, 415, 422), (r.status_code, r.text[:300])
    secure(r)
    for w in words:
        assert w in r.text, (w, r.text[:500])


def count(db, col):
    with db.read() as s:
        return s.scalar(select(func.count(col)))


def test_every_response_has_the_security_headers_even_a_500(env, monkeypatch):
    app, _db, ids = env
    c, h = client(app)
    secure(c.post(f"/api/projects/{ids['rate']}/next", headers={**h, "Origin": "https://evil.example"}))

    def boom(*_a, **_k):
        raise RuntimeError("an unexpected bug")

    monkeypatch.setattr(sv, "progress", boom)
    r = c.get(f"/api/projects/{ids['rate']}/progress")
    assert r.status_code == 500 and r.json() == {"error": "internal server error"} and "unexpected bug" not in r.text
    secure(r)
    r = c.get("/")
    assert r.status_code == 500 and "unexpected bug" not in r.text
    secure(r)