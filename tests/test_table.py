"""Columns appended to a cell table a row group at a time equal an in-memory rewrite."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import immunocto._table as tbl
from immunocto.errors import ImmunoctoError


def _write(path, n):
    rng = np.random.default_rng(0)
    table = pa.table({"cell_id": np.arange(1, n + 1), "x": rng.random(n), "old": np.zeros(n)})
    pq.write_table(table.replace_schema_metadata({b"keep": b"1"}), path, row_group_size=7)
    return table


def test_append_columns_streams_and_equals_a_rewrite(tmp_path, monkeypatch):
    monkeypatch.setattr(tbl, "ROW_GROUP", 10)
    path = tmp_path / "c.parquet"
    table = _write(path, 95)
    label = np.where(np.arange(95) % 3 == 0, "a", "b")
    x2 = np.arange(95, dtype=np.float32)
    tbl.append_columns(path, {"label": label, "x": x2}, drop=["old"], meta={b"stage": b"g"})
    out = pq.read_table(path)
    # a replaced column keeps its place (a stage run twice leaves the same order), new ones
    # are appended
    assert out.column_names == ["cell_id", "x", "label"]
    assert out.column("cell_id").equals(table.column("cell_id"))
    assert out.column("label").to_pylist() == label.tolist()
    np.testing.assert_array_equal(out.column("x").to_numpy(), x2)  # replaced, not duplicated
    assert out.schema.metadata[b"keep"] == b"1" and out.schema.metadata[b"stage"] == b"g"
    assert pq.ParquetFile(path).num_row_groups == 10
    assert tbl.read_columns(path, ["label"])["label"].dtype == object
    tbl.append_columns(path, {"x": x2 + 1, "label": label}, drop=["label"])
    assert pq.read_table(path).column_names == ["cell_id", "x", "label"]


def test_append_columns_refuses_a_wrong_length_and_keeps_the_file(tmp_path):
    path = tmp_path / "c.parquet"
    _write(path, 20)
    before = path.read_bytes()
    with pytest.raises(ImmunoctoError, match="column y has 19 values for 20 rows"):
        tbl.append_columns(path, {"y": np.zeros(19)})
    assert path.read_bytes() == before


def test_append_columns_on_an_empty_table(tmp_path):
    path = tmp_path / "c.parquet"
    _write(path, 0)
    tbl.append_columns(path, {"y": np.zeros(0, np.float32)})
    out = pq.read_table(path)
    assert out.num_rows == 0 and out.schema.field("y").type == pa.float32()
