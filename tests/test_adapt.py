"""Self-training on unlabeled smears (cli adapt): pseudo-labels per class, exact resume, guarded output folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bloodcells.classes import NUM_CLASSES
from bloodcells.errors import BloodcellsError
from bloodcells.segmenter.adapt import GROUP_OF, IGNORE, AdaptConfig, _Adapt, adapt, pseudo_labels
from bloodcells.segmenter.checkpoint import load_model
from bloodcells.segmenter.train import TrainConfig, state_digest, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A tiny composed set, a briefly trained width-4 U-Net with the distance output, and 4 'user' images."""
    from bloodcells.composer.dataset import compose, sprite_pools
    from bloodcells.composer.recipe import load_recipe
    from bloodcells.imageio import read_rgb, write_png

    root = tmp_path_factory.mktemp("adapt")
    r = load_recipe("tiny", {"scenes": {"train": 16, "val": 8, "test": 8}})
    pools, info = sprite_pools(None, r)
    compose(r, pools, root / "data", info, workers=1, progress=False)
    train(TrainConfig(data=str(root / "data"), out=str(root / "run"), width=4, epochs=1, steps_per_epoch=3,
                      batch_size=4, precision="fp32", progress=False))
    for i in range(4):  # the user's smears: larger than a window, at another magnification
        img = read_rgb(root / "data" / "test" / "images" / f"{i:06d}.png")
        write_png(root / "mine" / f"smear{i}.png", np.kron(img, np.ones((2, 2, 1), np.uint8))[:300, :260])
    return root


def config(root: Path, out: str, **kw) -> AdaptConfig:
    base = dict(model=str(root / "run" / "best.pt"), images=[str(root / "mine")], data=str(root / "data"),
                out=str(root / out), rounds=2, steps=4, batch=4, scale="0.5", tta=False, save_every=2,
                precision="fp32", progress=False, augment="geometric")
    return AdaptConfig(**{**base, **kw})


def test_pseudo_labels_keep_a_share_of_every_class():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(NUM_CLASSES), size=(2, 40, 50)).transpose(0, 3, 1, 2).astype(np.float32)
    probs[:, 9] += 2.0  # one class dominates: most pixels are predicted healthy_rbc, with high confidence
    probs /= probs.sum(axis=1, keepdims=True)
    labels, shares = pseudo_labels(list(probs), keep=0.5)
    argmax = probs.argmax(axis=1)
    for c in np.unique(argmax):
        predicted = argmax == c
        kept = np.stack(labels) == c
        assert (kept <= predicted).all()  # only a pixel's own argmax can be its pseudo-label
        assert abs(kept.sum() / predicted.sum() - 0.5) < 0.05  # every class keeps its own most confident half
    assert set(np.unique(np.stack(labels))) <= set(range(NUM_CLASSES)) | {IGNORE}
    assert shares["healthy_rbc"] > 0.9


def test_adapt_runs_writes_pseudo_labels_and_a_checkpoint(setting):
    s = adapt(config(setting, "a1"))
    out = setting / "a1"
    assert s["rounds"] == 2 and len(s["log"]) == 2 and Path(s["adapted"]) == out / "adapted.pt"
    for r in (0, 1):
        files = sorted((out / f"round-{r}").glob("*.png"))
        assert [f.stem for f in files] == [f"smear{i}" for i in range(4)]
    model, meta = load_model(out / "adapted.pt")
    before, _ = load_model(setting / "run" / "best.pt")
    assert meta["config"] == before.config and meta["adapted"]["rounds"] == 2
    assert "self-training on 4 unlabeled images, 2 round(s)" in (out / "adapted.md").read_text()
    assert state_digest(model) != state_digest(before)  # it learned something
    assert meta["adapted"]["anchor"] == "groups" and len(list((out / "groups").glob("*.png"))) == 4  # the default


def test_absent_classes_are_never_pseudo_labelled(setting):
    from bloodcells.classes import NAMES
    from bloodcells.imageio import read_gray
    adapt(config(setting, "free", rounds=1, steps=1))
    labels = np.stack([read_gray(f) for f in sorted((setting / "free" / "round-0").glob("*.png"))])
    n = np.bincount(labels[labels != IGNORE].ravel(), minlength=NUM_CLASSES)
    n[0] = 0
    absent = NAMES[int(n.argmax())]  # the cell class pseudo-labelled most without the option
    assert n.max() > 0
    adapt(config(setting, "held", rounds=1, steps=1, absent=absent))
    held = np.stack([read_gray(f) for f in sorted((setting / "held" / "round-0").glob("*.png"))])
    assert not (held == NAMES.index(absent)).any() and (held != IGNORE).any()
    assert f"{absent} never pseudo-labelled" in (setting / "held" / "adapted.md").read_text()
    with pytest.raises(BloodcellsError, match="unknown class"):
        adapt(config(setting, "bad", absent="plasmodium"))


