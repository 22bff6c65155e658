"""One server per home directory: ``claim_home`` holds it while a server runs, ``home_server`` says which one.

Two servers on one home would share its SQLite database and job directories: the second would take the
first one's running job for a job whose server died, re-queue it, and train it a second time beside the
first. So ``qubrid-lab serve`` holds an exclusive lock on ``<home>/server.lock`` (released by the operating
system when the process ends, however it ends) and describes itself in ``<home>/server.json``; a notebook's
``start_server()`` reads that file to attach to the running server instead of starting a second one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from qubrid_lab.errors import ConflictError

LOCK_NAME = "server.lock"
INFO_NAME = "server.json"
STOPPING_WAIT_SECONDS = 60.0  # how long a new server waits for one that is shutting down to let go


@dataclass(frozen=True)
class HomeServer:
    """What ``<home>/server.json`` says about the server holding the home."""

    pid: int
    url: str  # http://host:port, the API root without /v1
    owner_pid: int | None = None  # the process whose exit stops the server (a notebook kernel), if any

    def alive(self) -> bool:
        return process_alive(self.pid)

    def stopping(self) -> bool:
        """True when the server's owner has exited, so the server is shutting down (or about to)."""
        return self.owner_pid is not None and not process_alive(self.owner_pid)


def home_server(home: Path) -> HomeServer | None:
    """The server that holds ``home`` now, or None when no live process does."""
    try:
        info = HomeServer(**json.loads((home / INFO_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return info if info.alive() else None


@contextmanager
def claim_home(home: Path, url: str, *, owner_pid: int | None = None) -> Iterator[HomeServer]:
    """Hold ``home`` for one server at ``url`` for the duration of the block.

    A server that is shutting down (its owner gone, or no description written yet) is waited for, up to
    ``STOPPING_WAIT_SECONDS``; a running one makes this raise ``ConflictError`` at once, naming it.
    """
    home.mkdir(parents=True, exist_ok=True)
    lock = FileLock(home / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = home_server(home)
        if holder is not None and not holder.stopping():
            raise ConflictError(
                f"Another qubrid_lab server (pid {holder.pid}, {holder.url}) already uses the home directory "
                f"{home}: two servers on one home would train the same jobs twice. Use that server, stop it, or "
                "start this one with --home <another directory> (env QUBRID_LAB_HOME).",
                param="home",
            ) from None
        _acquire_within(lock, home, STOPPING_WAIT_SECONDS)
    info = HomeServer(pid=os.getpid(), url=url, owner_pid=owner_pid)
    path = home / INFO_NAME
    try:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(info)))
        temporary.replace(path)
        yield info
    finally:
        path.unlink(missing_ok=True)
        lock.release()


def wait_until_gone(server: HomeServer, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``server``'s process to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while server.alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _acquire_within(lock: FileLock, home: Path, timeout: float) -> None:
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        holder = home_server(home)
        who = f"pid {holder.pid}, {holder.url}" if holder else "a process that has not described itself"
        raise ConflictError(
            f"The home directory {home} is still held by another qubrid_lab server ({who}) after waiting "
            f"{timeout:g} s for it to stop. Stop it, or use --home <another directory>.",
            param="home",
        ) from None


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
