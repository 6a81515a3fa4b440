"""Training and inference throughput of every architecture on this machine's CPU.

Usage: python bench/models.py [--archs unet,resunet] [--iters 3] [--warmup 1]

Each case builds the model at batch 8 on 224x224 inputs, runs warm-up steps, then
times `--iters` steps and reports images/s from the fastest step: on a shared machine
other processes only ever add time, so the minimum is the least disturbed estimate. A training step is forward, the
project's CombinedLoss, backward and an Adam step; inference runs in eval mode under
torch.inference_mode. The U-Net is also run with channels_last memory format, bf16
autocast, both together, and at width 16, each compared with the fp32 contiguous
U-Net measured in the same process.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from bloodcells.classes import NUM_CLASSES
from bloodcells.segmenter.losses import CombinedLoss
from bloodcells.segmenter.models import ARCHITECTURES, create_model
from timing import best_seconds, cpu_model  # noqa: E402  (bench/ is on sys.path when run as a script)

MODES = ("fp32", "channels_last", "bf16", "channels_last+bf16")


@dataclass(frozen=True)
class Case:
    arch: str
    width: int
    mode: str  # one of MODES


@dataclass(frozen=True)
class Result:
    case: Case
    params_m: float
    train_ips: float
    infer_ips: float


def cases(archs: list[str]) -> list[Case]:
    """fp32 at width 32 for every architecture; the U-Net's variants right after its reference."""
    out = []
    for arch in archs:
        out.append(Case(arch, 32, "fp32"))
        if arch == "unet":
            out += [Case("unet", 32, m) for m in MODES[1:]] + [Case("unet", 16, "fp32")]
    return out



def measure(case: Case, batch: int, size: int, warmup: int, iters: int) -> Result:
    """Train and inference images/s of one case, from a fixed seed."""
    torch.manual_seed(0)
    model = create_model(case.arch, width=case.width)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch, size, size))
    if "channels_last" in case.mode:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast: Callable[[], ContextManager] = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "bf16" in case.mode else nullcontext)
    loss_fn = CombinedLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode(), autocast():
            model(x)

    model.train()
    train_s = best_seconds(train_step, warmup, iters)
    model.eval()
    infer_s = best_seconds(infer_step, warmup, iters)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return Result(case, params, batch / train_s, batch / infer_s)



def table(results: list[Result]) -> str:
    """Markdown table; ratios are against the fp32 contiguous U-Net at width 32."""
    ref = next((r for r in results if r.case == Case("unet", 32, "fp32")), None)
    lines = [
        "| arch | width | mode | params (M) | train img/s | infer img/s | train x ref | infer x ref |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio_t = f"{r.train_ips / ref.train_ips:.2f}" if ref else "-"
        ratio_i = f"{r.infer_ips / ref.infer_ips:.2f}" if ref else "-"
        lines.append(f"| {r.case.arch} | {r.case.width} | {r.case.mode} | {r.params_m:.2f} | "
                     f"{r.train_ips:.2f} | {r.infer_ips:.2f} | {ratio_t} | {ratio_i} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run every case, print machine facts and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHITECTURES),
                        help="comma-separated architectures (default: all)")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architecture(s) {unknown}; choose from {list(ARCHITECTURES)}")

    print(f"command: python bench/models.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"nproc: {os.cpu_count()}; CPU: {cpu_model()}; torch {torch.__version__}; "
          f"threads: {torch.get_num_threads()}; batch {args.batch} x 3 x {args.size} x {args.size}; "
          f"warm-up {args.warmup}, timed {args.iters} (best)")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    results = []
    for case in cases(archs):
        r = measure(case, args.batch, args.size, args.warmup, args.iters)
        results.append(r)
        print(f"  {case.arch} w{case.width} {case.mode}: train {r.train_ips:.2f} img/s, "
              f"infer {r.infer_ips:.2f} img/s", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}; total {time.perf_counter() - start:.0f} s\n")
    print(table(results))


if __name__ == "__main__":
    main()
