"""Everything the web app and the CLI do to the database: users, projects, imports, assignment of
items to annotators, judgments, progress, quality statistics and export.

Assignment rules (they hold under concurrency on SQLite and PostgreSQL):
- an annotator gets an item only if they have neither judged nor reserved it (unique constraints on
  (task, user) for judgments and reservations make this hold even against races);
- a non-gold item goes to at most `project.overlap` distinct annotators: `tasks.n_claims` counts its
  judgments plus live reservations and is only ever raised by a conditional
  `UPDATE ... SET n_claims = n_claims + 1 WHERE n_claims < overlap`, which the database serialises;
- gold items go to every annotator once (they measure the annotator, not the item);
- a reservation expires after `lease` and its slot is given back; a judgment that arrives after its
  reservation expired is still accepted if a slot is free.
Each submission is one transaction; a second submission for the same (task, user) returns the stored
judgment unchanged (`duplicate=True`), so back-button resubmits and client retries never count twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import combinations
from typing import Any

from sqlalchemy import and_, case, delete, exists, false, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tether.feedback import agreement
from tether.feedback.models import KINDS, ROLES, AILabel, Assignment, AuditEvent, Judgment, Membership, Project, Task, User, utcnow
from tether.feedback.security import end_sessions, hash_password

RANK_MIN, RANK_MAX = 4, 7
MAX_TEXT = 200_000
MAX_RATIONALE = 10_000
REASONS = ("more helpful", "more accurate", "safer", "better written", "follows instructions", "other")
COMPARE_CHOICES = ("A", "B", "tie", "skip")
RANK_GOLD_THRESHOLD = 0.75  # a gold ranking counts as correct if at least this share of pairs agree
RATE_GOLD_TOLERANCE = 1  # a gold rating counts as correct within +-1
DEFAULT_LEASE = timedelta(minutes=30)
INT_MAX = 2**31 - 1  # ids and counts are 32-bit INTEGER columns (PostgreSQL)


class ServiceError(Exception):
    status = 400


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Invalid(ServiceError):
    status = 422


class ImportRejected(ServiceError):
    """A task file with errors; nothing of it was imported. `errors` is [(line number, reason)]."""

    status = 422

    def __init__(self, errors: list[tuple[int, str]]):
        self.errors = errors
        shown = "; ".join(f"line {n}: {r}" for n, r in errors[:10])
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        super().__init__(f"import rejected, nothing imported: {shown}{more}")


# ---------------------------------------------------------------- input values (one strict schema for the JSON API,
# the HTML forms and the CLI)


def as_int(field: str, v: Any, lo: int = 0, hi: int = INT_MAX) -> int:
    """A JSON integer (not true/false, not 2.0) or, from a form, a string of ASCII digits; within [lo, hi]."""
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 10:
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise Invalid(f"{field} must be an integer from {lo} to {hi}")
    return v


def _bad_text(v: str) -> str | None:
    """Why a database cannot store this string (PostgreSQL refuses NUL; no driver encodes a lone surrogate)."""
    if "\x00" in v:
        return "contains a NUL character"
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode)"
    return None


def as_text(field: str, v: Any, max_len: int = MAX_TEXT, optional: bool = False) -> str | None:
    """A string of at most max_len characters that the database can store (optional: None or "" give None)."""
    if optional and (v is None or v == ""):
        return None
    if not isinstance(v, str):
        raise Invalid(f"{field} must be a string")
    if len(v) > max_len:
        raise Invalid(f"{field}: at most {max_len} characters")
    if bad := _bad_text(v):
        raise Invalid(f"{field} {bad}")
    return v


# ---------------------------------------------------------------- users and projects


def create_user(s: Session, username: str, password: str, role: str = "annotator", hasher=None) -> User:  # noqa: ANN001
    """Usernames are NFKC-normalised (fullwidth "ａｄｍｉｎ" is "admin") and then must be ASCII letters, digits
    and . _ - @, so no look-alike letter of another script ("\u0430dmin", Cyrillic a) can pass for a user."""
    username = unicodedata.normalize("NFKC", as_text("username", username, 256)).strip()
    if not username or len(username) > 64 or not all(c.isascii() and (c.isalnum() or c in "._-@") for c in username):
        raise Invalid("username: 1-64 characters, ASCII letters, digits and . _ - @")
    as_text("password", password, 4096)
    if role not in ROLES:
        raise Invalid(f"role must be one of {ROLES}")
    if s.scalar(select(User.id).where(User.username == username)) is not None:
        raise Conflict(f"user {username!r} exists")
    try:
        h = hash_password(password, hasher)
    except ValueError as e:
        raise Invalid(str(e)) from None
    user = User(username=username, password_hash=h, role=role)
    s.add(user)
    s.flush()
    return user


def get_user(s: Session, username: str) -> User:
    u = s.scalar(select(User).where(User.username == as_text("username", username, 256)))
    if u is None:
        raise NotFound(f"no user {username!r}")
    return u


def create_project(s: Session, name: str, kind: str, guidelines: str = "", overlap: int = 2) -> Project:
    name = as_text("name", name, 1024).strip()
    if not name or len(name) > 128:
        raise Invalid("project name: 1-128 characters")
    if kind not in KINDS:
        raise Invalid(f"kind must be one of {KINDS}")
    overlap, guidelines = as_int("overlap", overlap, 1, 50), as_text("guidelines", guidelines or "")
    if s.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise Conflict(f"project {name!r} exists")
    p = Project(name=name, kind=kind, guidelines=guidelines, overlap=overlap)
    s.add(p)
    s.flush()
    return p


def get_project(s: Session, ref: str | int) -> Project:
    """A project by id (an integer or a string of ASCII digits) or by name."""
    if isinstance(ref, bool) or not isinstance(ref, (int, str)) or (isinstance(ref, str) and _bad_text(ref)):
        raise Invalid("a project is given by its id or its name")
    pid = ref if isinstance(ref, int) else int(ref) if ref.isascii() and ref.isdigit() and len(ref) <= 10 else 0
    p = s.get(Project, pid) if 0 < pid <= INT_MAX else None
    if p is None and isinstance(ref, str):
        p = s.scalar(select(Project).where(Project.name == ref))
    if p is None:
        raise NotFound(f"no project {ref!r}")
    return p


def add_member(s: Session, project: Project, user: User) -> None:
    if s.get(Membership, (project.id, user.id)) is None:
        s.add(Membership(project_id=project.id, user_id=user.id))
        s.flush()


def remove_member(s: Session, project: Project, user: User) -> None:
    m = s.get(Membership, (project.id, user.id))
    if m is None:
        raise NotFound(f"{user.username!r} is not a member of {project.name!r}")
    s.delete(m)
    s.flush()


def deactivate_user(s: Session, user: User, actor: str) -> None:
    """Refuse the user's logins and end their sessions (their judgments stay)."""
    if user.username == actor:
        raise Invalid("you cannot deactivate yourself")
    user.active = False
    end_sessions(s, user)


