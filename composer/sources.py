"""Source importers: walk a dataset folder and list what to cut, one `Item` per source image.

Layouts (documented in README.md, "Importing cells"):
- crops  : <root>/<class>/<image>          one cell per image, mask by thresholding
- kaggle : <root>/{Parasitized,Uninfected}/<image>, black outside the cell
- masked : <root>/[<class>/]<image> + its mask (same stem: `X.png` beside a non-PNG `X.*`,
           `X_mask.*`, `X_expert.*` or `masks/X.*`); class from the folder or `--labels CSV`
- lisc   : <root>/Main Dataset/<class>/N.bmp + <root>/Ground Truth Segmentation/<class>/areaforexpert1/N_expert.bmp
- iumc   : the masked layout with one folder per class
- boxes / mamic : whole smears with boxes: Pascal VOC (Annotations/*.xml + JPEGImages/),
           YOLO (images/ + labels/*.txt + classes.txt) or a CSV (image,xmin,ymin,xmax,ymax,label)
"""
from __future__ import annotations

import csv
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from bloodcells.errors import BloodcellsError
from bloodcells.imageio import IMAGE_SUFFIXES

from .aliases import SKIP, AliasTable

KINDS = ("kaggle", "crops", "masked", "lisc", "iumc", "boxes", "mamic")


@dataclass(frozen=True)
class Box:
    cls: str | None  # class name, or None when unusable (then `skip` says why)
    label: str  # the label as the source wrote it
    xyxy: tuple[int, int, int, int]
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


def read_label_csv(path: Path) -> dict[str, str]:
    """id -> label from a CSV with an id/image/file column and a class/label/category column."""
    path = Path(path)
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except OSError as e:
        raise BloodcellsError(f"{path}: cannot read labels CSV ({e.strerror}); check --labels") from None
    if not rows:
        raise BloodcellsError(f"{path}: empty labels CSV; it needs a header like 'image,class'")
    head = [h.strip().lower() for h in rows[0]]
    id_col = next((i for i, h in enumerate(head) if re.search(r"id|image|file|name", h)), None)
    cls_col = next((i for i, h in enumerate(head) if re.search(r"class|label|category|type", h) and i != id_col), None)
    if id_col is None or cls_col is None:
        raise BloodcellsError(f"{path}: need an image-id column and a class column in the header, got {rows[0]}")
    out = {}
    for r in rows[1:]:
        if len(r) > max(id_col, cls_col) and r[id_col].strip():
            out[_id_norm(r[id_col])] = r[cls_col].strip()
    return out


def _id_norm(s: str) -> str:
    s = Path(s.strip()).stem
    return str(int(s)) if s.isdigit() else s.lower()


def masked_items(root: Path, aliases: AliasTable, labels: Path | None = None,
                 mask_pattern: str | None = None) -> list[Item]:
    """Images with expert masks; class from `labels` CSV or from the image's folder."""
    root = _require_dir(root)
    files = _images(root, recursive=True)
    stems = {(p.parent, p.stem) for p in files if p.suffix.lower() != ".png"}
    table = read_label_csv(labels) if labels else None
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
            label = table.get(_id_norm(img.name))
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

