"""Image reading and atomic writing at the edges; everything else works on arrays."""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .errors import BloodcellsError, disk_errors

# OpenCV's own thread pool is of no use on the small images here, and a pool created before a
# fork can deadlock the forked workers that compose and import use: keep OpenCV single-threaded.
cv2.setNumThreads(1)
# Unreadable files are reported in one line of our own; OpenCV's log lines before it are noise
# (OPENCV_LOG_LEVEL still applies when set, for debugging).
if "OPENCV_LOG_LEVEL" not in os.environ and hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


# fd 2 is one per process: threads that decode at once (the training cache loads with a thread pool) share one
# redirection, made by the first to enter and undone by the last to leave. Each thread saving and restoring its
# own would let a thread "restore" the null device another thread had put there, silencing the process for good
# (progress bars, warnings, error lines).
_silence_lock = threading.Lock()
_silence_depth = 0
_silence_saved: int | None = None


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send what C libraries print to stderr (libpng's "libpng error: ...", libjpeg's "Corrupt JPEG data") nowhere."""
    global _silence_depth, _silence_saved
    with _silence_lock:
        if _silence_depth == 0:
            if sys.stderr is not None:
                sys.stderr.flush()  # what Python printed so far goes out first
            try:
                saved = os.dup(2)
            except OSError:  # no stderr to redirect
                saved = None
            if saved is not None:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
            _silence_saved = saved
        _silence_depth += 1
    try:
        yield
    finally:
        with _silence_lock:
            _silence_depth -= 1
            if _silence_depth == 0 and _silence_saved is not None:
                os.dup2(_silence_saved, 2)
                os.close(_silence_saved)
                _silence_saved = None


def _decode(path: Path, flags: int) -> np.ndarray:
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except FileNotFoundError:
        raise BloodcellsError(f"{path}: no such file; check the path") from None
    except OSError as e:
        raise BloodcellsError(f"{path}: cannot read ({e.strerror}); check the file's permissions") from None
    with _native_stderr_silenced():
        img = cv2.imdecode(data, flags) if data.size else None
    if img is None:
        raise BloodcellsError(f"{path}: not a readable image (corrupt or unsupported format); replace or remove it")
    return img


def read_rgb(path: str | Path) -> np.ndarray:
    """Read any image as uint8 RGB (H, W, 3)."""
    img = _decode(Path(path), cv2.IMREAD_COLOR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_gray(path: str | Path) -> np.ndarray:
    """Read an image as one uint8 channel (H, W), as stored (no colour mixing for masks)."""
    img = _decode(Path(path), cv2.IMREAD_UNCHANGED)
    if img.ndim == 3:
        img = img[..., :3].max(axis=2)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


def read_rgba(path: str | Path) -> np.ndarray:
    """Read an RGBA PNG as uint8 (H, W, 4)."""
    img = _decode(Path(path), cv2.IMREAD_UNCHANGED)
    if img.ndim != 3 or img.shape[2] != 4:
        raise BloodcellsError(f"{path}: expected an RGBA sprite PNG; re-import the bank")
    return cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)


_PNG_FILTERS = {"none": getattr(cv2, "IMWRITE_PNG_FILTER_NONE", None), "sub": getattr(cv2, "IMWRITE_PNG_FILTER_SUB", None)}
_PNG_STRATEGIES = {"rle": getattr(cv2, "IMWRITE_PNG_STRATEGY_RLE", None)}


def encode_png(arr: np.ndarray, level: int = 1, png_filter: str | None = None, strategy: str | None = None) -> bytes:
    """PNG bytes of a uint8 gray, RGB or RGBA array (or a uint16 gray one); deterministic for equal input.

    png_filter 'none' suits label maps (long runs; 10x faster than adaptive filtering, same size),
    'sub' suits photos (about 1.7x faster than adaptive at a similar size). strategy 'rle' (zlib's run-length
    matching) halves the time again for photos after the 'sub' filter and for uint8 label maps, and makes
    both smaller; 16-bit maps are better without it."""
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    params = [cv2.IMWRITE_PNG_COMPRESSION, level]
    if png_filter is not None and _PNG_FILTERS.get(png_filter) is not None:
        params += [cv2.IMWRITE_PNG_FILTER, _PNG_FILTERS[png_filter]]
    if strategy is not None and _PNG_STRATEGIES.get(strategy) is not None:
        params += [cv2.IMWRITE_PNG_STRATEGY, _PNG_STRATEGIES[strategy]]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), params)
    if not ok:
        raise BloodcellsError("could not encode a PNG image")
    return buf.tobytes()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a file so that it either exists whole or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with disk_errors(path):
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:  # the folder is made on the first write into it, not checked on every one
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "wb")
        try:
            with f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_png(path: str | Path, arr: np.ndarray, level: int = 1) -> None:
    write_bytes_atomic(path, encode_png(arr, level))


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in a folder, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
