"""``immunocto run``: the whole pipeline (as far as it is built), or the demo."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from immunocto.cli._common import RichProgress, console, handle_errors
from immunocto.cli.simulate import truth_table
from immunocto.conventions import CLASSES, UNDECIDED_LABELS


@handle_errors
def run(
    config: Path | None = typer.Argument(
        None, help="immunocto.yaml (or its folder). Without it: simulate and run the demo."
    ),
    demo_dir: Path = typer.Option(
        Path("immunocto-demo"), "--demo-dir", help="Where the demo goes."
    ),
    demo_size: int = typer.Option(2048, "--demo-size", help="Demo slide size in pixels."),
    demo_slides: int = typer.Option(2, "--demo-slides", help="Number of demo slides."),
    workers: int = typer.Option(0, "--workers", help="Worker processes (0 = one per CPU)."),
    scheduler: str | None = typer.Option(
        None,
        "--scheduler",
        help="Address of a running Dask scheduler (tcp://host:8786) for the per-tile work.",
    ),
    from_stage: str | None = typer.Option(
        None,
        "--from",
        help="Start at this stage (earlier ones are not run; what it needs must exist or is made).",
    ),
    until: str | None = typer.Option(
        None, "--until", help="Stop after this stage (e.g. --until gate)."
    ),
    dask: bool = typer.Option(
        True,
        "--dask/--no-dask",
        help="Per-tile work as Dask tasks on a LocalCluster of --workers processes (default), or on plain local processes.",
    ),
) -> None:
    """Run every stage built so far.

    With no CONFIG, simulate the demo slide pairs into ./immunocto-demo (reused when already there) and run on them. Stages: register, segment, quantify, gate, build-db, review, train, expand, build-db-v1, train-he, predict, validate.
    """
    import os

    from immunocto.errors import ConfigError
    from immunocto.pipeline import STAGES, run_pipeline
    from immunocto.pipeline.run import select_stages

    try:
        select_stages(from_stage, until)
    except ConfigError as e:
        msg = str(e).replace("`from_stage`", "--from").replace("`until`", "--until")
        raise ConfigError(msg) from None
    with RichProgress() as progress:
        summary = run_pipeline(
            config, demo_dir=demo_dir, demo_size=demo_size, demo_slides=demo_slides,
            workers=workers or os.cpu_count() or 1, scheduler=scheduler, dask=dask,
            from_stage=from_stage, until=until, progress=progress
        )  # fmt: skip
    cfg = summary.config
    slides = Table(title=f"run folder {cfg.run_dir}")
    for col in ("slide", "H&E", "IF", "mpp"):
        slides.add_column(col)
    for s in cfg.slides:
        slides.add_row(s.id, str(s.he), str(s.if_ or "-"), f"{s.mpp:g}")
    console.print(slides)
    if cfg.simulation is not None:
        console.print(truth_table(cfg))
    stages = Table(title="stages")
    stages.add_column("stage")
    stages.add_column("result")
    stages.add_column("seconds", justify="right")
    if "simulate" in summary.seconds:
        what = "simulated the demo" if summary.simulated else "demo already simulated (reused)"
        stages.add_row("simulate", what, f"{summary.seconds['simulate']:.1f}")
    for name, result in summary.stages.items():
        stages.add_row(
            name, ", ".join(f"{k}={v}" for k, v in result.items()), f"{summary.seconds[name]:.1f}"
        )
    if not STAGES:
        stages.add_row("(none yet)", "later stages join `immunocto run` as they are built", "")
    console.print(stages)
    if summary.skip_reason:
        console.print(f"[yellow]skipped the immune-class stages[/]: {summary.skip_reason}")
    if summary.class_counts:
        seen = {c for row in summary.class_counts.values() for c in row}
        known = [*CLASSES, *UNDECIDED_LABELS]
        order = [c for c in known if c in seen] + sorted(seen - set(known))
        counts = Table(title="cells per class at each step")
        counts.add_column("labels")
        for c in order:
            counts.add_column(c, justify="right")
        for name, row in summary.class_counts.items():
            counts.add_row(name, *(str(row.get(c, 0)) if c in row else "-" for c in order))
        console.print(counts)
    report = cfg.run_dir / "reports" / "validation.html"
    if report.exists():
        console.print(f"validation report: {report}")
    if summary.log is not None:
        console.print(f"log: {summary.log}")
    previews = sorted((cfg.run_dir / "preview").glob("*.png"))
    if previews:
        console.print(f"previews: {', '.join(str(p) for p in previews)}")
