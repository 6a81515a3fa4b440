"""Instance metrics on composed scenes, whose instance maps are exact: AP, panoptic quality, count error.

- AP at IoU 0.5 and averaged over IoU 0.5:0.95 (COCO's definition, computed by pycocotools' COCOeval on RLE masks;
  each predicted cell's score is its confidence).
- Panoptic quality per class (Kirillov et al. 2019): a predicted and a true cell of one class match when their mask
  IoU exceeds 0.5 (such matches are unique); PQ = sum of matched IoUs / (TP + FP / 2 + FN / 2).
- Count error per class: the mean over scenes of |predicted cells - true cells|.
True cells smaller than the speck size (the `min_area` that prediction drops, 15% of a class's mean visible cell
area) are slivers at the scene's border or cells almost hidden: they are neither missed nor counted, and a
prediction on one is neither right nor wrong (COCO 'crowd' regions).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from pycocotools import mask as cocomask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bloodcells.classes import GROUPS, NAMES, NUM_CLASSES

CELL_CLASSES = range(1, NUM_CLASSES)


def overlaps(gt: np.ndarray, pred: np.ndarray, n_gt: int, n_pred: int) -> np.ndarray:
    """Pixels shared by every true object 0..n_gt and every predicted object 0..n_pred (0: none): (n_gt + 1,
    n_pred + 1); row and column sums are the objects' areas."""
    return np.bincount(gt.ravel().astype(np.int64) * (n_pred + 1) + pred.ravel(),
                       minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)


def iou_matrix(gt: np.ndarray, pred: np.ndarray, n_gt: int, n_pred: int) -> np.ndarray:
    """Mask IoU of every true object 1..n_gt with every predicted object 1..n_pred: (n_gt, n_pred)."""
    inter = overlaps(gt, pred, n_gt, n_pred)
    a_gt, a_pred = inter.sum(axis=1), inter.sum(axis=0)
    i = inter[1:, 1:].astype(np.float64)
    union = a_gt[1:, None] + a_pred[None, 1:] - i
    return np.where(union > 0, i / np.maximum(union, 1), 0.0)


def _rle(inst: np.ndarray, n: int) -> list[dict]:
    """COCO RLE of objects 1..n of an instance map (counts as str for JSON-free use)."""
    if n == 0:
        return []
    stack = np.asfortranarray(np.stack([inst == k for k in range(1, n + 1)], axis=2).astype(np.uint8))
    rles = cocomask.encode(stack)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


