"""The CLI run as a user runs it: ``python -m qubrid_lab`` in a subprocess, against the client tests' real server
(the tiny chat model behind an API key) found through its home directory."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.client.conftest import API_KEY, chat_model, client, server  # noqa: F401 (the shared fixtures)

COMMAND_SECONDS = 300  # bound for one command on a busy 2-core machine (a tiny job included); never asserted


def cli_environment(**extra: str) -> dict[str, str]:
    """This environment without a server address or key of its own, plus ``extra``."""
    environment = {
        name: value for name, value in os.environ.items() if name not in ("QUBRID_LAB_URL", "QUBRID_LAB_API_KEY")
    }
    return {**environment, "PYTHONUNBUFFERED": "1", **extra}


def run_cli(*args: object, stdin: str | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    """``qubrid-lab ARGS`` to its end: exit status, stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, "-m", "qubrid_lab", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=cli_environment(**extra_env),
        timeout=COMMAND_SECONDS,
        check=False,
    )


@pytest.fixture(scope="session")
def on_server(server) -> list[str]:  # noqa: F811 (the fixture imported above)
    """The flags after a verb that point it at the test server: its home, where it describes itself."""
    return ["--home", str(server.home)]


@pytest.fixture
def cli(on_server):
    """``cli(verb..., *args)``: the command run on the test server, with its key from the environment."""

    def run(*args: object, stdin: str | None = None) -> subprocess.CompletedProcess:
        return run_cli(*args, *on_server, stdin=stdin, QUBRID_LAB_API_KEY=API_KEY)

    return run


def assert_refused(done: subprocess.CompletedProcess, *expected: str, status: int = 1) -> str:
    """The command failed with ``error: …`` naming each of ``expected``, and no traceback; its stderr."""
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and done.stderr.count("error:") == 1, done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr
    return done.stderr


def big_dataset(folder: Path, rows: int = 300) -> Path:
    """A CSV long enough that a job on it trains for minutes (one row a step), so it is still running when a test
    interrupts it."""
    path = folder / "many_facts.csv"
    lines = ["question,answer"] + [
        f"What is fact number {n}?,Fact {n} is that {n} plus one is {n + 1}." for n in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class LiveCommand:
    """``qubrid-lab ARGS`` running in the background, its stderr collected as it comes, to be interrupted."""

    def __init__(self, *args: object, **extra_env: str):
        # SIGINT as a terminal's Ctrl-C sends it, even where this test runner was started with it ignored
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qubrid_lab", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_environment(**extra_env),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # noqa: PLW1509 (one call, no lock)
        self._stderr = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stderr.fileno(), 4096):
            self._stderr += chunk

    @property
    def stderr(self) -> str:
        return self._stderr.decode("utf-8", errors="replace")

    def wait_for(self, pattern: str, timeout: float = COMMAND_SECONDS) -> re.Match:
        """The first match of ``pattern`` in stderr, once it appears; fails if the command ends first."""
        deadline = time.monotonic() + timeout
        while not (found := re.search(pattern, self.stderr)):
            assert self.process.poll() is None, f"exited with {self.process.returncode} first:\n{self.stderr}"
            assert time.monotonic() < deadline, f"no {pattern!r} in {timeout} s:\n{self.stderr}"
            time.sleep(0.1)
        return found

    def interrupt(self) -> tuple[int, str, str]:
        """Ctrl-C: its exit status, stdout and stderr."""
        self.process.send_signal(signal.SIGINT)
        stdout = self.process.stdout.read().decode("utf-8", errors="replace")
        status = self.process.wait(timeout=COMMAND_SECONDS)
        self._reader.join(timeout=10)
        return status, stdout, self.stderr

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)
        self.process.stdout.close()
        self.process.stderr.close()
