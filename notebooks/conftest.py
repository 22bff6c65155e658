"""pytest runs every notebook here with nbval (``--nbval-lax``: only ``# NBVAL_CHECK_OUTPUT`` cells are compared).

Each notebook's kernel starts with a home directory of its own for this test session (so no notebook touches
``~/.qubrid_lab``), whose converted-model cache is the one the end-to-end tests share, and with the Hub off:
the notebooks run on the bundled models only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.e2e.conftest import model_cache_home

NOTEBOOKS = Path(__file__).parent
_homes: list[Path] = []


def notebook_environment() -> dict[str, str]:
    """What a notebook kernel started now gets: a fresh session home linked to the shared model cache."""
    if not _homes:
        home = Path(tempfile.mkdtemp(prefix="qubrid-lab-notebooks-"))
        cache = model_cache_home() / "models"
        cache.mkdir(parents=True, exist_ok=True)
        (home / "models").symlink_to(cache, target_is_directory=True)
        _homes.append(home)
    return {"QUBRID_LAB_HOME": str(_homes[0]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Set the environment just before nbval starts a notebook's kernel (in the first cell's setup)."""
    if item.path.suffix == ".ipynb" and item.path.parent == NOTEBOOKS:
        os.environ.update(notebook_environment())
        for name in ("QUBRID_LAB_API_KEYS", "QUBRID_LAB_API_KEY_FILE", "QUBRID_LAB_MODELS"):
            os.environ.pop(name, None)


def pytest_unconfigure(config: pytest.Config) -> None:
    for home in _homes:
        shutil.rmtree(home, ignore_errors=True)
