"""Pictures of predictions: colour maps, overlays, side-by-side frames with a legend, GIF / MP4, frame sources."""
from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image

from bloodcells.classes import NUM_CLASSES, PALETTE, colorize
from bloodcells.errors import BloodcellsError, disk_errors
from bloodcells.formats import legend
from bloodcells.imageio import read_rgb, write_bytes_atomic
from bloodcells.segmenter.instances import borders

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".gif"}
LAYOUTS = ("side", "overlay", "map", "outline")


def color_map(label: np.ndarray) -> np.ndarray:
    """RGB colour map (H, W, 3) of a class-index map, in the class table's colours."""
    return colorize(label)


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with cell pixels tinted by their class colour (background pixels left as they are)."""
    tint = cv2.addWeighted(image, 1.0 - alpha, colorize(label), alpha, 0.0)
    return np.where((label > 0)[..., None], tint, image)


def outline(image: np.ndarray, label: np.ndarray, instances: np.ndarray | None = None) -> np.ndarray:
    """The image with each cell's outline drawn in its class colour (cells: the instance map, else the class map's
    regions)."""
    ids = instances if instances is not None else label
    edge = borders(ids.astype(np.int32))
    edge |= cv2.dilate(edge.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & (ids > 0)  # 2-3 px lines
    out = image.copy()
    out[edge] = PALETTE[label[edge]]
    return out


def side_by_side(image: np.ndarray, label: np.ndarray, classes: Sequence[int] | None = None,
                 layout: str = "side", gap: int = 4, instances: np.ndarray | None = None) -> np.ndarray:
    """Image beside its colour map (or the overlay, the map alone, or each cell's outline on the image) above a
    legend of the classes present."""
    if layout not in LAYOUTS:
        raise BloodcellsError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    if classes is None:
        classes = [c for c in np.unique(label).tolist() if 0 <= c < NUM_CLASSES]
    if layout == "side":
        body = np.hstack([image, np.full((image.shape[0], gap, 3), 255, np.uint8), colorize(label)])
    elif layout == "overlay":
        body = overlay(image, label)
    elif layout == "outline":
        body = outline(image, label, instances)
    else:
        body = colorize(label)
    return np.vstack([body, legend(list(classes), body.shape[1])])


def fit_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Letterbox a frame into (width, height): scaled to fit, centred on white."""
    w, h = size
    fh, fw = frame.shape[:2]
    if (fw, fh) == (w, h):
        return frame
    s = min(w / fw, h / fh)
    nw, nh = max(1, int(round(fw * s))), max(1, int(round(fh * s)))
    small = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    out = np.full((h, w, 3), 255, np.uint8)
    y, x = (h - nh) // 2, (w - nw) // 2
    out[y:y + nh, x:x + nw] = small
    return out


def _gif_frame(frame: np.ndarray) -> Image.Image:
    """An RGB frame as a 256-colour image: class colours and white exact, 245 median-cut colours for the rest."""
    fixed = [*PALETTE.tolist(), [255, 255, 255]]
    photo = Image.fromarray(frame).quantize(colors=256 - len(fixed), method=Image.Quantize.MEDIANCUT)
    colours = np.array(photo.getpalette()[:3 * (256 - len(fixed))], np.uint8).reshape(-1, 3).tolist()
    palette = Image.new("P", (1, 1))
    palette.putpalette([v for c in fixed + colours for v in c] + [0] * 3 * (256 - len(fixed) - len(colours)))
    return Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.NONE)


def write_gif(path: str | Path, frames: Iterable[np.ndarray], duration_ms: int = 200) -> int:
    """Write a looping GIF atomically, `duration_ms` a frame, frames fitted to the first's size; returns the count."""
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise BloodcellsError(f"{path}: no frames to write; check the inputs")
    size = (first.shape[1], first.shape[0])
    n = 1

    def rest() -> Iterator[Image.Image]:
        nonlocal n
        for f in it:
            n += 1
            yield _gif_frame(fit_frame(f, size))

    buf = io.BytesIO()
    # Pillow merges a frame identical to the previous one into it (summing durations): same timing, fewer frames
    _gif_frame(first).save(buf, format="GIF", save_all=True, append_images=rest(), duration=int(duration_ms),
                           loop=0, optimize=False, disposal=1)
    write_bytes_atomic(path, buf.getvalue())
    return n


def write_mp4(path: str | Path, frames: Iterable[np.ndarray], fps: float = 5.0) -> int:
    """Write an MP4 (mp4v) atomically, frames fitted to the first's size (rounded to even); returns the count."""
    path = Path(path)
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise BloodcellsError(f"{path}: no frames to write; check the inputs")
    h, w = first.shape[:2]
    size = (w + w % 2, h + h % 2)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), size)
    n = 0
    try:
        if not writer.isOpened():
            raise BloodcellsError(f"{path}: OpenCV cannot write MP4 (mp4v) here; write a .gif instead")
        for f in itertools.chain([first], it):
            writer.write(cv2.cvtColor(fit_frame(f, size), cv2.COLOR_RGB2BGR))
            n += 1
        writer.release()
        written = video_info(tmp)[0]  # read the container back: a codec that silently drops frames is an error
        if written != n:
            raise BloodcellsError(f"{path}: OpenCV wrote {written} of {n} frames; write a .gif instead")
        with disk_errors(path):
            os.replace(tmp, path)
    finally:
        writer.release()
        if tmp.exists():
            tmp.unlink()
    return n


def video_info(path: str | Path) -> tuple[int, float, tuple[int, int]]:
    """(frame count, fps, (width, height)) of a video as OpenCV reports them."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise BloodcellsError(f"{path}: OpenCV cannot open this video; convert it to MP4 or extract frames")
        return (int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS) or 0.0),
                (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))))
    finally:
        cap.release()


def is_video(path: str | Path) -> bool:
    """Whether a path is read as a video (by its suffix)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def video_frames(path: str | Path, every: int = 1, max_frames: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """('<stem>_f<index>', RGB frame) for every `every`-th frame of a video, at most `max_frames`."""
    if every < 1:
        raise BloodcellsError(f"--every {every}: must be at least 1")
    path = Path(path)
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise BloodcellsError(f"{path}: OpenCV cannot open this video; convert it to MP4 or extract frames")
    try:
        index = taken = 0
        while max_frames is None or taken < max_frames:
            if index % every == 0:
                ok, frame = cap.read()
                if not ok:
                    break
                taken += 1
                yield f"{path.stem}_f{index:06d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            elif not cap.grab():  # skipped frames are not decoded into images
                break
            index += 1
    finally:
        cap.release()


def iter_frames(paths: Sequence[Path], every: int = 1, max_frames: int | None = None,
                failed: list[str] | None = None) -> Iterator[tuple[Path, str, np.ndarray]]:
    """(source, frame name, RGB) from images and videos in order; unreadable sources go to `failed`, skipped."""
    taken = 0
    for p in paths:
        if max_frames is not None and taken >= max_frames:
            return
        try:
            if is_video(p):
                left = None if max_frames is None else max_frames - taken
                for name, frame in video_frames(p, every, left):
                    taken += 1
                    yield p, name, frame
            else:
                frame = read_rgb(p)
                taken += 1
                yield p, p.stem, frame
        except BloodcellsError as e:
            if failed is None:
                raise
            failed.append(str(e))
