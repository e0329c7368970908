"""ORM models. The schema is created and upgraded by the Alembic migrations in ./migrations;
a test checks that the migrations and these models agree."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

KINDS = ("compare", "rank", "rate")
ROLES = ("admin", "annotator")


def utcnow() -> datetime:
    """Naive UTC (stored as `timestamp without time zone` on every backend)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class LoginSession(Base):
    """Server-side session: the cookie holds a random token, the table its SHA-256."""

    __tablename__ = "login_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the cookie token
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    user: Mapped[User] = relationship(lazy="joined")


class AuditEvent(Base):
    """Logins, failed logins, lockouts and admin actions (who, what, to whom, from where)."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str | None] = mapped_column(String(64), nullable=True)  # username, or "cli"
    target: Mapped[str | None] = mapped_column(String(160), nullable=True)
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # compare | rank | rate
    guidelines: Mapped[str] = mapped_column(Text, default="")
    overlap: Mapped[int] = mapped_column(Integer, default=2)  # distinct annotators per item
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # AI pre-labels: shown to annotators only when the admin turns it on (hidden by default: anchoring);
    # an item whose AI label is at least this confident is auto-labelled and not given to people (None = off)
    show_ai: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    ai_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)


class Membership(Base):
    __tablename__ = "memberships"
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)


class Task(Base):
    """One item to judge: a prompt with 2 (compare), 4-7 (rank) or 1 (rate) responses."""

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("project_id", "external_id", name="uq_tasks_project_external"),
        Index("ix_tasks_next", "project_id", "is_gold", "n_claims", "id"),  # next_task's ordered walk per tier
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(255))
    group_key: Mapped[str] = mapped_column(String(255))  # id of the source line (rating/compare splits share it)
    prompt: Mapped[str] = mapped_column(Text)
    responses: Mapped[list[str]] = mapped_column(JSON)
    response_ids: Mapped[list[int]] = mapped_column(JSON)  # indices into the source line's responses
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    gold: Mapped[Any] = mapped_column(JSON, nullable=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    # judgments + live reservations; an item goes to a new annotator only while n_claims < overlap
    n_claims: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Assignment(Base):
    """A live reservation of a task for one annotator; deleted when judged or when it expires."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("task_id", "user_id", name="uq_assignments_task_user"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class Judgment(Base):
    __tablename__ = "judgments"
    __table_args__ = (
        UniqueConstraint("task_id", "user_id", name="uq_judgments_task_user"),
        Index("ix_judgments_project", "project_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # compare: {"choice": "A"|"B"|"tie"|"skip"}; rank: {"ranking": [best..worst response index]} or
    # {"skip": true}; rate: {"rating": 1..5} or {"skip": true}
    value: Mapped[dict] = mapped_column(JSON)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rationale: Mapped[str | None] = mapped_column(Text, nullable=True)
    submission_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    server_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)  # from reservation to submit
    client_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)  # as measured by the page
    gold_correct: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AILabel(Base):
    """An AI judge's label of a compare item (a suggestion, and the item's label when routing trusts it)."""

    __tablename__ = "ai_labels"
    __table_args__ = (
        UniqueConstraint("task_id", "agent", name="uq_ai_labels_task_agent"),
        Index("ix_ai_labels_project", "project_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    agent: Mapped[str] = mapped_column(String(160))  # the labeler's identity, e.g. hf:SmolLM2-135M-Instruct
    choice: Mapped[str] = mapped_column(String(8))  # A | B | tie, in the task's response order
    confidence: Mapped[float] = mapped_column(Float)  # in [0.5, 1]
    principle: Mapped[str | None] = mapped_column(String(160), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