@dataclass
class InstanceScorer:
    """Accumulates scenes: true and predicted cells (instance maps, classes, scores) -> the metrics above."""

    min_area: Mapping[int, float] = field(default_factory=dict)
    tp: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES))
    fp: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES))
    fn: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES))
    iou_sum: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES))
    count_err: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES))
    count_signed: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES))
    true_counts: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES))
    group_err: dict[str, float] = field(default_factory=lambda: {g: 0.0 for g in GROUPS})
    scenes: int = 0
    _gt: list[dict] = field(default_factory=list)
    _dt: list[dict] = field(default_factory=list)
    _images: list[dict] = field(default_factory=list)

    def add(self, gt: np.ndarray, gt_classes: np.ndarray, pred: np.ndarray, pred_classes: np.ndarray,
            scores: np.ndarray) -> None:
        """One scene: true instance map and the class of each true object 1..n; the same for the prediction, with a
        score per predicted object."""
        gt_classes, pred_classes = np.asarray(gt_classes, np.int64), np.asarray(pred_classes, np.int64)
        n_gt, n_pred = len(gt_classes), len(pred_classes)
        gt_area = np.bincount(gt.ravel(), minlength=n_gt + 1)[1:n_gt + 1]
        ignore = gt_area < np.array([self.min_area.get(int(c), 0.0) for c in gt_classes]) if n_gt else np.zeros(0, bool)
        iou = iou_matrix(gt, pred, n_gt, n_pred)
        same = gt_classes[:, None] == pred_classes[None, :]
        match = (iou > 0.5) & same
        matched_pred = match.any(axis=0)
        on_ignored = ((iou > 0.5) & ignore[:, None]).any(axis=0)
        for c in CELL_CLASSES:
            g, p = gt_classes == c, pred_classes == c
            m = match[np.ix_(g & ~ignore, p)]
            self.tp[c] += m.sum()
            self.iou_sum[c] += iou[np.ix_(g & ~ignore, p)][m].sum()
            self.fn[c] += (g & ~ignore).sum() - m.any(axis=1).sum()
            self.fp[c] += (p & ~matched_pred & ~on_ignored).sum()
            true_n = int((g & ~ignore).sum())
            self.count_err[c] += abs(int(p.sum()) - true_n)
            self.count_signed[c] += int(p.sum()) - true_n
            self.true_counts[c] += true_n
        for g, names in GROUPS.items():  # counts of a group: a cell typed as its neighbour class still counts
            members = [NAMES.index(n) for n in names]
            true_n = int((np.isin(gt_classes, members) & ~ignore).sum())
            self.group_err[g] += abs(int(np.isin(pred_classes, members).sum()) - true_n)
        self.scenes += 1
        image_id = len(self._images) + 1
        h, w = gt.shape
        self._images.append({"id": image_id, "height": h, "width": w})
        for k, (r, c) in enumerate(zip(_rle(gt, n_gt), gt_classes)):
            self._gt.append({"id": len(self._gt) + 1, "image_id": image_id, "category_id": int(c), "segmentation": r,
                             "area": float(gt_area[k]), "bbox": list(cocomask.toBbox(r)), "iscrowd": int(ignore[k])})
        for r, c, s in zip(_rle(pred, n_pred), pred_classes, scores):
            self._dt.append({"image_id": image_id, "category_id": int(c), "segmentation": r, "score": float(s)})

    def average_precision(self) -> dict[str, Any]:
        """COCO mask AP (IoU 0.5:0.95) and AP50, overall and per class (None for classes never seen)."""
        out: dict[str, Any] = {"ap": None, "ap50": None, "per_class_ap": [None] * NUM_CLASSES,
                               "per_class_ap50": [None] * NUM_CLASSES}
        if not self._gt or not self._dt:
            return out
        gt = COCO()
        gt.dataset = {"images": self._images, "annotations": self._gt,
                      "categories": [{"id": c, "name": NAMES[c]} for c in CELL_CLASSES]}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            gt.createIndex()
            dt = gt.loadRes(self._dt)
            ev = COCOeval(gt, dt, iouType="segm")
            ev.params.maxDets = [1, 10, 1000]  # dense scenes hold far more than COCO's 100 objects
            ev.evaluate()
            ev.accumulate()
        prec = ev.eval["precision"][:, :, :, 0, -1]  # (IoU thresholds, recall points, classes)
        per_ap, per_ap50 = [None] * NUM_CLASSES, [None] * NUM_CLASSES
        for k, c in enumerate(ev.params.catIds):
            p = prec[:, :, k]
            if (p > -1).any():
                per_ap[c] = float(p[p > -1].mean())
                p50 = p[0]
                per_ap50[c] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else None
        valid = prec > -1
        return {"ap": float(prec[valid].mean()) if valid.any() else None,
                "ap50": float(prec[0][valid[0]].mean()) if valid[0].any() else None,
                "per_class_ap": per_ap, "per_class_ap50": per_ap50}

    def result(self) -> dict[str, Any]:
        """Everything, per class in class-table order (index 0, background, is None)."""
        denom = self.tp + self.fp / 2 + self.fn / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            pq = np.where(denom > 0, self.iou_sum / np.maximum(denom, 1e-12), np.nan)
            sq = np.where(self.tp > 0, self.iou_sum / np.maximum(self.tp, 1), np.nan)
            rq = np.where(denom > 0, self.tp / np.maximum(denom, 1e-12), np.nan)
        seen = denom > 0
        n = max(self.scenes, 1)

        def per_class(v: np.ndarray) -> list[float | None]:
            return [None] + [float(v[c]) if np.isfinite(v[c]) else None for c in CELL_CLASSES]

        return {"scenes": self.scenes, **self.average_precision(),
                "pq": float(np.nanmean(pq[seen])) if seen[1:].any() else None,
                "per_class_pq": per_class(pq), "per_class_sq": per_class(sq), "per_class_rq": per_class(rq),
                "per_class_count_mae": per_class(self.count_err / n),
                "per_class_count_bias": per_class(self.count_signed / n),
                "per_class_true_per_scene": per_class(self.true_counts / n),
                "per_group_count_mae": {g: v / n for g, v in self.group_err.items()},
                "tp": self.tp.astype(int).tolist(), "fp": self.fp.astype(int).tolist(),
                "fn": self.fn.astype(int).tolist()}


def format_instance_table(r: Mapping[str, Any]) -> str:
    """Per class: AP50, AP, PQ, count MAE per scene, true cells per scene; then the overall AP / PQ."""
    def f(v: float | None, w: int = 6, d: int = 3) -> str:
        return f"{'-':>{w}}" if v is None else f"{v:{w}.{d}f}"

    width = max(len(n) for n in NAMES)
    lines = [f"{'cells':<{width}}  {'AP50':>6}  {'AP':>6}  {'PQ':>6}  {'cnt MAE':>7}  {'true/scene':>10}"]
    for c in CELL_CLASSES:
        if not r["per_class_true_per_scene"][c] and r["per_class_pq"][c] is None:
            continue
        lines.append(f"{NAMES[c]:<{width}}  {f(r['per_class_ap50'][c])}  {f(r['per_class_ap'][c])}  "
                     f"{f(r['per_class_pq'][c])}  {f(r['per_class_count_mae'][c], 7, 2)}  "
                     f"{f(r['per_class_true_per_scene'][c], 10, 1)}")
    lines.append(f"mask AP {f(r['ap'], 0)}   AP50 {f(r['ap50'], 0)}   PQ {f(r['pq'], 0)}   ({r['scenes']} scenes)")
    if r.get("per_group_count_mae"):
        lines.append("count error per scene (mean absolute): " + ", ".join(
            f"{g} {v:.2f}" for g, v in r["per_group_count_mae"].items()))
    return "\n".join(lines)
