"""One server per home directory: the lock and the ``server.json`` description, across real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from qubrid_lab.errors import ConflictError
from qubrid_lab.server.home import INFO_NAME, claim_home, home_server


def hold_home(home, owner_pid: int | None = None) -> subprocess.Popen:
    """Another process that claims ``home`` and keeps it until its stdin closes."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from qubrid_lab.server.home import claim_home\n"
        f"with claim_home(Path({str(home)!r}), 'http://127.0.0.1:9', owner_pid={owner_pid!r}):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def finished_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_claim_describes_the_server_while_it_holds_the_home(tmp_path):
    with claim_home(tmp_path, "http://127.0.0.1:8123", owner_pid=os.getppid()) as claim:
        assert home_server(tmp_path) == claim
        assert (claim.pid, claim.url, claim.stopping()) == (os.getpid(), "http://127.0.0.1:8123", False)
    assert home_server(tmp_path) is None and not (tmp_path / INFO_NAME).exists()


def test_a_description_left_by_a_killed_server_is_ignored(tmp_path):
    (tmp_path / INFO_NAME).write_text(json.dumps({"pid": finished_pid(), "url": "http://127.0.0.1:1"}))
    assert home_server(tmp_path) is None
    with claim_home(tmp_path, "http://127.0.0.1:2") as claim:
        assert home_server(tmp_path) == claim


def test_a_home_held_by_a_running_server_is_refused_naming_it(tmp_path):
    holder = hold_home(tmp_path)
    try:
        with pytest.raises(ConflictError) as refused, claim_home(tmp_path, "http://127.0.0.1:2"):
            pass
        assert (
            f"(pid {holder.pid}, http://127.0.0.1:9) already uses the home directory {tmp_path}"
            in refused.value.message
        )
        assert refused.value.param == "home"
    finally:
        holder.communicate("")
    assert home_server(tmp_path) is None


def test_a_server_whose_owner_exited_is_waited_for(tmp_path):
    holder = hold_home(tmp_path, owner_pid=finished_pid())  # shutting down: its owner is gone
    assert home_server(tmp_path).stopping()
    released = threading.Event()

    def release() -> None:
        released.set()
        holder.communicate("")

    threading.Timer(1.0, release).start()
    with claim_home(tmp_path, "http://127.0.0.1:2") as claim:
        assert released.is_set() and home_server(tmp_path) == claim
    holder.wait()
