"""Evaluation on real smears that only have boxes: how well synthetic training transfers to real images.

Each image is predicted (at a fixed or estimated scale) and its label map grouped into RBC (healthy +
infected), WBC (the five types) and platelet (thrombocyte + clump). Per group, 8-connected components
smaller than `min_fraction` of one cell's expected area are dropped as specks. Components are matched
to ground-truth boxes of the same group by the IoU of the component's bounding box with the box:
greedy, highest IoU first, each side used once, a pair counts when IoU >= `iou` (default 0.3: a
component's box is looser or tighter than a hand-drawn one, and touching cells of one group merge into
one component; 0.3 still rejects a component that only grazes a cell). Unmatched components are false
positives, unmatched boxes false negatives. WBC subtype accuracy: for each matched WBC whose image has
one subtype in the list, the majority WBC class over the component's pixels against that subtype.
"""
from __future__ import annotations

import csv
import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from bloodcells.classes import CLASSES, GROUPS, NAMES, NUM_CLASSES, index_of
from bloodcells.errors import BloodcellsError, check_out_folder
from bloodcells.formats import write_json
from bloodcells.imageio import IMAGE_SUFFIXES, read_rgb
from bloodcells.segmenter.count import MIN_FRACTION
from bloodcells.segmenter.infer import parse_scale
from bloodcells.segmenter.predict import load_predictor

GROUP_NAMES = ("rbc", "wbc", "platelet")
# the source's box label (lower case) -> group; anything else is counted as unknown and left out
LABEL_GROUPS = {"rbc": "rbc", "wbc": "wbc", "platelets": "platelet", "platelet": "platelet"}
# class index -> group index (0 background, then GROUP_NAMES order)
CLASS_GROUP = np.array([GROUP_NAMES.index(c.group) + 1 if c.group in GROUP_NAMES else 0 for c in CLASSES], np.int32)
WBC_CLASSES = tuple(index_of(n) for n in GROUPS["wbc"])
SUBTYPE_NAMES = {n.upper(): n for n in GROUPS["wbc"]}


@dataclass(frozen=True)
class GTBox:
    """A ground-truth box: its group (None when the label is unknown), the label as written, x0, y0, x1, y1."""

    group: str | None
    label: str
    xyxy: tuple[float, float, float, float]


@dataclass
class RealImage:
    """One annotated smear."""

    path: Path
    boxes: list[GTBox] = field(default_factory=list)


def _box(label: str, xyxy: Sequence[float]) -> GTBox:
    return GTBox(LABEL_GROUPS.get(label.strip().lower()), label.strip(), tuple(float(v) for v in xyxy))


def read_voc(root: str | Path, split: str = "test") -> list[RealImage]:
    """Pascal VOC: Annotations/*.xml + JPEGImages/, images listed in ImageSets/Main/<split>.txt ('all': every one)."""
    root = Path(root)
    ann = root / "Annotations"
    if not ann.is_dir():
        raise BloodcellsError(f"{root}: no Annotations/ folder; give a Pascal VOC folder (Annotations/, JPEGImages/)")
    if split == "all":
        stems = sorted(p.stem for p in ann.glob("*.xml"))
    else:
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise BloodcellsError(f"{listing}: no such split list; choose another --split or --split all")
        stems = [s.strip() for s in listing.read_text().split() if s.strip()]
    images = []
    for stem in stems:
        xml = ann / f"{stem}.xml"
        try:
            tree = ET.parse(xml).getroot()
        except FileNotFoundError:
            raise BloodcellsError(f"{xml}: listed in split {split!r} but missing; fix the split list") from None
        except ET.ParseError as e:
            raise BloodcellsError(f"{xml}: not valid XML ({e}); fix or remove it") from None
        name = tree.findtext("filename") or f"{stem}.jpg"
        path = root / "JPEGImages" / Path(name).name
        if not path.is_file():
            hits = [p for p in (root / "JPEGImages").glob(f"{stem}.*") if p.suffix.lower() in IMAGE_SUFFIXES]
            path = hits[0] if hits else path
        boxes = []
        for obj in tree.iter("object"):
            bb = obj.find("bndbox")
            if bb is None:
                continue
            try:
                xyxy = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                continue
            boxes.append(_box(obj.findtext("name") or "", xyxy))
        images.append(RealImage(path, boxes))
    return images