def reset_password(s: Session, user: User, password: str) -> None:
    """Set a new password and end the user's sessions."""
    try:
        user.password_hash = hash_password(password)
    except ValueError as e:
        raise Invalid(str(e)) from None
    end_sessions(s, user)


def audit(s: Session, action: str, actor: str | None = None, target: str | None = None, address: str | None = None,
          detail: str | None = None) -> None:
    s.add(AuditEvent(action=action, actor=actor and actor[:64], target=target and target[:160], address=address and address[:64],
                     detail=detail))


def audit_events(s: Session, limit: int = 200, user: str | None = None) -> list[dict]:
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if user:
        q = q.where(or_(AuditEvent.actor == user, AuditEvent.target == user))
    return [{"at": e.at.isoformat(timespec="seconds") + "Z", "action": e.action, "actor": e.actor, "target": e.target,
             "address": e.address, "detail": e.detail} for e in s.scalars(q)]


def can_access(s: Session, project: Project, user: User) -> bool:
    return user.is_admin or s.get(Membership, (project.id, user.id)) is not None


def projects_for(s: Session, user: User) -> list[Project]:
    q = select(Project).order_by(Project.id)
    if not user.is_admin:
        q = q.join(Membership, Membership.project_id == Project.id).where(Membership.user_id == user.id)
    return list(s.scalars(q))


# ---------------------------------------------------------------- import


@dataclass
class ParsedTask:
    external_id: str
    group_key: str
    prompt: str
    responses: list[str]
    response_ids: list[int]
    gold: Any = None
    meta: dict = field(default_factory=dict)


def _check_ranking(r: Any, n: int) -> list[int]:
    if not isinstance(r, list) or sorted(x if isinstance(x, int) and not isinstance(x, bool) else -1 for x in r) != list(range(n)):
        raise ValueError(f"a ranking must list each response index 0..{n - 1} once, best first")
    return r


def parse_task_lines(kind: str, text: str) -> tuple[list[ParsedTask], list[tuple[int, str]]]:
    """Validate a jsonl task file; returns (tasks, errors). See docs/labeling.md for the format."""
    tasks: list[ParsedTask] = []
    errors: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append((lineno, f"invalid JSON: {e.msg} at column {e.colno}"))
            continue
        except (ValueError, RecursionError) as e:  # the parser's own limits: > 4,300 digits, ~1,000 levels
            deep = isinstance(e, RecursionError)
            errors.append((lineno, "invalid JSON: " + ("nested too deeply" if deep else "a number with too many digits")))
            continue
        try:
            parsed = _parse_obj(kind, obj, lineno)
        except ValueError as e:
            errors.append((lineno, str(e)))
            continue
        gk = parsed[0].group_key
        if gk in first_line:
            errors.append((lineno, f"duplicate id {gk!r} (also on line {first_line[gk]})"))
            continue
        first_line[gk] = lineno
        tasks.extend(parsed)
    if not tasks and not errors:
        errors.append((0, "no tasks in file"))
    return tasks, errors


def _parse_obj(kind: str, obj: Any, lineno: int) -> list[ParsedTask]:
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    _check_storable(obj)
    prompt = obj.get("prompt")
    if "prompt" not in obj:
        raise ValueError("missing field 'prompt'")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string")
    if "responses" not in obj:
        raise ValueError("missing field 'responses'")
    responses = obj["responses"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError("'responses' must be a list of strings")
    if any(len(x) > MAX_TEXT for x in [prompt, *responses]):
        raise ValueError(f"a text is longer than {MAX_TEXT} characters")
    n = len(responses)
    if kind == "compare" and n < 2:
        raise ValueError(f"a comparison needs at least 2 responses, got {n}")
    if kind == "rank" and not RANK_MIN <= n <= RANK_MAX:
        raise ValueError(f"a ranking needs {RANK_MIN} to {RANK_MAX} responses, got {n}")
    if kind == "rate" and n < 1:
        raise ValueError("a rating needs at least 1 response")
    ext = obj.get("id")
    if ext is None:
        ext = "h" + hashlib.sha256(json.dumps([prompt, responses]).encode()).hexdigest()[:16]
    elif isinstance(ext, int) and not isinstance(ext, bool):
        ext = str(ext)
    if not isinstance(ext, str) or not ext or len(ext) > 200 or "#" in ext:
        raise ValueError("'id' must be a non-empty string (at most 200 characters, no '#')")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError("'meta' must be an object")
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "responses", "id", "gold", "meta")}
    meta = {**extra, **meta}
    gold = obj.get("gold")
    if gold is not None:
        gold = _parse_gold(kind, gold, n)
    out: list[ParsedTask] = []
    if kind == "compare":
        pairs = [(0, 1)] if n == 2 else list(combinations(range(n), 2))
        for i, j in pairs:
            g = None
            if gold is not None:  # gold is a full ranking here
                g = "A" if gold.index(i) < gold.index(j) else "B"
            eid = ext if n == 2 else f"{ext}#{i}-{j}"
            out.append(ParsedTask(eid, ext, prompt, [responses[i], responses[j]], [i, j], g, meta))
    elif kind == "rank":
        out.append(ParsedTask(ext, ext, prompt, list(responses), list(range(n)), gold, meta))
    else:
        for i in range(n):
            g = None if gold is None else gold[i]
            eid = ext if n == 1 else f"{ext}#{i}"
            out.append(ParsedTask(eid, ext, prompt, [responses[i]], [i], g, meta))
    return out


