"""Training, checkpoints, exact resume, evaluation, DDP and the CLI on a tiny synthetic dataset (~64x64 scenes)."""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import signal
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from bloodcells.classes import NAMES, NUM_CLASSES
from bloodcells.errors import BloodcellsError
from bloodcells.formats import DatasetInfo, read_json, write_json
from bloodcells.imageio import write_png
from bloodcells.segmenter.charts import confusion_heatmap, nice_ticks, training_curves
from bloodcells.segmenter.checkpoint import load_checkpoint, load_model
from bloodcells.segmenter.data import EpochSampler, SegmentationDataset, flip_rotate, to_tensor
from bloodcells.segmenter.evaluate import evaluate, format_table
from bloodcells.segmenter.losses import class_weights_from_frequencies
from bloodcells.segmenter.runtime import cpu_bf16_supported, resolve_precision
from bloodcells.segmenter.train import TIMING_KEYS, TrainConfig, parse_milestones, resume_config, train

# one clearly distinct colour per class, so a small U-Net learns the task in a few hundred steps
COLORS = np.array([(235, 215, 215), (230, 120, 60), (60, 40, 140), (200, 150, 200), (110, 70, 170),
                   (150, 150, 230), (250, 230, 60), (90, 200, 90), (200, 40, 40), (240, 160, 150)], np.float32)


