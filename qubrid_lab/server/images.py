"""The images of a chat request: read from data URLs or fetched from http(s) URLs, within the server's limits.

Fetching a URL a client names makes the server a client of whatever that URL points at, so fetching is
narrowed (see :class:`ImagePolicy`): only allowed hosts, never a private, loopback or link-local address unless
the operator listed that host, no more than ``max_image_bytes``, within ``image_fetch_timeout``, and each
redirect checked again. The connection goes to the very address that was checked (the URL's name is kept for
the Host header and TLS), so a name that resolves differently a moment later cannot slip past.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urljoin

import httpx

from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.settings import Settings

MAX_REDIRECTS = 3
ANY_PUBLIC_HOST = "*"


@dataclass(frozen=True)
class ImagePolicy:
    """What images a request may carry and which URLs the server fetches."""

    max_images: int = 8
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 25_000_000
    fetch_timeout: float = 10.0
    hosts: frozenset[str] = frozenset()  # hosts fetched; ANY_PUBLIC_HOST: every public one; empty: none

    @classmethod
    def from_settings(cls, settings: Settings) -> ImagePolicy:
        hosts = settings.image_url_hosts
        if hosts is None:  # unset: a loopback server's user fetches as themselves; a shared server fetches nothing
            hosts = [ANY_PUBLIC_HOST] if settings.loopback_only else []
        return cls(
            settings.max_images_per_request,
            settings.max_image_bytes,
            settings.max_image_pixels,
            settings.image_fetch_timeout,
            frozenset(h.lower() for h in hosts),
        )

    def listed(self, host: str) -> bool:
        """Whether the operator named ``host`` itself (which allows it even at a private address)."""
        return host.lower() in self.hosts

    def fetches(self, host: str) -> bool:
        return ANY_PUBLIC_HOST in self.hosts or self.listed(host)


def image_urls(messages: list[dict]) -> list[tuple[str, str]]:
    """Every ``image_url`` part of ``messages`` (backend shape), in order, with the request field it came from."""
    found = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") == "image_url":
                    found.append((part["image_url"]["url"], f"messages[{i}].content[{j}].image_url.url"))
    return found


def check_count(urls: list[tuple[str, str]], policy: ImagePolicy) -> None:
    if len(urls) > policy.max_images:
        raise InvalidRequestError(
            f"The messages hold {len(urls)} images; this server takes at most {policy.max_images} per request "
            "(QUBRID_LAB_MAX_IMAGES_PER_REQUEST). Send fewer images.",
            param="messages",
        )


async def load_images(messages: list[dict], policy: ImagePolicy) -> list:
    """The RGB images (PIL) of every ``image_url`` part of ``messages``, in order; a 400 naming the part for an
    image that is too large, unreadable, or at a URL this server does not fetch."""
    urls = image_urls(messages)
    check_count(urls, policy)
    images = []
    for url, field in urls:
        data = _data_url(url, field, policy) if url.startswith("data:") else await _fetch(url, field, policy)
        images.append(await asyncio.to_thread(_decode, data, field, policy))
    return images


def check_fetchable(messages: list[dict], policy: ImagePolicy) -> None:
    """For backends that read the images themselves: the count, and the same rules for URLs as when fetching
    here (a data URL is passed on as it is)."""
    urls = image_urls(messages)
    check_count(urls, policy)
    for url, field in urls:
        if not url.startswith("data:"):
            _allowed_url(url, field, policy)


def _data_url(url: str, field: str, policy: ImagePolicy) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:image/"):
        raise InvalidRequestError(
            f"{field} is a data URL without an image: expected 'data:image/<type>;base64,<data>'.", param=field
        )
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise _too_large(field, policy)
    try:
        data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{field} is not valid base64 after 'base64,'.", param=field) from None
    if len(data) > policy.max_bytes:
        raise _too_large(field, policy)
    return data


def _too_large(field: str, policy: ImagePolicy) -> InvalidRequestError:
    return InvalidRequestError(
        f"{field} is larger than this server's limit of {policy.max_bytes:,} bytes per image "
        "(QUBRID_LAB_MAX_IMAGE_BYTES). Send a smaller image.",
        param=field,
    )


def _allowed_url(url: str, field: str, policy: ImagePolicy) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise InvalidRequestError(f"{field} is not a valid URL.", param=field) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidRequestError(
            f"{field} must be an http(s) URL or a data URL (data:image/...;base64,...).", param=field
        )
    if not policy.fetches(parsed.host):
        allowed = "no hosts" if not policy.hosts else ", ".join(sorted(policy.hosts))
        raise InvalidRequestError(
            f"{field}: this server does not fetch images from '{parsed.host}' (it fetches from {allowed}; "
            "a server bound beyond loopback fetches nothing unless QUBRID_LAB_IMAGE_URL_HOSTS lists hosts). "
            "Send the image as a data URL instead.",
            param=field,
        )
    return parsed


async def _checked_addresses(url: httpx.URL, field: str, policy: ImagePolicy) -> list[str]:
    """The addresses ``url``'s host resolves to, to connect to in order; private ones only for a host the
    operator listed."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        found = await asyncio.get_running_loop().getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InvalidRequestError(f"{field}: the host '{url.host}' does not resolve.", param=field) from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in found]
    if not policy.listed(url.host) and not all(address.is_global for address in addresses):
        raise InvalidRequestError(
            f"{field}: '{url.host}' is a private, loopback or link-local address; this server fetches from such "
            "hosts only when QUBRID_LAB_IMAGE_URL_HOSTS names them.",
            param=field,
        )
    return list(dict.fromkeys(str(address) for address in addresses))


