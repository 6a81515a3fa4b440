"""ResUNet: the shared model checks plus the residual units' strided downsampling."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from bloodcells.segmenter.models import create_model
from bloodcells.segmenter.models.resunet import PointwiseDown, ResidualUnit

from .base import ModelTest

ROOT = Path(__file__).resolve().parents[2]


class TestResUNet(ModelTest):
    arch = "resunet"


def test_encoder_downsamples_by_strided_residual_units() -> None:
    model = create_model("resunet", width=4)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    unit = ResidualUnit(4, 8, stride=2)
    assert unit(torch.randn(1, 4, 32, 48)).shape == (1, 8, 16, 24)


def test_pointwise_down_equals_a_strided_1x1_convolution() -> None:
    torch.manual_seed(0)
    down = PointwiseDown(5, 7, stride=2)
    ref = torch.nn.Conv2d(5, 7, 1, stride=2, bias=False)
    ref.weight.data.copy_(down.weight.data)
    for h, w in ((32, 48), (33, 17)):
        x = torch.randn(2, 5, h, w)
        assert torch.allclose(down(x), ref(x), atol=1e-6)
    assert list(down.state_dict()) == ["weight"]  # checkpoints keep their keys


CHANNELS_LAST_TRAIN_STEP = """
import torch
from bloodcells.segmenter.models import create_model
torch.set_num_threads(1)
for width in (3, 5, 6, 7, 8, 12):
    torch.manual_seed(0)
    model = create_model("resunet", width=width).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    model(x).float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters()), width
print("ok")
"""


def test_channels_last_backward_survives_small_widths() -> None:
    # a strided 1x1 convolution's weight gradient in channels_last corrupted the heap on this CPU build of
    # torch for small channel counts; run it in a child so that a crash fails this test instead of pytest
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", CHANNELS_LAST_TRAIN_STEP], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
