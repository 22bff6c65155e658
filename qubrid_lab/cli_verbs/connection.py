"""Which server the API verbs talk to: ``--url``, else ``$QUBRID_LAB_URL``, else the server holding the home.

The server that ``qubrid-lab serve`` (or a notebook's ``start_server()``) runs describes itself in
``<home>/server.json`` (``qubrid_lab.server.home``); the CLI reads the same file, so inside a home no flag is
needed. The key is ``--api-key``, else ``$QUBRID_LAB_API_KEY``, else (for the home's own server only, never one
named by URL) the first key the home configures, as ``start_server()`` picks it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from qubrid_lab.client.api_client import KEY_VARIABLE, URL_VARIABLE
from qubrid_lab.client.api_errors import ServerUnavailableError

if TYPE_CHECKING:
    from qubrid_lab.client import Client
    from qubrid_lab.settings import Settings

URL_HELP = f"the server's address (env {URL_VARIABLE}; default: the server running for the home)"
KEY_HELP = f"the server's API key (env {KEY_VARIABLE})"


def add_connection_flags(parser: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """``--url`` and ``--api-key``; a verb's parser takes them with ``SUPPRESS`` so values given before the verb
    are kept."""
    parser.add_argument("--url", default=default, help=URL_HELP)
    parser.add_argument("--api-key", default=default, help=KEY_HELP)


def connect(args: argparse.Namespace) -> Client:
    """The ``Client`` for the server the flags, the environment or the home name; a clear error if none runs."""
    from qubrid_lab.client import Client

    url = getattr(args, "url", None) or os.environ.get(URL_VARIABLE)
    api_key = getattr(args, "api_key", None)
    if api_key is None:
        api_key = os.environ.get(KEY_VARIABLE)
    if url is None:
        url, home_key = _home_server(getattr(args, "home", None))
        api_key = api_key if api_key is not None else home_key
    return Client(url, api_key or "")


def home_settings(home: Path | None) -> Settings:
    """The settings of ``home`` (``--home``; default ``$QUBRID_LAB_HOME``, else ``~/.qubrid_lab``)."""
    from qubrid_lab.settings import Settings

    return Settings(**({"home": home} if home else {}))


def _home_server(home: Path | None) -> tuple[str, str | None]:
    """The URL of the server holding ``home`` (default: the settings' home) and the first key the home configures."""
    from qubrid_lab.server.home import home_server

    settings = home_settings(home)
    holder = home_server(settings.home.expanduser().resolve())
    if holder is None:
        raise ServerUnavailableError(
            f"no qubrid_lab server is running for the home {settings.home}: start one with `qubrid-lab serve` "
            f"(in another terminal), or pass --url (env {URL_VARIABLE}) to use one elsewhere"
        )
    return holder.url, next(iter(settings.api_keys or sorted(settings.load_api_keys())), None)
