"""The web app: server-rendered pages for annotators and admins, and a JSON API.

Security model
- Login sessions live in the database; the cookie (HttpOnly, SameSite=Lax, Secure over https or with
  --secure-cookies) carries a random token whose SHA-256 is the session id.
- Every state-changing request needs a session and its CSRF token (form field `csrf_token` or header
  `X-CSRF-Token`); a cross-origin `Origin` header is refused outright. The login form uses a
  double-submit cookie; the JSON login only accepts `application/json` (which a cross-site form
  cannot send without a CORS preflight, and we answer none).
- Annotators see only projects they are members of (others answer 404); /admin and /api/admin need
  the admin role (403).
- A GET reserves an item (/p/<id>) only for a same-origin or user-typed navigation (Sec-Fetch-Site); others
  get a Start button that POSTs. Every response, a 500 included, carries the security headers below.
- Templates autoescape everything; prompts and responses are shown as text. The Content-Security-Policy
  allows scripts and styles from this origin only (no inline script), so even a missed escape cannot run.
"""

import json
import logging
import random
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

import jinja2
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from markupsafe import Markup
from sqlalchemy import func, select

from tether.feedback import service as sv
from tether.feedback.db import Database
from tether.feedback.models import Judgment, LoginSession, Membership, Project, Task, User
from tether.feedback.security import (
    SESSION_TTL,
    HashQueueFull,
    LoginThrottle,
    create_session,
    end_sessions,
    lookup_session,
    run_hashing,
    token_digest,
    tokens_equal,
    verify_password,
)

HERE = Path(__file__).parent
COOKIE = "tether_session"
LOGIN_CSRF_COOKIE = "tether_login_csrf"
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
MAX_UPLOAD = 50 * 1024 * 1024
log = logging.getLogger("tether.label")
MAX_BODY = 1024 * 1024  # any request body; the import routes below allow MAX_IMPORT_BODY to an admin session
MAX_IMPORT_BODY = MAX_UPLOAD + MAX_BODY
IMPORT_ROUTES = re.compile(r"/(admin/projects|admin/p/\d+/import|api/admin/projects(/\d+/tasks)?)")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass(frozen=True)
class Auth:
    user_id: int
    username: str
    role: str
    csrf: str
    session_id: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class LoginRequired(Exception):
    pass


