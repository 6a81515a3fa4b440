"""Where and how a model runs: device, precision (autocast), memory format and the DDP process group."""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn

from bloodcells.errors import BloodcellsError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@functools.lru_cache(maxsize=None)
def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bf16 through oneDNN natively (AVX-512 / AMX / ARM bf16): the case where autocast pays."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.ones(4, 4) @ torch.ones(4, 4)
        return y.dtype == torch.bfloat16 and bool((y.float() == 4).all())
    except (RuntimeError, AttributeError):
        return False


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' is this process's GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise BloodcellsError(f"--device {device}: unknown device; use auto, cpu, cuda or cuda:N (N a GPU number)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BloodcellsError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BloodcellsError(f"--device {device}: there are only {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); pick one of them")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn 'auto' into fp32, bf16 or fp16 for this device; reject what the device cannot do."""
    if precision not in PRECISIONS:
        raise BloodcellsError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if precision == "fp16":
        raise BloodcellsError("--precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    if precision == "auto":
        return "bf16" if device.type == "cpu" and cpu_bf16_supported() else "fp32"
    return precision


@dataclass
class Runtime:
    """A device, a resolved precision and this process's place in a (possibly 1-process) DDP group."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16, already resolved
    channels_last: bool = True
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # whether make_runtime joined the process group (and so should leave it)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for plain fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def distributed(self) -> bool:
        """Whether several processes train together."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and prints."""
        return self.rank == 0

    def autocast(self) -> ContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16 on CUDA (bf16 has fp32's range and needs none)."""
        return torch.amp.GradScaler("cuda") if self.precision == "fp16" and self.device.type == "cuda" else None

    def model(self, model: nn.Module) -> nn.Module:
        """Move a model to the device and memory format."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """Move an input batch to the device and memory format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when absent."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise BloodcellsError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers ({e}); launch with torchrun") from None
    return rank, world, local


def make_runtime(precision: str = "auto", device: str = "auto", channels_last: bool = True) -> Runtime:
    """Resolve device and precision; with WORLD_SIZE > 1 join the process group (nccl on CUDA, gloo on CPU)."""
    rank, world, local = env_world()
    dev = pick_device(device, local)
    resolved = resolve_precision(precision, dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        owns = True
    return Runtime(dev, resolved, channels_last, rank, world, owns)


def leave_process_group(runtime: Runtime) -> None:
    """Destroy the DDP process group if make_runtime created it for this runtime."""
    if runtime.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        runtime.owns_group = False
