"""Parasitised cells called healthy, by how visible their sprite's parasite is.

A composed scene labels a cell infected when its sprite came from an infected crop, whatever the crop shows. This
script measures each infected sprite's parasite (`composer.masks.parasite_share`: its largest dark, purple body over
the cell's area, at the sprite's native size), runs a model over a composed split and, for every true infected cell
found (a predicted red cell at IoU > 0.5), whether it was called healthy; the found cells are binned by their
sprite's parasite share. A model cannot tell an infected sprite that shows no parasite from a healthy cell: such
sprites are what `cli sprites import --min-parasite` rejects.

    python bench/parasite_swaps.py --model runs/realistic/best.pt --data data/realistic --bank sprites \
        --split test --images 400 [--sheet least.png]

`--sheet` also writes a contact sheet of the bank's infected sprites with the least parasite share, least first,
each tile marked with its share in percent, to see what the check rejects and what it keeps.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_sweep import HEALTHY, INFECTED, decode_today, guarded, predict_split, split_parser  # noqa: E402

from bloodcells.composer.bank import SpriteBank  # noqa: E402
from bloodcells.composer.masks import parasite_share  # noqa: E402
from bloodcells.formats import read_json, scene_paths, split_ids  # noqa: E402
from bloodcells.composer.sheet import sprite_tile  # noqa: E402
from bloodcells.composer.sprite import Sprite, mask_diameter  # noqa: E402
from bloodcells.errors import BloodcellsError  # noqa: E402
from bloodcells.imageio import read_rgba, write_png  # noqa: E402
from bloodcells.segmenter.instance_metrics import overlaps  # noqa: E402

EDGES = (0.0, 0.001, 0.002, 0.005, 0.008, 0.015, 1.0)  # parasite share bins


def found_infected(gt: np.ndarray, gt_cls: np.ndarray, pred: np.ndarray, pred_cls: np.ndarray,
                   least: float) -> list[tuple[int, bool]]:
    """(true object index k, called healthy) of each true infected cell of a scene with at least `least` pixels
    visible that a predicted red cell matches at IoU > 0.5."""
    ov = overlaps(gt, pred, len(gt_cls), len(pred_cls))
    ga, pa = ov.sum(axis=1), ov.sum(axis=0)
    iou = ov / np.maximum(ga[:, None] + pa[None, :] - ov, 1)
    red = np.concatenate([[False], np.isin(pred_cls, (HEALTHY, INFECTED))])
    iou[:, ~red] = 0.0
    out = []
    for k in np.flatnonzero(gt_cls == INFECTED) + 1:
        if ga[k] < least or iou[k].max() <= 0.5:
            continue
        out.append((int(k), bool(pred_cls[iou[k].argmax() - 1] == HEALTHY)))
    return out


def least_sheet(bank: Path, shares: dict[str, float], n: int = 50, per_row: int = 10, tile: int = 96) -> np.ndarray:
    """RGB contact sheet of the n infected sprites with the least parasite share, least first."""
    root = SpriteBank(bank).root
    paths = {r["id"]: root / r["path"] for r in SpriteBank(bank).records() if r["class"] == "infected_rbc"}
    tiles = []
    for sid in sorted(shares, key=lambda k: (shares[k], k))[:n]:
        rgba = read_rgba(paths[sid])
        t = sprite_tile(Sprite(sid, "infected_rbc", rgba, mask_diameter(rgba[..., 3])), tile, outline=False)
        cv2.putText(t, f"{100 * shares[sid]:.2f}", (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(t)
    tiles += [np.full((tile, tile, 3), 235, np.uint8)] * (-len(tiles) % per_row)
    rows = [np.hstack(tiles[i:i + per_row]) for i in range(0, len(tiles), per_row)]
    return np.vstack(rows) if rows else np.full((tile, tile * per_row, 3), 235, np.uint8)


def sprite_shares(bank: Path) -> dict[str, float]:
    """Parasite share of every infected sprite of a bank."""
    if not (bank / "index.jsonl").is_file():
        raise BloodcellsError(f"{bank}: no sprite bank here (no index.jsonl); pass --bank the folder the scenes "
                              "were composed from")
    sb = SpriteBank(bank)
    out = {}
    for r in sb.records():
        if r["class"] == "infected_rbc":
            rgba = read_rgba(sb.root / r["path"])
            out[r["id"]] = parasite_share(rgba[..., :3], rgba[..., 3] > 127)
    if not out:
        raise BloodcellsError(f"{bank}: the bank holds no infected_rbc sprites; import infected crops first "
                              "('cli sprites import kaggle ...')")
    return out


def table(rows: list[tuple[float, bool]]) -> list[dict]:
    """Per parasite-share bin: found infected cells, their share of all, the share called healthy, and the bin's
    share of all infected cells called healthy."""
    share = np.array([s for s, _ in rows], float)
    swapped = np.array([w for _, w in rows], bool)
    out = []
    for lo, hi in zip(EDGES[:-1], EDGES[1:]):
        k = (share >= lo) & (share < hi) if hi < 1 else share >= lo
        out.append({"bin": f"{lo:g}-{hi:g}", "cells": int(k.sum()), "of_found": float(k.mean()) if len(k) else 0.0,
                    "called_healthy": float(swapped[k].mean()) if k.any() else 0.0,
                    "of_swaps": float(swapped[k].sum() / max(swapped.sum(), 1))})
    return out


def main() -> None:
    guarded(report)


def report() -> None:
    ap = split_parser(__doc__)
    ap.add_argument("--bank", type=Path, required=True, help="the sprite bank the scenes were composed from")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sheet", type=Path, help="PNG: the infected sprites with the least parasite share")
    args = ap.parse_args()
    shares = sprite_shares(args.bank)
    if args.sheet:
        write_png(args.sheet, least_sheet(args.bank, shares))
        print(f"wrote {args.sheet}")
    preds, truths, areas, min_area = predict_split(args.model, args.data, args.split, args.images)
    ids = split_ids(args.data, args.split)  # the order predict_split runs them in
    ids = ids[:args.images] if args.images else ids
    rows, unknown = [], 0
    for sid, (probs, aux), (gt, gt_cls) in zip(ids, preds, truths):
        objects = read_json(scene_paths(args.data, args.split, sid).annotation)["objects"]
        cells = decode_today(probs, aux, areas, min_area)
        for k, swapped in found_infected(gt, gt_cls, cells.instances, cells.classes, min_area[HEALTHY]):
            s = shares.get(objects[k - 1]["sprite"])
            if s is None:
                unknown += 1
                continue
            rows.append((s, swapped))
    t = table(rows)
    print(f"{len(rows)} infected cells found ({unknown} whose sprite is not in {args.bank}); "
          f"{np.mean([w for _, w in rows]) if rows else 0.0:.1%} called healthy")
    print("parasite share of the sprite   cells (of found)   called healthy   share of all called healthy")
    for r in t:
        print(f"  {r['bin']:>12}          {r['cells']:6d} ({r['of_found']:5.1%})      {r['called_healthy']:6.1%}"
              f"           {r['of_swaps']:6.1%}")
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "data": str(args.data), "split": args.split,
                                        "bank": str(args.bank), "bins": t}, indent=1))


if __name__ == "__main__":
    main()