def read_yolo(root: str | Path, split: str = "test") -> list[RealImage]:
    """YOLO: images/[<split>/] + labels/[<split>/]<stem>.txt (class cx cy w h, 0..1) + classes.txt (one name a line)."""
    root = Path(root)
    names_file = root / "classes.txt"
    if not names_file.is_file():
        raise BloodcellsError(f"{root}: no classes.txt; a YOLO folder needs images/, labels/ and classes.txt")
    names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    img_dir, lbl_dir = root / "images", root / "labels"
    if split != "all" and (img_dir / split).is_dir():
        img_dir, lbl_dir = img_dir / split, lbl_dir / split
    elif split != "all":
        raise BloodcellsError(f"{img_dir / split}: no such split folder; use --split all for every image in {img_dir}")
    if not img_dir.is_dir():
        raise BloodcellsError(f"{img_dir}: no such folder; a YOLO folder needs images/, labels/ and classes.txt")
    images = []
    for path in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        boxes = []
        txt = lbl_dir / f"{path.stem}.txt"
        lines = txt.read_text().splitlines() if txt.is_file() else []
        if lines:
            h, w = read_rgb(path).shape[:2]
            for ln in lines:
                parts = ln.split()
                if len(parts) < 5:
                    continue
                k, cx, cy, bw, bh = int(float(parts[0])), *map(float, parts[1:5])
                label = names[k] if 0 <= k < len(names) else str(k)
                boxes.append(_box(label, ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)))
        images.append(RealImage(path, boxes))
    return images


def read_subtypes(path: str | Path) -> dict[str, str]:
    """WBC subtype per image key (the image number as text, or a file stem) from a CSV with Image and Category columns.

    Blank categories and lists of several types are ambiguous and left out; so are names that are not a WBC type.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise BloodcellsError(f"{path}: no such subtype list; check --wbc-labels") from None
    if rows and not {"Image", "Category"} <= set(rows[0]):
        raise BloodcellsError(f"{path}: needs columns Image and Category (like BCCD's wbc_subtype_labels_mooney.csv)")
    out = {}
    for r in rows:
        key, cat = (r.get("Image") or "").strip(), (r.get("Category") or "").strip().upper()
        if key and cat in SUBTYPE_NAMES:
            out[str(int(key)) if key.isdigit() else Path(key).stem] = SUBTYPE_NAMES[cat]
    return out


def subtype_of(stem: str, subtypes: Mapping[str, str]) -> str | None:
    """The listed subtype of an image: by its stem, or by the number at its end (BloodImage_00012 -> '12')."""
    if stem in subtypes:
        return subtypes[stem]
    m = re.search(r"(\d+)$", stem)
    return subtypes.get(str(int(m.group(1)))) if m else None


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (n, 4) with every box in b (m, 4), boxes as x0, y0, x1, y1."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def greedy_match(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(row, column) pairs, highest IoU first, each row and column at most once, IoU >= threshold."""
    rows, cols = np.nonzero(iou >= threshold)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_r: set[int] = set()
    used_c: set[int] = set()
    pairs = []
    for r, c in zip(rows[order].tolist(), cols[order].tolist()):
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            pairs.append((r, c))
    return pairs


@dataclass
class Components:
    """A group's components in one label map: boxes (n, 4) x0 y0 x1 y1, areas, and the class histogram of each."""

    boxes: np.ndarray
    areas: np.ndarray
    histograms: np.ndarray  # (n, NUM_CLASSES) pixel count of each class in the component