def _check_storable(obj: dict, max_depth: int = 32) -> None:
    """Refuse what a database cannot store or a reader cannot parse back: NUL characters, lone
    surrogates, NaN and infinite numbers, nesting deeper than max_depth."""
    stack: list[tuple[str, Any, int]] = [(k, v, 1) for k, v in obj.items()]
    while stack:
        path, v, depth = stack.pop()
        if (bad := _bad_text(path)) or (isinstance(v, str) and (bad := _bad_text(v))):
            raise ValueError(f"{path[:80]!r} {bad}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{path[:80]!r} is not a finite number")
        if isinstance(v, (dict, list)) and depth >= max_depth:
            raise ValueError(f"{path[:80]!r} is nested deeper than {max_depth} levels")
        if isinstance(v, dict):
            stack.extend((f"{path}.{k}", x, depth + 1) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x, depth + 1) for i, x in enumerate(v))


def _parse_gold(kind: str, gold: Any, n: int) -> Any:
    if kind == "compare":
        if gold in ("A", "B") and n == 2:
            return [0, 1] if gold == "A" else [1, 0]
        try:
            return _check_ranking(gold, n)
        except ValueError:
            raise ValueError("'gold' for a comparison is \"A\" or \"B\" (2 responses) or a ranking of all response indices, best first") from None
    if kind == "rank":
        return _check_ranking(gold, n)
    golds = gold if isinstance(gold, list) else [gold]
    if len(golds) != n or not all(isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= 5 for g in golds):
        raise ValueError("'gold' for a rating is an integer 1-5 (one response) or a list of one per response")
    return golds


@dataclass
class ParsedImport:
    """A task file read and checked for a kind of project, before any database work (see import_tasks)."""

    kind: str
    text: str
    tasks: list[ParsedTask]
    errors: list[tuple[int, str]]
    rows: list[tuple] | None = None  # the tasks as DBAPI values for one dialect, project_id left out (prepare)
    dialect: str = ""

    def prepare(self, dialect) -> "ParsedImport":  # noqa: ANN001
        """Convert the values (JSON, dates) for this database now, outside the write transaction (a file
        with errors is refused before any insert: nothing to convert)."""
        if self.errors:
            return self
        procs = [Task.__table__.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in _TASK_COLUMNS[1:]]
        now = utcnow()
        self.rows = [tuple(v if p is None else p(v) for p, v in zip(procs, (
            t.external_id, t.group_key, t.prompt, t.responses, t.response_ids, t.gold is not None, t.gold, t.meta, 0, now))) for t in self.tasks]
        self.dialect = dialect.name
        return self


def parse_import(kind: str, text: str) -> ParsedImport:
    return ParsedImport(kind, text, *parse_task_lines(kind, text))


def import_file(db, project_ref: str | int, text: str) -> int:  # noqa: ANN001
    """import_tasks in its own transaction, the file parsed before it begins."""
    with db.read() as s:
        kind = get_project(s, project_ref).kind
    parsed = parse_import(kind, text).prepare(db.engine.dialect)
    with db.write() as s:
        return import_tasks(s, get_project(s, project_ref), parsed)


def import_tasks(s: Session, project: Project, text: str | ParsedImport) -> int:
    """Validate the whole file, then insert it in the caller's transaction; all or nothing. Pass the
    file parsed beforehand (parse_import) to keep its parsing out of the write transaction: on SQLite that
    holds every project's write lock (100k items: 0.9 s of parsing)."""
    parsed = text if isinstance(text, ParsedImport) else parse_import(project.kind, text)
    if parsed.kind != project.kind:
        raise Invalid(f"the file was read for a {parsed.kind} project; {project.name!r} is a {project.kind} project")
    tasks, errors, text = parsed.tasks, list(parsed.errors), parsed.text
    if not errors:
        # in chunks: one IN of every new id passed PostgreSQL's 65,535 bound parameters at 100k items
        ids, existing = [t.external_id for t in tasks], set()
        for k in range(0, len(ids), 10_000):
            existing.update(s.scalars(select(Task.external_id).where(Task.project_id == project.id, Task.external_id.in_(ids[k:k + 10_000]))))
        line_of = _line_numbers(text) if existing else {}
        for t in tasks:
            if t.external_id in existing:
                errors.append((line_of.get(t.group_key, 0), f"id {t.group_key!r} is already in project {project.name!r}"))
    if errors:
        raise ImportRejected(errors)
    conn = s.connection()
    if parsed.rows is None or parsed.dialect != conn.dialect.name:
        parsed.prepare(conn.dialect)
    if parsed.rows:
        # one DBAPI executemany of values converted by SQLAlchemy's own bind processors (prepare): the ORM
        # held the write lock 6 s for 100k items, Core's insert 2 s (Python per row in both), this 0.3 s
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        conn.exec_driver_sql(f"INSERT INTO tasks ({', '.join(_TASK_COLUMNS)}) VALUES ({', '.join([mark] * len(_TASK_COLUMNS))})",
                             [(project.id, *r) for r in parsed.rows])
    return len(tasks)


_TASK_COLUMNS = ("project_id", "external_id", "group_key", "prompt", "responses", "response_ids", "is_gold", "gold", "meta", "n_claims", "created_at")


def _line_numbers(text: str) -> dict[str, int]:
    out = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            obj = json.loads(line)
            ext = obj.get("id")
            if ext is None:
                ext = "h" + hashlib.sha256(json.dumps([obj["prompt"], obj["responses"]]).encode()).hexdigest()[:16]
            out.setdefault(str(ext), lineno)
        except Exception:  # noqa: BLE001
            pass
    return out


# ---------------------------------------------------------------- assignment


def _claimable(project: Project):  # noqa: ANN202
    return or_(Task.is_gold.is_(True), Task.n_claims < project.overlap)


def _sweep_expired(s: Session, project: Project) -> None:
    """Give back the slots of expired reservations (each one exactly once, whoever races us)."""
    now = utcnow()
    rows = s.execute(
        select(Assignment.id, Assignment.task_id)
        .where(Assignment.project_id == project.id, Assignment.expires_at < now)
        .limit(200)
    ).all()
    for aid, tid in rows:
        res = s.execute(delete(Assignment).where(Assignment.id == aid, Assignment.expires_at < now))
        if res.rowcount == 1:
            s.execute(update(Task).where(Task.id == tid).values(n_claims=Task.n_claims - 1))


