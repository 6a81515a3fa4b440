"""One row per trained model: synthetic test and BCCD test scores, as the tables of bench/RESULTS.md print them.

python bench/real_table.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--real eval-real] [--test eval-test]

Each RUN_DIR holds the folders written by
    cli evaluate      --model RUN/best.pt --data DATA --split test --out RUN/eval-test
    cli evaluate-real --model RUN/best.pt --voc .../bccd/BCCD --split test --scale auto \\
                      --wbc-labels .../wbc_subtype_labels_mooney.csv --out RUN/eval-real
(a missing one leaves its columns empty).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _f(v: float | None, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def row(name: str, run: Path, real: str, test: str) -> str:
    t = _load(run / test / "metrics.json")
    r = _load(run / real / "metrics.json")
    cells = []
    if t is not None:
        inst = t.get("instances") or {}
        pq = inst.get("per_class_pq") or [None] * 10
        rbc_mae = (inst.get("per_group_count_mae") or {}).get("rbc")
        cells += [_f(t["pixel_accuracy"]), _f(pq[8], 2), _f(pq[9], 2), _f(rbc_mae, 2)]
    else:
        cells += ["-"] * 4
    if r is not None:
        g = r["groups"]
        st = r["wbc_subtype"]
        cells += [_f(g["rbc"]["f1"]), _f(g["wbc"]["f1"]), _f(g["platelet"]["f1"]),
                  f"{_f(st['accuracy'], 2)} ({st['correct']}/{st['matched_with_subtype']})",
                  _f((r.get("count_error_pct") or {}).get("rbc"), 0) + "%",
                  _f(100 * r["rbc_infected_share"] if r.get("rbc_infected_share") is not None else None, 1) + "%"]
    else:
        cells += ["-"] * 6
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    ap.add_argument("--real", default="eval-real")
    ap.add_argument("--test", default="eval-test")
    args = ap.parse_args()
    print("| model | synthetic pixel acc | PQ infected | PQ healthy | RBC count MAE / scene | BCCD RBC F1 | WBC F1 | "
          "platelet F1 | WBC subtype | RBC count error | RBC px called infected |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for item in args.runs:
        name, _, path = item.partition("=")
        print(row(name, Path(path), args.real, args.test))


if __name__ == "__main__":
    main()
