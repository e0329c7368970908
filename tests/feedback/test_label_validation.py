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


API_BAD = [  # raw JSON (T: the rate item, R: the rank item) and the field the message must name
    ('{"task_id": T, "rating": 1e400}', "rating"),
    ('{"task_id": T, "rating": true}', "rating"),
    ('{"task_id": T, "rating": " 4 "}', "rating"),
    ('{"task_id": T, "rating": "\\u0663"}', "rating"),
    ('{"task_id": T, "rating": 4.5}', "rating"),
    ('{"task_id": T, "rating": 4, "client_ms": 1e400}', "client_ms"),
    ('{"task_id": T, "rating": 4, "client_ms": "soon"}', "client_ms"),
    ('{"task_id": 9223372036854775808, "rating": 4}', "task_id"),
    ('{"task_id": 2147483648, "rating": 4}', "task_id"),
    ('{"task_id": T.5, "rating": 4}', "task_id"),
    ('{"task_id": true, "rating": 4}', "task_id"),
    ('{"rating": 4}', "task_id"),
    ('{"task_id": T, "rating": 4, "rationale": "a\\ud800b"}', "rationale"),
    ('{"task_id": T, "rating": 4, "rationale": "a\\u0000b"}', "rationale"),
    ('{"task_id": T, "rating": 4, "rationale": 7}', "rationale"),
    ('{"task_id": T, "rating": 4, "reason": "because I say so"}', "reason"),
    ('{"task_id": T, "rating": 4, "submission_id": "a\\u0000"}', "submission_id"),
    ('{"task_id": R, "ranking": "\\u0663,2,1,0"}', "ranking"),
    ('[1, 2]', "JSON object"),
]
FORM_BAD = [
    ({"rating": "1e400"}, "rating"),
    ({"rating": "inf"}, "rating"),
    ({"rating": " 4 "}, "rating"),
    ({"rating": "٣"}, "rating"),
    ({"rating": "4", "client_ms": "1e400"}, "client_ms"),
    ({"rating": "4", "client_ms": "inf"}, "client_ms"),
    ({"rating": "4", "task_id": "9223372036854775808"}, "task_id"),
    ({"rating": "4", "task_id": "T.5"}, "task_id"),
    ({"rating": "4", "rationale": "a\x00b"}, "rationale"),
    ({"rating": "4", "reason": "because I say so"}, "reason"),
    ({"ranking": "٣,2,1,0", "task_id": "R"}, "ranking"),
]


def test_bad_judgments_answer_4xx_naming_the_field(env):
    app, db, ids = env
    c, h = client(app)
    sub = lambda v: v.replace("T", str(ids["t"])).replace("R", str(ids["r"]))  # noqa: E731
    for body, field in API_BAD:
        pid = ids["rank"] if ": R," in body else ids["rate"]
        body = sub(body)
        r = c.post(f"/api/projects/{pid}/judgments", content=body.encode(), headers={**h, "Content-Type": "application/json"})
        refused(r, field)
    for data, field in FORM_BAD:
        data = {"task_id": str(ids["t"]), **{k: sub(v) if k == "task_id" else v for k, v in data.items()}}
        pid = ids["rank"] if data["task_id"] == str(ids["r"]) else ids["rate"]
        refused(c.post(f"/p/{pid}/submit", data=data, headers=h), field)
    refused(c.get("/api/projects/99999999999999999999/progress"), "no such project")
    assert count(db, Judgment.id) == 0
    # the strict schema still takes what the page and a JSON client send
    r = c.post(f"/api/projects/{ids['rate']}/judgments", json={"task_id": ids["t"], "rating": 4, "client_ms": 1200,
                                                              "reason": "more helpful", "rationale": "ok"}, headers=h)
    assert r.status_code == 201 and r.json()["value"] == {"rating": 4}, r.text
    r = c.post(f"/p/{ids['rank']}/submit", data={"task_id": str(ids["r"]), "ranking": "3,2,1,0", "client_ms": "900", "reason": ""},
               headers=h)
    assert r.status_code == 303 and r.headers["location"].endswith("msg=saved")
    with db.read() as s:
        assert [(j.value, j.client_ms, j.reason) for j in s.scalars(select(Judgment).order_by(Judgment.id))] == [
            ({"rating": 4}, 1200, "more helpful"), ({"ranking": [3, 2, 1, 0]}, 900, None)]


