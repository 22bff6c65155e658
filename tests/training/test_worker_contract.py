"""The manager writes the worker's command line and the worker reads it with the same contract."""

from __future__ import annotations

from pathlib import Path

from qubrid_lab.training.worker_contract import WorkerArguments


def test_the_command_line_the_manager_writes_is_the_one_the_worker_reads(tmp_path):
    written = WorkerArguments(
        database=tmp_path / "lab.db",
        job_id="ftjob-abc",
        model_dir="/models/tiny",
        job_dir=tmp_path / "jobs" / "ftjob-abc",
        device="cuda:1",
        files_dir=tmp_path / "files",
        server_pid=4242,
    )
    command = written.command_line()

    assert command[:2] == ["-m", "qubrid_lab.training.worker"]
    assert WorkerArguments.parse(command[2:]) == written


def test_optional_arguments_are_left_out_and_read_back_as_their_defaults():
    written = WorkerArguments(database=Path("lab.db"), job_id="ftjob-abc", model_dir="m", job_dir=Path("job"))
    command = written.command_line()

    assert "--files-dir" not in command and "--server-pid" not in command
    assert WorkerArguments.parse(command[2:]) == written
