"""Labels from other sources (pathologist points, spatial-transcriptomics clusters, another
pipeline) matched to our cells, for the ``sources`` section of the validation report.

``import_labels`` reads a table of points — CSV or Parquet with columns ``x``, ``y`` (H&E
level-0 px, ``x`` = column; or ``x_um``, ``y_um``), ``label`` and, with several slides,
``slide_id`` — matches each point one-to-one to the nearest cell centroid within
``radius_um`` (optimal assignment), and writes ``source_<name>_label`` into the cell tables
(``unlabeled`` where no point matched). Labels outside the five classes are kept as given.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from immunocto._fs import atomic_path
from immunocto.config import RunConfig
from immunocto.errors import ImmunoctoError, InputFileError
from immunocto.validate.metrics import match_points

NAME = re.compile(r"^[A-Za-z0-9_]+$")


def read_points(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such label table")
    try:
        df = (
            pd.read_parquet(path)
            if path.suffix.lower() in (".parquet", ".pq")
            else pd.read_csv(path)
        )
    except Exception as err:
        raise InputFileError(
            f"{path}: not a readable CSV/Parquet table ({type(err).__name__})"
        ) from None
    has_px = {"x", "y"} <= set(df.columns)
    has_um = {"x_um", "y_um"} <= set(df.columns)
    if "label" not in df.columns or not (has_px or has_um):
        raise InputFileError(
            f"{path}: needs columns x, y (or x_um, y_um) and label; found {', '.join(map(str, df.columns))}"
        )
    for col in ("x_um", "y_um") if has_um else ("x", "y"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(float))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputFileError(
                f"{path}: column {col} holds {int(bad.sum())} value(s) that are not finite "
                f"numbers (first at data row {row + 1}: {str(df[col].iloc[row])!r}); fix or drop those rows"
            )
        df[col] = values.astype(float)
    return df


def import_labels(
    cfg: RunConfig, table: Path, source: str, *, radius_um: float = 4.0
) -> dict[str, dict[str, int]]:
    """Match ``table``'s points to the cells and write ``source_<source>_label``; returns per
    slide the points, the matched points and the cells labelled."""
    if not NAME.match(source):
        raise ImmunoctoError(
            f"`source` {source!r}: use letters, digits and _ only", arguments=("source",)
        )
    df = read_points(table)
    ids = [s.id for s in cfg.slides]
    if "slide_id" not in df.columns:
        if len(ids) > 1:
            raise InputFileError(
                f"{table}: several slides in the run; add a slide_id column ({', '.join(ids)})"
            )
        df = df.assign(slide_id=ids[0])
    unknown = sorted(set(df["slide_id"].astype(str)) - set(ids))
    if unknown:
        raise InputFileError(
            f"{table}: slide_id {', '.join(unknown)} not in the run ({', '.join(ids)})"
        )
    column = f"source_{source}_label"
    # check every slide before writing any, so a bad table changes nothing
    plans = []
    for s in cfg.slides:
        path = cfg.run_dir / "cells" / f"{s.id}.parquet"
        pts = df[df["slide_id"].astype(str) == s.id]
        if pts.empty:
            continue
        if not path.exists():
            raise ImmunoctoError(f"{path}: no cell table; run `immunocto segment` first")
        cells = pq.read_table(path, columns=["x", "y"]).to_pandas()
        pxy = (
            pts[["x_um", "y_um"]].to_numpy(float)
            if {"x_um", "y_um"} <= set(pts.columns)
            else pts[["x", "y"]].to_numpy(float) * s.mpp
        )
        ti, ci = match_points(pxy, cells[["x", "y"]].to_numpy() * s.mpp, radius_um)
        labels = np.full(len(cells), "unlabeled", dtype=object)
        labels[ci] = pts["label"].astype(str).to_numpy()[ti]
        plans.append((s.id, path, labels, len(pts), len(ti)))
    out = {}
    for sid, path, labels, n_pts, n_match in plans:
        t = pq.read_table(path)
        if column in t.column_names:
            t = t.drop_columns([column])
        t = t.append_column(column, pa.array(labels.astype(str)))
        with atomic_path(path) as tmp:
            pq.write_table(t, tmp, compression="zstd")
        out[sid] = {
            "points": n_pts,
            "matched": n_match,
            "cells_labelled": int((labels != "unlabeled").sum()),
        }
    return out