BAD_LINES = [  # one line of a task file and what its error must say
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"prompt": "p", "responses": ["a"], "n": ' + "9" * 5000 + "}", "too many digits"),
    ('{"prompt": "p\\u0000", "responses": ["a"]}', "'prompt' contains a NUL character"),
    ('{"prompt": "p", "responses": ["a\\ud800"]}', "'responses[0]' contains a lone surrogate"),
    ('{"prompt": "p", "responses": ["a"], "meta": {"x": NaN}}', "'meta.x' is not a finite number"),
    ('{"prompt": "p", "responses": ["a"], "score": 1e400}', "'score' is not a finite number"),
    ('{"prompt": "p", "responses": ["a"], "meta": ' + "[" * 40 + "]" * 40 + "}", "nested deeper than"),
]


def test_bad_import_lines_are_reported_by_line(env):
    app, db, ids = env
    c, h = client(app, "root", "rootpass1")
    text = "\n".join(['{"prompt": "fine", "responses": ["a"], "id": "ok"}', *(line for line, _ in BAD_LINES)]) + "\n"
    for send in ("api", "form"):
        if send == "api":
            r = c.post(f"/api/admin/projects/{ids['rate']}/tasks", content=text.encode(), headers=h)
            refused(r)
            errors = [(e["line"], e["reason"]) for e in r.json()["errors"]]
            assert [n for n, _ in errors] == list(range(2, len(BAD_LINES) + 2)), errors
            for (_n, reason), (_line, want) in zip(errors, BAD_LINES):
                assert want in reason, (reason, want)
        else:
            r = c.post(f"/admin/p/{ids['rate']}/import", files={"tasks": ("t.jsonl", text.encode())}, headers=h)
            refused(r, "Nothing was imported", "nested too deeply", "too many digits", "lone surrogate")
    # non-UTF-8 is refused by the API as by the form (it was stored as U+FFFD)
    latin1 = '{"prompt": "café", "responses": ["a"]}\n'.encode("latin-1")
    refused(c.post(f"/api/admin/projects/{ids['rate']}/tasks", content=latin1, headers=h), "UTF-8")
    refused(c.post(f"/admin/p/{ids['rate']}/import", files={"tasks": ("t.jsonl", latin1)}, headers=h), "UTF-8")
    assert count(db, Task.id) == 3  # the two rate items and the rank item of the fixture


def test_bad_projects_and_users_answer_4xx(env):
    app, db, ids = env
    c, h = client(app, "root", "rootpass1")
    ok = {"name": "new", "kind": "rate"}
    for body, field in [({**ok, "overlap": "abc"}, "overlap"), ({**ok, "overlap": 2.7}, "overlap"), ({**ok, "overlap": True}, "overlap"),
                        ({**ok, "overlap": " 2"}, "overlap"), ({**ok, "tasks": ['{"prompt": "p", "responses": ["a"]}']}, "tasks"),
                        ({**ok, "name": 5}, "name"), ({**ok, "name": "a\x00b"}, "name"), ({**ok, "guidelines": "g\x00"}, "guidelines"),
                        ({**ok, "kind": ["rate"]}, "kind")]:
        refused(c.post("/api/admin/projects", json=body, headers=h), field)
    for overlap in ("abc", "2.7", "٣", "99999999999999999999"):
        refused(c.post("/admin/projects", data={**ok, "overlap": overlap}, headers=h), "overlap")
    user = {"username": "carol", "password": "carolpass"}
    for body, words in [({**user, "projects": 5}, ["projects"]), ({**user, "projects": [{"id": 1}]}, ["project"]),
                        ({**user, "projects": [99999999999999999999]}, ["no project"]), ({**user, "projects": ["٣"]}, ["no project"]),
                        ({**user, "username": 5}, ["username"]), ({**user, "username": "\u0430dmin"}, ["username", "ASCII"]),
                        ({**user, "password": 12345678}, ["password"])]:
        refused(c.post("/api/admin/users", json=body, headers=h), *words)
    refused(c.post(f"/api/admin/projects/{ids['rate']}/members", json={"username": "a\x00"}, headers=h), "username")
    for data, words in [({"project_id": "abc"}, ["project_id"]), ({"project_id": "99999999999999999999"}, ["project_id"]),
                        ({"username": "\u0430nn"}, ["username", "ASCII"]), ({"username": "ｒｏｏｔ"}, ["exists"])]:
        refused(c.post("/admin/users", data={**user, **data}, headers=h), *words)
    assert count(db, Project.id) == 2 and count(db, User.id) == 2
    # the strict schema still takes what the forms and a JSON client send
    assert c.post("/admin/projects", data={**ok, "overlap": "3"}, headers=h).status_code == 303
    r = c.post("/api/admin/users", json={**user, "projects": ["new", ids["rate"], str(ids["rank"])]}, headers=h)
    assert r.status_code == 201, r.text


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


