"""Python dependencies of the bundled ``logonet`` core, installed lazily inside Slicer after asking.

- torch only through the PyTorch extension (``PyTorchUtils``): it picks the CUDA build for the GPU;
- the rest with version floors through ``slicer.util.pip_install``; Slicer's own SimpleITK (and numpy,
  requests) are never reinstalled or replaced;
- nothing is checked or installed at import time: the logics call :meth:`DependencyInstaller.ensure` on
  Apply/Start, and take the installer as an injectable collaborator (tests pass a fake);
- the Segment module's installer also offers the optional faster CPU engine (OpenVINO, the core's ``engines``
  extra) to a person (never to a script): on Apply once, as a "no" is remembered; on *Check dependencies* again.
  A failed install never blocks segmentation.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from .errors import LOG, LoGoNetError

#: (distribution, import name, minimum version). torch first: it comes from the PyTorch extension.
REQUIREMENTS: Tuple[Tuple[str, str, str], ...] = (
    ("torch", "torch", "2.3"),
    ("monai", "monai", "1.4"),
    ("SimpleITK", "SimpleITK", "2.2"),
    ("nibabel", "nibabel", "5.0"),
    ("numpy", "numpy", "1.24"),
    ("scipy", "scipy", "1.10"),
    ("scikit-learn", "sklearn", "1.3"),
    ("safetensors", "safetensors", "0.4"),
    ("einops", "einops", "0.6"),
    ("tqdm", "tqdm", "4.60"),
    ("matplotlib", "matplotlib", "3.7"),
    ("psutil", "psutil", "5.9"),
)
#: The optional CPU engine ``segment --engine auto`` prefers (about 2x torch on the CPU, docs/benchmarks.md):
#: OpenVINO, and onnx for the export it reads. Mirrors the core's ``engines`` extra, minus ONNX Runtime (never
#: picked by ``auto``).
ENGINE_REQUIREMENTS: Tuple[Tuple[str, str, str], ...] = (
    ("openvino", "openvino", "2024.0"),
    ("onnx", "onnx", "1.15"),
)
#: The settings key that remembers a "no" to the engine offer.
ENGINE_DECLINED_KEY = "LoGoNet/FastEngineDeclined"
#: When :meth:`DependencyInstaller.ensure` offers the optional engine (see there).
OPTIONAL_OFFERS = ("no", "once", "again")
#: Slicer ships these; pip must never replace them (a replaced SimpleITK breaks Slicer's own IO).
NEVER_REPLACE = ("SimpleITK", "numpy", "requests")


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def installed_version(distribution: str) -> Optional[str]:
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class Missing:
    distribution: str
    minimum: str
    found: Optional[str]

    @property
    def requirement(self) -> str:
        return f"{self.distribution}>={self.minimum}"

    def describe(self) -> str:
        return f"{self.requirement} (found {self.found})" if self.found else f"{self.requirement} (not installed)"


@dataclass
class InstallResult:
    installed: List[str] = field(default_factory=list)
    restart_needed: bool = False
    declined: bool = False
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.declined and not self.problems


class DependencyInstaller:
    """Check and install the core's dependencies. Every outside effect is injectable for tests."""

    def __init__(self, version_of: Callable[[str], Optional[str]] = installed_version,
                 pip_install: Optional[Callable[[str], None]] = None,
                 install_torch: Optional[Callable[[str], bool]] = None, offer_engine: bool = False,
                 settings: Optional[Dict[str, object]] = None) -> None:
        self.version_of = version_of
        self._pip_install = pip_install
        self._install_torch = install_torch
        self.offer_engine = offer_engine  # the Segment module: inference is where the engine pays
        self._settings = settings  # a dict in tests; Slicer's QSettings otherwise

    def missing(self, requirements: Tuple[Tuple[str, str, str], ...] = REQUIREMENTS) -> List[Missing]:
        result = []
        for distribution, _module, minimum in requirements:
            found = self.version_of(distribution)
            if found is None or _version_tuple(found) < _version_tuple(minimum):
                result.append(Missing(distribution, minimum, found))
        return result

    def ensure(self, ask: Callable[[str], bool], log: Callable[[str], None] = print,
               optional: str = "no") -> InstallResult:
        """Install what is missing after ``ask(question)`` says yes. SimpleITK & co. are reported, never replaced.

        ``optional`` (:data:`OPTIONAL_OFFERS`): whether to offer the optional engine afterwards: "no" (scripts,
        where nobody answers), "once" (a person clicked Apply; skipped after a "no") or "again" (a person asked
        for the dependency check)."""
        if optional not in OPTIONAL_OFFERS:
            raise ValueError(f"optional must be one of {OPTIONAL_OFFERS}, not {optional!r}")
        missing = self.missing()
        result = InstallResult()
        if not missing:
            self._offer_engine(ask, log, result, optional)
            return result
        protected = [m for m in missing if m.distribution in NEVER_REPLACE]
        for item in protected:
            result.problems.append(f"{item.describe()}: this is Slicer's own package and LoGoNet does not replace "
                                   "it; use a newer Slicer")
        todo = [m for m in missing if m.distribution not in NEVER_REPLACE]
        if not todo:
            return result
        question = ("LoGoNet needs these Python packages, which will be downloaded and installed now "
                    "(this can take several minutes):\n\n" + "\n".join(f"  {m.describe()}" for m in todo)
                    + "\n\nInstall them?")
        if not ask(question):
            result.declined = True
            result.problems.append("the required Python packages were not installed: "
                                   + ", ".join(m.requirement for m in todo))
            return result
        for item in todo:
            log(f"Installing {item.requirement} ...")
            try:
                if item.distribution == "torch":
                    if not self.install_torch(item.requirement):
                        result.problems.append("PyTorch was not installed (install it with the PyTorch extension)")
                        continue
                else:
                    # --no-deps for MONAI: its only dependencies (torch, numpy) come from Slicer/PyTorchUtils.
                    flags = " --no-deps" if item.distribution == "monai" else ""
                    self.pip_install(f'"{item.requirement}"{flags}')
            except Exception as error:  # pip/network problems: report, do not crash the module
                LOG.warning("installing %s failed", item.requirement, exc_info=True)  # the details, for a report
                result.problems.append(f"installing {item.requirement} failed: {error}")
                continue
            result.installed.append(item.requirement)
            if item.found is not None:  # an older version was already imported: needs a restart
                result.restart_needed = True
        importlib.invalidate_caches()
        if result.ok:
            self._offer_engine(ask, log, result, optional)
        return result

    def _offer_engine(self, ask: Callable[[str], bool], log: Callable[[str], None], result: InstallResult,
                      optional: str) -> None:
        """Ask to install the optional CPU engine. A "no" is remembered; a failure is logged and changes
        nothing else (segmentation runs with torch, as ``--engine auto`` falls back to it)."""
        if not self.offer_engine or optional == "no" or (optional == "once" and self._setting(ENGINE_DECLINED_KEY)):
            return
        todo = self.missing(ENGINE_REQUIREMENTS)
        if not todo:
            return
        question = ("Optional: install the OpenVINO CPU engine, which makes segmentation on the CPU about twice as "
                    "fast (same labels; a download of about 100 MB)?\n\n"
                    + "\n".join(f"  {m.describe()}" for m in todo)
                    + "\n\nLoGoNet works without it. If you say no, you will not be asked again.")
        if not ask(question):
            self._set_setting(ENGINE_DECLINED_KEY, True)
            log("The optional OpenVINO engine was not installed; segmentation runs with PyTorch.")
            return
        for item in todo:
            log(f"Installing {item.requirement} ...")
            try:
                self.pip_install(f'"{item.requirement}"')
            except Exception as error:  # optional: report, never block segmentation
                LOG.warning("installing %s failed", item.requirement, exc_info=True)
                log(f"Installing the optional {item.requirement} failed ({error}); segmentation runs with PyTorch.")
                return
            result.installed.append(item.requirement)
        importlib.invalidate_caches()

    def _setting(self, key: str) -> bool:
        if self._settings is not None:
            return bool(self._settings.get(key, False))
        import qt

        return str(qt.QSettings().value(key, "false")).lower() == "true"

    def _set_setting(self, key: str, value: bool) -> None:
        if self._settings is not None:
            self._settings[key] = value
            return
        import qt

        qt.QSettings().setValue(key, "true" if value else "false")

    # Slicer-side effects, resolved lazily so the class works (and is testable) without Slicer.
    def pip_install(self, requirement: str) -> None:
        if self._pip_install is not None:
            return self._pip_install(requirement)
        import slicer

        slicer.util.pip_install(requirement)

    def install_torch(self, requirement: str) -> bool:
        if self._install_torch is not None:
            return bool(self._install_torch(requirement))
        try:
            import PyTorchUtils
        except ImportError as error:
            raise LoGoNetError("the PyTorch extension is missing: install 'PyTorch' from the Extensions Manager "
                               "and restart Slicer") from error
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                             torchVersionRequirement=requirement[len("torch"):])
        return torch is not None


class NoInstall:
    """An installer that never installs (tests, or a core environment that is known to be complete)."""

    def missing(self) -> List[Missing]:
        return []

    def ensure(self, ask: Callable[[str], bool], log: Callable[[str], None] = print,
               optional: str = "no") -> InstallResult:
        return InstallResult()


__all__ = ["DependencyInstaller", "NoInstall", "InstallResult", "Missing", "REQUIREMENTS", "ENGINE_REQUIREMENTS",
           "NEVER_REPLACE"]
