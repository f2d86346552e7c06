"""Per-tile segmentation results on disk, written by the worker that segmented the tile.

A slide's segmentation runs in two maps (see :mod:`immunocto.segment.tiled`): workers segment
tiles and each writes its tile's *part* here; then workers compose the label image chunk by
chunk from the parts. Neither the tile label windows nor the cell rows travel back to the
client, which only learns how many objects each tile kept.

Layout of a part folder (one per slide and set of inputs)::

    key.json                       what the parts were computed from (inputs, parameters)
    tile-000042.labels.zst         the window's labels, ids 1..k local to the tile, 0 elsewhere
                                   (zstd-compressed ``.npy``; uint16 when k < 65535)
    tile-000042.parquet            k rows: FEATURES + ``seg_score`` of the kept objects

A part counts as done once its ``.parquet`` exists: both files are written to a temporary
name and renamed, labels first, so a worker killed mid-write leaves no part that looks whole.
A later run with the same key keeps the done parts and segments only the missing tiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from immunocto._fs import atomic_path, atomic_write_bytes
from immunocto._parts import PartFolder, decode_arrays, encode_arrays


class TileParts(PartFolder):
    """The part folder of one slide's segmentation."""

    # -- paths ------------------------------------------------------------------------------
    def _labels(self, tile_id: int) -> Path:
        return self.folder / f"tile-{tile_id:06d}.labels.zst"

    def _table(self, tile_id: int) -> Path:
        return self.folder / f"tile-{tile_id:06d}.parquet"

    # -- writing (in the worker) ----------------------------------------------------------------
    def write(
        self, tile_id: int, labels: np.ndarray, features: dict[str, np.ndarray], scores: np.ndarray
    ) -> int:
        """Store one tile's kept objects; return their number ``k``.

        ``labels`` (h, w) holds ids ``1..k`` in the tile's window; ``features`` and ``scores``
        have ``k`` rows in id order.
        """
        k = len(scores)
        if k:
            dtype = np.uint16 if k < np.iinfo(np.uint16).max else np.uint32
            atomic_write_bytes(
                self._labels(tile_id), encode_arrays(labels.astype(dtype, copy=False))
            )
        cols = {name: np.asarray(v) for name, v in features.items()}
        cols["seg_score"] = np.asarray(scores, np.float64)
        with atomic_path(self._table(tile_id)) as tmp:
            pq.write_table(pa.table(cols), tmp, compression="zstd")
        return k

    # -- reading ----------------------------------------------------------------------------------
    def done(self, tile_id: int) -> int | None:
        """``k`` of a finished part, ``None`` when the tile has none (or an unreadable one)."""
        path = self._table(tile_id)
        if not path.exists():
            return None
        try:
            k = pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowInvalid):
            return None
        if k and not self._labels(tile_id).exists():
            return None
        return int(k)

    def labels(self, tile_id: int) -> np.ndarray:
        """The tile's window labels ``(h, w)``, ids ``1..k``."""
        return decode_arrays(self._labels(tile_id).read_bytes(), 1)[0]

    def features(self, tile_id: int, columns: list[str] | None = None) -> dict[str, np.ndarray]:
        """The tile's ``k`` rows: FEATURES and ``seg_score`` (only ``columns`` when given)."""
        table = pq.read_table(self._table(tile_id), columns=columns)
        return {name: table.column(name).to_numpy() for name in table.column_names}
