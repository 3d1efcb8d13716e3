"""API keys of the service: :class:`KeyStore`, a small SQLite table beside the ledger.

Owns creating, verifying, listing and revoking keys, and per-key quotas. The file is
``<index>/service-keys.sqlite``; the ledger's own database is never touched.

* A token is ``dprdm_`` + ``secrets.token_urlsafe(32)`` (256 random bits). It is shown once, at
  creation; only its SHA-256 is stored, so the file does not let anyone call the service.
* A quota counts the PRIVATE queries a key may make (public-only requests cost none). It is
  charged in one conditional ``UPDATE`` (``used + n <= quota``), atomic across threads and
  processes, before the ledger is charged; it is refunded only when the ledger refuses.
* Revoked keys stay in the table (name, dates, usage) and are refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

from dprdm.errors import InvalidParameterError, NotFoundError
from dprdm.files import durable_sqlite

KEYS_FILENAME = "service-keys.sqlite"
TOKEN_PREFIX = "dprdm_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class KeyInfo:
    """What is known about a key; never its token or hash."""

    name: str
    created: str
    revoked: str | None
    quota: int | None
    used: int

    @property
    def quota_remaining(self) -> int | None:
        return None if self.quota is None else max(0, self.quota - self.used)

    def as_dict(self) -> dict:
        return dict(asdict(self), quota_remaining=self.quota_remaining)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidParameterError(
            "a key name is 1-64 characters: letters, digits, '_', '.', '-' (not first)")
    return name


class KeyStore:
    """The API keys of one index directory (created on first use)."""

    def __init__(self, index_dir: str | os.PathLike, *, busy_timeout_s: float = 30.0) -> None:
        index_dir = Path(index_dir)
        if not index_dir.is_dir():
            raise NotFoundError(f"{index_dir} is not a directory")
        self.path = index_dir / KEYS_FILENAME
        self._busy_timeout_s = busy_timeout_s
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS keys ("
                " name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE,"
                " created TEXT NOT NULL, revoked TEXT,"
                " quota INTEGER CHECK (quota IS NULL OR quota >= 0),"
                " used INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0))"
            )

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return durable_sqlite(self.path, self._busy_timeout_s)

    @staticmethod
    def _info(row: tuple) -> KeyInfo:
        name, created, revoked, quota, used = row
        return KeyInfo(name, created, revoked, None if quota is None else int(quota), int(used))

    _COLUMNS = "name, created, revoked, quota, used"

    def create(self, name: str, quota: int | None = None) -> tuple[str, KeyInfo]:
        """A new key: (token, info). The token is returned only here; store it safely."""
        name = check_name(name)
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int)
                                  or quota < 0):
            raise InvalidParameterError("quota must be a whole number >= 0 (or none)")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            with self._connect() as conn:
                conn.execute(
                    "INSERT INTO keys (name, token_sha256, created, quota) VALUES (?, ?, ?, ?)",
                    (name, hash_token(token), _now(), quota),
                )
        except sqlite3.IntegrityError:
            raise InvalidParameterError(f"a key named {name!r} already exists") from None
        return token, self.get(name)

    def get(self, name: str) -> KeyInfo:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {self._COLUMNS} FROM keys WHERE name = ?",
                               (name,)).fetchone()
        if row is None:
            raise InvalidParameterError(f"no key named {name!r}")
        return self._info(row)

    def list(self) -> list[KeyInfo]:
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {self._COLUMNS} FROM keys ORDER BY created, name")
            return [self._info(row) for row in rows.fetchall()]

    def verify(self, token: object) -> KeyInfo | None:
        """The key a bearer token belongs to, or None (unknown, malformed or revoked)."""
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = hash_token(token)
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT {self._COLUMNS}, token_sha256 FROM keys WHERE token_sha256 = ?",
                (digest,),
            ).fetchone()
        if row is None or not hmac.compare_digest(row[-1], digest) or row[2] is not None:
            return None
        return self._info(row[:-1])

    def revoke(self, name: str) -> KeyInfo:
        check_name(name)
        with self._connect() as conn:
            conn.execute("UPDATE keys SET revoked = ? WHERE name = ? AND revoked IS NULL",
                         (_now(), name))
        return self.get(name)

    def charge_quota(self, name: str, count: int = 1) -> bool:
        """Take `count` queries from the key's quota; False (nothing taken) if they do not fit
        or the key is revoked. One conditional UPDATE: atomic across processes."""
        with self._connect() as conn:
            cursor = conn.execute(
                "UPDATE keys SET used = used + ? WHERE name = ? AND revoked IS NULL "
                "AND (quota IS NULL OR used + ? <= quota)",
                (count, name, count),
            )
            return cursor.rowcount == 1

    def refund_quota(self, name: str, count: int = 1) -> None:
        """Give back queries whose private release was refused (nothing was released)."""
        with self._connect() as conn:
            conn.execute("UPDATE keys SET used = MAX(0, used - ?) WHERE name = ?", (count, name))
