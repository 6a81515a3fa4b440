"""Adapting a trained model to a user's own unlabeled smears: `cli adapt`.

Two methods (`method`):

`stats` re-estimates the model's batch-normalisation statistics on the user's images and changes nothing else
(AdaBN, Li et al. 2016): every image is resized to model scale and cut into the tiles prediction uses, the tiles are
shuffled (seeded) into batches of even size and run through the model in training mode once, and each batch-norm
layer's running mean and variance become the average over those batches (`torch.optim.swa_utils.update_bn`). A
lab's stain and optics shift the features' statistics layer by layer; with the statistics of its own smears the
layers see features normalised as they were in training. No labels, no composed scenes, no optimiser: seconds to a
minute, and the result is the same for the same images and seed.

`self-training` (the default): a trained model is fine-tuned on the user's images with pseudo-labels, mixed with composed scenes so that
nothing it learned is forgotten. Each round:
1. every image is predicted at model scale (its `--scale`, or the RBC-size estimate), averaged over flips and
   quarter turns (test-time augmentation); a pixel becomes a pseudo-label when its class probability is among
   the most confident `keep` share of the pixels predicted as that class over all images: one threshold per
   class, so rare classes (platelets, white cells) are not drowned by red cells and background. The rest is
   ignored by the loss. Pseudo-labels are written to `<out>/round-<r>/<stem>.png` (255 = ignored).
2. `steps` optimiser steps, each on half a batch of random 224 px windows of the user's images (cross-entropy on
   the pseudo-labels) and half a batch of composed scenes (the model's own training loss, instance output
   included).
The next round labels again with the improved model. With `anchor="groups"` (the default), a later round
pseudo-labels a pixel only where its class lies in the same group (background, red cell, white cell, platelet)
as the first round's prediction of the model it started from (`<out>/groups/<stem>.png`, written in the first
round): the model may re-type a white cell it found, but a red-cell stack it begins to call a white cell is not
taught back to it as one (`anchor="none"`: every round relabels freely). Without it, what the model gets wrong with confidence spreads from round to round (confirmation bias).
Every draw is seeded by (seed, round, step), so a run
stopped and started again continues exactly from its last checkpoint (`<out>/last.pt`, every `save_every`
steps and at each round's end). `<out>/adapt.json` records the settings; an `--out` holding a run with other
settings is refused. The result is `<out>/adapted.pt`, a checkpoint like any other.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bloodcells.classes import NAMES, NUM_CLASSES
from bloodcells.errors import BloodcellsError
from bloodcells.formats import json_safe, read_json, write_json
from bloodcells.imageio import encode_png, read_gray, read_rgb, write_bytes_atomic
from bloodcells.segmenter.checkpoint import load_checkpoint, save_checkpoint
from bloodcells.segmenter.data import SegmentationDataset
from bloodcells.segmenter.infer import (auto_scale, drop_classes, pad_to_tile, parse_absent, parse_scale, predict_logits,
                                        resize_image, tile_starts)
from bloodcells.segmenter.instances import GROUP_OF  # class index -> group: 0 background, 1 rbc, 2 wbc, 3 platelet
from bloodcells.segmenter.losses import CombinedLoss, SegmentationObjective
from bloodcells.segmenter.models import create_model
from bloodcells.segmenter.predict import expand_inputs, file_digest, output_stems
from bloodcells.segmenter.runtime import make_runtime

IGNORE = 255
WINDOW = 224
METHODS = ("self-training", "stats")
# settings that only self-training reads: a stats run records none of them
SELF_TRAINING_ONLY = ("data", "rounds", "steps", "batch", "lr", "keep", "tta", "absent", "anchor", "augment",
                      "precision")
ANCHORS = ("none", "groups")


@dataclass
class AdaptConfig:
    """Everything an adaptation run depends on (recorded in <out>/adapt.json)."""

    model: str
    images: list[str]
    data: str | None
    out: str
    method: str = "self-training"  # or "stats": re-estimate batch-norm statistics on the images only
    source_share: float = 0.0  # stats: share of the training statistics kept in the mix (0: the images' own alone)
    rounds: int = 3
    steps: int = 300  # optimiser steps per round
    batch: int = 8  # half windows of the user's images, half composed scenes
    lr: float = 1e-4
    keep: float = 0.5  # share of each class's predicted pixels kept as pseudo-labels (the most confident)
    scale: str = "auto"
    tta: bool = True
    absent: str | tuple[str, ...] | None = None  # classes the user's smears cannot hold: never pseudo-labelled
    # "groups": later rounds keep each pixel's group of the starting model's prediction; "none": they do not;
    # None: the method's default (groups for self-training, none for stats)
    anchor: str | None = None
    augment: str = "full"  # augmentation of the composed scenes (segmenter.data)
    seed: int = 0
    save_every: int = 50
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    model_digest: str = field(default="", repr=False)

    RESULT_ONLY = frozenset({"progress", "threads", "device", "save_every"})  # may differ when a run continues

    def check(self) -> None:
        """Reject values that cannot work, naming the flag."""
        if self.method not in METHODS:
            raise BloodcellsError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.method == "self-training" and not self.data:
            raise BloodcellsError("--data is needed for --method self-training (composed scenes mixed in so that "
                                  "nothing learned is forgotten, e.g. the model's own); --method stats needs none")
        self.absent = tuple(NAMES[c] for c in parse_absent(self.absent))
        if self.anchor is None:
            self.anchor = "groups" if self.method == "self-training" else "none"
        if self.anchor not in ANCHORS:
            raise BloodcellsError(f"--anchor {self.anchor}: choose one of {', '.join(ANCHORS)}")
        for name in ("rounds", "steps", "batch", "save_every"):
            if getattr(self, name) < 1:
                raise BloodcellsError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.batch < 2:
            raise BloodcellsError(f"--batch {self.batch}: needs at least 2 (one real window, one composed scene)")
        if not 0 < self.keep <= 1:
            raise BloodcellsError(f"--keep {self.keep}: the share of pseudo-labelled pixels must be in (0, 1]")
        if not self.lr > 0:
            raise BloodcellsError(f"--lr must be > 0; got {self.lr}")
        if self.method == "self-training" and self.source_share:
            raise BloodcellsError(f"--source-share {self.source_share}: applies to --method stats only; drop it or "
                                  "add --method stats")
        if self.method == "stats" and self.anchor != "none":
            raise BloodcellsError(f"--anchor {self.anchor}: applies to self-training only; drop it or drop "
                                  "--method stats")
        if not 0 <= self.source_share < 1:
            raise BloodcellsError(f"--source-share {self.source_share}: the share of the training statistics kept "
                                  "must be in [0, 1) (0: the images' own statistics alone)")


def pseudo_labels(probs: list[np.ndarray], keep: float, groups: Sequence[np.ndarray] | None = None
                  ) -> tuple[list[np.ndarray], dict[str, float]]:
    """Pseudo-label maps (uint8, IGNORE where not confident) from class probabilities (C, h, w) of several images,
    with one confidence threshold per class: the most confident `keep` share of each class's pixels is kept.
    `groups` (one map per image, GROUP_OF indices): a pixel whose class lies in another group is never kept and
    does not count towards its class's share."""
    labels = [p.argmax(axis=0).astype(np.uint8) for p in probs]
    conf = [p.max(axis=0) for p in probs]
    if groups is not None:
        conf = [np.where(GROUP_OF[lab] == g, c, -np.inf) for lab, c, g in zip(labels, conf, groups)]
    flat_l = np.concatenate([lab.ravel() for lab in labels])
    flat_c = np.concatenate([c.ravel() for c in conf])
    thresholds = np.full(NUM_CLASSES, np.inf, np.float32)
    for c in np.unique(flat_l):
        allowed = flat_c[(flat_l == c) & np.isfinite(flat_c)]
        if allowed.size:
            thresholds[c] = np.quantile(allowed, 1.0 - keep)
    out = [np.where(c >= thresholds[lab], lab, IGNORE).astype(np.uint8) for lab, c in zip(labels, conf)]
    kept = {NAMES[c]: round(float((flat_l == c).mean()), 4) for c in range(NUM_CLASSES) if (flat_l == c).any()}
    return out, kept


