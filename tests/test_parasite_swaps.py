"""bench/parasite_swaps.py: found infected cells called healthy, binned by their sprite's parasite share."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from bloodcells.classes import index_of

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # it imports decode_sweep beside it
spec = importlib.util.spec_from_file_location("parasite_swaps", BENCH / "parasite_swaps.py")
parasite_swaps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parasite_swaps)

RBC, INF, NEU = index_of("healthy_rbc"), index_of("infected_rbc"), index_of("neutrophil")


def test_found_infected_cells_and_their_call():
    gt = np.zeros((40, 40), np.int32)
    gt[0:10, 0:10], gt[0:10, 20:30], gt[20:30, 0:10], gt[20:30, 20:30], gt[35:37, 35:37] = 1, 2, 3, 4, 5
    gt_cls = np.array([INF, INF, RBC, INF, INF])
    pred = np.zeros_like(gt)
    pred[0:10, 0:10] = 1      # infected cell 1 called healthy
    pred[0:10, 20:30] = 2     # infected cell 2 called infected
    pred[20:30, 0:10] = 3     # a healthy cell: not counted
    pred[20:30, 20:30] = 4    # infected cell 4 under a white cell's call: not a red cell, not found
    pred[35:37, 35:37] = 5    # infected cell 5: too little visible to count
    rows = parasite_swaps.found_infected(gt, gt_cls, pred, np.array([RBC, INF, RBC, NEU, RBC]), least=10)
    assert rows == [(1, True), (2, False)]


def test_table_bins_by_parasite_share():
    rows = [(0.0, True), (0.0, True), (0.0, False), (0.01, False), (0.01, True), (0.5, False)]
    t = {r["bin"]: r for r in parasite_swaps.table(rows)}
    assert t["0-0.001"]["cells"] == 3 and abs(t["0-0.001"]["called_healthy"] - 2 / 3) < 1e-9
    assert abs(t["0-0.001"]["of_swaps"] - 2 / 3) < 1e-9 and abs(t["0.008-0.015"]["of_swaps"] - 1 / 3) < 1e-9
    assert t["0.015-1"]["cells"] == 1 and sum(r["cells"] for r in t.values()) == len(rows)


def test_sprite_shares_and_the_sheet_least_first(tmp_path):
    import cv2

    from bloodcells.composer.aliases import AliasTable
    from bloodcells.composer.bank import SpriteBank
    from bloodcells.composer.sources import list_items

    root = tmp_path / "cells"
    for name, r in (("big", 7), ("none", 0), ("small", 4)):
        img = np.zeros((100, 100, 3), np.uint8)
        cv2.circle(img, (50, 50), 40, (200, 150, 150), -1)
        if r:
            cv2.circle(img, (40, 60), r, (110, 40, 140), -1)
        (root / "Parasitized").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "Parasitized" / f"{name}.png"), img[..., ::-1])
    bank = tmp_path / "bank"
    SpriteBank(bank).import_items(list_items("kaggle", root, AliasTable()), "k", workers=1, progress=False,
                                  min_parasite=0)
    shares = parasite_swaps.sprite_shares(bank)
    by_file = {Path(e["file"]).stem: shares[e["sprites"][0]["id"]] for e in SpriteBank(bank).entries()}
    assert by_file["none"] == 0.0 < by_file["small"] < by_file["big"]
    sheet = parasite_swaps.least_sheet(bank, shares, per_row=10, tile=96)
    assert sheet.shape == (96, 960, 3)
    first, second = sheet[20:, :96], sheet[20:, 96:192]  # below the printed share
    assert first.std() < second.std()  # the clean cell first, then the one with the small body


def test_a_folder_without_infected_sprites_is_a_clear_error(tmp_path):
    import pytest

    from bloodcells.errors import BloodcellsError

    with pytest.raises(BloodcellsError, match="no sprite bank here"):
        parasite_swaps.sprite_shares(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "index.jsonl").write_text("")
    with pytest.raises(BloodcellsError, match="no infected_rbc sprites"):
        parasite_swaps.sprite_shares(tmp_path / "empty")
