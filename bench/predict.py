"""Prediction and colorize throughput on this machine's CPU.

Usage: python bench/predict.py [--iters 3] [--frames 8] [--widths 16,32]

Predict: `segmenter.infer.predict_logits` on a 640x480 smear (12 tiles of 224 with the default
overlap 0.25) at batch 8, for a randomly initialised U-Net at each width, in three modes: fp32 with
contiguous tensors (the reference), fp32 + channels_last, and precision 'auto' (bf16 autocast +
channels_last where the CPU has native bf16). Throughput is 224-tiles/s from the fastest of `--iters`
timed runs after one warm-up (on a shared machine other processes only ever add time).
Colorize: `segmenter.predict.colorize_run` over `--frames` 640x480 smears (BCCD test images when
$BLOODCELLS_DATA or ../shared/datasets has them, else composed-looking noise) into a GIF and an MP4,
frames/s end to end (loading the model, prediction, rendering, encoding, atomic write); plus the cost
of `--scale auto`'s RBC-size estimate per frame.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bloodcells.imageio import read_rgb, write_png
from bloodcells.segmenter.checkpoint import save_checkpoint
from bloodcells.segmenter.infer import estimate_rbc_diameter, predict_logits, tile_starts
from bloodcells.segmenter.models import create_model
from bloodcells.segmenter.predict import colorize_run
from timing import best_seconds, cpu_model  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
MODES = {"fp32": ("fp32", False), "fp32+channels_last": ("fp32", True), "auto": ("auto", True)}




def smears(n: int) -> tuple[list[np.ndarray], str]:
    """n 640x480 RGB smears: BCCD test images when the datasets are there, else seeded noise."""
    data = Path(os.environ.get("BLOODCELLS_DATA", ROOT.parent / "shared" / "datasets")) / "bccd" / "BCCD"
    listing = data / "ImageSets" / "Main" / "test.txt"
    if listing.is_file():
        stems = listing.read_text().split()[:n]
        return [read_rgb(data / "JPEGImages" / f"{s}.jpg") for s in stems], "BCCD test smears"
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(n)], "random noise"


def main(argv: list[str] | None = None) -> None:
    """Run the predict and colorize measurements and print machine facts and two tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--widths", default="16,32")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]

    print(f"command: python bench/predict.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"nproc: {os.cpu_count()}; CPU: {cpu_model()}; torch {torch.__version__}; "
          f"threads: {torch.get_num_threads()}; load average at start {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    frames, source = smears(args.frames)
    image = frames[0]
    tiles = len(tile_starts(image.shape[0], 224, 0.25)) * len(tile_starts(image.shape[1], 224, 0.25))
    meta = {"mean": [0.7, 0.6, 0.6], "std": [0.2, 0.2, 0.2]}

    rows = []
    for width in widths:
        torch.manual_seed(0)
        model = create_model("unet", width=width).eval()
        ref = None
        for mode, (precision, cl) in MODES.items():
            m = create_model("unet", width=width).eval()
            m.load_state_dict(model.state_dict())
            s = best_seconds(lambda: predict_logits(m, meta, image, batch=8, precision=precision,
                                                    channels_last=cl), 1, args.iters)
            tps = tiles / s
            ref = ref or tps
            rows.append((width, mode, tps, tps / ref))
            print(f"  unet w{width} {mode}: {tps:.1f} tiles/s", flush=True)

    est_s = best_seconds(lambda: estimate_rbc_diameter(image), 1, args.iters)
    colour = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, f in enumerate(frames):
            write_png(tmp / "in" / f"f{i:02d}.png", f)
        torch.manual_seed(0)
        ckpt = tmp / "w16.pt"
        save_checkpoint(ckpt, create_model("unet", width=16), meta["mean"], meta["std"], meta={})
        for fmt in ("gif", "mp4"):
            for precision in ("fp32", "auto"):
                t0 = time.perf_counter()
                r = colorize_run(ckpt, [tmp / "in"], tmp / f"out.{fmt}", scale=1.0, precision=precision,
                                 progress=False)
                dt = time.perf_counter() - t0
                size = (tmp / f"out.{fmt}").stat().st_size / 1e6
                colour.append((fmt, precision, r["frames"] / dt, size))
                print(f"  colorize {fmt} {precision}: {r['frames'] / dt:.2f} frames/s, {size:.1f} MB", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}; total {time.perf_counter() - start:.0f} s\n")

    print(f"Predict: one 640x480 smear = {tiles} tiles of 224 (overlap 0.25), batch 8, U-Net random weights.\n")
    print("| width | mode | tiles/s | x fp32 (same width) |")
    print("|---|---|---|---|")
    for width, mode, tps, ratio in rows:
        print(f"| {width} | {mode} | {tps:.1f} | {ratio:.2f} |")
    print(f"\nColorize: {len(frames)} frames of 640x480 ({source}), U-Net width 16, scale 1, layout side "
          "(1284x530 output frames), end to end.\n")
    ref = {fmt: fps for fmt, p, fps, _ in colour if p == "fp32"}
    print("| output | precision | frames/s | x fp32 | file MB |")
    print("|---|---|---|---|---|")
    for fmt, precision, fps, size in colour:
        print(f"| {fmt} | {precision} | {fps:.2f} | {fps / ref[fmt]:.2f} | {size:.1f} |")
    print(f"\n`--scale auto` RBC-size estimate: {est_s * 1000:.0f} ms per 640x480 frame.")


if __name__ == "__main__":
    main()
