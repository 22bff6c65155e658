"""One real server for the widget tests: the tiny chat model plus the bundled embedding model (which the
widgets must leave out of their chat-model lists), started with ``qubrid_lab.start_server`` as a notebook would."""

from __future__ import annotations

from pathlib import Path

import pytest

from qubrid_lab.settings import DEFAULT_EMBEDDING_MODEL

API_KEY = "qbt_widgets-test-key"
DATA = Path(__file__).parents[1] / "data"
QA_FACTS = DATA / "qa_facts.csv"
TEXT_NOTES = DATA / "text_notes.csv"
# The tiny model trains a step in well under a second at this size.
SMALL_RUN = {"batch_size": 2, "max_seq_length": 64, "lora_rank": 4, "lora_alpha": 8, "epochs": 100}


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    from qubrid_lab.workbench import start_server

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # server and training worker: the machine's cores are shared
        lab = start_server(
            models=[str(tiny_model_dir), DEFAULT_EMBEDDING_MODEL],
            api_key=API_KEY,
            home=tmp_path_factory.mktemp("widgets-home"),
            device="cpu",
            dtype="float32",
            timeout=300,
            reuse=False,
        )
    yield lab
    lab.stop()


@pytest.fixture(scope="session")
def chat_model(tiny_model_dir) -> str:
    """The tiny model's id on the server: the directory it was loaded from."""
    return str(tiny_model_dir)


def upload(server, path: Path = QA_FACTS) -> dict:
    with path.open("rb") as handle:
        response = server.http.post("/v1/fine-tuning/datasets", files={"file": (path.name, handle, "text/csv")})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="session")
def facts_dataset(server) -> dict:
    return upload(server)