def test_pseudo_labels_keep_only_the_anchored_group():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(NUM_CLASSES), size=(2, 40, 50)).transpose(0, 3, 1, 2).astype(np.float32)
    argmax = probs.argmax(axis=1)
    groups = [GROUP_OF[a] for a in argmax]
    for g in groups:
        g[:20] = (g[:20] + 1) % 4  # the top half: every pixel's class lies in another group than the anchor's
    labels, _ = pseudo_labels(list(probs), keep=0.5, groups=groups)
    labels = np.stack(labels)
    assert (labels[:, :20] == IGNORE).all()
    for c in np.unique(argmax):  # the share kept is a share of the pixels the anchor allows
        allowed = argmax[:, 20:] == c
        assert abs((labels[:, 20:] == c).sum() / allowed.sum() - 0.5) < 0.1


def test_anchor_groups_keeps_later_rounds_in_the_first_rounds_groups(setting, monkeypatch):
    from bloodcells.imageio import encode_png, read_gray, write_bytes_atomic
    original = _Adapt.train_round

    def background_on_top(self, r, images, labels):
        original(self, r, images, labels)
        if r == 0:  # say the starting model saw only background in the top half of every image
            for f in sorted((self.out / "groups").glob("*.png")):
                g = read_gray(f)
                g[: g.shape[0] // 2] = 0
                write_bytes_atomic(f, encode_png(g))

    monkeypatch.setattr(_Adapt, "train_round", background_on_top)
    s = adapt(config(setting, "anchored", anchor="groups"))
    out = setting / "anchored"
    assert sorted(f.stem for f in (out / "groups").glob("*.png")) == [f"smear{i}" for i in range(4)]
    first = [read_gray(f) for f in sorted((out / "round-0").glob("*.png"))]
    later = [read_gray(f) for f in sorted((out / "round-1").glob("*.png"))]
    top = np.concatenate([lab[: lab.shape[0] // 2].ravel() for lab in later])
    assert set(np.unique(top)) <= {0, IGNORE}  # no cell taught where the anchor holds background
    assert any((lab[: lab.shape[0] // 2] != 0)[lab[: lab.shape[0] // 2] != IGNORE].any() for lab in first)
    assert (np.concatenate([lab.ravel() for lab in later]) != IGNORE).any()
    for g, lab in zip(sorted((out / "groups").glob("*.png")), later):
        kept = lab != IGNORE
        assert (GROUP_OF[lab[kept]] == read_gray(g)[kept]).all()
    assert "each pixel's group kept from the first round" in (out / "adapted.md").read_text()
    run = object.__new__(_Adapt)  # the first round's groups read back: a missing or mismatched file is named
    run.cfg, run.out, run.stems = config(setting, "anchored", anchor="groups"), out, [f"smear{i}" for i in range(4)]
    probs = [np.zeros((NUM_CLASSES,) + read_gray(out / "groups" / f"smear{i}.png").shape) for i in range(4)]
    assert len(run.anchor_groups(1, probs)) == 4
    with pytest.raises(BloodcellsError, match="smear1.png: .* px, the image is"):
        run.anchor_groups(1, probs[:1] + [np.zeros((NUM_CLASSES, 3, 3))] * 3)
    (out / "groups" / "smear0.png").unlink()
    with pytest.raises(BloodcellsError, match="smear0.png: missing"):
        run.anchor_groups(1, probs)

def test_an_interrupted_run_continues_exactly(setting, monkeypatch):
    ref = adapt(config(setting, "ref"))
    calls = {"n": 0}
    original = _Adapt.train_round

    def stop_in_round_two(self, r, images, labels):
        if r == 1:
            calls["n"] += 1
            if calls["n"] == 1:
                self.cfg.steps = 3  # stop after step 3 of round 2; step 2's checkpoint is on disk
                try:
                    original(self, r, images, labels)
                finally:
                    self.cfg.steps = 4
                raise KeyboardInterrupt
        return original(self, r, images, labels)

    monkeypatch.setattr(_Adapt, "train_round", stop_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        adapt(config(setting, "cut"))
    monkeypatch.undo()
    again = adapt(config(setting, "cut"))
    a, _ = load_model(Path(ref["adapted"]))
    b, _ = load_model(Path(again["adapted"]))
    assert state_digest(a) == state_digest(b)


def test_out_folder_with_another_run_is_refused(setting):
    adapt(config(setting, "a2", rounds=1, steps=2))
    with pytest.raises(BloodcellsError, match=r"other settings \(keep: 0.5 there, 0.3 here\); give its settings"):
        adapt(config(setting, "a2", rounds=1, steps=2, keep=0.3))
    # a run recorded before the anchor was the default (no "anchor" in its settings) continues with --anchor none
    record = setting / "a2" / "adapt.json"
    state = json.loads(record.read_text())
    state["settings"].pop("anchor")
    record.write_text(json.dumps(state))
    with pytest.raises(BloodcellsError, match=r"\(anchor: none there, groups here\)"):
        adapt(config(setting, "a2", rounds=1, steps=2))
    assert adapt(config(setting, "a2", rounds=1, steps=2, anchor="none"))["rounds"] == 1
    (setting / "junk").mkdir()
    (setting / "junk" / "x.txt").write_text("x")
    with pytest.raises(BloodcellsError, match="not empty"):
        adapt(config(setting, "junk"))
    with pytest.raises(BloodcellsError, match="keep"):
        adapt(config(setting, "a3", keep=0.0))
    torch.set_num_threads(1)


def test_recalibrate_takes_the_images_own_statistics():
    """AdaBN: each batch-norm layer's running mean and variance become those of its input over the images' tiles."""
    from bloodcells.segmenter.adapt import batch_norms, recalibrate
    from bloodcells.segmenter.models import create_model

    torch.manual_seed(0)
    model = create_model("unet", width=4).eval()
    first = batch_norms(model)[0]
    seen = []
    hook = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    rng = np.random.default_rng(1)
    images = [np.clip(rng.normal(120 + 40 * k, 25, (224, 448, 3)), 0, 255).astype(np.uint8) for k in range(2)]
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    tiles = recalibrate(model, images, mean, std, batch=2, seed=0)  # 2 x 3 tiles (overlap 0.25), 3 batches of 2
    hook.remove()
    assert tiles == 6 and not model.training and first.momentum == 0.1
    x = torch.cat(seen)  # the first layer's inputs, whatever the other layers do
    assert x.shape[0] == 6
    assert torch.allclose(first.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    per_batch = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in seen])
    assert torch.allclose(first.running_var, per_batch.mean(0), rtol=1e-4)
    # the same images and seed give the same statistics; another seed batches the tiles otherwise
    again = create_model("unet", width=4)
    again.load_state_dict(model.state_dict())
    recalibrate(again, images, mean, std, batch=2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_source_share_mixes_training_and_image_statistics():
    """--source-share w: each layer's statistics are w * the training ones + (1 - w) * the images' own."""
    from bloodcells.segmenter.adapt import batch_norms, recalibrate
    from bloodcells.segmenter.models import create_model

    torch.manual_seed(0)
    trained = create_model("unet", width=4).eval()
    for bn in batch_norms(trained):  # training statistics unlike any the images give
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
    rng = np.random.default_rng(1)
    images = [np.clip(rng.normal(120, 25, (224, 224, 3)), 0, 255).astype(np.uint8) for _ in range(2)]
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    own, mixed = create_model("unet", width=4), create_model("unet", width=4)
    for m in (own, mixed):
        m.load_state_dict(trained.state_dict())
    recalibrate(own, images, mean, std, batch=2, seed=0)
    recalibrate(mixed, images, mean, std, batch=2, seed=0, source_share=0.25)
    for t, o, m in zip(batch_norms(trained), batch_norms(own), batch_norms(mixed)):
        assert torch.allclose(m.running_mean, 0.25 * t.running_mean + 0.75 * o.running_mean, atol=1e-6)
        assert torch.allclose(m.running_var, 0.25 * t.running_var + 0.75 * o.running_var, rtol=1e-5)
    assert not torch.allclose(batch_norms(own)[0].running_mean, batch_norms(mixed)[0].running_mean)


def test_stats_adapts_only_the_normalisation(setting):
    s = adapt(config(setting, "stats", method="stats", data=None))
    assert s["method"] == "stats" and s["images"] == 4 and s["tiles"] == 4  # one plasma-padded tile each
    model, meta = load_model(Path(s["adapted"]))
    before, _ = load_model(setting / "run" / "best.pt")
    a, b = before.state_dict(), model.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert meta["adapted"]["method"] == "stats" and meta["adapted"]["tiles"] == s["tiles"]
    # the same command again gives the same model; another method into the folder is refused
    assert state_digest(load_model(Path(adapt(config(setting, "stats", method="stats", data=None))["adapted"]))[0]) \
        == state_digest(model)
    with pytest.raises(BloodcellsError, match="other settings"):
        adapt(config(setting, "stats"))
    # self-training can start from it: the training settings it reads were kept
    adapt(config(setting, "stats-then-st", model=s["adapted"], rounds=1, steps=1))


def test_method_and_data_are_checked(setting):
    with pytest.raises(BloodcellsError, match="--method"):
        adapt(config(setting, "m1", method="tent"))
    with pytest.raises(BloodcellsError, match="--data is needed"):
        adapt(config(setting, "m2", data=None))
    with pytest.raises(BloodcellsError, match="--source-share"):
        adapt(config(setting, "m3", method="stats", data=None, source_share=1.0))
    with pytest.raises(BloodcellsError, match="--source-share 0.5: applies to --method stats only"):
        adapt(config(setting, "m4", source_share=0.5))
    with pytest.raises(BloodcellsError, match="--anchor groups: applies to self-training only"):
        adapt(config(setting, "m5", method="stats", data=None, anchor="groups"))
    with pytest.raises(BloodcellsError, match="--anchor cells: choose one of none, groups"):
        adapt(config(setting, "m6", anchor="cells"))


def test_cli_adapt_stats_needs_no_composed_scenes(setting):
    from typer.testing import CliRunner

    from bloodcells.cli import app

    r = CliRunner().invoke(app, ["adapt", "--model", str(setting / "run" / "best.pt"), "--images",
                                 str(setting / "mine"), "--out", str(setting / "cli-stats"), "--method", "stats",
                                 "--scale", "0.5", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "batch-norm statistics of 4 images (4 tiles)" in r.output
    assert (setting / "cli-stats" / "adapted.pt").is_file()
    card = (setting / "cli-stats" / "adapted.md").read_text()
    assert "## Adapted" in card and "batch-norm statistics" in card and "4 unlabeled images" in card
    r = CliRunner().invoke(app, ["adapt", "--model", str(setting / "run" / "best.pt"), "--images",
                                 str(setting / "mine"), "--out", str(setting / "cli-mix"), "--method", "stats",
                                 "--source-share", "0.5", "--scale", "0.5", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "mixed with 50% of the training statistics" in (setting / "cli-mix" / "adapted.md").read_text()


@pytest.mark.parametrize("arch", ["unet", "r2unet", "attention_unet", "unetpp", "resunet"])
def test_every_architecture_with_batch_norm_takes_new_statistics(arch):
    from bloodcells.segmenter.adapt import batch_norms, recalibrate
    from bloodcells.segmenter.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, width=4, instance="distance").eval()
    before = [bn.running_mean.clone() for bn in batch_norms(model)]
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert recalibrate(model, [image], [0.5] * 3, [0.25] * 3) == 1
    assert all(not torch.equal(b, bn.running_mean) for b, bn in zip(before, batch_norms(model)))
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 224, 224))
    out = out if isinstance(out, torch.Tensor) else out[0]
    assert torch.isfinite(out).all()


def test_an_architecture_without_batch_norm_is_named():
    """TernausNet's VGG11 encoder and decoder have no batch norm: the stats method says so instead of doing nothing."""
    from bloodcells.segmenter.adapt import recalibrate
    from bloodcells.segmenter.models import create_model

    image = np.zeros((224, 224, 3), np.uint8)
    with pytest.raises(BloodcellsError, match="no batch-normalisation layers.*--method self-training"):
        recalibrate(create_model("ternausnet", width=4), [image], [0.5] * 3, [0.25] * 3)


def test_an_image_whose_scale_cannot_be_measured_is_left_out_and_named(setting):
    """--scale auto: one crop around a lone cell (here a blank field) must not stop a lab's run; none measurable must."""
    from bloodcells.imageio import write_png
    mixed = setting / "mixed"
    for i in range(2):
        (mixed / f"smear{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (mixed / f"smear{i}.png").write_bytes((setting / "mine" / f"smear{i}.png").read_bytes())
    write_png(mixed / "blank.png", np.full((200, 200, 3), 230, np.uint8))
    s = adapt(config(setting, "auto", images=[str(mixed)], method="stats", data=None, scale="auto"))
    assert s["images"] == 2 and len(s["left_out"]) == 1 and "blank.png" in s["left_out"][0]
    # continued, it resizes each image as before and leaves the same one out, without measuring again
    again = adapt(config(setting, "auto", images=[str(mixed)], method="stats", data=None, scale="auto"))
    assert again["left_out"] == s["left_out"] and again["images"] == 2
    # a corrupt file is no unknown scale: it stops the run, named
    (setting / "broken").mkdir()
    (setting / "broken" / "cut.png").write_bytes(b"\x89PNG not an image")
    with pytest.raises(BloodcellsError, match="cut.png"):
        adapt(config(setting, "auto-broken", images=[str(mixed), str(setting / "broken")], method="stats", data=None,
                      scale="auto"))
    write_png(setting / "blank-only" / "blank.png", np.full((200, 200, 3), 230, np.uint8))
    with pytest.raises(BloodcellsError, match="--scale"):
        adapt(config(setting, "auto-none", images=[str(setting / "blank-only")], method="stats", data=None,
                      scale="auto"))
