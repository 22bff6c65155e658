"""DatasetProfiler: a CSV from a path or the browser's upload button, its profile, and the upload to the server."""

from __future__ import annotations

import html
from datetime import datetime, timezone

import pytest

from qubrid_lab.widgets import DatasetProfiler, ServerError
from tests.widgets.conftest import QA_FACTS


def browser_upload(profiler: DatasetProfiler, name: str, content: bytes) -> None:
    """What the FileUpload widget receives when a user picks a file in JupyterLab."""
    profiler.upload.value = (
        {
            "name": name,
            "type": "text/csv",
            "size": len(content),
            "content": memoryview(content),
            "last_modified": datetime.now(timezone.utc),
        },
    )


def shown(widget) -> str:
    return html.unescape(widget.value)


def test_a_path_is_profiled_and_uploaded_as_a_dataset(server, tiny_model_dir):
    profiler = DatasetProfiler(server, model=str(tiny_model_dir), path=QA_FACTS)

    profile = profiler.profile
    assert (profile.rows, profile.task_type, profile.columns) == (15, "qa", ["question", "answer"])
    assert len(profile.token_lengths) == 15 and min(profile.token_lengths) > 10
    assert "Dataset profile" in profiler.report.value and "15 rows" in profiler.report.value
    assert not profiler.upload_button.disabled

    profiler.dataset_name.value = "Invented facts"
    profiler.upload_button.click()
    dataset = profiler.dataset
    assert (dataset["name"], dataset["row_count"], dataset["columns"]) == ("Invented facts", 15, ["question", "answer"])
    assert dataset["id"] in profiler.status.value and "error" not in profiler.status.value
    assert dataset["id"] in [d["id"] for d in server.http.get("/v1/fine-tuning/datasets").json()["data"]]


def test_an_uploaded_file_shows_its_warnings_and_follows_the_settings(server, tiny_model_dir):
    profiler = DatasetProfiler(server, model=str(tiny_model_dir))
    assert profiler.profile is None and profiler.upload_button.disabled

    rows = [
        "question,answer",
        "What is the capital of France?,Paris is the capital.",
        "Who are you?,",
        "What is the capital of France?,Paris is the capital.",
        "Tell me a long story about a fox.," + "The quick brown fox jumps over the lazy dog. " * 6,
    ]
    browser_upload(profiler, "notes.csv", ("\n".join(rows) + "\n").encode())

    profile = profiler.profile
    assert (profile.rows, profile.empty_rows, profile.duplicate_rows) == (4, [2], [3])
    report = shown(profiler.report)
    assert all(warning.message in report for warning in profile.warnings) and len(profile.warnings) >= 2
    assert profiler.source_name == "notes.csv"

    profiler.settings["max_seq_length"].value = 32  # profiles again at once
    assert profiler.profile.max_seq_length == 32 and profiler.profile.over_max_share > 0
    assert "longer than max_seq_length 32" in shown(profiler.report)

    profiler.task_type.value = "not_qa"  # the file has no text column
    assert profiler.profile.plan is None and "text column" in shown(profiler.report)


def test_problems_are_explained_inline(server, tiny_model_dir, tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("question,answer\nA,B\nC,D,E\n")
    profiler = DatasetProfiler(server, model=str(tiny_model_dir), path=ragged)
    assert profiler.profile is None and profiler.report.value == ""
    assert "line 3" in shown(profiler.status)

    profiler.upload_button.click()  # the server refuses it with its own words, and no traceback
    assert profiler.dataset is None
    assert "Upload refused" in shown(profiler.status) and "line 3" in shown(profiler.status)
    with pytest.raises(ServerError, match="line 3"):
        profiler.send()

    profiler.run(QA_FACTS)
    profiler.settings["batch_size"].value = 0
    assert profiler.profile is None and "batch_size" in shown(profiler.status)

    missing = DatasetProfiler(None, model=str(tiny_model_dir), path=tmp_path / "missing.csv")
    assert missing.profile is None and "missing.csv" in shown(missing.status)
    assert missing.upload_button.disabled  # no server to upload to
