"""bench/count_errors.py: every true and unmatched predicted red cell of a composed scene gets the kind it is."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from bloodcells.classes import index_of

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # count_errors imports decode_sweep beside it
spec = importlib.util.spec_from_file_location("count_errors", BENCH / "count_errors.py")
count_errors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(count_errors)

RBC, INF = index_of("healthy_rbc"), index_of("infected_rbc")


def test_true_and_predicted_red_cells_sorted_by_kind():
    gt = np.zeros((50, 50), np.int32)
    gt[5:15, 5:15], gt[5:15, 15:25] = 1, 2      # two touching cells ...
    gt[30:40, 30:40] = 3                        # one cut in two
    gt[30:40, 5:15] = 4                         # one not predicted
    gt[0:6, 40:50] = 5                          # one cut by the edge, 60% visible
    pred = np.zeros_like(gt)
    pred[5:15, 5:25] = 1                        # ... taken as one
    pred[30:40, 30:35], pred[30:40, 35:40] = 2, 3
    pred[20:28, 20:28] = 4                      # on plasma
    pred[0:6, 40:50] = 5                        # found (an infected call still finds a red cell; it is a swap)
    truth, extra = count_errors.sort_scene(gt, np.full(5, RBC), pred, np.array([RBC, RBC, RBC, RBC, INF]), 100.0, 15)
    assert [k for k, *_ in truth] == ["merged", "merged", "cut", "missed", "found"]
    assert truth[4][1:] == ("0.4-0.7", True, "healthy->infected") and truth[0][1:] == (">=0.7", False, "")
    assert extra == ["merger", "piece", "piece", "no cell"]


def test_cells_too_little_visible_are_not_counted():
    gt = np.zeros((20, 20), np.int32)
    gt[0:2, 0:5] = 1  # 10 px, under the least counted area
    truth, extra = count_errors.sort_scene(gt, np.array([RBC]), np.zeros_like(gt), np.zeros(0, np.int64), 100.0, 15)
    assert truth == [] and extra == []
