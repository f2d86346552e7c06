"""``immunocto segment``: candidate cells of every slide."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from immunocto.cli._common import RichProgress, console, handle_errors


@handle_errors
def segment(
    config: Path = typer.Argument(..., help="immunocto.yaml (or its folder)."),
    backend: str = typer.Option(
        "",
        "--backend",
        help="auto, if-nuclear, if-learned (the fluorescence nucleus network), he (the H&E "
        "nucleus network), he-classical, sam, cellpose or "
        "stardist (default: segmentation.backend).",
    ),
    slide: list[str] = typer.Option([], "--slide", help="Only these slide ids (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Segment again even when nothing changed."),
    workers: int = typer.Option(
        -1, "--workers", help="Processes (0 = one per CPU; default: config)."
    ),
    tile_px: int = typer.Option(0, "--tile-px", help="Tile edge in px (default: config, 1024)."),
    sam_checkpoint: Path | None = typer.Option(
        None, "--sam-checkpoint", help="SAM weights (.pth) for --backend sam."
    ),
    sam_model: str = typer.Option(
        "", "--sam-model", help="vit_h, vit_l, vit_b (or vit_t, a tiny test model)."
    ),
    sam_mode: str = typer.Option(
        "",
        "--sam-mode",
        help="grid (Immunocto: 64x64 prompts per 1024 tile) or guided (one per nucleus).",
    ),
    sam_batch: int = typer.Option(0, "--sam-batch", help="Prompts decoded per batch."),
    sam_random_weights: bool = typer.Option(
        False, "--sam-random-weights", help="No checkpoint: random weights, for timing only."
    ),
    model_path: Path | None = typer.Option(None, "--model-path", help="cellpose/stardist model."),
    nucleus_model: Path | None = typer.Option(
        None,
        "--model",
        help="--backend he / if-learned: a nucleus model folder (`immunocto train --kind nuclei` "
        "/ `--kind if-nuclei`) instead of the shipped one.",
    ),
) -> None:
    """Segment candidate cells into RUN/cells/<slide>.parquet (one row per cell) and RUN/masks/<slide>.zarr (label = cell_id, H&E level-0).

    The default backend is if-learned when the slide has IF (the fluorescence nucleus network on the Hoechst read through the registration; registers first if needed), he (the H&E nucleus network) otherwise.
    """
    from pydantic import ValidationError

    from immunocto.config import ConfigError, format_validation_error, load_config
    from immunocto.segment.stage import run_segment

    cfg = load_config(config)
    params = cfg.segmentation.model_copy(deep=True)
    sam = params.sam.model_copy()
    overrides = {
        "checkpoint": sam_checkpoint,
        "model": sam_model or None,
        "mode": sam_mode or None,
        "points_per_batch": sam_batch or None,
        "random_weights": sam_random_weights or None,
    }
    sam_data = {**sam.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
    top = {
        "workers": workers if workers >= 0 else None,
        "tile_px": tile_px or None,
        "model_path": model_path,
        ("if_nucleus_model" if backend == "if-learned" else "nucleus_model"): (
            nucleus_model.resolve() if nucleus_model else None
        ),
        "backend": backend or None,
    }
    try:
        params = type(params).model_validate(
            {
                **params.model_dump(),
                **{k: v for k, v in top.items() if v is not None},
                "sam": sam_data,
            }
        )
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "immunocto segment options")) from None
    with RichProgress() as progress:
        results = run_segment(
            cfg, slides=slide or None, force=force, params=params, progress=progress
        )
    table = Table(title="segmentation")
    table.add_column("slide", no_wrap=True, min_width=6)
    table.add_column("status", no_wrap=True, min_width=9)
    table.add_column("backend", no_wrap=True)
    table.add_column("cells", justify="right")
    table.add_column("s", justify="right")
    for r in results:
        table.add_row(
            r.slide_id,
            r.status,
            r.backend,
            str(r.n_cells),
            f"{r.seconds:.1f}" if r.status == "segmented" else "-",
        )
    console.print(table)
    for r in results:
        console.print(f"{r.slide_id}: {r.cells}  {r.mask}")
