"""The sprite bank on disk: RGBA PNGs per class plus an append-only index.

<bank>/index.jsonl   one line per source image: its key, source, split, sprites, rejections
<bank>/sources.json  source name -> its licence and the file it was read from
<bank>/<class>/<id>.png
A line is written only after all its PNGs exist, and in one write, so an interrupted
import leaves a consistent bank (a torn last line is dropped on the next open) and a
re-run picks up where it stopped. Re-importing a folder adds nothing twice: items whose
key is already in the index are skipped.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing as mp
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
from tqdm import tqdm

from bloodcells.classes import NAMES
from bloodcells.errors import BloodcellsError, disk_errors
from bloodcells.formats import SPLITS, read_json, write_json
from bloodcells.imageio import read_rgba, write_bytes_atomic

from .cutter import MIN_PARASITE, cut_item, sprite_id
from .licence import UNKNOWN
from .sources import Item
from .sprite import Sprite

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def assign_split(key: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """Stable split of a source image: a hash of its key, so it never depends on what else is imported."""
    u = int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) / float(1 << 48)
    edge = 0.0
    for name, f in zip(SPLITS, fractions):
        edge += f
        if u < edge:
            return name
    return SPLITS[-1]


def parse_fractions(text: str) -> tuple[float, float, float]:
    """'80/10/10' -> (0.8, 0.1, 0.1)."""
    try:
        parts = [float(p) for p in text.replace(",", "/").split("/")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise BloodcellsError(f"--split '{text}': expected three numbers train/val/test, e.g. 80/10/10")
    s = sum(parts)
    return tuple(p / s for p in parts)  # type: ignore[return-value]


@dataclass
class ImportSummary:
    source: str
    items: int = 0
    already: int = 0
    accepted: Counter = field(default_factory=Counter)  # class -> n
    fields: int = 0  # plasma (background) fields kept
    rejected: Counter = field(default_factory=Counter)  # reason -> n

    def lines(self) -> list[str]:
        out = [f"{self.source}: {self.items} source images, {self.already} already in the bank, "
               f"{sum(self.accepted.values())} sprites added, {sum(self.rejected.values())} rejected, "
               f"{self.fields} plasma fields"]
        out += [f"  + {c:<15} {n}" for c, n in sorted(self.accepted.items())]
        out += [f"  - {n:>5}  {r}" for r, n in self.rejected.most_common()]
        return out


def _work(task: tuple[Item, bool, float]):
    item, fields, min_parasite = task
    return item, cut_item(item, fields, min_parasite)


def _init_worker() -> None:
    cv2.setNumThreads(1)


class SpriteBank:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index_path = self.root / "index.jsonl"
        self.sources_path = self.root / "sources.json"

    # ---- reading ---------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """Index lines (one per source image); a torn last line is ignored."""
        if not self.index_path.is_file():
            return []
        out = []
        with open(self.index_path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    out.append(json.loads(raw))
                except json.JSONDecodeError:
                    raise BloodcellsError(f"{self.index_path}: damaged line {len(out) + 1}; delete that line "
                                          "and re-run the import to redo that image") from None
        return out

    def records(self, fields: bool = False) -> list[dict]:
        """One flat record per accepted sprite (DESIGN.md sprite record); with `fields`, also the plasma fields
        (class 'background')."""
        recs = []
        for e in self.entries():
            for s in e["sprites"]:
                if s["class"] == "background" and not fields:
                    continue
                recs.append({"id": s["id"], "class": s["class"], "source": e["source"], "source_file": e["file"],
                             "box": s["box"], "diameter": s["diameter"], "split": e["split"], "mask": s["mask"],
                             "path": f"{s['class']}/{s['id']}.png", "background": s.get("background")})
        return recs

    def sources(self) -> dict[str, dict]:
        """Source name -> {"licence", "from"} for every source imported ("unknown" where none was recorded)."""
        recorded = read_json(self.sources_path) if self.sources_path.is_file() else {}
        if not isinstance(recorded, dict):
            recorded = {}
        names = sorted({e["source"] for e in self.entries()} | set(recorded))
        return {n: {"licence": UNKNOWN, "from": None, **(recorded.get(n) or {})} for n in names}

    def bank_id(self) -> str:
        """Content id: a hash of the sorted sprite ids and splits."""
        ids = sorted(f"{r['id']}:{r['split']}" for r in self.records(fields=True))
        return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]

    def load(self, split: str | None = None) -> list[Sprite]:
        """Sprites of one split (or all), sorted by class then id for determinism."""
        if not self.root.is_dir():
            raise BloodcellsError(f"{self.root}: no sprite bank here; create one with 'cli sprites import'")
        recs = [r for r in self.records(fields=True) if split is None or r["split"] == split]
        recs.sort(key=lambda r: (NAMES.index(r["class"]), r["id"]))
        out = []
        for r in recs:
            rgba = read_rgba(self.root / r["path"])
            bg = tuple(float(v) for v in r["background"]) if r.get("background") else None
            out.append(Sprite(r["id"], r["class"], rgba, float(r["diameter"]), r["split"], r["source"], bg))
        return out

    # ---- writing ---------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with disk_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            fh = open(self.root / ".lock", "w")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BloodcellsError(f"{self.root}: another import is writing to this bank; wait for it to finish") from None
            self._repair()
            yield
        finally:
            fh.close()

    def _repair(self) -> None:
        """Drop a torn last line left by an interrupted import."""
        if not self.index_path.is_file():
            return
        data = self.index_path.read_bytes()
        if data and not data.endswith(b"\n"):
            with disk_errors(self.index_path):
                with open(self.index_path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def import_items(self, items: list[Item], source: str, workers: int = 2,
                     fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                     progress: bool = True, licence: str | None = None,
                     licence_from: str | None = None, fields: bool = True,
                     min_parasite: float = MIN_PARASITE) -> ImportSummary:
        """Cut every new item into sprites (and, with `fields`, its plasma field); one index line per source image;
        record the source's licence. With `min_parasite` > 0, an infected red cell whose largest parasite-like body
        covers less than that share of it is rejected (0, the default: every infected crop is kept)."""
        summary = ImportSummary(source, items=len(items))
        with self._locked():
            if licence is not None:
                self._record_licence(source, licence, licence_from)
            done = {e["key"] for e in self.entries()}
            todo = [it for it in items if it.key not in done]
            summary.already = len(items) - len(todo)
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            pool = ctx.Pool(workers, initializer=_init_worker) if workers > 1 and len(todo) > 8 else None
            try:
                tasks = [(it, fields, min_parasite) for it in todo]
                results = pool.imap(_work, tasks, chunksize=4) if pool else map(_work, tasks)
                with open(self.index_path, "ab") as index:
                    for item, cuts in tqdm(results, total=len(todo), desc=f"import {source}", unit="img",
                                           disable=not progress, leave=False):
                        self._write(index, item, cuts, source, fractions, summary)
            finally:
                if pool:
                    pool.terminate()
        if not summary.accepted and summary.already == 0:
            top = "; ".join(f"{n}x {r}" for r, n in summary.rejected.most_common(3))
            raise BloodcellsError(f"{source}: nothing usable among {len(items)} images ({top}); "
                                  "check the folder layout and class names (README, 'Importing cells')")
        return summary

    def _record_licence(self, source: str, licence: str, licence_from: str | None) -> None:
        # a re-import may correct a licence, so the latest one given wins
        recorded = read_json(self.sources_path) if self.sources_path.is_file() else {}
        recorded = recorded if isinstance(recorded, dict) else {}
        recorded[source] = {"licence": licence, "from": licence_from}
        write_json(self.sources_path, dict(sorted(recorded.items())))

    def _write(self, index, item: Item, cuts, source: str, fractions, summary: ImportSummary) -> None:
        split = assign_split(item.key, fractions)
        sprites, rejected = [], []
        for c in cuts:
            if c.png is None:
                rejected.append({"class": c.cls, "label": c.label, "reason": c.reason})
                summary.rejected[c.reason] += 1
                continue
            sid = sprite_id(item.key, c.index)
            write_bytes_atomic(self.root / c.cls / f"{sid}.png", c.png)
            rec = {"id": sid, "class": c.cls, "box": list(c.box), "diameter": c.diameter, "mask": c.mask}
            if c.background is not None:
                rec["background"] = list(c.background)
            sprites.append(rec)
            if c.cls == "background":
                summary.fields += 1
            else:
                summary.accepted[c.cls] += 1
        line = {"key": item.key, "source": source, "file": str(item.path), "split": split,
                "sprites": sprites, "rejected": rejected}
        with disk_errors(self.index_path):
            index.write((json.dumps(line, separators=(",", ":")) + "\n").encode())
            index.flush()
            os.fsync(index.fileno()) if len(sprites) > 10 else None

    # ---- reporting -------------------------------------------------------------------
    def stats(self) -> tuple[list[list[str]], list[list[str]]]:
        """(accepted table: class x split per source, rejected table: source x reason)."""
        entries = self.entries()
        if not entries:
            raise BloodcellsError(f"{self.root}: empty or missing sprite bank; run 'cli sprites import' first")
        acc = Counter()
        rej = Counter()
        sources = sorted({e["source"] for e in entries})
        for e in entries:
            for s in e["sprites"]:
                acc[(s["class"], e["split"], e["source"])] += 1
            for r in e["rejected"]:
                rej[(e["source"], r["reason"])] += 1
        head = ["class"] + [f"{sp}" for sp in SPLITS] + ["total"] + sources
        rows = [head]

        def row(cls: str, label: str) -> list[str]:
            per_split = [sum(v for (c, sp, _), v in acc.items() if c == cls and sp == s) for s in SPLITS]
            per_src = [sum(v for (c, _, so), v in acc.items() if c == cls and so == src) for src in sources]
            return [label] + [str(n) for n in per_split] + [str(sum(per_split))] + [str(n) for n in per_src]

        rows += [row(cls, cls) for cls in NAMES[1:]]
        tot = [sum(int(r[i]) for r in rows[1:]) for i in range(1, len(head))]
        rows.append(["total cells"] + [str(t) for t in tot])
        # cell-free plasma fields are not cells: listed after the total, not in it
        rows.append(row("background", "plasma fields"))
        rrows = [["source", "rejected", "reason"]]
        for (src, reason), n in sorted(rej.items(), key=lambda kv: (kv[0][0], -kv[1])):
            rrows.append([src, str(n), reason])
        return rows, rrows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(widths[i]) if i == 0 or not c.isdigit() else c.rjust(widths[i])
                             for i, c in enumerate(r)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
