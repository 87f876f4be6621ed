"""The bundled core runs inside Slicer 5.8 (Python 3.9) and must never pull Slicer or Qt into the worker."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = sorted((Path(__file__).resolve().parents[1] / "logonet").rglob("*.py"))


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_core_file_is_python39_and_slicer_free(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))  # rejects `match`, 3.10+ syntax
    if tree.body and source.strip() and any(not isinstance(node, ast.Expr) for node in tree.body):
        assert "from __future__ import annotations" in source, "PEP 604/585 annotations need this on 3.9"
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not imported & {"slicer", "qt", "ctk", "vtk", "PythonQt", "PyQt5", "PySide2", "PySide6"}
