"""Passwords (argon2id via argon2-cffi), login sessions and CSRF tokens."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from sqlalchemy import delete

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

SESSION_TTL = timedelta(hours=24)


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
    """Create a login session; returns (cookie token, row). Only the token's digest is stored.
    Expired sessions (of anyone) are purged here."""
    db_session.execute(delete(LoginSession).where(LoginSession.expires_at < utcnow()))
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


def end_sessions(db_session, user: User) -> int:  # noqa: ANN001
    """Log a user out everywhere; returns how many sessions ended."""
    return db_session.execute(delete(LoginSession).where(LoginSession.user_id == user.id)).rowcount


class LoginThrottle:
    """Failed logins per account and per client address in a sliding window, kept in process memory: the
    check must cost nothing under a flood (no database round trip, no write lock per bogus attempt), and
    `tether label serve` is one process. A restart forgets the counts; the audit log keeps the failures.
    A success clears the account's failures (not the address's)."""

    def __init__(self, per_account: int = 5, per_address: int = 20, window_s: float = 900, max_keys: int = 100_000):
        self.limits = {"account": per_account, "address": per_address}
        self.window, self.max_keys, self.clock = window_s, max_keys, time.monotonic
        self._fails: dict[tuple[str, str], deque] = {}
        self._lock = threading.Lock()

    def _keys(self, username: str, address: str) -> list[tuple[str, str]]:
        return [("account", username.lower()), ("address", address)]

    def retry_after(self, username: str, address: str) -> int:
        """Seconds until a login for this account from this address may be tried again (0: now)."""
        now, wait = self.clock(), 0.0
        with self._lock:
            for key in self._keys(username, address):
                q = self._fails.get(key)
                while q and q[0] <= now - self.window:
                    q.popleft()
                if q and len(q) >= self.limits[key[0]]:
                    wait = max(wait, q[-self.limits[key[0]]] + self.window - now)
        return int(wait) + 1 if wait > 0 else 0

    def failed(self, username: str, address: str) -> list[str]:
        """Record a failure; returns the keys that it locked ("ann", "address 10.0.0.1")."""
        now, locked = self.clock(), []
        with self._lock:
            if len(self._fails) >= self.max_keys:  # forget idle keys (bounded memory under a many-names flood)
                self._fails = {k: q for k, q in self._fails.items() if q and q[-1] > now - self.window}
            for key in self._keys(username, address):
                q = self._fails.setdefault(key, deque(maxlen=self.limits[key[0]]))
                q.append(now)
                if len(q) == self.limits[key[0]] and q[0] > now - self.window:
                    locked.append(key[1] if key[0] == "account" else f"address {key[1]}")
        return locked

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._fails.pop(("account", username.lower()), None)