def next_task(s: Session, project: Project, user: User, lease: timedelta = DEFAULT_LEASE) -> Task | None:
    """The item this annotator should judge next (reserving it), or None when there is nothing left.
    Call inside a write transaction."""
    _sweep_expired(s, project)
    mine = s.scalar(
        select(Task)
        .join(Assignment, Assignment.task_id == Task.id)
        .where(Assignment.project_id == project.id, Assignment.user_id == user.id)
        .order_by(Assignment.created_at, Assignment.id)
        .limit(1)
    )
    if mine is not None:
        return mine
    judged = exists().where(Judgment.task_id == Task.id, Judgment.user_id == user.id)
    reserved = exists().where(Assignment.task_id == Task.id, Assignment.user_id == user.id)
    # gold first, then items that others started (agreement becomes measurable early), then in import
    # order: one query per tier, each an ordered walk of ix_tasks_next that stops at 8 rows, so the
    # cost does not grow with the project (one query sorting every open item did)
    tiers = [Task.is_gold.is_(True)] + [and_(Task.is_gold.is_(False), Task.n_claims == c, ~_auto(project)) for c in range(project.overlap - 1, -1, -1)]
    lost: set[int] = set()
    while True:
        # Asked again after every lost race: on PostgreSQL (read committed) each query sees what the
        # winners committed, so the loop ends with an item or with none left, never with "none" while
        # one is free. (Concurrent callers all read the same top candidates.)
        candidates: list[int] = []
        # PostgreSQL: first the top item no one else is taking (row lock, SKIP LOCKED: concurrent callers
        # spread out instead of queueing on one row); then, if all are being taken, the top 8, waiting
        for skip in (True, False):
            for tier in tiers:
                q = (select(Task.id).where(Task.project_id == project.id, tier, ~judged, ~reserved, Task.id.not_in(lost))
                     .order_by(Task.n_claims, Task.id))  # (gold: the least seen first)
                q = q.limit(1).with_for_update(skip_locked=True, of=Task) if skip else q.limit(8)
                if candidates := s.scalars(q).all():
                    break
            if candidates:
                break
        if not candidates:
            return None
        now = utcnow()
        for tid in candidates:
            try:
                with s.begin_nested():
                    res = s.execute(
                        update(Task).where(Task.id == tid, _claimable(project)).values(n_claims=Task.n_claims + 1)
                    )
                    if res.rowcount != 1:
                        lost.add(tid)  # someone else took the last slot
                        continue
                    s.add(Assignment(project_id=project.id, task_id=tid, user_id=user.id, created_at=now, expires_at=now + lease))
                    s.flush()
            except IntegrityError:
                lost.add(tid)  # this annotator reserved it in another request at the same moment
                continue
            return s.get(Task, tid)


def reserved_task(s: Session, project: Project, user: User) -> Task | None:
    """The item this annotator holds a live reservation for, if any (reads only; next_task reserves)."""
    return s.scalar(
        select(Task).join(Assignment, Assignment.task_id == Task.id)
        .where(Assignment.project_id == project.id, Assignment.user_id == user.id, Assignment.expires_at >= utcnow())
        .order_by(Assignment.created_at, Assignment.id).limit(1)
    )


# ---------------------------------------------------------------- AI pre-labels

AI_CHOICES = ("A", "B", "tie")


def _auto(project: Project):  # noqa: ANN202
    """Items routed to the AI: a non-gold item with an AI label at least project.ai_threshold confident."""
    if project.ai_threshold is None:
        return false()
    return exists().where(AILabel.task_id == Task.id, AILabel.confidence >= project.ai_threshold) & Task.is_gold.is_(False)


def set_ai_settings(s: Session, project: Project, show_ai: Any = None, threshold: Any = "keep") -> dict:
    """show_ai: show AI suggestions to annotators (None = unchanged); threshold: auto-label items whose AI
    confidence is at least this (0.5-1), None = routing off, "keep" = unchanged."""
    if project.kind != "compare" and (show_ai or threshold not in ("keep", None)):
        raise Invalid("AI labels are for compare projects")
    if show_ai is not None:
        if not isinstance(show_ai, bool):
            raise Invalid("show_ai must be true or false")
        project.show_ai = show_ai
    if threshold != "keep":
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.5 <= float(threshold) <= 1.0:
                raise Invalid("threshold must be a number in [0.5, 1] (or off)")
            threshold = float(threshold)
        project.ai_threshold = threshold
    return {"show_ai": project.show_ai, "ai_threshold": project.ai_threshold}


def _ai_line(obj: Any) -> tuple[str, str, float, str, str | None]:
    """(task external id, choice in the task's order, confidence, agent, principle) of one line: a record of
    `tether ai label` (chosen/rejected with meta.task, meta.response_ids, meta.confidence, meta.labeler), or
    {task, choice: A|B|tie, confidence, agent, principle?}."""
    if not isinstance(obj, dict):
        raise Invalid("each line must be a JSON object")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if "chosen" in obj:
        task, ids, conf, agent = meta.get("task"), meta.get("response_ids"), meta.get("confidence"), meta.get("labeler")
        if not isinstance(ids, list) or len(ids) != 2:
            raise Invalid("a `tether ai label` record needs meta.response_ids [chosen, rejected]")
        choice = ids  # resolved against the task's response_ids by the caller
        principles = meta.get("principles") or []
        principle = principles[0] if len(principles) == 1 else ("+".join(sorted(map(str, principles))) or None)
    else:
        task, choice, conf, agent, principle = obj.get("task"), obj.get("choice"), obj.get("confidence"), obj.get("agent"), obj.get("principle")
        if choice not in AI_CHOICES:
            raise Invalid(f"choice must be one of {AI_CHOICES}")
    if not isinstance(task, str) or not task:
        raise Invalid("no task id (meta.task or task)")
    if not isinstance(agent, str) or not agent.strip() or len(agent) > 160:
        raise Invalid("agent (meta.labeler or agent) must be a non-empty string of at most 160 characters")
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.5 <= conf <= 1.0:
        raise Invalid("confidence must be a number in [0.5, 1]")
    if principle is not None and (not isinstance(principle, str) or len(principle) > 160):
        raise Invalid("principle must be a string of at most 160 characters")
    return task, choice, float(conf), agent.strip(), principle


