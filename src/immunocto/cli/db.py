"""``immunocto build-db`` and ``immunocto db stats|query|gallery``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from immunocto.cli._common import RichProgress, console, handle_errors

app = typer.Typer(
    help="Look into a cell database: stats, SQL queries, contact sheets.", no_args_is_help=True
)


def _run_folder(path: Path) -> Path:
    """A run folder given as the folder or its immunocto.yaml."""
    from immunocto.errors import ImmunoctoError

    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise ImmunoctoError(f"{path}: no such run folder")
    return folder


def _split_fractions(text: str) -> tuple[float, float, float]:
    from immunocto.errors import ImmunoctoError

    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise ImmunoctoError(
            f"--splits must be three non-negative numbers like 0.7,0.15,0.15 (got {text!r})"
        )
    return parts  # type: ignore[return-value]


@handle_errors
def build_db(
    config: Path = typer.Argument(..., help="immunocto.yaml (or its folder)."),
    labels: str = typer.Option(
        "gate",
        "--labels",
        help="Which labels: gate (gate_label), review (V0, review_label) or v1 (V1, v1_label).",
    ),
    no_if: bool = typer.Option(False, "--no-if", help="Store H&E and masks only (no IF crops)."),
    rebuild: bool = typer.Option(
        False, "--rebuild", help="Start the store afresh (reclaims space of replaced slides)."
    ),
    splits: str = typer.Option(
        "0.7,0.15,0.15", "--splits", help="train,val,test fractions of patients."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the patient split (recorded in the index)."
    ),
    workers: int = typer.Option(0, "--workers", help="Worker processes (0 = one per CPU)."),
    out: Path | None = typer.Option(
        None, "--out", help="Database folder (default: the run folder; RUN/v1 for --labels v1)."
    ),
) -> None:
    """64x64 crops at 0.325 um/px (+mask, +IF) of the labelled cells into DB/crops.zarr, indexed by DB/crops.parquet (DB = the run folder, or RUN/v1 for V1); only changed slides are re-cut."""
    from immunocto.config import load_config
    from immunocto.db import build_db as build
    from immunocto.db import read_index, store_path
    from immunocto.db.build import db_folder

    cfg = load_config(config)
    folder = out if out is not None else db_folder(cfg.run_dir, labels)
    with RichProgress() as progress:
        results = build(
            cfg, labels=labels, with_if=not no_if, rebuild=rebuild, split_fractions=_split_fractions(splits),
            seed=seed, workers=workers or None, progress=progress, out=folder,
        )  # fmt: skip
    table = Table(title=f"cell database {store_path(folder)}")
    for col in ("slide", "status", "split", "cells", "cells/s"):
        table.add_column(col, no_wrap=True)
    for r in results:
        rate = f"{r.cells / r.seconds:,.0f}" if r.status == "built" and r.seconds > 0 else "-"
        table.add_row(r.slide_id, r.status, r.split, str(r.cells), rate)
    console.print(table)
    index, _ = read_index(folder)
    size = sum(f.stat().st_size for f in store_path(folder).rglob("*") if f.is_file())
    per = size / max(index.num_rows, 1)
    console.print(
        f"{index.num_rows} crops, {size / 2**20:.1f} MiB on disk ({per / 1024:.1f} kB per cell incl. space of replaced slides)"
    )


@app.command("stats")
@handle_errors
def stats(run: Path = typer.Argument(..., help="Run folder (or its immunocto.yaml).")) -> None:
    """Stored cells per version, split, slide and class."""
    from immunocto.db.query import stats as db_stats

    df = db_stats(_run_folder(run))
    table = Table(title=f"cell database of {run}")
    for col in df.columns:
        table.add_column(
            col, no_wrap=True, justify="right" if col in ("cells", "border") else "left"
        )
    for row in df.itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    console.print(table)
    totals = df.groupby("label")["cells"].sum()
    console.print(
        "per class: "
        + ", ".join(f"{k} {v}" for k, v in totals.items())
        + f"; total {int(totals.sum())}"
    )


@app.command("query")
@handle_errors
def query(
    run: Path = typer.Argument(..., help="Run folder (or its immunocto.yaml)."),
    sql: str = typer.Argument(
        ..., help="SQL over the views `crops` (the index) and `cells` (all cell tables)."
    ),
    csv: Path | None = typer.Option(
        None, "--csv", help="Write the whole result to this CSV instead of printing it."
    ),
    limit: int = typer.Option(50, "--limit", help="Rows printed (the CSV gets them all)."),
) -> None:
    """DuckDB SQL over the crop index and the cell tables, e.g. "SELECT label, count(*) FROM crops GROUP BY label"."""
    from immunocto._fs import atomic_path
    from immunocto.db.query import query as db_query

    df = db_query(_run_folder(run), sql)
    if csv is not None:
        with atomic_path(csv) as tmp:
            df.to_csv(tmp, index=False)
        console.print(f"{len(df)} rows -> {csv}")
        return
    table = Table(title=f"{len(df)} rows" + (f" (first {limit})" if len(df) > limit else ""))
    for col in df.columns:
        table.add_column(str(col), no_wrap=True)
    for row in df.head(limit).itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


@app.command("gallery")
@handle_errors
def gallery(
    run: Path = typer.Argument(..., help="Run folder (or its immunocto.yaml)."),
    label: str | None = typer.Option(
        None, "--label", help="Only this class (cd4_t, cd8_t, b_cell, macrophage, other)."
    ),
    n: int = typer.Option(100, "-n", help="Number of cells."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    seed: int = typer.Option(0, "--seed", help="Which random cells."),
) -> None:
    """Contact sheet: H&E crops with the mask contour, beside an IF composite when the store has IF."""
    from immunocto.db.gallery import gallery as make_gallery

    path = make_gallery(_run_folder(run), out, label=label, n=n, seed=seed)
    console.print(f"gallery: {path}")
