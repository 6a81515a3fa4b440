"""Self-training on a user's own unlabeled smears: `cli adapt`.

A trained model is fine-tuned on the user's images with pseudo-labels, mixed with composed scenes so that
nothing it learned is forgotten. Each round:
1. every image is predicted at model scale (its `--scale`, or the RBC-size estimate), averaged over flips and
   quarter turns (test-time augmentation); a pixel becomes a pseudo-label when its class probability is among
   the most confident `keep` share of the pixels predicted as that class over all images: one threshold per
   class, so rare classes (platelets, white cells) are not drowned by red cells and background. The rest is
   ignored by the loss. Pseudo-labels are written to `<out>/round-<r>/<stem>.png` (255 = ignored).
2. `steps` optimiser steps, each on half a batch of random 224 px windows of the user's images (cross-entropy on
   the pseudo-labels) and half a batch of composed scenes (the model's own training loss, instance output
   included).
The next round labels again with the improved model. Every draw is seeded by (seed, round, step), so a run
stopped and started again continues exactly from its last checkpoint (`<out>/last.pt`, every `save_every`
steps and at each round's end). `<out>/adapt.json` records the settings; an `--out` holding a run with other
settings is refused. The result is `<out>/adapted.pt`, a checkpoint like any other.
"""
from __future__ import annotations

import dataclasses
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
from bloodcells.segmenter.infer import auto_scale, drop_classes, parse_absent, parse_scale, predict_logits, resize_image
from bloodcells.segmenter.losses import CombinedLoss, SegmentationObjective
from bloodcells.segmenter.models import create_model
from bloodcells.segmenter.predict import expand_inputs, file_digest, output_stems
from bloodcells.segmenter.runtime import make_runtime

IGNORE = 255
WINDOW = 224


@dataclass
class AdaptConfig:
    """Everything an adaptation run depends on (recorded in <out>/adapt.json)."""

    model: str
    images: list[str]
    data: str
    out: str
    rounds: int = 3
    steps: int = 300  # optimiser steps per round
    batch: int = 8  # half windows of the user's images, half composed scenes
    lr: float = 1e-4
    keep: float = 0.5  # share of each class's predicted pixels kept as pseudo-labels (the most confident)
    scale: str = "auto"
    tta: bool = True
    absent: str | tuple[str, ...] | None = None  # classes the user's smears cannot hold: never pseudo-labelled
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
        self.absent = tuple(NAMES[c] for c in parse_absent(self.absent))
        for name in ("rounds", "steps", "batch", "save_every"):
            if getattr(self, name) < 1:
                raise BloodcellsError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.batch < 2:
            raise BloodcellsError(f"--batch {self.batch}: needs at least 2 (one real window, one composed scene)")
        if not 0 < self.keep <= 1:
            raise BloodcellsError(f"--keep {self.keep}: the share of pseudo-labelled pixels must be in (0, 1]")
        if not self.lr > 0:
            raise BloodcellsError(f"--lr must be > 0; got {self.lr}")


def pseudo_labels(probs: list[np.ndarray], keep: float) -> tuple[list[np.ndarray], dict[str, float]]:
    """Pseudo-label maps (uint8, IGNORE where not confident) from class probabilities (C, h, w) of several images,
    with one confidence threshold per class: the most confident `keep` share of each class's pixels is kept."""
    labels = [p.argmax(axis=0).astype(np.uint8) for p in probs]
    conf = [p.max(axis=0) for p in probs]
    flat_l = np.concatenate([lab.ravel() for lab in labels])
    flat_c = np.concatenate([c.ravel() for c in conf])
    thresholds = np.full(NUM_CLASSES, np.inf, np.float32)
    for c in np.unique(flat_l):
        thresholds[c] = np.quantile(flat_c[flat_l == c], 1.0 - keep)
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


def _settings(cfg: AdaptConfig) -> dict[str, Any]:
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in AdaptConfig.RESULT_ONLY}
    if not d.get("absent"):  # runs recorded before the option existed continue unchanged
        d.pop("absent", None)
    return d


def adapt(cfg: AdaptConfig) -> dict[str, Any]:
    """Run (or continue) a self-training run; returns a summary (rounds, pseudo-label shares, paths)."""
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
        diff = next(k for k, v in json_safe(_settings(cfg)).items() if state.get("settings", {}).get(k) != v)
        raise BloodcellsError(f"{out}: holds an adaptation run with other settings ({diff}); choose another --out "
                              "or delete that folder")
    if state is None and out.is_dir() and any(out.iterdir()):
        raise BloodcellsError(f"{out}: is not empty and holds no adaptation run; choose another --out")
    write_json(record, {"settings": _settings(cfg), "done": False})
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _Adapt(cfg, payload, paths, out).run()
    finally:
        torch.set_num_threads(threads)


class _Adapt:
    def __init__(self, cfg: AdaptConfig, payload: dict, paths: list[Path], out: Path) -> None:
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
        self.stems = output_stems(paths)
        self.factors: dict[str, float] = {}

    def images_at_model_scale(self) -> list[np.ndarray]:
        """The user's images resized to 40x (factors estimated once, then kept in adapt.json)."""
        fixed = parse_scale(self.cfg.scale)
        record = read_json(self.out / "adapt.json")
        self.factors = dict(record.get("factors") or {})
        images = []
        for stem, path in zip(self.stems, self.paths):
            image = read_rgb(path)
            if stem not in self.factors:
                self.factors[stem] = fixed if fixed is not None else auto_scale(image)[0]
            images.append(resize_image(image, self.factors[stem]))
        write_json(self.out / "adapt.json", {**record, "factors": self.factors})
        return images

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
        labels, shares = pseudo_labels(probs, self.cfg.keep)
        for f, lab in zip(files, labels):
            write_bytes_atomic(f, encode_png(lab, level=1, png_filter="none"))
        kept = float(np.mean([(lab != IGNORE).mean() for lab in labels]))
        self.log.append({"round": r + 1, "predicted_share": shares, "pixels_kept": round(kept, 4)})
        return labels

    def save(self, name: str) -> Path:
        meta = {k: v for k, v in self.meta.items() if k not in ("config", "classes", "mean", "std")}
        meta.update({"adapted": {"from": self.cfg.model, "images": len(self.paths), "rounds": self.round,
                                 "log": self.log}})
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
