"""The core's import layers (docs/architecture.md, "Who may import whom"): a module imports only from its own
layer or below, and the modules the Slicer side loads into Slicer's own process stay free of torch and MONAI."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "logonet"

#: module (or package prefix) -> layer; a module may import from its own layer and the layers below.
LAYERS: Dict[str, int] = {
    "logonet.errors": 0, "logonet.events": 0, "logonet.atomic": 0, "logonet.cardschema": 0,
    "logonet.process_setup": 0,
    "logonet.runtime": 1, "logonet.nets": 1, "logonet.data": 1,
    "logonet.modelcard": 2,
    "logonet.infer": 3, "logonet.evaluate": 3, "logonet.engines": 3, "logonet.postprocess": 3,
    "logonet.train": 4, "logonet.ssl": 4,
    "logonet.bench": 5, "logonet.demo": 5,
    "logonet.cli": 6, "logonet.__main__": 6,
}
#: Loaded inside Slicer's process by the modules: no torch, MONAI or nibabel at import time.
TORCH_FREE = ["logonet.errors", "logonet.events", "logonet.atomic", "logonet.cardschema", "logonet.data.labels",
              "logonet.data.datasets", "logonet.data.volumes"]


def layer_of(module: str) -> int:
    if module == "logonet":  # the package itself: its __init__ holds only the version
        return 0
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise KeyError(f"{module} has no layer: add it to LAYERS (and to docs/architecture.md)")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> Set[str]:
    """Every ``logonet`` module ``path`` imports (relative imports resolved), also inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:
                found.update(f"{target}.{alias.name}" for alias in node.names)
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "logonet" or m.startswith("logonet.")}


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_the_layers(path: Path) -> None:
    own = layer_of(module_name(path))
    upward = sorted(m for m in imported_modules(path)
                    if m not in ("logonet", "logonet.__version__") and layer_of(m) > own)
    assert not upward, f"{module_name(path)} (layer {own}) imports from higher layers: {upward}"


def test_inference_imports_nothing_from_training() -> None:
    assert not {m for m in imported_modules(CORE / "infer.py") if m.startswith(("logonet.train", "logonet.ssl"))}


def test_modules_loaded_by_slicer_stay_torch_free() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE) +
            "print(sorted(m for m in ('torch', 'monai', 'nibabel') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_no_function_in_the_core_is_longer_than_60_lines():
    """Issue 13's rule, measured by scripts/function_lengths.py (ast: from ``def`` or decorator to last line)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("function_lengths", root / "scripts" / "function_lengths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lengths = module.function_lengths(root / "logonet")
    assert len(lengths) > 300  # it measured the package, not an empty folder
    too_long = [(n, where) for n, where in lengths if n > module.LIMIT]
    assert not too_long, too_long