def group_components(labels: np.ndarray, min_area: Mapping[str, float]) -> dict[str, Components]:
    """Per group, its 8-connected components at least min_area[group] px large."""
    grouped = CLASS_GROUP[labels]
    out = {}
    for g, name in enumerate(GROUP_NAMES, start=1):
        n, cc, stats, _ = cv2.connectedComponentsWithStats((grouped == g).astype(np.uint8), connectivity=8)
        hist = np.bincount((cc.astype(np.int64) * NUM_CLASSES + labels).ravel(),
                           minlength=n * NUM_CLASSES).reshape(n, NUM_CLASSES)[1:]
        st = stats[1:]
        keep = st[:, cv2.CC_STAT_AREA] >= min_area.get(name, 0.0)
        st, hist = st[keep], hist[keep]
        x, y = st[:, cv2.CC_STAT_LEFT], st[:, cv2.CC_STAT_TOP]
        boxes = np.stack([x, y, x + st[:, cv2.CC_STAT_WIDTH], y + st[:, cv2.CC_STAT_HEIGHT]], axis=1).astype(np.float64)
        out[name] = Components(boxes.reshape(-1, 4), st[:, cv2.CC_STAT_AREA].astype(np.int64), hist)
    return out


def score_image(labels: np.ndarray, boxes: Sequence[GTBox], min_area: Mapping[str, float], iou: float = 0.3,
                subtype: str | None = None) -> dict[str, Any]:
    """Per group tp / fp / fn for one label map and its boxes, and (pred, true) WBC subtype pairs for matched WBCs."""
    comps = group_components(labels, min_area)
    result: dict[str, Any] = {"subtypes": []}
    for name in GROUP_NAMES:
        gt = np.array([b.xyxy for b in boxes if b.group == name], np.float64).reshape(-1, 4)
        c = comps[name]
        pairs = greedy_match(iou_matrix(c.boxes, gt), iou) if len(c.boxes) and len(gt) else []
        result[name] = {"tp": len(pairs), "fp": len(c.boxes) - len(pairs), "fn": len(gt) - len(pairs),
                        "gt": len(gt), "pred": len(c.boxes)}
        if name == "wbc" and subtype is not None:
            for ci, _ in pairs:
                wbc_hist = c.histograms[ci, list(WBC_CLASSES)]
                result["subtypes"].append((NAMES[WBC_CLASSES[int(np.argmax(wbc_hist))]], subtype))
    return result


def rates(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    """Recall, precision and F1 (None where undefined)."""
    recall = tp / (tp + fn) if tp + fn else None
    precision = tp / (tp + fp) if tp + fp else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"recall": recall, "precision": precision, "f1": f1}


def min_areas(areas: Mapping[int, float], factor: float, min_fraction: float = MIN_FRACTION) -> dict[str, float]:
    """Speck size per group at the input's scale: min_fraction of the group's smallest expected cell area / factor^2."""
    return {g: min_fraction * min(areas[index_of(n)] for n in GROUPS[g]) / (factor * factor) for g in GROUP_NAMES}


def detect_layout(root: str | Path) -> str:
    """'voc' or 'yolo' from the folder's contents."""
    root = Path(root)
    if (root / "Annotations").is_dir():
        return "voc"
    if (root / "classes.txt").is_file() and (root / "images").is_dir():
        return "yolo"
    raise BloodcellsError(f"{root}: neither Pascal VOC (Annotations/, JPEGImages/) nor YOLO (images/, labels/, "
                          "classes.txt); check the folder")


