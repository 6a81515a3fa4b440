"""Do a self-training run's pseudo-labels drift? Each round's pseudo-labels of `cli adapt` against boxes.

A self-training round labels the user's smears with the model of the round before; what the model gets wrong with
confidence is taught back to it and can spread (confirmation bias). Where the smears have boxes (BCCD's train and
val smears do; `cli adapt` never reads them), this prints, per round and group, how many pixels were pseudo-labelled
that group and what share of them lies outside every box of that group (each box grown by `--margin` px at model
scale). A share rising from round to round is drift. Red cells start high on BCCD (it leaves some red cells
unboxed); what to read is the change across rounds.

    python bench/pseudo_drift.py loso/tecom7-st/adapt/bccd-trainval --voc ../shared/datasets/bccd/BCCD
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bloodcells.errors import BloodcellsError  # noqa: E402
from bloodcells.formats import read_boxes  # noqa: E402
from bloodcells.imageio import read_gray  # noqa: E402
from bloodcells.segmenter.adapt import IGNORE  # noqa: E402
from bloodcells.segmenter.realeval import CLASS_GROUP, GROUP_NAMES  # noqa: E402


def drift(run: Path, voc: Path, margin: int = 3) -> list[dict]:
    """Per round: pixels pseudo-labelled per group and the share of them outside every box of that group."""
    record = json.loads((run / "adapt.json").read_text())
    factors = record["factors"]
    boxes = {im.path.stem: im for im in read_boxes(voc, "auto", "all") if not im.error}
    missing = sorted(set(factors) - set(boxes))
    if missing:
        raise SystemExit(f"{voc}: no boxes for {len(missing)} of the run's images (e.g. {missing[0]}); give the "
                         "folder of boxes the run's images come from")
    rows = []
    for r in range(len(record.get("log") or [])):
        inside = np.zeros(len(GROUP_NAMES) + 1, np.int64)
        total = np.zeros(len(GROUP_NAMES) + 1, np.int64)
        for stem, f in factors.items():
            lab = read_gray(run / f"round-{r}" / f"{stem}.png")
            group = np.where(lab == IGNORE, -1, CLASS_GROUP[np.minimum(lab, len(CLASS_GROUP) - 1)])
            for g, name in enumerate(GROUP_NAMES, start=1):
                mask = np.zeros(lab.shape, bool)
                for b in boxes[stem].boxes:
                    if b.group == name:
                        x0, y0, x1, y1 = (int(round(v * f)) for v in b.xyxy)
                        mask[max(0, y0 - margin):y1 + margin, max(0, x0 - margin):x1 + margin] = True
                here = group == g
                total[g] += int(here.sum())
                inside[g] += int((here & mask).sum())
        rows.append({"round": r + 1, **{name: {"pixels": int(total[g]),
                                               "outside": round(1 - inside[g] / max(total[g], 1), 4)}
                                        for g, name in enumerate(GROUP_NAMES, start=1)}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="cli adapt --out folders (self-training)")
    ap.add_argument("--voc", type=Path, required=True, help="the boxes of the run's images (VOC, YOLO or CSV)")
    ap.add_argument("--margin", type=int, default=3, help="px at model scale each box is grown by")
    args = ap.parse_args()
    print("| run | round | " + " | ".join(f"{g} px, outside its boxes" for g in GROUP_NAMES) + " |")
    print("|---|---|" + "---|" * len(GROUP_NAMES))
    for run in args.runs:
        try:
            rows = drift(run, args.voc, args.margin)
        except (BloodcellsError, OSError, KeyError, ValueError) as e:
            raise SystemExit(f"{run}: not a readable self-training run of cli adapt ({e}); give its --out folder")
        for row in rows:
            cells = " | ".join(f"{row[g]['pixels']:,} ({100 * row[g]['outside']:.1f}%)" for g in GROUP_NAMES)
            print(f"| {run} | {row['round']} | {cells} |")


if __name__ == "__main__":
    main()