def scene(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A noisy background with 3-5 disks / squares, each of a random non-background class."""
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(3, 6)):
        c = int(rng.integers(1, NUM_CLASSES))
        x, y = (int(v) for v in rng.integers(8, size - 8, 2))
        r = int(rng.integers(5, 11))
        if rng.random() < 0.5:
            cv2.circle(label, (x, y), r, c, -1)
        else:
            cv2.rectangle(label, (x - r, y - r), (x + r, y + r), c, -1)
    image = COLORS[label] + rng.normal(0, 6, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_dataset(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """Write scenes and dataset.json in the composer's on-disk format."""
    rng = np.random.default_rng(seed)
    freq = np.zeros(NUM_CLASSES)
    pixels = []
    for split, n in counts.items():
        for i in range(n):
            image, label = scene(rng)
            write_png(root / split / "images" / f"{i:06d}.png", image)
            write_png(root / split / "labels" / f"{i:06d}.png", label)
            if split == "train":
                freq += np.bincount(label.ravel(), minlength=NUM_CLASSES)
                pixels.append(image.reshape(-1, 3) / 255.0)
    px = np.concatenate(pixels)
    write_json(root / "dataset.json", {
        "seed": seed, "counts": counts, "classes": list(NAMES),
        "class_frequencies": (freq / freq.sum()).tolist(),
        "class_weights": class_weights_from_frequencies(freq).tolist(),
        "mean": px.mean(axis=0).tolist(), "std": px.std(axis=0).tolist()})
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"), {"train": 32, "val": 8, "test": 8})


def small(data: Path, out: Path, **kw) -> TrainConfig:
    """A fast fp32 config: U-Net width 8, 4 steps per epoch."""
    base = dict(data=data, out=out, width=8, epochs=4, batch_size=8, lr=1e-2, milestones=(2,), precision="fp32",
                progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


@pytest.fixture(scope="module")
def overfit(data, tmp_path_factory) -> tuple[TrainConfig, dict]:
    """Weighted CE + Dice, 25 epochs of 8 steps (~5 s): the run the checkpoint and evaluation tests read."""
    cfg = TrainConfig(data=data, out=tmp_path_factory.mktemp("runs") / "unet", width=8, epochs=25, batch_size=4,
                      lr=1e-2, milestones=(20,), dice_weight=1.0, precision="fp32", progress=False, seed=0,
                      augment="geometric")  # learning a tiny set by heart: no appearance or scale changes
    return cfg, train(cfg)


# ---- training ---------------------------------------------------------------------------

def test_overfits_tiny_set(overfit) -> None:
    _, s = overfit
    history = s["history"]
    assert len(history) == 25 and s["global_step"] == 25 * 8 and s["stopped"] is None
    assert s["best"]["pixel_accuracy"] > 0.95
    assert history[-1]["pixel_accuracy"] > 0.95 and history[-1]["miou"] > 0.8
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 5
    assert [r["lr"] for r in history] == pytest.approx([1e-2] * 20 + [1e-3] * 5)  # MultiStepLR after epoch 20


def test_best_and_last_checkpoints_with_json(overfit, data) -> None:
    cfg, s = overfit
    out = Path(cfg.out)
    for name in ("best.pt", "last.pt", "best.json", "last.json", "history.csv", "curves.png"):
        assert (out / name).is_file(), name
    info = DatasetInfo.read(data)
    last, best = read_json(out / "last.json"), read_json(out / "best.json")
    accs = [r["pixel_accuracy"] for r in s["history"]]
    best_epoch = int(np.argmax(accs)) + 1  # first epoch with the highest accuracy
    assert last["epoch"] == 25 and last["batch_size"] == 4 and last["lr"] == pytest.approx(1e-3)
    assert last["mean"] == pytest.approx(info.mean) and last["std"] == pytest.approx(info.std)
    assert last["best"]["epoch"] == best_epoch and last["best"]["pixel_accuracy"] == max(accs)
    assert last["best"]["val_loss"] == s["history"][best_epoch - 1]["val_loss"]
    assert len(last["history"]) == 25 and last["history"] == s["history"]
    assert best["epoch"] == best_epoch and len(best["history"]) == best_epoch
    assert last["config"] == {"arch": "unet", "num_classes": 10, "in_channels": 3, "width": 8, "instance": None}

    payload = load_checkpoint(out / "last.pt")
    assert [c["name"] for c in payload["classes"]] == list(NAMES)
    state = payload["training"]
    assert state["epoch"] == 25 and state["global_step"] == 200 and state["step_in_epoch"] == 0
    assert {"optimizer", "scheduler", "rng"} <= set(state) and {"torch", "numpy", "python", "loader"} <= set(state["rng"])
    assert TrainConfig.from_dict(state["config"]) == cfg

    model, meta = load_model(out / "best.pt")
    assert not model.training and meta["config"]["width"] == 8 and meta["mean"] == pytest.approx(info.mean)
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 25 and float(rows[-1]["pixel_accuracy"]) == pytest.approx(accs[-1])
    assert float(rows[0]["iou_background"]) == pytest.approx(s["history"][0]["per_class_iou"][0])
    curves = cv2.imread(str(out / "curves.png"))
    assert curves.shape == (360, 960, 3) and len(np.unique(curves.reshape(-1, 3), axis=0)) > 20


def test_resume_after_epoch_k_equals_uninterrupted(data, tmp_path) -> None:
    whole = train(small(data, tmp_path / "whole"))
    train(small(data, tmp_path / "split", epochs=2))
    resumed = train(resume_config(tmp_path / "split", epochs=4))
    assert resumed["state_digest"] == whole["state_digest"]  # bit-identical weights and BN statistics
    assert without_timing(resumed["history"]) == without_timing(whole["history"])
    assert resumed["best"] == whole["best"] and resumed["global_step"] == whole["global_step"] == 16
    a = load_checkpoint(tmp_path / "whole" / "last.pt")["training"]["optimizer"]["state"]
    b = load_checkpoint(tmp_path / "split" / "last.pt")["training"]["optimizer"]["state"]
    assert all(torch.equal(a[k]["exp_avg_sq"], b[k]["exp_avg_sq"]) for k in a)


def test_interrupt_mid_epoch_saves_last_and_resumes_exactly(data, tmp_path) -> None:
    whole = train(small(data, tmp_path / "whole"))

    def ctrl_c(step: int, epoch: int) -> None:
        if step == 6:  # the 2nd of epoch 2's 4 steps
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(small(data, tmp_path / "cut"), step_hook=ctrl_c)
    last = read_json(tmp_path / "cut" / "last.json")
    assert last["stopped"] == "interrupted" and last["global_step"] == 6
    assert last["epoch"] == 1 and last["step_in_epoch"] == 2 and len(last["history"]) == 1
    # resume with DataLoader workers: the batches do not depend on them
    resumed = train(resume_config(tmp_path / "cut", workers=2))
    assert resumed["state_digest"] == whole["state_digest"]
    assert without_timing(resumed["history"]) == without_timing(whole["history"])


def test_raw_keyboard_interrupt_and_time_budget_keep_a_resumable_state(data, tmp_path) -> None:
    whole = train(small(data, tmp_path / "whole", epochs=2))

    def interrupt(step: int, epoch: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small(data, tmp_path / "raw", epochs=2), step_hook=interrupt)
    assert read_json(tmp_path / "raw" / "last.json")["global_step"] == 3
    assert train(resume_config(tmp_path / "raw"))["state_digest"] == whole["state_digest"]

    stopped = train(small(data, tmp_path / "budget", epochs=2, max_minutes=1e-6))
    assert stopped["stopped"] == "time budget" and stopped["global_step"] == 1 and stopped["history"] == []
    assert load_checkpoint(tmp_path / "budget" / "last.pt")["training"]["step_in_epoch"] == 1
    resumed = train(resume_config(tmp_path / "budget"))  # the budget is not inherited
    assert resumed["stopped"] is None and resumed["state_digest"] == whole["state_digest"]


def test_resume_refuses_changed_settings_and_missing_runs(data, tmp_path) -> None:
    train(small(data, tmp_path / "run", epochs=1, steps_per_epoch=1))
    with pytest.raises(BloodcellsError, match="lr=0.01, not 0.5"):
        train(resume_config(tmp_path / "run", lr=0.5))
    with pytest.raises(BloodcellsError, match="no such checkpoint"):
        resume_config(tmp_path / "nothing")


def test_tied_class_weights_are_used_recorded_and_checked(data, tmp_path) -> None:
    from bloodcells.segmenter.checkpoint import load_checkpoint
    train(small(data, tmp_path / "tied", epochs=1, steps_per_epoch=1, tie_weights="infected_rbc, healthy_rbc"))
    payload = load_checkpoint(tmp_path / "tied" / "last.pt")
    w = payload["training"]["class_weights"]
    i, h = NAMES.index("infected_rbc"), NAMES.index("healthy_rbc")
    info = DatasetInfo.read(data)
    assert w[i] == pytest.approx(w[h]) and info.loss_weights()[i] != pytest.approx(info.loss_weights()[h])
    f = info.class_frequencies
    assert w[i] == pytest.approx(float(np.median([x for x in f if x > 0])) / (f[i] + f[h]), rel=1e-5)
    assert payload["training"]["config"]["tie_weights"] == ["infected_rbc", "healthy_rbc"]
    assert "one weight for infected_rbc and healthy_rbc" in (tmp_path / "tied" / "last.md").read_text()
    for bad, msg in (("infected_rbc,nope", "unknown class 'nope'"), ("healthy_rbc", "two or more")):
        with pytest.raises(BloodcellsError, match=msg):
            small(data, tmp_path / "x", tie_weights=bad)


def test_training_into_a_run_folder_resumes_it_refuses_other_settings_or_starts_over_with_force(data, tmp_path) -> None:
    out = tmp_path / "run"
    first = train(small(data, out, epochs=1, steps_per_epoch=1))
    assert first["resumed"] is False and first["global_step"] == 1
    best = (out / "best.pt").read_bytes()
    # the same command again (a longer budget of epochs) continues the run instead of starting over
    again = train(small(data, out, epochs=2, steps_per_epoch=1))
    assert again["resumed"] is True and again["global_step"] == 2 and len(again["history"]) == 2
    assert again["history"][0] == first["history"][0]
    kept = (out / "last.pt").read_bytes(), (out / "best.pt").read_bytes(), (out / "history.csv").read_bytes()
    # best.pt is the better of the two epochs, whichever run wrote it
    accs = [r["pixel_accuracy"] for r in again["history"]]
    assert read_json(out / "best.json")["epoch"] == int(np.argmax(accs)) + 1
    assert (kept[1] == best) == (accs[1] <= accs[0])
    # other settings are refused and nothing in the folder changes
    for changed, message in (({"width": 4}, "width=8, not 4"), ({"lr": 0.5}, "lr=0.01, not 0.5"),
                             ({"data": tmp_path / "elsewhere"}, "data=")):
        with pytest.raises(BloodcellsError, match=message):
            train(dataclasses.replace(small(data, out, epochs=2, steps_per_epoch=1), **changed))
    assert ((out / "last.pt").read_bytes(), (out / "best.pt").read_bytes(),
            (out / "history.csv").read_bytes()) == kept
    # --force starts a new run there, and no file of the old run survives (stopped before its first
    # validation, the new run has no best.pt yet)
    fresh = train(small(data, out, epochs=1, steps_per_epoch=2, width=4, max_minutes=1e-6), force=True)
    assert fresh["resumed"] is False and fresh["global_step"] == 1 and fresh["stopped"] == "time budget"
    assert sorted(p.name for p in out.iterdir()) == ["last.json", "last.md", "last.pt"]
    assert load_checkpoint(out / "last.pt")["config"]["width"] == 4
    with pytest.raises(BloodcellsError, match="only one of them"):
        train(resume_config(out), force=True)


def test_resume_takes_a_run_folder_or_its_last_pt(data, tmp_path) -> None:
    out = tmp_path / "run"
    train(small(data, out, epochs=1, steps_per_epoch=1))
    cfg = resume_config(out / "last.pt", epochs=2)
    assert cfg.resume == str(out) and cfg.out == str(out)
    assert train(cfg)["global_step"] == 2
    with pytest.raises(BloodcellsError, match="a run folder or its last.pt"):
        resume_config(out / "best.pt")


def test_auto_precision_trains_with_bf16_where_supported(data, tmp_path) -> None:
    s = train(small(data, tmp_path / "auto", precision="auto", epochs=3))
    assert s["precision"] == ("bf16" if cpu_bf16_supported() else "fp32")
    assert all(math.isfinite(r["train_loss"]) for r in s["history"])
    assert s["history"][-1]["train_loss"] < s["history"][0]["train_loss"]
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(BloodcellsError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))


# ---- evaluation -------------------------------------------------------------------------

def test_evaluate_writes_files_and_matches_direct_computation(overfit, data, tmp_path) -> None:
    cfg, _ = overfit
    result = evaluate(Path(cfg.out) / "best.pt", data, "test", tmp_path / "eval", precision="fp32")
    for name in ("metrics.json", "confusion.csv", "confusion.png"):
        assert (tmp_path / "eval" / name).is_file()

    # the same numbers straight from the files with numpy, one image at a time
    model, meta = load_model(Path(cfg.out) / "best.pt")
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for img_path in sorted((data / "test" / "images").glob("*.png")):
        image = cv2.cvtColor(cv2.imread(str(img_path)), cv2.COLOR_BGR2RGB)
        label = cv2.imread(str(data / "test" / "labels" / img_path.name), cv2.IMREAD_UNCHANGED)
        x = (image / 255.0 - np.array(meta["mean"])) / np.array(meta["std"])
        with torch.no_grad():
            pred = model(torch.from_numpy(x.transpose(2, 0, 1)[None]).float()).argmax(1)[0].numpy()
        counts += np.bincount(label.ravel() * NUM_CLASSES + pred.ravel(), minlength=NUM_CLASSES ** 2).reshape(
            NUM_CLASSES, NUM_CLASSES)
    tp, true, predicted = np.diag(counts), counts.sum(1), counts.sum(0)
    # batched channels_last convolutions may round differently: allow a handful of near-tie pixels
    assert np.abs(np.array(result["confusion"]) - counts).sum() <= 0.001 * counts.sum()
    assert result["pixel_accuracy"] == pytest.approx(tp.sum() / counts.sum(), abs=1e-3)
    assert result["miou"] == pytest.approx(np.mean(tp / (true + predicted - tp)), abs=2e-3)
    assert [r["pixel_share"] for r in result["table"]] == pytest.approx(true / true.sum(), abs=1e-4)
    assert [r["accuracy"] for r in result["table"]] == pytest.approx(tp / true, abs=5e-3)

    saved = read_json(tmp_path / "eval" / "metrics.json")
    assert saved["pixel_accuracy"] == result["pixel_accuracy"] and saved["images"] == 8
    with open(tmp_path / "eval" / "confusion.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == list(NAMES) and [r[0] for r in rows[1:]] == list(NAMES)
    assert np.array([[int(v) for v in r[1:]] for r in rows[1:]]).tolist() == result["confusion"]
    heat = cv2.imread(str(tmp_path / "eval" / "confusion.png"))
    assert heat.ndim == 3 and heat.shape[0] > 10 * 40 and heat.shape[1] > 10 * 40
    text = format_table(result)
    assert all(n in text for n in NAMES) and "pixel accuracy" in text


# ---- data -------------------------------------------------------------------------------

def test_dataset_normalises_caches_and_augments_consistently(data) -> None:
    info = DatasetInfo.read(data)
    plain = SegmentationDataset(data, "train", cache=False)
    cached = SegmentationDataset(data, "train", cache=True)
    assert not plain.cached and cached.cached and len(plain) == 32
    image, label, _ = plain.raw(5)
    x, y = plain[5]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.long
    expected = (image / 255.0 - np.array(info.mean)) / np.array(info.std)
    assert np.allclose(x.numpy().transpose(1, 2, 0), expected, atol=1e-5)
    assert torch.equal(cached[5][0], x) and torch.equal(cached[5][1], y)

    aug = SegmentationDataset(data, "train", augment=True, seed=1, cache=True)
    codes = set()
    for i in range(len(aug)):
        xa, ya = aug[i]
        xr, yr = to_tensor(aug.raw(i)[0], aug.mean, aug.std), torch.from_numpy(aug.raw(i)[1]).long()
        match = [c for c in range(8) if torch.equal(flip_rotate(xr, yr, c)[1], ya)
                 and torch.equal(flip_rotate(xr, yr, c)[0], xa)]
        assert match, f"sample {i}: the image and its label were not transformed together"
        codes.add(match[0])
    assert len(codes) >= 4  # several of the 8 flips / turns occur
    again = [aug[i][1] for i in range(4)]
    aug.set_epoch(1)
    assert all(torch.equal(a, aug2) for a, aug2 in zip(again, [SegmentationDataset(data, "train", augment=True,
                                                                                   seed=1)[i][1] for i in range(4)]))
    assert not all(torch.equal(a, aug[i][1]) for i, a in enumerate(again))  # another epoch, other draws


def test_epoch_sampler_is_a_seeded_permutation_split_over_ranks() -> None:
    s = EpochSampler(10, seed=4)
    s.set_epoch(2)
    order = list(s)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    s.set_epoch(2, start=3)
    assert list(s) == order[3:] and len(s) == 7
    ranks = [EpochSampler(10, seed=4, rank=r, world=3) for r in range(3)]
    for r in ranks:
        r.set_epoch(2)
    shares = [list(r) for r in ranks]
    assert all(len(sh) == 4 for sh in shares) and set(sum(shares, [])) == set(range(10))


def test_clear_errors_for_broken_datasets(data, tmp_path) -> None:
    with pytest.raises(BloodcellsError, match="dataset.json: not found"):
        SegmentationDataset(tmp_path / "absent", "train")
    with pytest.raises(BloodcellsError, match="dataset.json: not found"):
        train(small(tmp_path / "absent", tmp_path / "run"))
    broken = make_dataset(tmp_path / "broken", {"train": 3, "val": 2})
    with pytest.raises(BloodcellsError, match=r"test/images: missing; the dataset has no 'test' split"):
        SegmentationDataset(broken, "test")

    bad_image = broken / "train" / "images" / "000001.png"
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(BloodcellsError, match=r"000001.png: not a readable image"):
        SegmentationDataset(broken, "train", cache=True)
    lazy = SegmentationDataset(broken, "train", cache=False)
    lazy[0]
    with pytest.raises(BloodcellsError, match=r"images/000001.png: not a readable image"):
        lazy[1]

    write_png(broken / "val" / "labels" / "000000.png", np.full((64, 64), 12, np.uint8))
    with pytest.raises(BloodcellsError, match=r"val/labels/000000.png: holds class index 12"):
        SegmentationDataset(broken, "val", cache=True)
    write_png(broken / "val" / "labels" / "000000.png", np.zeros((32, 64), np.uint8))
    with pytest.raises(BloodcellsError, match=r"000000.png: label is 64x32 but its image is 64x64"):
        SegmentationDataset(broken, "val", cache=True)
    (broken / "val" / "labels" / "000001.png").unlink()
    with pytest.raises(BloodcellsError, match="missing label for image 000001"):
        SegmentationDataset(broken, "val")


def test_clear_errors_for_missing_or_corrupt_checkpoints(tmp_path) -> None:
    with pytest.raises(BloodcellsError, match="no such checkpoint"):
        load_model(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(BloodcellsError, match="not a readable checkpoint"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(BloodcellsError, match="not a bloodcells checkpoint"):
        load_model(tmp_path / "foreign.pt")


def test_charts_and_milestones() -> None:
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 97)[0] <= 3 and nice_ticks(3, 97)[-1] >= 97
    row = {"epoch": 1, "train_loss": 1.0, "val_loss": float("nan"), "pixel_accuracy": 0.5, "miou": 0.2,
           "mean_dice": 0.3}
    assert training_curves([row, {**row, "epoch": 2, "val_loss": 0.5}]).shape == (360, 960, 3)
    heat = confusion_heatmap(np.diag(np.arange(NUM_CLASSES)), NAMES)  # row 0 is empty: drawn grey, no crash
    assert heat.dtype == np.uint8 and heat.shape[2] == 3
    assert parse_milestones("5, 8") == (5, 8) and parse_milestones("") == ()
    with pytest.raises(BloodcellsError):
        parse_milestones("8,5")


# ---- DDP --------------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, port: int, data: str, out: str, results) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    s = train(TrainConfig(data=data, out=out, width=4, epochs=1, batch_size=4, steps_per_epoch=3,
                          precision="fp32", progress=False))
    results[rank] = {k: s[k] for k in ("state_digest", "history", "global_step", "world_size", "best")}


def test_ddp_two_gloo_processes_agree_and_rank0_writes(data, tmp_path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, str(data), str(tmp_path / "ddp"), results), nprocs=2)
    r0, r1 = results[0], results[1]
    assert r0["world_size"] == 2 and r0["global_step"] == 3
    assert r0["state_digest"] == r1["state_digest"]  # same weights and batch-norm statistics on both ranks
    # metrics are reduced over both ranks' validation shards
    assert without_timing(r0["history"]) == without_timing(r1["history"]) and r0["best"] == r1["best"]
    last = read_json(tmp_path / "ddp" / "last.json")
    assert last["world_size"] == 2 and last["epoch"] == 1 and last["val_images"] == 8
    model, _ = load_model(tmp_path / "ddp" / "last.pt")
    from bloodcells.segmenter.train import state_digest
    assert state_digest(model) == r0["state_digest"]


