"""The CLI without a job: help on every verb, a start that loads no torch, the local profile, missing servers."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from qubrid_lab.training.dataset_profile import profile_csv
from tests.cli.conftest import API_KEY, assert_refused, cli_environment, run_cli
from tests.client.conftest import QA_FACTS

HEAVY = ("torch", "transformers", "peft", "accelerate")


def test_the_console_script_and_every_verb_answer_help():
    script = Path(sysconfig.get_path("scripts")) / "qubrid-lab"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for verb in ("profile", "finetune", "jobs", "chat"):
        assert verb in done.stdout
    for verb in (
        ["profile"],
        ["finetune"],
        ["jobs"],
        ["jobs", "list"],
        ["jobs", "show"],
        ["jobs", "follow"],
        ["jobs", "cancel"],
        ["jobs", "events"],
        ["chat"],
    ):
        shown = run_cli(*verb, "--help")
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: qubrid-lab {' '.join(verb)}"), shown.stderr


def test_finetune_takes_a_flag_per_hyperparameter_with_its_description():
    from qubrid_lab.training.hyperparameters import Hyperparameters

    shown = " ".join(run_cli("finetune", "--help").stdout.split())
    for name, field in Hyperparameters.model_fields.items():
        assert f"--{name.replace('_', '-')}" in shown and " ".join(field.description.split()) in shown, name


def loaded_modules(*args: str) -> set[str]:
    """The modules ``python -X importtime -m qubrid_lab ARGS`` imported (from its import-time report)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qubrid_lab", *args],
        capture_output=True,
        text=True,
        env=cli_environment(),
        timeout=120,
        check=False,
    )
    names = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "qubrid_lab.cli" in names, done.stderr[-2000:]
    return names


def test_help_and_listing_jobs_start_without_torch(server):
    for args in (["--help"], ["jobs", "list", "--url", server.url, "--api-key", API_KEY]):
        loaded = loaded_modules(*args)
        assert [name for name in loaded if name.split(".")[0] in HEAVY] == [], args
    assert "torch" in loaded_modules("--home", str(server.home), "models", "list")  # the probe sees torch


def test_profile_prints_the_table_and_every_warning(tiny_model_dir, tmp_path):
    data = tmp_path / "facts.csv"
    rows = QA_FACTS.read_text().splitlines()
    data.write_text("\n".join([*rows, rows[1], "What is missing here?,"]) + "\n")  # a copy and an empty answer
    profile = profile_csv(data, str(tiny_model_dir), max_seq_length=64)
    assert len(profile.warnings) >= 2

    done = run_cli("profile", data, "--model", tiny_model_dir, "--max-seq-length", 64)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Dataset profile of facts.csv"
    assert any(line.split()[:3] == ["task", "type", "qa"] for line in lines)
    assert any(line.split()[:3] == ["question", "question", "0"] for line in lines)
    assert any(line.split()[:3] == ["answer", "answer", "1"] for line in lines)
    suggested = next(line for line in lines if line.startswith("suggested max_seq_length"))
    assert suggested.split()[2] == str(profile.suggested_max_seq_length)
    text = " ".join(done.stdout.split())
    assert f"{len(profile.warnings)} warning(s):" in text
    for warning in profile.warnings:
        assert " ".join(warning.message.split()) in text


def test_profile_as_json_is_profile_csv_itself(tiny_model_dir):
    done = run_cli(
        "profile", QA_FACTS, "--model", tiny_model_dir, "--batch-size", 4, "--validation-split", 0.2, "--json"
    )
    assert done.returncode == 0, done.stderr
    expected = profile_csv(QA_FACTS, str(tiny_model_dir), batch_size=4, validation_split=0.2).to_dict()
    assert json.loads(done.stdout) == json.loads(json.dumps(expected))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["profile", "no-such.csv"], ["error:", "no such file: no-such.csv"]),
        (["finetune", "no-such.csv", "--max-steps", "2"], ["error:", "no such file: no-such.csv"]),
    ],
)
def test_a_missing_file_is_a_usage_error(args, expected):
    done = run_cli(*args)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert all(text in done.stderr for text in expected), done.stderr


def test_a_bad_profile_setting_names_its_field(tiny_model_dir):
    done = run_cli("profile", QA_FACTS, "--model", tiny_model_dir, "--max-seq-length", 4)
    assert_refused(done, "max_seq_length", "greater than or equal to 16", status=2)


def test_with_no_server_for_the_home_the_error_says_how_to_start_one(tmp_path):
    done = run_cli("jobs", "list", "--home", tmp_path)
    assert_refused(done, f"no qubrid_lab server is running for the home {tmp_path}", "qubrid-lab serve", "--url")
