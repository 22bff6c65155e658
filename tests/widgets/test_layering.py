"""Widgets are views: the notebook libraries are imported under qubrid_lab/widgets only."""

from __future__ import annotations

import ast
from pathlib import Path

import qubrid_lab

NOTEBOOK_LIBRARIES = {"ipywidgets", "plotly", "anywidget", "IPython", "traitlets"}
PACKAGE = Path(qubrid_lab.__file__).parent


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_the_widgets_import_notebook_libraries():
    outside = {str(path.relative_to(PACKAGE)): sorted(imported_roots(path) & NOTEBOOK_LIBRARIES)
               for path in PACKAGE.rglob("*.py") if "widgets" not in path.relative_to(PACKAGE).parts}
    assert len(outside) > 20
    assert {name: found for name, found in outside.items() if found} == {}
    assert imported_roots(PACKAGE / "widgets" / "monitor.py") >= {"ipywidgets", "plotly"}
