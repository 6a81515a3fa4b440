"""bloodcells command line: thin wrappers that parse, call the library and print."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from bloodcells.errors import BloodcellsError

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
    workers: int = typer.Option(2, "--workers", min=1),
) -> None:
    """Cut sprites out of one dataset folder into BANK (re-running adds nothing twice)."""
    from composer.aliases import AliasTable
    from composer.bank import SpriteBank, parse_fractions
    from composer.sources import list_items

    aliases = AliasTable(AliasTable.parse(alias))
    items = list_items(kind, root, aliases, labels=labels, mask_pattern=mask_pattern, wbc_labels=wbc_labels,
                       include_test=include_test, boxes_csv=boxes_csv)
    summary = SpriteBank(bank).import_items(items, name or f"{kind}:{root.resolve().name}", workers,
                                            parse_fractions(split))
    typer.echo("\n".join(summary.lines()))
    typer.echo(f"bank: {bank}  (see 'cli sprites stats {bank}')")


@sprites_app.command("stats")
def sprites_stats(bank: Path = typer.Argument(Path("sprites"))) -> None:
    """Table of sprites per class x split x source, and rejections by reason."""
    from composer.bank import SpriteBank, format_table

    acc, rej = SpriteBank(bank).stats()
    typer.echo(format_table(acc))
    if len(rej) > 1:
        typer.echo("\n" + format_table(rej))


@sprites_app.command("sheet")
def sprites_sheet(
    bank: Path = typer.Argument(Path("sprites")),
    out: Path = typer.Option(Path("sheet.png"), "--out"),
    split: Optional[str] = typer.Option(None, "--split", help="only this split"),
    per_class: int = typer.Option(12, "--per-class", min=1),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Contact sheet: a row of sprites per class with the mask outline drawn."""
    from bloodcells.imageio import write_png
    from composer.bank import SpriteBank
    from composer.sheet import contact_sheet

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
    workers: int = typer.Option(2, "--workers", min=1),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: render only this shard's canvases"),
    seed: Optional[int] = typer.Option(None, "--seed", help="override the recipe's seed"),
) -> None:
    """Compose 224x224 smear scenes with label maps from a recipe (resumes if interrupted)."""
    from composer.dataset import compose, parse_shard, sprite_pools
    from composer.recipe import load_recipe

    r = load_recipe(recipe, {"seed": seed} if seed is not None else None)
    out = out or Path("data") / r["name"]
    pools, info = sprite_pools(sprites, r)
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
    data: Path = typer.Argument(..., help="a composed dataset folder"),
    split: str = typer.Option("train", "--split"),
    n: int = typer.Option(16, "--n", min=1),
    out: Path = typer.Option(Path("grid.png"), "--out"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Grid of scenes beside their colour-coded label maps, with a legend."""
    from bloodcells.imageio import write_png
    from composer.show import grid

    write_png(out, grid(data, split, n, seed=seed))
    typer.echo(f"wrote {out}")


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
