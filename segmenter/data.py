"""Reading a composed dataset (the on-disk format of DESIGN.md) as a torch Dataset."""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from bloodcells.classes import NAMES, NUM_CLASSES
from bloodcells.errors import BloodcellsError
from bloodcells.formats import SPLITS, DatasetInfo, split_ids
from bloodcells.imageio import read_gray, read_rgb

MAX_CACHE_GB = 4.0  # a 10k-image 224x224 split takes 2 GB as uint8 images + labels


def default_cache_limit_gb() -> float:
    """Cache budget per split: 4 GB, or a quarter of the RAM shared by this node's DDP processes if less."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (AttributeError, ValueError, OSError):
        return MAX_CACHE_GB
    local_world = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return min(MAX_CACHE_GB, ram / 4 / local_world)


def read_sample(root: Path, split: str, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 (H, W, 3), class-index uint8 (H, W)) pair, checked."""
    img_path = root / split / "images" / f"{sample_id}.png"
    lbl_path = root / split / "labels" / f"{sample_id}.png"
    image = read_rgb(img_path)
    label = read_gray(lbl_path)
    if label.shape != image.shape[:2]:
        raise BloodcellsError(f"{lbl_path}: label is {label.shape[1]}x{label.shape[0]} but its image is "
                              f"{image.shape[1]}x{image.shape[0]}; re-compose the dataset")
    top = int(label.max())
    if top >= NUM_CLASSES:
        raise BloodcellsError(f"{lbl_path}: holds class index {top}, beyond 0..{NUM_CLASSES - 1}; "
                              "labels must be class-index PNGs, not colour maps")
    return image, label


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


class SegmentationDataset(Dataset):
    """One split as (normalised float image (3, H, W), long label (H, W)) pairs, optionally cached and augmented."""

    # Caching decodes the whole split once into one uint8 array (cache=None: when it fits
    # cache_limit_gb, by default default_cache_limit_gb()), which forked DataLoader workers share copy-on-write. Augmentation
    # draws a flip / quarter turn from a torch.Generator seeded by (seed, epoch, index), so
    # an epoch's batches do not depend on workers or resumes; call set_epoch before each
    # epoch (DataLoader workers must not be persistent, so they see it).

    def __init__(self, root: str | Path, split: str, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, augment: bool = False, seed: int = 0,
                 cache: bool | None = None, cache_limit_gb: float | None = None) -> None:
        self.root = Path(root)
        self.info = DatasetInfo.read(self.root)
        self.split = split
        self.ids = split_ids(self.root, split)
        self.mean = tuple(mean) if mean is not None else self.info.mean
        self.std = tuple(std) if std is not None else self.info.std
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.images: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        if cache is None:
            image, _ = read_sample(self.root, split, self.ids[0])
            limit = default_cache_limit_gb() if cache_limit_gb is None else cache_limit_gb
            cache = len(self.ids) * image.shape[0] * image.shape[1] * 4 <= limit * 1e9
        if cache:
            self._load_all()

    def _load_all(self) -> None:
        # cv2 decoding releases the GIL, so threads decode in parallel
        with ThreadPoolExecutor(max_workers=4) as pool:
            pairs = list(pool.map(lambda i: read_sample(self.root, self.split, i), self.ids))
        shape = pairs[0][0].shape
        for sample_id, (image, _) in zip(self.ids, pairs):
            if image.shape != shape:
                raise BloodcellsError(f"{self.root / self.split / 'images' / sample_id}.png: is "
                                      f"{image.shape[1]}x{image.shape[0]}, others {shape[1]}x{shape[0]}; "
                                      "all images of a split must have one size")
        self.images = np.stack([p[0] for p in pairs])
        self.labels = np.stack([p[1] for p in pairs])

    @property
    def cached(self) -> bool:
        """Whether the whole split is held in memory."""
        return self.images is not None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentation draws __getitem__ makes."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored uint8 image and label of one sample, without normalisation or augmentation."""
        if self.images is not None and self.labels is not None:
            return self.images[index], self.labels[index]
        return read_sample(self.root, self.split, self.ids[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.raw(index)
        x, y = to_tensor(image, self.mean, self.std), torch.from_numpy(np.ascontiguousarray(label)).long()
        if self.augment:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            x, y = flip_rotate(x, y, int(torch.randint(8, (), generator=g)))
        return x, y


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
