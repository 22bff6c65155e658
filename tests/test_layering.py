"""The package's import structure: which folder may import which, and what stays free of torch.

``data/`` is the bottom of the fine-tuning stack (rows, columns, examples, splits); ``training/`` builds on it and
never on the server or the widgets; the engine serves models and knows nothing of training; the client is plain
HTTP; the widgets are views over the client and a few light modules, and load neither torch nor the job manager.
Every import counts, also one inside a function: it still ties the two folders together.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import qubrid_lab

PACKAGE = Path(qubrid_lab.__file__).parent
NOTEBOOK_LIBRARIES = {"ipywidgets", "plotly", "anywidget", "IPython", "traitlets"}
TORCH_LIBRARIES = {"torch", "transformers", "peft", "accelerate"}
ABOVE_THE_SERVICES = {"server", "client", "widgets", "workbench", "cli", "cli_verbs", "export"}
JOB_MANAGER = {
    "training.jobs",
    "training.job_scheduler",
    "training.job_workers",
    "training.job_outcomes",
    "training.worker",
}

# folder -> the parts of qubrid_lab it never imports
NEVER_IMPORTS = {
    "data": {"training", "models", "storage", "engine", *ABOVE_THE_SERVICES},
    "models": {"data", "training", "storage", "engine", *ABOVE_THE_SERVICES},
    "storage": {"training", "models", "engine", *ABOVE_THE_SERVICES},
    "engine": {"data", "training", "storage", *ABOVE_THE_SERVICES},
    "training": {"engine", *ABOVE_THE_SERVICES},
    "export": {"data", "training", "engine", *ABOVE_THE_SERVICES - {"export"}},
    "server": {"client", "widgets", "workbench", "cli"},
    "client": {"data", "training", "models", "storage", "engine", *ABOVE_THE_SERVICES - {"client"}},
    # views: the job manager, its worker and the training run are the server's business, and so is the server
    "widgets": {
        "models",
        "storage",
        "engine",
        *JOB_MANAGER,
        "training.runner",
        "server",
        "workbench",
        "cli",
        "cli_verbs",
        "export",
    },
    # the API verbs are callers of the client; only ``profile`` works locally, on the training side's profile
    "cli_verbs": {
        "models",
        "storage",
        "engine",
        *JOB_MANAGER,
        "training.runner",
        "server",
        "widgets",
        "workbench",
        "export",
    },
}
# folder -> what it may import all the same, inside a part NEVER_IMPORTS names
EXCEPT = {
    "widgets": {"server.protocol"},  # the wire models: the playground's inputs take their field ranges
    "cli_verbs": {"server.home"},
}  # where the home's running server listens
# folder -> libraries it never imports
NEVER_LOADS = {"data": TORCH_LIBRARIES, "client": TORCH_LIBRARIES, "widgets": TORCH_LIBRARIES}


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports, anywhere in it, as an absolute dotted name (relative imports resolved)."""
    module = ".".join((package.name, *path.relative_to(package).with_suffix("").parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")[: -node.level] if node.level else []
            stem = ".".join([*base, node.module] if node.module else base)
            names.add(stem)
            names |= {f"{stem}.{alias.name}" for alias in node.names}  # "from pkg import module"
    return names


def folder_of(path: Path, package: Path = PACKAGE) -> str:
    """The top-level part of the package a module belongs to: ``data`` for data/splits.py, ``cli`` for cli.py."""
    return path.relative_to(package).parts[0].removesuffix(".py")


def within(name: str, modules: list[str]) -> bool:
    """Whether module ``name`` is one of ``modules`` or inside one of them."""
    return any(name == module or name.startswith(module + ".") for module in modules)


def violations(package: Path = PACKAGE) -> dict[str, list[str]]:
    """Module (relative path) -> the imports that break ``NEVER_IMPORTS`` or ``NEVER_LOADS``."""
    found: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        folder = folder_of(path, package)
        forbidden = [f"{package.name}.{part}" for part in NEVER_IMPORTS.get(folder, ())]
        allowed = [f"{package.name}.{part}" for part in EXCEPT.get(folder, ())]
        libraries = NEVER_LOADS.get(folder, set())
        bad = sorted(
            name
            for name in imported_modules(path, package)
            if (within(name, forbidden) and not within(name, allowed)) or name.split(".")[0] in libraries
        )
        if bad:
            found[str(path.relative_to(package))] = bad
    return found


def test_every_folder_imports_only_what_its_layer_allows():
    assert violations() == {}


def test_the_rules_name_real_folders_and_modules():
    folders = {folder_of(path) for path in PACKAGE.rglob("*.py")}
    assert set(NEVER_IMPORTS) <= folders and set(NEVER_LOADS) <= folders
    for parts in (*NEVER_IMPORTS.values(), *EXCEPT.values()):
        for part in parts:
            target = PACKAGE.joinpath(*part.split("."))
            assert target.is_dir() or target.with_suffix(".py").is_file(), part


@pytest.mark.parametrize(
    ("folder", "line", "caught"),
    [
        ("data", "from qubrid_lab.training.batches import PaddingCollator", "qubrid_lab.training.batches"),
        ("data", "def f():\n    from qubrid_lab import server\n", "qubrid_lab.server"),
        ("data", "from ..training import hyperparameters", "qubrid_lab.training"),
        ("data", "import torch", "torch"),
        ("training", "import qubrid_lab.widgets.form", "qubrid_lab.widgets.form"),
        ("engine", "from qubrid_lab.training.runner import train", "qubrid_lab.training.runner"),
        ("widgets", "from qubrid_lab.training.jobs import JobManager", "qubrid_lab.training.jobs"),
        ("widgets", "from qubrid_lab.server.app import create_app", "qubrid_lab.server.app"),
        ("client", "from qubrid_lab.server.protocol.common import Usage", "qubrid_lab.server"),
    ],
)
def test_a_forbidden_import_is_caught_wherever_it_is_written(tmp_path, folder, line, caught):
    package = tmp_path / "qubrid_lab"
    module = package / folder / "module.py"
    module.parent.mkdir(parents=True)
    module.write_text(line + "\n")

    found = violations(package)
    assert list(found) == [f"{folder}/module.py"]
    assert any(within(name, [caught]) for name in found[f"{folder}/module.py"]), found


def test_the_wire_models_are_all_a_widget_may_import_of_the_server(tmp_path):
    module = tmp_path / "qubrid_lab" / "widgets" / "module.py"
    module.parent.mkdir(parents=True)
    module.write_text("import qubrid_lab.server.protocol.chat, qubrid_lab.server.home\n")
    assert violations(tmp_path / "qubrid_lab") == {"widgets/module.py": ["qubrid_lab.server.home"]}


def test_only_the_widgets_import_notebook_libraries():
    outside = {
        str(path.relative_to(PACKAGE)): sorted(
            {name.split(".")[0] for name in imported_modules(path)} & NOTEBOOK_LIBRARIES
        )
        for path in PACKAGE.rglob("*.py")
        if folder_of(path) != "widgets"
    }
    assert len(outside) > 20
    assert {name: found for name, found in outside.items() if found} == {}
    monitor = imported_modules(PACKAGE / "widgets" / "monitor.py")
    assert {"ipywidgets", "plotly"} <= {name.split(".")[0] for name in monitor}


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded once it ran ``statement``."""
    probe = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent, check=False
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    """The torch-family libraries, the engine and the job manager among ``modules``."""
    return sorted(
        name
        for name in modules
        if name.split(".")[0] in TORCH_LIBRARIES
        or within(name, ["qubrid_lab.engine", *(f"qubrid_lab.{part}" for part in JOB_MANAGER)])
    )


@pytest.mark.parametrize(
    "statement",
    [
        "import qubrid_lab",
        "import qubrid_lab.widgets",
        (
            "import pkgutil, importlib, qubrid_lab.data as data\n"
            "for found in pkgutil.iter_modules(data.__path__): importlib.import_module(f'qubrid_lab.data.{found.name}')"
        ),
        "from qubrid_lab import profile_csv",
    ],
)
def test_the_light_entry_points_load_no_torch_nor_the_engine_or_job_manager(statement):
    assert heavy(loaded_after(statement)) == []


def test_the_probe_sees_torch_where_it_is_loaded():
    loaded = loaded_after("import qubrid_lab.training.batches, qubrid_lab.training.jobs")
    assert {"torch", "qubrid_lab.training.jobs"} <= set(heavy(loaded))
