import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def datasets() -> Path:
    """The real third-party datasets; skipped when absent (CI sets BLOODCELLS_DATA and requires them)."""
    path = Path(os.environ.get("BLOODCELLS_DATA", ROOT.parent / "shared" / "datasets")).resolve()
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"BLOODCELLS_DATA={path} is missing in CI")
        pytest.skip(f"real datasets not found at {path}")
    return path


REAL_SOURCES = [
    # (importer, folder under the datasets root, extra arguments)
    ("kaggle", "kaggle_malaria/cell_images", {}),
    ("masked", "wbc_tecom/Dataset 1", {"labels": "wbc_tecom/Class Labels of Dataset 1.csv"}),
    ("crops", "pbc/PBC_dataset_normal_DIB", {}),
    ("crops", "lisc_crops/data2", {}),
    ("mamic", "bccd/BCCD", {"wbc_labels": "bccd/wbc_subtype_labels_mooney.csv"}),
]


@pytest.fixture(scope="session")
def real_bank(datasets, tmp_path_factory):
    """A sprite bank cut from every real source once per test session (about a minute on 2 cores)."""
    from bloodcells.composer.aliases import AliasTable
    from bloodcells.composer.bank import SpriteBank
    from bloodcells.composer.sources import list_items

    bank = SpriteBank(tmp_path_factory.mktemp("real") / "sprites")
    summaries = []
    for kind, folder, extra in REAL_SOURCES:
        kw = {k: datasets / v for k, v in extra.items()}
        items = list_items(kind, datasets / folder, AliasTable(), **kw)
        summaries.append(bank.import_items(items, f"{kind}:{Path(folder).name}", workers=2, progress=False))
    return bank, summaries


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread: tiny models run no slower, and a busy second core cannot stall OpenMP barriers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """The built-in 'tiny' recipe composed once per test session (a couple of seconds): images, labels, instances."""
    from bloodcells.composer.dataset import compose, sprite_pools
    from bloodcells.composer.recipe import load_recipe

    out = tmp_path_factory.mktemp("tiny")
    recipe = load_recipe("tiny")
    pools, info = sprite_pools(None, recipe)
    compose(recipe, pools, out, info, workers=1, progress=False)
    return out
