"""Prediction runs over many inputs: expand files / folders / globs, predict, write maps and counts, resume.

Output contract (../shared/DESIGN.md, "Prediction output"), per input image with output stem <stem>:
  DIR/<stem>.png        uint8 class-index map at the input's own size (each cell's pixels take its class)
  DIR/<stem>_color.png  the colour map (class table colours)
  DIR/<stem>_instances.png  uint16 cell ids (k = row k of <stem>_cells.csv, 0 = none); a smear with more than
                        65,535 cells gets DIR/<stem>_instances.tif (32-bit) instead
  DIR/<stem>_cells.csv  one row per cell: id, class, area_px, cx, cy, x0, y0, x1, y1, confidence (input pixels)
  DIR/counts.csv        one row per image: image (= <stem>), scale (the factor used), cells per class name in
                        class-table order (background is always 0), rbc_total, parasitemia_pct (infected share
                        of the red cells, %; empty without red cells), cells (how cells were separated)
  DIR/sources.json      stem -> source file: a re-run gives each input the stem it had before
  DIR/.predict/<stem>.json  what made the stem's outputs (checkpoint digest, scale, options), its counts row
                        and its files; written last, so it marks the stem done
Stems are the file stems; a stem already taken gets its folder's name in front (<folder>_<stem>), then
-2, -3 ... Every file is written atomically; a re-run skips inputs done with the same checkpoint, scale and
options (and predicts again those done otherwise) unless `force`. counts.csv is merged from the records at the
end of a run (also an interrupted one), so it costs one write per run, not one per image.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from bloodcells.classes import NAMES, NUM_CLASSES, colorize
from bloodcells.errors import BloodcellsError, check_out_folder
from bloodcells.formats import json_safe, write_json
from bloodcells.imageio import IMAGE_SUFFIXES, encode_png, list_images, read_rgb, write_bytes_atomic, write_png
from bloodcells.segmenter.checkpoint import load_model
from bloodcells.segmenter.count import MIN_FRACTION, resolve_areas
from bloodcells.segmenter.infer import (TINT_LIMIT, Prediction, auto_scale, parse_absent, parse_scale, plasma_tint,
                                        predict)
from bloodcells.segmenter.instances import (CELL_COLUMNS, MERGE, MIN_CONFIDENCE, SURE_INFECTED, cell_rows,
                                           rbc_summary)
from bloodcells.segmenter.render import VIDEO_SUFFIXES, iter_frames, side_by_side, write_gif, write_mp4
from bloodcells.segmenter.runtime import pick_device

COUNTS_HEADER = ("image", "scale", *NAMES, "rbc_total", "parasitemia_pct", "cells")
SOURCES = "sources.json"  # stem -> source file, so that a re-run gives every input the same stem
RECORDS = ".predict"  # <stem>.json per input done: the settings that made its outputs, its counts row, its files
GLOB_CHARS = set("*?[")


def expand_inputs(items: Sequence[str | Path], videos: bool = False) -> tuple[list[Path], list[str]]:
    """Files, folders (their images) and globs -> unique paths in order, and a line per item matching nothing."""
    suffixes = IMAGE_SUFFIXES | (VIDEO_SUFFIXES if videos else set())
    kinds = "image or video" if videos else "image"
    found: list[Path] = []
    problems: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            hits = [q for q in sorted(p.iterdir()) if q.is_file() and q.suffix.lower() in suffixes] if videos \
                else list_images(p)
            if not hits:
                problems.append(f"{p}: folder holds no {kinds} files ({', '.join(sorted(suffixes))}); check the path")
        elif p.is_file():
            hits = [p]
        elif GLOB_CHARS & set(str(item)):
            hits = [Path(q) for q in sorted(glob.glob(str(item), recursive=True))
                    if Path(q).is_file() and Path(q).suffix.lower() in suffixes]
            if not hits:
                problems.append(f"{item}: pattern matches no {kinds} file; check the pattern (quote it for the shell)")
        else:
            hits = []
            problems.append(f"{p}: no such file or folder; check the path")
        found.extend(hits)
    seen: set[Path] = set()
    unique = []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, problems


def output_stems(paths: Sequence[Path], known: dict[str, str] | None = None) -> list[str]:
    """One output stem per input, stable across runs: a source already in `known` (stem -> source) keeps its stem;
    otherwise the file stem, or when taken <folder>_<stem>, then <stem>-2, -3 ..."""
    known = dict(known or {})
    owner = {src: stem for stem, src in known.items()}
    out: list[str] = []
    for p in paths:
        src = str(p.resolve())
        if src in owner:
            out.append(owner[src])
            continue
        options = [p.stem] + ([f"{p.parent.name}_{p.stem}"] if p.parent.name else [])
        name = next((o for o in options if o not in known), None)
        k = 1
        while name is None or name in known:
            k += 1
            name = f"{p.stem}-{k}"
        known[name] = src
        owner[src] = name
        out.append(name)
    return out


def read_counts(path: Path) -> dict[str, dict[str, str]]:
    """Existing counts.csv rows by image (empty when the file is missing or unreadable, so a re-run rebuilds it)."""
    if not path.is_file():
        return {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    return {r["image"]: r for r in rows if r.get("image")}


def read_sources(path: Path) -> dict[str, str]:
    """The stem -> source file record of earlier runs into the same folder (empty when missing or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def counts_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text with COUNTS_HEADER; missing class columns are written as 0."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COUNTS_HEADER)
    for r in rows:
        pct = r.get("parasitemia_pct")
        w.writerow([r["image"], r["scale"], *(r.get(n, 0) or 0 for n in NAMES), r.get("rbc_total", ""),
                    "" if pct is None else pct, r.get("cells", "")])
    return buf.getvalue()


def cells_csv(rows: Sequence[dict[str, Any]]) -> str:
    """<stem>_cells.csv: one row per cell (instances.CELL_COLUMNS); a header only when there are none."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CELL_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_instances(out: Path, stem: str, instances: np.ndarray) -> str:
    """The instance map as a 16-bit PNG, or as a 32-bit TIFF when it holds more cells than 16 bits can number;
    returns the file name written (the other one, left by an earlier run, is removed)."""
    png, tif = out / f"{stem}_instances.png", out / f"{stem}_instances.tif"
    if int(instances.max(initial=0)) <= np.iinfo(np.uint16).max:
        write_bytes_atomic(png, encode_png(instances.astype(np.uint16), level=1, png_filter="none"))
        tif.unlink(missing_ok=True)
        return png.name
    buf = io.BytesIO()
    Image.fromarray(instances.astype(np.int32), mode="I").save(buf, format="TIFF", compression="tiff_deflate")
    write_bytes_atomic(tif, buf.getvalue())
    png.unlink(missing_ok=True)
    return tif.name


def format_scale(factor: float) -> str:
    """The factor as written to counts.csv."""
    return f"{factor:.4f}"


@dataclass
class Predictor:
    """A loaded model with its prediction settings and the cell areas used for counting."""

    model: Any
    meta: dict[str, Any]
    areas: dict[int, float]
    areas_source: str
    tile: int = 224
    overlap: float = 0.25
    batch: int = 8
    precision: str = "auto"
    balance: bool = False  # white-balance each image's background to the training plasma colour
    tta: bool = False  # average over flips and quarter turns
    min_fraction: float = MIN_FRACTION  # objects below this share of their class's expected area are specks
    absent: tuple[int, ...] = ()  # classes the images are known not to hold: never predicted
    sure_infected: float | None = None  # least infected share of a red cell's probability (None: the default)
    join: bool | None = None  # join pieces of one cell (None: instances.MERGE)
    platelet_confidence: float | None = None  # least mean probability of a platelet (None: instances.MIN_CONFIDENCE)

    @property
    def min_confidence(self) -> dict[int, float] | None:
        """The per-class limits `predict` takes: None (the default) or the given one for every platelet class."""
        if self.platelet_confidence is None:
            return None
        return {c: self.platelet_confidence for c in MIN_CONFIDENCE}

    def __call__(self, image: np.ndarray, scale: float | None) -> Prediction:
        """Predict one image at a factor (None: estimate it)."""
        return predict(self.model, self.meta, image, scale=scale, tile=self.tile, overlap=self.overlap,
                       batch=self.batch, precision=self.precision, balance=self.balance, tta=self.tta,
                       cell_area=self.areas, min_fraction=self.min_fraction, absent=self.absent,
                       sure_infected=self.sure_infected, merge=self.join, min_confidence=self.min_confidence)


def load_predictor(model_path: str | Path, tile: int = 224, overlap: float = 0.25, batch: int = 8,
                   precision: str = "auto", device: str = "auto", data: str | Path | None = None,
                   balance: bool = False, tta: bool = False, min_fraction: float = MIN_FRACTION,
                   absent: str | Sequence[str] | None = None, sure_infected: float | None = None,
                   join: bool | None = None, platelet_confidence: float | None = None) -> Predictor:
    """Load a checkpoint for prediction and resolve the cell areas for counting; checks the options first."""
    if tile < 32 or tile % 32:
        raise BloodcellsError(f"--tile {tile}: must be a multiple of 32 (every architecture halves the size 5 times "
                              "at most), e.g. 224")
    if not 0.0 <= overlap <= 0.9:
        raise BloodcellsError(f"--overlap {overlap}: must be between 0 and 0.9, e.g. 0.25")
    if batch < 1:
        raise BloodcellsError(f"--batch {batch}: must be at least 1")
    dropped = parse_absent(absent)
    if not 0.0 <= min_fraction < 1.0:
        raise BloodcellsError(f"--min-fraction {min_fraction}: must be at least 0 and below 1, e.g. 0.15")
    if sure_infected is not None and not 0.0 <= sure_infected < 1.0:
        raise BloodcellsError(f"--sure-infected {sure_infected}: must be at least 0 and below 1 (0.6 by default; "
                              "0: by majority)")
    if platelet_confidence is not None and not 0.0 <= platelet_confidence <= 1.0:
        raise BloodcellsError(f"--platelet-confidence {platelet_confidence}: must be between 0 and 1 (0.8 by default; "
                              "0: keep every platelet found)")
    model, meta = load_model(model_path, pick_device(device))
    areas, source = resolve_areas(meta, data)
    return Predictor(model, meta, areas, source, tile, overlap, batch, precision, balance, tta, min_fraction, dropped,
                     sure_infected, join, platelet_confidence)


def output_files(stem: str, instances: str | None = None) -> list[str]:
    """The files one input's prediction writes into the output folder; it is done only when all of them exist."""
    return [f"{stem}.png", f"{stem}_color.png", instances or f"{stem}_instances.png", f"{stem}_cells.csv"]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (a checkpoint: same digest, same weights and settings)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def settings_key(model_path: str | Path, predictor: Predictor, factor: float | None) -> dict[str, Any]:
    """What decides an input's maps and counts: the checkpoint's bytes, the scale and the options that change them.

    Precision, device and batch only change speed (maps agree within rounding), so they are left out."""
    key = {"model": file_digest(model_path), "scale": "auto" if factor is None else factor, "tile": predictor.tile,
           "overlap": predictor.overlap, "balance": predictor.balance, "cell_area": predictor.areas,
           "tta": predictor.tta, "min_fraction": predictor.min_fraction}
    if predictor.absent:  # only when given, so records written before the option existed still match
        key["absent"] = [NAMES[c] for c in predictor.absent]
    # always the rule in force: maps made before red cells needed to be sure (by majority) are made again
    key["sure_infected"] = SURE_INFECTED if predictor.sure_infected is None else predictor.sure_infected
    # only when they differ from the defaults, so records written before the options existed still match
    if predictor.join is not None and predictor.join != MERGE:
        key["join"] = predictor.join
    limits = predictor.min_confidence
    if limits is not None and limits != MIN_CONFIDENCE:
        key["platelet_confidence"] = predictor.platelet_confidence
    return json.loads(json.dumps(json_safe(key)))  # as read back from a record


def read_record(out: Path, stem: str) -> dict[str, Any] | None:
    """A stem's done-record, or None when missing or unreadable."""
    try:
        record = json.loads((out / RECORDS / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_done(out: Path, stem: str, key: dict[str, Any]) -> bool:
    """Whether a stem was predicted with these settings and all the files this version writes for it are there."""
    record = read_record(out, stem)
    if record is None or record.get("key") != key:
        return False
    listed = record.get("outputs") if isinstance(record.get("outputs"), list) else []
    instances = next((n for n in listed if n in (f"{stem}_instances.png", f"{stem}_instances.tif")), None)
    return all((out / name).is_file() for name in output_files(stem, instances))


class CountsTable:
    """counts.csv: merged from the stems' records when a run starts (which also brings in what an interrupted run
    did), then kept in memory and rewritten atomically at most every `every` seconds and at the end, not after
    every image, which made a folder of thousands of smears quadratic. Each image has one row."""

    def __init__(self, out: Path, order: Sequence[str], every: float = 30.0) -> None:
        self.path, self.every = out / "counts.csv", every
        self.rows: dict[str, dict[str, Any]] = dict(read_counts(self.path))  # rows of versions without records
        folder = out / RECORDS
        records = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        for stem in dict.fromkeys([*order, *records]):
            record = read_record(out, stem)
            if record is not None and isinstance(record.get("row"), dict):
                self.rows[stem] = record["row"]
        self.write()

    def add(self, stem: str, row: dict[str, Any]) -> None:
        """Set an image's row; the file follows when `every` seconds have passed since it was last written."""
        self.rows[stem] = row
        if time.monotonic() - self.written >= self.every:
            self.write()

    def write(self) -> dict[str, dict[str, Any]]:
        """Write counts.csv atomically now; returns the rows by stem."""
        if self.rows or self.path.exists():
            write_bytes_atomic(self.path, counts_csv(list(self.rows.values())).encode())
        self.written = time.monotonic()
        return self.rows


@dataclass
class RunSummary:
    """What a predict run did."""

    out: Path
    done: list[str] = field(default_factory=list)  # stems predicted now
    resumed: list[str] = field(default_factory=list)  # stems already complete, skipped
    failed: list[str] = field(default_factory=list)  # one line per input that could not be used
    areas_source: str = ""
    totals: dict[str, int] = field(default_factory=dict)
    tinted: list[str] = field(default_factory=list)  # stems predicted without --balance whose ground is tinted

    @property
    def ok(self) -> bool:
        """Whether at least one input has its outputs."""
        return bool(self.done or self.resumed)


def predict_files(model_path: str | Path, inputs: Sequence[str | Path], out: str | Path, scale: str | float = 1.0,
                  tile: int = 224, overlap: float = 0.25, batch: int = 8, precision: str = "auto",
                  device: str = "auto", force: bool = False, data: str | Path | None = None,
                  progress: bool = True, balance: bool = False, tta: bool = False,
                  min_fraction: float = MIN_FRACTION, absent: str | Sequence[str] | None = None,
                  sure_infected: float | None = None, join: bool | None = None,
                  platelet_confidence: float | None = None) -> RunSummary:
    """Predict every input into `out` (maps, cells, counts.csv); unreadable inputs are skipped and listed."""
    out = check_out_folder(out)
    factor = parse_scale(scale)
    predictor = load_predictor(model_path, tile, overlap, batch, precision, device, data, balance, tta, min_fraction,
                               absent, sure_infected, join, platelet_confidence)
    paths, problems = expand_inputs(inputs)
    if not paths:
        raise BloodcellsError("no input images: " + "; ".join(problems or ["give image files, folders or globs"]))
    summary = RunSummary(out, failed=list(problems), areas_source=predictor.areas_source)
    sources_path = out / SOURCES
    key = settings_key(model_path, predictor, factor)
    known = read_sources(sources_path)
    stems = output_stems(paths, known)
    for stem, path in zip(stems, paths):
        known[stem] = str(path.resolve())
    if paths:
        write_json(sources_path, known)
    table = CountsTable(out, stems)
    for path, stem in tqdm(list(zip(paths, stems)), desc="predict", unit="img", disable=not progress):
        if not force and is_done(out, stem, key):
            summary.resumed.append(stem)
            continue
        try:
            image = read_rgb(path)
            pred = predictor(image, factor)
        except BloodcellsError as e:
            msg = str(e)
            summary.failed.append(msg if str(path) in msg else f"{path}: {msg}")
            continue
        if not predictor.balance and plasma_tint(image) > TINT_LIMIT:
            summary.tinted.append(stem)
        write_png(out / f"{stem}.png", pred.labels)
        write_png(out / f"{stem}_color.png", colorize(pred.labels))
        inst_file = write_instances(out, stem, pred.cells.instances)
        write_bytes_atomic(out / f"{stem}_cells.csv", cells_csv(cell_rows(pred.cells)).encode())
        row = {"image": stem, "scale": format_scale(pred.scale), **pred.counts, **rbc_summary(pred.counts),
               "cells": pred.method}
        write_json(out / RECORDS / f"{stem}.json", {"key": key, "source": str(path.resolve()), "row": row,
                                                    "outputs": output_files(stem, inst_file)})
        table.add(stem, row)
        summary.done.append(stem)
    rows = table.write()
    summary.totals = {n: sum(int(rows[s].get(n, 0) or 0) for s in summary.done + summary.resumed if s in rows)
                      for n in NAMES[1:]}
    return summary


def colorize_run(model_path: str | Path, inputs: Sequence[str | Path], out: str | Path, scale: str | float = 1.0,
                 every: int = 1, max_frames: int | None = None, fps: float = 5.0, layout: str = "side",
                 width: int | None = None, tile: int = 224, overlap: float = 0.25, batch: int = 8,
                 precision: str = "auto", device: str = "auto", progress: bool = True,
                 balance: bool = False, tta: bool = False, absent: str | Sequence[str] | None = None,
                 sure_infected: float | None = None, join: bool | None = None,
                 platelet_confidence: float | None = None) -> dict[str, Any]:
    """Render predictions of images and/or video frames into one GIF or MP4 (`out`'s suffix decides)."""
    out = Path(out)
    kind = out.suffix.lower()
    if kind not in (".gif", ".mp4"):
        raise BloodcellsError(f"{out}: the output must end in .gif or .mp4")
    if fps <= 0:
        raise BloodcellsError(f"--fps {fps}: must be above 0")
    if max_frames is not None and max_frames < 1:
        raise BloodcellsError(f"--max-frames {max_frames}: must be at least 1")
    if width is not None and width < 16:
        raise BloodcellsError(f"--width {width}: must be at least 16 px")
    factor = parse_scale(scale)
    predictor = load_predictor(model_path, tile, overlap, batch, precision, device, balance=balance, tta=tta,
                               absent=absent, sure_infected=sure_infected, join=join,
                               platelet_confidence=platelet_confidence)
    paths, problems = expand_inputs(inputs, videos=True)
    if not paths:
        raise BloodcellsError("no inputs: " + "; ".join(problems or ["give images, folders, globs or a video"]))
    failed = list(problems)
    auto: dict[Path, float] = {}  # one estimate per source: a video keeps its magnification
    classes = list(range(1, NUM_CLASSES))  # a fixed legend so that every frame has the same size
    stats = {"frames": 0, "scales": []}
    bar = tqdm(desc="colorize", unit="frame", disable=not progress, total=max_frames)

    def frames() -> Iterator[np.ndarray]:
        for source, name, image in iter_frames(paths, every, max_frames, failed):
            f = factor
            try:
                if f is None:
                    if source not in auto:
                        auto[source] = auto_scale(image)[0]
                    f = auto[source]
                pred = predictor(image, f)
            except BloodcellsError as e:
                failed.append(f"{source} ({name}): {e}")
                continue
            frame = side_by_side(image, pred.labels, classes=classes, layout=layout, instances=pred.cells.instances)
            if width is not None and frame.shape[1] != width:
                h = max(1, int(round(frame.shape[0] * width / frame.shape[1])))
                frame = cv2.resize(frame, (width, h), interpolation=cv2.INTER_AREA)
            stats["frames"] += 1
            stats["scales"].append(pred.scale)
            bar.update(1)
            yield frame

    try:
        if kind == ".gif":
            n = write_gif(out, frames(), duration_ms=int(round(1000.0 / fps)))
        else:
            n = write_mp4(out, frames(), fps=fps)
    except BloodcellsError:
        if stats["frames"] == 0 and failed:
            raise BloodcellsError("no frame could be rendered: " + "; ".join(failed[:3])) from None
        raise
    finally:
        bar.close()
    return {"out": str(out), "frames": n, "failed": failed, "fps": fps,
            "scale_min": min(stats["scales"]), "scale_max": max(stats["scales"])}