def import_ai_labels(s: Session, project: Project, text: str) -> int:
    """AI labels for a compare project's items, all or nothing (ImportRejected with every bad line); a label
    from the same agent for the same item replaces the old one."""
    if project.kind != "compare":
        raise Invalid("AI labels are for compare projects")
    tasks = {t.external_id: t for t in s.scalars(select(Task).where(Task.project_id == project.id))}
    rows, errors, seen = [], [], set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise Invalid(f"invalid JSON: {e.msg}") from None
            ext, choice, conf, agent, principle = _ai_line(obj)
            task = tasks.get(ext)
            if task is None:
                raise Invalid(f"no item {ext!r} in project {project.name!r}")
            if isinstance(choice, list):
                if sorted(map(str, choice)) != sorted(map(str, task.response_ids)):
                    raise Invalid(f"meta.response_ids {choice} are not item {ext!r}'s responses {task.response_ids}")
                choice = "A" if str(choice[0]) == str(task.response_ids[0]) else "B"
            if (task.id, agent) in seen:
                raise Invalid(f"a second label of item {ext!r} by {agent!r}")
            seen.add((task.id, agent))
            rows.append(AILabel(project_id=project.id, task_id=task.id, agent=agent, choice=choice, confidence=conf, principle=principle))
        except Invalid as e:
            errors.append((lineno, str(e)))
    if errors:
        raise ImportRejected(errors)
    for r in rows:
        s.execute(delete(AILabel).where(AILabel.task_id == r.task_id, AILabel.agent == r.agent))
    s.add_all(rows)
    s.flush()
    return len(rows)


def best_ai_labels(s: Session, project: Project) -> dict[int, AILabel]:
    """task id -> its most confident AI label."""
    best: dict[int, AILabel] = {}
    for a in s.scalars(select(AILabel).where(AILabel.project_id == project.id).order_by(AILabel.id)):
        if a.task_id not in best or a.confidence > best[a.task_id].confidence:
            best[a.task_id] = a
    return best


def suggestion(s: Session, project: Project, task: Task) -> dict | None:
    """The AI suggestion an annotator sees for this item: None unless the admin turned suggestions on."""
    if not project.show_ai:
        return None
    a = s.scalar(select(AILabel).where(AILabel.task_id == task.id).order_by(AILabel.confidence.desc(), AILabel.id).limit(1))
    return None if a is None else {"choice": a.choice, "agent": a.agent, "confidence": a.confidence, "principle": a.principle}


def ai_stats(s: Session, project: Project, rows: list[tuple[Task, Judgment, str]] | None = None) -> dict:
    """AI labels, routing, and AI-human agreement: Cohen's kappa between each AI label and its item's human
    plurality vote (A/B/tie; skips and tied votes left out), over the project, per principle and per agent."""
    labels = list(s.scalars(select(AILabel).where(AILabel.project_id == project.id).order_by(AILabel.id)))
    rows = _rows(s, project) if rows is None else rows
    votes: dict[int, list] = defaultdict(list)
    for t, j, _w in rows:
        if not j.skipped and not t.is_gold:
            votes[t.id].append(j.value["choice"])
    human = {tid: agreement.plurality(v) for tid, v in votes.items()}
    n_auto = s.scalar(select(func.count(Task.id)).where(Task.project_id == project.id, _auto(project))) if project.ai_threshold is not None else 0

    def kappa(ls: list[AILabel]) -> dict:
        both = [(a.choice, human[a.task_id]) for a in ls if human.get(a.task_id) is not None]
        return {"n": len(both), "agreement": (sum(x == y for x, y in both) / len(both)) if both else None,
                "cohen_kappa": agreement.cohen_kappa([x for x, _ in both], [y for _, y in both]) if both else None}

    by: dict[str, dict[str, list]] = {"principle": defaultdict(list), "agent": defaultdict(list)}
    for a in labels:
        by["principle"][a.principle or "-"].append(a)
        by["agent"][a.agent].append(a)
    return {"labels": len(labels), "items": len({a.task_id for a in labels}), "show_ai": project.show_ai,
            "threshold": project.ai_threshold, "auto_labelled": int(n_auto or 0),
            "agreement": kappa(labels) | {"per_principle": {k: kappa(v) for k, v in sorted(by["principle"].items())},
                                          "per_agent": {k: kappa(v) for k, v in sorted(by["agent"].items())}}}


# ---------------------------------------------------------------- judgments


def normalize_value(project: Project, task: Task, data: dict) -> tuple[dict, bool]:
    """Validate a submitted judgment; returns (canonical value, skipped)."""
    n = len(task.responses)
    if project.kind == "compare":
        choice = data.get("choice")
        if choice not in COMPARE_CHOICES:
            raise Invalid(f"choice must be one of {COMPARE_CHOICES}")
        return {"choice": choice}, choice == "skip"
    if _truthy(data.get("skip")):
        return {"skip": True}, True
    if project.kind == "rank":
        r = data.get("ranking")
        if isinstance(r, str):  # the form's "2,0,3,1"
            r = [int(x) if x.isascii() and x.isdigit() and len(x) < 3 else -1 for x in r.split(",")]
        try:
            return {"ranking": _check_ranking(r, n)}, False
        except ValueError as e:
            raise Invalid(str(e)) from None
    return {"rating": as_int("rating", data.get("rating"), 1, 5)}, False


def clean_judgment(task_id: Any, data: Any) -> tuple[int, dict]:
    """The fields every kind shares (the JSON API and the form alike); normalize_value checks the answer."""
    if not isinstance(data, dict):
        raise Invalid("expected a JSON object")
    reason = as_text("reason", data.get("reason"), 64, optional=True)
    if reason is not None and reason not in REASONS:
        raise Invalid(f"reason must be one of {REASONS}")
    ms = data.get("client_ms")
    return as_int("task_id", task_id, 1), {
        **data,
        "reason": reason,
        "rationale": as_text("rationale", data.get("rationale"), MAX_RATIONALE, optional=True),
        "submission_id": as_text("submission_id", data.get("submission_id"), 64, optional=True),
        "client_ms": None if ms is None or ms == "" else min(as_int("client_ms", ms), 86_400_000),
    }


def _truthy(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() in ("1", "true", "yes", "on"))


def _gold_correct(project: Project, task: Task, value: dict, skipped: bool) -> bool | None:
    if not task.is_gold or skipped:
        return None
    if project.kind == "compare":
        if value["choice"] == "tie":
            return False
        return value["choice"] == task.gold if isinstance(task.gold, str) else (
            (value["choice"] == "A") == (task.gold.index(0) < task.gold.index(1))
        )
    if project.kind == "rank":
        pos_g = {r: i for i, r in enumerate(task.gold)}
        pos_a = {r: i for i, r in enumerate(value["ranking"])}
        pairs = list(combinations(range(len(task.responses)), 2))
        good = sum((pos_g[i] < pos_g[j]) == (pos_a[i] < pos_a[j]) for i, j in pairs)
        return good / len(pairs) >= RANK_GOLD_THRESHOLD
    return abs(value["rating"] - int(task.gold)) <= RATE_GOLD_TOLERANCE


