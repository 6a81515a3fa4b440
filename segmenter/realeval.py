"""Evaluation on real smears that only have boxes: how well synthetic training transfers to real images.

Each image is predicted (at a fixed or estimated scale) into cells, one object per cell (`cli predict`'s cells:
decoded from the model's instance output, or for older models the connected regions of each group), objects
smaller than `min_fraction` of their class's expected area dropped as specks. Cells are grouped into RBC
(healthy + infected), WBC (the five types) and platelet (thrombocyte + clump) and matched to ground-truth boxes
of the same group by the IoU of the cell's bounding box with the box: greedy, highest IoU first, each side used
once, a pair counts when IoU >= `iou` (default 0.3: a cell's box is looser or tighter than a hand-drawn one; 0.3
still rejects one that only grazes a cell). Unmatched cells are false positives, unmatched boxes false negatives.
WBC subtype accuracy: for each matched WBC whose image has one subtype in the list, the cell's class against that
subtype. Also reported: the per-image count error per group (|cells - boxes| / boxes, mean in %), and the share of
the red-cell pixels predicted infected (on smears without parasites it should be near 0).
Boxes, box label groups and subtypes are read by bloodcells.formats, the readers the importer uses too.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from bloodcells.classes import CLASSES, GROUPS, NAMES, index_of
from bloodcells.errors import BloodcellsError, check_out_folder
from bloodcells.formats import (AnnotatedImage, Box, SubtypeTable, detect_box_layout, read_boxes, read_wbc_subtypes,
                                write_json)
from bloodcells.imageio import read_rgb
from bloodcells.segmenter.card import REAL, record_evaluation
from bloodcells.segmenter.count import MIN_FRACTION
from bloodcells.segmenter.infer import parse_absent, parse_scale
from bloodcells.segmenter.instances import HEALTHY, INFECTED, MERGE, MIN_CONFIDENCE, SURE_INFECTED
from bloodcells.segmenter.instances import GROUP_OF, Cells
from bloodcells.segmenter.predict import load_predictor

GROUP_NAMES = ("rbc", "wbc", "platelet")  # the groups of formats.LABEL_GROUPS
# class index -> group index (0 background, then GROUP_NAMES order)
CLASS_GROUP = np.array([GROUP_NAMES.index(c.group) + 1 if c.group in GROUP_NAMES else 0 for c in CLASSES], np.int32)
WBC_CLASSES = tuple(index_of(n) for n in GROUPS["wbc"])


def subtype_of(image: str | Path, subtypes: SubtypeTable) -> str | None:
    """The WBC class listed for an image file; None when ambiguous, missing, or not one of the five WBC types."""
    name = subtypes.lookup(image).name
    return name.strip().lower() if name and name.strip().lower() in GROUPS["wbc"] else None


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


def score_image(cells: Cells, boxes: Sequence[Box], iou: float = 0.3, subtype: str | None = None) -> dict[str, Any]:
    """Per group tp / fp / fn of one image's predicted cells against its boxes, and (pred, true) WBC subtype pairs
    for matched WBCs."""
    groups = GROUP_OF[cells.classes] if len(cells) else np.zeros(0, np.int32)
    result: dict[str, Any] = {"subtypes": []}
    for g, name in enumerate(GROUP_NAMES, start=1):
        gt = np.array([b.xyxy for b in boxes if b.group == name], np.float64).reshape(-1, 4)
        which = np.flatnonzero(groups == g)
        pred = cells.boxes[which].astype(np.float64).reshape(-1, 4)
        pairs = greedy_match(iou_matrix(pred, gt), iou) if len(pred) and len(gt) else []
        result[name] = {"tp": len(pairs), "fp": len(pred) - len(pairs), "fn": len(gt) - len(pairs),
                        "gt": len(gt), "pred": len(pred)}
        if name == "wbc" and subtype is not None:
            result["subtypes"] += [(NAMES[int(cells.classes[which[ci]])], subtype) for ci, _ in pairs]
    return result


def predictor_method(predictor) -> str:
    """How the predictor separates cells: its model's instance output, or 'area' (class regions)."""
    return predictor.meta.get("config", {}).get("instance") or "area"


def rates(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    """Recall, precision and F1 (None where undefined)."""
    recall = tp / (tp + fn) if tp + fn else None
    precision = tp / (tp + fp) if tp + fp else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"recall": recall, "precision": precision, "f1": f1}


