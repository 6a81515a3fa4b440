"""Compose throughput: scenes/s of `cli compose`, against only writing the same PNG files.

python bench/compose.py [--recipe balanced] [--sprites BANK] [--scenes 1600] [--workers 2]
Without --sprites the built-in default sprites are used. Temporary files go to $TMPDIR (keep it on a quiet
disk: an atomic write costs about 0.1 ms on /work here but 1 ms on a /tmp crowded with old test folders).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bloodcells.imageio import read_gray, read_rgb  # noqa: E402
from bloodcells.composer.dataset import compose, encode_scene, sprite_pools, write_scene_file  # noqa: E402
from bloodcells.segmenter.data import read_instances  # noqa: E402
from bloodcells.composer.recipe import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="balanced")
    ap.add_argument("--sprites", type=Path, default=None)
    ap.add_argument("--scenes", type=int, default=1600)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    r = load_recipe(a.recipe, {"scenes": {"train": a.scenes, "val": 0, "test": 0}})
    t0 = time.perf_counter()
    pools, info = sprite_pools(a.sprites, r)
    t_load = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "d"
        t0 = time.perf_counter()
        compose(r, pools, out, info, workers=a.workers, progress=False)
        t_compose = time.perf_counter() - t0
        imgs = sorted((out / "train" / "images").glob("*.png"))
        arrays = [(read_rgb(p), read_gray(out / "train" / "labels" / p.name),
                   read_instances(out / "train" / "instances" / p.name)) for p in imgs]
        ref = Path(tmp) / "w"
        t0 = time.perf_counter()
        for k, scene in enumerate(arrays):
            for kind, data in zip(("images", "labels", "instances"), encode_scene(*scene)):
                write_scene_file(ref / kind / f"{k:06d}.png", data)
        t_write = time.perf_counter() - t0
        shutil.rmtree(ref)
    n = a.scenes
    print(f"recipe {r['name']}, sprites {info['kind']} ({info['bank']}), {n} scenes, {a.workers} workers")
    print(f"sprite load: {t_load:.2f} s")
    print(f"compose:    {t_compose:.2f} s  = {n / t_compose:.0f} scenes/s (with {a.workers} workers)")
    print(f"write-only: {t_write:.2f} s  = {n / t_write:.0f} scenes/s (1 process: encoding and writing the same "
          "image, label and instance PNGs as compose does)")
    print(f"compose / write-only time, per core: {t_compose * a.workers / t_write:.2f}x")
    print(f"original's 65,350 training scenes would take {65350 / (n / t_compose) / 60:.1f} min")


if __name__ == "__main__":
    main()
