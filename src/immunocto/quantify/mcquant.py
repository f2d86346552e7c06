"""MCMICRO-style CSV (what mcquant writes and scimap reads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from immunocto._fs import atomic_path
from immunocto.errors import ImmunoctoError


def write_mcquant_csv(
    cells_parquet: str | os.PathLike[str], out: str | os.PathLike[str], *, stat: str = "mean"
) -> Path:
    """``CellID``, one column per marker (``<marker>_<stat>``), ``X_centroid``, ``Y_centroid``,
    ``Area``, ``MajorAxisLength``, ``MinorAxisLength``, ``Eccentricity``, ``Solidity``,
    ``Extent`` — coordinates in H&E level-0 pixels."""
    import pandas as pd

    table = pq.read_table(cells_parquet)
    suffix = f"_{stat}"
    markers = [
        c[: -len(suffix)] for c in table.column_names if c.endswith(suffix) and c != "area_um2"
    ]
    if not markers:
        raise ImmunoctoError(
            f"{cells_parquet}: no <marker>_{stat} columns; run `immunocto quantify` first"
        )
    df = table.to_pandas()
    bbox_area = (df["bbox_x1"] - df["bbox_x0"]) * (df["bbox_y1"] - df["bbox_y0"])
    out_df = pd.DataFrame({"CellID": df["cell_id"].astype(np.int64)})
    for m in markers:
        out_df[m] = df[f"{m}{suffix}"].astype(np.float64)
    out_df["X_centroid"] = df["x"]
    out_df["Y_centroid"] = df["y"]
    out_df["Area"] = df["area_px"]
    out_df["MajorAxisLength"] = df["major_axis_px"]
    out_df["MinorAxisLength"] = df["minor_axis_px"]
    out_df["Eccentricity"] = df["eccentricity"]
    out_df["Solidity"] = df["solidity"]
    out_df["Extent"] = df["area_px"] / bbox_area.clip(lower=1)
    for col in ("gate_label", "review_label", "model_label", "v1_label"):
        if col in df.columns:
            out_df[col] = df[col]
    with atomic_path(out) as tmp:
        out_df.to_csv(tmp, index=False)
    return Path(out)