def evaluate_real(model_path: str | Path, root: str | Path, layout: str = "auto", split: str = "test",
                  scale: str | float = "auto", iou: float = 0.3, min_fraction: float = MIN_FRACTION,
                  wbc_labels: str | Path | None = None, out: str | Path | None = None,
                  max_images: int | None = None, tile: int = 224, overlap: float = 0.25, batch: int = 8,
                  precision: str = "auto", device: str = "auto", data: str | Path | None = None,
                  progress: bool = True, balance: bool = False, tta: bool = False,
                  absent: str | Sequence[str] | None = None, sure_infected: float | None = None,
                  join: bool | None = None, platelet_confidence: float | None = None) -> dict[str, Any]:
    """Predict every annotated smear of a split, match its cells to boxes per group, write metrics.json and add
    the scores to the model card beside the checkpoint."""
    if not 0.0 < iou <= 1.0:
        raise BloodcellsError(f"--iou {iou}: must be above 0 and at most 1, e.g. 0.3")
    out = check_out_folder(out if out is not None else Path(model_path).parent / f"{Path(model_path).stem}-real-{split}")
    factor = parse_scale(scale)
    layout = detect_box_layout(root) if layout == "auto" else layout
    images: list[AnnotatedImage] = read_boxes(root, layout, split)
    if max_images is not None:
        images = images[:max_images]
    if not images:
        raise BloodcellsError(f"{root}: no annotated images in split {split!r}")
    subtypes = read_wbc_subtypes(wbc_labels) if wbc_labels is not None else None
    predictor = load_predictor(model_path, tile, overlap, batch, precision, device, data, balance, tta=tta,
                               min_fraction=min_fraction, absent=absent, sure_infected=sure_infected, join=join,
                               platelet_confidence=platelet_confidence)
    totals = {g: Counter() for g in GROUP_NAMES}
    rbc_px = np.zeros(2, np.int64)  # pixels predicted infected, healthy
    count_err: dict[str, list[float]] = {g: [] for g in GROUP_NAMES}
    unknown: Counter = Counter()
    sub_pairs: list[tuple[str, str]] = []
    per_image, failed, factors = [], [], []
    for im in tqdm(images, desc="evaluate-real", unit="img", disable=not progress):
        if im.error:  # one bad annotation file costs its image, not the run
            failed.append(f"{im.annotation or im.path}: {im.error}")
            continue
        unknown.update(b.label for b in im.boxes if b.group is None)
        try:
            image = read_rgb(im.path)
            pred = predictor(image, factor)
        except BloodcellsError as e:
            failed.append(str(e))
            continue
        factors.append(pred.scale)
        s = score_image(pred.cells, im.boxes, iou, subtype_of(im.path, subtypes) if subtypes is not None else None)
        for g in GROUP_NAMES:
            totals[g].update({k: s[g][k] for k in ("tp", "fp", "fn", "gt", "pred")})
            if s[g]["gt"]:
                count_err[g].append(100.0 * abs(s[g]["pred"] - s[g]["gt"]) / s[g]["gt"])
        rbc_px += [int((pred.labels == INFECTED).sum()), int((pred.labels == HEALTHY).sum())]
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
        "matching": {"rule": "greedy by IoU of each predicted cell's bounding box with a GT box, per group",
                     "iou": iou, "min_fraction": min_fraction, "cells": predictor_method(predictor)},
        "tta": tta,
        "absent": [NAMES[c] for c in parse_absent(absent)],
        "sure_infected": SURE_INFECTED if sure_infected is None else sure_infected,
        "join": MERGE if join is None else join,
        "platelet_confidence": (max(MIN_CONFIDENCE.values()) if platelet_confidence is None
                                else platelet_confidence),
        "count_error_pct": {g: (float(np.mean(v)) if v else None) for g, v in count_err.items()},
        "rbc_infected_share": float(rbc_px[0] / rbc_px.sum()) if rbc_px.sum() else None,
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
    record_evaluation(model_path, REAL, result)
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """The per-group table and the subtype accuracy as aligned text."""
    def f(v: float | None) -> str:
        return "    -" if v is None else f"{v:5.3f}"

    lines = [f"{'group':<9} {'GT':>5} {'pred':>5} {'TP':>5} {'FP':>5} {'FN':>5}  {'recall':>6} {'prec':>6} {'F1':>6}"
             f"  {'count err':>9}"]
    for g, r in result["groups"].items():
        err = result.get("count_error_pct", {}).get(g)
        lines.append(f"{g:<9} {r['gt']:>5} {r['pred']:>5} {r['tp']:>5} {r['fp']:>5} {r['fn']:>5}  "
                     f"{f(r['recall']):>6} {f(r['precision']):>6} {f(r['f1']):>6}  "
                     f"{'-' if err is None else f'{err:.1f}%':>9}")
    st = result["wbc_subtype"]
    if st["matched_with_subtype"]:
        lines.append(f"WBC subtype accuracy {f(st['accuracy'])} ({st['correct']}/{st['matched_with_subtype']} "
                     "matched WBCs with a listed subtype)")
    if result.get("rbc_infected_share") is not None:
        lines.append(f"red-cell pixels predicted infected: {100 * result['rbc_infected_share']:.2f}%")
    if result.get("absent"):
        lines.append(f"held absent (never predicted): {', '.join(result['absent'])}")
    su = result["scale_used"]
    lines.append(f"{result['images']} images, scale {result['scale']} (used {su['min']:.3f}..{su['max']:.3f}), "
                 f"IoU >= {result['matching']['iou']}, cells: {result['matching']['cells']}")
    if result["unknown_labels"]:
        unknown = result["unknown_labels"].items()
        lines.append("unknown box labels (left out): " + ", ".join(f"{k} {v}" for k, v in unknown))
    if result["failed"]:
        lines.append(f"skipped {len(result['failed'])} unreadable image(s) or annotation(s): " + "; ".join(result["failed"][:3]))
    return "\n".join(lines)


