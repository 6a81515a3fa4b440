"""bench/decode_sweep.py's scores: a red cell outlined right but given the other red class counts against the
per-class PQ, not against the PQ of the red cells taken as one."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from bloodcells.classes import index_of
from bloodcells.segmenter.instances import Cells

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("decode_sweep", BENCH / "decode_sweep.py")
decode_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decode_sweep)

RBC, INF = index_of("healthy_rbc"), index_of("infected_rbc")


def cells(inst: np.ndarray, classes: list[int]) -> Cells:
    n = len(classes)
    return Cells(inst, np.array(classes, np.int64), np.bincount(inst.ravel(), minlength=n + 1)[1:],
                 np.ones(n), np.zeros((n, 4), np.int64), np.zeros((n, 2)))


def test_red_cells_as_one_ignore_the_infected_call():
    gt = np.zeros((40, 40), np.int32)
    gt[2:12, 2:12], gt[20:30, 20:30] = 1, 2      # a healthy and an infected cell
    pred = gt.copy()                             # both outlined exactly, the infected one called healthy
    r = decode_sweep.score([(gt, np.array([RBC, INF]))], [cells(pred, [RBC, RBC])], {})
    assert r["pq_red"] == pytest.approx(1.0)
    assert r["pq_healthy"] == pytest.approx(1 / 1.5)   # one true positive, one false positive
    assert r["pq_infected"] == 0.0
    assert r["rbc_mae"] == 0.0 and r["rbc_bias"] == 0.0
    assert r["infected_mae"] == 1.0 and r["infected_bias"] == -1.0   # one parasitised cell a scene uncounted
    half = gt.copy()
    half[20:30, 25:30] = 0                       # the second cell's outline half wrong: no match at IoU 0.5
    r = decode_sweep.score([(gt, np.array([RBC, INF]))], [cells(half, [RBC, INF])], {})
    assert r["pq_red"] == pytest.approx(1 / 2)   # one exact match, one false positive, one false negative
