"""Engine, sessions and migrations.

SQLite (default): WAL journal, foreign keys on, synchronous=FULL (an acknowledged commit survives a
killed server and a power cut), busy_timeout, and write transactions opened with BEGIN IMMEDIATE so
that concurrent writers queue on the database lock instead of failing with SQLITE_BUSY mid-transaction.
PostgreSQL: `postgresql://...` URLs are driven by psycopg 3.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_DB = "sqlite:///tether_label.db"
MIGRATIONS = Path(__file__).with_name("migrations")


def normalize_url(url: str | None) -> str:
    """Accept a SQLAlchemy URL, a `postgresql://` URL (-> psycopg 3) or a bare file path (-> SQLite)."""
    url = url or os.environ.get("TETHER_LABEL_DB") or DEFAULT_DB
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if "://" not in url:
        return "sqlite:///" + str(Path(url).expanduser().resolve())
    return url


class Database:
    def __init__(self, url: str | None = None, *, pool_size: int = 10, max_overflow: int = 30):
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = create_engine(
                self.url,
                connect_args={"check_same_thread": False, "timeout": 30, "isolation_level": None},
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_timeout=60,
            )
            _sqlite_setup(self.engine)
        else:
            self.engine = create_engine(
                self.url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=60, pool_pre_ping=True
            )
        # SQLite has one writer at a time. Queue this process's writers on a lock (FIFO-ish, no sleeping)
        # instead of letting them spin in SQLite's busy handler, whose back-off sleeps up to 100 ms a try;
        # busy_timeout still covers writers in other processes (the CLI).
        self._write_lock = threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(tether_write=True), expire_on_commit=False)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as s:
            yield s

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: committed when the block exits normally, rolled back on an exception."""
        with self._write_lock, self._write() as s:
            with s.begin():
                yield s

    def migrate(self) -> None:
        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        # pysqlite's own transaction handling is off (isolation_level=None); we emit BEGIN ourselves.
        if conn.get_execution_options().get("tether_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def alembic_config(engine: Engine | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