def centre_cell(cells: Cells, shape: tuple[int, int], reach: float = 0.25) -> int | None:
    """The white cell a single-cell crop is about: the WBC under the image centre, else the WBC whose centre is
    nearest the image centre within `reach` of the image's diagonal; None when there is none."""
    h, w = shape
    wbc = np.flatnonzero(GROUP_OF[cells.classes] == GROUP_NAMES.index("wbc") + 1) if len(cells) else np.zeros(0, int)
    if not len(wbc):
        return None
    k = int(cells.instances[h // 2, w // 2])
    if k and k - 1 in set(wbc.tolist()):
        return k - 1
    d = np.hypot(cells.centres[wbc, 0] - (w - 1) / 2, cells.centres[wbc, 1] - (h - 1) / 2)
    j = int(np.argmin(d))
    return int(wbc[j]) if d[j] <= reach * np.hypot(h, w) else None


def evaluate_crops(model_path: str | Path, items: Sequence[tuple[Path, str]], scale: str | float = "auto",
                   tile: int = 224, overlap: float = 0.25, batch: int = 8, precision: str = "auto",
                   device: str = "auto", tta: bool = False, progress: bool = True,
                   balance: bool = False) -> dict[str, Any]:
    """WBC typing on single-cell crops (PBC, LISC, Tecom...): for each (image, true WBC class), whether the cell
    at the crop's centre is found and gets the right type. Returns accuracy overall and per class, and the
    confusion (true -> predicted, 'none' when no white cell was found at the centre). balance: white-balance each
    crop's background to the training plasma colour first (as `--balance` does)."""
    factor = parse_scale(scale)
    predictor = load_predictor(model_path, tile, overlap, batch, precision, device, balance=balance, tta=tta)
    pairs: list[tuple[str, str]] = []
    failed: list[str] = []
    for path, truth in tqdm(items, desc="crops", unit="img", disable=not progress):
        try:
            image = read_rgb(path)
            pred = predictor(image, factor)
        except BloodcellsError as e:
            failed.append(str(e))
            continue
        k = centre_cell(pred.cells, image.shape[:2])
        pairs.append((truth, "none" if k is None else NAMES[int(pred.cells.classes[k])]))
    if not pairs:
        raise BloodcellsError("no crop could be evaluated: " + "; ".join(failed[:3]))
    return {"model": str(model_path), **crop_summary(pairs), "failed": failed, "balance": balance}


def crop_summary(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Typing scores of (true class, predicted class or 'none') pairs: overall and per class, the share found, the
    confusion, and the pairs themselves (so that scores of several parts of a set can be joined)."""
    per_class = {}
    for c in sorted({t for t, _ in pairs}, key=NAMES.index):
        got = [p for t, p in pairs if t == c]
        per_class[c] = {"n": len(got), "accuracy": sum(p == c for p in got) / len(got)}
    return {"images": len(pairs), "accuracy": sum(t == p for t, p in pairs) / len(pairs), "per_class": per_class,
            "found": sum(p != "none" for _, p in pairs) / len(pairs),
            "confusion": dict(sorted(Counter(f"{t}->{p}" for t, p in pairs).items())),
            "pairs": [list(p) for p in pairs]}
