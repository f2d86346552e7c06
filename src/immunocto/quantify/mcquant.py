"""MCMICRO-style CSV (what mcquant writes and scimap reads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from immunocto._fs import atomic_path
from immunocto.errors import ImmunoctoError

#: Label columns copied when the table has them.
LABEL_COLUMNS = ("gate_label", "review_label", "model_label", "v1_label")
#: Rows converted and written at a time (memory stays flat whatever the slide's size).
BATCH_ROWS = 65_536


def write_mcquant_csv(
    cells_parquet: str | os.PathLike[str], out: str | os.PathLike[str], *, stat: str = "mean"
) -> Path:
    """``CellID``, one column per marker (``<marker>_<stat>``), ``X_centroid``, ``Y_centroid``,
    ``Area``, ``MajorAxisLength``, ``MinorAxisLength``, ``Eccentricity``, ``Solidity``,
    ``Extent`` — coordinates in H&E level-0 pixels. The table is read ``BATCH_ROWS`` rows and
    only the columns needed at a time; the CSV appears complete or not at all."""
    source = pq.ParquetFile(cells_parquet)
    names = source.schema_arrow.names
    suffix = f"_{stat}"
    markers = [c[: -len(suffix)] for c in names if c.endswith(suffix) and c != "area_um2"]
    if not markers:
        raise ImmunoctoError(
            f"{cells_parquet}: no <marker>_{stat} columns; run `immunocto quantify` first"
        )
    shape = ["x", "y", "area_px", "major_axis_px", "minor_axis_px", "eccentricity", "solidity"]
    bbox = ["bbox_x0", "bbox_x1", "bbox_y0", "bbox_y1"]
    labels = [c for c in LABEL_COLUMNS if c in names]
    columns = ["cell_id", *(f"{m}{suffix}" for m in markers), *shape, *bbox, *labels]
    try:
        with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
            first = True
            for batch in source.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                _mcquant_rows(batch.to_pandas(), markers, suffix, labels).to_csv(
                    fh, index=False, header=first
                )
                first = False
            if first:  # no cells: the header alone
                _mcquant_rows(source.schema_arrow.empty_table().select(columns).to_pandas(),
                              markers, suffix, labels).to_csv(fh, index=False)  # fmt: skip
    finally:
        source.close()
    return Path(out)


def _mcquant_rows(df, markers: list[str], suffix: str, labels: list[str]):
    """The MCMICRO columns of one batch of cell-table rows (a pandas DataFrame)."""
    import pandas as pd

    bbox_area = (df["bbox_x1"] - df["bbox_x0"]) * (df["bbox_y1"] - df["bbox_y0"])
    out = pd.DataFrame({"CellID": df["cell_id"].astype(np.int64)})
    for m in markers:
        out[m] = df[f"{m}{suffix}"].astype(np.float64)
    out["X_centroid"] = df["x"]
    out["Y_centroid"] = df["y"]
    out["Area"] = df["area_px"]
    out["MajorAxisLength"] = df["major_axis_px"]
    out["MinorAxisLength"] = df["minor_axis_px"]
    out["Eccentricity"] = df["eccentricity"]
    out["Solidity"] = df["solidity"]
    out["Extent"] = df["area_px"] / bbox_area.clip(lower=1)
    for col in labels:
        out[col] = df[col]
    return out
