"""Per-image cost of training augmentation and scene optics on one core, against decoding the same PNG.

python bench/augment.py [--scenes 16] [--calls 2000] [--repeats 5] [--no-train]

Scenes are composed with the `tiny` recipe and the built-in sprites (the same 224x224 images, label maps
and instance maps training reads). Random operations are timed as the mean over `--calls` calls cycling
through the scenes with one seeded generator (their cost depends on which steps the draws switch on), and
the best of `--repeats` such blocks is kept: on a shared machine other work only ever adds time.
References in the same process: decoding the scene's PNG, and (unless --no-train) one fp32 training step
of a width-16 U-Net, batch 8, divided by 8.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from bloodcells.composer import optics  # noqa: E402
from bloodcells.composer.dataset import compose, sprite_pools  # noqa: E402
from bloodcells.composer.recipe import load_recipe  # noqa: E402
from bloodcells.formats import scene_id, scene_paths  # noqa: E402
from bloodcells.imageio import encode_png, read_gray, read_rgb  # noqa: E402
from bloodcells.segmenter import augment  # noqa: E402
from timing import cpu_model  # noqa: E402  (bench/ is on sys.path when run as a script)

Scene = tuple[np.ndarray, np.ndarray, np.ndarray]


def composed_scenes(n: int) -> list[Scene]:
    """n composed (image, label, instances) triples; instances from the file when written, else per-class
    connected components (the same kind of uint16 map)."""
    r = load_recipe("tiny", {"scenes": {"train": n, "val": 0, "test": 0}})
    pools, info = sprite_pools(None, r)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        compose(r, pools, Path(tmp), info, workers=1, progress=False)
        for i in range(n):
            p = scene_paths(tmp, "train", scene_id(i))
            img, label = read_rgb(p.image), read_gray(p.label)
            if p.instances.exists():
                inst = cv2.imread(str(p.instances), cv2.IMREAD_UNCHANGED).astype(np.uint16)
            else:
                inst = np.zeros(label.shape, np.uint16)
                for c in np.unique(label[label > 0]):
                    k, comp = cv2.connectedComponents((label == c).view(np.uint8))
                    inst[comp > 0] = comp[comp > 0] + inst.max()
            out.append((img, label, inst))
    return out


def mean_ms(fn: Callable[[int, np.random.Generator], object], calls: int, repeats: int) -> float:
    """Best over repeats of the mean ms per call of fn(call index, rng), one seeded rng per block."""
    best = float("inf")
    for _ in range(repeats):
        rng = np.random.default_rng(0)  # the same draws, so the same work, in every block
        t0 = time.process_time()
        for i in range(calls):
            fn(i, rng)
        best = min(best, (time.process_time() - t0) / calls * 1e3)
    return best


def train_step_ms(batch: int = 8) -> float:
    """ms per image of one fp32 training step of a width-16 U-Net (forward, CombinedLoss, backward, Adam)."""
    import torch

    from bloodcells.classes import NUM_CLASSES
    from bloodcells.segmenter.losses import CombinedLoss
    from bloodcells.segmenter.models import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("unet", width=16)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, NUM_CLASSES, (batch, 224, 224))
    loss_fn, opt = CombinedLoss(), torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    step()  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        step()
        best = min(best, time.process_time() - t0)
    return best / batch * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-train", action="store_true", help="skip the U-Net training-step reference")
    a = ap.parse_args()
    cv2.setNumThreads(1)  # one core: what a data-loader worker or a compose worker gets
    load0 = os.getloadavg()[0]
    scenes = composed_scenes(a.scenes)
    n = len(scenes)
    pngs = [encode_png(img) for img, _, _ in scenes]
    floats = [img.astype(np.float32) for img, _, _ in scenes]
    img0 = lambda i: scenes[i % n][0]  # noqa: E731

    png_ms = mean_ms(lambda i, g: cv2.cvtColor(cv2.imdecode(np.frombuffer(pngs[i % n], np.uint8), cv2.IMREAD_COLOR),
                                               cv2.COLOR_BGR2RGB), a.calls, a.repeats)
    rows: list[tuple[str, float]] = [
        ("augment_sample(level='full')", mean_ms(lambda i, g: augment.augment_sample(*scenes[i % n], g), a.calls, a.repeats)),
        ("appearance (strength 1)", mean_ms(lambda i, g: augment.appearance(img0(i), g), a.calls, a.repeats)),
        ("scale_jitter (0.7-1.4)", mean_ms(lambda i, g: augment.scale_jitter(*scenes[i % n], g), a.calls, a.repeats)),
        ("apply_optics (OPTICS_DEFAULTS, float32)", mean_ms(lambda i, g: optics.apply_optics(floats[i % n], g),
                                                            a.calls, a.repeats)),
    ]
    steps: list[tuple[str, Callable[[int, np.random.Generator], object]]] = [
        ("  stain_jitter_hed", lambda i, g: augment.stain_jitter_hed(img0(i), g)),
        ("  brightness_contrast", lambda i, g: augment.brightness_contrast(img0(i), g)),
        ("  gamma", lambda i, g: augment.gamma(img0(i), g)),
        ("  saturation", lambda i, g: augment.saturation(img0(i), g)),
        ("  hue", lambda i, g: augment.hue(img0(i), g)),
        ("  blur_or_sharpen", lambda i, g: augment.blur_or_sharpen(img0(i), g)),
        ("  noise", lambda i, g: augment.noise(img0(i), g)),
        ("  jpeg", lambda i, g: augment.jpeg(img0(i), g)),
        ("  defocus (radius 0.8)", lambda i, g: optics.defocus(floats[i % n], 0.8)),
        ("  chromatic_offset (0.4 px)", lambda i, g: optics.chromatic_offset(floats[i % n], 0.4)),
        ("  vignetting (off-centre)", lambda i, g: optics.vignetting(floats[i % n], 0.1, (120.0, 100.0))),
        ("  sensor_noise", lambda i, g: optics.sensor_noise(floats[i % n], g, 1.5, 0.02)),
        ("  jpeg_artifacts", lambda i, g: optics.jpeg_artifacts(floats[i % n], 85)),
    ]
    rows += [(name, mean_ms(fn, max(a.calls // 4, 50), a.repeats)) for name, fn in steps]
    train_ms = None if a.no_train else train_step_ms()

    print(f"machine: nproc {len(os.sched_getaffinity(0))}, {cpu_model()}; OpenCV {cv2.__version__} single-threaded, numpy {np.__version__}")
    print(f"{n} composed 224x224 scenes; {a.calls} calls per block, best of {a.repeats} blocks; "
          f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"reference: PNG decode {png_ms:.3f} ms/image" + (f"; U-Net w16 fp32 train step {train_ms:.1f} ms/image"
                                                            if train_ms else ""))
    head = "| operation | ms / image | x PNG decode |" + (" % of a train step |" if train_ms else "")
    print(head)
    print("|---|---|---|" + ("---|" if train_ms else ""))
    for name, ms in rows:
        line = f"| {name} | {ms:.3f} | {ms / png_ms:.2f} |"
        print(line + (f" {100 * ms / train_ms:.1f} |" if train_ms else ""))


if __name__ == "__main__":
    main()
