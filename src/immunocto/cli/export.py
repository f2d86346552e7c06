"""``immunocto export ...``: formats other tools read."""

from __future__ import annotations

from pathlib import Path

import typer

from immunocto.cli._common import console, handle_errors

app = typer.Typer(help="Export cell tables for other tools.", no_args_is_help=True)


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
