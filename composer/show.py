"""Pictures of a composed dataset: scenes beside their colour-coded label maps, with a legend."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from bloodcells.classes import colorize
from bloodcells.errors import BloodcellsError
from bloodcells.formats import legend
from bloodcells.imageio import read_gray, read_rgb


def _pair(data: Path, split: str, sid: str) -> tuple[np.ndarray, set[int]]:
    """A scene beside its colour map, framed, and the classes it shows."""
    img = read_rgb(Path(data) / split / "images" / f"{sid}.png")
    lab = read_gray(Path(data) / split / "labels" / f"{sid}.png")
    pair = np.hstack([img, np.full((img.shape[0], 4, 3), 255, np.uint8), colorize(lab)])
    return np.pad(pair, ((4, 4), (4, 4), (0, 0)), constant_values=255), set(np.unique(lab).tolist())


def _caption(text: str, width: int, h: int = 22) -> np.ndarray:
    strip = np.full((h, width, 3), 255, np.uint8)
    cv2.putText(strip, text, (8, h - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def grid(data: Path | Sequence[Path], split: str = "train", n: int = 16, cols: int = 4, seed: int = 0) -> np.ndarray:
    """n scenes of a split (a seeded sample), each image beside its colour map, legend below.

    Several datasets (e.g. one recipe composed with two blends): the same scene ids side by side, one column per
    dataset, each headed by its folder name."""
    datasets = [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]
    ids_per = []
    for d in datasets:
        folder = d / split / "images"
        if not folder.is_dir():
            raise BloodcellsError(f"{folder}: no such split folder; compose a dataset first ('cli compose')")
        ids = sorted(p.stem for p in folder.glob("*.png"))
        if not ids:
            raise BloodcellsError(f"{folder}: no scenes yet; run 'cli compose' first")
        ids_per.append(ids)
    ids = sorted(set.intersection(*map(set, ids_per)))
    if not ids:
        raise BloodcellsError(f"{', '.join(map(str, datasets))}: no scene id in common to show side by side")
    rng = np.random.default_rng(seed)
    pick = [ids[i] for i in sorted(rng.choice(len(ids), size=min(n, len(ids)), replace=False))]
    present: set[int] = set()
    if len(datasets) > 1:  # one row per scene, one column per dataset
        cols = len(datasets)
        tiles = []
        for sid in pick:
            for d in datasets:
                t, shown = _pair(d, split, sid)
                tiles.append(t)
                present |= shown
        head = np.hstack([_caption(d.name, tiles[0].shape[1]) for d in datasets])
    else:
        tiles = []
        for sid in pick:
            t, shown = _pair(datasets[0], split, sid)
            tiles.append(t)
            present |= shown
        head = None
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.hstack(tiles[r:r + cols]) for r in range(0, len(tiles), cols)]
    body = np.vstack(([head] if head is not None else []) + rows)
    return np.vstack([body, legend(sorted(present), body.shape[1])])
