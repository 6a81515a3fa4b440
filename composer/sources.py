"""Source importers: walk a dataset folder and list what to cut, one `Item` per source image.

Layouts (documented in README.md, "Importing cells"):
- crops  : <root>/<class>/<image>          one cell per image, mask by thresholding
- kaggle : <root>/{Parasitized,Uninfected}/<image>, black outside the cell
- masked : <root>/[<class>/]<image> + its mask (same stem: `X.png` beside a non-PNG `X.*`,
           `X_mask.*`, `X_expert.*` or `masks/X.*`); class from the folder or `--labels CSV`
- lisc   : <root>/Main Dataset/<class>/N.bmp + <root>/Ground Truth Segmentation/<class>/areaforexpert1/N_expert.bmp
- iumc   : the masked layout with one folder per class
- boxes / mamic : whole smears with boxes: Pascal VOC (Annotations/*.xml + JPEGImages/),
           YOLO (images/ + labels/*.txt + classes.txt) or a CSV (image,xmin,ymin,xmax,ymax,label),
           read by bloodcells.formats (the readers evaluation on real smears uses too)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from bloodcells.errors import BloodcellsError
from bloodcells.formats import (Subtype, SubtypeTable, detect_box_layout, image_key, read_boxes, read_id_csv,
                                read_wbc_subtypes, voc_split_file, voc_split_stems)
from bloodcells.imageio import IMAGE_SUFFIXES

from .aliases import SKIP, AliasTable

KINDS = ("kaggle", "crops", "masked", "lisc", "iumc", "boxes", "mamic")


@dataclass(frozen=True)
class Box:
    cls: str | None  # class name, or None when unusable (then `skip` says why)
    label: str  # the label as the source wrote it
    xyxy: tuple[int, int, int, int]  # integer pixels: formats.Box.pixels (floor x0/y0, ceil x1/y1)
    skip: str | None = None


@dataclass(frozen=True)
class Item:
    """One source image and how to cut it."""
    key: str  # "<dataset folder>/<path inside it>": identity, and the input of the split hash
    path: Path
    method: str  # "black" | "stained" | "auto" | "given" | "boxes"
    cls: str | None = None
    mask_path: Path | None = None
    boxes: tuple[Box, ...] = field(default_factory=tuple)
    skip: str | None = None  # set when the whole image is unusable (e.g. unknown class)


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _require_dir(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise BloodcellsError(f"{root}: no such folder; give the dataset's folder (see README, 'Importing cells')")
    return root


def _key(root: Path, path: Path) -> str:
    return f"{root.resolve().name}/{path.resolve().relative_to(root.resolve()).as_posix()}"


def _class_of(label: str, aliases: AliasTable) -> tuple[str | None, str | None]:
    """(class, skip reason) for a source label."""
    cls = aliases.resolve(label)
    if cls is None:
        return None, f"unknown class '{label}' (add --alias '{label}=CLASS')"
    if cls == SKIP:
        return None, f"not a single cell type ('{label}')"
    return cls, None


def folder_items(root: Path, aliases: AliasTable, method: str) -> list[Item]:
    """<root>/<class>/<image>: class from the folder name."""
    root = _require_dir(root)
    items = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        cls, skip = _class_of(sub.name, aliases)
        for img in _images(sub):
            items.append(Item(_key(root, img), img, method, cls, skip=skip))
    if not items:
        raise BloodcellsError(f"{root}: no images in class folders; expected {root}/<class>/<image> "
                              "(e.g. Parasitized/, Uninfected/)")
    return items


def _mask_for(img: Path, pattern: str | None) -> Path | None:
    stem, d = img.stem, img.parent
    if pattern:
        cand = [d / pattern.format(stem=stem)]
    else:
        cand = [d / f"{stem}_mask.png", d / f"{stem}_mask{img.suffix}", d / f"{stem}_expert.bmp",
                d / f"{stem}_expert.png", d / "masks" / f"{stem}.png", d / "masks" / f"{stem}{img.suffix}"]
        if img.suffix.lower() != ".png":
            cand.append(d / f"{stem}.png")
    return next((c for c in cand if c.is_file()), None)


def _is_mask_name(p: Path, all_stems: set[tuple[Path, str]]) -> bool:
    if p.parent.name == "masks" or re.search(r"_(mask|expert)$", p.stem):
        return True
    # `X.png` beside a non-PNG `X.*` is that image's mask
    return p.suffix.lower() == ".png" and (p.parent, p.stem) in all_stems


def masked_items(root: Path, aliases: AliasTable, labels: Path | None = None,
                 mask_pattern: str | None = None) -> list[Item]:
    """Images with expert masks; class from `labels` CSV or from the image's folder."""
    root = _require_dir(root)
    files = _images(root, recursive=True)
    stems = {(p.parent, p.stem) for p in files if p.suffix.lower() != ".png"}
    table = read_id_csv(labels, "--labels") if labels else None
    pat = re.compile(re.escape(mask_pattern).replace(re.escape("{stem}"), ".+") + "$") if mask_pattern else None
    items = []
    for img in files:
        if (pat.match(img.name) if pat else _is_mask_name(img, stems)):
            continue
        mask = _mask_for(img, mask_pattern)
        if mask is None:
            items.append(Item(_key(root, img), img, "given", skip="no mask found (expected X.png, X_mask.*, or masks/X.*)"))
            continue
        if table is not None:
            label = table.get(image_key(img.name))
            if label is None:
                items.append(Item(_key(root, img), img, "given", skip=f"not in {Path(labels).name}"))
                continue
        else:
            label = img.parent.name if img.parent != root else ""
        cls, skip = _class_of(label, aliases) if label else (None, "no class (use class folders or --labels CSV)")
        items.append(Item(_key(root, img), img, "given", cls, mask_path=mask, skip=skip))
    if not items:
        raise BloodcellsError(f"{root}: no images found; expected images with masks (see README, 'masked' layout)")
    return items


