"""Why red cells are miscounted on composed scenes: every true and every predicted red cell sorted by kind.

`cli evaluate` reports how many red cells a scene is off by; this script says what the missing and the extra ones
are, so that a change to the model or to the decoding can aim at the largest kind. Red cells are taken as one
group (a healthy cell called infected is still found). A true cell counts when at least `MIN_FRACTION` of a red
cell's expected area of it is visible (as `cli evaluate` counts).

    true red cells
      found      a predicted red cell covers it at IoU > 0.5
      merged     the object holding most of its predicted pixels takes a quarter or more of its own from another
                 true red cell: taken as one with a neighbour
      cut        two or more predicted objects each hold at least a quarter of it, none at IoU > 0.5
      missed     under half of it is predicted as red cells at all
      outline    the rest: found, but outlined at IoU <= 0.5
    predicted red cells that match none (IoU <= 0.5)
      piece      mostly on a true cell that another object matched, or that two or more objects hold a quarter
                 of each: a cell cut in two
      merger     two or more true cells each give it at least a quarter of its pixels
      no cell    mostly on pixels that are no red cell (plasma, a white cell, a platelet)
      outline    the rest

Each true cell is also binned by how much of it is visible (its visible area over a red cell's expected area) and
by whether the scene's edge cuts it, the two things composed scenes have that make a cell hard to count; and a found
cell by whether it was called the other red class (healthy for infected or the reverse), what the per-class PQ
counts against it and the count of red cells does not.

    python bench/count_errors.py --model runs/realistic/best.pt --data data/realistic --split val --images 400
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_sweep import HEALTHY, INFECTED, decode_today, floats, guarded, predict_split, split_parser  # noqa: E402

from bloodcells.segmenter.instance_metrics import overlaps  # noqa: E402

RED = (HEALTHY, INFECTED)
VISIBLE_BINS = (0.4, 0.7)  # visible share of an expected red cell: under 0.4, 0.4-0.7, 0.7 and more


def _shared(col: np.ndarray, red_rows: np.ndarray, g: int) -> bool:
    """Whether the predicted object whose overlaps with the true cells are `col` holds at least a quarter of its
    pixels from a true red cell other than g."""
    others = np.where(red_rows, col, 0)
    others[g] = 0
    return others.max() >= 0.25 * col.sum()


def sort_scene(gt: np.ndarray, gt_cls: np.ndarray, pred: np.ndarray, pred_cls: np.ndarray, expected: float,
               least: float) -> tuple[list[tuple[str, str, bool, str]], list[str]]:
    """(kind, visibility bin, cut by the edge, swap) of each counted true red cell, where swap is "" or, for a cell
    found but called the other red class, "infected->healthy" or "healthy->infected"; and the kind of each
    unmatched predicted red cell of one scene."""
    n_gt, n_pred = len(gt_cls), len(pred_cls)
    gt_red = np.isin(gt_cls, RED)
    pred_red = np.isin(pred_cls, RED)
    overlap = overlaps(gt, pred, n_gt, n_pred)
    gt_area, pred_area = overlap.sum(axis=1), overlap.sum(axis=0)
    red_cols = np.concatenate([[False], pred_red])
    red_rows = np.concatenate([[False], gt_red])
    ov = overlap[:, red_cols]  # true (0 = none) x predicted red cells
    pids = np.flatnonzero(red_cols)
    union = gt_area[:, None] + pred_area[None, pids] - ov
    iou = np.where(union > 0, ov / np.maximum(union, 1), 0.0)
    iou[~red_rows] = 0.0
    matched_pred = (iou[1:] > 0.5).any(axis=0)
    edge = np.zeros(n_gt + 1, bool)
    for border in (gt[0], gt[-1], gt[:, 0], gt[:, -1]):
        edge[np.unique(border)] = True
    # which true cell each predicted red cell mostly lies on (0: none)
    owner = ov.argmax(axis=0) if len(pids) else np.zeros(0, int)
    truths = []
    for g in np.flatnonzero(gt_red) + 1:
        if gt_area[g] < least:
            continue
        vis = gt_area[g] / expected
        vbin = "<0.4" if vis < VISIBLE_BINS[0] else ("0.4-0.7" if vis < VISIBLE_BINS[1] else ">=0.7")
        row = ov[g]
        swap = ""
        if (iou[g] > 0.5).any():
            kind = "found"
            called = pred_cls[pids[iou[g].argmax()] - 1]
            if called != gt_cls[g - 1]:
                swap = "infected->healthy" if called == HEALTHY else "healthy->infected"
        elif row.sum() < 0.5 * gt_area[g]:
            kind = "missed"
        elif _shared(ov[:, row.argmax()], red_rows, g):
            kind = "merged"
        elif (row >= 0.25 * gt_area[g]).sum() >= 2:
            kind = "cut"
        else:
            kind = "outline"
        truths.append((kind, vbin, bool(edge[g]), swap))
    extras = []
    for j in np.flatnonzero(~matched_pred):
        col = ov[:, j]
        red_share = col[red_rows].sum() / max(pred_area[pids[j]], 1)
        contributors = (col[red_rows] >= 0.25 * pred_area[pids[j]]).sum()
        g = owner[j]
        if red_share < 0.5:
            extras.append("no cell")
        elif contributors >= 2:
            extras.append("merger")
        elif red_rows[g] and ((iou[g] > 0.5).any() or (ov[g] >= 0.25 * gt_area[g]).sum() >= 2):
            extras.append("piece")
        else:
            extras.append("outline")
    return truths, extras


def main() -> None:
    guarded(report)


def report() -> None:
    ap = split_parser(__doc__)
    ap.add_argument("--h-maxima", type=floats, default=None, help="decode at these SEED_H values (default: today's)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    preds, truths, areas, min_area = predict_split(args.model, args.data, args.split, args.images)
    expected = areas[HEALTHY]
    out = {}
    for h in args.h_maxima or [None]:
        kinds, extra, by_bin, swapped, scene_err = Counter(), Counter(), Counter(), Counter(), []
        for (probs, aux), (gt, gt_cls) in zip(preds, truths):
            cells = decode_today(probs, aux, areas, min_area, h=h)
            t, e = sort_scene(gt, gt_cls, cells.instances, cells.classes, expected, min_area[HEALTHY])
            kinds.update(k for k, _, _, _ in t)
            by_bin.update((k, v, edge) for k, v, edge, _ in t)
            swapped.update((sw, v) for _, v, _, sw in t if sw)
            swapped.update(("of", v) for k, v, _, _ in t if k == "found")  # the found cells of each bin
            extra.update(e)
            scene_err.append(int(np.isin(cells.classes, RED).sum()) - len(t))
        n = len(preds)
        err = np.array(scene_err)
        label = "today's SEED_H" if h is None else f"SEED_H {h}"
        print(f"\n{label}: {n} scenes, {sum(kinds.values()) / n:.1f} true red cells a scene; count error "
              f"{np.abs(err).mean():.2f} a scene (bias {err.mean():+.2f})")
        print("true red cells, per scene:  " + "  ".join(f"{k} {kinds[k] / n:.2f}" for k in
                                                      ("found", "merged", "cut", "missed", "outline")))
        print("unmatched predicted, per scene:  " + "  ".join(f"{k} {extra[k] / n:.2f}" for k in
                                                           ("piece", "merger", "no cell", "outline")))
        print("by visible share and edge (true cells per scene: found / merged / cut / missed / outline):")
        for vbin in ("<0.4", "0.4-0.7", ">=0.7"):
            for edge in (False, True):
                row = [by_bin[(k, vbin, edge)] / n for k in ("found", "merged", "cut", "missed", "outline")]
                print(f"  visible {vbin:8s} {'edge' if edge else 'inner':5s}  " + " / ".join(f"{v:.2f}" for v in row))
        print("found but called the other red class, per scene (share of the found in that bin):")
        for sw in ("infected->healthy", "healthy->infected"):
            print(f"  {sw:18s} " + "  ".join(f"visible {v} {swapped[(sw, v)] / n:.2f} "
                                             f"({swapped[(sw, v)] / max(swapped[('of', v)], 1):.1%})"
                                             for v in ("<0.4", "0.4-0.7", ">=0.7")))
        out[label] = {"scenes": n, "truth": dict(kinds), "unmatched": dict(extra),
                      "by_bin": {f"{k}|{v}|{'edge' if e else 'inner'}": c for (k, v, e), c in by_bin.items()},
                      "swapped": {f"{k}|{v}": c for (k, v), c in swapped.items() if k != "of"},
                      "count_mae": float(np.abs(err).mean()), "count_bias": float(err.mean())}
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "data": str(args.data), "split": args.split,
                                        **out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
