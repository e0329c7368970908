"""Passwords (argon2id via argon2-cffi), login sessions and CSRF tokens."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from tether.feedback.models import LoginSession, User, utcnow

# argon2-cffi's default is RFC 9106's low-memory profile (argon2id, 64 MiB, t=3, p=4).
_hasher = PasswordHasher()
# Each hash takes 64 MiB: at most this many at once, so a burst of logins cannot exhaust a small server.
_hash_slots = threading.BoundedSemaphore(2)
# Logins hash in their own two threads, never in the server's shared worker pool, so a flood of bogus logins
# cannot take the threads every other route needs; at most HASH_QUEUE logins wait or run, the rest get 503.
_hash_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tether-hash")
HASH_QUEUE = 64
_hash_queued = 0
# A hash of a random password, verified against when the user does not exist (same timing either way).
_DUMMY = None

SESSION_TTL = timedelta(days=7)


def hash_password(password: str, hasher: PasswordHasher | None = None) -> str:
    if len(password) < 8:
        raise ValueError("password must have at least 8 characters")
    with _hash_slots:
        return (hasher or _hasher).hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    global _DUMMY
    with _hash_slots:
        if stored_hash is None:
            if _DUMMY is None:
                _DUMMY = _hasher.hash(secrets.token_hex(16))
            stored_hash = _DUMMY
            password = password + "\0never"
        try:
            return _hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


class HashQueueFull(Exception):
    pass


async def run_hashing(fn, *args):  # noqa: ANN001, ANN002, ANN201
    """Run fn(*args) (a login: a password check and its database work) in the dedicated hashing threads."""
    global _hash_queued
    if _hash_queued >= HASH_QUEUE:
        raise HashQueueFull()
    _hash_queued += 1  # only touched from the event loop's thread
    try:
        return await asyncio.wrap_future(_hash_pool.submit(fn, *args))
    finally:
        _hash_queued -= 1


def new_password() -> str:
    return secrets.token_urlsafe(12)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(db_session, user: User) -> tuple[str, LoginSession]:  # noqa: ANN001
    """Create a login session; returns (cookie token, row). Only the token's digest is stored."""
    token = secrets.token_urlsafe(32)
    row = LoginSession(
        id=token_digest(token), user_id=user.id, csrf_token=secrets.token_urlsafe(32), expires_at=utcnow() + SESSION_TTL
    )
    db_session.add(row)
    return token, row


def lookup_session(db_session, token: str | None) -> LoginSession | None:  # noqa: ANN001
    if not token or len(token) > 128:
        return None
    row = db_session.get(LoginSession, token_digest(token))
    if row is None or row.expires_at < utcnow() or not row.user.active:
        return None
    return row


def tokens_equal(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))
