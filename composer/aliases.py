"""Class-name aliases: what source datasets call a cell -> the project's class name.

Keys are matched case-insensitively with spaces, dashes and underscores ignored. A value
of `SKIP` means "known, but not one cell type" (e.g. LISC's `mixt` folder): such items
are skipped and counted, not reported as unknown. Users extend or override the table
with `--alias NAME=CLASS` (CLASS may be `skip`)."""
from __future__ import annotations

import re

from bloodcells.classes import NAMES
from bloodcells.errors import BloodcellsError

SKIP = "skip"

DEFAULT_ALIASES: dict[str, str] = {
    # canonical names and plurals
    **{n: n for n in NAMES if n != "background"},
    **{n + "s": n for n in NAMES if n != "background"},
    # WBC spellings (PBC folders, LISC folders, BCCD subtype CSV)
    "eos": "eosinophil", "eosi": "eosinophil", "eo": "eosinophil",
    "baso": "basophil", "baoso": "basophil", "ba": "basophil",
    "neut": "neutrophil", "neu": "neutrophil", "ne": "neutrophil", "sne": "neutrophil",
    "bne": "neutrophil", "segmented neutrophil": "neutrophil", "band neutrophil": "neutrophil",
    "lymp": "lymphocyte", "lymph": "lymphocyte", "ly": "lymphocyte",
    "mono": "monocyte", "mo": "monocyte",
    # platelets
    "platelet": "thrombocyte", "platelets": "thrombocyte", "plt": "thrombocyte",
    "thrombocytes": "thrombocyte",
    "platelet clump": "platelet_clump", "clump": "platelet_clump",
    # red cells (Kaggle/NIH malaria folders, BCCD/VOC names)
    "parasitized": "infected_rbc", "infected": "infected_rbc", "malaria": "infected_rbc",
    "uninfected": "healthy_rbc", "healthy": "healthy_rbc", "rbc": "healthy_rbc",
    "red blood cell": "healthy_rbc", "erythrocyte": "healthy_rbc",
    # numeric class codes of the Tecom / Zheng et al. WBC set (`Class Labels of Dataset 1.csv`)
    "1": "neutrophil", "2": "lymphocyte", "3": "monocyte", "4": "eosinophil", "5": "basophil",
    # known non-classes
    "mixt": SKIP, "mixed": SKIP, "unknown": SKIP, "wbc": SKIP,
}


def normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


class AliasTable:
    """Maps source labels to class names; unknown labels return None."""

    def __init__(self, overrides: dict[str, str] | None = None):
        self.table = {normalise(k): v for k, v in DEFAULT_ALIASES.items()}
        for k, v in (overrides or {}).items():
            v = v.strip().lower()
            if v != SKIP and v not in NAMES:
                raise BloodcellsError(
                    f"--alias {k}={v}: '{v}' is not a class; use one of {', '.join(NAMES[1:])} or 'skip'")
            self.table[normalise(k)] = v

    def resolve(self, label: str) -> str | None:
        return self.table.get(normalise(label))

    @staticmethod
    def parse(pairs: list[str]) -> dict[str, str]:
        """`["Baoso=basophil", ...]` -> dict; a malformed pair is a clear error."""
        out = {}
        for p in pairs:
            if "=" not in p:
                raise BloodcellsError(f"--alias '{p}': expected NAME=CLASS, e.g. --alias Baoso=basophil")
            k, v = p.split("=", 1)
            out[k] = v
        return out
