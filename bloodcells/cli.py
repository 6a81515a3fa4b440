"""bloodcells command line: thin wrappers that parse, call the library and print."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from bloodcells.errors import BloodcellsError, check_out_folder

def at_least(low: float) -> Callable[[typer.CallbackParam, Any], Any]:
    """An option callback that refuses values below `low` in one line (typer's min= prints a usage box, exit 2)."""

    def check(param: typer.CallbackParam, value: Any) -> Any:
        if value is not None and value < low:
            raise BloodcellsError(f"{param.opts[0]} {value:g}: must be at least {low:g}")
        return value

    return check


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Blood-smear scene composer and multi-class U-Net segmenter.")
sprites_app = typer.Typer(no_args_is_help=True, help="Cut single cells out of datasets into a sprite bank.")
app.add_typer(sprites_app, name="sprites")


@sprites_app.command("import")
def sprites_import(
    kind: str = typer.Argument(..., help="kaggle | crops | masked | lisc | iumc | boxes | mamic"),
    root: Path = typer.Argument(..., help="the dataset folder (layouts: README 'Importing cells')"),
    bank: Path = typer.Option(Path("sprites"), "--bank", help="sprite bank folder (created if missing)"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="masked: CSV of image id -> class"),
    mask_pattern: Optional[str] = typer.Option(None, "--mask-pattern", help="masked: mask file name, e.g. '{stem}_seg.png'"),
    wbc_labels: Optional[Path] = typer.Option(None, "--wbc-labels", help="boxes: CSV of image number -> WBC subtype"),
    boxes_csv: Optional[Path] = typer.Option(None, "--boxes-csv", help="boxes: CSV image,xmin,ymin,xmax,ymax,label"),
    include_test: bool = typer.Option(False, "--include-test", help="boxes: also cut the ImageSets/Main/test.txt smears"),
    alias: List[str] = typer.Option([], "--alias", help="extra class alias NAME=CLASS (CLASS may be 'skip'); repeatable"),
    split: str = typer.Option("80/10/10", "--split", help="train/val/test shares, by source image"),
    name: Optional[str] = typer.Option(None, "--name", help="source name in the index (default KIND:FOLDER)"),
    licence: Optional[str] = typer.Option(None, "--licence", help="the source's licence (default: read from SOURCE.txt, LICENSE* or README* in the folder or up to two parents; else 'unknown')"),
    workers: int = typer.Option(2, "--workers", callback=at_least(1)),
    backgrounds: bool = typer.Option(True, "--backgrounds/--no-backgrounds",
                                     help="also keep each smear's plasma (its cell-free background) as a background field"),
    min_parasite: float = typer.Option(0.0, "--min-parasite", min=0.0, max=1.0,
                                       help="reject an infected red cell whose largest parasite-like body (dark, purple) "
                                            "covers less of it than this, e.g. 0.002 (0: keep every infected crop)"),
) -> None:
    """Cut sprites out of one dataset folder into BANK (re-running adds nothing twice)."""
    from bloodcells.composer.aliases import AliasTable
    from bloodcells.composer.bank import SpriteBank, parse_fractions
    from bloodcells.composer.licence import find_licence
    from bloodcells.composer.sources import list_items

    aliases = AliasTable(AliasTable.parse(alias))
    items = list_items(kind, root, aliases, labels=labels, mask_pattern=mask_pattern, wbc_labels=wbc_labels,
                       include_test=include_test, boxes_csv=boxes_csv)
    found, found_in = (licence.strip(), "--licence") if licence and licence.strip() else find_licence(root)
    summary = SpriteBank(bank).import_items(items, name or f"{kind}:{root.resolve().name}", workers,
                                            parse_fractions(split), licence=found, licence_from=found_in,
                                            fields=backgrounds, min_parasite=min_parasite)
    typer.echo("\n".join(summary.lines()))
    note = {None: "  (none found; pass --licence TEXT)", "--licence": ""}.get(found_in, f"  (from {found_in})")
    typer.echo(f"licence: {found}{note}")
    typer.echo(f"bank: {bank}  (see 'cli sprites stats {bank}')")


@sprites_app.command("stats")
def sprites_stats(bank: Path = typer.Argument(Path("sprites"))) -> None:
    """Table of sprites per class x split x source, and rejections by reason."""
    from bloodcells.composer.bank import SpriteBank, format_table

    acc, rej = SpriteBank(bank).stats()
    typer.echo(format_table(acc))
    if len(rej) > 1:
        typer.echo("\n" + format_table(rej))


@sprites_app.command("sheet")
def sprites_sheet(
    bank: Path = typer.Argument(Path("sprites")),
    out: Path = typer.Option(Path("sheet.png"), "--out"),
    split: Optional[str] = typer.Option(None, "--split", help="only this split"),
    per_class: int = typer.Option(12, "--per-class", callback=at_least(1)),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Contact sheet: a row of sprites per class with the mask outline drawn."""
    from bloodcells.imageio import write_png
    from bloodcells.composer.bank import SpriteBank
    from bloodcells.composer.sheet import contact_sheet

    sprites = SpriteBank(bank).load(split)
    if not sprites:
        raise BloodcellsError(f"{bank}: no sprites{' in split ' + split if split else ''}; import some first")
    write_png(out, contact_sheet(sprites, per_class=per_class, seed=seed))
    typer.echo(f"wrote {out} ({len(sprites)} sprites)")


@app.command("compose")
def compose_cmd(
    recipe: str = typer.Option("balanced.yaml", "--recipe", help="recipe YAML, or a bare name in recipes/"),
    sprites: Optional[Path] = typer.Option(None, "--sprites", help="sprite bank; omit for the built-in default"),
    out: Optional[Path] = typer.Option(None, "--out", help="dataset folder (default data/<recipe name>)"),
    workers: int = typer.Option(2, "--workers", callback=at_least(1)),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: render only this shard's canvases"),
    seed: Optional[int] = typer.Option(None, "--seed", help="override the recipe's seed"),
    exclude_source: List[str] = typer.Option([], "--exclude-source", help="leave out a source of the bank (its name as 'cli sprites stats' shows it, or a pattern such as 'crops:PBC*'); repeatable"),
) -> None:
    """Compose 224x224 smear scenes with label maps and instance maps from a recipe (resumes if interrupted)."""
    from bloodcells.composer.dataset import compose, parse_shard, sprite_pools
    from bloodcells.composer.recipe import load_recipe

    r = load_recipe(recipe, {"seed": seed} if seed is not None else None)
    out = check_out_folder(out or Path("data") / r["name"])
    pools, info = sprite_pools(sprites, r, exclude_source)
    if info.get("excluded"):
        typer.echo("left out: " + ", ".join(info["excluded"]))
    if sprites is None:
        typer.echo("sprites: the built-in default (procedural cells drawn by the project; no dataset needed)")
    summary = compose(r, pools, out, info, workers=workers, shard=parse_shard(shard))
    typer.echo(f"{out}: rendered {summary['rendered']} scenes, {summary['resumed_from']} already there "
               f"(shard {summary['shard']})")
    if summary["complete"]:
        d = summary["dataset"]
        typer.echo("scenes: " + ", ".join(f"{k} {v}" for k, v in d["counts"].items()))
        freq = d["class_frequencies"]
        from bloodcells.classes import NAMES
        typer.echo("pixel share: " + ", ".join(f"{n} {100 * f:.1f}%" for n, f in zip(NAMES, freq)))
        typer.echo(f"wrote {out / 'dataset.json'}; look at it with 'cli show {out}'")
    else:
        typer.echo("other shards are still missing; dataset.json is written by the run that completes the set")


@app.command("show")
def show_cmd(
    data: List[Path] = typer.Argument(..., help="a composed dataset folder; several: the same scenes side by side"),
    split: str = typer.Option("train", "--split"),
    n: int = typer.Option(16, "--n", callback=at_least(1)),
    out: Path = typer.Option(Path("grid.png"), "--out"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Grid of scenes beside their colour-coded label maps, with a legend (several datasets: side by side)."""
    from bloodcells.imageio import write_png
    from bloodcells.composer.show import grid

    write_png(out, grid(data if len(data) > 1 else data[0], split, n, seed=seed))
    typer.echo(f"wrote {out}")


@app.command("export")
def export_cmd(
    data: Path = typer.Argument(..., help="a composed dataset folder (with dataset.json and instance maps)"),
    fmt: str = typer.Option(..., "--format", help="coco (one instances JSON) | yolo-seg (an Ultralytics folder)"),
    out: Path = typer.Option(..., "--out", help="coco: the JSON file; yolo-seg: the folder (created if missing)"),
    split: str = typer.Option("all", "--split", help="train | val | test | all"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Export every cell instance as COCO instances (exact RLE masks) or YOLO segmentation polygons."""
    from bloodcells.composer.export import export

    s = export(data, fmt, out, split=split, progress=progress)
    scenes = ", ".join(f"{k} {v}" for k, v in s.scenes.items())
    typer.echo(f"wrote {out}: {fmt}, {sum(s.scenes.values())} scenes ({scenes}), {s.instances} instances")
    if fmt == "yolo-seg":
        typer.echo(f"train on it with: yolo segment train data={out / 'data.yaml'}")


@app.command("train")
def train_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="composed dataset folder (with dataset.json)"),
    arch: Optional[str] = typer.Option(None, "--arch", help="unet | r2unet | attention_unet | unetpp | ternausnet | resunet (default unet)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", callback=at_least(1), help="total epochs (default 10); with --resume it may extend the run"),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default runs/<arch>)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this folder (or of this last.pt)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", callback=at_least(1), help="images per step (default 8)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="initial learning rate (default 1e-3)"),
    milestones: Optional[str] = typer.Option(None, "--milestones", help="epochs after which the rate is multiplied by --gamma (default 5)"),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="learning-rate factor at each milestone (default 0.1)"),
    dice_weight: Optional[float] = typer.Option(None, "--dice-weight", help="add this times the Dice loss to the weighted CE (default 0)"),
    class_weights: Optional[bool] = typer.Option(None, "--class-weights/--no-class-weights", help="weight CE by dataset.json's class weights (default on)"),
    weight_power: Optional[float] = typer.Option(None, "--weight-power", callback=at_least(0.0), help="raise the class weights to this power: 1 median-frequency (default), 0.5 milder, 0 none"),
    tie_weights: Optional[str] = typer.Option(None, "--tie-weights", help="classes that share one class weight, e.g. healthy_rbc,infected_rbc: the choice between them then follows their shares in the scenes (default none)"),
    width: Optional[int] = typer.Option(None, "--width", callback=at_least(1), help="first-level feature width (default 32)"),
    option: List[str] = typer.Option([], "--option", help="architecture option KEY=VALUE, e.g. deep_supervision=true; repeatable"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of weights, order and augmentation (default 0)"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto | fp32 | bf16 | fp16 (default auto: bf16 on CPUs with native bf16, mixed precision on GPUs)"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default auto)"),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch", callback=at_least(1), help="cap on steps per epoch"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="stop with a resumable last.pt after this much wall-clock time"),
    workers: Optional[int] = typer.Option(None, "--workers", callback=at_least(0), help="DataLoader worker processes (default 0 on CPU, 4 on GPU)"),
    threads: Optional[int] = typer.Option(None, "--threads", callback=at_least(1), help="torch intra-op threads (default: torch's choice)"),
    augment: Optional[str] = typer.Option(None, "--augment", help="none | geometric (random flips and quarter turns) | appearance (and stain, colour, blur, noise, JPEG, on the fly) | full (and scale jitter 0.7-1.4x; the default)"),
    stain_jitter: Optional[float] = typer.Option(None, "--stain-jitter", help="range of the HED stain scale and shift of appearance augmentation (default 0.05, 'light'; 0.2 'strong')"),
    hue_jitter: Optional[float] = typer.Option(None, "--hue-jitter", help="range in degrees of the whole-sample hue turn of appearance augmentation (default 5)"),
    hue_share: Optional[float] = typer.Option(None, "--hue-share", help="share of training samples that get the hue turn (default 0.3)"),
    instance: Optional[str] = typer.Option(None, "--instance", help="auto | distance | boundary | none: the output that separates touching cells (default auto: distance when the scenes have instance maps)"),
    instance_weight: Optional[float] = typer.Option(None, "--instance-weight", help="weight of the instance output's loss (default 1)"),
    cache: Optional[bool] = typer.Option(None, "--cache/--no-cache", help="hold the dataset in memory (default: when a split fits in 4 GB or a quarter of the RAM)"),
    force: bool = typer.Option(False, "--force", help="start a new run in --out even if it holds one (default: the same settings resume it, others are refused)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a segmenter (or continue one with --resume); writes best.pt, last.pt, history.csv, curves.png."""
    from bloodcells.segmenter.runtime import env_world
    from bloodcells.segmenter.train import TrainConfig, parse_milestones, parse_model_options, resume_config, train

    given = {"data": data, "arch": arch, "epochs": epochs, "batch_size": batch_size, "lr": lr, "gamma": gamma,
             "milestones": parse_milestones(milestones) if milestones is not None else None,
             "dice_weight": dice_weight, "class_weights": class_weights, "weight_power": weight_power, "width": width,
             "tie_weights": tie_weights,
             "model_options": parse_model_options(option) if option else None, "seed": seed,
             "precision": precision, "device": device, "steps_per_epoch": steps_per_epoch,
             "max_minutes": max_minutes, "workers": workers, "threads": threads, "augment": augment,
             "stain_jitter": stain_jitter, "hue_jitter": hue_jitter, "hue_share": hue_share, "instance": instance, "instance_weight": instance_weight,
             "cache": cache, "progress": progress}
    if resume is not None:
        config = resume_config(resume, out=out, **given)
    else:
        given = {k: v for k, v in given.items() if v is not None}
        config = TrainConfig(out=str(out or Path("runs") / given.get("arch", "unet")), **given)
    main_rank = env_world()[0] == 0
    try:
        s = train(config, force=force)
    except KeyboardInterrupt:
        if main_rank:
            typer.echo(f"interrupted: saved {Path(config.out) / 'last.pt'}; continue with: "
                       f"cli train --resume {config.out}", err=True)
        raise typer.Exit(130)
    if not main_rank:
        return
    best = s["best"] or {}
    if resume is None and s.get("resumed"):
        typer.echo(f"continued the run already in {s['out']} (its settings match; --force starts over)")
    typer.echo(f"{s['out']}: {s['epoch']}/{s['epochs']} epochs, {s['global_step']} steps, "
               f"{s['images_per_s'] or 0:.1f} train img/s ({s['precision']} on {s['device']}, {s['world_size']} process(es))")
    if best:
        typer.echo(f"best epoch {best['epoch']}: pixel accuracy {best['pixel_accuracy']:.4f}, "
                   f"val loss {best['val_loss']:.4f}, mIoU {best['miou']:.4f}  -> {s['best_path']}")
    if s["stopped"]:
        typer.echo(f"stopped ({s['stopped']}) with a resumable {s['last_path']}; continue with: "
                   f"cli train --resume {s['out']}")
    else:
        typer.echo(f"evaluate with: cli evaluate --model {s['best_path']} --data {s['data']} --split test")


@app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Option(..., "--model", help="a checkpoint, e.g. runs/unet/best.pt"),
    data: Optional[Path] = typer.Option(None, "--data", help="dataset folder (default: the one the model was trained on)"),
    split: str = typer.Option("test", "--split"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for metrics.json, confusion.csv/.png (default <model dir>/<stem>-<split>)"),
    batch_size: int = typer.Option(8, "--batch-size", callback=at_least(1)),
    precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | fp16"),
    device: str = typer.Option("auto", "--device"),
    workers: int = typer.Option(0, "--workers", callback=at_least(0)),
    tta: bool = typer.Option(False, "--tta", help="average each scene over its 8 flips and quarter turns"),
) -> None:
    """Score a model on a dataset split: per-class IoU / Dice / accuracy, confusion matrix, and one object per
    cell (AP, panoptic quality, count error) on scenes with instance maps."""
    from bloodcells.formats import read_json
    from bloodcells.segmenter.checkpoint import sidecar
    from bloodcells.segmenter.evaluate import evaluate, format_table

    if data is None and model.is_file():
        trained_on = sidecar(model).is_file() and read_json(sidecar(model)).get("data")
        if not trained_on:
            raise BloodcellsError(f"{model}: no record of its dataset; pass --data")
        data = Path(trained_on)
    result = evaluate(model, data or Path("."), split, out, batch_size=batch_size, precision=precision, workers=workers,
                      device=device, tta=tta)
    typer.echo(format_table(result))
    typer.echo(f"wrote {result['out']}/metrics.json, confusion.csv, confusion.png")


# inference options shared by predict, colorize and evaluate-real
TILE_OPTION = typer.Option(224, "--tile", help="sliding-window size (a multiple of 32)")
OVERLAP_OPTION = typer.Option(0.25, "--overlap", help="share of a tile that overlaps its neighbour (0..0.9)")
BATCH_OPTION = typer.Option(8, "--batch", callback=at_least(1), help="tiles per forward pass")
PRECISION_OPTION = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | fp16")
BALANCE_OPTION = typer.Option(False, "--balance", help="white-balance each image's background to the training scenes' plasma colour")
DEVICE_OPTION = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
TTA_OPTION = typer.Option(False, "--tta", help="average each tile over its 8 flips and quarter turns (8x slower, steadier)")
SURE_INFECTED_OPTION = typer.Option(None, "--sure-infected", help="call a red cell infected only when the infected class holds at least this share of its red-cell probability (default 0.6: unbiased infected counts on composed scenes; higher: fewer false malaria calls, more missed parasites; 0: by majority)")
JOIN_OPTION = typer.Option(None, "--join/--no-join", help="join pieces of one cell that the model's instance output cut apart (default: join; --no-join: cells as decoded)")
PLATELET_CONFIDENCE_OPTION = typer.Option(None, "--platelet-confidence", help="drop platelets whose mean probability of their class is below this (default 0.8: mostly faint patches of plasma; 0: keep all)")
ABSENT_OPTION = typer.Option(None, "--absent", help="classes your smears are known not to hold, never predicted, e.g. infected_rbc for smears without malaria (comma-separated)")


@app.command("predict")
def predict_cmd(
    inputs: List[str] = typer.Argument(..., help="images, folders of images or glob patterns"),
    model: Path = typer.Option(..., "--model", help="a checkpoint, e.g. runs/unet/best.pt"),
    out: Path = typer.Option(Path("preds"), "--out", help="folder for <stem>.png, <stem>_color.png and counts.csv"),
    scale: str = typer.Option("1", "--scale", help="resize factor to the model's 40x scale (e.g. 0.36), or auto: estimate the RBC size per image"),
    data: Optional[Path] = typer.Option(None, "--data", help="composed dataset whose mean cell areas split touching cells (default: the checkpoint's, else the class table)"),
    tile: int = TILE_OPTION,
    overlap: float = OVERLAP_OPTION,
    batch: int = BATCH_OPTION,
    precision: str = PRECISION_OPTION,
    balance: bool = BALANCE_OPTION,
    tta: bool = TTA_OPTION,
    absent: Optional[str] = ABSENT_OPTION,
    sure_infected: Optional[float] = SURE_INFECTED_OPTION,
    join: Optional[bool] = JOIN_OPTION,
    platelet_confidence: Optional[float] = PLATELET_CONFIDENCE_OPTION,
    min_fraction: float = typer.Option(0.15, "--min-fraction", help="drop objects below this share of their class's mean cell area (specks)"),
    device: str = DEVICE_OPTION,
    force: bool = typer.Option(False, "--force", help="predict again inputs already done"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Class-index maps, colour maps and cell counts of real smears of any size (re-runs skip what is done)."""
    from bloodcells.segmenter.predict import predict_files

    s = predict_files(model, inputs, out, scale=scale, tile=tile, overlap=overlap, batch=batch, precision=precision,
                      device=device, force=force, data=data, progress=progress, balance=balance, tta=tta,
                      min_fraction=min_fraction, absent=absent, sure_infected=sure_infected, join=join,
                      platelet_confidence=platelet_confidence)
    typer.echo(f"{out}: predicted {len(s.done)}, already done {len(s.resumed)}, skipped {len(s.failed)} "
               f"(cell areas from {s.areas_source})")
    cells = ", ".join(f"{n} {v}" for n, v in s.totals.items() if v)
    typer.echo(f"cells: {cells or 'none'}  -> {out / 'counts.csv'}")
    if s.tinted:
        typer.echo(f"note: {len(s.tinted)} of {len(s.done)} images (e.g. {s.tinted[0]}) lie on a background tinted "
                   "beyond any plasma of the training scenes; --balance white-balances each image first")
    for line in s.failed:
        typer.echo(f"skipped: {line}", err=True)
    if not s.ok:
        raise BloodcellsError("no input could be predicted; see the skipped lines above")


@app.command("colorize")
def colorize_cmd(
    inputs: List[str] = typer.Argument(..., help="images, folders, glob patterns or videos (frames in order)"),
    model: Path = typer.Option(..., "--model", help="a checkpoint, e.g. runs/unet/best.pt"),
    out: Path = typer.Option(Path("result.gif"), "--out", help="result.gif or result.mp4"),
    scale: str = typer.Option("1", "--scale", help="resize factor to 40x, or auto (estimated once per image or video)"),
    layout: str = typer.Option("side", "--layout", help="side (image | colour map) | overlay | map | outline (each cell's outline in its class colour)"),
    fps: float = typer.Option(5.0, "--fps", help="frames per second of the result (GIF: 1000/fps ms a frame)"),
    every: int = typer.Option(1, "--every", callback=at_least(1), help="video input: use every N-th frame"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", callback=at_least(1), help="stop after this many frames"),
    width: Optional[int] = typer.Option(None, "--width", callback=at_least(16), help="resize frames to this width (default: as rendered)"),
    tile: int = TILE_OPTION,
    overlap: float = OVERLAP_OPTION,
    batch: int = BATCH_OPTION,
    precision: str = PRECISION_OPTION,
    balance: bool = BALANCE_OPTION,
    tta: bool = TTA_OPTION,
    absent: Optional[str] = ABSENT_OPTION,
    sure_infected: Optional[float] = SURE_INFECTED_OPTION,
    join: Optional[bool] = JOIN_OPTION,
    platelet_confidence: Optional[float] = PLATELET_CONFIDENCE_OPTION,
    device: str = DEVICE_OPTION,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """An animated GIF or an MP4 of smears (or a video's frames) beside their colour-coded predictions."""
    from bloodcells.segmenter.predict import colorize_run

    r = colorize_run(model, inputs, out, scale=scale, every=every, max_frames=max_frames, fps=fps, layout=layout,
                     width=width, tile=tile, overlap=overlap, batch=batch, precision=precision, device=device,
                     progress=progress, balance=balance, tta=tta, absent=absent, sure_infected=sure_infected,
                     join=join, platelet_confidence=platelet_confidence)
    for line in r["failed"]:
        typer.echo(f"skipped: {line}", err=True)
    typer.echo(f"wrote {r['out']}: {r['frames']} frames at {r['fps']:g} fps "
               f"(scale {r['scale_min']:.3f}..{r['scale_max']:.3f})")


@app.command("evaluate-real")
def evaluate_real_cmd(
    model: Path = typer.Option(..., "--model", help="a checkpoint, e.g. runs/unet/best.pt"),
    voc: Optional[Path] = typer.Option(None, "--voc", help="Pascal VOC folder (Annotations/, JPEGImages/, ImageSets/Main/)"),
    yolo: Optional[Path] = typer.Option(None, "--yolo", help="YOLO folder (images/, labels/, classes.txt)"),
    split: str = typer.Option("test", "--split", help="VOC: ImageSets/Main/<split>.txt; YOLO: images/<split>/; all: every image"),
    scale: str = typer.Option("auto", "--scale", help="resize factor to 40x, or auto (per image)"),
    iou: float = typer.Option(0.3, "--iou", help="a component matches a box when their IoU is at least this"),
    min_fraction: float = typer.Option(0.15, "--min-fraction", help="drop components below this share of one cell's area"),
    wbc_labels: Optional[Path] = typer.Option(None, "--wbc-labels", help="CSV Image,Category of WBC subtypes (BCCD: wbc_subtype_labels_mooney.csv)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for metrics.json (default <model dir>/<stem>-real-<split>)"),
    max_images: Optional[int] = typer.Option(None, "--max-images", callback=at_least(1), help="only the first N images"),
    data: Optional[Path] = typer.Option(None, "--data", help="composed dataset for the expected cell areas"),
    tile: int = TILE_OPTION,
    overlap: float = OVERLAP_OPTION,
    batch: int = BATCH_OPTION,
    precision: str = PRECISION_OPTION,
    balance: bool = BALANCE_OPTION,
    tta: bool = TTA_OPTION,
    absent: Optional[str] = ABSENT_OPTION,
    sure_infected: Optional[float] = SURE_INFECTED_OPTION,
    join: Optional[bool] = JOIN_OPTION,
    platelet_confidence: Optional[float] = PLATELET_CONFIDENCE_OPTION,
    device: str = DEVICE_OPTION,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Recall / precision / F1 per RBC, WBC and platelet group on real smears with boxes; WBC subtype accuracy."""
    from bloodcells.segmenter.realeval import evaluate_real, format_table

    if (voc is None) == (yolo is None):
        raise BloodcellsError("give exactly one of --voc FOLDER or --yolo FOLDER")
    result = evaluate_real(model, voc or yolo, layout="voc" if voc is not None else "yolo", split=split, scale=scale,
                           iou=iou, min_fraction=min_fraction, wbc_labels=wbc_labels, out=out, max_images=max_images,
                           tile=tile, overlap=overlap, batch=batch, precision=precision, device=device, data=data,
                           progress=progress, balance=balance, tta=tta, absent=absent, sure_infected=sure_infected,
                           join=join, platelet_confidence=platelet_confidence)
    typer.echo(format_table(result))
    typer.echo(f"wrote {result['out']}/metrics.json")


@app.command("export-model")
def export_model_cmd(
    model: Path = typer.Option(..., "--model", help="a checkpoint, e.g. runs/unet/best.pt"),
    onnx: Path = typer.Option(..., "--onnx", help="the ONNX file to write, e.g. unet.onnx"),
    opset: int = typer.Option(18, "--opset", min=18, help="ONNX opset version"),
) -> None:
    """Export a checkpoint to ONNX (dynamic batch, height and width; mean, std and classes in its metadata)."""
    from bloodcells.segmenter.export import export_onnx

    r = export_onnx(model, onnx, opset=opset)
    md = r["metadata"]
    typer.echo(f"wrote {r['out']} ({r['bytes'] / 1e6:.1f} MB, {r['arch']}, opset {r['opset']})")
    typer.echo(f"input '{r['input']}': float32 (N, 3, H, W), RGB / 255 minus mean {md['mean']}, divided by std "
               f"{md['std']}; H and W multiples of 16")
    typer.echo(f"output '{r['output']}': (N, C, H, W); channels 0..{int(md['num_classes']) - 1} are the class logits "
               "(classes and colours are in the file's metadata_props)")


@app.command("adapt")
def adapt_cmd(
    model: Path = typer.Option(..., "--model", help="a trained checkpoint, e.g. runs/unet/best.pt"),
    images: List[str] = typer.Option(..., "--images", help="your unlabeled smears: files, folders or glob patterns; repeatable"),
    data: Optional[Path] = typer.Option(None, "--data", help="self-training: composed dataset mixed in so that nothing learned is forgotten (e.g. the model's own)"),
    out: Path = typer.Option(..., "--out", help="run folder: adapt.json, adapted.pt (self-training: also pseudo-labels per round, last.pt)"),
    method: str = typer.Option("self-training", "--method", help="self-training (pseudo-labels, fine-tuning) | stats (re-estimate batch-norm statistics on your images only; seconds, no --data)"),
    source_share: float = typer.Option(0.0, "--source-share", help="stats: share of the training statistics kept, mixed with your images' (0: theirs alone; e.g. 0.5 for few images)"),
    rounds: int = typer.Option(3, "--rounds", callback=at_least(1), help="label, then fine-tune; this many times"),
    steps: int = typer.Option(300, "--steps", callback=at_least(1), help="optimiser steps per round"),
    batch: int = typer.Option(8, "--batch", callback=at_least(2), help="half windows of your images, half composed scenes"),
    lr: float = typer.Option(1e-4, "--lr", help="learning rate of the fine-tuning"),
    keep: float = typer.Option(0.5, "--keep", help="share of each class's predicted pixels kept as pseudo-labels (the most confident)"),
    scale: str = typer.Option("auto", "--scale", help="resize factor of your images to 40x, or auto (per image)"),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="label with test-time augmentation (flips and quarter turns)"),
    absent: Optional[str] = typer.Option(None, "--absent", help="classes your smears are known not to hold, never pseudo-labelled, e.g. infected_rbc (comma-separated)"),
    anchor: Optional[str] = typer.Option(None, "--anchor", show_default=False, help="groups (self-training's default) | none: later rounds pseudo-label a pixel only in the group (red cell, white cell, platelet, background) the starting model gave it, so confident mistakes cannot spread"),
    augment: str = typer.Option("full", "--augment", help="augmentation of the composed scenes: none | geometric | appearance | full"),
    seed: int = typer.Option(0, "--seed"),
    precision: str = PRECISION_OPTION,
    device: str = DEVICE_OPTION,
    threads: Optional[int] = typer.Option(None, "--threads", callback=at_least(1), help="torch intra-op threads"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Adapt a model to your own unlabeled smears: self-training with refreshed pseudo-labels (resumes if
    interrupted), or its batch-norm statistics re-estimated on them (--method stats)."""
    from bloodcells.segmenter.adapt import AdaptConfig, adapt

    s = adapt(AdaptConfig(model=str(model), images=list(images), data=None if data is None else str(data), out=str(out),
                          method=method, source_share=source_share, rounds=rounds,
                          steps=steps, batch=batch, lr=lr, keep=keep, scale=scale, tta=tta, augment=augment,
                          absent=absent, anchor=anchor,
                          seed=seed, precision=precision, device=device, threads=threads, progress=progress))
    left = f"; {len(s['left_out'])} left out, their scale unknown" if s.get("left_out") else ""
    if s.get("method") == "stats":
        typer.echo(f"batch-norm statistics of {s['images']} images ({s['tiles']} tiles{left}) -> {s['adapted']}")
        return
    for row in s["log"]:
        typer.echo(f"round {row['round']}: {100 * row['pixels_kept']:.0f}% of the pixels pseudo-labelled")
    typer.echo(f"adapted on {s['images']} images in {s['rounds']} rounds{left} -> {s['adapted']}")


@app.command("quickstart")
def quickstart_cmd(
    out: Path = typer.Option(Path("quickstart"), "--out", help="folder for everything it makes"),
    minutes: float = typer.Option(4.0, "--minutes", callback=at_least(0.1), help="training time budget"),
    sprites: Optional[Path] = typer.Option(None, "--sprites", help="a sprite bank (default: the built-in sprites)"),
) -> None:
    """The whole pipeline in one go: compose a small set, train a small U-Net, predict, write a GIF."""
    import time

    from bloodcells.composer.dataset import compose, sprite_pools
    from bloodcells.composer.recipe import load_recipe
    from bloodcells.segmenter.evaluate import evaluate
    from bloodcells.segmenter.predict import colorize_run, predict_files
    from bloodcells.segmenter.train import TrainConfig, train

    t0 = time.time()
    data, run, preds = out / "data", out / "run", out / "predictions"
    r = load_recipe("quickstart")
    pools, info = sprite_pools(sprites, r)
    typer.echo(f"1/4 compose {sum(r['scenes'].values())} scenes from "
               f"{'the built-in default sprites' if sprites is None else sprites} -> {data}")
    compose(r, pools, data, info, workers=2)
    typer.echo(f"2/4 train a U-Net (width 16) for up to {minutes:g} min -> {run}")
    resume = str(run) if (run / "last.pt").is_file() else None
    # a few minutes on the built-in scenes, scored on them: flips and turns only (full augmentation is for real smears)
    cfg = TrainConfig(data=str(data), out=str(run), arch="unet", width=16, epochs=40, steps_per_epoch=40,
                      milestones=(30,), lr=2e-3, dice_weight=0.5, weight_power=0.5, max_minutes=minutes, augment="geometric",
                      resume=resume)
    s = train(cfg)
    # a budget that ends before the first validation leaves only last.pt
    model = run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt"
    typer.echo("3/4 evaluate on the test split")
    m = evaluate(model, data, "test", out=run / "test")
    typer.echo("4/4 predict the test scenes and render them")
    tests = sorted((data / "test" / "images").glob("*.png"))[:24]
    summary = predict_files(model, tests, preds, progress=False)
    gif = out / "predictions.gif"
    colorize_run(model, tests, gif, progress=False)
    typer.echo(f"done in {(time.time() - t0) / 60:.1f} min: test pixel accuracy {m['pixel_accuracy']:.3f}, "
               f"mIoU {m['miou']:.3f} after {s.get('epoch', '?')} epochs")
    typer.echo(f"  scenes      {data}  (look: cli show {data})")
    typer.echo(f"  model       {model}  (curves: {run / 'curves.png'})")
    typer.echo(f"  evaluation  {run / 'test'}  (confusion.png, metrics.json)")
    typer.echo(f"  predictions {preds}  ({len(summary.done) + len(summary.resumed)} maps, counts.csv)")
    typer.echo(f"  animation   {gif}")


def main() -> None:
    """Entry point: user errors print as one line and exit 1, with no traceback."""
    try:
        app()
    except BloodcellsError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted: work written so far is kept; run the same command again to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
