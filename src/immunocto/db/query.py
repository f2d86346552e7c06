"""``immunocto db stats`` / ``immunocto db query``: DuckDB over the crop index and cell tables.

Two views: ``crops`` (``RUN/crops.parquet``, one row per stored crop) and ``cells`` (every
``RUN/cells/*.parquet``, one row per candidate, all stages' columns; slides may differ in
columns, DuckDB unions them by name).
"""

from __future__ import annotations

import os
from pathlib import Path

from immunocto.errors import ImmunoctoError


def connect(run: str | os.PathLike[str]):
    """An in-memory DuckDB connection with the ``crops`` and ``cells`` views of ``run``."""
    import duckdb

    run = Path(run)
    con = duckdb.connect()
    crops = run / "crops.parquet"
    cells = sorted((run / "cells").glob("*.parquet")) if (run / "cells").is_dir() else []
    if crops.exists():
        con.execute(f"CREATE VIEW crops AS SELECT * FROM read_parquet('{_quote(crops)}')")
    if cells:
        files = ", ".join(f"'{_quote(p)}'" for p in cells)
        con.execute(
            f"CREATE VIEW cells AS SELECT * FROM read_parquet([{files}], union_by_name = true)"
        )
    if not crops.exists() and not cells:
        raise ImmunoctoError(
            f"{run}: no crops.parquet and no cells/*.parquet; is this a run folder?"
        )
    return con


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def query(run: str | os.PathLike[str], sql: str):
    """Run ``sql`` and return a pandas DataFrame (clear error on bad SQL)."""
    import duckdb

    con = connect(run)
    try:
        return con.execute(sql).df()
    except duckdb.Error as err:
        first = str(err).splitlines()[0]
        raise ImmunoctoError(f"query failed: {first} (views: crops, cells)") from None
    finally:
        con.close()


def stats(run: str | os.PathLike[str]):
    """Stored crops per class x slide x version x split (pandas)."""
    if not (Path(run) / "crops.parquet").exists():
        raise ImmunoctoError(f"{run}: no crops.parquet; run `immunocto build-db` first")
    return query(
        run,
        "SELECT version, split, slide_id, label, count(*) AS cells, sum(CAST(border AS INT)) AS border "
        "FROM crops GROUP BY ALL ORDER BY version, split, slide_id, label",
    )
