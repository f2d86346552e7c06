"""The crop store: ``RUN/crops.zarr`` (zarr v3) and its index ``RUN/crops.parquet``.

Arrays (``N`` rows, one per stored cell, in row order of the index's ``row`` column):

- ``he``   ``(N, 64, 64, 3)`` uint8 — H&E at 0.325 µm/px centred on the cell centroid;
- ``mask`` ``(N, 64, 64)`` uint8 — 1 on the cell's own mask pixels;
- ``if``   ``(N, C, 64, 64)`` uint16 — optional, the classifier IF markers, registered.

Chunks hold ``CHUNK`` (256) whole crops, zstd level 3: chosen by ``benchmarks/db_read.py``
(chunk reads at ~74k crops/s with 4.6 kB per H&E crop; random single-crop reads through zarr
manage only ~1.3k/s, so training reads whole chunks in shuffled order, see ``datasets``).

Crash safety: each slide starts on a chunk boundary, so a chunk is written exactly once, and the
index lists a row only after its chunk is on disk. A build killed half-way leaves a store whose
indexed rows are all readable; the next build continues from there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import ZstdCodec

from immunocto._fs import atomic_path
from immunocto.errors import InputFileError

CROP = 64
CHUNK = 256
STORE_MPP = 0.325
CODEC = ZstdCodec(level=3)
INDEX_META = b"immunocto.db"

#: Index columns, in order.
INDEX_COLUMNS = (
    "row", "slide_id", "patient", "cell_id", "x", "y", "label", "label_source", "version",
    "split", "confidence", "border", "scale",
)  # fmt: skip


def store_path(run: str | os.PathLike[str]) -> Path:
    return Path(run) / "crops.zarr"


def index_path(run: str | os.PathLike[str]) -> Path:
    return Path(run) / "crops.parquet"


def row_array(group: zarr.Group, name: str, item: tuple[int, ...], dtype) -> zarr.Array:
    """An empty array ``(0, *item)`` in ``group``, grown by appending rows, ``CHUNK`` rows
    per chunk, zstd-compressed (the layout of the crop and context stores)."""
    return group.create_array(
        name, shape=(0, *item), chunks=(CHUNK, *item), dtype=dtype, compressors=CODEC
    )


class CropStore:
    """The zarr arrays of the crop store (opened or created)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        if_markers: list[str] | None = None,
        create: bool = False,
    ) -> None:
        self.root = Path(root)
        if create:
            group = zarr.open_group(str(self.root), mode="w")
            group.attrs.update(
                {"crop_px": CROP, "mpp": STORE_MPP, "chunk": CHUNK, "if_markers": list(if_markers or []),
                 "codec": "zstd-3", "layout": "he (N,64,64,3) uint8; mask (N,64,64) uint8; if (N,C,64,64) uint16"}
            )  # fmt: skip
            row_array(group, "he", (CROP, CROP, 3), np.uint8)
            row_array(group, "mask", (CROP, CROP), np.uint8)
            if if_markers:
                row_array(group, "if", (len(if_markers), CROP, CROP), np.uint16)
        self._attach("r+" if create else "a")

    def _attach(self, mode: str) -> None:
        """Open ``self.root``'s zarr group in ``mode`` and bind its arrays."""
        try:
            self.group = zarr.open_group(str(self.root), mode=mode)
            self.he = self.group["he"]
            self.mask = self.group["mask"]
        except Exception as err:
            raise InputFileError(
                f"{self.root}: not a crop store ({type(err).__name__}); run `immunocto build-db`"
            ) from None
        self.if_ = self.group["if"] if "if" in self.group else None
        self.if_markers = list(self.group.attrs.get("if_markers", []))

    @classmethod
    def open_readonly(cls, root: str | os.PathLike[str]) -> CropStore:
        obj = cls.__new__(cls)
        obj.root = Path(root)
        obj._attach("r")
        return obj

    @property
    def rows(self) -> int:
        return int(self.he.shape[0])

    def next_start(self) -> int:
        """First row of the next slide: the end, rounded up to a chunk boundary."""
        return -(-self.rows // CHUNK) * CHUNK

    def truncate(self, rows: int) -> None:
        """Shrink the arrays to their first ``rows`` rows (chunk-aligned): the space of an
        interrupted last slide, about to be cut again from its start."""
        if rows % CHUNK:
            raise ValueError(f"truncation must fall on a chunk boundary (got row {rows})")
        for arr in (self.he, self.mask, self.if_):
            if arr is not None and arr.shape[0] > rows:
                arr.resize((rows, *arr.shape[1:]))

    def reserve(self, rows: int) -> None:
        """Grow the arrays to ``rows`` rows (no chunk is written): workers then write their
        own chunk-aligned blocks without touching the arrays' metadata."""
        for arr in (self.he, self.mask, self.if_):
            if arr is not None and arr.shape[0] < rows:
                arr.resize((rows, *arr.shape[1:]))

    def write(self, start: int, he: np.ndarray, mask: np.ndarray, if_: np.ndarray | None) -> None:
        """Write rows ``start..start+len(he)`` (growing the arrays if needed: one writer only;
        concurrent writers :meth:`reserve` first); ``start`` must be chunk-aligned so no
        existing chunk is rewritten."""
        if start % CHUNK:
            raise ValueError(f"writes must start on a chunk boundary (got row {start})")
        end = start + len(he)
        arrays = [(self.he, he), (self.mask, mask)]
        if self.if_ is not None:
            if if_ is None:
                raise ValueError("this store has IF crops: give them")
            arrays.append((self.if_, if_))
        for arr, data in arrays:
            if arr.shape[0] < end:
                arr.resize((end, *arr.shape[1:]))
            arr[start:end] = data


def write_index(run: str | os.PathLike[str], table: pa.Table, manifest: dict[str, Any]) -> Path:
    """Write the index atomically, with the per-slide build manifest in its metadata."""
    table = table.replace_schema_metadata({INDEX_META: json.dumps(manifest).encode()})
    path = index_path(run)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_index(run: str | os.PathLike[str]) -> tuple[pa.Table, dict[str, Any]]:
    """The index table and its manifest (empty when there is no store yet)."""
    path = index_path(run)
    if not path.exists():
        return empty_index(), {"slides": {}}
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(INDEX_META)
    return table, json.loads(raw) if raw else {"slides": {}}


def empty_index() -> pa.Table:
    types = {
        "row": pa.int64(), "slide_id": pa.string(), "patient": pa.string(), "cell_id": pa.int64(),
        "x": pa.float64(), "y": pa.float64(), "label": pa.string(), "label_source": pa.string(),
        "version": pa.string(), "split": pa.string(), "confidence": pa.float32(), "border": pa.bool_(),
        "scale": pa.float32(),
    }  # fmt: skip
    return pa.table({k: pa.array([], type=types[k]) for k in INDEX_COLUMNS})
