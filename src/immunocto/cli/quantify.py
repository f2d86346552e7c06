"""``immunocto quantify`` and ``immunocto gate``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from immunocto.cli._common import RichProgress, console, handle_errors


@handle_errors
def quantify(
    config: Path = typer.Argument(..., help="immunocto.yaml (or its folder)."),
    slide: list[str] = typer.Option([], "--slide", help="Only these slide ids (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Quantify again even when nothing changed."),
) -> None:
    """Per-cell IF statistics (<marker>_mean, _median, _p90, _nucmean, _ring, _ringmed, _cell, _bg) into RUN/cells/<slide>.parquet, on raw IF pixels through the registration."""
    from immunocto.config import load_config
    from immunocto.quantify import run_quantify

    cfg = load_config(config)
    with RichProgress() as progress:
        results = run_quantify(cfg, slides=slide or None, force=force, progress=progress)
    table = Table(title="quantification")
    for col in ("slide", "status", "cells", "columns", "s"):
        table.add_column(col, no_wrap=True)
    for r in results:
        table.add_row(
            r.slide_id,
            r.status,
            str(r.n_cells),
            str(r.columns),
            f"{r.seconds:.1f}" if r.status == "quantified" else "-",
        )
    console.print(table)


@handle_errors
def gate(
    config: Path = typer.Argument(..., help="immunocto.yaml (or its folder)."),
    slide: list[str] = typer.Option([], "--slide", help="Only these slide ids (repeatable)."),
    sensitivity: bool = typer.Option(
        False,
        "--sensitivity",
        help="Also scale every threshold by gating.sensitivity_factors and report flips.",
    ),
) -> None:
    """Label cells down the gating tree (gate_label, gate_margin, gate_reason) with iterative thresholds; writes RUN/gating/<slide>.json and RUN/figures/<slide>_gates.png (and _sensitivity.png)."""
    from immunocto.config import load_config
    from immunocto.phenotype import run_gate

    cfg = load_config(config)
    with RichProgress() as progress:
        results = run_gate(
            cfg, slides=slide or None, with_sensitivity=sensitivity, progress=progress
        )
    labels: list[str] = []
    for r in results:
        labels += [k for k in r.counts if k not in labels]
    table = Table(title="gating")
    table.add_column("slide", no_wrap=True)
    for lab in labels:
        table.add_column(lab, justify="right")
    table.add_column("iterations", justify="right")
    for r in results:
        table.add_row(r.slide_id, *[str(r.counts.get(lab, 0)) for lab in labels], str(r.iterations))
    console.print(table)
    for r in results:
        if r.sensitivity:
            fs = sorted(r.sensitivity)
            console.print(
                f"{r.slide_id}: counts at x{fs[0]:g} / x1 / x{fs[-1]:g}: "
                + ", ".join(
                    f"{lab} {r.sensitivity[fs[0]].get(lab, 0)}/{r.counts.get(lab, 0)}/{r.sensitivity[fs[-1]].get(lab, 0)}"
                    for lab in labels
                )
            )
        console.print(f"{r.slide_id}: {r.report}")
