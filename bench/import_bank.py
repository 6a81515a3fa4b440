"""Time importing every real source into a fresh bank; reference: only decoding the same images.

python bench/import_bank.py [--data ../shared/datasets] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bloodcells.imageio import read_rgb  # noqa: E402
from bloodcells.composer.aliases import AliasTable  # noqa: E402
from bloodcells.composer.bank import SpriteBank  # noqa: E402
from bloodcells.composer.sources import list_items  # noqa: E402
from conftest import REAL_SOURCES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("BLOODCELLS_DATA", "../shared/datasets"))
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    data = Path(a.data)
    with tempfile.TemporaryDirectory() as tmp:
        bank = SpriteBank(Path(tmp) / "bank")
        total_items, t_import, t_read, n_sprites = 0, 0.0, 0.0, 0
        print(f"{'source':<32} {'images':>6} {'sprites':>7} {'import s':>8} {'read-only s':>11}")
        for kind, folder, extra in REAL_SOURCES:
            items = list_items(kind, data / folder, AliasTable(), **{k: data / v for k, v in extra.items()})
            t0 = time.perf_counter()
            s = bank.import_items(items, f"{kind}:{Path(folder).name}", workers=a.workers, progress=False)
            t1 = time.perf_counter()
            for it in items:
                if not it.skip:
                    read_rgb(it.path)
            t2 = time.perf_counter()
            n = sum(s.accepted.values())
            print(f"{kind + ':' + Path(folder).name:<32} {len(items):>6} {n:>7} {t1 - t0:>8.1f} {t2 - t1:>11.1f}")
            total_items += len(items); t_import += t1 - t0; t_read += t2 - t1; n_sprites += n
        print(f"{'total':<32} {total_items:>6} {n_sprites:>7} {t_import:>8.1f} {t_read:>11.1f}")
        print(f"import: {total_items / t_import:.1f} source images/s, {n_sprites / t_import:.0f} sprites/s; "
              f"import / read-only (1 process) = {t_import / t_read:.1f}x")


if __name__ == "__main__":
    main()
