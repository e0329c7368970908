"""`tether label` commands, the no-torch rule, and the chain generate -> label -> export -> `tether rm`."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from conftest import REPO
from tether.feedback import service as sv
from tether.feedback.cli import main
from tether.feedback.db import Database


def test_feedback_never_imports_torch():
    code = (
        "import sys\n"
        "import tether.feedback, tether.feedback.app, tether.feedback.cli, tether.feedback.service\n"
        "import tether.feedback.db, tether.feedback.agreement, tether.feedback.security\n"
        "from tether.cli import main\n"
        "import tempfile, os\n"
        "d = tempfile.mkdtemp()\n"
        "assert main(['label', 'create-project', 'p', '--kind', 'rate', '--db', os.path.join(d, 'x.db')]) == 0\n"
        "assert main(['label', 'export', '--project', 'p', '--out', os.path.join(d, 'o.jsonl'), '--db', os.path.join(d, 'x.db')]) == 0\n"
        "from tether.feedback.app import create_app\n"
        "create_app(os.path.join(d, 'x.db'))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy', 'tokenizers'))\n"
        "print('HEAVY', bad)\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "HEAVY []" in r.stdout


def test_cli_project_users_import_export(tmp_path, monkeypatch, capsys):
    dbf = str(tmp_path / "l.db")
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"p{i}", "responses": ["good", "bad"], "id": f"t{i}"}) + "\n" for i in range(3)))
    guide = tmp_path / "g.md"
    guide.write_text("# Judge kindly")
    assert main(["create-project", "cmp", "--kind", "compare", "--overlap", "2", "--guidelines", str(guide), "--tasks", str(tasks), "--db", dbf]) == 0
    for name in ("ann1", "ann2"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(f"{name}-password\n"))
        assert main(["create-user", name, "--password-stdin", "--project", "cmp", "--db", dbf]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["create-user", "x", "--password-stdin", "--db", dbf]) == 1  # too short
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "responses": ["a", "b"]}\n{"prompt": 3, "responses": ["a", "b"]}\n')
    capsys.readouterr()
    assert main(["import", "--project", "cmp", str(bad), "--db", dbf]) == 1
    assert "line 2: 'prompt' must be a non-empty string" in capsys.readouterr().err
    db = Database(dbf)
    for name in ("ann1", "ann2"):
        with db.read() as s:
            uid, pid = sv.get_user(s, name).id, sv.get_project(s, "cmp").id
        while True:
            with db.write() as s:
                t = sv.next_task(s, s.get(sv.Project, pid), s.get(sv.User, uid))
                if t is None:
                    break
                tid = t.id
            sv.submit(db, pid, uid, tid, {"choice": "A" if name == "ann1" or t.external_id != "t2" else "B"})
    out, raw = tmp_path / "prefs.jsonl", tmp_path / "raw.jsonl"
    assert main(["export", "--project", "cmp", "--out", str(out), "--raw", str(raw), "--db", dbf]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 2 and all(r["chosen"] == "good" for r in recs)  # t2 split 1-1 -> no record
    assert main(["export", "--project", "cmp", "--out", str(out), "--policy", "all", "--db", dbf]) == 0
    assert len(out.read_text().splitlines()) == 6
    assert len(raw.read_text().splitlines()) == 6
    capsys.readouterr()
    assert main(["stats", "--project", "cmp", "--db", dbf]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["counts"]["judgments"] == 6 and stats["agreement"]["cohen_pairs"][0]["n"] == 3
    assert main(["projects", "--db", dbf]) == 0
    assert main(["export", "--project", "nope", "--out", str(out), "--db", dbf]) == 1


def test_serve_prints_one_time_admin_password(tmp_path):
    """`serve` on an empty database creates `admin` and prints its password once."""
    import os
    import time

    import httpx

    from conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TETHER_LABEL_ADMIN_PASSWORD"}
    proc = subprocess.Popen([sys.executable, "-m", "tether.feedback.cli", "serve", "--db", str(tmp_path / "s.db"), "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "one-time password:" in line
        pw = line.split("one-time password:")[1].strip()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/api/login", json={"username": "admin", "password": pw})
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_generate_label_export_train_rm(tmp_path, tiny_gpt2, capsys):
    """The closing loop: sample K responses from a checkpoint into a ranking project, label, export,
    and train a reward model on the export with `tether rm`, no conversion in between."""
    pytest.importorskip("tether.generate")
    from tether.generate import sample_responses  # noqa: F401  (the fixed interface)

    dbf = str(tmp_path / "l.db")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the movie was {w}", "id": f"q{i}"}) + "\n" for i, w in enumerate(["good", "bad", "fun"])))
    assert main(["create-project", "gen", "--kind", "rank", "--overlap", "2", "--db", dbf]) == 0
    assert main(["generate", "--model", str(tiny_gpt2), "--prompts", str(prompts), "-k", "4", "--project", "gen",
                 "--max-new-tokens", "6", "--out", str(tmp_path / "gen.jsonl"), "--db", dbf]) == 0
    db = Database(dbf)
    with db.write() as s:
        p = sv.get_project(s, "gen")
        users = [sv.create_user(s, f"a{i}", "password1").id for i in range(2)]
        pid = p.id
        assert s.scalar(sv.select(sv.func.count(sv.Task.id))) == 3
    for uid in users:
        while True:
            with db.write() as s:
                t = sv.next_task(s, s.get(sv.Project, pid), s.get(sv.User, uid))
                if t is None:
                    break
                tid, n = t.id, len(t.responses)
            assert n == 4
            sv.submit(db, pid, uid, tid, {"ranking": [0, 1, 2, 3] if uid == users[0] else [0, 2, 1, 3]})
    prefs = tmp_path / "prefs.jsonl"
    assert main(["export", "--project", "gen", "--out", str(prefs), "--db", dbf]) == 0
    recs = [json.loads(x) for x in prefs.read_text().splitlines()]
    assert len(recs) == 3 * 5  # 6 pairs per prompt, the (1, 2) pair split 1-1
    from tether.cli import main as tether_main

    out = tmp_path / "rm"
    assert tether_main(["rm", f"model={tiny_gpt2}", f"data.train={prefs}", f"out={out}", "max_steps=2", "batch_size=4"]) == 0
    assert (out / "final").is_dir()


def test_export_kto_from_ratings(sqlite_db, fast_hasher, tmp_path, capsys):
    """A rate project's 1-5 ratings become unpaired KTO records above / below a threshold, without pairs,
    and `tether kto`'s reader takes them."""
    from test_label_storage import jl, take

    from tether.data import load_kto

    with sqlite_db.write() as s:
        rate = sv.create_project(s, "stars", "rate", overlap=2)
        sv.create_project(s, "cmp", "compare")
        us = [sv.create_user(s, f"u{i}", "password1", hasher=fast_hasher) for i in range(2)]
        sv.import_tasks(s, rate, jl({"prompt": "tp", "responses": ["good", "ok", "bad"], "id": "g1"}))
        sv.import_tasks(s, rate, jl({"prompt": "tq", "responses": ["fine"], "id": "g2"}))
        rate_id, users = rate.id, [u.id for u in us]
    ratings = {users[0]: {"good": 5, "ok": 3, "bad": 1, "fine": 4}, users[1]: {"good": 4, "ok": 4, "bad": 2, "fine": 2}}
    for u in users:
        while (tid := take(sqlite_db, rate_id, u)) is not None:
            with sqlite_db.read() as s:
                resp = s.get(sv.Task, tid).responses[0]
            sv.submit(sqlite_db, rate_id, u, tid, {"rating": ratings[u][resp]})
    dbf, out = str(tmp_path / "label.db"), tmp_path / "kto.jsonl"
    capsys.readouterr()
    assert main(["export", "--project", "stars", "--format", "kto", "--threshold", "4", "--out", str(out), "--db", dbf]) == 0
    assert "wrote 4 KTO records (1 desirable)" in capsys.readouterr().out
    recs = {r["completion"]: r for r in map(json.loads, out.read_text().splitlines())}
    # means: good 4.5, ok 3.5, bad 1.5, fine 3.0; only good reaches 4
    assert {k: r["label"] for k, r in recs.items()} == {"good": True, "ok": False, "bad": False, "fine": False}
    assert recs["good"]["prompt"] == "tp" and recs["good"]["meta"]["mean_rating"] == 4.5 and recs["good"]["meta"]["n_ratings"] == 2
    examples, _ = load_kto(str(out))
    assert sorted((e.completion, e.label) for e in examples) == [("bad", False), ("fine", False), ("good", True), ("ok", False)]
    # every rating its own record; the default threshold is 4
    assert main(["export", "--project", "stars", "--format", "kto", "--policy", "all", "--out", str(out), "--db", dbf]) == 0
    votes = sorted((r["completion"], r["meta"]["annotator"], r["label"]) for r in map(json.loads, out.read_text().splitlines()))
    assert votes == [("bad", "u0", False), ("bad", "u1", False), ("fine", "u0", True), ("fine", "u1", False),
                     ("good", "u0", True), ("good", "u1", True), ("ok", "u0", False), ("ok", "u1", True)]
    capsys.readouterr()
    assert main(["export", "--project", "cmp", "--format", "kto", "--out", str(out), "--db", dbf]) == 1
    assert "error: the kto format needs a rate project (1-5 ratings); 'cmp' is a compare project" in capsys.readouterr().err
    assert main(["export", "--project", "stars", "--threshold", "3", "--out", str(out), "--db", dbf]) == 1
    assert "error: --threshold applies to --format kto" in capsys.readouterr().err
