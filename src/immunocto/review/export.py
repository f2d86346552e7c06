"""``immunocto review export``: the reviewers' consensus into the cell tables (version V0).

Per cell, the decisions in force (latest per reviewer) vote; the majority label becomes
``review_label`` (a tie is ``ambiguous``; ``not_cell`` is kept as the reviewers said it; cells
nobody reviewed are ``unlabeled``). Also written: ``review_n`` (reviewers who decided),
``review_agreement`` (fraction of them voting for the majority) and ``review_unsure``.
``immunocto build-db --labels review`` then stores the V0 cells (the five classes only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from immunocto._table import append_columns
from immunocto.errors import ImmunoctoError
from immunocto.review.store import ReviewStore, review_path

REVIEW_COLUMNS = ("review_label", "review_n", "review_agreement", "review_unsure")
META_KEY = b"immunocto.review"


def consensus(latest: pd.DataFrame) -> pd.DataFrame:
    """One row per reviewed cell (slide_id, cell_id) with the columns of :data:`REVIEW_COLUMNS`."""
    if latest.empty:
        return pd.DataFrame(columns=["slide_id", "cell_id", *REVIEW_COLUMNS])
    votes = latest.groupby(["slide_id", "cell_id", "label"]).size().rename("votes").reset_index()
    n = latest.groupby(["slide_id", "cell_id"]).size().rename("review_n")
    unsure = (
        latest.groupby(["slide_id", "cell_id"])["unsure"].max().astype(bool).rename("review_unsure")
    )
    top = votes.groupby(["slide_id", "cell_id"])["votes"].transform("max")
    winners = votes[votes["votes"] == top]
    n_winners = winners.groupby(["slide_id", "cell_id"])["label"].transform("size")
    winners = winners.assign(review_label=np.where(n_winners > 1, "ambiguous", winners["label"]))
    winners = winners.drop_duplicates(["slide_id", "cell_id"]).set_index(["slide_id", "cell_id"])
    out = pd.concat([winners[["review_label", "votes"]], n, unsure], axis=1).reset_index()
    out["review_agreement"] = (out["votes"] / out["review_n"]).astype(np.float32)
    return out.drop(columns="votes")[["slide_id", "cell_id", *REVIEW_COLUMNS]]


def export_reviews(run: str | os.PathLike[str]) -> dict[str, dict[str, int]]:
    """Write the review columns into every ``RUN/cells/<slide>.parquet``; returns counts of
    ``review_label`` per slide."""
    run = Path(run)
    path = review_path(run)
    if not path.exists():
        raise ImmunoctoError(
            f"{path}: no reviews yet; run `immunocto review serve` and label some cells"
        )
    tables = sorted((run / "cells").glob("*.parquet")) if (run / "cells").is_dir() else []
    if not tables:
        raise ImmunoctoError(
            f"{run}: no cells/*.parquet to write review labels into (an imported database has none)"
        )
    votes = consensus(ReviewStore(path).latest())
    counts: dict[str, dict[str, int]] = {}
    for table_path in tables:
        sid = table_path.stem
        ids = pq.read_table(table_path, columns=["cell_id"]).column("cell_id").to_numpy()
        cells = pd.DataFrame({"cell_id": ids})
        mine = votes[votes["slide_id"] == sid].drop(columns="slide_id")
        merged = cells.merge(mine, on="cell_id", how="left")
        label = np.where(
            merged["review_label"].isna(), "unlabeled", merged["review_label"].astype(str)
        )
        new = {
            "review_label": pa.array(label),
            "review_n": pa.array(merged["review_n"].fillna(0).astype(np.int32).to_numpy()),
            "review_agreement": pa.array(merged["review_agreement"].astype(np.float32).to_numpy()),
            "review_unsure": pa.array(merged["review_unsure"].to_numpy(dtype=object) == True),  # noqa: E712 (NaN -> False)
        }
        meta = {"stage": "review", "reviewed": int((merged["review_n"].fillna(0) > 0).sum())}
        # streamed one row group at a time: the slide's table is never held whole
        append_columns(
            table_path, new, drop=REVIEW_COLUMNS, meta={META_KEY: json.dumps(meta).encode()}
        )
        values, n = np.unique(label, return_counts=True)
        counts[sid] = {str(v): int(c) for v, c in zip(values, n, strict=True)}
    return counts
