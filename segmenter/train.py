"""The training loop: Adam + MultiStepLR on a composed dataset, validation each epoch, exact resume, DDP."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from bloodcells.classes import NAMES, NUM_CLASSES, cell_classes
from bloodcells.errors import BloodcellsError, check_out_folder
from bloodcells.formats import DatasetInfo, json_safe
from bloodcells.imageio import write_bytes_atomic, write_png
from bloodcells.segmenter.charts import training_curves
from bloodcells.segmenter.card import dataset_facts
from bloodcells.segmenter.count import expected_areas
from bloodcells.segmenter.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint, unwrap
from bloodcells.segmenter.augment import AUGMENT_DEFAULTS
from bloodcells.segmenter.data import EpochSampler, SegmentationDataset, ShardSampler, augment_level
from bloodcells.segmenter.instances import DEFAULT_INSTANCE
from bloodcells.segmenter.models.blocks import INSTANCE_OUTPUTS
from bloodcells.segmenter.evaluate import run_model
from bloodcells.segmenter.losses import CombinedLoss, SegmentationObjective
from bloodcells.segmenter.metrics import all_reduce
from bloodcells.segmenter.models import create_model
from bloodcells.segmenter.runtime import Runtime, leave_process_group, make_runtime

StepHook = Callable[[int, int], None]  # (global step, epoch index) after each optimiser step
TIMING_KEYS = ("seconds", "images_per_s")  # history columns that differ between otherwise identical runs


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in its checkpoints so that --resume rebuilds the same run."""

    data: str | None = None
    out: str = "runs/unet"
    arch: str = "unet"
    width: int = 32
    model_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    milestones: tuple[int, ...] = (5,)  # epochs after which the learning rate is multiplied by gamma
    gamma: float = 0.1
    dice_weight: float = 0.0
    class_weights: bool = True
    weight_power: float = 1.0  # class weights are raised to this power: 1 = median-frequency, 0.5 = milder
    tie_weights: tuple[str, ...] = ()  # classes sharing one class weight (e.g. the two red-cell classes)
    augment: str = "full"  # none | geometric (flips, quarter turns) | appearance | full (and scale jitter)
    stain_jitter: float = AUGMENT_DEFAULTS.stain_alpha  # HED stain scale and shift range of appearance augmentation
    hue_jitter: float = AUGMENT_DEFAULTS.hue  # whole-sample hue turn range of appearance augmentation, in degrees
    hue_share: float = AUGMENT_DEFAULTS.p_hue  # share of training samples that get the hue turn
    instance: str | None = "auto"  # auto (distance when the scenes have instance maps) | distance | boundary | none
    instance_weight: float = 1.0  # weight of the instance output's loss beside the class loss
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    steps_per_epoch: int | None = None
    max_minutes: float | None = None
    workers: int | None = None  # None: 0 on the CPU (data is cached), 4 on a GPU
    threads: int | None = None
    cache: bool | None = None  # None: cache a split in memory when it fits the limit
    progress: bool = True
    resume: str | None = None
    val_split: str = "val"

    # settings a resumed run may change without changing its results
    ADJUSTABLE = frozenset({"data", "out", "epochs", "max_minutes", "workers", "threads", "cache", "progress",
                            "resume", "device"})

    def __post_init__(self) -> None:
        for key in ("data", "out", "resume"):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, str(value))
        self.milestones = tuple(int(m) for m in self.milestones)
        self.tie_weights = parse_tie(self.tie_weights)
        self.model_options = dict(self.model_options)
        self.augment = augment_level(self.augment)
        if self.instance in ("none", ""):
            self.instance = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["tie_weights"] = list(self.tie_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict; unknown keys (from another version) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        # runs saved before the instance output existed have none
        return cls(**{"instance": None, "tie_weights": (), **{k: v for k, v in d.items() if k in names}})

    def check(self) -> None:
        """Reject values that cannot work, naming the flag."""
        if self.data is None:
            raise BloodcellsError("no dataset: pass --data DIR (a composed dataset) or --resume RUN_DIR")
        check_out_folder(self.out)
        for name in ("epochs", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise BloodcellsError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0 or not self.gamma > 0:
            raise BloodcellsError(f"--lr and the decay gamma must be > 0; got lr={self.lr}, gamma={self.gamma}")
        if self.instance not in (None, "auto", *INSTANCE_OUTPUTS):
            raise BloodcellsError(f"--instance {self.instance!r}: choose auto, none or one of {', '.join(INSTANCE_OUTPUTS)}")
        if self.instance_weight < 0:
            raise BloodcellsError(f"--instance-weight must be >= 0; got {self.instance_weight}")
        if self.dice_weight < 0:
            raise BloodcellsError(f"--dice-weight must be >= 0; got {self.dice_weight}")
        if not 0 <= self.stain_jitter < 1:
            raise BloodcellsError(f"--stain-jitter must be at least 0 and below 1 (0.05 light, 0.2 strong); "
                                  f"got {self.stain_jitter}")
        if not 0 <= self.hue_jitter <= 180:
            raise BloodcellsError(f"--hue-jitter must be degrees in 0..180 (default {AUGMENT_DEFAULTS.hue:g}); "
                                  f"got {self.hue_jitter}")
        if not 0 <= self.hue_share <= 1:
            raise BloodcellsError(f"--hue-share must be a share in 0..1 (default {AUGMENT_DEFAULTS.p_hue:g}); "
                                  f"got {self.hue_share}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise BloodcellsError(f"--steps-per-epoch must be >= 1; got {self.steps_per_epoch}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise BloodcellsError(f"--max-minutes must be > 0; got {self.max_minutes}")
        if any(m < 1 for m in self.milestones):
            raise BloodcellsError(f"--milestones must be epochs >= 1; got {list(self.milestones)}")


def parse_tie(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Class names from 'a,b' or a list: at least two of the class table's names, or none."""
    names = () if value == "none" else cell_classes(value, "--tie-weights")
    if len(names) == 1:
        raise BloodcellsError(f"--tie-weights needs two or more classes to tie, e.g. healthy_rbc,infected_rbc; "
                              f"got {value!r}")
    return tuple(names)


RUN_FILES = ("last.pt", "last.json", "last.md", "best.pt", "best.json", "best.md", "history.csv", "curves.png")


def run_folder(path: str | Path) -> Path:
    """The run folder that --resume names: the folder itself, or the folder of the last.pt given instead."""
    p = Path(path)
    if p.suffix == ".pt" or p.is_file():
        if p.name != "last.pt":
            raise BloodcellsError(f"{p}: --resume takes a run folder or its last.pt (the resumable state), "
                                  f"e.g. --resume {p.parent}")
        return p.parent
    return p


def last_checkpoint(run_dir: str | Path) -> Path:
    """The resumable checkpoint of a run folder (or of the run whose last.pt is given)."""
    return run_folder(run_dir) / "last.pt"


def resume_config(run_dir: str | Path, **overrides: Any) -> TrainConfig:
    """The saved config of a run, with overrides that are not None; writes go to run_dir unless `out` is given."""
    run_dir = run_folder(run_dir)
    payload = load_checkpoint(last_checkpoint(run_dir))
    if not payload.get("training"):
        raise BloodcellsError(f"{last_checkpoint(run_dir)}: holds no training state; it cannot be resumed")
    given = {k: v for k, v in overrides.items() if v is not None}
    # the time budget belongs to one invocation: a resumed run gets only the one it is given
    saved = {**payload["training"]["config"], "max_minutes": None}
    return TrainConfig.from_dict({**saved, "out": str(run_dir), **given, "resume": str(run_dir)})


def _differences(saved: TrainConfig, new: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(setting, saved value, new value) for every setting that changes a run's results (the dataset included)."""
    diffs = []
    for f in dataclasses.fields(TrainConfig):
        old, value = getattr(saved, f.name), getattr(new, f.name)
        if f.name == "data":
            if old is not None and value is not None and Path(old).resolve() != Path(value).resolve():
                diffs.append((f.name, old, value))
        elif f.name not in TrainConfig.ADJUSTABLE and old != value:
            diffs.append((f.name, old, value))
    return diffs


def continue_or_start(config: TrainConfig, force: bool = False) -> TrainConfig:
    """What to run when `out` may already hold a run and no --resume was given.

    The same settings resume that run (re-running a command continues it); other settings are refused, so
    that a finished or interrupted run is never overwritten by accident; `force` starts over there.
    """
    out = Path(config.out)
    if config.resume is not None:
        if force:
            raise BloodcellsError("--force starts a new run and --resume continues one; pass only one of them")
        return config
    held = [name for name in ("last.pt", "best.pt") if (out / name).is_file()]
    if force or not held:
        return config
    start_over = f"pass --force to start a new run in {out}, or choose another --out"
    if "last.pt" not in held:
        raise BloodcellsError(f"{out}: holds a run's best.pt but no last.pt to resume it from; {start_over}")
    try:
        payload = load_checkpoint(out / "last.pt")
    except BloodcellsError as e:
        raise BloodcellsError(f"{e}; or {start_over}") from None
    if not payload.get("training"):
        raise BloodcellsError(f"{out / 'last.pt'}: holds no training state to resume; {start_over}")
    diffs = _differences(TrainConfig.from_dict(payload["training"]["config"]), config)
    if diffs:
        name, old, new = diffs[0]
        raise BloodcellsError(f"{out}: holds a run trained with {name}={old!r}, not {new!r}; re-run that run's "
                              f"command (or 'cli train --resume {out}') to continue it, or {start_over}")
    return dataclasses.replace(config, resume=str(out))


def clear_run(out: Path) -> None:
    """Remove the files of a run in `out` (starting over there must not leave a best.pt of the old run)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


class StopRequests:
    """SIGINT/SIGTERM ask the loop to stop after the step in progress (a second Ctrl-C interrupts at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def state_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, values): equal digests mean identical weights."""
    h = hashlib.sha256()
    for name, t in unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def history_csv(history: list[dict[str, Any]]) -> str:
    """Per-epoch history as CSV, per-class IoU and Dice flattened into iou_<class> / dice_<class> columns."""
    head = ["epoch", "lr", "train_loss", "val_loss", "pixel_accuracy", "miou", "mean_dice"]
    per_class = [f"iou_{n}" for n in NAMES] + [f"dice_{n}" for n in NAMES]
    tail = ["steps", *TIMING_KEYS]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head + per_class + tail)
    for r in history:
        values = [r[k] for k in head] + list(r["per_class_iou"]) + list(r["per_class_dice"]) + [r[k] for k in tail]
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in values])
    return buf.getvalue()


class _Run:
    """The state of one training invocation; `train` drives it."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, stop: StopRequests, step_hook: StepHook | None) -> None:
        self.cfg, self.rt, self.stop, self.step_hook = cfg, runtime, stop, step_hook
        self.out = Path(cfg.out)
        payload = None
        if cfg.resume:
            payload = load_checkpoint(last_checkpoint(cfg.resume))
            if not payload.get("training"):
                raise BloodcellsError(f"{last_checkpoint(cfg.resume)}: holds no training state; it cannot be resumed")
            self._check_same_run(TrainConfig.from_dict(payload["training"]["config"]))
        info = DatasetInfo.read(cfg.data)  # type: ignore[arg-type]
        self.dataset = dataset_facts(info)  # recipe, scenes, sprite sources and licences, for the model card
        # mean visible area per object and class, for counting cells in predicted maps later
        self.cell_area = {NAMES[k]: round(v, 1) for k, v in
                          expected_areas(info.raw).items()}  # type: ignore[arg-type]
        if payload is not None:
            norm = payload["normalization"]
            self.mean, self.std = tuple(norm["mean"]), tuple(norm["std"])
            weights = payload["training"]["class_weights"]
            self.class_weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        else:
            self.mean, self.std = info.mean, info.std
            tie = [NAMES.index(c) for c in cfg.tie_weights]
            self.class_weights = (torch.tensor(info.loss_weights(tie) ** cfg.weight_power, dtype=torch.float32)
                                  if cfg.class_weights else None)
        self.train_set = SegmentationDataset(cfg.data, "train", self.mean, self.std,  # type: ignore[arg-type]
                                             augment=cfg.augment, seed=cfg.seed, cache=cfg.cache,
                                             instance=cfg.instance, stain_jitter=cfg.stain_jitter,
                                             hue_jitter=cfg.hue_jitter, hue_share=cfg.hue_share)
        self.val_set = SegmentationDataset(cfg.data, cfg.val_split, self.mean, self.std,  # type: ignore[arg-type]
                                           cache=cfg.cache, instance=cfg.instance)
        if payload is None:
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed % 2**32)
            random.seed(cfg.seed)
        model = create_model(cfg.arch, NUM_CLASSES, 3, cfg.width, instance=cfg.instance, **cfg.model_options)
        if payload is not None:
            model.load_state_dict(payload["state_dict"])
        self.model = runtime.model(model)
        self.net: nn.Module = self.model
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(cfg.milestones), cfg.gamma)
        self.scaler = runtime.grad_scaler()
        self.criterion = SegmentationObjective(CombinedLoss(1.0, cfg.dice_weight, self.class_weights), NUM_CLASSES,
                                               cfg.instance, cfg.instance_weight).to(runtime.device)
        workers = cfg.workers if cfg.workers is not None else (0 if runtime.device.type == "cpu" else 4)
        self.loader_generator = torch.Generator()
        self.sampler = EpochSampler(len(self.train_set), True, cfg.seed, runtime.rank, runtime.world)
        pin = runtime.device.type == "cuda"
        self.loader = DataLoader(self.train_set, cfg.batch_size, sampler=self.sampler, num_workers=workers,
                                 generator=self.loader_generator, pin_memory=pin)
        self.val_loader = DataLoader(self.val_set, cfg.batch_size, num_workers=workers, pin_memory=pin,
                                     sampler=ShardSampler(len(self.val_set), runtime.rank, runtime.world))
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.partial = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # loss sum, samples this epoch
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.updating = False
        self.images_seen, self.train_seconds = 0, 0.0
        if payload is not None:
            self._restore(payload["training"])

    def _check_same_run(self, saved: TrainConfig) -> None:
        for f in dataclasses.fields(TrainConfig):
            if f.name in TrainConfig.ADJUSTABLE:
                continue
            old, new = getattr(saved, f.name), getattr(self.cfg, f.name)
            if old != new:
                raise BloodcellsError(
                    f"{self.cfg.resume}: the run was trained with {f.name}={old!r}, not {new!r}; a resumed run keeps "
                    "its settings (only --epochs, --max-minutes, --workers, --threads, --data and --out may change); "
                    "start a new run with another --out to change it")

    def _restore(self, state: dict[str, Any]) -> None:
        if state["step_in_epoch"] and state["world_size"] != self.rt.world:
            raise BloodcellsError(f"{self.cfg.resume}: stopped in the middle of an epoch with {state['world_size']} "
                                  f"process(es); resume it with the same number (now {self.rt.world})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_states(state["rng"], self.loader_generator)
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        if self.rt.is_main:  # the saved partial sums are already the total over all ranks
            self.partial = torch.tensor(state["partial"], dtype=torch.float64, device=self.rt.device)
        self.history, self.best = list(state["history"]), state["best"]

    def steps_in_epoch(self) -> int:
        """Optimiser steps per epoch on each rank (capped by steps_per_epoch)."""
        steps = math.ceil(self.sampler.per_rank() / self.cfg.batch_size)
        return min(steps, self.cfg.steps_per_epoch) if self.cfg.steps_per_epoch else steps

    def _agree(self, code: int) -> int:
        """The largest stop code over all ranks (0 = go on), so every rank stops at the same step."""
        if not self.rt.distributed:
            return code
        t = torch.tensor([code], dtype=torch.int64, device=self.rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _stop_code(self, started: float) -> int:
        code = 2 if self.stop.requested else 0
        if self.cfg.max_minutes is not None and time.monotonic() - started >= self.cfg.max_minutes * 60:
            code = max(code, 1)
        return self._agree(code)

    def meta(self, stopped: str | None) -> dict[str, Any]:
        """The JSON-able description of the run so far (also the sidecar JSON's content)."""
        return json_safe({
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "epochs": self.cfg.epochs, "batch_size": self.cfg.batch_size,
            "lr": self.optimizer.param_groups[0]["lr"], "precision": self.rt.precision,
            "device": str(self.rt.device), "world_size": self.rt.world, "seed": self.cfg.seed,
            "data": self.cfg.data, "train_images": len(self.train_set), "val_images": len(self.val_set),
            "class_weights": None if self.class_weights is None else self.class_weights.tolist(),
            "best": self.best, "history": self.history, "stopped": stopped, "cell_area": self.cell_area,
            "dataset": self.dataset,
        })

    def save(self, name: str, stopped: str | None, collective: bool = True) -> Path:
        """Write out/<name>.pt + .json (rank 0; every rank must call it when collective)."""
        partial = self.partial.clone()
        if collective:
            all_reduce(partial)
        path = self.out / f"{name}.pt"
        if not self.rt.is_main:
            return path
        training = {
            "config": self.cfg.to_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "partial": partial.tolist(), "world_size": self.rt.world,
            "rng": rng_states(self.loader_generator),
            "class_weights": None if self.class_weights is None else self.class_weights.tolist(),
            "history": self.history, "best": self.best,
        }
        save_checkpoint(path, self.model, self.mean, self.std, self.meta(stopped), training)
        return path

    def _sync_buffers(self) -> None:
        # DDP ranks update batch-norm statistics on their own batches; use rank 0's everywhere,
        # so validation and the saved weights agree on every rank
        if self.rt.distributed:
            for b in self.model.buffers():
                dist.broadcast(b, 0)

    def train_epoch(self, started: float) -> int:
        """Run the rest of the current epoch; returns a stop code (0: the epoch finished)."""
        cfg, rt = self.cfg, self.rt
        total = self.steps_in_epoch()
        self.sampler.set_epoch(self.epoch, self.step_in_epoch * cfg.batch_size)
        self.train_set.set_epoch(self.epoch)
        self.loader_generator.manual_seed(cfg.seed + self.epoch)
        self.model.train()
        bar = tqdm(total=total, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and rt.is_main), leave=False, dynamic_ncols=True)
        try:
            if self.step_in_epoch >= total:
                return 0
            tick = time.perf_counter()
            for batch in self.loader:
                x, y = rt.batch(batch[0]), batch[1].to(rt.device, non_blocking=True)
                rest = [t.to(rt.device, non_blocking=True) for t in batch[2:]]  # the instance target, if any
                self.optimizer.zero_grad(set_to_none=True)
                with rt.autocast():
                    out = self.net(x)
                loss = self.criterion(out, y, *rest)  # the losses cast the logits to fp32
                self.updating = True
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self.optimizer.step()
                self.updating = False
                self.partial += torch.stack([loss.detach().double() * len(y), loss.new_tensor(len(y), dtype=torch.float64)])
                self.step_in_epoch += 1
                self.global_step += 1
                self.images_seen += len(y) * rt.world
                bar.update(1)
                if bar.n % 10 == 0 or self.step_in_epoch == total:
                    bar.set_postfix(loss=f"{float(self.partial[0] / self.partial[1]):.4f}")
                if self.step_hook is not None:
                    self.step_hook(self.global_step, self.epoch)
                if self.step_in_epoch >= total:
                    break
                code = self._stop_code(started)
                if code:
                    self.train_seconds += time.perf_counter() - tick
                    return code
            self.train_seconds += time.perf_counter() - tick
            return 0
        finally:
            bar.close()

    def end_epoch(self, seconds: float, images: int) -> dict[str, Any]:
        """Validate, log, checkpoint; returns the epoch's history row."""
        # validate before changing any state, so an interrupt during validation leaves a resumable state
        totals = all_reduce(self.partial.clone())
        self._sync_buffers()
        cm, val_loss = run_model(self.model, self.val_loader, self.rt, self.criterion)
        m = cm.compute()
        row = {"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": float(totals[0] / totals[1]), "val_loss": val_loss,
               "pixel_accuracy": m["pixel_accuracy"], "miou": m["miou"], "mean_dice": m["mean_dice"],
               "per_class_iou": m["per_class_iou"], "per_class_dice": m["per_class_dice"],
               "steps": self.steps_in_epoch(), "seconds": round(seconds, 3),
               "images_per_s": round(images / seconds, 3) if seconds > 0 else float("nan")}
        improved = self.best is None or m["pixel_accuracy"] > self.best["pixel_accuracy"]
        self.scheduler.step()
        self.history.append(json_safe(row))
        self.epoch += 1
        self.step_in_epoch = 0
        self.partial.zero_()
        if improved:
            self.best = json_safe({"epoch": row["epoch"], "pixel_accuracy": m["pixel_accuracy"],
                                   "val_loss": val_loss, "miou": m["miou"]})
            self.save("best", None)
        self.save("last", None)
        if self.rt.is_main:
            write_bytes_atomic(self.out / "history.csv", history_csv(self.history).encode())
            write_png(self.out / "curves.png", training_curves(self.history))
        return row

    def run(self) -> dict[str, Any]:
        """Train up to cfg.epochs, honouring the time budget and stop requests."""
        cfg, rt = self.cfg, self.rt
        started = time.monotonic()
        stopped: str | None = None
        if rt.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        try:
            first = True
            while self.epoch < cfg.epochs:
                # a budget reached during the last validation stops here; each invocation makes some progress
                code = 0 if first else self._stop_code(started)
                first = False
                if code:
                    stopped = ("time budget", "interrupted")[code - 1]
                    break
                t0, seen0 = time.perf_counter(), self.images_seen
                code = self.train_epoch(started)
                if code:
                    stopped = ("time budget", "interrupted")[code - 1]
                    self.save("last", stopped)
                    break
                row = self.end_epoch(time.perf_counter() - t0, self.images_seen - seen0)
                if rt.is_main and cfg.progress:
                    tqdm.write(f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.4f}  "
                               f"val loss {row['val_loss']:.4f}  pixel acc {row['pixel_accuracy']:.4f}  "
                               f"mIoU {row['miou']:.4f}  ({row['seconds']:.1f} s)")
            else:
                stopped = None
            if stopped and self.step_in_epoch == 0 and self.history:
                self.save("last", stopped)  # record why the run stopped at an epoch boundary
        except KeyboardInterrupt:
            # a raw interrupt (second Ctrl-C, or no signal handler in this thread): keep what is consistent
            if rt.is_main and not self.updating:
                self.save("last", "interrupted", collective=False)
            raise
        if stopped == "interrupted":
            raise KeyboardInterrupt
        self._sync_buffers()
        summary = self.meta(stopped)
        summary.update({"out": str(self.out), "best_path": str(self.out / "best.pt"),
                        "last_path": str(self.out / "last.pt"), "seconds": round(time.monotonic() - started, 3),
                        "images_per_s": round(self.images_seen / self.train_seconds, 3) if self.train_seconds else None,
                        "state_digest": state_digest(self.model), "rank": rt.rank,
                        "resumed": cfg.resume is not None})
        return summary


def train(config: TrainConfig, step_hook: StepHook | None = None, force: bool = False) -> dict[str, Any]:
    """Train (or resume, with config.resume) a model; returns a summary (best, history, stop reason, speed).

    When config.out already holds a run, the same settings resume it, other settings are refused, and
    `force` starts over there."""
    # Writes best.pt / last.pt with best.json / last.json, history.csv and curves.png into
    # config.out (rank 0 only under torchrun). A time budget or SIGINT/SIGTERM stops after the
    # step in progress with last.pt saved, from which a resume continues exactly; an
    # interrupt re-raises KeyboardInterrupt once last.pt is written.
    config.check()
    if config.instance == "auto" and (Path(config.data) / "dataset.json").is_file():  # type: ignore[arg-type]
        config.instance = DEFAULT_INSTANCE if DatasetInfo.read(config.data).has_instances else None  # type: ignore[arg-type]
    fresh = config.resume is None
    config = continue_or_start(config, force)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    runtime = make_runtime(config.precision, config.device)
    try:
        with StopRequests() as stop:
            run = _Run(config, runtime, stop, step_hook)
            if force and fresh and runtime.is_main:  # only once the new run could be set up
                clear_run(Path(config.out))
            return run.run()
    finally:
        leave_process_group(runtime)
        torch.set_num_threads(threads)


def parse_milestones(text: str) -> tuple[int, ...]:
    """'5' or '5,8' (or '' for a constant rate) -> epochs after which the learning rate drops."""
    try:
        values = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise BloodcellsError(f"--milestones {text!r}: expected epochs separated by commas, e.g. 5 or 5,8") from None
    if any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise BloodcellsError(f"--milestones {text!r}: epochs must be >= 1 and increasing")
    return values


def parse_model_options(items: list[str]) -> dict[str, Any]:
    """['deep_supervision=true', 't=3'] -> {'deep_supervision': True, 't': 3} (JSON values, else strings)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BloodcellsError(f"--option {item!r}: expected KEY=VALUE, e.g. deep_supervision=true")
        try:
            options[key.strip()] = json.loads(value.strip())
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return options
