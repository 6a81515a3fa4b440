"""Why predicted cells and boxes do not match on real smears: every false positive and false negative sorted by kind.

`cli evaluate-real` counts a predicted cell without a box as a false positive and a box without a cell as a false
negative. This script says what they are, for one group (rbc, wbc or platelet), so that a low precision can be
told apart from a labelling habit:

    false positives (a predicted cell no box matched)
      piece       mostly inside a box that another cell matched: a cell cut in two, or a fragment shed by it
      border      touching the image edge: annotators often leave cut cells unboxed
      fragment    under 40% of the median matched cell's area
      clump       over twice the median matched cell's area: several cells taken as one
      near        overlaps an unmatched box, but at an IoU under the threshold: found, badly outlined
      no box      a whole cell-sized object with no box near it: an unboxed cell, or something that is no cell
    false negatives (a box no cell matched)
      merged      mostly inside a predicted cell that matched another box (or is a clump): merged with a neighbour
      near        overlaps an unmatched predicted cell at an IoU under the threshold
      other group a cell of another group lies on it (e.g. a red cell called a white cell)
      missed      nothing predicted there

It writes `<out>/box_errors.json` and a contact sheet per kind, `<out>/fp_<kind>.png` and `<out>/fn_<kind>.png`
(up to `--sheet-size` crops spread over the smears; red the cell's or box's own box, green every box of the
annotation), so one can look and count, say, which "no box" cells are real cells. The matching is `cli evaluate-real`'s (same predictor, same
greedy IoU rule), so the totals equal its tp / fp / fn.

    python bench/box_errors.py --model runs/realistic/best.pt --voc ../shared/datasets/bccd/BCCD --split test \\
        --group rbc --out runs/realistic/box-errors
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bloodcells.errors import BloodcellsError  # noqa: E402
from bloodcells.formats import read_boxes  # noqa: E402
from bloodcells.imageio import read_rgb, write_png  # noqa: E402
from bloodcells.segmenter.infer import parse_scale  # noqa: E402
from bloodcells.segmenter.predict import load_predictor  # noqa: E402
from bloodcells.segmenter.realeval import CLASS_GROUP, GROUP_NAMES, greedy_match, iou_matrix  # noqa: E402

FP_KINDS = ("piece", "border", "fragment", "clump", "near", "no box")
FN_KINDS = ("merged", "near", "other group", "missed")
EDGE = 3  # px: a box this close to the image edge touches it


def inside_share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)): the share of each box of `a` that lies inside each box of `b`."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    return inter / np.maximum(area, 1e-9)[:, None]


def sort_image(pred: np.ndarray, areas: np.ndarray, gt: np.ndarray, other: np.ndarray, shape: tuple[int, int],
               iou: float) -> dict:
    """Match one image's cells of a group to its boxes; the raw facts `kinds` needs (sizes are judged later, against
    the median over all images)."""
    ious = iou_matrix(pred, gt) if len(pred) and len(gt) else np.zeros((len(pred), len(gt)))
    pairs = greedy_match(ious, iou) if ious.size else []
    matched_pred = [p for p, _ in pairs]
    matched_gt = [g for _, g in pairs]
    fp = [i for i in range(len(pred)) if i not in matched_pred]
    fn = [j for j in range(len(gt)) if j not in matched_gt]
    h, w = shape
    in_matched = inside_share(pred[fp], gt[matched_gt]).max(axis=1, initial=0)
    fps = []
    for k, i in enumerate(fp):
        x0, y0, x1, y1 = pred[i]
        fps.append({"box": pred[i].tolist(), "area": float(areas[i]), "in_matched": float(in_matched[k]),
                    "border": bool(x0 <= EDGE or y0 <= EDGE or x1 >= w - EDGE or y1 >= h - EDGE),
                    "near": float(ious[i, fn].max(initial=0))})
    fns = []
    for j in fn:
        box = gt[[j]]
        fns.append({"box": gt[j].tolist(),
                    "in_matched_pred": float(inside_share(box, pred[matched_pred]).max(initial=0)),
                    "in_fp": np.flatnonzero(inside_share(box, pred[fp])[0] >= 0.5).tolist(),  # positions in `fp`
                    "near": float(ious[fp, j].max(initial=0)),
                    "other": float(inside_share(box, other).max(initial=0))})
    return {"tp": len(pairs), "fp": fps, "fn": fns, "matched_areas": [float(areas[p]) for p, _ in pairs]}


def fp_kind(f: dict, median: float) -> str:
    if f["in_matched"] >= 0.5:
        return "piece"
    if f["border"]:
        return "border"
    if f["area"] < 0.4 * median:
        return "fragment"
    if f["area"] > 2.0 * median:
        return "clump"
    if f["near"] >= 0.1:
        return "near"
    return "no box"


def fn_kind(f: dict, clumps: set[int]) -> str:
    if f["in_matched_pred"] >= 0.5 or any(i in clumps for i in f["in_fp"]):
        return "merged"
    if f["near"] >= 0.1:
        return "near"
    if f["other"] >= 0.5:
        return "other group"
    return "missed"


def crop(image: np.ndarray, box: list[float], boxes: np.ndarray, size: int = 96) -> np.ndarray:
    """A square crop around `box` (1.6x its size), the box in red and every annotated box in green."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, 0.8 * max(x1 - x0, y1 - y0, 8)
    a, b = int(max(cx - r, 0)), int(max(cy - r, 0))
    c, d = int(min(cx + r, image.shape[1])), int(min(cy + r, image.shape[0]))
    tile = np.ascontiguousarray(image[b:d, a:c]).copy()
    for g in boxes:
        cv2.rectangle(tile, (int(g[0]) - a, int(g[1]) - b), (int(g[2]) - a - 1, int(g[3]) - b - 1), (0, 200, 0), 1)
    cv2.rectangle(tile, (int(x0) - a, int(y0) - b), (int(x1) - a - 1, int(y1) - b - 1), (230, 0, 0), 1)
    s = size / max(tile.shape[:2])
    tile = cv2.resize(tile, (max(1, round(tile.shape[1] * s)), max(1, round(tile.shape[0] * s))),
                      interpolation=cv2.INTER_AREA)
    out = np.full((size, size, 3), 255, np.uint8)
    out[:tile.shape[0], :tile.shape[1]] = tile
    return out


