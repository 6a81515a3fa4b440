"""Shared checks every architecture's test file inherits (smp's tests/models/base.py idea)."""
from __future__ import annotations

import json
from typing import Any, ClassVar

import torch

from bloodcells.classes import NUM_CLASSES
from bloodcells.segmenter.models import ARCHITECTURES, create_model


class ModelTest:
    """Subclass as `class TestX(ModelTest)` and set `arch` (and `kwargs` for extra options)."""

    arch: ClassVar[str]
    kwargs: ClassVar[dict[str, Any]] = {}
    width: ClassVar[int] = 4  # tiny, so the whole suite stays fast on two CPU cores

    def make(self, seed: int = 0, **overrides: Any) -> torch.nn.Module:
        """A freshly initialised small model of this architecture."""
        torch.manual_seed(seed)
        return create_model(self.arch, width=self.width, **{**self.kwargs, **overrides})

    def test_registered_with_config(self) -> None:
        model = self.make()
        assert ARCHITECTURES[self.arch] is type(model)
        assert model.config["arch"] == self.arch
        assert model.config["num_classes"] == NUM_CLASSES and model.config["width"] == self.width
        assert json.loads(json.dumps(model.config)) == model.config

    def test_forward_shape(self) -> None:
        model = self.make()
        y = model(torch.randn(2, 3, 32, 32))
        assert y.shape == (2, NUM_CLASSES, 32, 32)
        assert y.dtype == torch.float32 and torch.isfinite(y).all()

    def test_odd_sizes_divisible_by_16(self) -> None:
        model = self.make().eval()
        with torch.no_grad():
            for h, w in ((48, 80), (16, 16), (80, 48)):
                assert model(torch.randn(1, 3, h, w)).shape == (1, NUM_CLASSES, h, w)

    def test_other_channels_and_classes(self) -> None:
        model = self.make(in_channels=1, num_classes=3)
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3, 32, 32)

    def test_backward_finite_grads_on_all_params(self) -> None:
        model = self.make()
        y = model(torch.randn(2, 3, 32, 32))
        target = torch.randint(0, NUM_CLASSES, (2, 32, 32))
        torch.nn.functional.cross_entropy(y, target).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name} gets no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert any(p.grad.abs().sum() > 0 for p in model.parameters())

    def test_deterministic_given_seed(self) -> None:
        a, b = self.make(seed=3), self.make(seed=3)
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), name
        assert not torch.equal(next(self.make(seed=4).parameters()), next(a.parameters()))

    def test_state_dict_round_trip_via_config(self, tmp_path) -> None:
        model = self.make(seed=1)
        model(torch.randn(4, 3, 32, 32))  # one training step's forward moves the BN running stats
        model.eval()
        x = torch.randn(2, 3, 48, 32)
        with torch.no_grad():
            expected = model(x)
        path = tmp_path / "model.pt"
        torch.save({"config": model.config, "state_dict": model.state_dict()}, path)
        saved = torch.load(path, weights_only=True)
        torch.manual_seed(99)  # different init, so equality below comes from the loaded weights
        rebuilt = create_model(**saved["config"])
        assert type(rebuilt) is type(model) and rebuilt.config == model.config
        rebuilt.load_state_dict(saved["state_dict"])
        rebuilt.eval()
        with torch.no_grad():
            assert torch.equal(rebuilt(x), expected)

    def test_instance_output_adds_channels_after_the_classes(self) -> None:
        """Every architecture gets the instance output from the shared base: extra channels after the class logits,
        recorded in its config, trainable end to end."""
        for instance, extra in (("distance", 1), ("boundary", 1)):
            model = self.make(instance=instance)
            assert model.config["instance"] == instance and model.out_channels == NUM_CLASSES + extra
            y = model(torch.randn(2, 3, 32, 32))
            y = y if isinstance(y, torch.Tensor) else y[-1]
            assert y.shape == (2, NUM_CLASSES + extra, 32, 32)
            y[:, NUM_CLASSES:].sum().backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    def test_checkpoints_without_an_instance_output_still_build(self) -> None:
        """A config saved before the instance output existed (no 'instance' key) rebuilds a class-logits-only model
        whose weights load."""
        model = self.make()
        old = {k: v for k, v in model.config.items() if k != "instance"}
        rebuilt = create_model(**old)
        rebuilt.load_state_dict(model.state_dict())
        assert rebuilt.out_channels == NUM_CLASSES and rebuilt.config["instance"] is None
