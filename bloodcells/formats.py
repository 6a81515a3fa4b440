"""The on-disk contracts both halves share: what they read and write, and how it is drawn.

Sections, in order:
- JSON helpers (atomic, standard JSON).
- Composed datasets (../shared/DESIGN.md, "Dataset on disk"): the composer writes them and the segmenter
  reads them only through what is defined here:

    <root>/dataset.json                   DatasetInfo below
    <root>/<split>/images/<id>.png        RGB
    <root>/<split>/labels/<id>.png        uint8 class index 0..9
    <root>/<split>/instances/<id>.png     uint16 instance id: k = the k-th object of the annotation, 0 = none
    <root>/<split>/annotations/<id>.json  objects (class, bbox, instance, pixels, ...), written last

- Boxes on whole smears, one reader per format, all returning `AnnotatedImage`s of `Box`es (label and
  x0, y0, x1, y1 in pixels as written, floats): Pascal VOC, YOLO and boxes CSV, with their split lists,
  and the box label -> group table of evaluation (`LABEL_GROUPS`). The importer cuts sprites from
  them (integer pixels by `Box.pixels`: floor x0/y0, ceil x1/y1); evaluation on real smears scores
  against them (floats).
- Id CSVs: image id -> class (`read_id_csv`, the masked importer's --labels) and image -> WBC subtype
  (`read_wbc_subtypes`, BCCD's wbc_subtype_labels_mooney.csv), keys by `image_key`.
- The legend drawn under every picture of label maps.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

from .classes import NAMES, NUM_CLASSES, PALETTE
from .errors import BloodcellsError
from .imageio import IMAGE_SUFFIXES, write_bytes_atomic

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


def tied_weights(weights: Sequence[float] | np.ndarray, freqs: Sequence[float] | np.ndarray,
                 group: Sequence[int]) -> np.ndarray:
    """`weights` with the classes of `group` sharing one weight: the median-frequency weight of their pooled pixels.

    Median-frequency weights make each class count as if it were as common as the others, so a model trained with
    them calls an ambiguous healthy/infected red cell either way at even odds whatever the scenes' parasitemia.
    Tied, the two classes keep their weight as a group against the others, and the choice between them follows
    their shares in the scenes."""
    w = np.array(weights, dtype=np.float64)
    f = np.asarray(freqs, dtype=np.float64)
    if w.shape != f.shape:
        raise BloodcellsError(f"class weights and frequencies differ in length: {w.size} vs {f.size}")
    idx = sorted(set(int(i) for i in group))
    pooled = float(f[idx].sum()) if idx else 0.0
    if len(idx) < 2 or pooled <= 0:
        return w
    w[idx] = np.median(f[f > 0]) / pooled
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

    def loss_weights(self, tie: Sequence[int] = ()) -> np.ndarray:
        """Class weights for the loss: as stored, else recomputed from the train-split frequencies; the classes of
        `tie` (indices) share one weight (`tied_weights`)."""
        if self.class_weights is not None:
            w = np.asarray(self.class_weights, np.float64)
        elif self.class_frequencies is not None:
            w = median_frequency_weights(self.class_frequencies)
        else:
            raise BloodcellsError(f"{self.path}: has neither 'class_weights' nor 'class_frequencies'; "
                                  "re-compose the dataset or train without class weights")
        if not tie:
            return w
        if self.class_frequencies is None:
            raise BloodcellsError(f"{self.path}: has no 'class_frequencies' to tie class weights with; "
                                  "re-compose the dataset or train without --tie-weights")
        return tied_weights(w, self.class_frequencies, tie)

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


# ---- boxes on whole smears: Pascal VOC, YOLO, boxes CSV -----------------------------------------

BOX_LAYOUTS = ("voc", "yolo", "csv")
BOXES_CSV = "boxes.csv"
BOX_COLUMNS = ("image", "xmin", "ymin", "xmax", "ymax", "label")
# A box label (any case) -> the group evaluation on real smears scores it in; other labels are left out.
# Which class a label becomes when cells are cut is the importer's alias table (composer/aliases.py).
LABEL_GROUPS = {"rbc": "rbc", "wbc": "wbc", "platelets": "platelet", "platelet": "platelet"}
# px: YOLO's fractions times the image size carry float noise (0.5 * 200 = 100.00000000000001), which must
# not widen an integer box by a pixel
_PIXEL_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Box:
    """One annotated box: the label as written and x0, y0, x1, y1 in pixels as written (floats)."""

    label: str
    xyxy: tuple[float, float, float, float]

    @property
    def group(self) -> str | None:
        """'rbc', 'wbc' or 'platelet' for evaluation (LABEL_GROUPS); None for any other label."""
        return LABEL_GROUPS.get(self.label.strip().lower())

    def pixels(self) -> tuple[int, int, int, int]:
        """The smallest integer pixel box holding this one: floor x0 / y0, ceil x1 / y1 (x1, y1 exclusive)."""
        x0, y0, x1, y1 = self.xyxy
        t = _PIXEL_TOLERANCE
        return math.floor(x0 + t), math.floor(y0 + t), math.ceil(x1 - t), math.ceil(y1 - t)


@dataclass(frozen=True)
class AnnotatedImage:
    """One smear and its boxes; `error` says why it cannot be used (then it has no boxes)."""

    path: Path
    boxes: tuple[Box, ...] = ()
    annotation: Path | None = None  # the file the boxes come from (None: a YOLO image without a label file)
    error: str | None = None  # a short reason, the same for every image with this problem, so it can be counted


def _finite(values: Sequence[str | None]) -> tuple[float, ...]:
    """Numbers from text; ValueError when one is missing, not a number, or not finite."""
    out = tuple(float(v) for v in values)  # type: ignore[arg-type]  # None -> TypeError, caught by callers
    if not all(math.isfinite(v) for v in out):
        raise ValueError("not finite")
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as it decodes (EXIF rotation applied, as OpenCV does), from its header only."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise BloodcellsError(f"{path}: no such file; check the path") from None
    except (OSError, ValueError, Image.DecompressionBombError):
        raise BloodcellsError(f"{path}: not a readable image (corrupt or unsupported format); "
                              "replace or remove it") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # 5-8: stored rotated by 90 degrees


# VOC

def voc_split_file(root: str | Path, split: str) -> Path:
    """Where a Pascal VOC folder lists the annotation stems of a split."""
    return Path(root) / "ImageSets" / "Main" / f"{split}.txt"


def voc_split_stems(root: str | Path, split: str) -> list[str]:
    """Annotation stems of a VOC split, in listed order; 'all': every Annotations/*.xml, sorted."""
    root = Path(root)
    if split == "all":
        return sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    listing = voc_split_file(root, split)
    if not listing.is_file():
        raise BloodcellsError(f"{listing}: no such split list; choose another --split or --split all")
    try:
        text = listing.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BloodcellsError(f"{listing}: cannot read ({e}); fix or remove the split list") from None
    # first word of a line: VOC's per-class lists add a 1 / -1 after the stem
    return [ln.split()[0] for ln in text.splitlines() if ln.strip()]


def _voc_image_path(images: Path, filename: str | None, stem: str) -> Path:
    """`JPEGImages/<filename>` (its folders dropped: they are the annotator's), else `JPEGImages/<stem>.*`."""
    name = re.split(r"[\\/]", filename.strip())[-1] if filename and filename.strip() else ""
    if name and (images / name).is_file():
        return images / name
    hits = sorted(p for p in images.glob(f"{glob.escape(stem)}.*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return hits[0] if hits else images / (name or f"{stem}.jpg")


def _voc_image(root: Path, stem: str) -> AnnotatedImage:
    xml, images = root / "Annotations" / f"{stem}.xml", root / "JPEGImages"
    if not xml.is_file():
        return AnnotatedImage(_voc_image_path(images, None, stem), annotation=xml,
                              error="annotation missing (listed in the split list, no Annotations/<stem>.xml)")
    try:
        tree = ET.parse(xml).getroot()
    except (ET.ParseError, OSError):
        return AnnotatedImage(_voc_image_path(images, None, stem), annotation=xml,
                              error="unreadable VOC annotation (not valid XML)")
    path = _voc_image_path(images, tree.findtext("filename"), stem)
    boxes = []
    for obj in tree.iter("object"):
        bb = obj.find("bndbox")
        try:
            xyxy = _finite([bb.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")])  # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError):
            return AnnotatedImage(path, annotation=xml,
                                  error="VOC object without a numeric bndbox (xmin, ymin, xmax, ymax)")
        boxes.append(Box((obj.findtext("name") or "").strip(), xyxy))  # type: ignore[arg-type]
    if not path.is_file():
        return AnnotatedImage(path, annotation=xml, error="image not found (no JPEGImages/<filename> or <stem>.*)")
    return AnnotatedImage(path, tuple(boxes), xml)


def read_voc(root: str | Path, split: str = "all") -> list[AnnotatedImage]:
    """Pascal VOC: Annotations/<stem>.xml + JPEGImages/, a split's stems in ImageSets/Main/<split>.txt ('all': every one)."""
    root = Path(root)
    if not (root / "Annotations").is_dir():
        raise BloodcellsError(f"{root}: no Annotations/ folder; give a Pascal VOC folder (Annotations/*.xml, JPEGImages/)")
    return [_voc_image(root, stem) for stem in voc_split_stems(root, split)]


# YOLO

def yolo_classes_file(root: str | Path) -> Path | None:
    """A YOLO folder's class names: classes.txt, or labels/classes.txt."""
    root = Path(root)
    return next((f for f in (root / "classes.txt", root / "labels" / "classes.txt") if f.is_file()), None)


def _yolo_image(path: Path, txt: Path, names: Sequence[str]) -> AnnotatedImage:
    if not txt.is_file():
        return AnnotatedImage(path)  # YOLO: an image without a label file shows no objects
    try:
        rows = [ln.split() for ln in txt.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError):
        return AnnotatedImage(path, annotation=txt, error="unreadable YOLO label file")
    if not rows:
        return AnnotatedImage(path, annotation=txt)
    try:
        w, h = image_size(path)  # the fractions need the size; the header holds it
    except BloodcellsError:
        return AnnotatedImage(path, annotation=txt, error="unreadable image")
    boxes = []
    for parts in rows:
        try:
            if len(parts) < 5:
                raise ValueError("too few fields")
            k = int(_finite(parts[:1])[0])
            cx, cy, bw, bh = _finite(parts[1:5])
        except ValueError:
            return AnnotatedImage(path, annotation=txt,
                                  error="malformed YOLO label line (expected: class cx cy w h, fractions of the image)")
        label = names[k] if 0 <= k < len(names) else str(k)
        boxes.append(Box(label, ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)))
    return AnnotatedImage(path, tuple(boxes), txt)


def read_yolo(root: str | Path, split: str = "all") -> list[AnnotatedImage]:
    """YOLO: images/[<split>/] + labels/[<split>/]<stem>.txt (class cx cy w h, 0..1) + classes.txt; 'all': every split folder."""
    root = Path(root)
    names_file = yolo_classes_file(root)
    if names_file is None:
        raise BloodcellsError(f"{root}: no classes.txt (nor labels/classes.txt); a YOLO folder needs images/, labels/ "
                              "and classes.txt with one class name a line")
    try:
        names = [n.strip() for n in names_file.read_text(encoding="utf-8-sig").splitlines() if n.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise BloodcellsError(f"{names_file}: cannot read ({e}); save it as UTF-8 text, one class name a line") from None
    img_root = root / "images" if (root / "images").is_dir() else root  # images beside labels/ also work
    if split == "all":
        subs = [d.name for d in sorted(img_root.iterdir()) if d.is_dir()] if img_root != root else []
        folders = ["", *subs]
    elif (img_root / split).is_dir():
        folders = [split]
    else:
        raise BloodcellsError(f"{img_root / split}: no such split folder; use --split all for every image in {img_root}")
    return [_yolo_image(p, root / "labels" / sub / f"{p.stem}.txt", names)
            for sub in folders for p in _image_files(img_root / sub)]


# boxes CSV

def _column_name(header: str) -> str:
    """A header cell compared case-, space- and BOM-insensitively."""
    return re.sub(r"\s+", "", header.replace("\ufeff", "")).lower()


def _csv_rows(path: Path, flag: str) -> list[list[str]]:
    """The non-blank rows of a CSV (UTF-8, BOM tolerated); the first is the header."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BloodcellsError(f"{path}: not found; check {flag}") from None
    except IsADirectoryError:
        raise BloodcellsError(f"{path}: is a folder, not a CSV file; check {flag}") from None
    except UnicodeDecodeError:
        raise BloodcellsError(f"{path}: not UTF-8 text; save it as CSV (UTF-8)") from None
    except OSError as e:
        raise BloodcellsError(f"{path}: cannot read ({e.strerror}); check {flag}") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        raise BloodcellsError(f"{path}: empty; it needs a header row (check {flag})")
    return rows


def read_box_csv(path: str | Path, root: str | Path | None = None) -> list[AnnotatedImage]:
    """Boxes CSV: `image,xmin,ymin,xmax,ymax,label` (any column order and case), one row a box, image paths
    relative to `root` (default: the CSV's folder); images sorted by name."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    rows = _csv_rows(path, "--boxes-csv")
    head = [_column_name(h) for h in rows[0]]
    missing = [c for c in BOX_COLUMNS if c not in head]
    if missing:
        raise BloodcellsError(f"{path}: no column {', '.join(missing)}; the header must name "
                              f"{','.join(BOX_COLUMNS)} (any order and case)")
    col = {c: head.index(c) for c in BOX_COLUMNS}
    boxes: dict[str, list[Box]] = {}
    bad: set[str] = set()
    for n, r in enumerate(rows[1:], start=2):
        r = r + [""] * (len(head) - len(r))
        name = r[col["image"]].strip()
        if not name:
            raise BloodcellsError(f"{path}: row {n} has no image; fill in its image column or delete the row")
        try:
            xyxy = _finite([r[col[k]] for k in ("xmin", "ymin", "xmax", "ymax")])
        except ValueError:
            bad.add(name)
            continue
        boxes.setdefault(name, []).append(Box(r[col["label"]].strip(), xyxy))  # type: ignore[arg-type]
    out = []
    for name in sorted(set(boxes) | bad):
        img = root / name
        error = ("malformed boxes CSV row (coordinates not numbers)" if name in bad
                 else None if img.is_file() else "image not found")
        out.append(AnnotatedImage(img, () if error else tuple(boxes[name]), path, error))
    return out


# any layout

def detect_box_layout(root: str | Path, csv_path: str | Path | None = None) -> str:
    """'csv', 'voc' or 'yolo' from a folder's contents (a given or present boxes.csv first)."""
    root = Path(root)
    if not root.is_dir():
        raise BloodcellsError(f"{root}: no such folder; give the folder of the annotated smears")
    if csv_path is not None or (root / BOXES_CSV).is_file():
        return "csv"
    if (root / "Annotations").is_dir():
        return "voc"
    if (root / "labels").is_dir() or yolo_classes_file(root) is not None:
        return "yolo"
    raise BloodcellsError(f"{root}: no boxes found; expected Pascal VOC (Annotations/*.xml, JPEGImages/), YOLO "
                          f"(images/, labels/*.txt, classes.txt) or {BOXES_CSV} ({','.join(BOX_COLUMNS)})")


def read_boxes(root: str | Path, layout: str = "auto", split: str = "all",
               csv_path: str | Path | None = None) -> list[AnnotatedImage]:
    """The annotated smears of one split of a VOC, YOLO or CSV folder ('auto': detected; 'all': every image)."""
    root = Path(root)
    if layout == "auto":
        layout = detect_box_layout(root, csv_path)
    if layout == "voc":
        return read_voc(root, split)
    if layout == "yolo":
        return read_yolo(root, split)
    if layout == "csv":
        path = Path(csv_path) if csv_path is not None else root / BOXES_CSV
        if split != "all":
            raise BloodcellsError(f"{path}: a boxes CSV has no splits; use --split all")
        return read_box_csv(path, root)
    raise BloodcellsError(f"unknown box layout {layout!r}; choose one of: auto, {', '.join(BOX_LAYOUTS)}")


# ---- id CSVs: image id -> class, image -> WBC subtype -------------------------------------------

ID_COLUMNS = ("image", "id", "file", "filename", "name")
CLASS_COLUMNS = ("class", "label", "category", "subtype", "type")
SUBTYPE_AMBIGUOUS = "ambiguous WBC subtype (several types listed)"
SUBTYPE_MISSING = "missing WBC subtype (blank or not listed)"


def image_key(name: str | Path) -> str:
    """The key an image is listed under: its file name without an image suffix, lower-case; a number
    without leading zeros (`001.bmp`, `001` and `1` are all '1')."""
    s = Path(str(name).strip()).name
    stem = Path(s).stem if Path(s).suffix.lower() in IMAGE_SUFFIXES else s
    return str(int(stem)) if stem.isascii() and stem.isdigit() else stem.lower()


def _find_column(head: Sequence[str], words: Sequence[str], exclude: int | None = None) -> int | None:
    """The first column named exactly one of `words`, else the first whose name contains one."""
    for match in (lambda h, w: h == w, lambda h, w: w in h):
        for i, h in enumerate(head):
            if i != exclude and any(match(h, w) for w in words):
                return i
    return None


def read_id_csv(path: str | Path, flag: str = "--labels") -> dict[str, str]:
    """image_key -> the class as written, from a CSV with an id column and a class column (by header name)."""
    path = Path(path)
    rows = _csv_rows(path, flag)
    head = [_column_name(h) for h in rows[0]]
    id_col = _find_column(head, ID_COLUMNS)
    cls_col = _find_column(head, CLASS_COLUMNS, exclude=id_col)
    if id_col is None or cls_col is None:
        raise BloodcellsError(f"{path}: needs an image-id column ({'/'.join(ID_COLUMNS)}) and a class column "
                              f"({'/'.join(CLASS_COLUMNS)}) in its header, got {rows[0]}; fix the header")
    out = {}
    for r in rows[1:]:
        if len(r) > id_col and r[id_col].strip():
            out[image_key(r[id_col])] = r[cls_col].strip() if len(r) > cls_col else ""
    return out


@dataclass(frozen=True)
class Subtype:
    """The WBC subtype listed for an image: `name` as written, or None and the `reason` there is none."""

    name: str | None
    reason: str | None = None  # SUBTYPE_AMBIGUOUS or SUBTYPE_MISSING


@dataclass(frozen=True)
class SubtypeTable:
    """image_key -> Subtype, as listed in a subtype CSV."""

    path: Path
    entries: dict[str, Subtype]

    def lookup(self, image: str | Path) -> Subtype:
        """The subtype of an image file: by its key, else by the number its name ends in (BloodImage_00012 -> '12')."""
        key = image_key(Path(str(image)).name)
        if key in self.entries:
            return self.entries[key]
        m = re.search(r"(\d+)$", key)
        if m and str(int(m.group(1))) in self.entries:
            return self.entries[str(int(m.group(1)))]
        return Subtype(None, SUBTYPE_MISSING)


def read_wbc_subtypes(path: str | Path) -> SubtypeTable:
    """WBC subtype per image from a CSV like BCCD's `Image,Category` (Image: the N of BloodImage_000NN).

    A blank category is missing; a comma list (`NEUTROPHIL, EOSINOPHIL`, also `NEUTROPHIL, NEUTROPHIL`) is
    ambiguous. Keys follow `image_key`; `SubtypeTable.lookup` also matches an image by its trailing number."""
    path = Path(path)
    entries = {}
    for key, value in read_id_csv(path, "--wbc-labels").items():
        if not value:
            entries[key] = Subtype(None, SUBTYPE_MISSING)
        elif "," in value:
            entries[key] = Subtype(None, SUBTYPE_AMBIGUOUS)
        else:
            entries[key] = Subtype(value)
    return SubtypeTable(path, entries)


# ---- legend -------------------------------------------------------------------------------------

def legend(classes: Sequence[int], width: int, row_h: int = 22, col_w: int = 150) -> np.ndarray:
    """A white RGB strip with a colour swatch and the name of each class index given, wrapped to `width`."""
    per_row = max(1, (width - 8) // col_w)
    rows = max(1, -(-len(classes) // per_row))
    img = np.full((rows * row_h + 6, width, 3), 255, np.uint8)
    for k, c in enumerate(classes):
        x, y = 8 + (k % per_row) * col_w, 4 + (k // per_row) * row_h
        colour = tuple(int(v) for v in PALETTE[c])
        cv2.rectangle(img, (x, y + 3), (x + 14, y + 17), colour, -1)
        cv2.rectangle(img, (x, y + 3), (x + 14, y + 17), (0, 0, 0), 1)
        cv2.putText(img, NAMES[c], (x + 20, y + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img
