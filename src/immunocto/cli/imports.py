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


@app.command("labels")
@handle_errors
def labels(
    table: Path = typer.Argument(
        ...,
        help="CSV/Parquet of points: x, y (H&E px) or x_um, y_um; label; slide_id with several slides.",
    ),
    source: str = typer.Option(..., "--source", help="Name of the source, e.g. pathologist_a."),
    config: Path = typer.Option(..., "--config", help="The run's immunocto.yaml (or its folder)."),
    radius_um: float = typer.Option(4.0, "--radius-um", help="Match points to cells within this."),
) -> None:
    """Import labels from another source (pathologist points, spatial transcriptomics, another pipeline) as source_<NAME>_label in the cell tables; `immunocto validate` compares all sources."""
    from immunocto.config import load_config
    from immunocto.validate.sources import import_labels

    res = import_labels(load_config(config), table, source, radius_um=radius_um)
    for sid, r in res.items():
        console.print(
            f"{sid}: {r['matched']} of {r['points']} points matched within {radius_um:g} µm "
            f"-> source_{source}_label ({r['cells_labelled']} cells)"
        )
