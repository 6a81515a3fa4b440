"""Cost of `--scale auto` (the RBC-size estimate) against the prediction it sets the scale for.

Usage: python bench/auto_scale.py [--iters 3] [--width 32] [--threads N]

Smears: BCCD test smears (640x480, RBCs about 90 px across) as they are and enlarged 2.5x to
1600x1200 (RBCs about 225 px: a high-resolution camera), when $BLOODCELLS_DATA or ../shared/datasets
has them; and a 1600x1200 scene composed from the built-in sprites (RBCs 37 px: a 40x smear, the
small-cell case). For each: `estimate_rbc_diameter` (what `--scale auto` adds per image) and, as the reference in
the same process, `predict` at the factor that estimate gives (resize, tiled U-Net, probabilities back to
the input size, argmax), with a randomly initialised U-Net at `--width` and precision auto. Figures are
the fastest of `--iters` runs after one warm-up; the ratio is estimate / predict. The estimate runs on one
core (numpy and OpenCV, single-threaded here); `--threads 1` gives the prediction one core too, which is
also the steadier figure on a busy machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bloodcells.imageio import read_rgb
from bloodcells.segmenter.infer import RBC_DIAMETER_40X, estimate_rbc_diameter, predict, resize_image
from bloodcells.segmenter.models import create_model
from timing import best_seconds, cpu_model  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


def composed_smear(height: int = 1200, width: int = 1600) -> np.ndarray:
    """One composed scene of the built-in sprites at 40x (RBCs 37 px), cut to height x width."""
    from bloodcells.composer.dataset import Composer, sprite_pools
    from bloodcells.composer.recipe import validate

    side = max(height, width)
    recipe = validate({"scene_size": side, "canvas": {"size": side, "windows": 1},
                       "scenes": {"train": 1, "val": 0, "test": 0}, "builtin_per_class": 8})
    pools, _ = sprite_pools(None, recipe)
    return np.ascontiguousarray(Composer(recipe, "train", pools["train"]).scene(0)[0][:height, :width])


def smears() -> list[tuple[str, np.ndarray]]:
    """(name, RGB image) of each benchmark smear."""
    out = []
    data = Path(os.environ.get("BLOODCELLS_DATA", ROOT.parent / "shared" / "datasets")) / "bccd" / "BCCD"
    listing = data / "ImageSets" / "Main" / "test.txt"
    if listing.is_file():
        stem = listing.read_text().split()[0]
        bccd = read_rgb(data / "JPEGImages" / f"{stem}.jpg")
        out += [(f"BCCD {stem} 640x480", bccd), (f"BCCD {stem} x2.5 1600x1200", resize_image(bccd, 2.5))]
    out.append(("composed 40x smear 1600x1200", composed_smear()))
    return out


def main(argv: list[str] | None = None) -> None:
    """Time the estimate and the prediction per smear; print machine facts and a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: python bench/auto_scale.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"nproc: {os.cpu_count()}; CPU: {cpu_model()}; torch {torch.__version__}; "
          f"threads: {torch.get_num_threads()}; load average at start {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    torch.manual_seed(0)
    model = create_model("unet", width=args.width).eval()
    meta = {"mean": [0.7, 0.6, 0.6], "std": [0.2, 0.2, 0.2]}
    rows = []
    for name, image in smears():
        d = estimate_rbc_diameter(image)
        factor = RBC_DIAMETER_40X / d
        est_s = best_seconds(lambda: estimate_rbc_diameter(image), 1, args.iters)
        pred_s = best_seconds(lambda: predict(model, meta, image, scale=factor), 1, args.iters)
        rows.append((name, d, factor, est_s, pred_s))
        print(f"  {name}: RBC {d:.1f} px, factor {factor:.3f}, estimate {est_s:.3f} s, predict {pred_s:.3f} s",
              flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}; total {time.perf_counter() - start:.0f} s\n")
    print(f"U-Net width {args.width}, random weights, precision auto; fastest of {args.iters} runs.\n")
    print("| smear | RBC diameter px | factor | estimate s | predict s | estimate / predict |")
    print("|---|---|---|---|---|---|")
    for name, d, factor, est_s, pred_s in rows:
        print(f"| {name} | {d:.1f} | {factor:.3f} | {est_s:.3f} | {pred_s:.3f} | {est_s / pred_s:.2f} |")


if __name__ == "__main__":
    main()
