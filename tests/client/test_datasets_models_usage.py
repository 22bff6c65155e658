"""Datasets from every kind of source, the models lists, usage, and a LabServer offering the same calls."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest

from qubrid_lab.client import Client, NotFoundError
from tests.client.conftest import API_KEY, CHAT_FACTS, QA_FACTS

ROOT = Path(__file__).parents[2]


def test_csv_and_jsonl_files_dataframes_and_datasets_upload_as_datasets(client):
    from datasets import Dataset

    facts = pd.read_csv(QA_FACTS)
    chats = pd.read_json(CHAT_FACTS, lines=True)
    uploads = {
        "csv path": client.datasets.upload(QA_FACTS, "from a path"),
        "jsonl path": client.datasets.upload(str(CHAT_FACTS)),
        "dataframe": client.datasets.upload(facts.head(5), "from pandas"),
        "chat dataframe": client.datasets.upload(chats),
        "dataset": client.datasets.upload(Dataset.from_pandas(facts.tail(4)), "from datasets"),
        "chat dataset": client.datasets.upload(Dataset.from_list(chats.to_dict("records"))),
    }
    shapes = {source: (dataset["row_count"], dataset["columns"]) for source, dataset in uploads.items()}
    assert shapes == {
        "csv path": (15, ["question", "answer"]),
        "jsonl path": (4, ["messages"]),
        "dataframe": (5, ["question", "answer"]),
        "chat dataframe": (4, ["messages"]),
        "dataset": (4, ["question", "answer"]),
        "chat dataset": (4, ["messages"]),
    }
    assert [uploads[source]["name"] for source in ("csv path", "jsonl path", "dataframe", "chat dataset")] == [
        "from a path",
        "chat_facts.jsonl",
        "from pandas",
        "dataset.jsonl",
    ]

    listed = {dataset["id"] for dataset in client.datasets.list()}
    assert {dataset["id"] for dataset in uploads.values()} <= listed
    first = uploads["csv path"]
    assert client.datasets.get(first["id"]) == first
    client.datasets.delete(first["id"])
    assert first["id"] not in {dataset["id"] for dataset in client.datasets.list()}
    with pytest.raises(NotFoundError):
        client.datasets.get(first["id"])
    with pytest.raises(TypeError, match="DataFrame"):
        client.datasets.upload({"question": ["a"]})


def test_models_lists_the_served_models_with_their_kind(client, chat_model):
    models = client.models.list()
    assert [(model["id"], model["kind"]) for model in models] == [(chat_model, "chat")]
    assert client.models.get(chat_model)["id"] == chat_model  # an id with slashes
    assert client.models.chat_ids() == [chat_model]


def test_usage_counts_the_compared_answers(client, chat_model):
    table = client.compare([chat_model], ["Hello", "How are you?"], max_tokens=3)
    rows = client.usage(model=chat_model)
    assert rows and {row["model"] for row in rows} == {chat_model}
    assert sum(row["requests"] for row in rows) >= 2 and sum(row["completion_tokens"] for row in rows) >= 6
    today = rows[-1]["date"]
    assert client.usage(today, today, model=chat_model) == client.usage(model=chat_model)
    assert client.usage(model="no-such-model") == []
    assert list(table.columns) == ["question", chat_model] and len(table) == 2


def test_the_lab_server_offers_the_same_calls(server, client, chat_model):
    assert server.api_client.url == server.url and server.http is server.api_client.http
    assert server.http.get("/v1/models").status_code == 200  # the key is set
    assert server.datasets.list() == client.datasets.list()
    assert server.models.list() == client.models.list() and server.served_models == [chat_model]
    assert server.jobs.list() == client.jobs.list() and server.usage() == client.usage()
    assert server.compare([chat_model], "Hi", max_tokens=2).equals(client.compare([chat_model], "Hi", max_tokens=2))
    assert [model.id for model in server.client.models.list()] == [chat_model]  # still the openai client


def test_the_client_reads_its_server_from_the_environment_and_imports_nothing_heavy(server, chat_model):
    script = (
        "import sys, pandas, qubrid_lab\n"
        "lab = qubrid_lab.Client()\n"
        "lab.datasets.list(); lab.jobs.list(); lab.models.list(); lab.usage()\n"
        "lab.datasets.upload(pandas.DataFrame({'question': ['Q?'], 'answer': ['A.']}))\n"
        f"lab.compare([{chat_model!r}], ['Hi'], max_tokens=1)\n"
        "heavy = ('torch', 'transformers', 'ipywidgets', 'plotly', 'fastapi', 'qubrid_lab.server',\n"
        "         'qubrid_lab.engine', 'qubrid_lab.training', 'qubrid_lab.widgets', 'qubrid_lab.workbench')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    environment = {
        "QUBRID_LAB_URL": server.base_url,
        "QUBRID_LAB_API_KEY": API_KEY,
        "PATH": "/usr/bin:/bin",
        "HOME": str(Path.home()),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=environment, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_client_defaults_to_the_local_server_and_takes_its_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("QUBRID_LAB_URL", raising=False)
    monkeypatch.setenv("QUBRID_LAB_API_KEY", "qbt_from-the-environment")
    with Client() as default:
        assert default.base_url == "http://127.0.0.1:8000/v1"
        assert default.http.headers["authorization"] == "Bearer qbt_from-the-environment"
    with Client("http://example.invalid:9/v1/", "") as keyless:
        assert keyless.url == "http://example.invalid:9" and "authorization" not in keyless.http.headers
        assert isinstance(keyless.http, httpx.Client)
