"""The CLI's verbs on a server's platform API (``jobs``, ``finetune``, ``chat``) and the local ``profile``.

Each verb is a thin caller of ``qubrid_lab.Client`` (or of ``profile_csv``), in a module of its own; ``cli.py``
adds them with ``add_api_verbs``. Nothing here imports torch at start: ``qubrid-lab --help`` and
``qubrid-lab jobs list`` stay fast.
"""

from __future__ import annotations

import argparse

from qubrid_lab.cli_verbs.chat_verb import add_chat_verb
from qubrid_lab.cli_verbs.connection import add_connection_flags
from qubrid_lab.cli_verbs.finetune_verb import add_finetune_verb
from qubrid_lab.cli_verbs.jobs_verb import add_jobs_verb
from qubrid_lab.cli_verbs.profile_verb import add_profile_verb


def add_api_verbs(commands, common: argparse.ArgumentParser) -> None:
    """Add ``profile``, ``finetune``, ``jobs`` and ``chat`` to the subcommands; each takes ``common`` flags
    (``--home``) and, but for ``profile``, ``--url`` and ``--api-key``, also after the verb."""
    connection = argparse.ArgumentParser(add_help=False)
    add_connection_flags(connection)
    add_profile_verb(commands, [common])
    add_finetune_verb(commands, [common, connection])
    add_jobs_verb(commands, [common, connection])
    add_chat_verb(commands, [common, connection])
