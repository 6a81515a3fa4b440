"""Cell counts from a class-index map: connected components per class, touching cells split by expected area.

The expected area of a class is the mean *visible* area of one object of that class in the training
scenes (class pixels / object count, so occlusion by other cells and cuts at the border are already in
it), or, without a dataset, the area of a disc of the class's 40x diameter. Both are at model scale
(40x), so counts are taken on the label map at model scale: `Prediction.model_labels`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np

from bloodcells.classes import BY_NAME, CLASSES, NAMES, NUM_CLASSES
from bloodcells.errors import BloodcellsError
from bloodcells.formats import read_json

MIN_FRACTION = 0.15  # components smaller than this share of one cell's expected area are specks


def table_areas() -> dict[int, float]:
    """Disc areas pi * (diameter_40x / 2)^2 of every cell class (the fallback without a dataset)."""
    return {c.index: math.pi * (c.diameter_40x / 2.0) ** 2 for c in CLASSES if c.diameter_40x > 0}


def expected_areas(dataset: Mapping[str, Any]) -> dict[int, float]:
    """Mean visible px area per object and class from a dataset.json's train split; the table where it has none."""
    areas = table_areas()
    try:
        pixels = dataset["class_pixels"]["train"]
        objects = dataset["object_counts"]["train"]
    except (KeyError, TypeError):
        return areas
    for c in areas:
        if c < len(pixels) and c < len(objects) and objects[c] and pixels[c] > 0:
            areas[c] = float(pixels[c]) / float(objects[c])
    return areas


def normalize_areas(raw: Mapping[Any, Any]) -> dict[int, float]:
    """Areas keyed by class index or name (e.g. a checkpoint's 'cell_area') -> {index: area}, table for the rest."""
    areas = table_areas()
    for key, value in raw.items():
        idx = BY_NAME[key].index if isinstance(key, str) and key in BY_NAME else int(key)
        if 0 < idx < NUM_CLASSES and value and float(value) > 0:
            areas[idx] = float(value)
    return areas


def resolve_areas(meta: Mapping[str, Any], data: str | Path | None = None) -> tuple[dict[int, float], str]:
    """Expected areas and their origin: the checkpoint's 'cell_area', else --data's dataset.json, else the table."""
    if meta.get("cell_area"):
        try:
            return normalize_areas(meta["cell_area"]), "checkpoint"
        except (ValueError, KeyError, TypeError):
            pass
    if data is not None:
        path = Path(data)
        path = path / "dataset.json" if path.is_dir() else path
        if not path.is_file():
            raise BloodcellsError(f"{path}: no dataset.json there; pass --data a composed dataset folder")
        return expected_areas(read_json(path)), f"dataset {path}"
    return table_areas(), "class table"


def count_cells(label_map: np.ndarray, cell_area: Mapping[int, float] | None = None,
                min_fraction: float = MIN_FRACTION) -> dict[str, int]:
    """Cells per class name (background always 0): 8-connected components, each worth max(1, round(area / expected))."""
    areas = table_areas()
    areas.update({int(k): float(v) for k, v in (cell_area or {}).items()})
    counts = {name: 0 for name in NAMES}
    present = np.unique(label_map)
    for c in present.tolist():
        if c == 0 or c >= NUM_CLASSES:
            continue
        expected = areas[c]
        n, _, stats, _ = cv2.connectedComponentsWithStats((label_map == c).astype(np.uint8), connectivity=8)
        comp = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
        comp = comp[comp >= min_fraction * expected]
        counts[NAMES[c]] = int(np.maximum(1, np.rint(comp / expected)).sum()) if comp.size else 0
    return counts
