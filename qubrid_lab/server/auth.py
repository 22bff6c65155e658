"""Bearer API keys: who a request is, what it may see, and its requests-per-minute count.

Keys come from the database (``qubrid-lab keys create``: hashed, with credit, limits and an admin flag) and,
for existing setups, from the plain-text key file and ``QUBRID_LAB_API_KEYS`` (hashed in memory here;
unmetered, unlimited, not admins). With no key configured anywhere the server is open, as a single user's
loopback server is, and every request acts as the admin.

``request.state.key`` holds the request's :class:`ApiKey` (None on an open server). What a key may see is
its ``scope``: its own objects (its id), or everyone's (None) for an admin or an open server.
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from qubrid_lab.errors import AuthenticationError, PermissionDeniedError
from qubrid_lab.storage.keys import ApiKey, KeyStore, key_hash, legacy_key, new_api_key

__all__ = ["BearerAuth", "key_of", "new_api_key", "owner_of", "require_admin", "scope_of"]

MAX_KEY_LENGTH = 256  # longer bearer tokens are refused before hashing


class BearerAuth:
    """A FastAPI dependency that resolves the bearer key, refusing unknown and revoked ones."""

    def __init__(self, store: KeyStore, legacy_keys: set[str], meter=None):
        self.store = store
        self.legacy = {key_hash(key): legacy_key(key) for key in legacy_keys}
        self.meter = meter

    @property
    def enabled(self) -> bool:
        """Whether keys are required: any key in the file or environment, or any stored key, even revoked."""
        return bool(self.legacy) or self.store.any_key()

    async def __call__(self, request: Request) -> ApiKey | None:
        key = self.resolve(request.headers.get("authorization", ""))
        request.state.key = key
        if key is not None:
            if key.stored and self.store.touch_due(key.id):  # a write: off the event loop, not awaited
                asyncio.get_running_loop().run_in_executor(None, self.store.touch, key.id)
            if self.meter is not None:
                self.meter.count_request(key)
        return key

    def resolve(self, header: str) -> ApiKey | None:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            if not self.enabled:
                return None
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer qbt_...'.", headers={"WWW-Authenticate": "Bearer"}
            )
        if len(token) > MAX_KEY_LENGTH:
            raise AuthenticationError("Invalid API key.", headers={"WWW-Authenticate": "Bearer"})
        key = self.legacy.get(key_hash(token)) or self.store.find(token)
        if key is not None:
            return key
        if not self.enabled:
            return None  # an open server ignores whatever token a client sends anyway
        if self.store.revoked(token):
            raise AuthenticationError(
                "This API key has been revoked; ask an admin for a new one.", headers={"WWW-Authenticate": "Bearer"}
            )
        raise AuthenticationError("Invalid API key.", headers={"WWW-Authenticate": "Bearer"})


def key_of(request: Request) -> ApiKey | None:
    return getattr(request.state, "key", None)


def scope_of(request: Request) -> str | None:
    """The owner id whose objects this request sees; None: everyone's (an admin, or an open server)."""
    key = key_of(request)
    return None if key is None or key.admin else key.id


def owner_of(request: Request) -> str | None:
    """The owner id objects this request creates carry (None on an open server: the admin's, once keys exist)."""
    key = key_of(request)
    return None if key is None else key.id


def require_admin(request: Request, what: str) -> None:
    key = key_of(request)
    if key is not None and not key.admin:
        raise PermissionDeniedError(f"{what} needs an admin key; API key '{key.name}' is not one.")
