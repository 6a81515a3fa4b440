"""Model cards beside checkpoints: written with them, filled in by evaluate / evaluate-real, dropped results when
the weights change."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bloodcells.formats import read_json
from bloodcells.imageio import write_png
from bloodcells.segmenter.card import card_path, render_card
from bloodcells.segmenter.checkpoint import load_model, save_checkpoint
from bloodcells.segmenter.evaluate import evaluate
from bloodcells.segmenter.models import create_model
from bloodcells.segmenter.realeval import evaluate_real
from bloodcells.segmenter.train import TrainConfig, resume_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(scenes, tmp_path_factory) -> tuple[Path, dict]:
    """One short epoch of a width-8 U-Net on the tiny scenes."""
    cfg = TrainConfig(data=scenes, out=tmp_path_factory.mktemp("runs") / "unet", width=8, epochs=1, steps_per_epoch=2,
                      batch_size=4, dice_weight=0.5, precision="fp32", progress=False)
    return Path(cfg.out), train(cfg)


def voc_of(scenes: Path, root: Path) -> Path:
    """A Pascal VOC folder holding one composed test scene and the boxes of its objects."""
    ann = read_json(scenes / "test" / "annotations" / "000000.json")
    names = {"healthy_rbc": "RBC", "infected_rbc": "RBC", "thrombocyte": "Platelets", "platelet_clump": "Platelets"}
    objects = "".join(
        f"<object><name>{names.get(o['class'], 'WBC')}</name><bndbox><xmin>{o['bbox'][0]}</xmin>"
        f"<ymin>{o['bbox'][1]}</ymin><xmax>{o['bbox'][2]}</xmax><ymax>{o['bbox'][3]}</ymax></bndbox></object>"
        for o in ann["objects"])
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "s0.xml").write_text(f"<annotation><filename>s0.png</filename>{objects}</annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("s0\n")
    from bloodcells.imageio import read_rgb

    write_png(root / "JPEGImages" / "s0.png", read_rgb(scenes / "test" / "images" / "000000.png"))
    return root


def test_card_written_with_each_checkpoint(run, scenes):
    out, summary = run
    best, last = card_path(out / "best.pt"), card_path(out / "last.pt")
    assert best == out / "best.md" and best.is_file() and last.is_file()
    text = best.read_text()
    model, meta = load_model(out / "best.pt")
    dataset = read_json(scenes / "dataset.json")
    assert "`unet`, width 8" in text
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in text
    assert f"| dataset folder | `{scenes}` |" in text and "| recipe | `tiny` |" in text and "| seed | 0 |" in text
    assert "| scenes | train 48, val 16, test 16 |" in text
    assert f"| sprite bank id | `{dataset['sprites']['id']}` |" in text
    n_builtin = dataset["sprites"]["sources"]["builtin"]["sprites"]
    assert f"| builtin | {n_builtin} | MIT (procedural sprites drawn by this project) |" in text
    assert "+ 0.5 x soft Dice" in text and "| epochs | 1 of 1 |" in text
    assert ("| augmentation | flips and quarter turns; scale 0.7-1.4x; stain, colour, blur, noise and JPEG on the fly "
            "(HED stain range 0.05; hue turn up to 5 degrees in 30% of samples) |") in text  # the default, --augment full
    b = summary["best"]
    assert f"Epoch 1: pixel accuracy {b['pixel_accuracy']:.3f}, mIoU {b['miou']:.3f}" in text
    assert "Not evaluated yet: `cli evaluate --model best.pt" in text and "Not evaluated yet: `cli evaluate-real" in text
    assert "Not for diagnosis" in text and "Trained on synthetic scenes only" in text
    assert "procedural drawings" in text  # trained on the built-in sprites
    assert meta["dataset"]["recipe"] == "tiny"  # the facts travel in the checkpoint, not only in the card
    assert not list(out.glob(".*.tmp"))


def test_evaluations_fill_the_card_until_the_weights_change(run, scenes, tmp_path):
    out, _ = run
    m = evaluate(out / "last.pt", scenes, "test", out=tmp_path / "eval")
    text = card_path(out / "last.pt").read_text()
    assert f"`{scenes}`, split `test` (16 scenes): pixel accuracy {m['pixel_accuracy']:.3f}, mIoU {m['miou']:.3f}" in text
    assert "Not evaluated yet: `cli evaluate --model" not in text
    assert "Not evaluated yet: `cli evaluate --model" in card_path(out / "best.pt").read_text()  # only its own card
    voc = voc_of(scenes, tmp_path / "voc")
    r = evaluate_real(out / "last.pt", voc, split="test", scale=1.0, out=tmp_path / "real", progress=False)
    text = card_path(out / "last.pt").read_text()
    rbc = r["groups"]["rbc"]
    assert rbc["gt"] > 0
    assert (f"| rbc | {rbc['gt']} | {rbc['tp']} | {rbc['fp']} | {rbc['fn']} |") in text
    assert f"`{voc}`, split `test` (1 smears, scale 1.0, IoU >= 0.3)" in text
    assert "pixel accuracy" in text.split("## Real smears")[0].split("## Synthetic test scenes")[1]  # both kept
    # the evaluations live in the sidecar JSON beside the checkpoint
    assert len(read_json(out / "last.json")["evaluations"]) == 2
    # new weights: the card describes them and no longer shows the old numbers
    train(resume_config(out, epochs=2))
    text = card_path(out / "last.pt").read_text()
    assert "| epochs | 2 of 2 |" in text and "Not evaluated yet: `cli evaluate --model last.pt" in text
    assert "evaluations" not in read_json(out / "last.json")


def test_card_of_a_bare_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("resunet", width=4)
    save_checkpoint(tmp_path / "m.pt", model, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], meta={})
    text = (tmp_path / "m.md").read_text()
    assert "# Model card: m.pt" in text and "`resunet`, width 4" in text
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in text
    assert "mean (0.500, 0.500, 0.500), divided by std (0.250, 0.250, 0.250)" in text
    assert "Not recorded (the checkpoint was not written by `cli train`)" in text
    assert "No validation yet" in text and "## Training\n" not in text


def test_card_lists_bank_sources_with_licences():
    meta = {"data": "data/b", "dataset": {"folder": "data/b", "recipe": "balanced", "seed": 7,
                                           "counts": {"train": 10, "val": 2, "test": 2},
                                           "sprites": {"bank": "sprites", "id": "abc123", "kind": "sprite bank",
                                                       "sources": {"kaggle:cell_images": {
                                                           "licence": "MIT | data: NIH", "from": "/d/SOURCE.txt",
                                                           "sprites": 790}}}}}
    text = render_card("best.pt", {"config": {"arch": "unet", "num_classes": 10, "width": 32}, "meta": meta}, 5)
    assert "| kaggle:cell_images | 790 | MIT \\| data: NIH | /d/SOURCE.txt |" in text
    assert "| sprites | sprite bank `sprites` |" in text and "| recipe | `balanced` |" in text
    assert "procedural drawings" not in text
    assert json.loads(json.dumps(meta)) == meta  # rendering never changes the facts