def windows(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], n: int, rng: np.random.Generator,
            mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """n random WINDOW px windows (flipped and turned at random) of the images with their pseudo-labels; images
    smaller than a window are padded (the padding ignored)."""
    xs, ys = [], []
    for _ in range(n):
        k = int(rng.integers(len(images)))
        img, lab = images[k], labels[k]
        h, w = lab.shape
        ph, pw = max(0, WINDOW - h), max(0, WINDOW - w)
        if ph or pw:
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
            lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=IGNORE)
        y0 = int(rng.integers(lab.shape[0] - WINDOW + 1))
        x0 = int(rng.integers(lab.shape[1] - WINDOW + 1))
        wi, wl = img[y0:y0 + WINDOW, x0:x0 + WINDOW], lab[y0:y0 + WINDOW, x0:x0 + WINDOW]
        code = int(rng.integers(8))
        if code & 1:
            wi, wl = wi[:, ::-1], wl[:, ::-1]
        wi, wl = np.rot90(wi, code >> 1), np.rot90(wl, code >> 1)
        xs.append(np.ascontiguousarray(wi))
        ys.append(np.ascontiguousarray(wl))
    x = torch.from_numpy(np.stack(xs)).float().div_(255)
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.stack(ys)).long()


# what a setting that _settings leaves out of the record means (so runs recorded before it existed continue)
LEFT_OUT = {"absent": "none", "anchor": "none", "method": "self-training"}


