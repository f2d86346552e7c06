"""``immunocto validate ...``: metrics against references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from rich.table import Table
from typer.core import TyperGroup

from immunocto.cli._common import console, handle_errors
from immunocto.errors import InputFileError


class _ReportByDefault(TyperGroup):
    """``immunocto validate CONFIG`` means ``immunocto validate report CONFIG``."""

    def parse_args(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["report", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    help="Validation: the label-noise report (`immunocto validate CONFIG`) and metrics against truth.",
    no_args_is_help=True,
    cls=_ReportByDefault,
)


@app.command("report")
@handle_errors
def report(
    config: Path = typer.Argument(..., help="immunocto.yaml (or its folder), after `gate`."),
) -> None:
    """Write RUN/reports/validation.html (self-contained) and validation.json: ambiguity, threshold sensitivity, agreement, partial labels, bias audit, quality vs truth, label sources."""
    from immunocto.cli._common import RichProgress
    from immunocto.config import load_config
    from immunocto.validate.html import TITLES
    from immunocto.validate.report import run_validate

    with RichProgress() as progress:
        jpath, hpath, rep = run_validate(load_config(config), progress=progress)
    for key, title in TITLES.items():
        console.print(f"[bold]{title}[/bold]: {rep[key]['conclusion']}")
    console.print(f"wrote {hpath} and {jpath}")


def read_labels(path: Path) -> np.ndarray:
    """A whole instance label image from a TIFF or a zarr folder (e.g. RUN/masks/<slide>.zarr)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputFileError(f"{path}: label image not found")
    if path.is_dir():
        import zarr

        try:
            return np.asarray(zarr.open_array(str(path), mode="r")[:])
        except Exception as err:
            raise InputFileError(f"{path}: not a zarr label array ({type(err).__name__})") from None
    from immunocto.io import open_slide

    with open_slide(path) as s:
        if s.kind != "fluorescence" or len(s.channel_names) != 1:
            raise InputFileError(f"{path}: expected a single-channel label image, found {s.shape}")
        return s.read_level(0)[0]


@app.command("segmentation")
@handle_errors
def segmentation(
    truth: Path = typer.Option(..., "--truth", help="Reference instance labels (TIFF or zarr)."),
    pred: Path = typer.Option(..., "--pred", help="Predicted instance labels (TIFF or zarr)."),
    mpp: float = typer.Option(0.325, "--mpp", help="Microns per pixel, for the centroid radius."),
    radius_um: float = typer.Option(4.0, "--radius-um", help="Centroid match radius in µm."),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the numbers to this file."
    ),
) -> None:
    """Object Dice, AJI, PQ, and detection precision/recall/F1 (IoU >= 0.5 and centroid within --radius-um) of two label images."""
    from immunocto.validate import segmentation_report

    t = read_labels(truth)
    p = read_labels(pred)
    if t.shape != p.shape:
        raise InputFileError(
            f"{pred}: shape {p.shape} differs from the truth {truth} {t.shape}; compare the same region"
        )
    report = segmentation_report(t, p, mpp=mpp, radius_um=radius_um)
    table = Table(title=f"segmentation: {pred.name} vs {truth.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.items():
        if isinstance(value, dict):
            table.add_row(
                key,
                ", ".join(
                    f"{k}={v}" for k, v in value.items() if k in ("precision", "recall", "f1")
                ),
            )
        else:
            table.add_row(key, str(value))
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")


@app.command("detection")
@handle_errors
def detection(
    truth: Path = typer.Option(
        ..., "--truth", help="Truth cells (Parquet: x, y, class), e.g. truth/<slide>/cells.parquet."
    ),
    pred: Path = typer.Option(
        ..., "--pred", help="Predicted cells (Parquet: x, y, pred_label), e.g. from `predict`."
    ),
    label_column: str = typer.Option("pred_label", "--label-column"),
    truth_column: str = typer.Option("class", "--truth-column"),
    mpp: float | None = typer.Option(
        None, "--mpp", help="µm per pixel (default: from the prediction table's x_um)."
    ),
    radius_um: float = typer.Option(4.0, "--radius-um", help="Centroid match radius in µm."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the numbers here."),
) -> None:
    """Typed detection: per-class precision/recall/F1 with one-to-one centroid matching, lymphocyte (cd4_t ∪ cd8_t ∪ b_cell) and macrophage F1."""
    from immunocto.validate.detection import evaluate_tables

    for p in (truth, pred):
        if not p.exists():
            raise InputFileError(f"{p}: not found")
    report = evaluate_tables(
        truth,
        pred,
        mpp=mpp,
        radius_um=radius_um,
        label_column=label_column,
        truth_column=truth_column,
    )
    table = Table(title=f"typed detection within {radius_um:g} µm: {pred.name} vs {truth.name}")
    for col in ("class", "precision", "recall", "F1", "true", "predicted"):
        table.add_column(col, justify="left" if col == "class" else "right")

    def row(name: str, d: dict) -> None:
        table.add_row(
            name,
            f"{d['precision']:.3f}",
            f"{d['recall']:.3f}",
            f"{d['f1']:.3f}",
            str(d["tp"] + d["fn"]),
            str(d["tp"] + d["fp"]),
        )

    row("detection (any class)", report["all"])
    for c, d in report.get("by_class", {}).items():
        row(c, d)
    for c, d in report["groups"].items():
        row(f"{c} (any subtype)", d)
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")
