"""``immunocto register``: H&E -> IF registration with QA."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from immunocto.cli._common import RichProgress, console, handle_errors


@handle_errors
def register(
    config: Path = typer.Argument(..., help="immunocto.yaml (or its folder)."),
    slide: list[str] = typer.Option([], "--slide", help="Only these slide ids (repeatable)."),
    force: bool = typer.Option(
        False, "--force", help="Register again even when inputs and parameters are unchanged."
    ),
) -> None:
    """Estimate each slide's H&E -> IF transform (affine + per-tile residual grid).

    Writes RUN/registration/<slide>.json and <slide>_residual.png; tiles whose residual exceeds registration.max_residual_px are flagged.
    """
    from immunocto.config import load_config
    from immunocto.register.stage import run_register

    cfg = load_config(config)
    with RichProgress() as progress:
        results = run_register(cfg, slides=slide or None, force=force, progress=progress)
    table = Table(title="registration")
    table.add_column("slide", no_wrap=True, min_width=6)
    table.add_column("status", no_wrap=True, min_width=10)
    for col in ("rotation °", "shift px", "tiles", "residual px (median/max)", "flagged", "s"):
        table.add_column(col, justify="right")
    for r in results:
        if r.model is None:
            table.add_row(r.slide_id, r.status, *["-"] * 6)
            continue
        s = r.model.stats
        table.add_row(
            r.slide_id,
            r.status,
            f"{s['rotation_deg']:.3f}",
            ", ".join(f"{v:.1f}" for v in s["translation_px"]),
            f"{s['tiles_matched']}/{s['tiles_on_tissue']}",
            f"{s['residual_median_px']} / {s['residual_max_px']}",
            str(s["tiles_flagged"]),
            f"{r.seconds:.1f}" if r.status == "registered" else "-",
        )
    console.print(table)
    for r in results:
        if r.path is not None:
            console.print(
                f"{r.slide_id}: {r.path} (heat map {r.path.with_name(r.slide_id + '_residual.png')})"
            )
