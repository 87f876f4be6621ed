"""Issue 12, defect 2: every Slicer/MRML/VTK method the Slicer-side code calls exists in Slicer 5.8.1.

``../shared/reference/slicer-api/slicer58-idents.txt`` lists every CamelCase identifier of the Slicer v5.8.1
sources. A called method ``Name`` (capitalised: the VTK/MRML convention) must be in it, or be ``Set``/``Get`` +
a listed name (VTK macros), or be guarded by ``hasattr(obj, "Name")`` in the same function, or be one of the
few non-Slicer methods listed below with the reason. slicer-core (5.11+) cannot catch a 5.8 gap by running.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
IDENTS = REPO.parent / "shared" / "reference" / "slicer-api" / "slicer58-idents.txt"
#: Files that never run inside Slicer's process: the stand-in worker is a subprocess speaking the CLI.
NOT_IN_SLICER = {"LoGoNetLib/Testing/fake_logonet.py"}
#: Capitalised calls that are not Slicer API, each with why it is safe on Slicer 5.8.
NOT_SLICER_API = {
    "InsertNextBlankRow": "vtkTable method since VTK 5 (Slicer 5.8 ships VTK 9.x); not used in Slicer's own code",
    "PyTorchUtilsLogic": "the PyTorch extension's logic class (EXTENSION_DEPENDS PyTorch), not Slicer core",
    "Thread": "threading.Thread",
    "S_ISLNK": "stat.S_ISLNK (Python standard library)",
    "WeakSet": "weakref.WeakSet",
}


def slicer_side_files() -> List[Path]:
    files = sorted(path for folder in ("LoGoNetLib", "LoGoNetSegment", "LoGoNetTrain")
                   for path in (REPO / folder).rglob("*.py"))
    return [f for f in files if str(f.relative_to(REPO)) not in NOT_IN_SLICER and "__pycache__" not in f.parts]


def _guarded_names(function: ast.AST) -> Set[str]:
    """Method names a function checks with ``hasattr(x, "Name")`` before calling them."""
    names = set()
    for node in ast.walk(function):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
                and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)):
            names.add(str(node.args[1].value))
    return names


def missing_in_58(source: str, idents: Set[str]) -> List[Tuple[int, str]]:
    """(line, method) of every capitalised method call that Slicer 5.8.1 lacks and nothing guards."""
    tree = ast.parse(source)
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    guard_of = {}
    for scope in scopes:
        guarded = _guarded_names(scope)
        for node in ast.walk(scope):
            guard_of.setdefault(id(node), set()).update(guarded)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name = node.func.attr
        if not name[:1].isupper() or name in idents or name in NOT_SLICER_API:
            continue
        if name[:3] in ("Set", "Get") and name[3:] in idents:  # vtkSetMacro(X)/vtkGetMacro(X) list only X
            continue
        if name in guard_of.get(id(node), set()):
            continue
        found.append((node.lineno, name))
    return found


@pytest.fixture(scope="module")
def idents() -> Set[str]:
    if not IDENTS.is_file():
        pytest.skip(f"{IDENTS} is not here (the shared reference folder is beside the checkout)")
    return set(IDENTS.read_text(encoding="utf-8").split())


def test_every_method_called_in_slicer_exists_in_5_8(idents):
    problems, calls = [], 0
    for path in slicer_side_files():
        source = path.read_text(encoding="utf-8")
        calls += source.count("(")
        for line, name in missing_in_58(source, idents):
            problems.append(f"{path.relative_to(REPO)}:{line}: {name} is not in Slicer 5.8.1")
    assert calls > 500, "the scan saw almost no code"
    assert not problems, "\n".join(problems)


def test_the_check_catches_the_5_10_only_getter(idents):
    """The check fails for the call that broke 'Export labelmap' on 5.8, and accepts the guarded form."""
    bad = "def f(seg):\n    return seg.GetLabelmapConversionColorTableNodeID()\n"
    assert missing_in_58(bad, idents) == [(2, "GetLabelmapConversionColorTableNodeID")]
    good = "def f(seg):\n    return seg.GetLabelmapConversionColorTableNode()\n"
    assert missing_in_58(good, idents) == []
    guarded = ("def f(seg):\n    if hasattr(seg, 'GetLabelmapConversionColorTableNodeID'):\n"
               "        return seg.GetLabelmapConversionColorTableNodeID()\n")
    assert missing_in_58(guarded, idents) == []


def test_5_10_list_differs_so_the_reference_is_the_right_one(idents):
    newer = IDENTS.parent / "slicer510-idents.txt"
    if not newer.is_file():
        pytest.skip("no 5.10 list")
    assert "GetLabelmapConversionColorTableNodeID" in set(newer.read_text(encoding="utf-8").split())
    assert "GetLabelmapConversionColorTableNodeID" not in idents
