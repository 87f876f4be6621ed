"""Packaging: every file of a module folder, of the shared LoGoNetLib and of the bundled ``logonet`` core is
listed in the CMake lists (a file missing there is silently left out of the extension package), every listed
file exists, and the tree those lists install (what the Extensions Manager unpacks) works on its own.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = ("LoGoNetSegment", "LoGoNetTrain")
#: Folders with their own CMakeLists.txt install step: the two modules and the library both import.
PACKAGED = MODULES + ("LoGoNetLib",)
#: Files that describe the build itself and are not packaged.
NOT_PACKAGED = {"CMakeLists.txt"}
#: What the core bundle must carry, relative to the repository root.
CORE_PATTERNS = (("logonet", None), ("Resources/Models", None), ("Resources/ModelCatalog.json", None))


def repo_files(folder: Path) -> List[str]:
    """Files under ``folder`` that a checkout holds (tracked in git), relative to the repository root."""
    try:
        out = subprocess.run(["git", "ls-files", "--", str(folder.relative_to(REPO))], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        files = [line for line in out.splitlines() if line]
        if files or not folder.exists():
            return [f for f in files if (REPO / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        pass
    if folder.is_file():
        return [str(folder.relative_to(REPO))]
    return [str(p.relative_to(REPO)) for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]


MACRO = "logonet_add_scripted_module"


def _sets(text: str, module: str = "") -> Dict[str, List[str]]:
    text = re.sub(r"(^|\s)#[^\n]*", r"\1", text)
    sets: Dict[str, List[str]] = {}
    token = r'"[^"]*"|[^\s()"]+'
    for name, body in re.findall(rf"\bset\(\s*(\w+)((?:\s+(?:{token}))*)\s*\)", text, flags=re.IGNORECASE):
        sets[name] = [t.strip('"') for t in re.findall(token, body)]
    module = (sets.get("MODULE_NAME") or [module])[0]
    return {name: [v.replace("${MODULE_NAME}", module) for v in values] for name, values in sets.items()}


def macro_body() -> str:
    """The top-level CMakeLists.txt's macro that builds, installs and tests a module."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    return re.search(rf"macro\({MACRO}\)(.*?)endmacro\(\)", text, flags=re.S).group(1)


def cmake_sets(path: Path) -> Dict[str, List[str]]:
    """``set(NAME a b c)`` blocks of a CMakeLists.txt (comments removed), values with ``${MODULE_NAME}`` expanded;
    a module CMakeLists.txt that calls the top-level macro also gets the lists the macro sets."""
    text = path.read_text(encoding="utf-8")
    sets = _sets(text)
    if path != REPO / "CMakeLists.txt" and re.search(rf"^\s*{MACRO}\(\)", text, flags=re.M):
        for name, values in _sets(macro_body(), (sets.get("MODULE_NAME") or [""])[0]).items():
            sets[name] = sets.get(name, []) + values
    return sets


def listed_in_module(module: str) -> Set[str]:
    """Every path (relative to the repository root) listed by the folder's CMakeLists files."""
    listed: Set[str] = set()
    for cmake in (REPO / module).rglob("CMakeLists.txt"):
        for name, values in cmake_sets(cmake).items():
            listed |= {str((cmake.parent / v).resolve().relative_to(REPO)) for v in values
                       if "/" in v or "." in v}
    return listed


def listed_core() -> Set[str]:
    sets = cmake_sets(REPO / "CMakeLists.txt")
    return set(sets.get("LOGONET_CORE_SCRIPTS", [])) | set(sets.get("LOGONET_CORE_RESOURCES", []))


def installed_files() -> Dict[str, str]:
    """What the install step puts into ``<extension>/lib/Slicer-X.Y/qt-scripted-modules``: installed path ->
    source path (both relative). ``slicerMacroBuildScriptedModule`` keeps a file's path relative to its
    CMakeLists folder (under the folder's own name with ``WITH_SUBDIR``); the core keeps its repository path."""
    tree: Dict[str, str] = {}
    for folder in PACKAGED:
        cmake = REPO / folder / "CMakeLists.txt"
        text = cmake.read_text(encoding="utf-8")
        sets = cmake_sets(cmake)
        prefix = f"{folder}/" if re.search(r"^\s*WITH_SUBDIR\b", text, flags=re.M) else ""
        for value in sets.get("MODULE_PYTHON_SCRIPTS", []) + sets.get("MODULE_PYTHON_RESOURCES", []):
            tree[prefix + value] = f"{folder}/{value}"
    for value in sorted(listed_core()):
        tree[value] = value
    return tree


