"""``start_server`` as a notebook uses it: a real ``qubrid-lab serve`` child process on the tiny chat model."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import psutil
import pytest

from qubrid_lab import start_server
from qubrid_lab.workbench import ServerStartError

API_KEY = "qbt_workbench-test-key"
STARTUP_SECONDS = 300  # a busy 2-core machine; never a timing assertion
GONE_SECONDS = 60


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    running = start_server(
        home=tmp_path_factory.mktemp("workbench") / "home",
        models=[str(tiny_model_dir)],
        api_key=API_KEY,
        device="cpu",
        dtype="float32",
        timeout=STARTUP_SECONDS,
    )
    yield running
    running.stop()


def test_the_server_answers_the_openai_client_with_its_key(server, tiny_model_dir):
    assert server.base_url == server.url + "/v1" and server.url.startswith("http://127.0.0.1:")
    assert [model.id for model in server.client.models.list()] == [str(tiny_model_dir)]
    reply = server.client.chat.completions.create(
        model=str(tiny_model_dir), max_tokens=3, messages=[{"role": "user", "content": "Hello"}]
    )
    assert reply.usage.completion_tokens == 3
    assert server.http.get("/v1/models").status_code == 200
    assert httpx.get(f"{server.base_url}/models").status_code == 401  # the key is required
    assert server.log_path.parent == server.home / "logs" and "Uvicorn running" in server.log_tail()
    assert str(tiny_model_dir) in repr(server) and server.base_url in server._repr_html_()


def test_starting_again_returns_the_running_server(server, tiny_model_dir):
    assert start_server(models=[str(tiny_model_dir)]) is server
    assert start_server(port=server.port) is server
    assert start_server(home=server.home) is server


def test_stop_ends_the_process_and_can_be_repeated(tmp_path, tiny_model_dir):
    with start_server(
        home=tmp_path / "home",
        models=[str(tiny_model_dir)],
        device="cpu",
        dtype="float32",
        timeout=STARTUP_SECONDS,
        reuse=False,
    ) as server:
        assert server.is_running() and server.api_key is None
        pid = server.process.pid
    assert server.process.returncode is not None and gone(pid)
    assert not server.is_running() and server.served_models == []
    server.stop()
    assert "stopped" in repr(server)


def start_kernel(home, tiny_model_dir) -> tuple[subprocess.Popen, int, int]:
    """Another interpreter (a notebook kernel) that starts a server on ``home``: (process, port, server pid)."""
    script = (
        "import sys\n"
        "from qubrid_lab import start_server\n"
        f"server = start_server(home={str(home)!r}, models=[{str(tiny_model_dir)!r}], device='cpu',"
        f" dtype='float32', timeout={STARTUP_SECONDS})\n"
        "print(server.port, server.process.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    kernel = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    started = kernel.stdout.readline().split()
    if not started:
        kernel.kill()
        pytest.fail(kernel.stderr.read())
    port, pid = map(int, started)
    return kernel, port, pid


def test_a_server_is_attached_to_by_port_and_stops_when_its_interpreter_dies(tmp_path, tiny_model_dir):
    kernel, port, pid = start_kernel(tmp_path / "home", tiny_model_dir)
    try:
        attached = start_server(port=port)
        assert attached.process is None and attached.url == f"http://127.0.0.1:{port}"
        assert [model.id for model in attached.client.models.list()] == [str(tiny_model_dir)]
        attached.stop()  # not started here: left running
        assert attached.is_running()
    finally:
        kernel.kill()  # like a killed kernel: no atexit handler runs
        kernel.wait()
    assert wait_until(lambda: gone(pid), GONE_SECONDS), "the orphaned server kept running"


def test_one_server_per_home_a_second_notebook_attaches_to_it(tmp_path, tiny_model_dir):
    home = (tmp_path / "home").resolve()
    kernel, port, pid = start_kernel(home, tiny_model_dir)
    try:
        attached = start_server(home=home)
        assert attached.process is None and attached.port == port and attached.home == home
        assert attached.served_models == [str(tiny_model_dir)] and "attached" in attached._repr_html_()
        with pytest.raises(ServerStartError, match="only one server can run per home"):
            start_server(home=home, reuse=False)
        with pytest.raises(ServerStartError, match="does not serve no-such-model"):
            start_server(home=home, models=["no-such-model"])
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "qubrid_lab",
                "--home",
                str(home),
                "serve",
                "--port",
                "0",
                "--model",
                str(tiny_model_dir),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert second.returncode == 2, second.stderr
        assert (
            f"already uses the home directory {home}: two servers on one home would train the same jobs "
            "twice" in second.stderr
        )
        assert attached.is_running()  # the refused server changed nothing
    finally:
        kernel.kill()
        kernel.wait()
    # The home's server is going away with its kernel: a new start waits for it, then runs its own.
    with start_server(
        home=home, models=[str(tiny_model_dir)], device="cpu", dtype="float32", timeout=STARTUP_SECONDS
    ) as fresh:
        assert gone(pid) and fresh.process is not None and fresh.process.pid != pid
        assert fresh.client.models.list().data[0].id == str(tiny_model_dir)


def test_a_model_that_cannot_load_fails_with_the_end_of_the_servers_log(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ServerStartError) as error:
        start_server(home=tmp_path / "home", models=[str(missing)], timeout=STARTUP_SECONDS)
    message = str(error.value)
    assert "exited with status 2 before it was ready" in message
    assert f"'{missing}' is neither a catalogue id" in message  # the server's own words, from its log


def test_importing_the_package_stays_light_and_exports_the_helpers():
    code = (
        "import sys, qubrid_lab; light = 'torch' not in sys.modules; "
        "print(light, callable(qubrid_lab.profile_csv), callable(qubrid_lab.start_server))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'profile'"):
        import qubrid_lab

        qubrid_lab.profile  # noqa: B018