@dataclass
class SubmitResult:
    judgment: Judgment
    duplicate: bool


def submit(db, project_id: int, user_id: int, task_id: int, data: dict) -> SubmitResult:  # noqa: ANN001
    """Record one judgment in its own transaction (committed before this returns)."""
    task_id, data = clean_judgment(task_id, data)
    try:
        with db.write() as s:
            return _submit(s, project_id, user_id, task_id, data)
    except IntegrityError:
        # a concurrent submission for the same (task, user) won the race: return what it stored
        with db.read() as s:
            j = s.scalar(select(Judgment).where(Judgment.task_id == task_id, Judgment.user_id == user_id))
            if j is None:
                raise
            return SubmitResult(j, True)


def _submit(s: Session, project_id: int, user_id: int, task_id: int, data: dict) -> SubmitResult:
    project = s.get(Project, project_id)
    task = s.get(Task, task_id)
    if project is None or task is None or task.project_id != project_id:
        raise NotFound("no such item in this project")
    old = s.scalar(select(Judgment).where(Judgment.task_id == task_id, Judgment.user_id == user_id))
    if old is not None:
        return SubmitResult(old, True)
    value, skipped = normalize_value(project, task, data)
    reason, rationale, sub_id, client_ms = (data[k] for k in ("reason", "rationale", "submission_id", "client_ms"))
    now = utcnow()
    a = s.scalar(select(Assignment).where(Assignment.task_id == task_id, Assignment.user_id == user_id))
    server_ms = None
    if a is not None and s.execute(delete(Assignment).where(Assignment.id == a.id)).rowcount == 1:
        server_ms = int((now - a.created_at).total_seconds() * 1000)  # the reservation's slot becomes this judgment's
    else:
        res = s.execute(update(Task).where(Task.id == task_id, _claimable(project)).values(n_claims=Task.n_claims + 1))
        if res.rowcount != 1:
            # a concurrent copy of this submission may have used the slot and committed meanwhile (the
            # update waited for it): that is a duplicate, not a conflict
            again = s.scalar(select(Judgment).where(Judgment.task_id == task_id, Judgment.user_id == user_id))
            if again is not None:
                return SubmitResult(again, True)
            raise Conflict("this item already has all the judgments it needs; take the next one")
    j = Judgment(
        project_id=project_id,
        task_id=task_id,
        user_id=user_id,
        value=value,
        skipped=skipped,
        reason=reason,
        rationale=rationale,
        submission_id=sub_id,
        server_ms=server_ms,
        client_ms=client_ms,
        gold_correct=_gold_correct(project, task, value, skipped),
        created_at=now,
    )
    s.add(j)
    s.flush()
    return SubmitResult(j, False)


# ---------------------------------------------------------------- progress and statistics


def progress(s: Session, project: Project, user: User) -> dict:
    total = s.scalar(select(func.count(Task.id)).where(Task.project_id == project.id)) or 0
    done = s.scalar(
        select(func.count(Judgment.id)).where(Judgment.project_id == project.id, Judgment.user_id == user.id)
    ) or 0
    judged = exists().where(Judgment.task_id == Task.id, Judgment.user_id == user.id)
    reserved = exists().where(Assignment.task_id == Task.id, Assignment.user_id == user.id)
    available = s.scalar(
        select(func.count(Task.id)).where(
            Task.project_id == project.id, ~judged, or_(reserved, and_(_claimable(project), ~_auto(project)))
        )
    ) or 0
    n_regular = s.scalar(select(func.count(Task.id)).where(Task.project_id == project.id, Task.is_gold.is_(False))) or 0
    per_task = (
        select(func.count(Judgment.id).label("c"))
        .join(Task, Task.id == Judgment.task_id)
        .where(Task.project_id == project.id, Task.is_gold.is_(False))
        .group_by(Judgment.task_id)
        .subquery()
    )
    filled = s.scalar(select(func.coalesce(func.sum(case((per_task.c.c > project.overlap, project.overlap), else_=per_task.c.c)), 0))) or 0
    return {
        "project": project.name,
        "done": int(done),
        "available": int(available),
        "total_items": int(total),
        "completion": (float(filled) / (n_regular * project.overlap)) if n_regular else 0.0,
    }


def _units(project: Project, rows: list[tuple[Task, Judgment, str]]) -> dict:
    """labels[unit][annotator] for agreement: compare/rate per item, rank per response pair."""
    labels: dict = defaultdict(dict)
    for task, j, who in rows:
        if j.skipped or task.is_gold:
            continue
        if project.kind == "compare":
            labels[task.id][who] = j.value["choice"]
        elif project.kind == "rate":
            labels[task.id][who] = j.value["rating"]
        else:
            pos = {r: i for i, r in enumerate(j.value["ranking"])}
            for a, b in combinations(range(len(task.responses)), 2):
                labels[(task.id, a, b)][who] = "a" if pos[a] < pos[b] else "b"
    return labels


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _rows(s: Session, project: Project) -> list[tuple[Task, Judgment, str]]:
    return list(
        s.execute(
            select(Task, Judgment, User.username)
            .join(Judgment, Judgment.task_id == Task.id)
            .join(User, User.id == Judgment.user_id)
            .where(Task.project_id == project.id)
            .order_by(Judgment.id)
        ).tuples()
    )


