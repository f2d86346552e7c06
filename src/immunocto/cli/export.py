"""``immunocto export ...``: formats other tools read."""

from __future__ import annotations

from pathlib import Path

import typer

from immunocto.cli._common import RichProgress, console, handle_errors

app = typer.Typer(
    help="Export cell tables and the cell database for other tools.", no_args_is_help=True
)


@app.command("mcquant")
@handle_errors
def mcquant(
    config: Path = typer.Argument(..., help="immunocto.yaml (or its folder)."),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for the CSVs (default RUN/exports)."
    ),
    stat: str = typer.Option("mean", "--stat", help="Statistic exported as the marker columns."),
) -> None:
    """MCMICRO-style CSV per slide (CellID, marker means, X_centroid, Y_centroid, Area, ...) for scimap."""
    from immunocto.config import load_config
    from immunocto.errors import ImmunoctoError
    from immunocto.quantify.mcquant import write_mcquant_csv
    from immunocto.segment.stage import cells_path

    cfg = load_config(config)
    folder = out or cfg.run_dir / "exports"
    for s in cfg.slides:
        src = cells_path(cfg, s.id)
        if not src.exists():
            raise ImmunoctoError(
                f"{src}: no cell table; run `immunocto segment` and `immunocto quantify` first"
            )
        path = write_mcquant_csv(src, folder / f"{s.id}.csv", stat=stat)
        console.print(f"{s.id}: {path}")


@app.command("geojson")
@handle_errors
def geojson(
    config: Path = typer.Argument(..., help="immunocto.yaml (or its folder)."),
    slide: str = typer.Option(..., "--slide", help="Slide id."),
    out: Path = typer.Option(..., "--out", help="GeoJSON file to write."),
    object_type: str = typer.Option(
        "cell", "--object-type", help="QuPath object type: cell or detection."
    ),
    label_column: str | None = typer.Option(
        None,
        "--label-column",
        help="Label column (default: the most curated present: v1, review, model, gate).",
    ),
) -> None:
    """QuPath GeoJSON FeatureCollection of a slide's cells: mask outlines, classification name + colour, measurements (streamed)."""
    from immunocto.config import load_config
    from immunocto.db.geojson import write_geojson
    from immunocto.errors import ImmunoctoError
    from immunocto.segment.stage import cells_path, mask_path

    cfg = load_config(config)
    ids = [s.id for s in cfg.slides]
    if slide not in ids:
        raise ImmunoctoError(
            f"--slide {slide!r} is not in {cfg.run_dir}/immunocto.yaml (slides: {', '.join(ids)})"
        )
    src = cells_path(cfg, slide)
    if not src.exists():
        raise ImmunoctoError(f"{src}: no cell table; run `immunocto segment` first")
    with RichProgress() as progress:
        path, n = write_geojson(
            src,
            mask_path(cfg, slide),
            out,
            object_type=object_type,
            label_column=label_column,
            progress=progress,
        )
    console.print(f"{slide}: {n} {object_type} objects -> {path}")


@app.command("anndata")
@handle_errors
def anndata(
    config: Path = typer.Argument(..., help="immunocto.yaml (or its folder)."),
    out: Path = typer.Option(..., "--out", help=".h5ad file to write."),
    stat: str = typer.Option(
        "mean", "--stat", help="Statistic used as X (mean, median, p90, ring, cell, ...)."
    ),
    slide: list[str] = typer.Option([], "--slide", help="Only these slide ids (repeatable)."),
) -> None:
    """AnnData .h5ad of every slide's cells (X = marker intensities, obs = labels and morphology, obsm['spatial']) for scanpy / squidpy / scimap."""
    from immunocto.config import load_config
    from immunocto.db.anndata_export import write_anndata
    from immunocto.errors import ImmunoctoError
    from immunocto.segment.stage import cells_path

    cfg = load_config(config)
    chosen = cfg.select_slides(slide)  # an unknown id is an error naming the known ones
    paths = [cells_path(cfg, s.id) for s in chosen]
    for p in paths:
        if not p.exists():
            raise ImmunoctoError(f"{p}: no cell table; run `immunocto quantify` first")
    path = write_anndata(paths, out, stat=stat)
    console.print(f"{len(chosen)} slide(s) -> {path}")


@app.command("immunocto-png")
@handle_errors
def immunocto_png(
    config: Path = typer.Argument(
        ..., help="immunocto.yaml (or its folder) of a run with a cell database."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for <patient>/HE/ and <patient>/mask/."),
) -> None:
    """The cell database in the public Immunocto release layout: <patient>/HE/<class>_<cx>_<cy>.png (cx = column, cy = row) and <patient>/mask/<same name>."""
    from immunocto.config import load_config
    from immunocto.db.immunocto_png import export_png

    folder = config.parent if config.is_file() else config
    run = load_config(config).run_dir if (folder / "immunocto.yaml").exists() else folder
    with RichProgress() as progress:
        n = export_png(run, out, progress=progress)
    console.print(f"{n} cells -> {out}")
