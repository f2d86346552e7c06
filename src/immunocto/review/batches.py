"""Which cells a reviewer sees next: ``random``, ``stratified`` (by proposed class),
``margin`` (lowest ``gate_margin`` first) or ``disagreements`` (cells reviewers disagree on
first, then cells a reviewer labelled differently from the automatic label)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from immunocto.db.store import read_index
from immunocto.errors import ImmunoctoError

STRATEGIES = ("random", "stratified", "margin", "disagreements")


def candidates(run: str | os.PathLike[str]) -> pd.DataFrame:
    """The crop index with ``gate_margin`` from the cell tables where there are any
    (columns row, slide_id, cell_id, x, y, label, gate_margin)."""
    index, _ = read_index(run)
    if index.num_rows == 0:
        raise ImmunoctoError(f"{run}: no cell database to review; run `immunocto build-db` first")
    df = index.select(["row", "slide_id", "cell_id", "x", "y", "label"]).to_pandas()
    margins = []
    for sid in df["slide_id"].unique():
        path = Path(run) / "cells" / f"{sid}.parquet"
        if path.exists() and "gate_margin" in pq.read_schema(path).names:
            margins.append(
                pq.read_table(path, columns=["cell_id", "gate_margin"])
                .to_pandas()
                .assign(slide_id=sid)
            )
    if margins:
        df = df.merge(pd.concat(margins), on=["slide_id", "cell_id"], how="left")
    else:
        df["gate_margin"] = np.nan
    return df.sort_values("row").reset_index(drop=True)


def _seed(reviewer: str, seed: int) -> list[int]:
    return [seed, zlib.crc32(reviewer.encode())]


def next_batch(
    cands: pd.DataFrame,
    latest: pd.DataFrame,
    reviewer: str,
    *,
    strategy: str = "random",
    size: int = 24,
    seed: int = 0,
) -> pd.DataFrame:
    """The next ``size`` cells ``reviewer`` has not decided, in the strategy's order.

    ``latest`` is ``ReviewStore.latest()``. The order is fixed per reviewer and seed, so a
    reloaded page shows the same cells.
    """
    if strategy not in STRATEGIES:
        raise ImmunoctoError(
            f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    done = set(latest.loc[latest["reviewer"] == reviewer, "row"].astype(int))
    todo = cands[~cands["row"].isin(done)]
    rng = np.random.default_rng(_seed(reviewer, seed))
    shuffled = todo.iloc[rng.permutation(len(todo))]
    if strategy == "random":
        ordered = shuffled
    elif strategy == "stratified":
        # round-robin over proposed classes: the k-th cell of every class, then the (k+1)-th
        rank = shuffled.groupby("label").cumcount()
        ordered = (
            shuffled.assign(_rank=rank.to_numpy())
            .sort_values(["_rank", "label"], kind="stable")
            .drop(columns="_rank")
        )
    elif strategy == "margin":
        ordered = shuffled.sort_values("gate_margin", kind="stable", na_position="last")
    else:
        others = latest[latest["reviewer"] != reviewer]
        auto = cands.set_index("row")["label"]
        n_labels = latest.groupby("row")["label"].nunique()
        vs_auto = others[others["label"].to_numpy() != auto.reindex(others["row"]).to_numpy()][
            "row"
        ]
        score = pd.Series(0, index=shuffled["row"].to_numpy())
        score[score.index.isin(vs_auto)] = 1
        score[score.index.isin(n_labels[n_labels > 1].index)] = 2
        ordered = (
            shuffled.assign(_score=score.to_numpy())
            .sort_values("_score", ascending=False, kind="stable")
            .drop(columns="_score")
        )
    return ordered.head(size).reset_index(drop=True)