@pytest.mark.parametrize("module", PACKAGED)
def test_every_module_file_is_in_the_cmake_lists(module):
    files = {f for f in repo_files(REPO / module) if Path(f).name not in NOT_PACKAGED}
    assert files, f"no files found in {module}"
    missing = sorted(files - listed_in_module(module))
    assert not missing, (f"{module}: add these files to MODULE_PYTHON_SCRIPTS/RESOURCES in "
                         f"{module}/CMakeLists.txt (paths relative to it): {missing}")


@pytest.mark.parametrize("module", PACKAGED)
def test_every_listed_module_file_exists(module):
    absent = sorted(f for f in listed_in_module(module) if not (REPO / f).is_file())
    assert not absent, f"{module}/CMakeLists.txt lists files that do not exist: {absent}"


def test_bundled_core_is_complete():
    """The extension runs `python -m logonet`: every core file and bundled model must be packaged."""
    files = set()
    for pattern, _ in CORE_PATTERNS:
        files |= {f for f in repo_files(REPO / pattern) if "__pycache__" not in f}
    assert "logonet/events.py" in files and "logonet/cli.py" in files
    missing = sorted(files - listed_core())
    assert not missing, ("CMakeLists.txt (the top-level one) must bundle these core files (add them to "
                         "LOGONET_CORE_SCRIPTS for .py, else LOGONET_CORE_RESOURCES):\n  " + "\n  ".join(missing))
    absent = sorted(f for f in listed_core() if not (REPO / f).is_file())
    assert not absent, f"LOGONET_CORE_* lists files that do not exist: {absent}"
    scripts = set(cmake_sets(REPO / "CMakeLists.txt")["LOGONET_CORE_SCRIPTS"])
    assert all(s.endswith(".py") for s in scripts), "only .py files belong in LOGONET_CORE_SCRIPTS"


