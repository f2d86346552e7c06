"""A scratch store of fixed-size image tiles on disk, one file per tile.

Producers (worker processes rendering or processing tiles) write tiles in any order and in
parallel; a consumer then streams them in the order a TIFF wants, or reads any region by
stitching tiles. Tiles can be kept raw or already deflate-encoded exactly as a TIFF tile
(``compression=8``), so the expensive encoding runs in the workers and the TIFF writer only
copies bytes. Memory stays at a few tiles whatever the image size.

Layouts (as in :mod:`immunocto.io.ome_tiff`): ``rgb`` ``(y, x, 3)``, ``channels``
``(c, y, x)``, ``labels`` ``(y, x)``. A tile is addressed by ``(plane, ty, tx)`` where
``plane`` is the channel for ``channels`` and 0 otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np

#: deflate level of encoded tiles (TIFF compression 8, "zlib").
DEFLATE_LEVEL = 1


def encode_tile(tile: np.ndarray) -> bytes:
    """Deflate-encode a full, padded tile the way a TIFF reader expects (compression 8)."""
    return imagecodecs.deflate_encode(np.ascontiguousarray(tile), level=DEFLATE_LEVEL)


class TileStore:
    """Tiles of one image level in a directory.

    Parameters
    ----------
    root : path-like
        Directory (created).
    shape : tuple
        Image shape in the layout's axis order.
    dtype : numpy dtype
    tile : int
        Tile edge in pixels.
    layout : {'rgb', 'channels', 'labels'}
    encoded : bool
        Keep tiles deflate-encoded (for streaming into a TIFF) instead of raw.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        shape: tuple[int, ...],
        dtype: Any,
        tile: int,
        *,
        layout: str,
        encoded: bool = False,
    ) -> None:
        if layout not in ("rgb", "channels", "labels"):
            raise ValueError(f"layout must be 'rgb', 'channels' or 'labels' (got {layout!r})")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.tile = int(tile)
        self.layout = layout
        self.encoded = encoded

    # ------------------------------------------------------------------ geometry
    @property
    def height(self) -> int:
        return self.shape[1] if self.layout == "channels" else self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[2] if self.layout == "channels" else self.shape[1]

    @property
    def planes(self) -> int:
        return self.shape[0] if self.layout == "channels" else 1

    @property
    def grid(self) -> tuple[int, int]:
        """Number of tile rows and columns."""
        return -(-self.height // self.tile), -(-self.width // self.tile)

    def tile_shape(self) -> tuple[int, ...]:
        t = self.tile
        return (t, t, self.shape[2]) if self.layout == "rgb" else (t, t)

    def _path(self, plane: int, ty: int, tx: int) -> Path:
        return self.root / f"{plane}_{ty}_{tx}.bin"

    # ------------------------------------------------------------------ tiles
    def write(self, plane: int, ty: int, tx: int, data: np.ndarray) -> None:
        """Store tile ``(plane, ty, tx)``; ``data`` may be smaller at the right/bottom edge
        (it is zero-padded to the full tile)."""
        full = np.zeros(self.tile_shape(), self.dtype)
        full[: data.shape[0], : data.shape[1]] = data
        payload = encode_tile(full) if self.encoded else full.tobytes()
        path = self._path(plane, ty, tx)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, path)  # a reader never sees half a tile

    def write_planes(self, ty: int, tx: int, data: np.ndarray) -> None:
        """Store the tile at ``(ty, tx)`` of every plane: ``data`` is ``(c, h, w)`` for
        ``channels``, the tile itself otherwise."""
        if self.layout == "channels":
            for c in range(data.shape[0]):
                self.write(c, ty, tx, data[c])
        else:
            self.write(0, ty, tx, data)

    def read(self, plane: int, ty: int, tx: int) -> np.ndarray:
        """The full (padded) raw tile; zeros where no tile was written."""
        path = self._path(plane, ty, tx)
        if not path.exists():
            return np.zeros(self.tile_shape(), self.dtype)
        raw = path.read_bytes()
        if self.encoded:
            raw = imagecodecs.deflate_decode(raw)
        return np.frombuffer(raw, self.dtype).reshape(self.tile_shape())

    def encoded_tiles(self, *, consume: bool = False) -> Iterator[bytes]:
        """Encoded tiles in TIFF order (plane, row, column); missing tiles are encoded zeros.

        With ``consume``, each tile file is deleted once read, so copying the store into a
        TIFF needs no more disk than the larger of the two (the store is then empty).
        """
        if not self.encoded:
            raise ValueError("encoded_tiles() needs a store created with encoded=True")
        blank: bytes | None = None
        rows, cols = self.grid
        for plane in range(self.planes):
            for ty in range(rows):
                for tx in range(cols):
                    path = self._path(plane, ty, tx)
                    if path.exists():
                        payload = path.read_bytes()
                        if consume:
                            path.unlink()
                        yield payload
                    else:
                        blank = blank or encode_tile(np.zeros(self.tile_shape(), self.dtype))
                        yield blank

    # ------------------------------------------------------------------ regions
    def region(self, plane: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Pixels ``[y0:y0+h, x0:x0+w]`` of ``plane``, stitched from tiles (clipped to the
        image; the result may be smaller than ``(h, w)`` at the edges)."""
        y1 = min(y0 + h, self.height)
        x1 = min(x0 + w, self.width)
        out = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), *self.tile_shape()[2:]), self.dtype)
        t = self.tile
        for ty in range(y0 // t, -(-y1 // t)):
            for tx in range(x0 // t, -(-x1 // t)):
                tile = self.read(plane, ty, tx)
                ys = slice(max(y0, ty * t), min(y1, (ty + 1) * t))
                xs = slice(max(x0, tx * t), min(x1, (tx + 1) * t))
                out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = tile[
                    ys.start - ty * t : ys.stop - ty * t, xs.start - tx * t : xs.stop - tx * t
                ]
        return out

    def __getitem__(self, key: tuple) -> np.ndarray:
        """Numpy-style region read with plain slices, e.g. ``store[c, y0:y1, x0:x1]``."""
        if self.layout == "channels":
            plane, ys, xs = key[0], key[1], key[2]
        else:
            plane, ys, xs = 0, key[0], key[1]
        y0 = ys.start or 0
        x0 = xs.start or 0
        y1 = self.height if ys.stop is None else ys.stop
        x1 = self.width if xs.stop is None else xs.stop
        return self.region(int(plane), y0, x0, y1 - y0, x1 - x0)
