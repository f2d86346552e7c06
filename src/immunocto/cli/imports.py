"""``immunocto import ...``: bring cell databases made elsewhere into a run folder."""

from __future__ import annotations

from pathlib import Path

import typer

from immunocto.cli._common import RichProgress, console, handle_errors

app = typer.Typer(help="Import cell databases from other layouts.", no_args_is_help=True)


@app.command("immunocto-png")
@handle_errors
def immunocto_png(
    src: Path = typer.Argument(
        ...,
        help="Folder in the Immunocto release layout: <patient>/HE/<class>_<cx>_<cy>.png + <patient>/mask/.",
    ),
    out: Path = typer.Option(..., "--out", help="Run folder to hold crops.zarr + crops.parquet."),
    seed: int = typer.Option(0, "--seed", help="Seed of the patient split."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a cell database already in --out."
    ),
) -> None:
    """Import the public Immunocto release (or our own export) as a crop store our datasets and models read."""
    from immunocto.db.immunocto_png import import_png
    from immunocto.db.query import stats

    with RichProgress() as progress:
        n = import_png(src, out, seed=seed, overwrite=overwrite, progress=progress)
    per_split = stats(out).groupby("split")["cells"].sum()
    console.print(
        f"imported {n} cells into {out} ("
        + ", ".join(f"{k} {v}" for k, v in per_split.items())
        + ")"
    )
