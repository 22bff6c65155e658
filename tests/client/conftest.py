"""One real server for the client tests: the tiny chat model behind an API key, started as a notebook would."""

from __future__ import annotations

from pathlib import Path

import pytest

from qubrid_lab.client import Client

API_KEY = "qbt_client-test-key"
DATA = Path(__file__).parents[1] / "data"
QA_FACTS = DATA / "qa_facts.csv"
CHAT_FACTS = DATA / "chat_facts.jsonl"
# The tiny model trains a step in well under a second at this size.
SMALL_RUN = {"batch_size": 2, "max_seq_length": 64, "lora_rank": 4, "lora_alpha": 8, "epochs": 100}
JOB_SECONDS = 300  # bound for a tiny job on a busy 2-core machine; never a timing assertion


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    from qubrid_lab.workbench import start_server

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # server and training worker: the machine's cores are shared
        lab = start_server(
            models=[str(tiny_model_dir)],
            api_key=API_KEY,
            home=tmp_path_factory.mktemp("client-home"),
            device="cpu",
            dtype="float32",
            timeout=300,
            reuse=False,
        )
    yield lab
    lab.stop()


@pytest.fixture(scope="session")
def client(server):
    with Client(server.url, API_KEY) as api:
        yield api


@pytest.fixture(scope="session")
def chat_model(tiny_model_dir) -> str:
    """The tiny model's id on the server: the directory it was loaded from."""
    return str(tiny_model_dir)


@pytest.fixture(scope="session")
def facts_dataset(client) -> dict:
    return client.datasets.upload(QA_FACTS, "Invented facts")
