"""AnnData ``.h5ad`` of the cell tables, for scanpy / squidpy / scimap.

``X`` = per-cell marker intensities (``<marker>_<stat>``, cells x markers), ``var_names`` =
markers, ``obs`` = slide, cell id, morphology, every label column and margin, ``obsm['spatial']``
= ``(x, y)`` H&E level-0 pixels (``x`` = column), ``uns['immunocto']`` = provenance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from immunocto._fs import atomic_path
from immunocto.errors import ImmunoctoError

OBS_COLUMNS = (
    "slide_id", "cell_id", "x_um", "y_um", "area_px", "area_um2", "eccentricity", "solidity",
    "seg_source", "seg_score", "nuclear_confirmed", "gate_label", "gate_margin", "gate_reason",
    "gate_stability", "review_label", "model_label", "v1_label",
)  # fmt: skip


def write_anndata(
    cell_tables: list[str | os.PathLike[str]], out: str | os.PathLike[str], *, stat: str = "mean"
) -> Path:
    """Concatenate the slides' cell tables into one ``.h5ad``."""
    import anndata as ad

    frames, markers = [], None
    for path in cell_tables:
        table = pq.read_table(path)
        ms = [
            c[: -len(stat) - 1]
            for c in table.column_names
            if c.endswith(f"_{stat}") and c != "area_um2"
        ]
        if not ms:
            raise ImmunoctoError(
                f"{path}: no <marker>_{stat} columns; run `immunocto quantify` first"
            )
        if markers is None:
            markers = ms
        elif ms != markers:
            raise ImmunoctoError(
                f"{path}: markers differ from the other slides ({', '.join(ms)}); export slides separately"
            )
        frames.append(table.to_pandas())
    df = pd.concat(frames, ignore_index=True)
    X = df[[f"{m}_{stat}" for m in markers]].to_numpy(np.float32)
    obs = df[[c for c in OBS_COLUMNS if c in df.columns]].copy()
    for c in obs.columns:
        if obs[c].dtype == object:
            obs[c] = obs[c].astype(str).astype("category")
    obs.index = (df["slide_id"].astype(str) + ":" + df["cell_id"].astype(str)).to_numpy()
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(markers)))
    adata.obsm["spatial"] = df[["x", "y"]].to_numpy(np.float64)
    adata.uns["immunocto"] = json.dumps(
        {"stat": stat, "spatial": "H&E level-0 pixels (x = column, y = row)"}
    )
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    return Path(out)
