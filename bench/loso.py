"""Leave one source out: the honest cross-lab check of WBC typing.

A source whose cells are in the sprite bank flatters a model judged on that source's own images. This script
composes a dataset from the bank *without* one source, trains on it, and predicts that source's real single-cell
crops at their own scale (`--scale auto`, or the factor given: crops without red cells cannot be measured): the
share of crops whose centre cell is found and gets the right WBC type. It also scores the same model on BCCD's test smears.

    python bench/loso.py --bank sprites --holdout pbc  --out loso/pbc        # 35-60 min on 2 cores (7 x 800 steps)
    python bench/loso.py --bank sprites --holdout tecom --scale 1 --out loso/tecom   # crops without red cells
    python bench/loso.py --bank sprites --holdout lisc --out loso/lisc
    python bench/loso.py --bank sprites --holdout pbc --recipe bench/recipes/base.yaml --augment geometric --out loso/pbc-base
    python bench/loso.py --bank sprites --holdout lisc --seed 1 --out loso/lisc-s1   # another training seed
    python bench/loso.py --holdout pbc --model runs/realistic/best.pt --out loso/pbc-in-bank   # a model that saw them
    python bench/loso.py --holdout tecom --model loso/tecom/run/best.pt --scale 1 --balance --out loso/tecom-bal
    python bench/loso.py --holdout pbc --model loso/pbc/run/best.pt --tta --out loso/pbc-tta   # 8 views a tile
    python bench/loso.py --holdout pbc --model loso/pbc/run/best.pt --adapt stats --out loso/pbc-stats
    python bench/loso.py --holdout pbc --model loso/pbc/run/best.pt --adapt self-training --absent infected_rbc \
        --out loso/pbc-st     # cli adapt's defaults, the model's own composed scenes mixed in

With `--model`, nothing is composed or trained: that model is scored on the source's crops (the comparison: a
model whose bank held the source's sprites, whose own crops it was partly cut from). `--balance` white-balances
each crop and BCCD smear to the training plasma colour first, as `cli predict --balance` does; `--tta` averages
each prediction over flips and quarter turns, as `cli predict --tta` does (8 times the time). `--adapt stats` scores
the model with its batch-norm statistics re-estimated on the lab's own images, as `cli adapt --method stats` does, and
never on the images it scores: the crops are split in two (every other crop), each half is typed by the model adapted
on the other half; BCCD's test smears by the model adapted on BCCD's train and val smears. `--adapt self-training`
does the same with `cli adapt`'s self-training (its defaults; the composed scenes the model was trained on, as its
checkpoint records them, mixed in).

Each step is skipped when its output exists (compose and training resume), so an interrupted run is re-run with
the same command. Results: <out>/loso.json and a table on stdout (bench/RESULTS.md records them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bloodcells.classes import GROUPS  # noqa: E402
from bloodcells.composer.aliases import AliasTable  # noqa: E402
from bloodcells.composer.dataset import compose, sprite_pools  # noqa: E402
from bloodcells.composer.recipe import load_recipe  # noqa: E402
from bloodcells.composer.sources import list_items  # noqa: E402
from bloodcells.segmenter.augment import AUGMENT_DEFAULTS  # noqa: E402
from bloodcells.segmenter.checkpoint import load_checkpoint  # noqa: E402
from bloodcells.segmenter.adapt import AdaptConfig, adapt  # noqa: E402
from bloodcells.segmenter.realeval import crop_summary, evaluate_crops, evaluate_real  # noqa: E402
from bloodcells.segmenter.train import TrainConfig, train  # noqa: E402

# holdout -> (source name in a bank imported as the README shows, importer, folder under the datasets, extra)
HOLDOUTS = {
    "pbc": ("crops:PBC_dataset_normal_DIB", "crops", "pbc/PBC_dataset_normal_DIB", {}),
    "tecom": ("masked:Dataset 1", "masked", "wbc_tecom/Dataset 1",
              {"labels": "wbc_tecom/Class Labels of Dataset 1.csv"}),
    "lisc": ("crops:data2", "crops", "lisc_crops/data2", {}),
}
ROOT = Path(__file__).resolve().parents[1]


def crops(datasets: Path, holdout: str) -> list[tuple[Path, str]]:
    """The held-out source's single white-cell images and their types (other classes and unusable items left out)."""
    _, kind, folder, extra = HOLDOUTS[holdout]
    items = list_items(kind, datasets / folder, AliasTable(), **{k: datasets / v for k, v in extra.items()})
    return [(it.path, it.cls) for it in items if it.skip is None and it.cls in GROUPS["wbc"]]