def _voc_objects(xml_path: Path) -> tuple[str, list[tuple[str, tuple[int, int, int, int]]]]:
    try:
        tree = ET.parse(xml_path)
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"unreadable VOC annotation ({e})") from None
    r = tree.getroot()
    fname = (r.findtext("filename") or xml_path.stem + ".jpg").strip()
    objs = []
    for o in r.iter("object"):
        bb = o.find("bndbox")
        if bb is None:
            continue
        try:
            xyxy = tuple(int(round(float(bb.findtext(k)))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            continue
        objs.append(((o.findtext("name") or "").strip(), xyxy))
    return fname, objs


def read_wbc_subtypes(path: Path) -> dict[str, str | None]:
    """Image number -> WBC subtype (None when blank or a list: ambiguous), e.g. BCCD's Mooney CSV."""
    table = read_label_csv(path)
    return {k: (v if v and "," not in v else None) for k, v in table.items()}


def _image_number(name: str) -> str:
    m = re.findall(r"\d+", Path(name).stem)
    return str(int(m[-1])) if m else Path(name).stem.lower()


def _reserved(root: Path) -> set[str]:
    """BCCD/VOC test split: kept for evaluation on real smears, never cut into sprites."""
    f = root / "ImageSets" / "Main" / "test.txt"
    return {s.strip() for s in f.read_text().split()} if f.is_file() else set()


def box_items(root: Path, aliases: AliasTable, wbc_labels: Path | None = None,
              include_test: bool = False, csv_path: Path | None = None) -> list[Item]:
    """Whole smears with boxes (VOC, YOLO or CSV); RBC boxes -> box+threshold, others -> stained cell in box."""
    root = _require_dir(root)
    subtypes = read_wbc_subtypes(wbc_labels) if wbc_labels else None
    reserved = set() if include_test else _reserved(root)
    raw: list[tuple[Path, list[tuple[str, tuple[int, int, int, int]]], str | None]] = []
    if csv_path or (root / "boxes.csv").is_file():
        raw = _csv_boxes(root, Path(csv_path) if csv_path else root / "boxes.csv")
    elif (root / "Annotations").is_dir():
        for x in sorted((root / "Annotations").glob("*.xml")):
            try:
                fname, objs = _voc_objects(x)
            except ValueError as e:
                raw.append((x, [], str(e)))
                continue
            img = root / "JPEGImages" / fname
            if not img.is_file():
                img = next((p for p in (root / "JPEGImages").glob(x.stem + ".*")), img)
            raw.append((img, objs, None))
    elif (root / "labels").is_dir():
        raw = _yolo_boxes(root)
    else:
        raise BloodcellsError(f"{root}: no boxes found; expected Annotations/*.xml (VOC), labels/*.txt + "
                              "classes.txt (YOLO) or boxes.csv")
    items = []
    for img, objs, err in raw:
        key = _key(root, img) if img.resolve().is_relative_to(root.resolve()) else f"{root.name}/{img.name}"
        if img.stem in reserved:
            items.append(Item(key, img, "boxes", skip="reserved: test split kept for real-smear evaluation"))
            continue
        if err:
            items.append(Item(key, img, "boxes", skip=err))
            continue
        boxes = []
        for label, xyxy in objs:
            cls, skip = _class_of(label, aliases)
            if aliases.resolve(label) == SKIP and label.strip().lower() == "wbc":
                if subtypes is None:
                    cls, skip = None, "WBC box without subtype (pass --wbc-labels CSV)"
                else:
                    sub = subtypes.get(_image_number(img.name))
                    cls, skip = (_class_of(sub, aliases) if sub else (None, "ambiguous or missing WBC subtype"))
            boxes.append(Box(cls, label, xyxy, skip))
        items.append(Item(key, img, "boxes", boxes=tuple(boxes)))
    if not items:
        raise BloodcellsError(f"{root}: no annotated images found")
    return items


def _csv_boxes(root: Path, path: Path):
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    except OSError as e:
        raise BloodcellsError(f"{path}: cannot read ({e.strerror})") from None
    need = {"image", "xmin", "ymin", "xmax", "ymax", "label"}
    if not rows or not need <= {k.strip().lower() for k in rows[0]}:
        raise BloodcellsError(f"{path}: expected columns {','.join(sorted(need))}")
    by_img: dict[str, list] = {}
    for r in rows:
        r = {k.strip().lower(): v for k, v in r.items()}
        try:
            xyxy = tuple(int(round(float(r[k]))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            continue
        by_img.setdefault(r["image"], []).append((r["label"], xyxy))
    return [(root / name, objs, None) for name, objs in sorted(by_img.items())]


def _yolo_boxes(root: Path):
    names_file = next((f for f in (root / "classes.txt", root / "labels" / "classes.txt") if f.is_file()), None)
    if names_file is None:
        raise BloodcellsError(f"{root}: YOLO labels need classes.txt (one class name per line)")
    names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
    img_dir = root / "images" if (root / "images").is_dir() else root
    out = []
    for img in _images(img_dir):
        lab = root / "labels" / f"{img.stem}.txt"
        if not lab.is_file():
            continue
        import cv2  # only the size is needed
        im = cv2.imread(str(img), cv2.IMREAD_UNCHANGED)
        if im is None:
            out.append((img, [], "unreadable image"))
            continue
        h, w = im.shape[:2]
        objs = []
        for line in lab.read_text().splitlines():
            parts = line.split()
            if len(parts) < 5:
                continue
            c, cx, cy, bw, bh = int(parts[0]), *map(float, parts[1:5])
            label = names[c] if c < len(names) else str(c)
            objs.append((label, (int((cx - bw / 2) * w), int((cy - bh / 2) * h), int((cx + bw / 2) * w), int((cy + bh / 2) * h))))
        out.append((img, objs, None))
    return out


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
