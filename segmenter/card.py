"""Model cards: a Markdown file beside every checkpoint (best.pt -> best.md) saying what the model is, what it
was trained on (with the licences of the cells it saw), how well it did and what it is not for.

The card is rewritten with its checkpoint (save_checkpoint calls write_card), so it always describes those
weights. `cli evaluate` and `cli evaluate-real` add their results through record_evaluation: they are kept in
the checkpoint's JSON sidecar under "evaluations" (which the next save of the checkpoint drops with the
weights they were measured on) and the card is rendered again from the checkpoint plus that record.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

import bloodcells
from bloodcells.classes import BY_NAME, NAMES
from bloodcells.formats import DatasetInfo, read_json, write_json
from bloodcells.imageio import write_bytes_atomic
from bloodcells.segmenter.augment import AUGMENT_DEFAULTS

SYNTHETIC, REAL = "synthetic", "real"
REAL_GROUPS = ("rbc", "wbc", "platelet")


def card_path(checkpoint: str | Path) -> Path:
    """The card beside a checkpoint: runs/x/best.pt -> runs/x/best.md."""
    return Path(checkpoint).with_suffix(".md")


def dataset_facts(info: DatasetInfo) -> dict[str, Any]:
    """What a card says about the training data, taken from its dataset.json (stored in the checkpoint's meta)."""
    sprites = info.raw.get("sprites") or {}
    return {"folder": str(info.root), "recipe": info.name or None, "seed": info.seed, "counts": dict(info.counts),
            "sprites": {k: sprites.get(k) for k in ("bank", "id", "kind", "sources")}}


# ---- rendering ----------------------------------------------------------------------------------

def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _cell(text: Any) -> str:
    """A value safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(rows: Sequence[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows)]


def _per_class(label: str, values: Sequence[Any] | None) -> list[str]:
    if not values:
        return []
    names = NAMES[:len(values)]
    return ["", f"| class | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|",
            f"| {label} | {' | '.join(_num(v, 2) for v in values)} |"]


def _model_section(config: Mapping[str, Any], norm: Mapping[str, Any], parameters: int | None) -> list[str]:
    options = {k: v for k, v in config.items() if k not in ("arch", "num_classes", "in_channels", "width")}
    mean = ", ".join(f"{v:.3f}" for v in norm.get("mean", []))
    std = ", ".join(f"{v:.3f}" for v in norm.get("std", []))
    k = int(config.get("num_classes", len(NAMES)))
    rows = [("architecture", f"`{config.get('arch', '?')}`, width {config.get('width', '?')}"
                             + (", " + ", ".join(f"{a}={b}" for a, b in options.items()) if options else "")),
            ("parameters", f"{parameters:,}" if parameters is not None else "-"),
            ("input", f"RGB scaled to 0..1, minus mean ({mean}), divided by std ({std}); "
                      "any size whose sides are multiples of 16 (larger images are tiled)"),
            ("output", f"{k} class logits per pixel (channels 0..{k - 1}): {', '.join(NAMES[:k])}"),
            ("scale", f"40x: a healthy RBC is about {BY_NAME['healthy_rbc'].diameter_40x:.0f} px across "
                      "(predict other magnifications with `--scale FACTOR` or `--scale auto`)")]
    return ["## Model", "", *_table(rows)]


def _data_section(meta: Mapping[str, Any]) -> list[str]:
    ds = meta.get("dataset") or {}
    folder = ds.get("folder") or meta.get("data")
    if not folder and not ds:
        return ["## Training data", "", "Not recorded (the checkpoint was not written by `cli train`)."]
    counts = ds.get("counts") or {}
    sprites = ds.get("sprites") or {}
    recipe = ds.get("recipe")
    rows = [("dataset folder", f"`{folder}`" if folder else "-"),
            ("recipe", f"`{recipe}`" if recipe else "-"),
            ("seed", _num(ds.get("seed"))),
            ("scenes", ", ".join(f"{k} {v}" for k, v in counts.items()) or
             f"train {meta.get('train_images', '-')}, val {meta.get('val_images', '-')}"),
            ("sprites", f"{sprites.get('kind') or '-'}" + (f" `{sprites['bank']}`" if sprites.get("bank") not in
                                                            (None, "builtin") else "")),
            ("sprite bank id", f"`{sprites['id']}`" if sprites.get("id") else "-")]
    out = ["## Training data", "", *_table(rows)]
    sources = sprites.get("sources") or {}
    out += ["", "Cells came from these sources (their licences and terms apply to the sprites and to this model's "
                "training data):", ""]
    if sources:
        out += ["| source | sprites | licence | read from |", "|---|---|---|---|"]
        out += [f"| {_cell(n)} | {s.get('sprites', '-')} | {_cell(s.get('licence') or 'unknown')} | "
                f"{_cell(s.get('from') or '-')} |" for n, s in sources.items()]
    else:
        out += ["Not recorded (the dataset was composed before sources were recorded; compose it again to list them)."]
    return out


def _augmentation(cfg: Mapping[str, Any]) -> str:
    """The training's --augment level in words (runs of older versions recorded true / false)."""
    level = cfg.get("augment", True)
    level = {True: "geometric", False: "none"}.get(level, level) if isinstance(level, bool) else level
    words = {"none": "none", "geometric": "flips and quarter turns",
             "appearance": "flips and quarter turns; stain, colour, blur, noise and JPEG on the fly",
             "full": "flips and quarter turns; scale 0.7-1.4x; stain, colour, blur, noise and JPEG on the fly"}
    text = words.get(str(level), str(level))
    if level in ("appearance", "full"):
        text += (f" (HED stain range {cfg.get('stain_jitter', AUGMENT_DEFAULTS.stain_alpha):g}; hue turn up to "
                 f"{cfg.get('hue_jitter', AUGMENT_DEFAULTS.hue):g} degrees in "
                 f"{100 * cfg.get('hue_share', AUGMENT_DEFAULTS.p_hue):.0f}% of samples)")
    return text


def _training_section(meta: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    if not meta.get("history") and not cfg:
        return []
    stopped = meta.get("stopped")
    loss = "cross-entropy" + (f", class-weighted (weight power {cfg.get('weight_power', 1.0):g})"
                              if cfg.get("class_weights", True) else "")
    if cfg.get("class_weights", True) and cfg.get("tie_weights"):
        loss += f", one weight for {' and '.join(cfg['tie_weights'])}"
    if cfg.get("dice_weight"):
        loss += f" + {cfg['dice_weight']:g} x soft Dice"
    milestones = ", ".join(str(m) for m in cfg.get("milestones", []))
    rows = [("epochs", f"{meta.get('epoch', '-')} of {meta.get('epochs', cfg.get('epochs', '-'))}"
                       + (f" (stopped: {stopped})" if stopped else "")),
            ("steps", meta.get("global_step", "-")),
            ("batch size", meta.get("batch_size", cfg.get("batch_size", "-"))),
            ("optimiser", f"Adam, learning rate {cfg.get('lr', '-')}"
                          + (f", x{cfg.get('gamma')} after epoch(s) {milestones}" if milestones else "")),
            ("loss", loss),
            ("augmentation", _augmentation(cfg)),
            ("seed", meta.get("seed", cfg.get("seed", "-"))),
            ("precision, device", f"{meta.get('precision', '-')} on {meta.get('device', '-')}, "
                                  f"{meta.get('world_size', 1)} process(es)")]
    return ["## Training", "", *_table(rows)]


def _adapted_section(meta: Mapping[str, Any]) -> list[str]:
    a = meta.get("adapted")
    if not a:
        return []
    if a.get("method") == "stats":
        how = (f"batch-norm statistics of its {a.get('layers', '-')} layers re-estimated on {a.get('images', '-')} "
               f"unlabeled images ({a.get('tiles', '-')} tiles, seed {a.get('seed', '-')})"
               + (f", mixed with {100 * a['source_share']:.0f}% of the training statistics" if a.get("source_share")
                  else "") + "; weights unchanged (`cli adapt --method stats`)")
    else:
        how = (f"self-training on {a.get('images', '-')} unlabeled images, {a.get('rounds', '-')} round(s) of "
               "pseudo-labels and fine-tuning"
               + (", " + ", ".join(a["absent"]) + " never pseudo-labelled" if a.get("absent") else "")
               + (", each pixel's group kept from the first round (`--anchor groups`)" if a.get("anchor") == "groups"
                  else "") + " (`cli adapt`)")
    return ["## Adapted", "", f"From `{a.get('from', '-')}`: {how}. The validation and training numbers above are "
            "those of the model it was adapted from."]


def _validation_section(meta: Mapping[str, Any]) -> list[str]:
    best = meta.get("best")
    if not best:
        return ["## Validation", "", "No validation yet (the run stopped before its first epoch ended)."]
    row = next((r for r in meta.get("history") or [] if r.get("epoch") == best.get("epoch")), {})
    out = ["## Validation (best epoch)", "",
           f"Epoch {best.get('epoch')}: pixel accuracy {_num(best.get('pixel_accuracy'))}, "
           f"mIoU {_num(best.get('miou'))}, mean Dice {_num(row.get('mean_dice'))}, "
           f"validation loss {_num(best.get('val_loss'))} ({meta.get('val_images', '-')} synthetic scenes)."]
    return out + _per_class("IoU", row.get("per_class_iou"))


def _synthetic_section(evals: Sequence[Mapping[str, Any]], checkpoint: str) -> list[str]:
    out = ["## Synthetic test scenes", ""]
    if not evals:
        return out + [f"Not evaluated yet: `cli evaluate --model {checkpoint} --split test` adds the numbers here."]
    for e in evals:
        out += [f"`{e.get('data')}`, split `{e.get('split')}` ({e.get('images')} scenes): pixel accuracy "
                f"{_num(e.get('pixel_accuracy'))}, mIoU {_num(e.get('miou'))}, mean Dice {_num(e.get('mean_dice'))}."]
        out += _per_class("IoU", e.get("per_class_iou")) + [""]
    return out[:-1]


def _real_section(evals: Sequence[Mapping[str, Any]], checkpoint: str) -> list[str]:
    out = ["## Real smears", ""]
    if not evals:
        return out + [f"Not evaluated yet: `cli evaluate-real --model {checkpoint} --voc FOLDER` adds the numbers "
                      "here (components matched to the smears' RBC / WBC / platelet boxes)."]
    for e in evals:
        out += [f"`{e.get('root')}`, split `{e.get('split')}` ({e.get('images')} smears, scale {e.get('scale')}, "
                f"IoU >= {e.get('iou')}):", "",
                "| group | boxes | TP | FP | FN | recall | precision | F1 |", "|---|---|---|---|---|---|---|---|"]
        for g, r in (e.get("groups") or {}).items():
            out.append(f"| {g} | {r.get('gt')} | {r.get('tp')} | {r.get('fp')} | {r.get('fn')} | "
                       f"{_num(r.get('recall'))} | {_num(r.get('precision'))} | {_num(r.get('f1'))} |")
        st = e.get("wbc_subtype") or {}
        if st.get("matched_with_subtype"):
            out += ["", f"WBC subtype accuracy {_num(st.get('accuracy'))} ({st.get('correct')}/"
                        f"{st.get('matched_with_subtype')} matched WBCs with a listed subtype)."]
        out.append("")
    return out[:-1]


def _use_and_limits(meta: Mapping[str, Any]) -> list[str]:
    sprites = ((meta.get("dataset") or {}).get("sprites") or {})
    limits = [
        "- Trained on synthetic scenes only: real cells (or drawn ones) cut out and composed onto synthetic "
        "backgrounds. Real smears differ in background colour, stain, focus and crowding; check the real-smear "
        "numbers above before trusting it on a new lab's images.",
        "- Made for 40x, where a healthy RBC is about 37 px across; other magnifications must be rescaled "
        "(`--scale`), and `--scale auto` can misjudge smears with few free RBCs.",
        f"- Knows only these classes: {', '.join(NAMES[1:])}. Anything else (immature or abnormal cells, other "
        "parasites, stain debris) is labelled as one of them.",
        "- Touching cells of one class merge into one region; counts split them by expected area, which can be off "
        "in dense fields.",
        "- Platelet clumps were built from single thrombocytes (no real clump data); basophils are scarce in the "
        "public sources; infected RBCs come from single-cell crops.",
    ]
    if sprites.get("bank") == "builtin":
        limits.append("- Its cells were the project's procedural drawings, not real cells: a demonstration model, "
                      "not one to apply to real smears.")
    return ["## Intended use", "",
            "Research and teaching on composed and real blood smears: segmenting and counting the classes above, "
            "comparing methods and training data. Not for diagnosis, screening or any clinical decision; it is not "
            "a medical device and its output has not been validated by clinicians.",
            "", "## Limits", "", *limits]


def render_card(name: str, payload: Mapping[str, Any], parameters: int | None = None,
                evaluations: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The Markdown card of a checkpoint named `name` from its payload (config, normalization, meta, training)."""
    config = payload.get("config") or {}
    meta = payload.get("meta") or {}
    training = payload.get("training") or {}
    evals = list((evaluations or {}).values())
    lines = [f"# Model card: {name}", "",
             f"A `{config.get('arch', '?')}` segmenter of blood-smear images into {config.get('num_classes', len(NAMES))} "
             f"classes, written by bloodcells {bloodcells.__version__}. This card is rewritten with the checkpoint; "
             "`cli evaluate` and `cli evaluate-real` add their results.", "",
             *_model_section(config, payload.get("normalization") or {}, parameters), "",
             *_data_section(meta), ""]
    train_lines = _training_section(meta, training.get("config") or {})
    lines += [*train_lines, ""] if train_lines else []
    adapted = _adapted_section(meta)
    lines += [*adapted, ""] if adapted else []
    lines += [*_validation_section(meta), "",
              *_synthetic_section([e for e in evals if e.get("kind") == SYNTHETIC], name), "",
              *_real_section([e for e in evals if e.get("kind") == REAL], name), "",
              *_use_and_limits(meta)]
    return "\n".join(lines) + "\n"


# ---- writing ------------------------------------------------------------------------------------

def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters (not buffers such as batch-norm statistics)."""
    return sum(p.numel() for p in model.parameters())


def write_card(checkpoint: str | Path, payload: Mapping[str, Any], model: nn.Module | None = None,
               evaluations: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write the card beside `checkpoint` atomically; `model` gives the parameter count (else rebuilt from config)."""
    if model is None:
        from bloodcells.segmenter.models import create_model

        model = create_model(**payload["config"])
    path = card_path(checkpoint)
    write_bytes_atomic(path, render_card(Path(checkpoint).name, payload, count_parameters(model), evaluations).encode())
    return path


def evaluation_entry(kind: str, result: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(key, the part of an evaluate / evaluate-real result a card shows); one entry per dataset and split."""
    if kind == SYNTHETIC:
        keep = ("data", "split", "images", "pixel_accuracy", "miou", "mean_dice", "per_class_iou", "out")
        return f"{kind}:{result.get('data')}:{result.get('split')}", {"kind": kind, **{k: result.get(k) for k in keep}}
    keep = ("root", "split", "images", "scale", "groups", "wbc_subtype", "out")
    entry = {"kind": kind, **{k: result.get(k) for k in keep}, "iou": (result.get("matching") or {}).get("iou")}
    if isinstance(entry.get("wbc_subtype"), dict):
        entry["wbc_subtype"] = {k: v for k, v in entry["wbc_subtype"].items() if k != "pairs"}
    return f"{kind}:{result.get('root')}:{result.get('split')}", entry


def record_evaluation(checkpoint: str | Path, kind: str, result: Mapping[str, Any]) -> Path | None:
    """Add an evaluation to the checkpoint's sidecar JSON and render its card again; None when its folder is not
    writable (the evaluation itself still counts)."""
    from bloodcells.segmenter.checkpoint import load_checkpoint, sidecar

    checkpoint = Path(checkpoint)
    if not os.access(checkpoint.parent, os.W_OK):
        return None
    payload = load_checkpoint(checkpoint)
    side = sidecar(checkpoint)
    record = read_json(side) if side.is_file() else {}
    if not isinstance(record, dict) or not record:
        record = {"config": payload["config"], **payload["normalization"], **(payload.get("meta") or {})}
    key, entry = evaluation_entry(kind, result)
    record["evaluations"] = {**(record.get("evaluations") or {}), key: entry}
    write_json(side, record)
    return write_card(checkpoint, payload, evaluations=record["evaluations"])