def adapted_model(model: Path, images: list[Path], scale: str, out: Path, args: argparse.Namespace) -> Path:
    """`model` adapted to `images` in `out` as `cli adapt --method <args.adapt>` does (defaults otherwise):
    batch-norm statistics re-estimated, or self-training with the model's own composed scenes mixed in."""
    if args.adapt == "stats":
        cfg = AdaptConfig(model=str(model), images=[str(p) for p in images], data=None, out=str(out),
                          method="stats", scale=scale, source_share=args.source_share, progress=False)
    else:
        data = (load_checkpoint(model).get("training") or {}).get("config", {}).get("data")
        cfg = AdaptConfig(model=str(model), images=[str(p) for p in images], data=data, out=str(out), scale=scale,
                          absent=args.absent, anchor=args.anchor, threads=args.threads, progress=False)
    return Path(adapt(cfg)["adapted"])


def type_crops(model: Path, held: list[tuple[Path, str]], args: argparse.Namespace) -> dict:
    """The held-out crops typed by `model`; with --adapt each half by the model adapted on the other half."""
    if args.adapt == "none":
        return evaluate_crops(model, held, scale=args.scale, progress=False, balance=args.balance, tta=args.tta)
    pairs, failed = [], []
    for k in (0, 1):
        scored, other = held[k::2], held[1 - k::2]
        m = adapted_model(model, [p for p, _ in other], args.scale, args.out / "adapt" / f"half-{k}", args)
        r = evaluate_crops(m, scored, scale=args.scale, progress=False, balance=args.balance, tta=args.tta)
        pairs += r["pairs"]
        failed += r["failed"]
    return {"model": str(model), **crop_summary(pairs), "failed": failed, "balance": args.balance,
            "adapt": f"{args.adapt}: each half of the crops typed by the model adapted on the other half"}


def bccd_images(root: Path, splits: tuple[str, ...]) -> list[Path]:
    names = [n.strip() for sp in splits for n in (root / "ImageSets" / "Main" / f"{sp}.txt").read_text().split()]
    return [root / "JPEGImages" / f"{n}.jpg" for n in names if n]


