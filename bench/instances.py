"""What one object per cell costs at prediction: instance post-processing against the prediction it follows.

Usage: python bench/instances.py --model runs/realistic/best.pt [--images 8] [--iters 3] [--scale 1|auto]

On BCCD test smears (640x480; $BLOODCELLS_DATA or ../shared/datasets), for a checkpoint with an instance output:
- predict: the tiled class probabilities and instance map at model scale (`segmenter.infer.predict_logits`),
- the whole prediction of the smear as `cli predict` makes it without cells: the `--scale auto` estimate (when
  asked), resizing, the tiled probabilities and the class map at the input's size (`labels_at`),
- post-processing: decoding cells from them (seeded watershed, joining pieces of one cell, dropping unsure platelets:
  `segmenter.instances.decode`), resizing the instance map to the input's size and measuring every cell (`upsample`,
  `measure`), as `cli predict` does; and the same without joining,
each the fastest of `--iters` runs per smear (other processes only ever add time), summed over the smears; the
ratio post-processing / whole prediction is the added share (target: at most 25%); the share of the model's
part alone is printed too.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import best_seconds, cpu_model  # noqa: E402

from bloodcells.classes import NUM_CLASSES  # noqa: E402
from bloodcells.imageio import read_rgb  # noqa: E402
from bloodcells.segmenter.count import MIN_FRACTION, resolve_areas  # noqa: E402
from bloodcells.segmenter.checkpoint import load_model  # noqa: E402
from bloodcells.segmenter.infer import auto_scale, labels_at, predict_logits, resize_image  # noqa: E402
from bloodcells.segmenter.instances import find_cells, measure, upsample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--scale", default="1", help="1 (the smear as it is: 12 tiles) or auto (BCCD shrinks to ~0.4x)")
    args = ap.parse_args()
    data = Path(os.environ.get("BLOODCELLS_DATA", ROOT.parent / "shared" / "datasets")) / "bccd" / "BCCD"
    stems = (data / "ImageSets" / "Main" / "test.txt").read_text().split()[:args.images]
    model, meta = load_model(args.model)
    mode = meta["config"].get("instance")
    if not mode:
        raise SystemExit(f"{args.model}: has no instance output")
    areas, _ = resolve_areas(meta)
    min_area = {c: MIN_FRACTION * a for c, a in areas.items()}
    print(f"command: python bench/instances.py {' '.join(sys.argv[1:])}")
    print(f"nproc: {os.cpu_count()}; CPU: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    t_pred = t_full = t_post = t_split = 0.0
    cells = 0
    for stem in stems:
        image = read_rgb(data / "JPEGImages" / f"{stem}.jpg")
        factor = auto_scale(image)[0] if args.scale == "auto" else float(args.scale)
        small = resize_image(image, factor)
        out = predict_logits(model, meta, small)
        t_pred += best_seconds(lambda: predict_logits(model, meta, small), 0, args.iters)

        def whole() -> None:
            f = auto_scale(image)[0] if args.scale == "auto" else float(args.scale)
            o = predict_logits(model, meta, resize_image(image, f))[:NUM_CLASSES]
            o.argmax(axis=0) if f == 1 else labels_at(o, image.shape[:2])

        t_full += best_seconds(whole, 0, args.iters)
        probs, aux = out[:NUM_CLASSES], out[NUM_CLASSES]
        # the class map at the input's size is made with or without instances: not part of their cost
        labels = probs.argmax(axis=0).astype(np.uint8) if small.shape[:2] == image.shape[:2] \
            else labels_at(probs, image.shape[:2])

        model_labels = probs.argmax(axis=0).astype(np.uint8)  # made for the class map anyway

        def post(join: bool = True) -> int:
            c, _ = find_cells(probs, aux, mode, min_area, areas, model_labels, merge=join)
            inst = upsample(c, labels)
            return len(measure(inst, c.classes, c.confidence))

        cells += post()
        t_post += best_seconds(post, 0, args.iters)
        t_split += best_seconds(lambda: post(False), 0, args.iters)
    n = len(stems)
    print(f"\n{n} BCCD test smears (640x480), scale {args.scale}, {mode} output, {cells / n:.0f} cells per smear\n")
    print("| step | ms per smear | share of the whole prediction | share of the model's part |")
    print("|---|---|---|---|")
    print(f"| whole prediction without cells (scale, resize, model, class map) | {1000 * t_full / n:.1f} | 1.00 | "
          f"{t_full / t_pred:.2f} |")
    print(f"| model's part (tiles, probabilities, instance map) | {1000 * t_pred / n:.1f} | {t_pred / t_full:.2f} | 1.00 |")
    print(f"| post-processing (decode, join pieces, resize, measure) | {1000 * t_post / n:.1f} | "
          f"{t_post / t_full:.2f} | {t_post / t_pred:.2f} |")
    print(f"| the same without joining pieces | {1000 * t_split / n:.1f} | {t_split / t_full:.2f} | "
          f"{t_split / t_pred:.2f} |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
