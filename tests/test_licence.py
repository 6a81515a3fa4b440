"""Source licences: read from the files beside a dataset, recorded by the bank, carried into dataset.json."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from typer.testing import CliRunner

from bloodcells.cli import app
from bloodcells.composer.aliases import AliasTable
from bloodcells.composer.bank import SpriteBank
from bloodcells.composer.dataset import sprite_pools
from bloodcells.composer.licence import BUILTIN_LICENCE, find_licence, from_source_note
from bloodcells.composer.recipe import load_recipe
from bloodcells.composer.sources import list_items

APACHE = "                                 Apache License\n                           Version 2.0, January 2004\n"


def _cells(root: Path, n: int = 3) -> Path:
    """A kaggle-layout folder of n round healthy cells on black."""
    for i in range(n):
        img = np.zeros((90, 90, 3), np.uint8)
        cv2.circle(img, (45, 45), 35, (200, 150, 150), -1)
        (root / "Uninfected").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "Uninfected" / f"{i}.png"), img)
    return root


def test_real_source_notes(datasets):
    got = {name: find_licence(datasets / name / sub) for name, sub in
           (("bccd", "BCCD"), ("wbc_tecom", "Dataset 1"), ("pbc", "PBC_dataset_normal_DIB"),
            ("kaggle_malaria", "cell_images"), ("lisc_crops", "data2"))}
    assert got["bccd"][0].startswith("MIT") and got["bccd"][1] == str(datasets / "bccd" / "SOURCE.txt")
    assert got["wbc_tecom"][0].startswith("GPL-3.0")
    # the data's own licence (inline in the 'Original dataset' line) comes first, then the repository's
    assert got["pbc"][0].startswith("CC BY 4.0; Repo license: MIT")
    assert got["kaggle_malaria"][0].startswith("Repo license: MIT")
    assert "MIT" in got["lisc_crops"][0] and "research" in got["lisc_crops"][0]


def test_source_note_header_only():
    note = "Source: x\nLicense: GPL-3.0 (see below)\n\n===== LICENSE =====\nMIT License\nLicense: other\n"
    assert from_source_note(note) == "GPL-3.0 (see below)"
    assert from_source_note("Source: x\nno terms here\n") is None


def test_licence_files_nearest_first(tmp_path):
    deep = tmp_path / "top" / "mid" / "data"
    deep.mkdir(parents=True)
    (tmp_path / "top" / "LICENSE.txt").write_text(APACHE)
    assert find_licence(deep) == ("Apache-2.0", str(tmp_path / "top" / "LICENSE.txt"))
    # a README nearer the data that names a licence wins over the parent's LICENSE
    (tmp_path / "top" / "mid" / "README.md").write_text("# Cells\n\n## License\nReleased under the **MIT** license.\n")
    assert find_licence(deep)[0] == "Released under the MIT license."
    # in one folder SOURCE.txt is trusted before README
    (tmp_path / "top" / "mid" / "SOURCE.txt").write_text("Source: somewhere\nLicence: CC BY 4.0\n")
    assert find_licence(deep) == ("CC BY 4.0", str(tmp_path / "top" / "mid" / "SOURCE.txt"))
    # more than two parents up is not looked at; a README without a licence name does not count
    far = tmp_path / "a" / "b" / "c" / "d"
    far.mkdir(parents=True)
    (tmp_path / "a" / "LICENSE").write_text(APACHE)
    (far / "README").write_text("Blood cells. See the licence of the original authors.\n")
    assert find_licence(far) == ("unknown", None)


def test_import_records_licence_and_dataset_carries_it(tmp_path):
    src = _cells(tmp_path / "malaria" / "cells")
    (tmp_path / "malaria" / "SOURCE.txt").write_text("Source: made up\nLicense: CC0 1.0\n")
    bank = tmp_path / "bank"
    runner = CliRunner()
    r = runner.invoke(app, ["sprites", "import", "kaggle", str(src), "--bank", str(bank), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "licence: CC0 1.0" in r.output and "SOURCE.txt" in r.output
    r = runner.invoke(app, ["sprites", "import", "kaggle", str(src), "--bank", str(bank), "--workers", "1",
                            "--name", "second", "--licence", "GPL-3.0"])
    assert r.exit_code == 0, r.output
    # a source imported without any licence (the Python call) is listed as unknown
    other = _cells(tmp_path / "x" / "y" / "z" / "other", 2)
    SpriteBank(bank).import_items(list_items("kaggle", other, AliasTable()), "plain", workers=1, progress=False)
    sources = SpriteBank(bank).sources()
    assert sources["kaggle:cells"] == {"licence": "CC0 1.0", "from": str(tmp_path / "malaria" / "SOURCE.txt")}
    assert sources["second"] == {"licence": "GPL-3.0", "from": "--licence"}
    assert sources["plain"] == {"licence": "unknown", "from": None}
    _, info = sprite_pools(bank, load_recipe("tiny"))
    # 'second' re-imported the same files: nothing new, so it owns no sprites and is not listed
    assert info["sources"] == {"kaggle:cells": {"licence": "CC0 1.0", "from": str(tmp_path / "malaria" / "SOURCE.txt"),
                                                "sprites": 3},
                               "plain": {"licence": "unknown", "from": None, "sprites": 2}}


def test_builtin_sprites_are_the_projects_own():
    recipe = load_recipe("tiny")
    _, info = sprite_pools(None, recipe)
    assert list(info["sources"]) == ["builtin"]
    assert info["sources"]["builtin"]["licence"] == BUILTIN_LICENCE and info["sources"]["builtin"]["sprites"] > 0