def share(text: str) -> float:
    """An argparse type: a share in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def positive(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse turns the error into one usage line)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", type=Path, help="sprite bank of all five real sources")
    ap.add_argument("--model", type=Path, help="score this checkpoint instead of composing and training")
    ap.add_argument("--holdout", choices=sorted(HOLDOUTS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--recipe", default="realistic")
    ap.add_argument("--augment", default="full")
    ap.add_argument("--stain-jitter", type=float, default=AUGMENT_DEFAULTS.stain_alpha,
                    help="HED stain range of the augmentation (0.2: strong)")
    ap.add_argument("--hue-jitter", type=float, default=AUGMENT_DEFAULTS.hue,
                    help="degrees of the augmentation's whole-sample hue turn (--hue-jitter)")
    ap.add_argument("--hue-share", type=float, default=AUGMENT_DEFAULTS.p_hue,
                    help="share of training samples that get the hue turn (--hue-share)")
    ap.add_argument("--scale", default="auto",
                    help="the crops' scale: auto (from their red cells) or a factor to 40x; Tecom's crops show no red "
                         "cells to measure, so give 1 (its cells are imaged at about the scenes' size)")
    ap.add_argument("--balance", action="store_true",
                    help="white-balance each crop and smear to the training plasma colour before predicting (--balance)")
    ap.add_argument("--tta", action="store_true", help="average over flips and quarter turns when scoring (--tta)")
    ap.add_argument("--adapt", choices=("none", "stats", "self-training"), default="none",
                    help="score the model adapted on the lab's own unscored images: stats (cli adapt --method stats) "
                         "or self-training (cli adapt, the model's own composed scenes mixed in)")
    ap.add_argument("--absent", default=None,
                    help="with --adapt self-training: classes kept out of the pseudo-labels (cli adapt --absent), "
                         "e.g. infected_rbc; scoring still lets the model predict every class")
    ap.add_argument("--anchor", choices=("none", "groups"), default="groups",
                    help="with --adapt self-training: keep each pixel's group from the first round, or not "
                         "(cli adapt --anchor; default groups)")
    ap.add_argument("--source-share", type=share, default=0.0,
                    help="with --adapt stats: share of the training statistics kept in the mix (--source-share)")
    ap.add_argument("--epochs", type=int, default=7, help="the rate drops x0.1 after epoch max(1, EPOCHS - 2)")
    ap.add_argument("--steps", type=int, default=800, help="steps per epoch (8 images each)")
    ap.add_argument("--threads", type=positive, default=2,
                    help="torch threads for training (1 each when two runs share two cores)")
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed (the scenes keep the recipe's): a second seed shows how far one run moves a row")
    ap.add_argument("--datasets", type=Path,
                    default=Path(os.environ.get("BLOODCELLS_DATA", ROOT.parent / "shared" / "datasets")))
    args = ap.parse_args()
    if (args.bank is None) == (args.model is None):
        ap.error("give --bank (compose and train without the source) or --model (score that model)")
    source = HOLDOUTS[args.holdout][0]
    data, run = args.out / "data", args.out / "run"
    t0 = time.time()
    if args.model is None:
        recipe = load_recipe(args.recipe)
        pools, info = sprite_pools(args.bank, recipe, exclude=[source])
        print(f"compose {recipe['name']} without {source} -> {data}", flush=True)
        compose(recipe, pools, data, info, workers=2)
        t1 = time.time()
        print(f"train -> {run}", flush=True)
        summary = train(TrainConfig(data=str(data), out=str(run), arch="unet", width=16, epochs=args.epochs,
                                    steps_per_epoch=args.steps, milestones=(max(1, args.epochs - 2),), weight_power=0.5, dice_weight=0.5,
                                    threads=args.threads, augment=args.augment, stain_jitter=args.stain_jitter, seed=args.seed,
                                    hue_jitter=args.hue_jitter, hue_share=args.hue_share, progress=False))
        stain, hue = args.stain_jitter, [args.hue_jitter, args.hue_share]
        model, recipe_name, augment, budget = run / "best.pt", recipe["name"], args.augment, \
            {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch": 8, "seed": args.seed}
    else:
        t1 = t0
        summary, model = {}, args.model
        cfg = (load_checkpoint(model).get("training") or {}).get("config") or {}
        recipe_name, augment, budget = f"(given model, data {cfg.get('data')})", cfg.get("augment"), None
        stain = cfg.get("stain_jitter", AUGMENT_DEFAULTS.stain_alpha)
        hue = [cfg.get("hue_jitter", AUGMENT_DEFAULTS.hue), cfg.get("hue_share", AUGMENT_DEFAULTS.p_hue)]
        args.out.mkdir(parents=True, exist_ok=True)
    t2 = time.time()
    held = crops(args.datasets, args.holdout)
    typing = type_crops(model, held, args)
    voc = args.datasets / "bccd" / "BCCD"
    bccd_model = model if args.adapt == "none" else \
        adapted_model(model, bccd_images(voc, ("train", "val")), "auto", args.out / "adapt" / "bccd-trainval", args)
    bccd = evaluate_real(bccd_model, voc, layout="voc", split="test", scale="auto",
                         wbc_labels=args.datasets / "bccd" / "wbc_subtype_labels_mooney.csv", progress=False,
                         out=args.out / "bccd-test", balance=args.balance, tta=args.tta)
    result = {"holdout": args.holdout, "source": source, "model": str(model), "left_out": args.model is None,
              "recipe": recipe_name, "augment": augment, "stain_jitter": stain, "hue_jitter_share": hue, "budget": budget,
              "seconds": {"compose": round(t1 - t0), "train": round(t2 - t1), "evaluate": round(time.time() - t2)},
              "best": summary.get("best"), "crops_scale": args.scale, "balance": args.balance, "tta": args.tta, "adapt": args.adapt,
              "source_share": args.source_share, "absent": args.absent,
              "anchor": args.anchor if args.adapt == "self-training" else None,
              "crops": typing,
              "bccd_test": {"groups": {g: r["f1"] for g, r in bccd["groups"].items()},
                            "wbc_subtype": bccd["wbc_subtype"]["accuracy"],
                            "rbc_infected_share": bccd["rbc_infected_share"]}}
    (args.out / "loso.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nleft out {source}; trained on {recipe_name} with --augment {augment}" if args.model is None
          else f"\n{model} (its bank may hold {source})")
    if args.adapt != "none":
        how = "batch-norm statistics re-estimated" if args.adapt == "stats" else "self-trained"
        print(f"{how}: each half of the crops on the other half, BCCD on its train + val")
    print(f"its {typing['images']} crops (--scale {args.scale}): centre cell typed right {100 * typing['accuracy']:.1f}%, "
          f"a white cell found at the centre {100 * typing['found']:.1f}%")
    for c, r in typing["per_class"].items():
        print(f"  {c:<12} {r['n']:>4}  {100 * r['accuracy']:5.1f}%")
    g = result["bccd_test"]["groups"]
    print(f"BCCD test F1: RBC {g['rbc'] or 0:.3f}  WBC {g['wbc'] or 0:.3f}  platelet {g['platelet'] or 0:.3f}  "
          f"subtype {result['bccd_test']['wbc_subtype']}")


if __name__ == "__main__":
    main()
