"""qubrid_lab: the hosted inference and fine-tuning platform's API, on your own machine.

The notebook helpers and the client are imported on first use, so ``import qubrid_lab`` stays light (no torch):

    from qubrid_lab import Client, profile_csv, start_server
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY_EXPORTS = {
    "profile_csv": "qubrid_lab.training.dataset_profile",
    "DatasetProfile": "qubrid_lab.training.dataset_profile",
    "start_server": "qubrid_lab.workbench",
    "LabServer": "qubrid_lab.workbench",
    "Client": "qubrid_lab.client",
}

__all__ = ["Client", "DatasetProfile", "LabServer", "__version__", "profile_csv", "start_server"]


def __getattr__(name: str):
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qubrid_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_EXPORTS})
