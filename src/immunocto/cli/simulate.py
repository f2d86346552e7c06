"""``immunocto simulate``: synthetic co-registered slide pairs with ground truth."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from immunocto.cli._common import RichProgress, console, handle_errors
from immunocto.conventions import CLASSES
from immunocto.errors import ImmunoctoError


def parse_artifact_overrides(items: list[str]) -> dict[str, float]:
    """``["spillover=2", "out_of_focus=0"]`` -> ``{"spillover": 2.0, "out_of_focus": 0.0}``."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ImmunoctoError(f"--artifact {item!r}: expected NAME=STRENGTH, e.g. spillover=2")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ImmunoctoError(
                f"--artifact {item!r}: strength {value!r} is not a number"
            ) from None
    return out


@handle_errors
def simulate(
    out: Path = typer.Argument(
        ..., help="Run folder to create (an earlier simulation there is replaced)."
    ),
    size: int = typer.Option(2048, "--size", help="Slide width and height in pixels (at --mpp)."),
    mpp: float = typer.Option(
        0.325,
        "--mpp",
        min=0.1,
        max=2.0,
        help="Microns per pixel of both images (cells keep their size in µm).",
    ),
    slides: int = typer.Option(1, "--slides", help="Number of slide pairs (sim000, sim001, ...)."),
    seed: int = typer.Option(
        0, "--seed", help="Random seed: the same seed gives byte-identical slides."
    ),
    artifacts: str = typer.Option(
        "default", "--artifacts", help="Artifact preset: none, default, harsh or weak-stain."
    ),
    artifact: list[str] = typer.Option(
        [],
        "--artifact",
        help="Set one artifact's strength, e.g. --artifact spillover=2 (repeatable).",
    ),
    preview: bool = typer.Option(False, "--preview", help="Also write preview/<slide>.png."),
    tile: int = typer.Option(512, "--tile", help="Tile edge in pixels (multiple of 16)."),
    workers: int = typer.Option(0, "--workers", help="Rendering processes (0 = one per CPU)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder."),
) -> None:
    """Simulate co-registered H&E + 19-channel IF slide pairs with known cell types.

    Writes OUT/immunocto.yaml (ready for `immunocto run`), OUT/slides/<id>/{he,if}.ome.tif and markers.csv, and the ground truth in OUT/truth/<id>/ (cells.parquet, nuclei.tif, cells.tif, registration.json, artifacts.json).
    """
    from immunocto.simulate.dataset import simulate_dataset

    t0 = time.perf_counter()
    with RichProgress() as progress:
        cfg = simulate_dataset(
            out,
            size=size,
            slides=slides,
            seed=seed,
            artifacts=artifacts,
            artifact_overrides=parse_artifact_overrides(artifact),
            tile=tile,
            mpp=mpp,
            workers=workers or None,
            preview=preview,
            force=force,
            progress=progress,
        )
    console.print(truth_table(cfg))
    console.print(
        f"wrote [bold]{cfg.run_dir}[/] in {time.perf_counter() - t0:.1f} s; "
        f"next: [bold]immunocto run {cfg.run_dir / 'immunocto.yaml'}[/]"
    )


def truth_table(cfg) -> Table:
    """True cells per class and slide of a simulated run."""
    import pyarrow.parquet as pq

    table = Table(title="simulated slides (ground truth)")
    table.add_column("slide")
    for c in CLASSES:
        table.add_column(c, justify="right")
    table.add_column("cells", justify="right")
    truth = cfg.resolve(cfg.simulation.truth) if cfg.simulation else None
    for slide in cfg.slides:
        path = truth / slide.id / "cells.parquet" if truth else None
        if path is None or not path.exists():
            table.add_row(slide.id, *["-"] * (len(CLASSES) + 1))
            continue
        classes = pq.read_table(path, columns=["class"]).column("class").to_pylist()
        table.add_row(slide.id, *[str(classes.count(c)) for c in CLASSES], str(len(classes)))
    return table
