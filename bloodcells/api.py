"""The Python API: load a model, predict an RGB array, compose a dataset, train, in a few calls.

    import bloodcells as bc
    model = bc.load_model("runs/unet/best.pt")
    result = bc.predict(model, rgb, scale="auto")     # result.labels, result.counts, result.scale
    bc.compose("tiny", "data/tiny")
    bc.train(data="data/tiny", out="runs/x", epochs=1)

Thin on purpose: each call is the library function the CLI uses (segmenter.predict.load_predictor,
segmenter.infer, segmenter.count, composer.dataset, segmenter.train), with the checks a Python caller needs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from bloodcells.classes import NAMES
from bloodcells.errors import BloodcellsError

if TYPE_CHECKING:  # torch loads only when a model does
    from torch import nn

    from bloodcells.segmenter.predict import Predictor


@dataclass
class Model:
    """A loaded checkpoint: the torch module (eval mode), its meta, and the settings `predict` uses."""

    path: Path
    predictor: Predictor = field(repr=False)

    @property
    def module(self) -> nn.Module:
        """The torch module, in eval mode."""
        return self.predictor.model

    @property
    def meta(self) -> dict[str, Any]:
        """config, classes, mean, std and what training recorded (epochs, history, dataset, cell_area ...)."""
        return self.predictor.meta

    @property
    def config(self) -> dict[str, Any]:
        """Architecture and its arguments (`create_model(**config)` rebuilds it)."""
        return self.meta["config"]

    @property
    def mean(self) -> tuple[float, float, float]:
        """Input normalisation: per-channel mean of RGB scaled to 0..1."""
        return tuple(self.meta["mean"])  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        """Input normalisation: per-channel std of RGB scaled to 0..1."""
        return tuple(self.meta["std"])  # type: ignore[return-value]

    @property
    def cell_area(self) -> dict[str, float]:
        """Expected px area of one cell per class at 40x, used to split touching cells when counting."""
        return {NAMES[k]: v for k, v in self.predictor.areas.items()}


@dataclass(kw_only=True)
class Result:
    """One image's prediction. Keyword-only with defaults after the first fields, so fields can be added freely."""

    labels: np.ndarray  # uint8 (H, W) class-index map at the input's own size
    counts: dict[str, int]  # cells per class name, in class-table order (background always 0)
    scale: float  # the factor the input was resized by to reach 40x
    rbc_diameter: float | None = None  # the RBC diameter (px) estimated for scale="auto"
    model_labels: np.ndarray | None = field(default=None, repr=False)  # the class map at model scale (40x)
    instances: np.ndarray | None = field(default=None, repr=False)  # int32 (H, W): k = cells[k - 1], 0 = no cell
    cells: list[dict] = field(default_factory=list, repr=False)  # one row per cell, the columns of <stem>_cells.csv
    rbc_total: int = 0  # red cells (healthy + infected)
    parasitemia_pct: float | None = None  # infected share of the red cells, %
    method: str = ""  # how touching cells were separated: the model's instance output, or 'area' (older models)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class index -> name, for reading `labels`."""
        return NAMES


def load_model(path: str | Path, device: str = "auto", data: str | Path | None = None, tile: int = 224,
               overlap: float = 0.25, batch: int = 8, precision: str = "auto", balance: bool = False,
               absent: str | Sequence[str] | None = None, sure_infected: float | None = None,
               join: bool | None = None, platelet_confidence: float | None = None) -> Model:
    """Load a checkpoint for prediction; the options are those of `cli predict` (README, 'Predicting'); `absent`:
    classes the smears are known not to hold (e.g. "infected_rbc"), never predicted; `sure_infected`: the least share
    of a red cell's probability that calls it infected (None: 0.6, `instances.SURE_INFECTED`; 0: by majority); `join`:
    join pieces of one cell (None: yes, `instances.MERGE`); `platelet_confidence`: platelets of a lower mean probability
    are dropped (None: 0.8, `instances.MIN_CONFIDENCE`; 0: none)."""
    from bloodcells.segmenter.predict import load_predictor

    return Model(Path(path), load_predictor(path, tile=tile, overlap=overlap, batch=batch, precision=precision,
                                            device=device, data=data, balance=balance, absent=absent,
                                            sure_infected=sure_infected, join=join,
                                            platelet_confidence=platelet_confidence))