class HTTPError(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        self.status, self.detail, self.headers = status, detail, headers


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Pure ASGI middleware: a body over the limit is refused (413) by its Content-Length before any of it is
    read, and streamed bodies are counted as they arrive. `limit_for(scope)` gives the limit of a request."""

    def __init__(self, app, limit_for):  # noqa: ANN001
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = await self.limit_for(scope)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await _too_large(send, limit)
        st = {"seen": 0, "over": False, "started": False}

        async def counted():  # noqa: ANN202
            msg = await receive()
            if msg["type"] == "http.request":
                st["seen"] += len(msg.get("body", b""))
                if st["seen"] > limit:
                    st["over"] = True
                    raise BodyTooLarge()
            return msg

        async def guarded(msg) -> None:  # noqa: ANN001
            if st["over"]:
                return  # whatever the app answers to the cut-off body, the client gets the 413
            st["started"] = st["started"] or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not st["over"]:
                raise
        if st["over"] and not st["started"]:
            await _too_large(send, limit)


def security_headers() -> dict[str, str]:
    """On every response, the 413s answered before the app runs included."""
    return {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin"}


async def _too_large(send, limit: int) -> None:  # noqa: ANN001
    body = json.dumps({"error": f"request body too large (the limit here is {limit // 1048576} MiB)"}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
        *((k.lower().encode(), v.encode()) for k, v in security_headers().items())]})
    await send({"type": "http.response.body", "body": body})


def _markdown(text: str) -> Markup:
    from markdown_it import MarkdownIt

    # "js-default": raw HTML off (escaped), link schemes validated
    return Markup(MarkdownIt("js-default").render(text or ""))


def create_app(db: Database | str | None = None, *, secure_cookies: bool = False, lease_minutes: float = 30) -> FastAPI:
    database = db if isinstance(db, Database) else Database(db)
    lease = timedelta(minutes=lease_minutes)
    app = FastAPI(title="tether label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.db = database
    throttle = app.state.throttle = LoginThrottle()
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters["markdown"] = _markdown
    env.filters["pct"] = lambda x: "–" if x is None else f"{100 * x:.0f}%"
    env.filters["num"] = lambda x, d=2: "–" if x is None else f"{x:.{d}f}"
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # ------------------------------------------------------------ plumbing

    @app.middleware("http")
    async def headers(request: Request, call_next):  # noqa: ANN001, ANN202
        origin = request.headers.get("origin")
        if request.method in UNSAFE and origin and (origin == "null" or urlsplit(origin).netloc != request.headers.get("host", "")):
            resp: Response = PlainTextResponse("cross-origin request refused", status_code=403)
        else:
            try:
                resp = await call_next(request)
            except Exception:  # an unexpected bug: its transaction was rolled back; answer a 500 with the headers below
                log.exception("unhandled error in %s %s", request.method, request.url.path)
                resp = (JSONResponse({"error": "internal server error"}, status_code=500) if request.url.path.startswith("/api/")
                        else PlainTextResponse("internal server error", status_code=500))
        resp.headers.update(security_headers())
        if not request.url.path.startswith("/static"):
            resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, _exc: LoginRequired):  # noqa: ANN202
        if request.url.path.startswith("/api/") or request.method in UNSAFE:
            return JSONResponse({"error": "login required"}, status_code=401)
        return RedirectResponse("/login?next=" + quote(request.url.path), status_code=303)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):  # noqa: ANN202
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.detail}, status_code=exc.status, headers=exc.headers)
        return HTMLResponse(render("error.html", request, None, status=exc.status, detail=exc.detail), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):  # noqa: ANN202
        e = (exc.errors() or [{}])[0]  # the first problem, as one line naming the field
        field = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
        return await _http_error(request, HTTPError(422, f"{field}: {e.get('msg', 'invalid value')}"))

    @app.exception_handler(sv.ServiceError)
    async def _service_error(request: Request, exc: sv.ServiceError):  # noqa: ANN202
        body: dict = {"error": str(exc)}
        if isinstance(exc, sv.ImportRejected):
            body["errors"] = [{"line": n, "reason": r} for n, r in exc.errors]
        if request.url.path.startswith("/api/"):
            return JSONResponse(body, status_code=exc.status)
        return HTMLResponse(render("error.html", request, None, status=exc.status, detail=str(exc)), status_code=exc.status)

    def render(template: str, request: Request, auth: Auth | None, **ctx) -> str:  # noqa: ANN003
        return env.get_template(template).render(request=request, auth=auth, reasons=sv.REASONS, **ctx)

    def page(template: str, request: Request, auth: Auth | None, status: int = 200, **ctx) -> HTMLResponse:  # noqa: ANN003
        return HTMLResponse(render(template, request, auth, status=status, **ctx), status_code=status)

    def current(request: Request) -> Auth:
        token = request.cookies.get(COOKIE)
        with database.read() as s:
            row = lookup_session(s, token)
            if row is None:
                raise LoginRequired()
            return Auth(row.user.id, row.user.username, row.user.role, row.csrf_token, row.id)

    def csrf_auth(
        request: Request,
        auth: Annotated[Auth, Depends(current)],
        x_csrf_token: Annotated[str | None, Header()] = None,
        csrf_token: Annotated[str | None, Form()] = None,
    ) -> Auth:
        if not (tokens_equal(auth.csrf, x_csrf_token) or tokens_equal(auth.csrf, csrf_token)):
            raise HTTPError(403, "missing or wrong CSRF token")
        return auth

    def csrf_auth_json(
        auth: Annotated[Auth, Depends(current)], x_csrf_token: Annotated[str | None, Header()] = None
    ) -> Auth:
        if not tokens_equal(auth.csrf, x_csrf_token):
            raise HTTPError(403, "missing or wrong CSRF token (send the X-CSRF-Token header)")
        return auth

    def admin(auth: Auth) -> Auth:
        if not auth.is_admin:
            raise HTTPError(403, "admins only")
        return auth

    def project_for(s, pid: int, auth: Auth) -> Project:  # noqa: ANN001
        p = s.get(Project, pid) if 0 < pid <= sv.INT_MAX else None
        if p is None or not (auth.is_admin or s.get(Membership, (pid, auth.user_id)) is not None):
            raise HTTPError(404, "no such project")
        return p

    def set_session_cookie(request: Request, resp: Response, token: str) -> None:
        resp.set_cookie(
            COOKIE,
            token,
            max_age=int(SESSION_TTL.total_seconds()),
            httponly=True,
            samesite="lax",
            secure=secure_cookies or request.url.scheme == "https",
            path="/",
        )

    async def do_login(request: Request, username: str, password: str) -> tuple[str, str] | None:
        """Throttled (429, checked before any hashing), then checked in the hashing threads (503 when full)."""
        name, addr = (username or "").strip()[:64], address(request)
        sv.as_text("username", name), sv.as_text("password", password or "", 4096)  # a NUL reached PostgreSQL as a 500
        wait = throttle.retry_after(name, addr)
        if wait:
            raise HTTPError(429, f"too many failed logins for this account or from this address; try again in {wait} s",
                            {"Retry-After": str(wait)})
        try:
            return await run_hashing(check_login, name, password, addr)
        except HashQueueFull:
            raise HTTPError(503, "too many logins are being checked; try again in a moment", {"Retry-After": "1"}) from None

    def check_login(name: str, password: str, addr: str) -> tuple[str, str] | None:
        """In a hashing thread (security.run_hashing): check the password; on success open a session."""
        with database.read() as s:
            u = s.scalar(select(User).where(User.username == name))
            stored = u.password_hash if (u is not None and u.active) else None
        if not verify_password(stored, password or "") or u is None:
            locked = throttle.failed(name, addr)
            with database.write() as s:  # at most per_account/per_address rows per window: refused tries write nothing
                sv.audit(s, "login_failed", target=name, address=addr, detail=None if u is None or u.active else "deactivated")
                for key in locked:
                    sv.audit(s, "login_locked", target=key, address=addr, detail="too many failed logins")
            return None
        throttle.succeeded(name)
        with database.write() as s:
            token, row = create_session(s, s.get(User, u.id))
            sv.audit(s, "login", actor=u.username, address=addr)
            return token, row.csrf_token

    # ------------------------------------------------------------ login

    @app.get("/healthz")
    def healthz() -> dict:
        with database.read() as s:
            s.execute(select(1))
        return {"ok": True}

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/", error: str | None = None) -> HTMLResponse:  # noqa: A002
        token = secrets.token_urlsafe(24)
        resp = page("login.html", request, None, login_csrf=token, next=_safe_next(next), error=error)
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/login",
                        secure=secure_cookies or request.url.scheme == "https")
        return resp

    @app.post("/login")
    async def login_submit(
        request: Request,
        username: Annotated[str, Form()] = "",
        password: Annotated[str, Form()] = "",
        csrf_token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/",  # noqa: A002
    ) -> Response:
        if not tokens_equal(request.cookies.get(LOGIN_CSRF_COOKIE), csrf_token):
            raise HTTPError(403, "missing or wrong CSRF token; reload the login page")
        got = await do_login(request, username, password)
        if got is None:
            return RedirectResponse("/login?error=1&next=" + quote(_safe_next(next)), status_code=303)
        resp = RedirectResponse(_safe_next(next), status_code=303)
        set_session_cookie(request, resp, got[0])
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    def end_session(auth: Auth) -> None:
        """Delete the server-side session row (both logout routes)."""
        with database.write() as s:
            row = s.get(LoginSession, auth.session_id)
            if row is not None:
                s.delete(row)
                sv.audit(s, "logout", actor=auth.username)

    @app.post("/logout")
    def logout(auth: Annotated[Auth, Depends(csrf_auth)]) -> Response:
        end_session(auth)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    @app.post("/api/login")
    async def api_login(request: Request) -> JSONResponse:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPError(415, "send JSON")
        try:
            body = await request.json()
            username, password = str(body["username"]), str(body["password"])
        except Exception:  # noqa: BLE001
            raise HTTPError(400, "expected {\"username\": ..., \"password\": ...}") from None
        got = await do_login(request, username, password)
        if got is None:
            raise HTTPError(401, "wrong username or password")
        resp = JSONResponse({"username": username, "csrf_token": got[1]})
        set_session_cookie(request, resp, got[0])
        return resp

    @app.post("/api/logout")
    def api_logout(auth: Annotated[Auth, Depends(csrf_auth_json)]) -> dict:
        end_session(auth)
        return {"ok": True}

    # ------------------------------------------------------------ annotator pages

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request, auth: Annotated[Auth, Depends(current)]) -> HTMLResponse:
        with database.read() as s:
            user = s.get(User, auth.user_id)
            rows = [(p, sv.progress(s, p, user)) for p in sv.projects_for(s, user)]
        return page("home.html", request, auth, projects=rows)

    @app.get("/p/{pid}", response_class=HTMLResponse)
    def label_page(request: Request, pid: int, auth: Annotated[Auth, Depends(current)], msg: str | None = None,
                   sec_fetch_site: Annotated[str | None, Header()] = None) -> HTMLResponse:
        # Reserving an item changes state, so a GET does it only for a navigation the browser marks as coming from
        # this site or from the user (address bar, bookmark); any other (a cross-site link, a client without Fetch
        # Metadata) shows the reserved item or a Start button that POSTs to /p/{pid}/next.
        reserve = sec_fetch_site in ("same-origin", "none")
        with database.write() if reserve else database.read() as s:
            p = project_for(s, pid, auth)
            user = s.get(User, auth.user_id)
            task = sv.next_task(s, p, user, lease) if reserve else sv.reserved_task(s, p, user)
            prog = sv.progress(s, p, user)
            ctx = dict(project=p, progress=prog, message=_MESSAGES.get(msg or ""))
            if task is None:
                return page("start.html" if prog["available"] and not reserve else "done.html", request, auth, **ctx)
            order = list(range(len(task.responses)))
            random.Random(f"{task.id}:{auth.user_id}").shuffle(order)
            shown = [(i, task.responses[i]) for i in order]
            ctx.update(task=task, shown=shown, submission_id=secrets.token_hex(16), suggestion=sv.suggestion(s, p, task))
        return page(f"{p.kind}.html", request, auth, **ctx)

    @app.post("/p/{pid}/next")
    def label_next(pid: int, auth: Annotated[Auth, Depends(csrf_auth)]) -> Response:
        with database.write() as s:
            sv.next_task(s, project_for(s, pid, auth), s.get(User, auth.user_id), lease)
        return RedirectResponse(f"/p/{pid}", status_code=303)

    @app.post("/p/{pid}/submit")
    def label_submit(
        request: Request,
        pid: int,
        auth: Annotated[Auth, Depends(csrf_auth)],
        task_id: Annotated[str | None, Form()] = None,
        choice: Annotated[str | None, Form()] = None,
        ranking: Annotated[str | None, Form()] = None,
        rating: Annotated[str | None, Form()] = None,
        skip: Annotated[str | None, Form()] = None,
        reason: Annotated[str | None, Form()] = None,
        rationale: Annotated[str | None, Form()] = None,
        client_ms: Annotated[str | None, Form()] = None,
        submission_id: Annotated[str | None, Form()] = None,
    ) -> Response:
        with database.read() as s:
            project_for(s, pid, auth)
        data = dict(choice=choice, ranking=ranking, rating=rating, skip=skip, reason=reason, rationale=rationale,
                    client_ms=client_ms, submission_id=submission_id)
        try:
            res = sv.submit(database, pid, auth.user_id, task_id, data)
            msg = "dup" if res.duplicate else "saved"
        except sv.Conflict:
            msg = "full"
        return RedirectResponse(f"/p/{pid}?msg={msg}", status_code=303)

    # ------------------------------------------------------------ annotator API

    @app.get("/api/me")
    def api_me(auth: Annotated[Auth, Depends(current)]) -> dict:
        return {"username": auth.username, "role": auth.role, "csrf_token": auth.csrf}

    @app.get("/api/projects")
    def api_projects(auth: Annotated[Auth, Depends(current)]) -> dict:
        with database.read() as s:
            user = s.get(User, auth.user_id)
            return {"projects": [_project_json(p) | {"progress": sv.progress(s, p, user)} for p in sv.projects_for(s, user)]}

    @app.get("/api/projects/{pid}/progress")
    def api_progress(pid: int, auth: Annotated[Auth, Depends(current)]) -> dict:
        with database.read() as s:
            return sv.progress(s, project_for(s, pid, auth), s.get(User, auth.user_id))

    @app.post("/api/projects/{pid}/next")
    def api_next(pid: int, auth: Annotated[Auth, Depends(csrf_auth_json)]) -> dict:
        with database.write() as s:
            p = project_for(s, pid, auth)
            t = sv.next_task(s, p, s.get(User, auth.user_id), lease)
            if t is None:
                return {"task": None}
            task = {"id": t.id, "external_id": t.external_id, "kind": p.kind, "prompt": t.prompt, "responses": t.responses}
            if (hint := sv.suggestion(s, p, t)) is not None:  # only when the admin turned suggestions on
                task["ai_suggestion"] = hint
            return {"task": task}

    @app.post("/api/projects/{pid}/judgments")
    async def api_judge(request: Request, pid: int, auth: Annotated[Auth, Depends(csrf_auth_json)]) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise HTTPError(400, "invalid JSON") from None

        def work() -> JSONResponse:
            with database.read() as s:
                project_for(s, pid, auth)
            res = sv.submit(database, pid, auth.user_id, body.get("task_id") if isinstance(body, dict) else None, body)
            j = res.judgment
            return JSONResponse({"id": j.id, "task_id": j.task_id, "value": j.value, "duplicate": res.duplicate},
                                status_code=200 if res.duplicate else 201)

        return await run_in_threadpool(work)

    # ------------------------------------------------------------ admin pages

    @app.get("/admin", response_class=HTMLResponse)
    def admin_home(request: Request, auth: Annotated[Auth, Depends(current)], msg: str | None = None) -> HTMLResponse:
        admin(auth)
        with database.read() as s:
            projects = list(s.scalars(select(Project).order_by(Project.id)))
            counts = {
                p.id: (
                    s.scalar(select(func.count(Task.id)).where(Task.project_id == p.id)) or 0,
                    s.scalar(select(func.count(Judgment.id)).where(Judgment.project_id == p.id)) or 0,
                )
                for p in projects
            }
            users = list(s.scalars(select(User).order_by(User.id)))
        return page("admin.html", request, auth, projects=projects, counts=counts, users=users,
                    message=_MESSAGES.get(msg or ""), kinds=sv.KINDS)

    @app.get("/admin/p/{pid}", response_class=HTMLResponse)
    def admin_project(request: Request, pid: int, auth: Annotated[Auth, Depends(current)], msg: str | None = None,
                      n: int | None = None) -> HTMLResponse:
        admin(auth)
        with database.read() as s:
            p = project_for(s, pid, auth)
            stats = sv.project_stats(s, p)
            members = list(s.scalars(select(User).join(Membership, Membership.user_id == User.id).where(Membership.project_id == pid)))
            others = list(s.scalars(select(User).where(User.id.not_in([m.id for m in members])).order_by(User.username)))
        message = _MESSAGES.get(msg or "")
        if message and n is not None:
            message = message.format(n=n)
        return page("admin_project.html", request, auth, project=p, stats=stats, members=members, others=others,
                    message=message, import_errors=None)

    @app.post("/admin/projects")
    def admin_create_project(
        request: Request,
        auth: Annotated[Auth, Depends(csrf_auth)],
        name: Annotated[str, Form()],
        kind: Annotated[str, Form()],
        overlap: Annotated[str, Form()] = "2",
        guidelines: Annotated[str, Form()] = "",
        tasks: Annotated[UploadFile | None, File()] = None,
    ) -> Response:
        admin(auth)
        text = _read_upload(tasks)
        try:
            parsed = sv.parse_import(kind, text).prepare(database.engine.dialect) if kind in sv.KINDS else text  # outside the write lock
            with database.write() as s:
                p = sv.create_project(s, name, kind, guidelines, overlap)
                n = sv.import_tasks(s, p, parsed) if text.strip() else 0
                pid = p.id
        except sv.ImportRejected as e:
            return page("error.html", request, auth, status=422, detail="The project was not created; nothing was imported.",
                        import_errors=e.errors)
        return RedirectResponse(f"/admin/p/{pid}?msg=created&n={n}", status_code=303)

    def import_into(pid: int, auth: Auth, text: str) -> int:
        """Parse before the write transaction: on SQLite it holds every project's write lock."""
        with database.read() as s:
            kind = project_for(s, pid, auth).kind
        parsed = sv.parse_import(kind, text).prepare(database.engine.dialect)
        with database.write() as s:
            return sv.import_tasks(s, project_for(s, pid, auth), parsed)

    @app.post("/admin/p/{pid}/import")
    def admin_import(request: Request, pid: int, auth: Annotated[Auth, Depends(csrf_auth)],
                     tasks: Annotated[UploadFile, File()]) -> Response:
        admin(auth)
        text = _read_upload(tasks)
        try:
            n = import_into(pid, auth, text)
        except sv.ImportRejected as e:
            return page("error.html", request, auth, status=422, detail="Nothing was imported.", import_errors=e.errors)
        return RedirectResponse(f"/admin/p/{pid}?msg=imported&n={n}", status_code=303)

    @app.post("/admin/p/{pid}/ai")
    def admin_ai_settings(request: Request, pid: int, auth: Annotated[Auth, Depends(csrf_auth)],
                          show_ai: Annotated[str | None, Form()] = None, threshold: Annotated[str, Form()] = "") -> Response:
        admin(auth)
        try:
            th = float(threshold) if threshold.strip() else None
        except ValueError:
            raise sv.Invalid("threshold must be a number in [0.5, 1], or empty for no routing") from None
        with database.write() as s:
            p = project_for(s, pid, auth)
            got = sv.set_ai_settings(s, p, show_ai == "on", th)
            sv.audit(s, "ai_settings", auth.username, p.name, address(request), json.dumps(got))
        return RedirectResponse(f"/admin/p/{pid}?msg=ai", status_code=303)

    @app.post("/admin/p/{pid}/ai-labels")
    def admin_ai_labels(request: Request, pid: int, auth: Annotated[Auth, Depends(csrf_auth)],
                        labels: Annotated[UploadFile, File()]) -> Response:
        admin(auth)
        text = _read_upload(labels)
        try:
            with database.write() as s:
                n = sv.import_ai_labels(s, project_for(s, pid, auth), text)
        except sv.ImportRejected as e:
            return page("error.html", request, auth, status=422, detail="No AI label was imported.", import_errors=e.errors)
        return RedirectResponse(f"/admin/p/{pid}?msg=ai-labels&n={n}", status_code=303)

    @app.post("/api/admin/projects/{pid}/ai")
    async def api_ai_settings(request: Request, pid: int, auth: Annotated[Auth, Depends(csrf_auth_json)]) -> dict:
        admin(auth)
        body = await _json_body(request)
        with database.write() as s:
            p = project_for(s, pid, auth)
            got = sv.set_ai_settings(s, p, body.get("show_ai"), body.get("threshold", "keep"))
            sv.audit(s, "ai_settings", auth.username, p.name, address(request), json.dumps(got))
            return got

    @app.post("/api/admin/projects/{pid}/ai-labels")
    async def api_ai_labels(request: Request, pid: int, auth: Annotated[Auth, Depends(csrf_auth_json)]) -> JSONResponse:
        admin(auth)
        raw = await request.body()
        if len(raw) > MAX_UPLOAD:
            raise HTTPError(413, "file too large")
        from starlette.concurrency import run_in_threadpool

        def work() -> JSONResponse:
            with database.write() as s:
                return JSONResponse({"imported": sv.import_ai_labels(s, project_for(s, pid, auth), _utf8(raw))}, status_code=201)

        return await run_in_threadpool(work)

    @app.post("/admin/p/{pid}/members")
    def admin_members(request: Request, pid: int, auth: Annotated[Auth, Depends(csrf_auth)],
                      username: Annotated[str, Form()]) -> Response:
        admin(auth)
        with database.write() as s:
            p = project_for(s, pid, auth)
            sv.add_member(s, p, sv.get_user(s, username))
            sv.audit(s, "add_member", auth.username, username, address(request), f"project {p.name}")
        return RedirectResponse(f"/admin/p/{pid}?msg=member", status_code=303)

    @app.post("/admin/p/{pid}/members/{uid}/remove")
    def admin_remove_member(request: Request, pid: int, uid: int, auth: Annotated[Auth, Depends(csrf_auth)]) -> Response:
        admin(auth)
        with database.write() as s:
            p, u = project_for(s, pid, auth), user_for(s, uid)
            sv.remove_member(s, p, u)
            sv.audit(s, "remove_member", auth.username, u.username, address(request), f"project {p.name}")
        return RedirectResponse(f"/admin/p/{pid}?msg=removed", status_code=303)

    @app.post("/admin/users/{uid}/{action}")
    def admin_user_action(request: Request, uid: int, action: str, auth: Annotated[Auth, Depends(csrf_auth)],
                          password: Annotated[str, Form()] = "") -> Response:
        """deactivate (and end the sessions), reset-password (and end the sessions), end-sessions."""
        admin(auth)
        if action not in USER_ACTIONS:
            raise HTTPError(404, "no such action")
        with database.write() as s:
            u, detail = user_for(s, uid), None
            if action == "deactivate":
                sv.deactivate_user(s, u, auth.username)
            elif action == "reset-password":
                sv.reset_password(s, u, password)
            else:
                detail = f"{end_sessions(s, u)} sessions"
            sv.audit(s, USER_ACTIONS[action], auth.username, u.username, address(request), detail)
        return RedirectResponse(f"/admin?msg={action}", status_code=303)

    def user_for(s, uid: int) -> User:  # noqa: ANN001
        u = s.get(User, uid)
        if u is None:
            raise HTTPError(404, "no such user")
        return u

    @app.get("/admin/audit", response_class=HTMLResponse)
    def admin_audit(request: Request, auth: Annotated[Auth, Depends(current)], user: str | None = None) -> HTMLResponse:
        admin(auth)
        with database.read() as s:
            return page("admin_audit.html", request, auth, events=sv.audit_events(s, 500, user), user=user, message=None)

    @app.get("/api/admin/audit")
    def api_audit(auth: Annotated[Auth, Depends(current)], user: str | None = None, limit: int = 200) -> dict:
        admin(auth)
        with database.read() as s:
            return {"events": sv.audit_events(s, max(1, min(limit, 5000)), user)}

    @app.post("/admin/users")
    def admin_create_user(
        request: Request,
        auth: Annotated[Auth, Depends(csrf_auth)],
        username: Annotated[str, Form()],
        password: Annotated[str, Form()],
        role: Annotated[str, Form()] = "annotator",
        project_id: Annotated[str | None, Form()] = None,
    ) -> Response:
        admin(auth)
        with database.write() as s:
            u = sv.create_user(s, username, password, role)
            sv.audit(s, "create_user", auth.username, u.username, address(request), role)
            if project_id:
                sv.add_member(s, project_for(s, sv.as_int("project_id", project_id, 1), auth), u)
        return RedirectResponse("/admin?msg=user", status_code=303)

    @app.get("/admin/p/{pid}/export")
    def admin_export(pid: int, auth: Annotated[Auth, Depends(current)], policy: str = "majority", raw: bool = False,
                     include_gold: bool = False) -> Response:
        admin(auth)
        with database.read() as s:
            p = project_for(s, pid, auth)
            recs = sv.export_raw(s, p) if raw else sv.export_preferences(s, p, policy, include_gold)
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        fname = f"{_slug(p.name)}-{'raw' if raw else policy}.jsonl"
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{fname}"'})

    # ------------------------------------------------------------ admin API

    @app.get("/api/admin/projects/{pid}/stats")
    def api_stats(pid: int, auth: Annotated[Auth, Depends(current)]) -> dict:
        admin(auth)
        with database.read() as s:
            return sv.project_stats(s, project_for(s, pid, auth))

    @app.get("/api/admin/projects/{pid}/export")
    def api_export(pid: int, auth: Annotated[Auth, Depends(current)], policy: str = "majority", include_gold: bool = False) -> dict:
        admin(auth)
        with database.read() as s:
            return {"records": sv.export_preferences(s, project_for(s, pid, auth), policy, include_gold)}

    @app.get("/api/admin/projects/{pid}/judgments")
    def api_raw(pid: int, auth: Annotated[Auth, Depends(current)]) -> dict:
        admin(auth)
        with database.read() as s:
            return {"judgments": sv.export_raw(s, project_for(s, pid, auth))}

    @app.get("/api/admin/projects")
    def api_admin_projects(auth: Annotated[Auth, Depends(current)]) -> dict:
        admin(auth)
        with database.read() as s:
            return {"projects": [_project_json(p) for p in s.scalars(select(Project).order_by(Project.id))]}

    @app.post("/api/admin/projects")
    async def api_create_project(request: Request, auth: Annotated[Auth, Depends(csrf_auth_json)]) -> JSONResponse:
        admin(auth)
        body = await _json_body(request)
        from starlette.concurrency import run_in_threadpool

        def work() -> JSONResponse:
            tasks = body.get("tasks") or ""
            if not isinstance(tasks, str):
                raise sv.Invalid("tasks must be a string: the task file's jsonl text")
            kind = body.get("kind", "")
            parsed = sv.parse_import(kind, tasks).prepare(database.engine.dialect) if kind in sv.KINDS else tasks  # outside the write lock
            with database.write() as s:
                p = sv.create_project(s, body.get("name", ""), kind, body.get("guidelines", ""), body.get("overlap", 2))
                n = sv.import_tasks(s, p, parsed) if tasks.strip() else 0
                return JSONResponse(_project_json(p) | {"imported": n}, status_code=201)

        return await run_in_threadpool(work)

    @app.post("/api/admin/projects/{pid}/tasks")
    async def api_import(request: Request, pid: int, auth: Annotated[Auth, Depends(csrf_auth_json)]) -> JSONResponse:
        admin(auth)
        raw = await request.body()
        if len(raw) > MAX_UPLOAD:
            raise HTTPError(413, "file too large")
        from starlette.concurrency import run_in_threadpool

        def work() -> JSONResponse:
            return JSONResponse({"imported": import_into(pid, auth, _utf8(raw))}, status_code=201)

        return await run_in_threadpool(work)

    @app.post("/api/admin/users")
    async def api_create_user(request: Request, auth: Annotated[Auth, Depends(csrf_auth_json)]) -> JSONResponse:
        admin(auth)
        body = await _json_body(request)
        from starlette.concurrency import run_in_threadpool

        def work() -> JSONResponse:
            projects = body.get("projects") or []
            if not isinstance(projects, list):
                raise sv.Invalid("projects must be a list of project ids or names")
            with database.write() as s:
                u = sv.create_user(s, body.get("username", ""), body.get("password", ""), body.get("role", "annotator"))
                for pref in projects:
                    sv.add_member(s, sv.get_project(s, pref), u)
                return JSONResponse({"id": u.id, "username": u.username, "role": u.role}, status_code=201)

        return await run_in_threadpool(work)

    @app.post("/api/admin/projects/{pid}/members")
    async def api_add_member(request: Request, pid: int, auth: Annotated[Auth, Depends(csrf_auth_json)]) -> dict:
        admin(auth)
        body = await _json_body(request)
        from starlette.concurrency import run_in_threadpool

        def work() -> dict:
            with database.write() as s:
                sv.add_member(s, project_for(s, pid, auth), sv.get_user(s, body.get("username", "")))
            return {"ok": True}

        return await run_in_threadpool(work)

    def admin_token(token: str | None) -> bool:
        with database.read() as s:
            row = lookup_session(s, token)
            return row is not None and row.user.is_admin

    async def limit_for(scope) -> int:  # noqa: ANN001
        """The session is checked before an upload is accepted: only an admin's import gets the larger limit."""
        if scope["method"] in UNSAFE and IMPORT_ROUTES.fullmatch(scope["path"]):
            from starlette.concurrency import run_in_threadpool
            from starlette.requests import cookie_parser

            cookie = dict(scope["headers"]).get(b"cookie", b"").decode("latin-1")
            if await run_in_threadpool(admin_token, cookie_parser(cookie).get(COOKIE)):
                return MAX_IMPORT_BODY
        return MAX_BODY

    app.add_middleware(BodyLimit, limit_for=limit_for)  # outermost: before any other middleware reads a byte
    return app


USER_ACTIONS = {"deactivate": "deactivate_user", "reset-password": "reset_password", "end-sessions": "end_sessions"}
_MESSAGES = {
    "deactivate": "User deactivated; their sessions ended.",
    "reset-password": "Password reset; the user's sessions ended.",
    "end-sessions": "The user's sessions ended.",
    "removed": "Annotator removed from the project.",
    "saved": "Saved.",
    "dup": "That judgment was already recorded (only the first submission counts).",
    "full": "That item got all the judgments it needs while you were on it; here is the next one.",
    "created": "Project created; {n} items imported.",
    "imported": "{n} items imported.",
    "ai": "AI settings saved.",
    "ai-labels": "{n} AI labels imported.",
    "member": "Annotator added to the project.",
    "user": "User created.",
}


def address(request: Request) -> str:
    return request.client.host if request.client else "-"


def _safe_next(nxt: str | None) -> str:
    if not nxt or not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
        return "/"
    return nxt


def _slug(name: str) -> str:
    return "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in name)[:60] or "project"  # a header is latin-1


def _project_json(p: Project) -> dict:
    return {"id": p.id, "name": p.name, "kind": p.kind, "overlap": p.overlap, "guidelines": p.guidelines, "show_ai": p.show_ai,
            "ai_threshold": p.ai_threshold}


def _read_upload(f: UploadFile | None) -> str:
    if f is None:
        return ""
    data = f.file.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise HTTPError(413, "file too large")
    return _utf8(data)


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(422, "the task file must be UTF-8 jsonl") from None


async def _json_body(request: Request) -> dict:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPError(415, "send JSON")
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001
        raise HTTPError(400, "invalid JSON") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "expected a JSON object")
    return body


# silence "imported but unused" for names used only in type positions / templates
_ = (Query, token_digest)