def project_stats(s: Session, project: Project) -> dict:
    rows = _rows(s, project)
    n_tasks = s.scalar(select(func.count(Task.id)).where(Task.project_id == project.id)) or 0
    n_gold = s.scalar(select(func.count(Task.id)).where(Task.project_id == project.id, Task.is_gold.is_(True))) or 0
    per_task = Counter(t.id for t, _j, _u in rows if not t.is_gold)
    labels = _units(project, rows)
    level = "interval" if project.kind == "rate" else "nominal"
    pairs = agreement.pairwise_cohen(labels)
    kappas = [p["kappa"] for p in pairs if p["kappa"] is not None]
    maj = agreement.majority_agreement(labels)
    per_user: dict = defaultdict(lambda: {"judgments": 0, "skipped": 0, "gold": 0, "gold_correct": 0, "ms": [], "client_ms": []})
    dist: Counter = Counter()
    for task, j, who in rows:
        u = per_user[who]
        u["judgments"] += 1
        u["skipped"] += int(j.skipped)
        if j.gold_correct is not None:
            u["gold"] += 1
            u["gold_correct"] += int(j.gold_correct)
        if j.server_ms is not None:
            u["ms"].append(j.server_ms)
        if j.client_ms is not None:
            u["client_ms"].append(j.client_ms)
        dist[_label_name(project, j)] += 1
    annotators = []
    for who, u in sorted(per_user.items()):
        annotators.append(
            {
                "annotator": who,
                "judgments": u["judgments"],
                "skipped": u["skipped"],
                "majority_agreement": maj.get(who, {}).get("agree"),
                "majority_n": maj.get(who, {}).get("n", 0),
                "gold_items": u["gold"],
                "gold_accuracy": (u["gold_correct"] / u["gold"]) if u["gold"] else None,
                "median_seconds": (statistics.median(u["ms"]) / 1000) if u["ms"] else None,
                "median_client_seconds": (statistics.median(u["client_ms"]) / 1000) if u["client_ms"] else None,
            }
        )
    all_ms = [j.server_ms for _t, j, _u in rows if j.server_ms is not None]
    ai = ai_stats(s, project, rows) if project.kind == "compare" else None
    return {
        "project": project.name,
        "kind": project.kind,
        "overlap": project.overlap,
        "counts": {
            "items": int(n_tasks),
            "gold_items": int(n_gold),
            "judgments": len(rows),
            "skipped": sum(1 for _t, j, _u in rows if j.skipped),
            "items_with_judgments": len(per_task),
            "items_complete": sum(1 for c in per_task.values() if c >= project.overlap),
            "annotators": len(per_user),
        },
        "labels": dict(dist),
        "agreement": {
            "units": sum(1 for v in labels.values() if len(v) >= 2),
            "unit": "response pair" if project.kind == "rank" else "item",
            "krippendorff_alpha": agreement.krippendorff_alpha(labels, level),
            "krippendorff_level": level,
            "krippendorff_alpha_ordinal": agreement.krippendorff_alpha(labels, "ordinal") if project.kind == "rate" else None,
            "fleiss_kappa": agreement.fleiss_kappa(labels),
            "mean_cohen_kappa": (sum(kappas) / len(kappas)) if kappas else None,
            "cohen_pairs": pairs,
        },
        "annotators": annotators,
        "time": {
            "median_seconds": (statistics.median(all_ms) / 1000) if all_ms else None,
            "p90_seconds": (_pct(all_ms, 0.9) / 1000) if all_ms else None,
        },
        "ai": ai,
    }


def _label_name(project: Project, j: Judgment) -> str:
    if j.skipped:
        return "skip"
    if project.kind == "compare":
        return j.value["choice"]
    if project.kind == "rate":
        return str(j.value["rating"])
    return "ranked"


# ---------------------------------------------------------------- export

POLICIES = ("majority", "all")