def test_label_page_reserves_only_on_post_or_same_origin_navigation(env):
    app, db, ids = env
    c, h = client(app)
    pid = ids["rate"]
    for nav in ({}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        r = c.get(f"/p/{pid}", headers=nav)
        assert r.status_code == 200 and f'action="/p/{pid}/next"' in r.text and 'name="task_id"' not in r.text
        secure(r)
    assert count(db, Assignment.id) == 0
    assert c.post(f"/p/{pid}/next").status_code == 403  # needs the CSRF token
    r = c.post(f"/p/{pid}/next", headers=h)
    assert r.status_code == 303 and r.headers["location"] == f"/p/{pid}"
    assert count(db, Assignment.id) == 1
    r = c.get(f"/p/{pid}")  # the reserved item is shown, nothing more is reserved
    assert f'name="task_id" value="{ids["t"]}"' in r.text and count(db, Assignment.id) == 1
    # a link on this site or the address bar (what the browser test does) still opens the next item directly
    r = c.get(f"/p/{ids['rank']}", headers={"Sec-Fetch-Site": "same-origin"})
    assert 'name="task_id"' in r.text and count(db, Assignment.id) == 2
    assert c.post(f"/api/projects/{pid}/judgments", json={"task_id": ids["t"], "rating": 3}, headers=h).status_code == 201
    r = c.get(f"/p/{pid}", headers={"Sec-Fetch-Site": "none"})
    assert 'name="task_id"' in r.text and count(db, Assignment.id) == 2  # the rate project's second item


def test_fastapi_validation_errors_are_one_line_messages(env):
    app, _db, ids = env
    c, h = client(app, "root", "rootpass1")
    refused(r := c.post("/admin/projects", data={"kind": "rate"}, headers=h), "name: Field required")
    assert "<html" in r.text  # a form gets the error page
    refused(r := c.get(f"/api/admin/projects/{ids['rate']}/export?include_gold=maybe"), "include_gold: ")
    assert list(r.json()) == ["error"]


def test_export_of_a_non_latin_project_name(env):
    app, _db, _ids = env
    c, h = client(app, "root", "rootpass1")
    pid = c.post("/api/admin/projects", json={"name": "日本語 test", "kind": "rate"}, headers=h).json()["id"]
    r = c.get(f"/admin/p/{pid}/export")
    assert r.status_code == 200 and 'filename="____test-majority.jsonl"' in r.headers["content-disposition"]


def test_a_login_with_a_nul_or_a_lone_surrogate_is_a_4xx(env):
    """On PostgreSQL the user lookup failed on the NUL (a 500); now refused before any lookup or hashing."""
    app, _db, _ids = env
    c = TestClient(app, follow_redirects=False, raise_server_exceptions=False)
    for body, problem in (({"username": "ann\x00", "password": "annpass12"}, "username contains a NUL"),
                          ({"username": "ann", "password": "x\ud800"}, "password contains a lone surrogate")):
        refused(c.post("/api/login", content=json.dumps(body), headers={"Content-Type": "application/json"}), problem)
    assert c.post("/api/login", json={"username": "ann", "password": "annpass12"}).status_code == 200