def evaluate_real(model_path: str | Path, root: str | Path, layout: str = "auto", split: str = "test",
                  scale: str | float = "auto", iou: float = 0.3, min_fraction: float = MIN_FRACTION,
                  wbc_labels: str | Path | None = None, out: str | Path | None = None,
                  max_images: int | None = None, tile: int = 224, overlap: float = 0.25, batch: int = 8,
                  precision: str = "auto", device: str = "auto", data: str | Path | None = None,
                  progress: bool = True, balance: bool = False) -> dict[str, Any]:
    """Predict every annotated smear of a split, match components to boxes per group, write metrics.json."""
    if not 0.0 < iou <= 1.0:
        raise BloodcellsError(f"--iou {iou}: must be above 0 and at most 1, e.g. 0.3")
    out = check_out_folder(out if out is not None else Path(model_path).parent / f"{Path(model_path).stem}-real-{split}")
    factor = parse_scale(scale)
    layout = detect_layout(root) if layout == "auto" else layout
    images = read_voc(root, split) if layout == "voc" else read_yolo(root, split)
    if max_images is not None:
        images = images[:max_images]
    if not images:
        raise BloodcellsError(f"{root}: no annotated images in split {split!r}")
    subtypes = read_subtypes(wbc_labels) if wbc_labels is not None else {}
    predictor = load_predictor(model_path, tile, overlap, batch, precision, device, data, balance)
    totals = {g: Counter() for g in GROUP_NAMES}
    unknown: Counter = Counter()
    sub_pairs: list[tuple[str, str]] = []
    per_image, failed, factors = [], [], []
    for im in tqdm(images, desc="evaluate-real", unit="img", disable=not progress):
        unknown.update(b.label for b in im.boxes if b.group is None)
        try:
            image = read_rgb(im.path)
            pred = predictor(image, factor)
        except BloodcellsError as e:
            failed.append(str(e))
            continue
        factors.append(pred.scale)
        s = score_image(pred.labels, im.boxes, min_areas(predictor.areas, pred.scale, min_fraction), iou,
                        subtype_of(im.path.stem, subtypes) if subtypes else None)
        for g in GROUP_NAMES:
            totals[g].update({k: s[g][k] for k in ("tp", "fp", "fn", "gt", "pred")})
        sub_pairs += s["subtypes"]
        per_image.append({"image": im.path.name, "scale": round(pred.scale, 4),
                          **{g: s[g] for g in GROUP_NAMES}})
    if not per_image:
        raise BloodcellsError("no image could be evaluated: " + "; ".join(failed[:3]))
    groups = {g: {**{k: int(totals[g][k]) for k in ("gt", "pred", "tp", "fp", "fn")},
                  **rates(totals[g]["tp"], totals[g]["fp"], totals[g]["fn"])} for g in GROUP_NAMES}
    correct = sum(p == t for p, t in sub_pairs)
    confusion = Counter(f"{t}->{p}" for p, t in sub_pairs)
    result: dict[str, Any] = {
        "model": str(model_path), "root": str(root), "layout": layout, "split": split,
        "images": len(per_image), "failed": failed,
        "scale": "auto" if factor is None else factor,
        "balance": balance,
        "scale_used": {"min": min(factors), "median": float(np.median(factors)), "max": max(factors)},
        "matching": {"rule": "greedy by IoU of component bounding box with GT box, per group", "iou": iou,
                     "min_fraction": min_fraction, "connectivity": 8},
        "areas_source": predictor.areas_source,
        "groups": groups,
        "wbc_subtype": {"matched_with_subtype": len(sub_pairs), "correct": int(correct),
                        "accuracy": correct / len(sub_pairs) if sub_pairs else None,
                        "pairs": dict(sorted(confusion.items()))},
        "unknown_labels": dict(unknown),
        "per_image": per_image,
        "out": str(out),
    }
    write_json(out / "metrics.json", result)
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """The per-group table and the subtype accuracy as aligned text."""
    def f(v: float | None) -> str:
        return "    -" if v is None else f"{v:5.3f}"

    lines = [f"{'group':<9} {'GT':>5} {'pred':>5} {'TP':>5} {'FP':>5} {'FN':>5}  {'recall':>6} {'prec':>6} {'F1':>6}"]
    for g, r in result["groups"].items():
        lines.append(f"{g:<9} {r['gt']:>5} {r['pred']:>5} {r['tp']:>5} {r['fp']:>5} {r['fn']:>5}  "
                     f"{f(r['recall']):>6} {f(r['precision']):>6} {f(r['f1']):>6}")
    st = result["wbc_subtype"]
    if st["matched_with_subtype"]:
        lines.append(f"WBC subtype accuracy {f(st['accuracy'])} ({st['correct']}/{st['matched_with_subtype']} "
                     "matched WBCs with a listed subtype)")
    su = result["scale_used"]
    lines.append(f"{result['images']} images, scale {result['scale']} (used {su['min']:.3f}..{su['max']:.3f}), "
                 f"IoU >= {result['matching']['iou']}")
    if result["unknown_labels"]:
        unknown = result["unknown_labels"].items()
        lines.append("unknown box labels (left out): " + ", ".join(f"{k} {v}" for k, v in unknown))
    if result["failed"]:
        lines.append(f"skipped {len(result['failed'])} unreadable image(s): " + "; ".join(result["failed"][:3]))
    return "\n".join(lines)
