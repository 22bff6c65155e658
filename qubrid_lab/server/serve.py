"""``serve``: load the configured models and run the HTTP server until interrupted."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import uvicorn

from qubrid_lab.engine.registry import load_registry
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.models.catalogue import default_catalogue
from qubrid_lab.models.packed_linear import bound_kernel_caches
from qubrid_lab.server.app import create_app
from qubrid_lab.server.home import claim_home, process_alive
from qubrid_lab.server.observability import configure_logging
from qubrid_lab.settings import Settings

log = logging.getLogger("qubrid_lab")
OWNER_CHECK_SECONDS = 1.0


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _local_url(host: str, port: int) -> str:
    """The address a client on this machine reaches the server at (a wildcard bind answers on loopback)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(settings: Settings, *, allow_open: bool = False, owner_pid: int | None = None) -> None:
    """Load ``settings.models`` and serve the OpenAI-compatible API on ``settings.host:settings.port``.

    The home directory is held for this server alone (``claim_home``). With ``owner_pid`` the server stops by
    itself, as on Ctrl-C, once that process has exited (a notebook kernel that started it and died).
    """
    bound_kernel_caches()
    configure_logging(settings.log_level)
    keys = settings.load_api_keys()
    stored = _stored_keys(settings)
    if not keys and not stored and not settings.loopback_only and not allow_open:
        raise InvalidRequestError(
            f"Refusing to serve on {settings.host} with no API keys: anyone on the network could use it. "
            "Create a key with `qubrid-lab keys create --admin`, or pass --allow-open."
        )
    port = settings.port or _free_port(settings.host)
    with claim_home(settings.home, _local_url(settings.host, port), owner_pid=owner_pid):
        if owner_pid is not None:
            threading.Thread(
                target=_stop_when_gone, args=(owner_pid,), name="qubrid-lab:owner-watch", daemon=True
            ).start()
        catalogue = default_catalogue()
        if settings.catalogue_file:
            catalogue.load_file(settings.catalogue_file)
        registry = load_registry(settings, catalogue)
        app = create_app(settings, registry, catalogue=catalogue)
        base = f"http://{settings.host}:{port}/v1"
        if keys:
            log.info(
                "%d API key(s) from the key file or QUBRID_LAB_API_KEYS are accepted: they are unmetered, "
                "unlimited and not admins (hashed in memory only). `qubrid-lab keys create` makes keys with "
                "credit, limits and ownership.",
                len(keys),
            )
        if keys or stored:
            log.info("serving %s at %s; %d stored API key(s) live", ", ".join(registry.all()), base, stored)
        else:
            log.warning(
                "serving %s at %s with NO API keys: every request to this address is accepted",
                ", ".join(registry.all()),
                base,
            )
        uvicorn.run(app, host=settings.host, port=port, log_level=settings.log_level.lower())


def _stored_keys(settings: Settings) -> int:
    """Live keys in the home's database (``qubrid-lab keys create``)."""
    from qubrid_lab.storage.db import Database
    from qubrid_lab.storage.keys import KeyStore

    database = Database(settings.database_path)
    database.migrate()
    try:
        store = KeyStore(database)
        return len(store.all(include_revoked=False)) if store.any_key() else 0
    finally:
        database.close()


def _stop_when_gone(owner_pid: int) -> None:
    while process_alive(owner_pid):
        time.sleep(OWNER_CHECK_SECONDS)
    log.info("process %d, which started this server, has exited: stopping", owner_pid)
    os.kill(os.getpid(), signal.SIGTERM)