def export_preferences(s: Session, project: Project, policy: str = "majority", include_gold: bool = False,
                       exclude: frozenset[str] = frozenset()) -> list[dict]:
    """Preference records {prompt, chosen, rejected, id, source, meta} for `tether rm` / `tether dpo`.

    compare: majority = the strict plurality of A / B / tie votes (a tie or a tied vote gives no record);
             all = one record per A or B vote.
    rank:    each ranking is read as all its pairs; majority = per pair, the order most annotators
             chose (equal counts give no record); all = every pair of every ranking.
    rate:    items split from one source line are compared with each other; majority = by mean rating
             (equal means give no record); all = pairs within one annotator's own ratings.
    Skips are never used; gold items only with include_gold; the judgments of the annotators named in
    `exclude` (e.g. those who failed the gold items) are left out before any vote is counted.
    """
    if policy not in POLICIES:
        raise Invalid(f"policy must be one of {POLICIES}")
    rows = [r for r in _rows(s, project) if (include_gold or not r[0].is_gold) and r[2] not in exclude]
    source = f"tether-label:{project.name}"
    out: list[dict] = []

    def rec(task: Task, chosen: str, rejected: str, rid: str, meta: dict) -> dict:
        return {
            "prompt": task.prompt,
            "chosen": chosen,
            "rejected": rejected,
            "id": f"{project.name}/{rid}",
            "source": source,
            "meta": {"project": project.name, "kind": project.kind, "policy": policy, "group": task.group_key, **meta},
        }

    by_task: dict[int, list[tuple[Task, Judgment, str]]] = defaultdict(list)
    for r in rows:
        by_task[r[0].id].append(r)

    if project.kind == "compare":
        for tid, trs in by_task.items():
            task = trs[0][0]
            votes = Counter(j.value["choice"] for _t, j, _u in trs)
            n = sum(votes[c] for c in ("A", "B", "tie"))
            a, b = task.responses
            ia, ib = task.response_ids
            base = {"task": task.external_id, "task_pk": tid, "votes": {c: votes[c] for c in COMPARE_CHOICES}, "n_annotators": len(trs),
                    "annotators": sorted(w for _t, _j, w in trs)}
            if policy == "majority":
                win = agreement.plurality([j.value["choice"] for _t, j, _u in trs if not j.skipped])
                if win in ("A", "B"):
                    c, r_ = (a, b) if win == "A" else (b, a)
                    ids = (ia, ib) if win == "A" else (ib, ia)
                    out.append(rec(task, c, r_, task.external_id, {**base, "response_ids": list(ids), "agreement": votes[win] / n}))
            else:
                for _t, j, who in trs:
                    ch = j.value["choice"]
                    if ch in ("A", "B"):
                        c, r_ = (a, b) if ch == "A" else (b, a)
                        ids = (ia, ib) if ch == "A" else (ib, ia)
                        out.append(rec(task, c, r_, f"{task.external_id}/u{j.user_id}", {**base, "annotator": who, "response_ids": list(ids)}))
        if project.ai_threshold is not None:
            # routed items: the AI's label, marked as such, where no person gave a vote (a person's vote wins)
            voted = {tid for tid, trs in by_task.items() if any(not j.skipped for _t, j, _u in trs)}
            for tid, lab in best_ai_labels(s, project).items():
                task = s.get(Task, tid)
                if tid in voted or lab.confidence < project.ai_threshold or lab.choice not in ("A", "B") or (task.is_gold and not include_gold):
                    continue
                (a, b), (ia, ib) = task.responses, task.response_ids
                c, r_, ids = (a, b, (ia, ib)) if lab.choice == "A" else (b, a, (ib, ia))
                out.append(rec(task, c, r_, f"{task.external_id}/ai", {"task": task.external_id, "task_pk": tid, "response_ids": list(ids),
                                                                         "auto_labelled": True, "ai": {"agent": lab.agent, "confidence": lab.confidence,
                                                                                                       "principle": lab.principle}}))
    elif project.kind == "rank":
        for tid, trs in by_task.items():
            task = trs[0][0]
            ranks = [(j, who) for _t, j, who in trs if not j.skipped]
            base = {"task": task.external_id, "task_pk": tid, "n_annotators": len(trs), "n_rankings": len(ranks)}
            pos_list = [({r: i for i, r in enumerate(j.value["ranking"])}, j, who) for j, who in ranks]
            for x, y in combinations(range(len(task.responses)), 2):
                if policy == "majority":
                    above = sum(p[x] < p[y] for p, _j, _w in pos_list)
                    below = len(pos_list) - above
                    if above == below:
                        continue
                    c, r_ = (x, y) if above > below else (y, x)
                    k = max(above, below)
                    out.append(rec(task, task.responses[c], task.responses[r_], f"{task.external_id}/{c}>{r_}",
                                   {**base, "response_ids": [c, r_], "votes": {"chosen": k, "rejected": len(pos_list) - k}, "agreement": k / len(pos_list)}))
                else:
                    for p, j, who in pos_list:
                        c, r_ = (x, y) if p[x] < p[y] else (y, x)
                        out.append(rec(task, task.responses[c], task.responses[r_], f"{task.external_id}/{c}>{r_}/u{j.user_id}",
                                       {**base, "annotator": who, "response_ids": [c, r_]}))
    else:
        groups: dict[str, list[tuple[Task, Judgment, str]]] = defaultdict(list)
        for r in rows:
            if not r[1].skipped:
                groups[r[0].group_key].append(r)
        for gk, grs in groups.items():
            items: dict[int, tuple[Task, list[int]]] = {}
            for t, j, _w in grs:
                items.setdefault(t.response_ids[0], (t, []))[1].append(j.value["rating"])
            if policy == "majority":
                means = {i: sum(v) / len(v) for i, (_t, v) in items.items()}
                for x, y in combinations(sorted(items), 2):
                    if means[x] == means[y]:
                        continue
                    c, r_ = (x, y) if means[x] > means[y] else (y, x)
                    tc, tr = items[c][0], items[r_][0]
                    out.append(rec(tc, tc.responses[0], tr.responses[0], f"{gk}/{c}>{r_}",
                                   {"task": gk, "response_ids": [c, r_], "mean_rating": {"chosen": means[c], "rejected": means[r_]},
                                    "n_ratings": {"chosen": len(items[c][1]), "rejected": len(items[r_][1])}}))
            else:
                by_user: dict = defaultdict(dict)
                for t, j, who in grs:
                    by_user[(j.user_id, who)][t.response_ids[0]] = (t, j.value["rating"])
                for (uid, who), mine in by_user.items():
                    for x, y in combinations(sorted(mine), 2):
                        if mine[x][1] == mine[y][1]:
                            continue
                        c, r_ = (x, y) if mine[x][1] > mine[y][1] else (y, x)
                        out.append(rec(mine[c][0], mine[c][0].responses[0], mine[r_][0].responses[0], f"{gk}/{c}>{r_}/u{uid}",
                                       {"task": gk, "annotator": who, "response_ids": [c, r_], "ratings": {"chosen": mine[c][1], "rejected": mine[r_][1]}}))
    return out


def export_kto(s: Session, project: Project, threshold: float = 4, policy: str = "majority", include_gold: bool = False,
               exclude: frozenset[str] = frozenset()) -> list[dict]:
    """Unpaired records {prompt, completion, label, id, source, meta} for `tether kto`, from a rate project's
    1-5 ratings, without forming pairs: label = true (desirable) when the rating is >= threshold.

    majority: one record per rated response, labelled by its mean rating; all: one record per rating.
    Skips are never used; gold items only with include_gold; the annotators in `exclude` are left out.
    """
    if project.kind != "rate":
        raise Invalid(f"the kto format needs a rate project (1-5 ratings); {project.name!r} is a {project.kind} project")
    if policy not in POLICIES:
        raise Invalid(f"policy must be one of {POLICIES}")
    rows = [r for r in _rows(s, project) if (include_gold or not r[0].is_gold) and r[2] not in exclude and not r[1].skipped]
    by_task: dict[int, list[tuple[Task, Judgment, str]]] = defaultdict(list)
    for r in rows:
        by_task[r[0].id].append(r)
    out: list[dict] = []
    for trs in by_task.values():
        task = trs[0][0]
        ratings = [j.value["rating"] for _t, j, _w in trs]
        votes = [(sum(ratings) / len(ratings), "", {"mean_rating": sum(ratings) / len(ratings), "n_ratings": len(ratings)})] if policy == "majority" \
            else [(j.value["rating"], f"/u{j.user_id}", {"annotator": who, "rating": j.value["rating"]}) for _t, j, who in trs]
        for rating, suffix, meta in votes:
            out.append({"prompt": task.prompt, "completion": task.responses[0], "label": rating >= threshold,
                        "id": f"{project.name}/{task.external_id}{suffix}", "source": f"tether-label:{project.name}",
                        "meta": {"project": project.name, "kind": "rate", "policy": policy, "group": task.group_key,
                                 "task": task.external_id, "threshold": threshold, **meta}})
    return out


def export_raw(s: Session, project: Project) -> list[dict]:
    """Every judgment, with its item, for audits and re-analysis."""
    return [
        {
            "project": project.name,
            "kind": project.kind,
            "task": t.external_id,
            "group": t.group_key,
            "prompt": t.prompt,
            "responses": t.responses,
            "response_ids": t.response_ids,
            "is_gold": t.is_gold,
            "annotator": who,
            "value": j.value,
            "skipped": j.skipped,
            "reason": j.reason,
            "rationale": j.rationale,
            "gold_correct": j.gold_correct,
            "server_ms": j.server_ms,
            "client_ms": j.client_ms,
            "submission_id": j.submission_id,
            "created_at": j.created_at.isoformat() + "Z",
            "judgment_id": j.id,
        }
        for t, j, who in _rows(s, project)
    ]


def write_jsonl(records: list[dict], path: str) -> None:
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