# ---- CLI --------------------------------------------------------------------------------

def test_cli_train_resume_evaluate(data, tmp_path) -> None:
    from bloodcells.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    common = ["--width", "4", "--steps-per-epoch", "2", "--precision", "fp32", "--no-progress"]
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--epochs", "1", *common])
    assert r.exit_code == 0, r.output
    assert "1/1 epochs, 2 steps" in r.output and "cli evaluate --model" in r.output
    r = runner.invoke(app, ["train", "--resume", str(out), "--epochs", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "2/2 epochs, 4 steps" in r.output and read_json(out / "last.json")["global_step"] == 4
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--epochs", "2", *common, "--width", "8"])
    assert isinstance(r.exception, BloodcellsError) and "width=4, not 8" in str(r.exception)
    assert "--force" in str(r.exception) and read_json(out / "last.json")["global_step"] == 4
    r = runner.invoke(app, ["evaluate", "--model", str(out / "best.pt"), "--data", str(data), "--split", "val",
                            "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    assert "healthy_rbc" in r.output and (out / "best-val" / "metrics.json").is_file()
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x"), *common])
    assert isinstance(r.exception, BloodcellsError) and "dataset.json: not found" in str(r.exception)


def test_full_augmentation_is_seeded_and_resumes_exactly(tmp_path) -> None:
    """--augment full (appearance and scale on the fly) with the instance output, on composed scenes: a run
    stopped mid-epoch and resumed ends bit-identical to an uninterrupted one, and the samples of an epoch do not
    depend on the order they are asked for."""
    from bloodcells.composer.dataset import compose, sprite_pools
    from bloodcells.composer.recipe import load_recipe

    r = load_recipe("tiny", {"scenes": {"train": 16, "val": 4, "test": 0}})
    pools, info = sprite_pools(None, r)
    compose(r, pools, tmp_path / "d", info, workers=1, progress=False)
    cfg = dict(epochs=2, batch_size=4, augment="full", instance="auto")
    whole = train(small(tmp_path / "d", tmp_path / "whole", **cfg))
    assert whole["history"][0]["steps"] == 4 and load_checkpoint(tmp_path / "whole" / "last.pt")["config"]["instance"] == "distance"

    def ctrl_c(step: int, epoch: int) -> None:
        if step == 6:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(small(tmp_path / "d", tmp_path / "cut", **cfg), step_hook=ctrl_c)
    resumed = train(resume_config(tmp_path / "cut"))
    assert resumed["state_digest"] == whole["state_digest"]
    ds = SegmentationDataset(tmp_path / "d", "train", augment="full", seed=3, cache=True, instance="distance")
    ds.set_epoch(1)
    forward = [ds[i] for i in range(4)]
    backward = [ds[i] for i in reversed(range(4))][::-1]
    assert all(all(torch.equal(a, b) for a, b in zip(f, g)) for f, g in zip(forward, backward))
    plain = SegmentationDataset(tmp_path / "d", "train", augment="geometric", seed=3, cache=True, instance="distance")
    plain.set_epoch(1)
    assert not torch.equal(plain[0][0], forward[0][0])  # appearance changed the image


def test_stain_jitter_sets_the_hed_range_and_is_recorded(tmp_path) -> None:
    """--stain-jitter widens the HED stain draws of the appearance chain (labels untouched), is checked, and is part
    of the run's settings (a resume with another value is refused)."""
    from bloodcells.composer.dataset import compose, sprite_pools
    from bloodcells.composer.recipe import load_recipe

    r = load_recipe("tiny", {"scenes": {"train": 8, "val": 4, "test": 0}})
    pools, info = sprite_pools(None, r)
    compose(r, pools, tmp_path / "d", info, workers=1, progress=False)
    light, strong, none = (SegmentationDataset(tmp_path / "d", "train", augment="appearance", seed=3, cache=True,
                                               stain_jitter=s) for s in (None, 0.3, 0.0))
    a, b, c = light[0], strong[0], none[0]
    assert torch.equal(a[1], b[1]) and torch.equal(a[1], c[1])  # same label
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # the stronger range moves the image further from the unjittered draw (same seed: the same other steps)
    assert (b[0] - c[0]).abs().mean() > (a[0] - c[0]).abs().mean()
    with pytest.raises(BloodcellsError, match="--stain-jitter"):
        small(tmp_path / "d", tmp_path / "bad", stain_jitter=1.0).check()
    train(small(tmp_path / "d", tmp_path / "run", epochs=1, augment="full", stain_jitter=0.2))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["training"]["config"]["stain_jitter"] == 0.2
    with pytest.raises(BloodcellsError, match="stain_jitter"):
        train(resume_config(tmp_path / "run", epochs=2, stain_jitter=0.05))


def test_hue_jitter_and_share_set_the_hue_turn_and_are_recorded(tmp_path) -> None:
    """--hue-jitter and --hue-share set the range and the share of samples of the whole-sample hue turn: with
    share 1 every sample's chroma turns (luma and labels kept), with share 0 none does; both are checked on the
    command line and are part of the run's settings (a resume with another value is refused)."""
    from bloodcells.cli import app
    from bloodcells.composer.dataset import compose, sprite_pools
    from bloodcells.composer.recipe import load_recipe
    from bloodcells.segmenter import augment as A

    r = load_recipe("tiny", {"scenes": {"train": 8, "val": 4, "test": 0}})
    pools, info = sprite_pools(None, r)
    compose(r, pools, tmp_path / "d", info, workers=1, progress=False)
    default = SegmentationDataset(tmp_path / "d", "train", augment="appearance", seed=3, cache=True)
    assert (default.augment_config.hue, default.augment_config.p_hue) == (A.AUGMENT_DEFAULTS.hue,
                                                                          A.AUGMENT_DEFAULTS.p_hue)
    wide = SegmentationDataset(tmp_path / "d", "train", augment="appearance", seed=3, cache=True,
                               hue_jitter=40, hue_share=1.0)
    assert (wide.augment_config.hue, wide.augment_config.p_hue) == (40, 1.0)
    # the configured chain, every other step switched off, turns every sample by up to 40 degrees
    only_hue = dataclasses.replace(wide.augment_config, stain_alpha=0, stain_beta=0, p_brightness_contrast=0,
                                   p_gamma=0, p_saturation=0, p_blur_sharpen=0, p_noise=0, p_jpeg=0)
    img = np.zeros((8, 8, 3), np.uint8)
    img[:] = (200, 120, 160)  # a violet stained pixel
    angles = []
    for seed in range(20):
        out = A.appearance(img, np.random.default_rng(seed), config=only_hue)
        yiq = A._RGB_TO_YIQ @ out[0, 0].astype(float), A._RGB_TO_YIQ @ img[0, 0].astype(float)
        assert abs(yiq[0][0] - yiq[1][0]) < 1.5  # luma kept
        angles.append(math.degrees(math.atan2(yiq[0][2], yiq[0][1]) - math.atan2(yiq[1][2], yiq[1][1])))
    assert max(abs(a) for a in angles) <= 41 and max(abs(a) for a in angles) > 20 and min(abs(a) for a in angles) > 0
    none = dataclasses.replace(only_hue, p_hue=0.0)
    assert np.array_equal(A.appearance(img, np.random.default_rng(0), config=none), img)
    with pytest.raises(BloodcellsError, match="--hue-jitter"):
        small(tmp_path / "d", tmp_path / "bad", hue_jitter=200).check()
    with pytest.raises(BloodcellsError, match="--hue-share"):
        small(tmp_path / "d", tmp_path / "bad", hue_share=1.5).check()
    res = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "bad"),
                                   "--hue-share", "2"])
    assert isinstance(res.exception, BloodcellsError) and "--hue-share" in str(res.exception)  # one line at main()
    train(small(tmp_path / "d", tmp_path / "run", epochs=1, augment="full", hue_jitter=30, hue_share=0.8))
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["training"]["config"]
    assert (saved["hue_jitter"], saved["hue_share"]) == (30, 0.8)
    with pytest.raises(BloodcellsError, match="hue_share"):
        train(resume_config(tmp_path / "run", epochs=2, hue_share=0.3))
