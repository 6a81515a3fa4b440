"""Reading a composed dataset (the on-disk format of DESIGN.md) as a torch Dataset."""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from bloodcells.classes import NUM_CLASSES
from bloodcells.errors import BloodcellsError
from bloodcells.formats import DatasetInfo, scene_paths, split_ids
from bloodcells.imageio import read_gray, read_rgb
from bloodcells.segmenter.augment import AUGMENT_DEFAULTS, LEVELS, augment_sample
from bloodcells.segmenter.instances import instance_target

MAX_CACHE_GB = 4.0  # a 10k-image 224x224 split takes 2 GB as uint8 images + labels


def default_cache_limit_gb() -> float:
    """Cache budget per split: 4 GB, or a quarter of the RAM shared by this node's DDP processes if less."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (AttributeError, ValueError, OSError):
        return MAX_CACHE_GB
    local_world = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return min(MAX_CACHE_GB, ram / 4 / local_world)


def read_sample(root: Path, split: str, sample_id: str, instances: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One (RGB uint8 (H, W, 3), class-index uint8 (H, W), instance ids uint16 (H, W) or None) triple, checked."""
    paths = scene_paths(root, split, sample_id)
    image = read_rgb(paths.image)
    label = read_gray(paths.label)
    if label.shape != image.shape[:2]:
        raise BloodcellsError(f"{paths.label}: label is {label.shape[1]}x{label.shape[0]} but its image is "
                              f"{image.shape[1]}x{image.shape[0]}; re-compose the dataset")
    top = int(label.max())
    if top >= NUM_CLASSES:
        raise BloodcellsError(f"{paths.label}: holds class index {top}, beyond 0..{NUM_CLASSES - 1}; "
                              "labels must be class-index PNGs, not colour maps")
    inst = None
    if instances:
        inst = read_instances(paths.instances)
        if inst.shape != label.shape:
            raise BloodcellsError(f"{paths.instances}: is {inst.shape[1]}x{inst.shape[0]} but its label map is "
                                  f"{label.shape[1]}x{label.shape[0]}; re-compose the dataset")
    return image, label, inst


def read_instances(path: Path) -> np.ndarray:
    """A 16-bit instance map (0 = no cell, k = the k-th object of the scene's annotation)."""
    if not path.is_file():
        raise BloodcellsError(f"{path}: missing; the dataset has no instance maps (composed by an older version): "
                              "re-compose it, or train with --instance none")
    arr = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 2:
        raise BloodcellsError(f"{path}: not a 16-bit instance map PNG; re-compose the dataset")
    return arr


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB (..., H, W, 3) -> normalised float32 (..., 3, H, W): (x / 255 - mean) / std."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255)
    x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return x.movedim(-1, -3).contiguous()


