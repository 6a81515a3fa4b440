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
