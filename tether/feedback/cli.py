"""`tether label`: the annotation web app and its admin commands.

    tether label serve [--db URL] [--host 127.0.0.1] [--port 8000]
    tether label create-user NAME [--admin] [--password-stdin] [--project P ...]
    tether label create-project NAME --kind compare|rank|rate [--overlap 2] [--guidelines FILE.md] [--tasks FILE.jsonl]
    tether label import --project P FILE.jsonl
    tether label add-member --project P USER [USER ...]
    tether label remove-member --project P USER [USER ...]
    tether label deactivate-user USER | reset-password USER [--password-stdin] | end-sessions USER
    tether label audit [--user U] [--limit 200]
    tether label generate --model DIR --prompts FILE -k 4 --project P
    tether label generate --model http://127.0.0.1:8000/v1 --prompts FILE -k 4 --project P   (any OpenAI-compatible server)
    tether label export --project P --out prefs.jsonl [--raw raw.jsonl] [--policy majority|all] [--include-gold]
                        [--format pairs|kto] [--threshold 4]
    tether label stats --project P
    tether label projects | migrate

The database is `--db` (a SQLAlchemy URL, `postgresql://...`, or a SQLite file path), else the
TETHER_LABEL_DB environment variable, else ./tether_label.db. `serve` upgrades the schema and, if the
database has no admin yet, creates `admin` with the password in TETHER_LABEL_ADMIN_PASSWORD or a random
one printed once. This module imports no torch; only `generate` from a model folder loads the training side
(from a URL it needs only the `openai` client).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, help="database URL or SQLite file (default: $TETHER_LABEL_DB or ./tether_label.db)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tether label", description="Collect human feedback in a web app and export preference pairs.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="run the web app")
    _db_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; use 0.0.0.0 behind a TLS proxy)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--admin-user", default="admin", help="name of the first admin, created if the database has no admin")
    p.add_argument("--secure-cookies", action="store_true", help="mark cookies Secure (set this when served over https)")
    p.add_argument("--lease-minutes", type=float, default=30, help="how long an opened item stays reserved for its annotator")
    p.add_argument("--log-level", default="info")

    p = sub.add_parser("migrate", help="create or upgrade the database schema")
    _db_arg(p)

    p = sub.add_parser("create-user", help="add an annotator or admin (asks for the password)")
    _db_arg(p)
    p.add_argument("username")
    p.add_argument("--admin", action="store_true", help="give the admin role")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin instead of asking")
    p.add_argument("--project", action="append", default=[], help="add to this project (repeatable)")

    p = sub.add_parser("create-project", help="create a project, optionally importing tasks")
    _db_arg(p)
    p.add_argument("name")
    p.add_argument("--kind", required=True, choices=["compare", "rank", "rate"])
    p.add_argument("--overlap", type=int, default=2, help="distinct annotators per item (default 2)")
    p.add_argument("--guidelines", help="Markdown file shown to annotators")
    p.add_argument("--tasks", help="jsonl of tasks to import")

    p = sub.add_parser("import", help="import tasks from jsonl (all or nothing)")
    _db_arg(p)
    p.add_argument("--project", required=True)
    p.add_argument("file")

    p = sub.add_parser("ai-import", help="attach AI labels to a compare project's items (`tether ai label` output; all or nothing)")
    _db_arg(p)
    p.add_argument("--project", required=True)
    p.add_argument("file")

    p = sub.add_parser("ai-settings", help="show AI suggestions to annotators, and route confident items to the AI")
    _db_arg(p)
    p.add_argument("--project", required=True)
    p.add_argument("--show", choices=["on", "off"], help="show AI suggestions to annotators (off by default: anchoring)")
    p.add_argument("--threshold", help="auto-label items whose AI confidence is at least this (0.5-1); 'off' sends every item to people")

    p = sub.add_parser("add-member", help="let annotators work on a project")
    _db_arg(p)
    p.add_argument("--project", required=True)
    p.add_argument("usernames", nargs="+")

    p = sub.add_parser("remove-member", help="take annotators off a project (their judgments stay)")
    _db_arg(p)
    p.add_argument("--project", required=True)
    p.add_argument("usernames", nargs="+")

    for cmd, what in (("deactivate-user", "refuse a user's logins and end their sessions at once"),
                      ("reset-password", "set a new password (asks for it) and end the user's sessions"),
                      ("end-sessions", "log a user out everywhere")):
        p = sub.add_parser(cmd, help=what)
        _db_arg(p)
        p.add_argument("username")
        if cmd == "reset-password":
            p.add_argument("--password-stdin", action="store_true", help="read the password from stdin instead of asking")

    p = sub.add_parser("audit", help="print the audit log (logins, failed logins, lockouts, admin actions), newest first")
    _db_arg(p)
    p.add_argument("--user", help="only events by or about this user")
    p.add_argument("--limit", type=int, default=200)

    p = sub.add_parser("generate", help="sample K responses per prompt from a checkpoint and import them as tasks")
    _db_arg(p)
    p.add_argument("--model", required=True, help="a checkpoint directory, or the URL of an OpenAI-compatible server "
                   "(`tether serve`, vLLM, a hosted API), e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--prompts", required=True, help="jsonl with a 'prompt' field (and optional 'id'), or a .txt with one prompt per line")
    p.add_argument("-k", type=int, default=4, help="responses per prompt")
    p.add_argument("--project", help="import into this project (its kind decides how items are made)")
    p.add_argument("--out", help="also write the generated tasks to this jsonl")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--served-model", help="with a URL: the model name to ask for (default: the server's first model)")
    p.add_argument("--api-key", help="with a URL: its API key (default: OPENAI_API_KEY, else TETHER_API_KEY)")
    p.add_argument("--concurrency", type=int, default=4, help="with a URL: requests in flight at once")
    p.add_argument("--chat", action="store_true", help="with a URL: send each prompt as a user turn to /v1/chat/completions "
                   "(default: the text as it is to /v1/completions, as a model folder samples it)")

    p = sub.add_parser("export", help="write preference pairs for `tether rm` / `tether dpo` (or unpaired records for `tether kto`)")
    _db_arg(p)
    p.add_argument("--project", required=True)
    p.add_argument("--out", required=True, help="preference records (jsonl)")
    p.add_argument("--format", choices=["pairs", "kto"], default="pairs",
                   help="pairs: {prompt, chosen, rejected}; kto: a rate project's ratings as {prompt, completion, label} (no pairs formed)")
    p.add_argument("--threshold", type=float, help="--format kto: a rating (majority: the mean rating) >= this is desirable (default 4)")
    p.add_argument("--raw", help="also write every raw judgment to this jsonl")
    p.add_argument("--policy", choices=["majority", "all"], default="majority")
    p.add_argument("--include-gold", action="store_true", help="also export gold items")

    p = sub.add_parser("stats", help="print counts, agreement and per-annotator quality as JSON")
    _db_arg(p)
    p.add_argument("--project", required=True)

    p = sub.add_parser("projects", help="list projects")
    _db_arg(p)
    return ap


def _open(url: str | None):  # noqa: ANN202
    from tether.feedback.db import Database

    db = Database(url)
    db.migrate()
    return db


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    pw = getpass.getpass("password: ")
    if pw != getpass.getpass("again: "):
        raise SystemExit("passwords differ")
    return pw


def ensure_admin(db, username: str = "admin") -> str | None:  # noqa: ANN001
    """Create the first admin if there is none; returns the password when one was generated."""
    from sqlalchemy import select

    from tether.feedback import service as sv
    from tether.feedback.models import User
    from tether.feedback.security import new_password

    with db.write() as s:
        if s.scalar(select(User.id).where(User.role == "admin").limit(1)) is not None:
            return None
        given = os.environ.get("TETHER_LABEL_ADMIN_PASSWORD")
        pw = given or new_password()
        sv.create_user(s, username, pw, role="admin")
        return None if given else pw


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from tether.feedback import service as sv

    try:
        return _run(args, sv)
    except sv.ImportRejected as e:
        print("import rejected; nothing was imported:", file=sys.stderr)
        for n, r in e.errors:
            print(f"  line {n}: {r}", file=sys.stderr)
        return 1
    except sv.ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, sv) -> int:  # noqa: ANN001, C901
    if args.cmd == "serve":
        import uvicorn

        from tether.feedback.app import create_app

        db = _open(args.db)
        pw = ensure_admin(db, args.admin_user)
        if pw:
            print(f"created admin user {args.admin_user!r} with one-time password: {pw}\n"
                  "(shown only now; create more users at /admin or with `tether label create-user`)", flush=True)
        app = create_app(db, secure_cookies=args.secure_cookies, lease_minutes=args.lease_minutes)
        print(f"tether label: http://{args.host}:{args.port}/  (database {db.engine.url.render_as_string(hide_password=True)})", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
        return 0

    db = _open(args.db)
    if args.cmd == "migrate":
        print("schema is up to date")
        return 0
    if args.cmd == "create-user":
        pw = _read_password(args.password_stdin)
        with db.write() as s:
            u = sv.create_user(s, args.username, pw, role="admin" if args.admin else "annotator")
            sv.audit(s, "create_user", "cli", u.username, detail=u.role)
            for ref in args.project:
                sv.add_member(s, sv.get_project(s, ref), u)
        print(f"created {'admin' if args.admin else 'annotator'} {args.username!r}")
        return 0
    if args.cmd == "create-project":
        guidelines = Path(args.guidelines).read_text(encoding="utf-8") if args.guidelines else ""
        with db.write() as s:
            p = sv.create_project(s, args.name, args.kind, guidelines, args.overlap)
            n = sv.import_tasks(s, p, Path(args.tasks).read_text(encoding="utf-8")) if args.tasks else 0
        print(f"created project {args.name!r} ({args.kind}, overlap {args.overlap}); imported {n} items")
        return 0
    if args.cmd == "import":
        n = sv.import_file(db, args.project, Path(args.file).read_text(encoding="utf-8"))
        print(f"imported {n} items into {args.project!r}")
        return 0
    if args.cmd == "ai-import":
        with db.write() as s:
            n = sv.import_ai_labels(s, sv.get_project(s, args.project), Path(args.file).read_text(encoding="utf-8"))
        print(f"imported {n} AI labels into {args.project!r}")
        return 0
    if args.cmd == "ai-settings":
        th: object = "keep"
        if args.threshold is not None:
            try:
                th = None if args.threshold == "off" else float(args.threshold)
            except ValueError:
                raise sv.Invalid(f"--threshold must be a number in [0.5, 1] or off, got {args.threshold!r}") from None
        with db.write() as s:
            p = sv.get_project(s, args.project)
            got = sv.set_ai_settings(s, p, None if args.show is None else args.show == "on", th)
            sv.audit(s, "ai_settings", "cli", p.name, detail=json.dumps(got))
        print(f"{args.project}: show AI suggestions {'on' if got['show_ai'] else 'off'}; routing "
              + (f"items with AI confidence >= {got['ai_threshold']} to the AI" if got["ai_threshold"] is not None else "off"))
        return 0
    if args.cmd in ("add-member", "remove-member"):
        add = args.cmd == "add-member"
        with db.write() as s:
            p = sv.get_project(s, args.project)
            for name in args.usernames:
                (sv.add_member if add else sv.remove_member)(s, p, sv.get_user(s, name))
                sv.audit(s, args.cmd.replace("-", "_"), "cli", name, detail=f"project {p.name}")
        print(f"{'added' if add else 'removed'} {', '.join(args.usernames)} {'to' if add else 'from'} {args.project!r}")
        return 0
    if args.cmd in ("deactivate-user", "reset-password", "end-sessions"):
        from tether.feedback.security import end_sessions

        pw = _read_password(args.password_stdin) if args.cmd == "reset-password" else None
        with db.write() as s:
            u, detail = sv.get_user(s, args.username), None
            if args.cmd == "deactivate-user":
                sv.deactivate_user(s, u, actor="")
            elif pw is not None:
                sv.reset_password(s, u, pw)
            else:
                detail = f"{end_sessions(s, u)} sessions"
            sv.audit(s, args.cmd.replace("-", "_"), "cli", u.username, detail=detail)
        print(f"{args.cmd}: done for {args.username!r}" + (f" ({detail} ended)" if detail else ""))
        return 0
    if args.cmd == "audit":
        with db.read() as s:
            for e in sv.audit_events(s, args.limit, args.user):
                print("\t".join(str(e[k] or "") for k in ("at", "action", "actor", "target", "address", "detail")))
        return 0
    if args.cmd == "generate":
        return _generate(args, db, sv)
    if args.cmd == "export":
        if args.threshold is not None and args.format != "kto":
            raise sv.Invalid("--threshold applies to --format kto")
        with db.read() as s:
            p = sv.get_project(s, args.project)
            if args.format == "kto":
                recs = sv.export_kto(s, p, 4 if args.threshold is None else args.threshold, args.policy, args.include_gold)
            else:
                recs = sv.export_preferences(s, p, args.policy, args.include_gold)
            raw = sv.export_raw(s, p) if args.raw else None
        sv.write_jsonl(recs, args.out)
        n_good = sum(bool(r.get("label")) for r in recs)
        msg = f"wrote {len(recs)} KTO records ({n_good} desirable) to {args.out}" if args.format == "kto" else f"wrote {len(recs)} preference records to {args.out}"
        if raw is not None:
            sv.write_jsonl(raw, args.raw)
            msg += f" and {len(raw)} raw judgments to {args.raw}"
        print(msg)
        return 0
    if args.cmd == "stats":
        with db.read() as s:
            print(json.dumps(sv.project_stats(s, sv.get_project(s, args.project)), indent=2))
        return 0
    if args.cmd == "projects":
        from sqlalchemy import select

        from tether.feedback.models import Project

        with db.read() as s:
            for p in s.scalars(select(Project).order_by(Project.id)):
                print(f"{p.id}\t{p.name}\t{p.kind}\toverlap={p.overlap}")
        return 0
    raise AssertionError(args.cmd)


def read_prompts(path: str) -> list[tuple[str | None, str]]:
    """(id, prompt) pairs from a jsonl with a 'prompt' field or a text file with one prompt per line."""
    out = []
    text = Path(path).read_text(encoding="utf-8")
    jsonl = path.endswith((".jsonl", ".json"))
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                obj = json.loads(line)
                prompt = obj["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SystemExit(f"{path}: line {n}: expected a JSON object with a 'prompt' string") from None
            if not isinstance(prompt, str):
                raise SystemExit(f"{path}: line {n}: 'prompt' must be a string")
            out.append((str(obj["id"]) if obj.get("id") is not None else None, prompt))
        else:
            out.append((None, line))
    return out


def _from_endpoint(args: argparse.Namespace, prompts: list[str], kw: dict) -> tuple[str, list[list[str]]]:
    try:
        import openai

        from tether.ai.http import sample_endpoint
    except ImportError:
        raise SystemExit("tether label generate: a URL needs the openai client: pip install openai") from None
    try:
        return sample_endpoint(args.model, prompts, model_name=args.served_model, api_key=args.api_key, concurrency=args.concurrency,
                               chat=args.chat, **kw)
    except openai.APIConnectionError as e:
        raise SystemExit(f"tether label generate: cannot reach {args.model} ({e}); is the server running?") from None
    except openai.APIStatusError as e:
        raise SystemExit(f"tether label generate: {args.model} answered HTTP {e.status_code}: {str(e)[:300]}") from None


def _generate(args: argparse.Namespace, db, sv) -> int:  # noqa: ANN001
    if not args.project and not args.out:
        raise SystemExit("give --project (import) and/or --out (write jsonl)")
    prompts = read_prompts(args.prompts)
    kw = dict(k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.model.startswith(("http://", "https://")):
        model_name, responses = _from_endpoint(args, [p for _i, p in prompts], kw)
    else:
        from tether.generate import sample_responses  # the training side, loaded only here

        responses = sample_responses(args.model, [p for _i, p in prompts], **kw)
        model_name = Path(args.model).name
    if len(responses) != len(prompts):
        raise SystemExit(f"generator returned {len(responses)} results for {len(prompts)} prompts")
    lines = []
    for (pid, prompt), resp in zip(prompts, responses, strict=True):
        obj = {"prompt": prompt, "responses": list(resp), "meta": {"model": model_name, "k": args.k, "seed": args.seed,
                                                                  "temperature": args.temperature, "top_p": args.top_p}}
        if pid is not None:
            obj["id"] = pid
        lines.append(json.dumps(obj, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {len(lines)} tasks to {args.out}")
    if args.project:
        n = sv.import_file(db, args.project, text)
        print(f"imported {n} items from {len(lines)} prompts into {args.project!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
