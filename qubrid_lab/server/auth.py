"""Bearer API keys. With no keys configured the server is open (and binds to loopback by default)."""

from __future__ import annotations

import hmac
import secrets

from fastapi import Request

from qubrid_lab.errors import AuthenticationError

KEY_PREFIX = "qbt_"


def new_api_key() -> str:
    """A fresh key in the platform's ``qbt_...`` form."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class BearerAuth:
    """A FastAPI dependency that accepts a request only with one of the configured keys."""

    def __init__(self, keys: set[str]):
        self.keys = [key.encode() for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    async def __call__(self, request: Request) -> str | None:
        if not self.keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer qbt_...'.", headers={"WWW-Authenticate": "Bearer"})
        candidate = token.strip().encode()
        if not any(hmac.compare_digest(candidate, key) for key in self.keys):
            raise AuthenticationError("Invalid API key.", headers={"WWW-Authenticate": "Bearer"})
        return token.strip()
