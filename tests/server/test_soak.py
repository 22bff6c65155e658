"""A bounded soak: 64 concurrent streaming clients against a real ``qubrid-lab serve`` (the tiny model) for a few
minutes, a third of them hanging up mid-stream. No request may fail; the server's memory may grow by less than
5% between minute 2 and the end, its open file descriptors not at all (counted idle, before and after), and
its running batch must be back to 0 once the clients stop.

``QUBRID_LAB_SOAK_BUNDLED=1`` soaks the bundled SmolLM2 instead (as ``docs/reliability.md`` records).
``QUBRID_LAB_SOAK_SECONDS`` lengthens it (default 170: the peak up to minute 2 is the baseline, the peak of the
last 30 s is compared with it).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import psutil
import pytest

from qubrid_lab.storage.db import IDLE_CONNECTIONS
from tests.e2e.conftest import start_tiny_server, stop_server
from tests.smollm2 import CHAT_MODEL

CLIENTS = 64
SECONDS = float(os.environ.get("QUBRID_LAB_SOAK_SECONDS", "170"))
BASELINE_AT = 120.0 if SECONDS >= 150 else SECONDS / 2
KEY = "qbt_soak-test-key"
BUNDLED = os.environ.get("QUBRID_LAB_SOAK_BUNDLED") == "1"
MODEL = CHAT_MODEL if BUNDLED else "tiny"


@pytest.fixture(scope="module")
def soaked(tmp_path_factory, tiny_model_dir):
    models = ["--model", CHAT_MODEL, "--dtype", "float32"] if BUNDLED else ["--model", "tiny"]
    server = start_tiny_server(
        tmp_path_factory.mktemp("soak"),
        tiny_model_dir,
        *models,
        "--max-batch-size",
        "32",
        env={"QUBRID_LAB_API_KEYS": KEY},
    )
    yield server
    stop_server(server)


async def one_stream(client: httpx.AsyncClient, hang_up: bool, rng: random.Random) -> str:
    """'done' for a stream that ended with [DONE], 'left' for one we hung up on, else what went wrong."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Tell me {rng.randint(0, 999)} things"}],
        "max_tokens": rng.randint(8, 48),
        "temperature": 0.8,
        "stream": True,
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return f"status {response.status_code}: {(await response.aread())[:300]!r}"
        chunks = 0
        async for line in response.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                return "done"
            if "error" in json.loads(line.removeprefix("data: ")):
                return f"error chunk: {line[:300]}"
            chunks += 1
            if hang_up and chunks >= 3:
                return "left"
    return "ended without [DONE]"


async def run_clients(base_url: str, until: float, outcomes: dict) -> None:
    async def client_loop(index: int) -> None:
        rng = random.Random(index)
        async with httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        ) as client:
            while time.monotonic() < until:
                try:
                    outcome = await one_stream(client, hang_up=index % 3 == 0, rng=rng)
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    await asyncio.gather(*(client_loop(i) for i in range(CLIENTS)))


def idle_fds(process: psutil.Process, health: httpx.Client) -> int:
    """Open descriptors once the server is idle and has closed the soak's kept-alive connections (uvicorn drops
    them after 5 s): the same count three times in a row, 2 s apart. ``health`` keeps one connection open
    throughout, so it counts the same before and after."""
    previous, stable, deadline = None, 0, time.monotonic() + 90
    while True:
        active = health.get("/health").json()["active_sequences"][MODEL]
        count = process.num_fds()
        stable = stable + 1 if not active and count == previous else 0
        if stable >= 3 or time.monotonic() > deadline:
            return count
        previous = count
        time.sleep(2)


def test_64_streams_for_minutes_fail_nothing_and_leak_nothing(soaked):
    server = soaked
    process = psutil.Process(server.process.pid)
    health = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    warm: dict = {}
    asyncio.run(run_clients(server.base_url, time.monotonic() + 10, warm))  # warm-up: every code path once
    fds_before = idle_fds(process, health)

    outcomes: dict = {}
    samples: list[tuple[float, int]] = []
    started = time.monotonic()

    async def soak() -> None:
        async def sample() -> None:
            while time.monotonic() - started < SECONDS:
                samples.append((time.monotonic() - started, process.memory_info().rss))
                await asyncio.sleep(5)

        await asyncio.gather(run_clients(server.base_url, started + SECONDS, outcomes), sample())

    asyncio.run(soak())
    fds_after = idle_fds(process, health)
    health.close()

    failures = {outcome: count for outcome, count in outcomes.items() if outcome not in ("done", "left")}
    assert not failures and not {o for o in warm if o not in ("done", "left")}, failures
    assert outcomes.get("done", 0) > CLIENTS and outcomes.get("left", 0) > CLIENTS // 3, outcomes
    baseline = max(rss for at, rss in samples if at <= BASELINE_AT)
    final = max(rss for at, rss in samples if at >= SECONDS - 30)
    growth = final / baseline - 1
    timeline = ", ".join(f"{at:.0f}s {rss / 2**20:.0f}" for at, rss in samples[::6])
    print(f"\nRSS MiB over time: {timeline}")
    print(
        f"\nsoak {MODEL}, {SECONDS:.0f}s, {CLIENTS} clients: {outcomes}; RSS {baseline / 2**20:.0f} MiB at "
        f"{BASELINE_AT:.0f}s -> {final / 2**20:.0f} MiB at the end ({growth:+.1%}); fds {fds_before} -> {fds_after}"
    )
    assert growth < 0.05, f"resident memory grew {growth:.1%} after minute {BASELINE_AT / 60:.1f}"
    # The SQLite pool may keep up to IDLE_CONNECTIONS connections idle (database, WAL and shm files each),
    # fewer before the load than after it; a leak would grow with the thousands of requests.
    assert fds_after <= fds_before + 3 * IDLE_CONNECTIONS, (fds_before, fds_after)
