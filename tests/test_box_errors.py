"""bench/box_errors.py: every unmatched cell and box gets the kind it is."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location("box_errors", Path(__file__).resolve().parents[1] / "bench" / "box_errors.py")
box_errors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(box_errors)


def kinds(pred, areas, gt, other=np.zeros((0, 4))):
    r = box_errors.sort_image(np.array(pred, float), np.array(areas, float), np.array(gt, float).reshape(-1, 4),
                              np.array(other, float).reshape(-1, 4), (480, 640), 0.3)
    median = float(np.median(r["matched_areas"])) if r["matched_areas"] else 1.0
    fp = [box_errors.fp_kind(f, median) for f in r["fp"]]
    clumps = {i for i, k in enumerate(fp) if k == "clump"}
    return r["tp"], fp, [box_errors.fn_kind(f, clumps) for f in r["fn"]]


def test_false_positives_sorted_by_kind():
    gt = [[100, 100, 130, 130], [200, 100, 230, 130], [300, 300, 330, 330]]
    pred = [[100, 100, 130, 130],   # matched
            [200, 100, 230, 130],   # matched
            [104, 104, 114, 114],   # inside a matched box: a piece of that cell
            [0, 50, 30, 80],        # at the left edge
            [400, 400, 405, 405],   # tiny, far from every box
            [400, 200, 460, 260],   # four times a cell's area
            [300, 322, 330, 352],   # overlaps the third box at IoU 0.16
            [500, 300, 530, 330]]   # a cell-sized object with no box near it
    areas = [700, 700, 80, 700, 20, 2800, 700, 700]
    tp, fp, fn = kinds(pred, areas, gt)
    assert tp == 2
    assert fp == ["piece", "border", "fragment", "clump", "near", "no box"]
    assert fn == ["near"]


def test_false_negatives_sorted_by_kind():
    gt = [[100, 100, 130, 130], [125, 100, 155, 130],  # two touching cells, found as one large one
          [300, 100, 330, 130],                         # a white cell lies on it
          [500, 100, 530, 130]]                         # nothing there
    pred = [[100, 100, 155, 130]]
    tp, fp, fn = kinds(pred, [1500], gt, other=[[298, 98, 332, 132]])
    assert tp == 1
    assert fp == []
    assert fn == ["merged", "other group", "missed"]


def test_contact_sheet_crops_have_one_size():
    image = np.full((120, 160, 3), 200, np.uint8)
    tiles = [box_errors.crop(image, b, np.array([[10, 10, 40, 40]], float)) for b in ([0, 0, 30, 20], [140, 100, 160, 120])]
    assert all(t.shape == (96, 96, 3) for t in tiles)
    assert box_errors.sheet(tiles, cols=10).shape == (98, 980, 3)


def test_boxes_inside_a_clump_are_merged():
    """Three touching cells found as one large object that matches none of them: a clump, and three merged boxes."""
    gt = [[100, 100, 130, 130],                                              # found on its own
          [300, 100, 330, 130], [330, 100, 360, 130], [315, 130, 345, 160]]  # found as one
    pred = [[100, 100, 130, 130], [300, 100, 360, 160]]
    tp, fp, fn = kinds(pred, [700, 2800], gt)
    assert tp == 1
    assert fp == ["clump"]
    assert fn == ["merged", "merged", "merged"]
