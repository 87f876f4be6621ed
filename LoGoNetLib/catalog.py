"""The model catalog LoGoNetSegment's model selector shows.

Three sources, merged:
1. the extension's ``Resources/ModelCatalog.json`` (the bundled demo model; paths relative to ``Resources``),
2. models registered by the user or by LoGoNetTrain (``<home>/models.json``), where home is ``~/.LoGoNet`` or
   ``$LOGONET_HOME``,
3. any model card folder dropped into ``<home>/models/`` (the manual / offline install path).

A model is a model-card folder (``model.json`` + ``weights.safetensors``, docs/interfaces.md), or a training
output folder (its ``best/`` card, else ``last/``). It is read with the core's torch-free
:mod:`logonet.cardschema`, the same rules as the command line, never with torch; a broken card is listed with
its problem instead of crashing the module.

A catalog entry may also name a ``url`` (https) and the ``sha256`` of a zipped model card instead of a ``path``:
it is downloaded on first use (with progress), verified, unpacked without path traversal into
``<home>/models/<id>-<sha256[:12]>`` and used from there afterwards (:mod:`.download`).

A catalog ``title`` may say ``{organs}``: it is replaced by the number of labels the card has, so the title
cannot disagree with the model.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

from logonet import cardschema
from logonet.atomic import write_json_atomic

from .core import resources_dir
from .errors import LoGoNetError, from_core

META = cardschema.META
CATALOG_FORMAT = "logonet-model-catalog"

PathLike = Union[str, "os.PathLike[str]"]


def logonet_home() -> Path:
    """Per-user folder for registered and installed models (``$LOGONET_HOME`` overrides ``~/.LoGoNet``)."""
    return Path(os.environ.get("LOGONET_HOME") or (Path.home() / ".LoGoNet")).expanduser()


def card_folder(path: PathLike) -> Path:
    """The card a model folder stands for (:func:`logonet.cardschema.card_folder`: a training output folder gives
    its ``best/`` card, else ``last/``)."""
    return cardschema.card_folder(path)


def read_card(path: PathLike) -> Dict:
    """The validated ``model.json`` of a model that can segment, read with the command line's rules; a
    :class:`LoGoNetError` with the reason for anything the worker would refuse."""
    with from_core():
        folder = cardschema.card_folder(path)
        meta = cardschema.read_meta(folder)
        cardschema.require_labels(meta, folder)
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

    url: Optional[str] = None  # a model delivered as a zipped card (downloaded on first use)
    sha256: Optional[str] = None

    @property
    def downloaded(self) -> bool:
        return self.url is None or bool(self.meta)

    def tooltip(self) -> str:
        if self.error:
            return f"Cannot be used: {self.error}"
        if not self.downloaded:
            return f"{self.description}\nDownloaded on first use from {self.url}".strip()
        names = ", ".join(str(label.get("name")) for label in self.labels)
        text = f"{self.description}\nFolder: {self.path}\nSegments ({len(self.labels)}): {names}".strip()
        accuracy = dice_summary(self.meta)
        return text + ("\n" + accuracy if accuracy else "")


def _dice_text(value) -> Optional[str]:
    return f"{float(value):.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _per_organ(dice) -> str:
    if not isinstance(dice, dict):
        return ""
    parts = [f"{k} {_dice_text(v)}" for k, v in dice.items() if _dice_text(v) is not None]
    return ("\n  " + ", ".join(parts)) if parts else ""


def dice_summary(meta: Dict) -> str:
    """The card's accuracy, labelled for what it is: Dice on an unseen scan when the card has it, else the
    validation Dice named by where it was measured (a model's own training scan is not a held-out test)."""
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    unseen = _dice_text(metrics.get("unseen_mean_dice"))
    if unseen is not None or isinstance(metrics.get("unseen_dice"), dict):
        scan = str(metrics.get("unseen_scan") or "a scan it was not trained on")
        if unseen is None:
            values = [v for v in (metrics.get("unseen_dice") or {}).values() if _dice_text(v) is not None]
            unseen = _dice_text(sum(values) / len(values)) if values else "n/a"
        return f"Dice on unseen scan ({scan}): {unseen}" + _per_organ(metrics.get("unseen_dice"))
    mean = _dice_text(metrics.get("val_mean_dice"))
    per_organ = metrics.get("val_dice")
    if mean is None and isinstance(per_organ, dict):
        values = [v for v in per_organ.values() if _dice_text(v) is not None]
        mean = _dice_text(sum(values) / len(values)) if values else None
    if mean is None:
        return ""
    source = metrics.get("val_source")
    if source is None:  # cards written before val_source existed
        training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
        train_cases, val_cases = training.get("train_cases"), training.get("val_cases")
        if train_cases and val_cases is not None and sorted(map(str, train_cases)) == sorted(map(str, val_cases)):
            source = "training_scan"
    label = {"training_scan": "Dice on its training scan (not a held-out test)",
             "synthetic": "Dice on synthetic validation volumes (not real CT)",
             "held_out": "Dice on held-out validation cases"}.get(str(source),
                                                                  "Dice on its validation cases (source not recorded)")
    return f"{label}: {mean}" + _per_organ(per_organ)


def title_from_card(title: str, meta: Dict) -> str:
    """``{organs}`` in a catalog title becomes the card's label count ("?" until a download is made)."""
    labels = meta.get("labels") if isinstance(meta, dict) else None
    count = str(len(labels)) if isinstance(labels, list) and labels else "?"
    return title.replace("{organs}", count)


def _model_items(path: Path, keys=("path",)) -> List[Dict]:
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
    return [item for item in models if isinstance(item, dict) and any(isinstance(item.get(k), str) for k in keys)]


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
        except LoGoNetError as error:
            entry.error = str(error)
        entry.title = title_from_card(title, entry.meta)
        return entry

    def download_dir(self, model_id: str, sha256: str) -> Path:
        """Where a downloaded model lives: one folder per id and archive checksum (a new version is a new folder)."""
        return self.models_dir / f"{_slug(model_id)}-{sha256.lower()[:12]}"

    def _url_entry(self, item: Dict) -> ModelEntry:
        model_id = str(item.get("id") or _slug(Path(str(item["url"])).stem))
        title, description = str(item.get("title") or model_id), str(item.get("description") or "")
        sha = str(item.get("sha256") or "")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
            return ModelEntry(id=model_id, title=title, path=self.models_dir / model_id, source="bundled",
                              description=description, url=str(item["url"]),
                              error=f"the catalog entry '{model_id}' needs the sha256 of its download")
        folder = self.download_dir(model_id, sha)
        if (folder / META).is_file():  # downloaded before: use the cached card
            entry = self._entry(model_id, title, folder, "bundled", description)
        else:
            entry = ModelEntry(id=model_id, title=title_from_card(title, {}), path=folder, source="bundled",
                               description=description)
        entry.url, entry.sha256 = str(item["url"]), sha.lower()
        return entry

    def bundled(self) -> List[ModelEntry]:
        items = _model_items(self.catalog_file, keys=("path", "url"))
        base = self.catalog_file.parent
        return [self._url_entry(item) if isinstance(item.get("url"), str) and not isinstance(item.get("path"), str)
                else self._entry(str(item.get("id") or _slug(str(item["path"]))), str(item.get("title") or item["path"]),
                                 base / str(item["path"]), "bundled", str(item.get("description") or ""))
                for item in items]

    def ensure_downloaded(self, entry: ModelEntry,
                          progress: Optional[Callable[[int, Optional[int]], None]] = None) -> ModelEntry:
        """A catalog model given by URL, downloaded, verified and unpacked on first use (cached afterwards)."""
        if entry.downloaded or entry.error:
            return entry
        from .download import install_model_zip

        folder = install_model_zip(entry.url, entry.sha256, self.download_dir(entry.id, entry.sha256),
                                   check_card=read_card, progress=progress)
        fresh = next((e for e in self.bundled() if e.id == entry.id and e.path == folder), None)
        if fresh is None:  # the catalog changed meanwhile: describe the folder itself
            fresh = self._entry(entry.id, entry.title, folder, entry.source, entry.description)
            fresh.url, fresh.sha256 = entry.url, entry.sha256
        if fresh.error:
            raise LoGoNetError(fresh.error)
        return fresh

    def _registry(self) -> List[Dict]:
        return _model_items(self.registry_file)

    def models(self, include_unusable: bool = True) -> List[ModelEntry]:
        """Every known model, bundled first; ids are unique."""
        entries = self.bundled()
        entries += [self._entry(item.get("id") or _slug(Path(item["path"]).name), item.get("title") or item["path"],
                                Path(item["path"]), "registered") for item in self._registry()]
        if self.models_dir.is_dir():
            for folder in sorted(self.models_dir.iterdir()):
                if folder.is_dir() and not folder.name.startswith(".") and (card_folder(folder) / META).is_file():
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
        """A catalog id, or a model folder path; :class:`LoGoNetError` when unknown or broken."""
        text = str(spec)
        for entry in self.models():
            if entry.id == text:
                if entry.error:
                    raise LoGoNetError(entry.error)
                return entry
        path = Path(text).expanduser()
        if path.exists():
            entry = self._entry(_slug(path.name), path.name, path, "folder")
            if entry.error:
                raise LoGoNetError(entry.error)
            return entry
        known = ", ".join(e.id for e in self.models()) or "none"
        raise LoGoNetError(f"model {text!r} not found: choose a model from the list ({known}) or a model folder")

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

    def _write_registry(self, items: List[Dict]) -> None:
        write_json_atomic({"format": CATALOG_FORMAT, "version": 1, "models": items}, self.registry_file)
