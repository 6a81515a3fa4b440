"""How far each real source's background lies from the composed scenes' plasma colour (`infer.plasma_tint`).

`cli predict` names the smears whose background lies farther than `infer.TINT_LIMIT` from the scenes' plasma and
suggests `--balance`. This prints the distance over every image folder given (each `NAME=GLOB`; by default the
real sources of ../shared/datasets), so the limit can be checked against labs whose plasma the scenes hold and
labs whose plasma they do not:

    python bench/plasma_tint.py                                    # the shared datasets
    python bench/plasma_tint.py mylab='smears/*.jpg'               # your own smears
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bloodcells.errors import BloodcellsError  # noqa: E402
from bloodcells.imageio import read_rgb  # noqa: E402
from bloodcells.segmenter.infer import TINT_LIMIT, plasma_tint  # noqa: E402

SOURCES = {"bccd": "bccd/BCCD/JPEGImages/*.jpg", "pbc": "pbc/**/*.jpg", "lisc": "lisc_crops/**/*.png",
           "tecom": "wbc_tecom/**/*.bmp"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", help="NAME=GLOB (default: the real sources of --datasets)")
    ap.add_argument("--datasets", type=Path,
                    default=Path(os.environ.get("BLOODCELLS_DATA", ROOT.parent / "shared" / "datasets")))
    ap.add_argument("--max", type=int, default=200, help="at most this many images a source, spread evenly")
    args = ap.parse_args()
    bad = [f for f in args.folders if "=" not in f]
    if bad:
        ap.error(f"{bad[0]!r}: give each folder as NAME=GLOB, e.g. mylab='smears/*.jpg'")
    folders = dict(f.split("=", 1) for f in args.folders) if args.folders else \
        {k: str(args.datasets / v) for k, v in SOURCES.items()}
    print(f"limit {TINT_LIMIT}: distance of each image's background to the scenes' plasma (log-chromaticity)")
    for name, pattern in folders.items():
        files = sorted(glob.glob(pattern, recursive=True))
        files = files[:: max(1, len(files) // args.max)][: args.max]
        d, unreadable = [], []
        for f in files:
            try:
                d.append(plasma_tint(read_rgb(f)))
            except BloodcellsError as e:
                unreadable.append(str(e))
        for line in unreadable:
            print(f"skipped: {line}", file=sys.stderr)
        d = np.array(d)
        if not len(d):
            print(f"{name:8s} no readable images match {pattern}")
            continue
        p5, p50, p95 = np.percentile(d, [5, 50, 95])
        print(f"{name:8s} {len(d):4d} images  min {d.min():.3f}  p5 {p5:.3f}  median {p50:.3f}  p95 {p95:.3f}  "
              f"max {d.max():.3f}  over the limit {np.mean(d > TINT_LIMIT):6.1%}")


if __name__ == "__main__":
    main()