def lisc_items(root: Path, aliases: AliasTable) -> list[Item]:
    """LISC: Main Dataset/<class>/N.bmp with Ground Truth Segmentation/<class>/areaforexpert1/N_expert.bmp."""
    root = _require_dir(root)
    main, gt = root / "Main Dataset", root / "Ground Truth Segmentation"
    if not main.is_dir() or not gt.is_dir():
        raise BloodcellsError(f"{root}: not a LISC folder; expected 'Main Dataset/' and 'Ground Truth Segmentation/' inside")
    items = []
    for sub in sorted(p for p in main.iterdir() if p.is_dir()):
        cls, skip = _class_of(sub.name, aliases)
        for img in _images(sub):
            mdir = gt / sub.name / "areaforexpert1"
            mask = next((m for m in (mdir / f"{img.stem}_expert{img.suffix}", mdir / f"{img.stem}_expert.bmp",
                                     mdir / f"{img.stem}_expert.png") if m.is_file()), None)
            items.append(Item(_key(root, img), img, "given", cls, mask_path=mask,
                              skip=skip or (None if mask else f"no expert mask in {mdir}")))
    if not items:
        raise BloodcellsError(f"{root}/Main Dataset: no images found in class folders")
    return items


# ---- boxes on whole smears -------------------------------------------------------------

def _reserved(root: Path) -> set[str]:
    """The VOC test split: kept for evaluation on real smears, never cut into sprites."""
    return set(voc_split_stems(root, "test")) if voc_split_file(root, "test").is_file() else set()


def _wbc_box(subtype: Subtype | None, aliases: AliasTable) -> tuple[str | None, str | None]:
    """(class, skip reason) of a box labelled only 'WBC': its image's subtype from --wbc-labels."""
    if subtype is None:
        return None, "WBC box without subtype (pass --wbc-labels CSV)"
    if subtype.name is None:
        return None, subtype.reason
    return _class_of(subtype.name, aliases)


def box_items(root: Path, aliases: AliasTable, wbc_labels: Path | None = None,
              include_test: bool = False, csv_path: Path | None = None) -> list[Item]:
    """Whole smears with boxes (VOC, YOLO or CSV); RBC boxes -> box+threshold, others -> stained cell in box."""
    root = _require_dir(root)
    subtypes: SubtypeTable | None = read_wbc_subtypes(wbc_labels) if wbc_labels else None
    layout = detect_box_layout(root, csv_path)
    reserved = _reserved(root) if layout == "voc" and not include_test else set()
    items = []
    for im in read_boxes(root, layout, "all", csv_path):
        img = im.path
        key = _key(root, img) if img.resolve().is_relative_to(root.resolve()) else f"{root.name}/{img.name}"
        if im.annotation is not None and im.annotation.stem in reserved:
            items.append(Item(key, img, "boxes", skip="reserved: test split kept for real-smear evaluation"))
            continue
        if im.error:
            items.append(Item(key, img, "boxes", skip=im.error))
            continue
        boxes = []
        for b in im.boxes:
            cls, skip = _class_of(b.label, aliases)
            if aliases.resolve(b.label) == SKIP and b.label.strip().lower() == "wbc":
                cls, skip = _wbc_box(subtypes.lookup(img) if subtypes else None, aliases)
            boxes.append(Box(cls, b.label, b.pixels(), skip))
        items.append(Item(key, img, "boxes", boxes=tuple(boxes)))
    if not items:
        raise BloodcellsError(f"{root}: no annotated images found")
    return items


def list_items(kind: str, root: Path, aliases: AliasTable, labels: Path | None = None,
               mask_pattern: str | None = None, wbc_labels: Path | None = None,
               include_test: bool = False, boxes_csv: Path | None = None) -> list[Item]:
    """All items of one source folder for an importer kind."""
    root = Path(root)
    if kind == "kaggle":
        return folder_items(root, aliases, "black")
    if kind == "crops":
        return folder_items(root, aliases, "auto")
    if kind in ("masked", "iumc"):
        return masked_items(root, aliases, labels, mask_pattern)
    if kind == "lisc":
        return lisc_items(root, aliases)
    if kind in ("boxes", "mamic"):
        return box_items(root, aliases, wbc_labels, include_test, boxes_csv)
    raise BloodcellsError(f"unknown importer '{kind}'; choose one of: {', '.join(KINDS)}")
