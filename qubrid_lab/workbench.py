"""The server from a notebook: ``start_server()`` runs ``qubrid-lab serve`` in the background and returns a handle.

The server is a child process in its own process group, logging to ``<home>/logs/server-<port>.log``. It stops
with ``LabServer.stop()``, when the interpreter that started it exits, and by itself when that interpreter dies
without cleaning up (a killed notebook kernel): it is started with ``--owner-pid`` and watches that process.
Calling ``start_server()`` again (a notebook cell run twice) returns the server already running, and a second
notebook on the same home attaches to it: one server runs per home (``qubrid_lab.server.home``).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import httpx

from qubrid_lab.client import Client
from qubrid_lab.client.datasets_api import Datasets
from qubrid_lab.client.jobs_api import Jobs
from qubrid_lab.client.models_api import Models
from qubrid_lab.server.home import STOPPING_WAIT_SECONDS, HomeServer, home_server, wait_until_gone

if TYPE_CHECKING:
    import pandas

HOST = "127.0.0.1"
POLL_SECONDS = 0.25
STOP_SECONDS = 30.0  # a server still running this long after SIGTERM is killed
LOG_TAIL_LINES = 40

_started: dict[int, LabServer] = {}  # port -> server started by this interpreter
_lock = threading.RLock()  # stop() takes it too, also while a start holds it


class ServerStartError(RuntimeError):
    """The server exited or did not answer in time; the message ends with the last lines of its log."""


@dataclass(eq=False)
class LabServer:
    """A running qubrid_lab server: its address, key, clients, and (when this interpreter started it) its process.

    The platform calls of ``qubrid_lab.Client`` work on it directly: ``datasets``, ``jobs``, ``models``,
    ``usage()`` and ``compare()`` (``api_client`` is that client). ``client`` is an ``openai.OpenAI`` client for
    ``base_url``; ``http`` an ``httpx.Client`` on ``url`` with the API key set, for any other route.
    """

    url: str  # http://127.0.0.1:PORT
    api_key: str | None
    home: Path | None  # None for a server found by its port rather than by its home
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI API root: ``url + "/v1"``."""
        return f"{self.url}/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @cached_property
    def api_client(self) -> Client:
        """The ``qubrid_lab.Client`` for this server (created on first use)."""
        return Client(self.url, self.api_key or "")

    @property
    def client(self):
        """An ``openai.OpenAI`` client for this server."""
        return self.api_client.openai

    @property
    def http(self) -> httpx.Client:
        """An ``httpx.Client`` with ``base_url=url`` and the API key's Authorization header."""
        return self.api_client.http

    @property
    def datasets(self) -> Datasets:
        """Training datasets: ``upload``, ``list``, ``get``, ``delete`` (see ``qubrid_lab.Client``)."""
        return self.api_client.datasets

    @property
    def jobs(self) -> Jobs:
        """Fine-tuning jobs: ``create``, ``list``, ``get``, ``cancel``, ``pause``, ``resume``, ``events``,
        ``checkpoints``, ``follow`` (progress with an ETA) and ``wait``."""
        return self.api_client.jobs

    @property
    def models(self) -> Models:
        """Served and fine-tuned models: ``list``, ``get``, ``chat_ids``, ``fine_tuned``, ``delete``."""
        return self.api_client.models

    @property
    def usage(self) -> Callable[..., list[dict]]:
        """``usage(start_date, end_date, model=, key_name=)``: tokens and cost by day, model and key
        (``Client.usage``)."""
        return self.api_client.usage

    @property
    def compare(self) -> Callable[..., pandas.DataFrame]:
        """``compare(models, questions, **sampling)``: every model's answer to every question, greedy by default,
        in a DataFrame (``Client.compare``)."""
        return self.api_client.compare

    def health(self) -> dict:
        """The server's ``/health`` answer: status, loaded model ids, whether keys are required."""
        response = httpx.get(f"{self.url}/health", timeout=5)
        response.raise_for_status()
        return response.json()

    @property
    def served_models(self) -> list[str]:
        """Ids of the models the server serves now (fine-tuned ones included); [] when it does not answer."""
        try:
            return self.health()["models"]
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    def is_running(self) -> bool:
        """True while the server answers ``/health`` (and, if started here, its process is alive)."""
        if self.process is not None and self.process.poll() is not None:
            return False
        return _healthy(self.url)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server's log ("" when it is not known)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (gracefully: running fine-tuning jobs resume at its next start) and close the clients.

        Stopping twice is harmless; a server attached to, not started here, is left running.
        """
        api_client = self.__dict__.pop("api_client", None)
        if api_client is not None:
            api_client.close()
        if self.process is None:
            return
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait()
        with _lock:
            if _started.get(self.port) is self:
                del _started[self.port]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<LabServer {self.base_url} {state}, models {self.served_models}>"

    def _repr_html_(self) -> str:
        running = self.is_running()
        dot = "#16a34a" if running else "#9ca3af"
        models = "".join(f"<li><code>{escape(model)}</code></li>" for model in self.served_models) or "<li>none</li>"
        rows = [
            ("OpenAI base_url", f"<code>{escape(self.base_url)}</code>"),
            ("API key", "set" if self.api_key else "none (open on loopback)"),
            ("Started", "here" if self.process is not None else "elsewhere; attached to it"),
            ("Home", f"<code>{escape(str(self.home))}</code>" if self.home else "unknown"),
            ("Log", f"<code>{escape(str(self.log_path))}</code>" if self.log_path else "unknown"),
        ]
        table = "".join(
            f'<tr><td style="padding:1px 12px 1px 0;color:#6b7280">{name}</td><td>{value}</td></tr>'
            for name, value in rows
        )
        return (
            f'<div style="font-family:system-ui,sans-serif;font-size:13px">'
            f'<b><span style="color:{dot}">●</span> qubrid_lab server {"running" if running else "stopped"}'
            f'</b><table style="border-collapse:collapse;margin:4px 0">{table}</table>'
            f'Models:<ul style="margin:2px 0 0 18px;padding:0">{models}</ul></div>'
        )


def start_server(
    *,
    port: int | None = None,
    home: str | Path | None = None,
    models: list[str] | None = None,
    api_key: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    catalogue_file: str | Path | None = None,
    timeout: float = 600,
    reuse: bool = True,
) -> LabServer:
    """Start ``qubrid-lab serve`` in the background on 127.0.0.1 and wait until it answers.

    ``home`` is the data directory (default ``QUBRID_LAB_HOME`` or ``~/.qubrid_lab``); ``models`` the catalogue
    ids or model directories to load (default: the bundled chat and embedding models); ``api_key`` the key the
    server requires (default: none, or the first key configured in the environment / the home's key file);
    ``device`` and ``dtype`` as ``qubrid-lab serve`` takes them; ``catalogue_file`` a JSON or TOML catalogue of
    extra entries (remote backends among them); ``port`` None picks a free port. The first start
    converts the bundled model once, which ``timeout`` (seconds) allows for.

    One server runs per home. With ``reuse`` a running one is returned instead of starting another: the one
    this interpreter started last (on ``port``, when given) if it serves ``models``, else the server that holds
    ``home`` (started by another notebook or a shell), else a healthy server found listening on ``port``.
    A server that exits or does not answer in time raises ``ServerStartError`` with the end of its log.
    """
    from qubrid_lab.settings import Settings

    with _lock:
        if reuse:
            running = _running(port, models, api_key, home)
            if running is not None:
                return running
        settings = Settings(**({"home": Path(home).expanduser()} if home else {}))
        home_dir = settings.home.resolve()
        api_key = api_key or next(iter(settings.api_keys or sorted(settings.load_api_keys())), None)
        holder = _home_holder(home_dir)
        if holder is not None:
            return _attach(holder, home_dir, port, models, api_key, reuse, timeout)
        if port and _healthy(f"http://{HOST}:{port}"):  # its answers would pass for those of the new server
            raise ServerStartError(
                f"A server already answers on port {port}: pass reuse=True to use it, or "
                "another port (None picks a free one)."
            )
        port = port or _free_port()
        log_path = _log_path(home_dir, port)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "qubrid_lab", "serve", "--port", str(port), "--owner-pid", str(os.getpid())]
        for model in models or []:
            command += ["--model", str(model)]
        for flag, value in (("--device", device), ("--dtype", dtype), ("--catalogue-file", catalogue_file)):
            if value:
                command += [flag, str(value)]
        environment = {**os.environ, "QUBRID_LAB_HOME": str(home_dir), "PYTHONUNBUFFERED": "1"}
        if api_key:
            environment["QUBRID_LAB_API_KEYS"] = api_key
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        server = LabServer(f"http://{HOST}:{port}", api_key, home_dir, process, log_path)
        _wait_until_healthy(server, timeout)
        _started[port] = server
        return server


def _log_path(home_dir: Path, port: int) -> Path:
    """Where the server that ``start_server`` runs on ``port`` writes its log."""
    return home_dir / "logs" / f"server-{port}.log"


def _home_holder(home_dir: Path) -> HomeServer | None:
    """The live server holding ``home_dir``, after waiting for one that is shutting down; None if free."""
    holder = home_server(home_dir)
    if holder is not None and holder.stopping():
        if not wait_until_gone(holder, STOPPING_WAIT_SECONDS):
            raise ServerStartError(
                f"The server that held {home_dir} (pid {holder.pid}) was expected to stop "
                f"when the process that started it exited, but it is still running after "
                f"{STOPPING_WAIT_SECONDS:g} s. Stop it, or pass another home=."
            )
        return None
    return holder


def _attach(
    holder: HomeServer,
    home_dir: Path,
    port: int | None,
    models: list[str] | None,
    api_key: str | None,
    reuse: bool,
    timeout: float,
) -> LabServer:
    """Use the server that already holds the home (a second one there would train its jobs twice)."""
    if not reuse or (port and not holder.url.endswith(f":{port}")):
        raise ServerStartError(
            f"The server at {holder.url} (pid {holder.pid}) already uses the home directory {home_dir}, and only one "
            "server can run per home. Use it (reuse=True, no port or its port), stop it, or pass another home=."
        )
    log_path = _log_path(home_dir, int(holder.url.rsplit(":", 1)[1]))
    server = LabServer(holder.url, api_key, home_dir, log_path=log_path if log_path.is_file() else None)
    _wait_until_healthy(server, timeout, holder)
    missing = sorted(set(map(str, models or [])) - set(server.served_models))
    if missing:
        raise ServerStartError(
            f"The server at {holder.url} (pid {holder.pid}), which holds the home directory {home_dir}, does not "
            f"serve {', '.join(missing)} (it serves {', '.join(server.served_models)}). Stop it and start again with "
            "these models, or pass another home=."
        )
    return server


def _running(
    port: int | None, models: list[str] | None, api_key: str | None, home: str | Path | None
) -> LabServer | None:
    """The server a ``reuse`` start returns, or None to start a new one."""
    home_dir = Path(home).expanduser().resolve() if home else None
    for started_port, server in reversed(list(_started.items())):
        if port not in (None, started_port) or home_dir not in (None, server.home):
            continue
        if server.is_running() and set(map(str, models or [])) <= set(server.served_models):
            return server
    if port is not None and _healthy(f"http://{HOST}:{port}"):
        return LabServer(f"http://{HOST}:{port}", api_key, home_dir)
    return None


def _wait_until_healthy(server: LabServer, timeout: float, holder: HomeServer | None = None) -> None:
    """Wait for ``server`` (started here, or ``holder``'s when attaching) to answer; stop it on a timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise ServerStartError(
                f"The qubrid_lab server exited with status {server.process.returncode} before it was ready. "
                f"The end of its log ({server.log_path}):\n{server.log_tail()}"
            )
        if holder is not None and not holder.alive():
            raise ServerStartError(
                f"The qubrid_lab server at {server.url} (pid {holder.pid}) exited before it was "
                f"ready. The end of its log ({server.log_path}):\n{server.log_tail()}"
            )
        if _healthy(server.url):
            return
        time.sleep(POLL_SECONDS)
    server.stop()
    raise ServerStartError(
        f"The qubrid_lab server did not answer on {server.url} within {timeout:g} s and was stopped; pass a "
        f"larger timeout if it was still loading models. The end of its log ({server.log_path}):\n"
        f"{server.log_tail()}"
    )


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


@atexit.register
def _stop_started() -> None:
    for server in list(_started.values()):
        server.stop()