def _check_image(image: Any) -> np.ndarray:
    """The image as an (H, W, 3) uint8 array, or one BloodcellsError saying what to change."""
    if isinstance(image, (str, Path)):
        from bloodcells.imageio import read_rgb

        return read_rgb(image)
    if not isinstance(image, np.ndarray):
        raise BloodcellsError(f"predict: expected an RGB image as a numpy array (H, W, 3) of uint8 or a file path, "
                              f"got {type(image).__name__}; convert it with numpy.asarray(...)")
    if image.dtype != np.uint8:
        raise BloodcellsError(f"predict: expected uint8 pixels 0..255, got {image.dtype}; convert with "
                              "(image * 255).round().astype(numpy.uint8) for 0..1 floats, or image.astype(numpy.uint8)")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise BloodcellsError(f"predict: got a grey image {image.shape}; the models need colour (stains tell cells "
                              "apart): pass an RGB array (H, W, 3)")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise BloodcellsError(f"predict: expected an RGB array (H, W, 3), got shape {image.shape}")
    if image.shape[2] == 4:
        raise BloodcellsError(f"predict: got 4 channels {image.shape}; drop the alpha channel with image[..., :3]")
    if min(image.shape[:2]) < 1:
        raise BloodcellsError(f"predict: the image is empty {image.shape}")
    return image


def predict(model: Model, image: np.ndarray | str | Path, scale: str | float = "auto") -> Result:
    """Class map, cell counts and scale of one RGB image (uint8 array (H, W, 3), or an image file)."""
    from bloodcells.segmenter.infer import parse_scale
    from bloodcells.segmenter.instances import cell_rows, rbc_summary

    if not isinstance(model, Model):
        raise BloodcellsError(f"predict: expected a Model from bloodcells.load_model(PATH), got {type(model).__name__}")
    rgb = _check_image(image)
    pred = model.predictor(rgb, parse_scale(scale))
    return Result(labels=pred.labels, counts=pred.counts, scale=pred.scale, rbc_diameter=pred.rbc_diameter,
                  model_labels=pred.model_labels, instances=pred.cells.instances, cells=cell_rows(pred.cells),
                  method=pred.method, **rbc_summary(pred.counts))


def compose(recipe: str | Path | Mapping[str, Any], out: str | Path, sprites: str | Path | None = None,
            workers: int = 1, seed: int | None = None, shard: str | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Compose a dataset from a recipe (a name in recipes/, a YAML path or a dict); sprites=None: the built-in
    ones. Returns the summary: scenes rendered, resumed, and `dataset` (dataset.json) once complete."""
    from bloodcells.composer.dataset import compose as compose_dataset
    from bloodcells.composer.dataset import parse_shard, sprite_pools
    from bloodcells.composer.recipe import load_recipe, validate

    overrides = {"seed": seed} if seed is not None else None
    if isinstance(recipe, Mapping):
        r = validate({**recipe, **(overrides or {})}, "recipe", stem=str(recipe.get("name") or "custom"))
    else:
        r = load_recipe(recipe, overrides)
    pools, info = sprite_pools(Path(sprites) if sprites is not None else None, r)
    return compose_dataset(r, pools, Path(out), info, workers=workers, shard=parse_shard(shard), progress=progress)


def train(data: str | Path | None = None, out: str | Path | None = None, resume: str | Path | None = None,
          **settings: Any) -> dict[str, Any]:
    """Train a segmenter (settings: the fields of segmenter.train.TrainConfig) or, with resume=RUN_DIR, continue
    one; returns the summary (best metrics, history, paths of best.pt and last.pt)."""
    from bloodcells.segmenter.train import TrainConfig, resume_config
    from bloodcells.segmenter.train import train as run_training

    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("data", "out", "resume")]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise BloodcellsError(f"train: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    if resume is not None:
        config = resume_config(resume, data=data, out=out, **settings)
    else:
        arch = settings.get("arch", "unet")
        config = TrainConfig(data=data, out=str(out or Path("runs") / arch), **settings)
    return run_training(config)
