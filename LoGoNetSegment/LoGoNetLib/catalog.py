"""The model catalog LoGoNetSegment's model selector shows.

Three sources, merged:
1. the extension's ``Resources/ModelCatalog.json`` (the bundled demo model; paths relative to ``Resources``),
2. models registered by the user or by LoGoNetTrain (``<home>/models.json``), where home is ``~/.LoGoNet`` or
   ``$LOGONET_HOME``,
3. any model card folder dropped into ``<home>/models/`` (the manual / offline install path).

A model is a model-card folder (``model.json`` + ``weights.safetensors``, docs/interfaces.md). Here it is only
read as JSON, never with torch: the full validation happens in the worker (``logonet.modelcard.load``) and a
broken card is listed with its problem instead of crashing the module.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

from .core import resources_dir

META = "model.json"
WEIGHTS = "weights.safetensors"
CATALOG_FORMAT = "logonet-model-catalog"

PathLike = Union[str, "os.PathLike[str]"]


def logonet_home() -> Path:
    """Per-user folder for registered and installed models (``$LOGONET_HOME`` overrides ``~/.LoGoNet``)."""
    return Path(os.environ.get("LOGONET_HOME") or (Path.home() / ".LoGoNet")).expanduser()


def card_folder(path: PathLike) -> Path:
    """A model card folder, or a training output folder resolved to its ``best`` (else ``last``) card."""
    path = Path(path).expanduser()
    if (path / META).is_file():
        return path
    for sub in ("best", "last", "model"):
        if (path / sub / META).is_file():
            return path / sub
    return path


def read_card(path: PathLike) -> Dict:
    """Read ``model.json`` of a card folder; a clear :class:`ValueError` for anything that is not a usable card."""
    folder = card_folder(path)
    if not folder.is_dir():
        raise ValueError(f"model folder {folder} does not exist")
    meta_path = folder / META
    if not meta_path.is_file():
        raise ValueError(f"{folder} is not a LoGoNet model: expected a folder with {META} and {WEIGHTS} "
                         "(a LoGoNetTrain output folder also works)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as error:
        raise ValueError(f"{meta_path} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != "logonet-model":
        raise ValueError(f'{meta_path} is not a LoGoNet model card ("format" must be "logonet-model")')
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels:
        raise ValueError(f"{meta_path} has no labels: this model cannot segment (is it a pre-trained backbone? "
                         "fine-tune it first)")
    for entry in labels:
        if not (isinstance(entry, dict) and isinstance(entry.get("value"), int) and entry["value"] >= 1
                and isinstance(entry.get("name"), str)):
            raise ValueError(f'{meta_path}: every label needs an integer "value" >= 1 and a "name"; got {entry!r}')
    if not (folder / WEIGHTS).is_file():
        raise ValueError(f"the model {folder} has no {WEIGHTS}")
    return meta


@dataclass
class ModelEntry:
    id: str
    title: str
    path: Path
    source: str  # "bundled" | "registered" | "installed"
    description: str = ""
    meta: Dict = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def labels(self) -> List[Dict]:
        return list(self.meta.get("labels") or [])

    @property
    def usable(self) -> bool:
        return self.error is None

    def tooltip(self) -> str:
        if self.error:
            return f"Cannot be used: {self.error}"
        names = ", ".join(str(label.get("name")) for label in self.labels)
        dice = (self.meta.get("metrics") or {}).get("val_dice")
        text = f"{self.description}\nFolder: {self.path}\nSegments: {names}".strip()
        if isinstance(dice, dict) and dice:
            text += "\nValidation Dice: " + ", ".join(f"{k} {v:.2f}" for k, v in dice.items()
                                                     if isinstance(v, (int, float)))
        return text


def _model_items(path: Path) -> List[Dict]:
    """The ``{"models": [{"path": ..., ...}]}`` entries of a catalog or registry file. A missing, unreadable or
    hand-broken file gives no entries (logged) rather than a module that cannot open."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logging.warning("LoGoNet: ignoring the model list %s: %s", path, error)
        return []
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        logging.warning('LoGoNet: ignoring the model list %s: expected {"models": [...]}', path)
        return []
    return [item for item in models if isinstance(item, dict) and isinstance(item.get("path"), str)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


class ModelCatalog:
    """Lists models from the bundled catalog, the user's registry and the models folder."""

    def __init__(self, home: Optional[PathLike] = None, catalog_file: Optional[PathLike] = None) -> None:
        self.home = Path(home) if home is not None else logonet_home()
        self.catalog_file = Path(catalog_file) if catalog_file is not None else resources_dir() / "ModelCatalog.json"

    @property
    def registry_file(self) -> Path:
        return self.home / "models.json"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    # ------------------------------------------------------------------------------------------------ reading
    def _entry(self, model_id: str, title: str, path: Path, source: str, description: str = "") -> ModelEntry:
        entry = ModelEntry(id=model_id, title=title, path=card_folder(path), source=source, description=description)
        try:
            entry.meta = read_card(path)
            entry.description = description or str(entry.meta.get("description") or "")
        except ValueError as error:
            entry.error = str(error)
        return entry

    def bundled(self) -> List[ModelEntry]:
        items = _model_items(self.catalog_file)
        base = self.catalog_file.parent
        return [self._entry(str(item.get("id") or _slug(str(item["path"]))), str(item.get("title") or item["path"]),
                            base / str(item["path"]), "bundled", str(item.get("description") or ""))
                for item in items]

    def _registry(self) -> List[Dict]:
        return _model_items(self.registry_file)

    def models(self, include_unusable: bool = True) -> List[ModelEntry]:
        """Every known model, bundled first; ids are unique."""
        entries = self.bundled()
        entries += [self._entry(item.get("id") or _slug(Path(item["path"]).name), item.get("title") or item["path"],
                                Path(item["path"]), "registered") for item in self._registry()]
        if self.models_dir.is_dir():
            for folder in sorted(self.models_dir.iterdir()):
                if folder.is_dir() and (card_folder(folder) / META).is_file():
                    entries.append(self._entry(folder.name, folder.name, folder, "installed"))
        seen, unique = set(), []
        for entry in entries:
            key = str(entry.path.resolve()) if entry.path.exists() else entry.id
            if key in seen:
                continue
            seen.add(key)
            unique.append(entry)
        return [e for e in unique if include_unusable or e.usable]

    def find(self, spec: Union[str, PathLike]) -> ModelEntry:
        """A catalog id, or a model folder path; :class:`ValueError` when unknown or broken."""
        text = str(spec)
        for entry in self.models():
            if entry.id == text:
                if entry.error:
                    raise ValueError(entry.error)
                return entry
        path = Path(text).expanduser()
        if path.exists():
            entry = self._entry(_slug(path.name), path.name, path, "folder")
            if entry.error:
                raise ValueError(entry.error)
            return entry
        known = ", ".join(e.id for e in self.models()) or "none"
        raise ValueError(f"model {text!r} not found: choose a model from the list ({known}) or a model folder")

    # ------------------------------------------------------------------------------------------------ writing
    def register(self, path: PathLike, title: Optional[str] = None, model_id: Optional[str] = None) -> ModelEntry:
        """Add a model folder (e.g. a LoGoNetTrain output) to the user's registry; it must be a usable card."""
        path = Path(path).expanduser().resolve()
        read_card(path)  # refuse broken models up front, with the reason
        items = [item for item in self._registry() if Path(item["path"]).expanduser().resolve() != path]
        model_id = model_id or _slug(path.name)
        taken = {e.id for e in self.bundled()} | {item.get("id") for item in items}
        base, n = model_id, 2
        while model_id in taken:
            model_id, n = f"{base}-{n}", n + 1
        items.append({"id": model_id, "title": title or path.name, "path": str(path)})
        self._write_registry(items)
        return self.find(model_id)

    def unregister(self, model_id: str) -> None:
        self._write_registry([item for item in self._registry() if item.get("id") != model_id])

    def _write_registry(self, items: List[Dict]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".models.", suffix=".json", dir=str(self.home))
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"format": CATALOG_FORMAT, "version": 1, "models": items}, handle, indent=2)
        os.replace(tmp, self.registry_file)