def flip_rotate(image: torch.Tensor, label: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one of the 8 dihedral transforms (code 0..7: bit 0 = horizontal flip, bits 1-2 = quarter turns)."""
    if code & 1:
        image, label = image.flip(-1), label.flip(-1)
    turns = code >> 1
    if turns:
        image, label = image.rot90(turns, (-2, -1)), label.rot90(turns, (-2, -1))
    return image.contiguous(), label.contiguous()


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 63-bit seed for one sample in one epoch (independent of workers, ranks and resumes)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dihedral(arr: np.ndarray, code: int) -> np.ndarray:
    """flip_rotate's transform on a numpy array (H, W[, C]): bit 0 = horizontal flip, bits 1-2 = quarter turns."""
    if code & 1:
        arr = arr[:, ::-1]
    turns = code >> 1
    if turns:
        arr = np.rot90(arr, turns, axes=(0, 1))
    return np.ascontiguousarray(arr)


AUGMENT_LEVELS = LEVELS  # none | geometric | appearance | full


def augment_level(value: bool | str) -> str:
    """--augment: none | geometric (flips and quarter turns) | appearance (and stain, colour, blur, noise, JPEG) |
    full (and scale jitter); True / False as geometric / none."""
    if value is True:
        return "geometric"
    if value is False or value is None:
        return "none"
    if value not in AUGMENT_LEVELS:
        raise BloodcellsError(f"--augment {value!r}: choose one of {', '.join(AUGMENT_LEVELS)}")
    return value


class SegmentationDataset(Dataset):
    """One split as (normalised float image (3, H, W), long label (H, W)[, instance target (H, W)]) samples,
    optionally cached and augmented."""

    # Caching decodes the whole split once into uint8 / uint16 arrays (cache=None: when it fits
    # cache_limit_gb, by default default_cache_limit_gb()), which forked DataLoader workers share copy-on-write.
    # Augmentation draws a flip / quarter turn from a generator seeded by (seed, epoch, index), so an epoch's
    # batches do not depend on workers or resumes; call set_epoch before each epoch (DataLoader workers must not
    # be persistent, so they see it). With `instance` set, a third tensor is the instance output's target,
    # computed from the (augmented) instance map.

    def __init__(self, root: str | Path, split: str, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, augment: bool | str = False, seed: int = 0,
                 cache: bool | None = None, cache_limit_gb: float | None = None, instance: str | None = None,
                 stain_jitter: float | None = None, hue_jitter: float | None = None,
                 hue_share: float | None = None) -> None:
        self.root = Path(root)
        self.info = DatasetInfo.read(self.root)
        self.split = split
        self.ids = split_ids(self.root, split)
        self.mean = tuple(mean) if mean is not None else self.info.mean
        self.std = tuple(std) if std is not None else self.info.std
        self.augment, self.seed, self.epoch = augment_level(augment), seed, 0
        self.instance = instance
        # the HED stain range, the hue range and the hue's share of the appearance chain (None: AUGMENT_DEFAULTS)
        changes: dict[str, float] = {}
        if stain_jitter is not None:
            changes.update(stain_alpha=stain_jitter, stain_beta=stain_jitter)
        if hue_jitter is not None:
            changes["hue"] = hue_jitter
        if hue_share is not None:
            changes["p_hue"] = hue_share
        self.augment_config = replace(AUGMENT_DEFAULTS, **changes) if changes else AUGMENT_DEFAULTS
        if instance is not None and not self.info.has_instances:
            raise BloodcellsError(f"{self.info.path}: the scenes have no instance maps (composed by an older version); "
                                  "re-compose the dataset, or train with --instance none")
        self.images: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.instances: np.ndarray | None = None
        if cache is None:
            image, _, _ = read_sample(self.root, split, self.ids[0])
            limit = default_cache_limit_gb() if cache_limit_gb is None else cache_limit_gb
            per_pixel = 4 + (2 if instance else 0)
            cache = len(self.ids) * image.shape[0] * image.shape[1] * per_pixel <= limit * 1e9
        if cache:
            self._load_all()

    def _load_all(self) -> None:
        # cv2 decoding releases the GIL, so threads decode in parallel
        with ThreadPoolExecutor(max_workers=4) as pool:
            samples = list(pool.map(lambda i: read_sample(self.root, self.split, i, self.instance is not None),
                                    self.ids))
        shape = samples[0][0].shape
        for sample_id, (image, _, _) in zip(self.ids, samples):
            if image.shape != shape:
                raise BloodcellsError(f"{self.root / self.split / 'images' / sample_id}.png: is "
                                      f"{image.shape[1]}x{image.shape[0]}, others {shape[1]}x{shape[0]}; "
                                      "all images of a split must have one size")
        self.images = np.stack([p[0] for p in samples])
        self.labels = np.stack([p[1] for p in samples])
        if self.instance is not None:
            self.instances = np.stack([p[2] for p in samples])

    @property
    def cached(self) -> bool:
        """Whether the whole split is held in memory."""
        return self.images is not None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentation draws __getitem__ makes."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The stored uint8 image, label (and uint16 instance map) of one sample, without normalisation or
        augmentation."""
        if self.images is not None and self.labels is not None:
            inst = self.instances[index] if self.instances is not None else None
            return self.images[index], self.labels[index], inst
        return read_sample(self.root, self.split, self.ids[index], self.instance is not None)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        image, label, inst = self.raw(index)
        if self.augment != "none":
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            code = int(torch.randint(8, (), generator=g))
            image, label = dihedral(image, code), dihedral(label, code)
            inst = dihedral(inst, code) if inst is not None else None
            if self.augment in ("appearance", "full"):
                rng = np.random.default_rng([self.seed, self.epoch, index, 1])
                image, label, inst = augment_sample(image, label, inst, rng, self.augment,
                                                    config=self.augment_config)
        x, y = to_tensor(image, self.mean, self.std), torch.from_numpy(np.ascontiguousarray(label)).long()
        if self.instance is None:
            return x, y
        return x, y, torch.from_numpy(instance_target(inst.astype(np.int32), self.instance))


class EpochSampler(Sampler[int]):
    """This rank's share of a permutation seeded by seed + epoch, from `start` on (for a mid-epoch resume)."""

    # As DistributedSampler: the order is padded by repeating its head so every rank gets
    # the same count; with world == 1 it is the plain shuffled order. Its only state is
    # (epoch, start), so a resumed run rebuilds the same batches.

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.size, self.shuffle, self.seed, self.rank, self.world = size, shuffle, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and how many of this rank's samples to skip."""
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        """Samples each rank sees in a full epoch."""
        return math.ceil(self.size / self.world)

    def indices(self) -> list[int]:
        """This rank's whole epoch, in order."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank() * self.world
        order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.per_rank() - self.start


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... in order, without padding: evaluation counts every sample once."""

    def __init__(self, size: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.rank, self.world = size, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))