def _shown(settings: dict[str, Any], key: str) -> str:
    """A recorded setting as its flag would give it."""
    return str(settings[key]) if key in settings else LEFT_OUT.get(key, "not set")


def _settings(cfg: AdaptConfig) -> dict[str, Any]:
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in AdaptConfig.RESULT_ONLY}
    if not d.get("absent"):  # runs recorded before the option existed continue unchanged
        d.pop("absent", None)
    if d.get("anchor") == "none":  # likewise
        d.pop("anchor")
    if cfg.method == "self-training":  # likewise runs recorded before there were methods
        d.pop("method")
        d.pop("source_share")
    else:
        for k in SELF_TRAINING_ONLY:
            d.pop(k, None)
    return d


def batch_norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    """The model's batch-normalisation layers, in order."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def recalibrate(model: torch.nn.Module, images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float],
                tile: int = WINDOW, overlap: float = 0.25, batch: int = 8, seed: int = 0,
                device: torch.device | str | None = None, progress: bool = False, source_share: float = 0.0) -> int:
    """Re-estimate every batch-norm layer's running statistics on uint8 RGB images already at model scale (AdaBN):
    the tiles prediction would cut (plasma-padded, `overlap`), shuffled with `seed` into batches of even size
    (at most `batch`), run once in training mode with cumulative averaging. With `source_share` w > 0 each layer
    keeps w of its training statistics: mean and variance become w * training + (1 - w) * images' (the prior of
    Schneider et al. 2020, for images too few or too unlike the scenes to stand alone). The model ends in eval
    mode; returns the number of tiles."""
    layers = batch_norms(model)
    if not layers:
        raise BloodcellsError("the model has no batch-normalisation layers: --method stats has nothing to adapt; "
                              "use --method self-training")
    padded = [pad_to_tile(im, tile) for im in images]
    boxes = [(k, y, x) for k, p in enumerate(padded) for y in tile_starts(p.shape[0], tile, overlap)
             for x in tile_starts(p.shape[1], tile, overlap)]
    if not boxes:
        raise BloodcellsError("no image tiles to adapt on")
    order = np.random.default_rng(seed).permutation(len(boxes))
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    parts = np.array_split(order, -(-len(boxes) // batch))

    def batches():
        # even sizes: each batch counts once in the cumulative average, so none may be a small remainder
        for part in tqdm(parts, desc="adapt statistics", unit="batch", disable=not progress, leave=False):
            x = torch.stack([torch.from_numpy(np.ascontiguousarray(padded[k][y:y + tile, x0:x0 + tile]))
                             for k, y, x0 in (boxes[int(j)] for j in part)])
            yield (x.permute(0, 3, 1, 2).float() / 255.0 - m) / s

    source = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in layers]
    torch.optim.swa_utils.update_bn(batches(), model, device)
    if source_share > 0:
        with torch.no_grad():
            for bn, (mu, var) in zip(layers, source):
                bn.running_mean.mul_(1 - source_share).add_(mu.to(bn.running_mean), alpha=source_share)
                bn.running_var.mul_(1 - source_share).add_(var.to(bn.running_var), alpha=source_share)
    model.eval()
    return len(boxes)


def measure_scales(paths: Sequence[Path], scale: str, record: Path) -> tuple[list[Path], list[str], list[str]]:
    """Each image's factor to 40x, kept in `record`'s "factors" (estimated once, so a run continued later resizes
    each image the same way). With `scale` auto an image whose red cells cannot be measured (a crop around one
    white cell, a blank field) is left out and named, like a failed image of `cli predict`; when none can be
    measured, the first one's error stands. Returns the images kept, their output stems (those of the whole
    list, so leaving one out renames none) and a line per image left out."""
    fixed = parse_scale(scale)
    state = read_json(record)
    factors = dict(state.get("factors") or {})
    skipped = dict(state.get("skipped") or {})
    kept: list[Path] = []
    stems: list[str] = []
    first: BloodcellsError | None = None
    every = output_stems(paths)
    for stem, path in zip(every, paths):
        if stem not in factors and stem not in skipped:
            if fixed is not None:
                factors[stem] = fixed
            else:
                image = read_rgb(path)  # a missing or corrupt file stops the run, named, as before
                try:
                    factors[stem] = auto_scale(image)[0]
                except BloodcellsError as e:
                    skipped[stem] = f"{path}: {e}"
                    first = first or e
        if stem in factors:
            kept.append(path)
            stems.append(stem)
    write_json(record, {**state, "factors": factors, "skipped": skipped})
    if not kept:
        raise first or BloodcellsError(next(iter(skipped.values())))
    return kept, stems, [skipped[s] for s in every if s in skipped]


def images_at_scale(paths: Sequence[Path], stems: Sequence[str], record: Path) -> list[np.ndarray]:
    """The images resized to 40x by the factors `measure_scales` kept in `record`."""
    factors = read_json(record)["factors"]
    return [resize_image(read_rgb(path), factors[stem]) for stem, path in zip(stems, paths)]


def adapt(cfg: AdaptConfig) -> dict[str, Any]:
    """Run (or continue) an adaptation run; returns a summary (rounds, pseudo-label shares or tiles, paths)."""
    cfg.check()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise BloodcellsError(f"{out}: is a file; --out must be a folder")
    cfg.model_digest = file_digest(cfg.model) if Path(cfg.model).is_file() else ""
    payload = load_checkpoint(cfg.model)
    paths, problems = expand_inputs(cfg.images)
    if not paths:
        raise BloodcellsError("no input images: " + "; ".join(problems or ["give image files, folders or globs"]))
    cfg.images = [str(p.resolve()) for p in paths]
    record = out / "adapt.json"
    state = read_json(record) if record.is_file() else None
    if state is not None and state.get("settings") != json_safe(_settings(cfg)):
        now, then = json_safe(_settings(cfg)), state.get("settings", {})
        diff = next(k for k in [*now, *then] if now.get(k) != then.get(k))
        raise BloodcellsError(f"{out}: holds an adaptation run with other settings ({diff}: {_shown(then, diff)} "
                              f"there, {_shown(now, diff)} here); give its settings to continue it, choose another "
                              "--out or delete that folder")
    if state is None and out.is_dir() and any(out.iterdir()):
        raise BloodcellsError(f"{out}: is not empty and holds no adaptation run; choose another --out")
    write_json(record, {**(state or {}), "settings": _settings(cfg), "done": False})
    paths, stems, skipped = measure_scales(paths, cfg.scale, record)
    for line in skipped:
        print(f"left out (scale unknown; give --scale FACTOR to keep it): {line}", file=sys.stderr)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.method == "stats":
            summary = _adapt_stats(cfg, payload, paths, stems, out)
        else:
            summary = _Adapt(cfg, payload, paths, stems, out).run()
        return {**summary, "left_out": skipped}
    finally:
        torch.set_num_threads(threads)


def _adapt_stats(cfg: AdaptConfig, payload: dict, paths: list[Path], stems: list[str], out: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    device = make_runtime("fp32", cfg.device).device
    model = create_model(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    model.to(device)
    record = out / "adapt.json"
    images = images_at_scale(paths, stems, record)
    mean, std = payload["normalization"]["mean"], payload["normalization"]["std"]
    tiles = recalibrate(model, images, mean, std, seed=cfg.seed, device=device, progress=cfg.progress,
                        source_share=cfg.source_share)
    meta = {k: v for k, v in (payload.get("meta") or {}).items()}
    meta["adapted"] = {"from": cfg.model, "method": "stats", "images": len(paths), "tiles": tiles,
                       "layers": len(batch_norms(model)), "seed": cfg.seed, "source_share": cfg.source_share}
    final = out / "adapted.pt"
    training = payload.get("training") or {}  # what a later self-training run reads (loss weights, settings)
    kept = {k: training[k] for k in ("config", "class_weights") if k in training}
    save_checkpoint(final, model, mean, std, json_safe(meta), kept or None)
    log = [{"method": "stats", "tiles": tiles}]
    write_json(record, {**read_json(record), "done": True, "log": log})
    return {"out": str(out), "adapted": str(final), "method": "stats", "rounds": 0, "images": len(paths),
            "tiles": tiles, "log": log, "seconds": round(time.monotonic() - t0, 1)}


class _Adapt:
    def __init__(self, cfg: AdaptConfig, payload: dict, paths: list[Path], stems: list[str], out: Path) -> None:
        self.cfg, self.paths, self.out = cfg, paths, out
        self.rt = make_runtime(cfg.precision, cfg.device)
        self.meta = {"config": payload["config"], **payload["normalization"], **(payload.get("meta") or {})}
        self.mean, self.std = payload["normalization"]["mean"], payload["normalization"]["std"]
        torch.manual_seed(cfg.seed)
        self.model = create_model(**payload["config"])
        self.num_classes = payload["config"]["num_classes"]
        self.instance = payload["config"].get("instance")
        last = out / "last.pt"
        resumed = load_checkpoint(last) if last.is_file() else None
        self.model.load_state_dict((resumed or payload)["state_dict"])
        self.model = self.rt.model(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.round, self.step = 0, 0
        self.log: list[dict[str, Any]] = []
        if resumed is not None:
            t = resumed["training"]
            self.optimizer.load_state_dict(t["optimizer"])
            self.round, self.step, self.log = t["round"], t["step"], list(t["log"])
        training = payload.get("training") or {}
        weights = training.get("class_weights")
        tcfg = training.get("config") or {}
        self.scenes = SegmentationDataset(cfg.data, "train", self.mean, self.std, augment=cfg.augment, seed=cfg.seed,
                                          instance=self.instance)
        self.objective = SegmentationObjective(
            CombinedLoss(1.0, float(tcfg.get("dice_weight", 0.5)), None if weights is None else torch.tensor(weights)),
            self.num_classes, self.instance, float(tcfg.get("instance_weight", 1.0))).to(self.rt.device)
        self.stems = stems

    def images_at_model_scale(self) -> list[np.ndarray]:
        """The user's images resized to 40x (factors estimated once, then kept in adapt.json)."""
        return images_at_scale(self.paths, self.stems, self.out / "adapt.json")

    def label_round(self, r: int, images: list[np.ndarray]) -> list[np.ndarray]:
        """This round's pseudo-labels: read back when written before, else predicted and written."""
        folder = self.out / f"round-{r}"
        files = [folder / f"{s}.png" for s in self.stems]
        if all(f.is_file() for f in files):
            return [read_gray(f) for f in files]
        probs = []
        self.model.eval()
        for img in tqdm(images, desc=f"label round {r + 1}/{self.cfg.rounds}", unit="img",
                        disable=not self.cfg.progress, leave=False):
            probs.append(predict_logits(self.model, self.meta, img, tta=self.cfg.tta, precision=self.cfg.precision,
                                        device=self.rt.device)[:self.num_classes])
            probs[-1] = drop_classes(probs[-1], [NAMES.index(c) for c in self.cfg.absent])
        groups = self.anchor_groups(r, probs)
        labels, shares = pseudo_labels(probs, self.cfg.keep, groups)
        for f, lab in zip(files, labels):
            write_bytes_atomic(f, encode_png(lab, level=1, png_filter="none"))
        kept = float(np.mean([(lab != IGNORE).mean() for lab in labels]))
        self.log.append({"round": r + 1, "predicted_share": shares, "pixels_kept": round(kept, 4)})
        return labels

    def anchor_groups(self, r: int, probs: list[np.ndarray]) -> list[np.ndarray] | None:
        """With anchor "groups": the starting model's group of every pixel, written in the first round and read
        back in later ones (None without the anchor, and in the first round, whose labels are that model's)."""
        if self.cfg.anchor != "groups":
            return None
        files = [self.out / "groups" / f"{s}.png" for s in self.stems]
        if r == 0:
            for f, p in zip(files, probs):
                group = GROUP_OF[p.argmax(axis=0)].astype(np.uint8)
                write_bytes_atomic(f, encode_png(group, level=1, png_filter="none"))
            return None
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise BloodcellsError(f"{missing}: missing (the first round's groups that --anchor groups keeps); "
                                  "delete the run folder and start again")
        groups = [read_gray(f) for f in files]
        for f, g, p in zip(files, groups, probs):
            if g.shape != p.shape[1:]:
                raise BloodcellsError(f"{f}: {g.shape[1]}x{g.shape[0]} px, the image is {p.shape[2]}x{p.shape[1]} "
                                      "at model scale; delete the run folder and start again")
        return groups

    def save(self, name: str) -> Path:
        meta = {k: v for k, v in self.meta.items() if k not in ("config", "classes", "mean", "std")}
        meta.update({"adapted": {"from": self.cfg.model, "images": len(self.paths), "rounds": self.round,
                                 "anchor": self.cfg.anchor, "absent": list(self.cfg.absent), "log": self.log}})
        training = {"optimizer": self.optimizer.state_dict(), "round": self.round, "step": self.step, "log": self.log}
        path = self.out / name
        save_checkpoint(path, self.model, self.mean, self.std, json_safe(meta), training)
        return path

    def train_round(self, r: int, images: list[np.ndarray], labels: list[np.ndarray]) -> None:
        cfg, rt = self.cfg, self.rt
        half = cfg.batch // 2
        self.model.train()
        self.scenes.set_epoch(r)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"adapt round {r + 1}/{cfg.rounds}", unit="step",
                   disable=not cfg.progress, leave=False)
        while self.step < cfg.steps:
            rng = np.random.default_rng([cfg.seed, r, self.step])
            xr, yr = windows(images, labels, half, rng, self.mean, self.std)
            picks = rng.integers(len(self.scenes), size=cfg.batch - half)
            samples = [self.scenes[int(i)] for i in picks]
            xs = torch.stack([s[0] for s in samples])
            ys = torch.stack([s[1] for s in samples])
            rest = [torch.stack([s[2] for s in samples]).to(rt.device)] if self.instance else []
            x = rt.batch(torch.cat([xr, xs]))
            self.optimizer.zero_grad(set_to_none=True)
            with rt.autocast():
                out = self.model(x)
            out = out if isinstance(out, torch.Tensor) else torch.stack([o.float() for o in out]).mean(0)
            real = F.cross_entropy(out[:half, :self.num_classes].float(), yr.to(rt.device), ignore_index=IGNORE)
            real = torch.nan_to_num(real)  # a batch of windows without any confident pixel
            loss = real + self.objective(out[half:], ys.to(rt.device), *rest)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            bar.update(1)
            if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save("last.pt")
        bar.close()

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        images = self.images_at_model_scale()
        while self.round < self.cfg.rounds:
            labels = self.label_round(self.round, images)
            self.train_round(self.round, images, labels)
            self.round, self.step = self.round + 1, 0
            self.save("last.pt")
        final = self.save("adapted.pt")
        record = read_json(self.out / "adapt.json")
        write_json(self.out / "adapt.json", {**record, "done": True, "log": self.log})
        return {"out": str(self.out), "adapted": str(final), "rounds": self.round, "images": len(self.paths),
                "log": self.log, "seconds": round(time.monotonic() - t0, 1)}
