"""Cell tables rewritten a row group at a time.

Later stages add columns to ``RUN/cells/<slide>.parquet`` (gate labels, model outputs). They
read only the columns they need and append theirs here, streaming the file: memory holds one
row group of the table plus the new columns, never the whole table (a quantified slide carries
~150 columns; the new ones are a few bytes per cell).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from immunocto._fs import atomic_path
from immunocto.errors import ImmunoctoError

#: Rows per Parquet row group of the cell tables we write, and per batch while rewriting one:
#: the memory a rewrite holds (a quantified row group of 16,384 cells is ~15 MB raw, and the
#: reader, the new columns and the writer's encoded pages each hold about that much).
ROW_GROUP = 16384


def rewrite_table(
    path: str | os.PathLike[str],
    fields: list[pa.Field],
    columns_for: Callable[[pa.RecordBatch, int], list[Any]],
    *,
    drop: Iterable[str] = (),
    meta: Mapping[bytes, bytes] | None = None,
    row_group: int | None = None,
) -> Path:
    """Rewrite the table at ``path`` (atomically) one row group (``row_group`` rows, default
    :data:`ROW_GROUP`) at a time: the columns in ``drop`` are removed, a column named by
    ``fields`` that the table holds already is replaced where it stands, and the other
    ``fields`` are appended (so the column order does not depend on how often a stage ran).

    ``columns_for(batch, r0)`` returns the new columns (in ``fields`` order) for the rows
    ``r0 .. r0 + len(batch)`` of the table; ``batch`` holds the kept columns of those rows.
    ``meta`` entries are set in the schema metadata (the others are kept).
    """
    path = Path(path)
    source = pq.ParquetFile(path)
    try:
        new_at = {f.name: i for i, f in enumerate(fields)}
        gone = set(drop) - set(new_at)
        keep = [f for f in source.schema_arrow if f.name not in gone and f.name not in new_at]
        # (kept column name, None) or (None, index into fields), in the output order
        order: list[tuple[str | None, int | None]] = []
        for f in source.schema_arrow:
            if f.name in new_at:
                order.append((None, new_at[f.name]))
            elif f.name not in gone:
                order.append((f.name, None))
        present = {f.name for f in source.schema_arrow}
        order += [(None, i) for i, f in enumerate(fields) if f.name not in present]
        md = dict(source.schema_arrow.metadata or {})
        md.update(meta or {})
        schema = pa.schema(
            [source.schema_arrow.field(n) if n else fields[i] for n, i in order], metadata=md
        )
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as out:
            r0 = 0
            batches = source.iter_batches(
                batch_size=row_group or ROW_GROUP, columns=[f.name for f in keep]
            )
            for batch in batches:
                added = columns_for(batch, r0)
                cols = [batch.column(n) if n else added[i] for n, i in order]
                out.write_table(pa.Table.from_arrays(cols, schema=schema))
                r0 += batch.num_rows
            if r0 == 0:
                out.write_table(schema.empty_table())
    finally:
        source.close()
    return path


def append_columns(
    path: str | os.PathLike[str],
    new: Mapping[str, Any],
    *,
    drop: Iterable[str] = (),
    meta: Mapping[bytes, bytes] | None = None,
) -> Path:
    """Rewrite the table at ``path`` with ``new`` columns appended (atomically).

    Parameters
    ----------
    new : mapping name -> (n,) array (numpy or Arrow), n = the table's rows, in row order.
        A column of that name already in the table is replaced.
    drop : columns removed as well (e.g. an earlier run's columns of the same stage).
    meta : schema metadata entries to set (others are kept).
    """
    n = pq.read_metadata(path).num_rows
    arrays = {k: v if isinstance(v, pa.Array | pa.ChunkedArray) else pa.array(v)
              for k, v in new.items()}  # fmt: skip
    for k, v in arrays.items():
        if len(v) != n:
            raise ImmunoctoError(f"{path}: column {k} has {len(v)} values for {n} rows")
    return rewrite_table(
        path,
        [pa.field(k, v.type) for k, v in arrays.items()],
        lambda batch, r0: [v.slice(r0, batch.num_rows) for v in arrays.values()],
        drop=drop,
        meta=meta,
    )


def column_names(path: str | os.PathLike[str]) -> list[str]:
    """The table's column names (read from the footer only)."""
    return list(pq.read_schema(path).names)


def read_columns(path: str | os.PathLike[str], columns: Iterable[str]) -> dict[str, np.ndarray]:
    """Some columns of a table as numpy arrays (strings as object arrays)."""
    table = pq.read_table(path, columns=list(columns))
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