def test_one_shared_library_outside_the_modules_and_no_sys_path_edits():
    """One LoGoNetLib, at the top level with its own install step; each module's logic lives next to it; no
    Slicer-side file edits sys.path (Slicer puts the module folders and qt-scripted-modules on it)."""
    assert (REPO / "LoGoNetLib" / "__init__.py").is_file()
    assert not [p for module in MODULES for p in (REPO / module).rglob("LoGoNetLib")], "a second LoGoNetLib"
    assert "add_subdirectory(LoGoNetLib)" in (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for module in MODULES:
        assert (REPO / module / f"{module}Lib" / "logic.py").is_file()
    for folder in PACKAGED:
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr == "path" and ast.unparse(node.value) == "sys":
                    pytest.fail(f"{path.relative_to(REPO)}:{node.lineno} uses sys.path")


INSTALLED_CHECK = """
import sys
tree, testing = sys.argv[1], sys.argv[2]
# What Slicer's launcher puts on the path for an installed extension: its qt-scripted-modules folder (the module
# folders are that same folder). The test stubs stand in for the application-only imports.
sys.path.insert(0, testing)
import slicer_fixtures
slicer_fixtures.install_app_stubs()
sys.path.insert(0, tree)  # first: the fixtures put the checkout on the path too
import LoGoNetSegment, LoGoNetTrain
import LoGoNetLib, LoGoNetSegmentLib, LoGoNetTrainLib, logonet
from LoGoNetLib import core
from LoGoNetLib.catalog import ModelCatalog
for module in (LoGoNetSegment, LoGoNetTrain, LoGoNetLib, LoGoNetSegmentLib, LoGoNetTrainLib, logonet):
    assert module.__file__.startswith(tree), (module.__name__, module.__file__)
assert str(core.core_root()) == tree and core.fake_worker().is_file()
assert core.subprocess_env()["PYTHONPATH"].split(__import__("os").pathsep)[0] == tree
demo = ModelCatalog(home=tree + "/home").find("demo")
assert demo.usable and str(demo.path).startswith(tree) and demo.labels
from LoGoNetSegmentLib.widget import UI_FILE as SEGMENT_UI
from LoGoNetTrainLib.widget import UI_FILE as TRAIN_UI
assert SEGMENT_UI.is_file() and TRAIN_UI.is_file(), (SEGMENT_UI, TRAIN_UI)
print("installed tree OK")
"""


def test_the_installed_tree_works_on_its_own(tmp_path):
    """Lay the files out as the install step does and import both modules from there alone: LoGoNetLib, the
    module libraries, the core, the .ui files, the demo model and the self-tests' stand-in worker are found."""
    pytest.importorskip("slicer")
    tree = tmp_path / "qt-scripted-modules"
    installed = installed_files()
    assert len(installed) == len(set(installed.values())), "two files install to the same place"
    for target, source in installed.items():
        (tree / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / source, tree / target)
    result = subprocess.run([sys.executable, "-c", INSTALLED_CHECK, str(tree), str(REPO / "Testing")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "installed tree OK" in result.stdout


def test_extension_metadata_and_modules():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    sets = cmake_sets(REPO / "CMakeLists.txt")
    assert sets["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert sets["EXTENSION_DEPENDS"] == ["PyTorch"]
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL"):
        assert sets.get(key), key
    assert "WITH_GENERIC_TESTS" in macro_body()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in macro_body()
    for module in PACKAGED:
        assert f"add_subdirectory({module})" in text
    for module in MODULES:
        module_text = (REPO / module / "CMakeLists.txt").read_text(encoding="utf-8")
        assert re.search(rf"^{MACRO}\(\)", module_text, flags=re.M), f"{module} must use {MACRO}()"
        assert re.search(rf"class {module}Test\(ScriptedLoadableModuleTest\)",
                         (REPO / module / f"{module}.py").read_text(encoding="utf-8")), "the module needs its self-test"
    assert (REPO / "Resources" / "Icons" / "LoGoNet.png").is_file()
    assert sets["EXTENSION_ICONURL"][0].endswith("Resources/Icons/LoGoNet.png")


def test_license_and_extension_index_description_agree_with_cmake():
    """Extensions Index readiness: a LICENSE at the root (the license pyproject declares) and a .s4ext whose
    fields match CMakeLists.txt; the URLs stay visibly TODO until the repository is public."""
    license_text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert 'license = {text = "Apache-2.0"}' in (REPO / "pyproject.toml").read_text(encoding="utf-8")
    fields = {}
    for line in (REPO / "LoGoNet.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    sets = cmake_sets(REPO / "CMakeLists.txt")
    assert fields["category"] == sets["EXTENSION_CATEGORY"][0]
    assert fields["depends"].split() == sets["EXTENSION_DEPENDS"]
    assert fields["description"] == sets["EXTENSION_DESCRIPTION"][0]
    assert fields["homepage"] == sets["EXTENSION_HOMEPAGE"][0] and fields["iconurl"] == sets["EXTENSION_ICONURL"][0]
    for key in ("scmurl", "homepage", "iconurl"):
        assert "TODO-publish" in fields[key], f"{key} must stay marked TODO until the repository is public"
    assert fields["scm"] == "git" and fields["enabled"] == "1"


def test_the_checker_catches_an_unlisted_file(monkeypatch):
    """The check itself: an extra file in a module folder is reported."""
    extra = REPO / "LoGoNetTrain" / "Resources" / "unlisted_probe.txt"
    monkeypatch.setattr(sys.modules[__name__], "repo_files",
                        lambda folder: [str(extra.relative_to(REPO))] + [f for f in _walk(folder)])
    with pytest.raises(AssertionError, match="unlisted_probe.txt"):
        test_every_module_file_is_in_the_cmake_lists("LoGoNetTrain")


def _walk(folder: Path) -> List[str]:
    return [str(p.relative_to(REPO)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]



def test_slicer_installer_floors_match_the_package():
    """The Slicer-side installer asks for exactly the core's runtime requirements and floors (pyproject)."""
    import tomllib

    import slicer_fixtures  # noqa: F401  (the module folders and the repository root on the path, as in Slicer)
    from LoGoNetLib.install import REQUIREMENTS

    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    floors = dict(re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d).groups() for d in deps)
    assert {name: floor for name, _, floor in REQUIREMENTS} == floors



def test_slicer_engine_offer_matches_the_engines_extra():
    """The optional engine the Segment module offers is the core's ``engines`` extra (same floors), minus ONNX
    Runtime, which ``--engine auto`` never picks."""
    import tomllib

    import slicer_fixtures  # noqa: F401
    from LoGoNetLib.install import ENGINE_REQUIREMENTS

    from logonet.engines import AUTO_ORDER

    extra = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    floors = dict(re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d).groups() for d in extra["engines"])
    offered = {name: floor for name, _, floor in ENGINE_REQUIREMENTS}
    assert offered == {k: v for k, v in floors.items() if k != "onnxruntime"}
    assert AUTO_ORDER[0] in offered
