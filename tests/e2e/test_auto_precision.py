"""``--dtype auto`` on a real server: measured on the first start, reused from the home's cache after."""

from __future__ import annotations

import json

import httpx
import pytest

from qubrid_lab.engine.auto_precision import CACHE_FILE, fastest_passing
from tests.e2e.conftest import CHAT_MODEL, start_server, stop_server
from tests.smollm2 import smollm2_checkpoint

pytestmark = pytest.mark.e2e


def served_precision(server) -> dict:
    return httpx.get(f"{server.base_url}/health").json()["precision"][CHAT_MODEL]


def test_auto_measures_once_then_reuses_its_pick(tmp_path, checked_answers):
    models = tmp_path / "home" / "models"  # a model cache with the checkpoint but no earlier measurement
    models.mkdir(parents=True)
    checkpoint = smollm2_checkpoint()
    (models / checkpoint.name).symlink_to(checkpoint, target_is_directory=True)

    server = start_server(tmp_path, "--dtype", "auto", "--model", CHAT_MODEL)
    try:
        first = served_precision(server)
        capital = checked_answers["chat"]
        reply = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            timeout=120,
            json={"model": CHAT_MODEL, "messages": list(capital.messages), "temperature": 0, "max_tokens": 20},
        ).json()
        assert capital.expected in reply["choices"][0]["message"]["content"]
    finally:
        stop_server(server)
    assert first["how"] == "measured"
    candidates = first["candidates"]
    assert set(candidates) == {"float32", "bfloat16", "w8a16", "w4a16", "w4a32", "int8"}
    assert candidates["float32"]["passes"] and candidates["float32"]["mean_kl"] < 1e-4
    for figures in candidates.values():
        assert ("decode_ms" in figures) == ("prefill_ms" in figures) == figures["passes"]  # only passing paths timed
    assert candidates[first["dtype"]]["passes"]
    assert first["dtype"] == fastest_passing(candidates, "float32")
    assert "dtype auto: measuring" in server.log() and f"in {first['dtype']} (measured" in server.log()
    cached = json.loads((models / CACHE_FILE).read_text())
    assert [entry["dtype"] for entry in cached.values()] == [first["dtype"]]

    again = start_server(tmp_path, "--dtype", "auto", "--model", CHAT_MODEL)
    try:
        second = served_precision(again)
    finally:
        stop_server(again)
    assert second == {**first, "how": "cached"}
    assert "dtype auto: measuring" not in again.log()
