"""API keys in SQLite: only a key's SHA-256 is stored, with its name, limits, credit and what it has spent.

A key is ``qbt_`` and 43 random URL-safe characters (256 bits), so a plain SHA-256 is as hard to reverse as
the key is to guess; a slow password hash would only slow every request. The full key is shown once, by
``create``; afterwards it is known by its name and its ``prefix`` (the first characters, as ``keys list``
shows them). Every lookup reads the table, so a key created or revoked by the CLI counts at the server's
next request, with no restart.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass

from qubrid_lab.errors import ConflictError, InvalidRequestError, NotFoundError
from qubrid_lab.storage.db import Database, new_id

KEY_PREFIX = "qbt_"
SHOWN_PREFIX = 12  # characters of a key that lists and logs may show: "qbt_" and 8 random ones
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
TOUCH_EVERY_SECONDS = 60.0  # last_used_at is written at most this often per key


def new_api_key() -> str:
    """A fresh key in the platform's ``qbt_...`` form."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """Who a request is: a stored key, or (``stored`` False) one from the key file or the environment.

    ``credits`` None means unmetered; a number is the credit in USD, spent once ``spent`` reaches it.
    ``rpm``/``tpm`` None mean no limit.
    """

    id: str
    name: str
    prefix: str
    admin: bool = False
    credits: float | None = None
    spent: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    created_at: float = 0.0
    last_used_at: float | None = None
    revoked_at: float | None = None
    stored: bool = True

    @property
    def metered(self) -> bool:
        return self.credits is not None

    @property
    def credit_left(self) -> float | None:
        return None if self.credits is None else max(self.credits - self.spent, 0.0)

    @property
    def owner(self) -> str | None:
        """The owner id this key's objects carry and the scope it sees; None for an admin (sees everything)."""
        return None if self.admin else self.id

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ApiKey:
        fields = dict(row)
        del fields["hash"]
        return cls(**{**fields, "admin": bool(fields["admin"])})


def legacy_key(key: str) -> ApiKey:
    """A key from the plain-text key file or ``QUBRID_LAB_API_KEYS``: unmetered, unlimited, not an admin."""
    digest = key_hash(key)
    return ApiKey(
        id=f"file-{digest[:24]}", name=f"key-file:{key[:SHOWN_PREFIX]}", prefix=key[:SHOWN_PREFIX], stored=False
    )


class KeyStore:
    """Creates, finds, lists and revokes stored keys."""

    def __init__(self, db: Database):
        self.db = db
        self._touched: dict[str, float] = {}

    def create(
        self,
        *,
        name: str | None = None,
        credits: float | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        admin: bool = False,
    ) -> tuple[str, ApiKey]:
        """A new key and its record; the key itself is returned here only and never stored."""
        if name is not None and not NAME_PATTERN.fullmatch(name):
            raise InvalidRequestError(
                f"name: use 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a "
                f"letter or digit (got {name!r}).",
                param="name",
            )
        for field, value in (("credits", credits), ("rpm", rpm), ("tpm", tpm)):
            if value is not None and value < 0:
                raise InvalidRequestError(f"{field}: must be 0 or more (got {value}).", param=field)
        for field, value in (("rpm", rpm), ("tpm", tpm)):
            if value == 0:
                raise InvalidRequestError(
                    f"{field}: 0 would refuse every request; leave it out for no limit, or revoke the key.", param=field
                )
        key = new_api_key()
        key_id = new_id("key")
        name = name or f"key-{key_id[4:12]}"
        try:
            with self.db.transaction() as connection:
                connection.execute(
                    "INSERT INTO api_keys (id, name, prefix, hash, admin, credits, rpm, tpm, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key_id, name, key[:SHOWN_PREFIX], key_hash(key), int(admin), credits, rpm, tpm, time.time()),
                )
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"A key named '{name}' exists already; choose another --name.", param="name") from exc
        return key, self.get(key_id)

    def get(self, key_id: str) -> ApiKey:
        with self.db.connect() as connection:
            row = connection.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"No API key '{key_id}'.", param="key")
        return ApiKey.from_row(row)

    def find(self, key: str) -> ApiKey | None:
        """The live (not revoked) stored key ``key``, or None."""
        with self.db.connect() as connection:
            row = connection.execute(
                "SELECT * FROM api_keys WHERE hash = ? AND revoked_at IS NULL", (key_hash(key),)
            ).fetchone()
        return None if row is None else ApiKey.from_row(row)

    def revoked(self, key: str) -> bool:
        with self.db.connect() as connection:
            return (
                connection.execute(
                    "SELECT 1 FROM api_keys WHERE hash = ? AND revoked_at IS NOT NULL", (key_hash(key),)
                ).fetchone()
                is not None
            )

    def any_key(self) -> bool:
        """Whether any key was ever created here (revoking the last one must not open the server to everyone)."""
        with self.db.connect() as connection:
            return connection.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def all(self, include_revoked: bool = True) -> list[ApiKey]:
        query = "SELECT * FROM api_keys" + ("" if include_revoked else " WHERE revoked_at IS NULL")
        with self.db.connect() as connection:
            rows = connection.execute(query + " ORDER BY created_at, rowid").fetchall()
        return [ApiKey.from_row(row) for row in rows]

    def revoke(self, name_or_prefix: str) -> ApiKey:
        """Revoke the one live key with this name, or starting with this prefix (8 characters or more), or this
        whole key."""
        live = self.all(include_revoked=False)
        matches = [k for k in live if k.name == name_or_prefix]
        if not matches and len(name_or_prefix) > SHOWN_PREFIX:
            found = self.find(name_or_prefix)
            matches = [found] if found else []
        elif not matches and len(name_or_prefix) >= 8:
            matches = [k for k in live if k.prefix.startswith(name_or_prefix)]
        if not matches:
            raise NotFoundError(
                f"No live API key named '{name_or_prefix}' or starting with it; `qubrid-lab keys "
                "list` shows names and prefixes.",
                param="key",
            )
        if len(matches) > 1:
            names = ", ".join(k.name for k in matches)
            raise ConflictError(
                f"'{name_or_prefix}' matches several keys ({names}); revoke one by its name.", param="key"
            )
        with self.db.transaction() as connection:
            connection.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), matches[0].id))
        return self.get(matches[0].id)

    def touch_due(self, key_id: str) -> bool:
        """Whether the key's last use is to be written now (at most once a minute per key: it is a write)."""
        now = time.time()
        if now - self._touched.get(key_id, 0.0) < TOUCH_EVERY_SECONDS:
            return False
        self._touched[key_id] = now
        return True

    def touch(self, key_id: str) -> None:
        """Record that the key was used now."""
        now = time.time()
        with self.db.transaction() as connection:
            connection.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, key_id))
