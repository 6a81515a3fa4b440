"""The shared readers of box and label files (VOC, YOLO, boxes CSV, id and subtype CSVs) and the legend."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from bloodcells.classes import PALETTE, index_of
from bloodcells.composer.aliases import AliasTable
from bloodcells.composer.sources import list_items
from bloodcells.errors import BloodcellsError
from bloodcells.formats import (SUBTYPE_AMBIGUOUS, SUBTYPE_MISSING, Box, detect_box_layout, image_key, image_size,
                                legend, read_box_csv, read_boxes, read_id_csv, read_voc, read_wbc_subtypes, read_yolo)
from bloodcells.imageio import read_rgb
from bloodcells.segmenter.realeval import subtype_of

H, W = 120, 200
# one smear's boxes: label, x0, y0, x1, y1 in pixels
BOXES = [("RBC", 10, 20, 50, 60), ("WBC", 100, 30, 160, 90), ("Platelets", 170, 100, 180, 110)]
CLASSES = ["RBC", "WBC", "Platelets"]


def _image(path: Path, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 220, np.uint8))


def _voc(root: Path, stem: str, boxes=BOXES, filename: str | None = None, image: bool = True) -> None:
    """Annotations/<stem>.xml naming <filename> (default <stem>.png), and that image in JPEGImages/."""
    filename = filename or f"{stem}.png"
    if image:
        _image(root / "JPEGImages" / Path(filename).name)
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                   f"<ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in boxes)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{stem}.xml").write_text(f"<annotation><filename>{filename}</filename>{objs}</annotation>")


def _yolo_lines(boxes=BOXES, w: int = W, h: int = H) -> str:
    return "".join(f"{CLASSES.index(n)} {(a + c) / 2 / w} {(b + d) / 2 / h} {(c - a) / w} {(d - b) / h}\n"
                   for n, a, b, c, d in boxes)


def _seen(images) -> list[tuple[str, str, tuple[float, ...]]]:
    return [(im.path.name, b.label, b.xyxy) for im in images for b in im.boxes]


def _importer_boxes(root: Path, **kw) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """What the sprite importer would cut: image name -> (label, integer box) of every box."""
    return {it.path.name: [(b.label, b.xyxy) for b in it.boxes] for it in list_items("boxes", root, AliasTable(), **kw)
            if not it.skip}


# ---- the same smear in three formats ------------------------------------------------------------

def test_one_smear_as_voc_yolo_and_csv_gives_the_same_boxes(tmp_path) -> None:
    voc, yolo, table = tmp_path / "voc", tmp_path / "yolo", tmp_path / "csv"
    _voc(voc, "s1")
    _image(yolo / "images" / "s1.png")
    (yolo / "labels").mkdir(parents=True)
    (yolo / "labels" / "s1.txt").write_text(_yolo_lines())
    (yolo / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    _image(table / "s1.png")
    (table / "boxes.csv").write_text("image,xmin,ymin,xmax,ymax,label\n" +
                                     "".join(f"s1.png,{a},{b},{c},{d},{n}\n" for n, a, b, c, d in BOXES))
    assert [detect_box_layout(r) for r in (voc, yolo, table)] == ["voc", "yolo", "csv"]
    want = [("s1.png", n, (float(a), float(b), float(c), float(d))) for n, a, b, c, d in BOXES]
    read = {r.name: read_boxes(r) for r in (voc, yolo, table)}
    assert _seen(read["voc"]) == want and _seen(read["csv"]) == want
    got = _seen(read["yolo"])  # through fractions of the image size: equal up to float noise
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert all(g[2] == pytest.approx(w[2]) for g, w in zip(got, want))
    pixels = [[b.pixels() for im in images for b in im.boxes] for images in read.values()]
    assert pixels[0] == pixels[1] == pixels[2] == [(a, b, c, d) for _, a, b, c, d in BOXES]
    # the importer cuts exactly those integer boxes, whatever the format
    for root in (voc, yolo, table):
        assert _importer_boxes(root) == {"s1.png": [(n, (a, b, c, d)) for n, a, b, c, d in BOXES]}


def test_fractional_coordinates_stay_floats_and_cover_whole_pixels_when_cut(tmp_path) -> None:
    _voc(tmp_path, "s1", [("RBC", 10.4, 20.6, 49.5, 60.0), ("RBC", 99.99, 30.01, 160.2, 89.7)])
    (im,) = read_voc(tmp_path)
    assert [b.xyxy for b in im.boxes] == [(10.4, 20.6, 49.5, 60.0), (99.99, 30.01, 160.2, 89.7)]
    # one rounding rule for cutting: floor x0 / y0, ceil x1 / y1: the integer box holds the written one
    assert [b.pixels() for b in im.boxes] == [(10, 20, 50, 60), (99, 30, 161, 90)]
    assert _importer_boxes(tmp_path)["s1.png"] == [("RBC", (10, 20, 50, 60)), ("RBC", (99, 30, 161, 90))]
    # float noise from YOLO fractions does not widen an integer box
    assert Box("RBC", (0.1 * 3 * 100, 10.000000000001, 99.99999999999, 50.0)).pixels() == (30, 10, 100, 50)


def test_image_size_from_the_header_matches_the_decoded_image(tmp_path) -> None:
    # YOLO fractions are of the image as it decodes: a phone JPEG stored sideways (EXIF orientation 6)
    # decodes upright, so its width and height swap
    im = Image.fromarray(np.zeros((40, 100, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "side.jpg", exif=exif)
    im.save(tmp_path / "plain.png")
    for name in ("side.jpg", "plain.png"):
        h, w = read_rgb(tmp_path / name).shape[:2]
        assert image_size(tmp_path / name) == (w, h)
    assert image_size(tmp_path / "plain.png") == (100, 40)


# ---- per-image problems and folder problems ---------------------------------------------------

def test_a_missing_image_or_bad_file_costs_its_image_only(tmp_path) -> None:
    voc = tmp_path / "voc"
    _voc(voc, "a")
    _voc(voc, "b", image=False)
    _voc(voc, "c", filename="C:\\scans\\c.png", image=False)  # the annotator's folders are dropped
    _voc(voc, "d", filename="d", image=False)  # no suffix in <filename>: found as JPEGImages/d.*
    _image(voc / "JPEGImages" / "c.png")
    _image(voc / "JPEGImages" / "d.jpg")
    (voc / "Annotations" / "e.xml").write_text("<annotation><object>")
    _voc(voc, "f", [("RBC", "ten", 1, 2, 3)])
    got = {im.path.stem: im for im in read_voc(voc)}
    assert sorted(got) == list("abcdef")
    assert not got["a"].error and got["c"].path == voc / "JPEGImages" / "c.png" and not got["c"].error
    assert got["d"].path == voc / "JPEGImages" / "d.jpg" and not got["d"].error
    assert got["b"].error.startswith("image not found") and got["b"].boxes == ()
    assert got["e"].error.startswith("unreadable VOC annotation") and got["e"].annotation.name == "e.xml"
    assert got["f"].error.startswith("VOC object without a numeric bndbox")
    # the importer rejects those images with their reason, and keeps the rest
    items = {it.path.stem: it for it in list_items("boxes", voc, AliasTable())}
    assert items["b"].skip == got["b"].error and items["e"].skip == got["e"].error
    assert not items["a"].skip and len(items["a"].boxes) == 3
    # YOLO: a malformed label line, an unreadable image; an image without a label file has no objects
    yolo = tmp_path / "yolo"
    for stem in ("ok", "bad", "none"):
        _image(yolo / "images" / f"{stem}.png")
    (yolo / "images" / "broken.png").write_bytes(b"not an image")
    (yolo / "labels").mkdir()
    (yolo / "labels" / "ok.txt").write_text(_yolo_lines())
    (yolo / "labels" / "bad.txt").write_text("0 0.5 0.5 0.1\n")
    (yolo / "labels" / "broken.txt").write_text(_yolo_lines())
    (yolo / "labels" / "classes.txt").write_text("\n".join(CLASSES))  # classes.txt inside labels/ works too
    got = {im.path.stem: im for im in read_yolo(yolo)}
    assert len(got["ok"].boxes) == 3 and not got["ok"].error
    assert got["bad"].error.startswith("malformed YOLO label line")
    assert got["broken"].error == "unreadable image"
    assert got["none"].boxes == () and got["none"].error is None
    # CSV: a row with bad numbers, and an image that is not there
    table = tmp_path / "csv"
    _image(table / "s1.png")
    _image(table / "s2.png")
    (table / "boxes.csv").write_text("image,xmin,ymin,xmax,ymax,label\ns1.png,1,2,30,40,RBC\ns2.png,1,x,30,40,RBC\n"
                                     "gone.png,1,2,3,4,RBC\n")
    got = {im.path.name: im.error for im in read_box_csv(table / "boxes.csv")}
    assert got == {"s1.png": None, "s2.png": "malformed boxes CSV row (coordinates not numbers)",
                   "gone.png": "image not found"}


def test_folder_problems_are_one_clear_error(tmp_path) -> None:
    with pytest.raises(BloodcellsError, match="no such folder"):
        read_boxes(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BloodcellsError, match=r"empty: no boxes found; expected Pascal VOC"):
        read_boxes(tmp_path / "empty")
    (tmp_path / "y" / "labels").mkdir(parents=True)
    with pytest.raises(BloodcellsError, match=r"y: no classes.txt .*one class name a line"):
        read_boxes(tmp_path / "y")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "boxes.csv").write_text("image,x0,y0,x1,y1,label\n")
    with pytest.raises(BloodcellsError, match=r"boxes.csv: no column xmin, ymin, xmax, ymax; the header must name"):
        read_boxes(tmp_path / "c")
    with pytest.raises(BloodcellsError, match="one of: auto, voc, yolo, csv"):
        read_boxes(tmp_path / "c", layout="coco")


# ---- splits ------------------------------------------------------------------------------------

def test_split_lists_voc_yolo_and_csv(tmp_path) -> None:
    voc = tmp_path / "voc"
    for stem in ("s1", "s2", "s3"):
        _voc(voc, stem)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "test.txt").write_text("s3\n\ns1 1\n")  # listed order; per-class lists add a flag
    (voc / "ImageSets" / "Main" / "val.txt").write_text("s2\ns9\n")
    assert [im.path.stem for im in read_voc(voc, "test")] == ["s3", "s1"]
    assert [im.path.stem for im in read_voc(voc, "all")] == ["s1", "s2", "s3"]
    val = read_voc(voc, "val")
    assert val[0].error is None and val[1].error.startswith("annotation missing")
    with pytest.raises(BloodcellsError, match=r"ImageSets/Main/train.txt: no such split list; .*--split all"):
        read_voc(voc, "train")
    # the importer reads every annotation but never cuts the test smears, unless asked to
    items = {it.path.stem: it.skip for it in list_items("boxes", voc, AliasTable())}
    assert items == {"s1": "reserved: test split kept for real-smear evaluation", "s2": None,
                     "s3": "reserved: test split kept for real-smear evaluation"}
    assert set(_importer_boxes(voc, include_test=True)) == {"s1.png", "s2.png", "s3.png"}
    # YOLO: images/<split>/ with labels/<split>/; 'all' takes every split folder and images/ itself
    yolo = tmp_path / "yolo"
    (yolo / "classes.txt").parent.mkdir(parents=True)
    (yolo / "classes.txt").write_text("\n".join(CLASSES))
    for sub, stem in (("train", "a"), ("test", "b"), ("", "c")):
        _image(yolo / "images" / sub / f"{stem}.png")
        (yolo / "labels" / sub).mkdir(parents=True, exist_ok=True)
        (yolo / "labels" / sub / f"{stem}.txt").write_text(_yolo_lines(BOXES[:1 + len(sub) % 3]))
    assert [(im.path.stem, len(im.boxes)) for im in read_yolo(yolo, "test")] == [("b", 2)]
    assert sorted((im.path.stem, len(im.boxes)) for im in read_yolo(yolo, "all")) == [("a", 3), ("b", 2), ("c", 1)]
    with pytest.raises(BloodcellsError, match=r"images/val: no such split folder; use --split all"):
        read_yolo(yolo, "val")
    table = tmp_path / "csv"
    table.mkdir()
    (table / "boxes.csv").write_text("image,xmin,ymin,xmax,ymax,label\n")
    with pytest.raises(BloodcellsError, match="boxes.csv: a boxes CSV has no splits; use --split all"):
        read_boxes(table, split="test")


# ---- CSV headers -------------------------------------------------------------------------------

def test_bom_and_odd_column_case_and_order(tmp_path) -> None:
    _image(tmp_path / "s1.png")
    (tmp_path / "boxes.csv").write_bytes("\ufeff Label ,IMAGE, X Min,yMin ,Xmax,Y MAX\r\nRBC,s1.png,1.5,2,30,40\r\n"
                                         .encode("utf-8"))
    (im,) = read_boxes(tmp_path)
    assert im.path == tmp_path / "s1.png" and im.boxes == (Box("RBC", (1.5, 2.0, 30.0, 40.0)),)
    (tmp_path / "labels.csv").write_bytes("\ufeffImage ID,Class Label\n001,2\nBloodImage_00004.jpg,Baso\n"
                                          .encode("utf-8"))
    assert read_id_csv(tmp_path / "labels.csv") == {"1": "2", "bloodimage_00004": "Baso"}
    (tmp_path / "sub.csv").write_bytes("\ufeff,IMAGE,category\n,3,Neutrophil\n".encode("utf-8"))
    assert read_wbc_subtypes(tmp_path / "sub.csv").lookup("BloodImage_00003.jpg").name == "Neutrophil"
    (tmp_path / "bad.csv").write_text("file,colour\n1,red\n")
    with pytest.raises(BloodcellsError, match=r"bad.csv: needs an image-id column .* and a class column"):
        read_id_csv(tmp_path / "bad.csv")
    with pytest.raises(BloodcellsError, match=r"missing.csv: not found; check --wbc-labels"):
        read_wbc_subtypes(tmp_path / "missing.csv")


# ---- WBC subtypes ------------------------------------------------------------------------------

def test_subtype_rules_and_keys(tmp_path) -> None:
    path = tmp_path / "subtypes.csv"
    path.write_text(',Image,Category\n,0,NEUTROPHIL\n,3,"EOSINOPHIL "\n,10,"NEUTROPHIL, EOSINOPHIL"\n'
                    ',11,"NEUTROPHIL,NEUTROPHIL"\n,12,\n,smear_A.png,lymphocyte\n,007,MONOCYTE\n,13,BAND\n')
    table = read_wbc_subtypes(path)
    look = {name: table.lookup(name) for name in ("BloodImage_00000.jpg", "BloodImage_00003.jpg", "BloodImage_00010.jpg",
                                                  "BloodImage_00011.jpg", "BloodImage_00012.jpg", "smear_a.png",
                                                  "7.bmp", "BloodImage_00099.jpg", "x/BloodImage_00013.jpg")}
    assert {k: (s.name, s.reason) for k, s in look.items()} == {
        "BloodImage_00000.jpg": ("NEUTROPHIL", None),
        "BloodImage_00003.jpg": ("EOSINOPHIL", None),
        "BloodImage_00010.jpg": (None, SUBTYPE_AMBIGUOUS),
        "BloodImage_00011.jpg": (None, SUBTYPE_AMBIGUOUS),
        "BloodImage_00012.jpg": (None, SUBTYPE_MISSING),  # blank
        "smear_a.png": ("lymphocyte", None),  # by stem, any case
        "7.bmp": ("MONOCYTE", None),  # 007 = 7
        "BloodImage_00099.jpg": (None, SUBTYPE_MISSING),  # not listed
        "x/BloodImage_00013.jpg": ("BAND", None),
    }
    assert image_key("001.bmp") == image_key("1") == "1" and image_key("Smear.2023") == "smear.2023"
    # evaluation scores the five WBC types only; the importer counts each WBC box it cannot use by reason
    assert [subtype_of(n, table) for n in ("BloodImage_00003.jpg", "BloodImage_00010.jpg", "x/BloodImage_00013.jpg")] \
        == ["eosinophil", None, None]
    for stem, _ in (("BloodImage_00003", 0), ("BloodImage_00010", 0), ("BloodImage_00012", 0), ("BloodImage_00099", 0)):
        _voc(tmp_path / "voc", stem, [("WBC", 40, 20, 120, 100), ("RBC", 10, 10, 30, 30)])
    items = list_items("boxes", tmp_path / "voc", AliasTable(), wbc_labels=path)
    reasons = Counter(b.skip for it in items for b in it.boxes if b.label == "WBC")
    assert reasons == Counter({None: 1, SUBTYPE_AMBIGUOUS: 1, SUBTYPE_MISSING: 2})
    assert [b.cls for it in items for b in it.boxes if b.label == "WBC" and not b.skip] == ["eosinophil"]


# ---- the real BCCD folder ----------------------------------------------------------------------

def test_importer_and_evaluator_see_the_same_bccd_test_boxes(datasets) -> None:
    root = datasets / "bccd" / "BCCD"
    subtypes_csv = datasets / "bccd" / "wbc_subtype_labels_mooney.csv"
    evaluated = read_boxes(root, "voc", "test")  # what evaluate-real scores
    assert len(evaluated) == 72 and not any(im.error for im in evaluated)
    test = {im.path for im in evaluated}
    items = {it.path: it for it in list_items("mamic", root, AliasTable(), wbc_labels=subtypes_csv, include_test=True)
             if it.path in test}
    assert set(items) == test
    table = read_wbc_subtypes(subtypes_csv)
    n = 0
    for im in evaluated:
        cut = items[im.path].boxes
        assert [b.label for b in cut] == [b.label for b in im.boxes]
        # BCCD writes integer pixels: the importer's boxes are the evaluator's, exactly
        assert [tuple(float(v) for v in b.xyxy) for b in cut] == [b.xyxy for b in im.boxes]
        sub = subtype_of(im.path, table)
        assert {b.cls for b in cut if b.label == "WBC"} <= {sub}, im.path.name
        n += len(cut)
    assert n > 900
    # without --include-test those smears are never cut
    reserved = {it.path for it in list_items("mamic", root, AliasTable()) if it.skip and it.skip.startswith("reserved")}
    assert reserved == test


# ---- legend ------------------------------------------------------------------------------------

def test_legend_draws_each_class_colour_and_wraps() -> None:
    classes = [index_of("eosinophil"), index_of("healthy_rbc"), index_of("thrombocyte")]
    wide, narrow = legend(classes, 600), legend(classes, 200)
    assert wide.shape == (28, 600, 3) and narrow.shape == (3 * 22 + 6, 200, 3)
    for k, c in enumerate(classes):
        assert (wide[12, 8 + k * 150 + 7] == PALETTE[c]).all()  # the swatch of the k-th class
        assert (narrow[4 + k * 22 + 10, 15] == PALETTE[c]).all()
    assert legend([], 100).shape == (28, 100, 3)
