"""The BTCV 13-organ label schema and the TotalSegmentator -> BTCV id map.

Label values are the ones BTCV uses (1..13, 0 = background). Names, 0-255 RGB colors (Slicer's
GenericAnatomyColors where one exists) and DICOM/SNOMED-CT terminology travel into ``model.json``
(``labels`` list), the output label maps and the Slicer segmentation nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import UserError

#: DICOM coded concept: (coding scheme designator, code value, code meaning).
Code = Tuple[str, str, str]

_ANATOMY: Code = ("SCT", "123037004", "Anatomical Structure")
_RIGHT: Code = ("SCT", "24028007", "Right")
_LEFT: Code = ("SCT", "7771000", "Left")


@dataclass(frozen=True)
class Label:
    """One foreground label: value written in the label map, names, color and terminology."""

    value: int
    name: str  # human-readable, used as segment name in Slicer
    key: str  # snake_case identifier (TotalSegmentator style), stable for files and tables
    abbrev: str  # column header in Dice tables (paper Table style)
    color: Tuple[int, int, int]  # 0-255 RGB
    category: Code = _ANATOMY
    type: Code = ("SCT", "", "")
    modifier: Optional[Code] = None

    def terminology(self) -> Dict[str, List[str]]:
        """DICOM code triplets in the form ``model.json`` and the Slicer modules use."""
        out = {"category": list(self.category), "type": list(self.type)}
        if self.modifier is not None:
            out["type_modifier"] = list(self.modifier)
        return out

    def to_dict(self) -> Dict[str, object]:
        """The ``model.json`` ``labels`` entry."""
        return {"value": self.value, "name": self.name, "color": list(self.color),
                "terminology": self.terminology()}


BTCV_LABELS: Tuple[Label, ...] = (
    Label(1, "spleen", "spleen", "Spl", (157, 108, 162), type=("SCT", "78961009", "Spleen")),
    Label(2, "right kidney", "kidney_right", "RKid", (185, 102, 83), type=("SCT", "64033007", "Kidney"),
          modifier=_RIGHT),
    Label(3, "left kidney", "kidney_left", "LKid", (212, 126, 151), type=("SCT", "64033007", "Kidney"),
          modifier=_LEFT),
    Label(4, "gallbladder", "gallbladder", "Gall", (139, 150, 98), type=("SCT", "28231008", "Gallbladder")),
    Label(5, "esophagus", "esophagus", "Eso", (211, 171, 143), type=("SCT", "32849002", "Esophagus")),
    Label(6, "liver", "liver", "Liv", (221, 130, 101), type=("SCT", "10200004", "Liver")),
    Label(7, "stomach", "stomach", "Sto", (216, 132, 105), type=("SCT", "69695003", "Stomach")),
    Label(8, "aorta", "aorta", "Aor", (224, 97, 76), type=("SCT", "15825003", "Aorta")),
    Label(9, "inferior vena cava", "inferior_vena_cava", "IVC", (0, 151, 206),
          type=("SCT", "64131007", "Inferior vena cava")),
    Label(10, "portal and splenic veins", "portal_vein_and_splenic_vein", "Veins", (0, 112, 165),
          type=("SCT", "32764006", "Portal vein")),
    Label(11, "pancreas", "pancreas", "Pan", (249, 180, 111), type=("SCT", "15776009", "Pancreas")),
    Label(12, "right adrenal gland", "adrenal_gland_right", "Rad", (244, 214, 49),
          type=("SCT", "23451007", "Adrenal gland"), modifier=_RIGHT),
    Label(13, "left adrenal gland", "adrenal_gland_left", "Lad", (200, 170, 40),
          type=("SCT", "23451007", "Adrenal gland"), modifier=_LEFT),
)

#: value -> human-readable name, e.g. {1: "spleen", ...}
BTCV_NAMES: Dict[int, str] = {label.value: label.name for label in BTCV_LABELS}
#: snake_case key -> value, e.g. {"kidney_right": 2, ...}
BTCV_VALUES: Dict[str, int] = {label.key: label.value for label in BTCV_LABELS}
#: value -> 0-255 RGB
BTCV_COLORS: Dict[int, Tuple[int, int, int]] = {label.value: label.color for label in BTCV_LABELS}

#: TotalSegmentator (v2, task "total") id -> BTCV value (docs/architecture.md, "Data, models and measurements").
TOTALSEG_TO_BTCV: Dict[int, int] = {
    1: 1,  # spleen
    2: 2,  # kidney_right
    3: 3,  # kidney_left
    4: 4,  # gallbladder
    15: 5,  # esophagus
    5: 6,  # liver
    6: 7,  # stomach
    52: 8,  # aorta
    63: 9,  # inferior_vena_cava
    64: 10,  # portal_vein_and_splenic_vein
    7: 11,  # pancreas
    8: 12,  # adrenal_gland_right
    9: 13,  # adrenal_gland_left
}


def btcv_label_dicts(values: Optional[Sequence[int]] = None) -> List[Dict[str, object]]:
    """``model.json`` ``labels`` entries for the given BTCV values (default: all 13, in value order)."""
    wanted = set(BTCV_NAMES) if values is None else {int(v) for v in values}
    return [label.to_dict() for label in BTCV_LABELS if label.value in wanted]


def remap_labels(array: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Map label values through ``mapping``; values not in it become 0. Same shape, uint8 or uint16.

    A lookup table keeps this one vectorised pass even for 512^3 volumes.
    """
    array = np.asarray(array)
    if array.size and (array.min() < 0 or not np.issubdtype(array.dtype, np.integer)):
        raise ValueError("remap_labels expects a non-negative integer label array")
    top = int(array.max()) if array.size else 0
    table_size = max(top, max(mapping, default=0)) + 1
    out_dtype = np.uint8 if max(mapping.values(), default=0) < 256 else np.uint16
    table = np.zeros(table_size, dtype=out_dtype)
    for source, target in mapping.items():
        table[int(source)] = int(target)
    return table[array]


def totalseg_to_btcv(array: np.ndarray) -> np.ndarray:
    """Convert a TotalSegmentator label array to BTCV values (other structures -> background)."""
    return remap_labels(array, TOTALSEG_TO_BTCV)


def parse_label_names(raw: Any, source: object) -> Dict[int, str]:
    """MSD ``{"1": "liver"}`` or nnU-Net ``{"liver": 1}`` -> ``{1: "liver"}`` (background dropped)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise UserError(f"{source}: 'labels' must be an object mapping values to names")
    names: Dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # nnU-Net: name -> value
            names[int(value)] = str(key)
        elif isinstance(value, list):
            raise UserError(f"{source}: label {key!r} is a region (list of values); region-based nnU-Net "
                            "datasets are not supported, give one value per label")
        elif str(key).strip().lstrip("-").isdigit():  # MSD: "value" -> name
            names[int(key)] = str(value)
        else:
            raise UserError(f"{source}: cannot read label entry {key!r}: {value!r}")
    names.pop(0, None)
    return names
