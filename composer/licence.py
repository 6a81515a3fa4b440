"""Which licence a source dataset comes under, read from the files that travel with it.

Looked for in the imported folder, then up to two parents (a dataset's licence usually sits at its top,
above the folder an importer is pointed at), nearest folder first; in each folder `SOURCE.txt` first
(the staging note: `License: ...`, `Repo license: ...` lines and inline `license CC BY 4.0` mentions
in its header), then `LICENSE*` / `LICENCE*` / `COPYING*` (the licence named by its first lines), then
`README*` (a line that mentions a licence by a known name). Nothing found: UNKNOWN.
"""
from __future__ import annotations

import re
from pathlib import Path

UNKNOWN = "unknown"
BUILTIN_LICENCE = "MIT (procedural sprites drawn by this project)"
MAX_CHARS = 300  # a model card lists every source on one line
PARENTS = 2

# licence names as people write them -> the short form recorded
KNOWN = (
    (r"\bMIT\b", "MIT"),
    (r"Apache License,?\s+Version 2\.0|\bApache[- ]2(\.0)?\b", "Apache-2.0"),
    (r"GNU LESSER GENERAL PUBLIC LICENSE|\bLGPL", "LGPL"),
    (r"GNU AFFERO GENERAL PUBLIC LICENSE|\bAGPL", "AGPL"),
    (r"GNU GENERAL PUBLIC LICENSE\s+Version 3|\bGPL-?3", "GPL-3.0"),
    (r"GNU GENERAL PUBLIC LICENSE\s+Version 2|\bGPL-?2", "GPL-2.0"),
    (r"\bBSD[- ]3|Redistribution and use in source and binary forms", "BSD-3-Clause"),
    (r"\bBSD[- ]2", "BSD-2-Clause"),
    (r"Attribution-NonCommercial-ShareAlike 4\.0|\bCC[- ]BY-NC-SA[- ]4", "CC BY-NC-SA 4.0"),
    (r"Attribution-NonCommercial 4\.0|\bCC[- ]BY-NC[- ]4", "CC BY-NC 4.0"),
    (r"Attribution-ShareAlike 4\.0|\bCC[- ]BY-SA[- ]4", "CC BY-SA 4.0"),
    (r"Attribution 4\.0 International|\bCC[- ]BY[- ]4", "CC BY 4.0"),
    (r"\bCC0\b|CC0 1\.0", "CC0-1.0"),
    (r"Mozilla Public License|\bMPL[- ]2", "MPL-2.0"),
    (r"\bThe Unlicense\b|unlicense\.org", "Unlicense"),
    (r"public domain", "public domain"),
)
_KEYED = re.compile(r"^\s*((?:[\w-]+\s+)?licen[cs]e)\s*:\s*(.+?)\s*$", re.IGNORECASE)
_INLINE = re.compile(r"\blicen[cs]e[d]?\s*(?:under\s+)?(?:the\s+)?([A-Z][\w.\- ]*?\d(?:\.\d)?|MIT|CC0)\b")
_SECTION = re.compile(r"^(=====|#####)")


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 3].rstrip() + "..."


def known_name(text: str) -> str | None:
    """The short name of the first known licence mentioned in `text` (None when none is)."""
    for pattern, name in KNOWN:
        if re.search(pattern, text, re.IGNORECASE if name == "public domain" else 0):
            return name
    return None


def from_source_note(text: str) -> str | None:
    """The licence lines of a SOURCE.txt header (before its first '=====' section): keyed lines as written,
    inline 'license X' mentions as X; several are joined with '; '."""
    found: list[str] = []
    for line in text.splitlines():
        if _SECTION.match(line):
            break
        keyed = _KEYED.match(line)
        if keyed:
            key = keyed.group(1)
            found.append(keyed.group(2) if key.lower() in ("license", "licence") else f"{key}: {keyed.group(2)}")
            continue
        inline = _INLINE.search(line)
        if inline:
            found.append(inline.group(1).strip())
    return _clip("; ".join(found)) if found else None


def from_licence_file(text: str) -> str | None:
    """The licence a LICENSE file holds: a known name from its first lines, else its first non-empty line."""
    head = "\n".join(text.splitlines()[:12])
    name = known_name(head)
    if name:
        return name
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return _clip(first) if first else None


def from_readme(text: str) -> str | None:
    """The first README line that mentions a licence by a known name (markdown marks dropped)."""
    for line in text.splitlines():
        if re.search(r"licen[cs]", line, re.IGNORECASE) and not line.lstrip().startswith("#") and known_name(line):
            return _clip(re.sub(r"[*_`>\[\]]", "", line).strip())
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _candidates(folder: Path) -> list[tuple[Path, str]]:
    """(file, kind) in the order they are trusted."""
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        return []
    out = [(p, "source") for p in files if p.name.lower() == "source.txt"]
    out += [(p, "licence") for p in files if p.name.lower().startswith(("license", "licence", "copying"))]
    out += [(p, "readme") for p in files if p.name.lower().startswith("readme")]
    return out


def find_licence(root: str | Path, parents: int = PARENTS) -> tuple[str, str | None]:
    """(licence, file it was read from) for a dataset folder; (UNKNOWN, None) when no file names one."""
    folder = Path(root).resolve()
    if folder.is_file():
        folder = folder.parent
    readers = {"source": from_source_note, "licence": from_licence_file, "readme": from_readme}
    for level, here in enumerate([folder, *folder.parents]):
        if level > parents:
            break
        for path, kind in _candidates(here):
            found = readers[kind](_read(path))
            if found:
                return found, str(path)
    return UNKNOWN, None
