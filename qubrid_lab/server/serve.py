"""``serve``: load the configured models and run the HTTP server until interrupted."""

from __future__ import annotations

import ipaddress
import logging
import socket

import uvicorn

from qubrid_lab.engine.registry import load_registry
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.models.catalogue import default_catalogue
from qubrid_lab.server.app import create_app
from qubrid_lab.settings import Settings

log = logging.getLogger("qubrid_lab")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def serve(settings: Settings, *, allow_open: bool = False) -> None:
    """Load ``settings.models`` and serve the OpenAI-compatible API on ``settings.host:settings.port``."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = settings.load_api_keys()
    if not keys and not _is_loopback(settings.host) and not allow_open:
        raise InvalidRequestError(
            f"Refusing to serve on {settings.host} with no API keys: anyone on the network could use it. "
            "Create a key with `qubrid-lab keys create`, or pass --allow-open.")
    settings.home.mkdir(parents=True, exist_ok=True)
    catalogue = default_catalogue()
    if settings.catalogue_file:
        catalogue.load_file(settings.catalogue_file)
    registry = load_registry(settings, catalogue)
    port = settings.port or _free_port(settings.host)
    app = create_app(settings, registry, catalogue=catalogue)
    base = f"http://{settings.host}:{port}/v1"
    if keys:
        log.info("serving %s at %s; %d API key(s) accepted", ", ".join(registry.all()), base, len(keys))
    else:
        log.warning("serving %s at %s with NO API keys: every request to this address is accepted",
                    ", ".join(registry.all()), base)
    uvicorn.run(app, host=settings.host, port=port, log_level=settings.log_level.lower())
