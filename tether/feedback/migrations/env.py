"""Alembic environment for tether.feedback. Used programmatically by `tether.feedback.db.upgrade`
(which passes a live connection), or by the alembic CLI with `-x url=...`."""

from alembic import context
from sqlalchemy import create_engine

from tether.feedback.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        _run(conn)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    from tether.feedback.db import normalize_url

    engine = create_engine(normalize_url(url))
    with engine.begin() as c:
        _run(c)


def _run(conn) -> None:  # noqa: ANN001
    context.configure(
        connection=conn,
        target_metadata=target_metadata,
        render_as_batch=conn.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; pass a database URL")
run_migrations_online()