def sheet(tiles: list[np.ndarray], cols: int = 10) -> np.ndarray:
    if not tiles:
        return np.full((96, 96, 3), 255, np.uint8)
    rows = -(-len(tiles) // cols)
    out = np.full((rows * 98, cols * 98, 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        out[r * 98:r * 98 + 96, c * 98:c * 98 + 96] = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--voc", type=Path, required=True, help="a folder of smears with boxes (VOC, YOLO or CSV)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--group", choices=GROUP_NAMES, default="rbc")
    ap.add_argument("--scale", default="auto")
    ap.add_argument("--iou", type=float, default=0.3)
    ap.add_argument("--absent", default=None)
    ap.add_argument("--sheet-size", type=int, default=60, help="at most this many crops per contact sheet")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    g = GROUP_NAMES.index(args.group) + 1
    predictor = load_predictor(args.model, absent=args.absent)
    factor = parse_scale(args.scale)
    per_image, images, failed = [], {}, []
    for im in read_boxes(args.voc, "auto", args.split):
        if im.error:  # as in evaluate-real: a bad annotation or image costs that smear, not the run
            failed.append(f"{im.annotation or im.path}: {im.error}")
            continue
        try:
            image = read_rgb(im.path)
        except BloodcellsError as e:
            failed.append(str(e))
            continue
        cells = predictor(image, factor).cells
        which = CLASS_GROUP[cells.classes] == g if len(cells) else np.zeros(0, bool)
        pred = cells.boxes[which].astype(np.float64).reshape(-1, 4)
        other = cells.boxes[~which].astype(np.float64).reshape(-1, 4)
        gt = np.array([b.xyxy for b in im.boxes if b.group == args.group], np.float64).reshape(-1, 4)
        r = sort_image(pred, cells.areas[which], gt, other, image.shape[:2], args.iou)
        r["image"], r["all_boxes"] = im.path.name, np.array([b.xyxy for b in im.boxes]).reshape(-1, 4)
        per_image.append(r)
        images[im.path.name] = im.path
    if not per_image:
        raise BloodcellsError(f"{args.voc}: no smear of split {args.split!r} could be scored: " + "; ".join(failed[:3]))
    median = float(np.median([a for r in per_image for a in r["matched_areas"]] or [1.0]))
    fp_count, fn_count = Counter(), Counter()
    fp_items: dict[str, list] = {k: [] for k in FP_KINDS}
    fn_items: dict[str, list] = {k: [] for k in FN_KINDS}
    for r in per_image:
        kinds = [fp_kind(f, median) for f in r["fp"]]
        clumps = {i for i, k in enumerate(kinds) if k == "clump"}
        fp_count.update(kinds)
        fn_kinds = [fn_kind(f, clumps) for f in r["fn"]]
        fn_count.update(fn_kinds)
        for f, k in zip(r["fp"], kinds):
            fp_items[k].append((r["image"], f["box"], r["all_boxes"]))
        for f, k in zip(r["fn"], fn_kinds):
            fn_items[k].append((r["image"], f["box"], r["all_boxes"]))
    tp = sum(r["tp"] for r in per_image)
    fp, fn = sum(fp_count.values()), sum(fn_count.values())
    args.out.mkdir(parents=True, exist_ok=True)
    sheets = [(f"fp_{k.replace(' ', '_')}", v) for k, v in fp_items.items() if v] + \
             [(f"fn_{k.replace(' ', '_')}", v) for k, v in fn_items.items() if v]
    for name, items in sheets:
        step = max(1, len(items) // args.sheet_size)  # spread over the smears, not the first few
        tiles = [crop(read_rgb(images[n]), b, ab) for n, b, ab in items[::step][:args.sheet_size]]
        write_png(args.out / f"{name}.png", sheet(tiles))
    result = {"model": str(args.model), "root": str(args.voc), "split": args.split, "group": args.group,
              "iou": args.iou, "images": len(per_image), "failed": failed, "tp": tp, "fp": fp, "fn": fn,
              "median_matched_area_px": median,
              "false_positives": {k: fp_count[k] for k in FP_KINDS},
              "false_negatives": {k: fn_count[k] for k in FN_KINDS}}
    (args.out / "box_errors.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.group} on {len(per_image)} smears: {tp} matched, {fp} cells without a box, {fn} boxes without a cell "
          f"(precision {tp / max(tp + fp, 1):.3f}, recall {tp / max(tp + fn, 1):.3f})")
    print("cells without a box: " + ", ".join(f"{k} {fp_count[k]}" for k in FP_KINDS))
    print("boxes without a cell: " + ", ".join(f"{k} {fn_count[k]}" for k in FN_KINDS))
    print(f"contact sheets, one per kind: {args.out}/fp_*.png, fn_*.png")
    for line in failed:
        print(f"skipped {line}")


if __name__ == "__main__":
    try:
        main()
    except BloodcellsError as e:
        sys.exit(f"error: {e}")
