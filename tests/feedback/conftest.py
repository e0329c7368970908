"""Fixtures for the tether label tests: databases (SQLite and a real PostgreSQL server started here),
a live server on 127.0.0.1 in a subprocess, and the system chromium.

In CI (CI=true) a missing chromium or PostgreSQL is an error, never a skip."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN_PASSWORD = "admin-pass-123"
SCREENSHOTS = REPO / "outputs" / "screenshots"


def missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI (.ci/run installs it from Debian packages)")
    pytest.skip(f"{what} not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fast_hasher():
    """argon2id with tiny cost for test users (verification reads the cost from the hash itself)."""
    from argon2 import PasswordHasher

    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


# ---------------------------------------------------------------- PostgreSQL


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>; yields the base URL (no database)."""
    bindir = _pg_bin()
    if bindir is None:
        missing("PostgreSQL (/usr/lib/postgresql/*/bin)")
    root = Path(tempfile.mkdtemp(prefix="tether-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
                   check=True, capture_output=True)
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


_pg_counter = iter(range(1, 10_000))


def new_pg_database(base: str) -> str:
    from sqlalchemy import create_engine, text

    name = f"t{os.getpid()}_{next(_pg_counter)}"
    eng = create_engine(base + "/postgres", isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return f"{base}/{name}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'label.db'}"
    return new_pg_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def db(db_url):
    from tether.feedback.db import Database

    d = Database(db_url)
    d.migrate()
    yield d
    d.dispose()


@pytest.fixture
def sqlite_db(tmp_path):
    from tether.feedback.db import Database

    d = Database(f"sqlite:///{tmp_path / 'label.db'}")
    d.migrate()
    yield d
    d.dispose()


# ---------------------------------------------------------------- live server


class LiveServer:
    def __init__(self, db_url: str, log: Path):
        self.db_url, self.log = db_url, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> None:
        env = {**os.environ, "TETHER_LABEL_ADMIN_PASSWORD": ADMIN_PASSWORD, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tether.feedback.cli", "serve", "--db", self.db_url, "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=str(REPO), env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run, like a crash or the OOM killer."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def live_server_factory(tmp_path):
    servers: list[LiveServer] = []

    def make(db_url: str | None = None) -> LiveServer:
        srv = LiveServer(db_url or f"sqlite:///{tmp_path / 'live.db'}", tmp_path / "server.log")
        srv.start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not Path(CHROMIUM).exists():
        missing("chromium (/usr/bin/chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("playwright for Python")
    return CHROMIUM


# ---------------------------------------------------------------- helpers


class ApiClient:
    """A logged-in JSON API client (cookie + CSRF header)."""

    def __init__(self, base: str, username: str, password: str, client: httpx.Client | None = None):
        self.c = client or httpx.Client(base_url=base, timeout=30)
        r = self.c.post("/api/login", json={"username": username, "password": password})
        r.raise_for_status()
        self.csrf = r.json()["csrf_token"]

    def get(self, path: str, **kw):  # noqa: ANN003, ANN201
        return self.c.get(path, **kw)

    def post(self, path: str, **kw):  # noqa: ANN003, ANN201
        headers = {"X-CSRF-Token": self.csrf, **kw.pop("headers", {})}
        return self.c.post(path, headers=headers, **kw)
