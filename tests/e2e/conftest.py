"""A real ``qubrid-lab serve`` process with the bundled default models, shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.smollm2 import CHAT_MODEL, model_cache_home

__all__ = ["CHAT_MODEL"]  # the e2e tests take the chat model's id from here

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
API_KEY = "qbt_e2e-test-key"
STARTUP_SECONDS = 600  # the first start on a fresh machine converts the bundled GGUF


@dataclass
class RunningServer:
    base_url: str
    api_key: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info) -> None:
        stop_server(self)  # ``with start_server(...) as server:`` stops it however the block ends


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(tmp_path: Path, *extra: str, env: dict | None = None) -> RunningServer:
    port = free_port()
    home = tmp_path / "home"
    home.mkdir(parents=True, exist_ok=True)
    cache = model_cache_home() / "models"
    cache.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():  # a restart on the same home keeps its link
        (home / "models").symlink_to(cache, target_is_directory=True)
    log_path = tmp_path / "server.log"
    environment = {k: v for k, v in os.environ.items() if k != "QUBRID_LAB_API_KEYS"}
    environment.update({"QUBRID_LAB_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env or {})})
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "qubrid_lab", "serve", "--port", str(port), *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", API_KEY, process, log_path)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"qubrid-lab serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"qubrid-lab serve did not become healthy in {STARTUP_SECONDS}s:\n{server.log()}")


def start_tiny_server(root: Path, tiny_model_dir: Path, *extra: str, env: dict | None = None) -> RunningServer:
    """A server whose only model is the tiny test model, as catalogue id ``tiny``."""
    catalogue = root / "catalogue.json"
    catalogue.write_text(
        json.dumps([{"id": "tiny", "kind": "chat", "source": f"dir:{tiny_model_dir}", "owned_by": "test"}])
    )
    return start_server(root, "--catalogue-file", str(catalogue), *(extra or ("--model", "tiny")), env=env)


def stop_server(server: RunningServer) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> RunningServer:
    """One server for the session, with an API key configured through the environment.

    Its precision is pinned (``--dtype auto`` measures, and a noisy measurement must not change what the
    tests see): float32, whose answers do not depend on what else is in the batch.
    """
    running = start_server(tmp_path_factory.mktemp("e2e"), "--dtype", "float32", env={"QUBRID_LAB_API_KEYS": API_KEY})
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120
    ) as session:
        yield session
