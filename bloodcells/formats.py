"""The on-disk contract both halves share: dataset layout, `dataset.json`, JSON helpers.

The composer writes datasets and the segmenter reads them only through what is defined here
(../shared/DESIGN.md, "Dataset on disk"):

    <root>/dataset.json                   DatasetInfo below
    <root>/<split>/images/<id>.png        RGB
    <root>/<split>/labels/<id>.png        uint8 class index 0..9
    <root>/<split>/instances/<id>.png     uint16 instance id: k = the k-th object of the annotation, 0 = none
    <root>/<split>/annotations/<id>.json  objects (class, bbox, instance, pixels, ...), written last
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .classes import NAMES, NUM_CLASSES
from .errors import BloodcellsError
from .imageio import write_bytes_atomic

SPLITS = ("train", "val", "test")
SPLIT_ID = {s: i for i, s in enumerate(SPLITS)}
DATASET_FILE = "dataset.json"
DATASET_FORMAT = 2  # 2: instance maps beside the label maps


# ---- JSON ---------------------------------------------------------------------------------------

def json_safe(obj: Any) -> Any:
    """Replace NaN / inf floats by None and numpy scalars by Python ones, recursively, so the JSON is standard."""
    if isinstance(obj, (float, np.floating)):
        obj = float(obj)
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (indented, standard: NaN and inf become null)."""
    write_bytes_atomic(path, (json.dumps(json_safe(obj), indent=2) + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or malformed file is one BloodcellsError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BloodcellsError(f"{path}: not found; check the path") from None
    except IsADirectoryError:
        raise BloodcellsError(f"{path}: is a folder, not a JSON file; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BloodcellsError(f"{path}: not valid JSON ({e}); delete it and re-create it") from None


# ---- layout -------------------------------------------------------------------------------------

def scene_id(index: int) -> str:
    """The id (file stem) of the index-th scene of a split."""
    return f"{index:06d}"


@dataclass(frozen=True)
class ScenePaths:
    """The four files of one composed scene."""

    image: Path
    label: Path
    instances: Path
    annotation: Path


def scene_paths(root: str | Path, split: str, sid: str) -> ScenePaths:
    """Where scene `sid` of `split` lives under a dataset root."""
    base = Path(root) / split
    return ScenePaths(base / "images" / f"{sid}.png", base / "labels" / f"{sid}.png",
                      base / "instances" / f"{sid}.png", base / "annotations" / f"{sid}.json")


def split_ids(root: str | Path, split: str) -> list[str]:
    """Sorted scene ids of one split; every image must have a label of the same id."""
    root = Path(root)
    images, labels = root / split / "images", root / split / "labels"
    for folder in (images, labels):
        if not folder.is_dir():
            raise BloodcellsError(f"{folder}: missing; the dataset has no '{split}' split "
                                  f"(splits present: {', '.join(s for s in SPLITS if (root / s).is_dir()) or 'none'})")
    ids = sorted(p.stem for p in images.glob("*.png"))
    if not ids:
        raise BloodcellsError(f"{images}: no .png images; re-compose the dataset")
    have = {p.stem for p in labels.glob("*.png")}
    lacking = [i for i in ids if i not in have]
    if lacking:
        raise BloodcellsError(f"{labels / (lacking[0] + '.png')}: missing label for image {lacking[0]} "
                              f"({len(lacking)} without labels); re-compose the dataset")
    return ids


# ---- dataset.json -------------------------------------------------------------------------------

def median_frequency_weights(freqs: Sequence[float] | np.ndarray) -> np.ndarray:
    """Class weights by median-frequency balancing (Eigen & Fergus 2015): median(freq) / freq_c.

    `freqs` are per-class pixel counts or shares (the scale cancels); the median is over the classes that
    occur, and a class never seen gets the largest weight of the others."""
    f = np.asarray(freqs, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise BloodcellsError(f"class frequencies must be a non-empty list; got shape {f.shape}")
    if not np.isfinite(f).all() or (f < 0).any():
        raise BloodcellsError(f"class frequencies must be finite and >= 0; got {f.tolist()}")
    seen = f > 0
    if not seen.any():
        raise BloodcellsError("all class frequencies are zero; the dataset has no labelled pixels")
    w = np.zeros_like(f)
    w[seen] = np.median(f[seen]) / f[seen]
    w[~seen] = w[seen].max()
    return w


def _triple(value: object, key: str, path: Path) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        t = ()
    if len(t) != 3 or not all(math.isfinite(v) for v in t):
        raise BloodcellsError(f"{path}: '{key}' must be 3 numbers (RGB, 0..1 scale); got {value!r}")
    return t  # type: ignore[return-value]


def _per_class(value: object, key: str, path: Path) -> list[float] | None:
    if value is None:
        return None
    try:
        t = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        t = []
    if len(t) != NUM_CLASSES:
        raise BloodcellsError(f"{path}: '{key}' must be {NUM_CLASSES} numbers, one per class; got {value!r}")
    return t


def _per_split(value: object) -> dict[str, list[int]]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): [int(x) for x in v] for k, v in value.items() if isinstance(v, (list, tuple))}


@dataclass(frozen=True)
class DatasetInfo:
    """`<root>/dataset.json`: what the composer wrote and the segmenter relies on."""

    root: Path
    name: str = ""
    seed: int | None = None
    format: int = 1
    counts: dict[str, int] = field(default_factory=dict)
    class_pixels: dict[str, list[int]] = field(default_factory=dict)  # split -> pixels per class
    object_counts: dict[str, list[int]] = field(default_factory=dict)  # split -> visible objects per class
    class_frequencies: list[float] | None = None  # train split pixel shares
    class_weights: list[float] | None = None  # median-frequency weights of those shares
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # train images, per channel, 0..1 scale
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    classes: tuple[str, ...] = NAMES
    instances_per_scene: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> mean / min / max
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def path(self) -> Path:
        return self.root / DATASET_FILE

    @property
    def has_instances(self) -> bool:
        """Whether the scenes carry instance maps (datasets of format 2 on)."""
        return self.format >= 2

    def loss_weights(self) -> np.ndarray:
        """Class weights for the loss: as stored, else recomputed from the train-split frequencies."""
        if self.class_weights is not None:
            return np.asarray(self.class_weights, np.float64)
        if self.class_frequencies is not None:
            return median_frequency_weights(self.class_frequencies)
        raise BloodcellsError(f"{self.path}: has neither 'class_weights' nor 'class_frequencies'; "
                              "re-compose the dataset or train without class weights")

    @classmethod
    def read(cls, root: str | Path) -> DatasetInfo:
        """Load and check `<root>/dataset.json`; a missing or malformed file is a BloodcellsError."""
        root = Path(root)
        path = root / DATASET_FILE
        if not path.is_file():
            hint = "the folder does not exist" if not root.is_dir() else "it is not a composed dataset"
            raise BloodcellsError(f"{path}: not found ({hint}); compose one with 'cli compose' or check --data")
        meta = read_json(path)
        if not isinstance(meta, dict):
            raise BloodcellsError(f"{path}: expected a JSON object; re-compose the dataset")
        missing = [k for k in ("mean", "std") if k not in meta]
        if missing:
            raise BloodcellsError(f"{path}: lacks {', '.join(missing)}; re-compose the dataset")
        std = _triple(meta["std"], "std", path)
        if min(std) <= 0:
            raise BloodcellsError(f"{path}: 'std' must be > 0; got {list(std)}")
        classes = tuple(meta.get("classes") or NAMES)
        if classes != NAMES:
            raise BloodcellsError(f"{path}: classes {list(classes)} differ from this version's {list(NAMES)}; "
                                  "re-compose the dataset")
        return cls(root=root, name=str(meta.get("name", "")), seed=meta.get("seed"),
                   format=int(meta.get("format", 1)), counts={str(k): int(v) for k, v in (meta.get("counts") or {}).items()},
                   class_pixels=_per_split(meta.get("class_pixels")), object_counts=_per_split(meta.get("object_counts")),
                   class_frequencies=_per_class(meta.get("class_frequencies"), "class_frequencies", path),
                   class_weights=_per_class(meta.get("class_weights"), "class_weights", path),
                   mean=_triple(meta["mean"], "mean", path), std=std, classes=classes,
                   instances_per_scene=dict(meta.get("instances_per_scene") or {}), raw=meta)

    def write(self) -> None:
        """Write `<root>/dataset.json` atomically (raw keys the fields do not cover are kept)."""
        d = dict(self.raw)
        d.update({"format": self.format, "name": self.name, "seed": self.seed, "classes": list(self.classes),
                  "counts": self.counts, "class_pixels": self.class_pixels, "object_counts": self.object_counts,
                  "class_frequencies": self.class_frequencies, "class_weights": self.class_weights,
                  "mean": list(self.mean), "std": list(self.std),
                  "instances_per_scene": self.instances_per_scene})
        write_json(self.path, d)