async def _fetch(url: str, field: str, policy: ImagePolicy) -> bytes:
    try:
        async with asyncio.timeout(policy.fetch_timeout), httpx.AsyncClient(follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                target = _allowed_url(url, field, policy)
                addresses = await _checked_addresses(target, field, policy)
                body, location = await _get(client, target, addresses, field, policy)
                if location is None:
                    return body
                url = urljoin(url, location)
            raise InvalidRequestError(f"{field}: the image URL redirects more than {MAX_REDIRECTS} times.", param=field)
    except TimeoutError:
        raise InvalidRequestError(
            f"{field}: fetching the image took longer than {policy.fetch_timeout:g} s "
            "(QUBRID_LAB_IMAGE_FETCH_TIMEOUT).",
            param=field,
        ) from None
    except httpx.HTTPError as exc:
        raise InvalidRequestError(f"{field}: fetching the image failed ({type(exc).__name__}).", param=field) from None


async def _get(
    client: httpx.AsyncClient, target: httpx.URL, addresses: list[str], field: str, policy: ImagePolicy
) -> tuple[bytes, str | None]:
    """GET ``target`` from the first of ``addresses`` that connects: the body, or where it redirects to."""
    for address in addresses[:-1]:
        try:
            return await _get_from(client, target, address, field, policy)
        except httpx.ConnectError:
            continue
    return await _get_from(client, target, addresses[-1], field, policy)


async def _get_from(
    client: httpx.AsyncClient, target: httpx.URL, address: str, field: str, policy: ImagePolicy
) -> tuple[bytes, str | None]:
    async with client.stream(
        "GET",
        target.copy_with(host=address),
        headers={"Host": target.netloc.decode()},
        extensions={"sni_hostname": target.host},
    ) as response:
        if response.is_redirect and "location" in response.headers:
            return b"", response.headers["location"]
        if response.status_code != 200:
            raise InvalidRequestError(f"{field}: fetching the image answered HTTP {response.status_code}.", param=field)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > policy.max_bytes:
            raise _too_large(field, policy)
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > policy.max_bytes:
                raise _too_large(field, policy)
        return bytes(body), None


def _decode(data: bytes, field: str, policy: ImagePolicy):
    """The image in ``data`` as RGB; its size is checked from the header, before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > policy.max_pixels:
            raise InvalidRequestError(
                f"{field} is {width}x{height} pixels; this server takes at most {policy.max_pixels:,} pixels per "
                "image (QUBRID_LAB_MAX_IMAGE_PIXELS). Send a smaller image.",
                param=field,
            )
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
        raise InvalidRequestError(
            f"{field} is not an image this server can read (PNG, JPEG, GIF, WebP, BMP, ...).", param=field
        ) from None
