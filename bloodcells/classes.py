"""The ten classes: the one table every part of the project imports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bloodcells.errors import BloodcellsError


@dataclass(frozen=True)
class CellClass:
    index: int
    name: str
    color: str  # hex RGB used in rendered maps (the original work's colours)
    diameter_40x: float  # typical diameter in px in a 224x224 scene at 40x (0: not a cell)
    group: str  # coarse group used when only boxes of RBC / WBC / platelet exist


CLASSES: tuple[CellClass, ...] = (
    CellClass(0, "background", "#000000", 0.0, "background"),
    CellClass(1, "eosinophil", "#00FFFF", 84.0, "wbc"),
    CellClass(2, "basophil", "#008080", 76.0, "wbc"),
    CellClass(3, "neutrophil", "#FABEBE", 82.0, "wbc"),
    CellClass(4, "lymphocyte", "#808000", 72.0, "wbc"),
    CellClass(5, "monocyte", "#000080", 90.0, "wbc"),
    CellClass(6, "thrombocyte", "#FFE100", 18.0, "platelet"),
    CellClass(7, "platelet_clump", "#FF00FF", 50.0, "platelet"),
    CellClass(8, "infected_rbc", "#FF0000", 37.0, "rbc"),
    CellClass(9, "healthy_rbc", "#00FF00", 37.0, "rbc"),
)

# Plasma (background) colour of composed scenes before per-canvas tone jitter; prediction can
# white-balance a real smear's background to it (--balance).
PLASMA_RGB = (236.0, 222.0, 210.0)

NUM_CLASSES = len(CLASSES)
NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
BY_NAME: dict[str, CellClass] = {c.name: c for c in CLASSES}
WBC = tuple(c.name for c in CLASSES if c.group == "wbc")
RBC = ("infected_rbc", "healthy_rbc")
PLATELET = ("thrombocyte", "platelet_clump")
GROUPS = {"rbc": RBC, "wbc": WBC, "platelet": PLATELET}


def _hex_to_rgb(h: str) -> tuple[int, int, int]:
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)


PALETTE = np.array([_hex_to_rgb(c.color) for c in CLASSES], dtype=np.uint8)  # (10, 3) RGB


def index_of(name: str) -> int:
    """Index of a canonical class name; KeyError when it is not one."""
    return BY_NAME[name].index


def cell_classes(value: str | Sequence[str] | None, flag: str) -> tuple[str, ...]:
    """Cell class names from 'a,b' or a list (case-insensitive, duplicates dropped, in the order given); an unknown
    name, or background, is one BloodcellsError naming `flag` and the choices."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name = item.lower()
        if name not in BY_NAME or name == NAMES[0]:
            raise BloodcellsError(f"{flag}: unknown class {item!r}; choose from {', '.join(NAMES[1:])}")
        if name not in names:
            names.append(name)
    return tuple(names)


def colorize(label: np.ndarray) -> np.ndarray:
    """Map a class-index array (H, W) to an RGB colour image (H, W, 3)."""
    return PALETTE[np.clip(label, 0, NUM_CLASSES - 1)]
