"""Writing tiled, pyramidal OME-TIFF from a chunked source, one tile in memory at a time.

Used by the simulator, and by any stage that writes a slide. The source is anything that
slices like a numpy array (a zarr array on disk, a memmap, an ndarray): tiles are read,
padded to the full tile shape at the right and bottom edges, and streamed to tifffile.
Pyramid levels are written as SubIFDs (the OME-TIFF 6 layout that QuPath, Bio-Formats and
tifffile read). Layouts:

- ``rgb``: level arrays ``(y, x, 3)`` uint8, one RGB page.
- ``channels``: level arrays ``(c, y, x)``, one page per channel, named in OME.
- ``labels``: a single ``(y, x)`` level (instance labels), no OME pyramid.
"""

from __future__ import annotations

import os
import uuid as uuid_mod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from immunocto._fs import atomic_path
from immunocto.io.tilestore import DEFLATE_LEVEL, TileStore

DEFAULT_TILE = 512
#: zlib (deflate) level 1, no predictor (sensor noise defeats it): fast, lossless,
#: readable by every TIFF reader. Encoded tile stores use the same settings.
DEFAULT_COMPRESSION = ("zlib", {"level": DEFLATE_LEVEL})


def _tiles_2d(arr: Any, tile: int, lead: tuple[int, ...] = ()) -> Iterator[np.ndarray]:
    """Tiles of ``arr[lead]`` in row-major order, zero-padded to ``(tile, tile, ...)``."""
    h, w = arr.shape[len(lead) : len(lead) + 2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.asarray(arr[(*lead, slice(y, y + tile), slice(x, x + tile))])
            if block.shape[:2] != (tile, tile):
                full = np.zeros((tile, tile, *block.shape[2:]), block.dtype)
                full[: block.shape[0], : block.shape[1]] = block
                block = full
            yield block


def _level_tiles(
    arr: Any, layout: str, tile: int, consume: bool = False
) -> Iterator[np.ndarray] | Iterator[bytes]:
    if isinstance(arr, TileStore) and arr.encoded:
        if arr.tile != tile:
            raise ValueError(f"encoded tile store has tile {arr.tile}, the TIFF wants {tile}")
        yield from arr.encoded_tiles(consume=consume)
        return
    if layout == "channels":
        for c in range(arr.shape[0]):
            yield from _tiles_2d(arr, tile, (c,))
    else:
        yield from _tiles_2d(arr, tile)


def write_ome_tiff(
    path: str | os.PathLike[str],
    levels: Sequence[Any],
    *,
    layout: str,
    mpp: float,
    channel_names: Sequence[str] | None = None,
    tile: int = DEFAULT_TILE,
    uuid: str | None = None,
    name: str | None = None,
    maxworkers: int | None = None,
    consume_stores: bool = False,
) -> Path:
    """Write a tiled pyramidal OME-TIFF atomically.

    Parameters
    ----------
    path : path-like
        Output file (``*.ome.tif``); replaced only when the write succeeds.
    levels : sequence of array-likes or :class:`~immunocto.io.tilestore.TileStore`
        Level 0 first, each half the size of the previous one. Shapes ``(y, x, 3)`` for
        ``rgb``, ``(c, y, x)`` for ``channels``, ``(y, x)`` for ``labels`` (one level).
        An encoded tile store (same tile size) is streamed without re-encoding.
    layout : {'rgb', 'channels', 'labels'}
    mpp : float
        Level-0 pixel size in microns (``PhysicalSizeX/Y`` and the TIFF resolution).
    channel_names : sequence of str, optional
        Required for ``channels``: one name per channel, stored in the OME metadata.
    tile : int
        Tile edge (multiple of 16).
    uuid : str, optional
        OME UUID; pass a fixed one for byte-identical output (default: random).
    name : str, optional
        OME image name.
    consume_stores : bool
        Delete an encoded tile store's files as they are copied in (scratch stores: the disk
        peak is then the larger of store and file, not their sum; the stores are left empty,
        also when the write fails).

    Returns
    -------
    Path
    """
    if layout not in ("rgb", "channels", "labels"):
        raise ValueError(f"layout must be 'rgb', 'channels' or 'labels' (got {layout!r})")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (got {tile})")
    level0 = levels[0]
    if layout == "channels":
        if channel_names is None or len(channel_names) != level0.shape[0]:
            raise ValueError(
                f"channel_names must name each of the {level0.shape[0]} channels "
                f"(got {None if channel_names is None else len(channel_names)})"
            )
    compression, compressionargs = DEFAULT_COMPRESSION
    resolution = (1e4 / mpp, 1e4 / mpp)  # pixels per cm
    common: dict[str, Any] = {
        "tile": (tile, tile),
        "compression": compression,
        "compressionargs": compressionargs,
        "resolutionunit": "CENTIMETER",
        "maxworkers": maxworkers,
        "software": "immunocto",
    }
    if layout == "rgb":
        common["photometric"] = "rgb"
    else:
        common["photometric"] = "minisblack"
    metadata: dict[str, Any] | None
    if layout == "labels":
        metadata = None
    else:
        metadata = {
            "axes": "YXS" if layout == "rgb" else "CYX",
            "PhysicalSizeX": mpp,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp,
            "PhysicalSizeYUnit": "µm",
            "UUID": f"urn:uuid:{uuid or uuid_mod.uuid4()}",
        }
        if name:
            metadata["Name"] = name
        if layout == "channels":
            metadata["Channel"] = {"Name": list(channel_names or [])}
    with (
        atomic_path(path) as tmp,
        tifffile.TiffWriter(tmp, bigtiff=True, ome=metadata is not None) as tif,
    ):
        for k, level in enumerate(levels):
            shape = tuple(level.shape)
            scale = 2**k
            tif.write(
                _level_tiles(level, layout, tile, consume_stores),
                shape=shape,
                dtype=level.dtype,
                resolution=(resolution[0] / scale, resolution[1] / scale),
                subifds=len(levels) - 1 if k == 0 else None,
                subfiletype=1 if k > 0 else 0,
                metadata=metadata if k == 0 else None,
                **common,
            )
    return Path(path)


def pyramid_shapes(height: int, width: int, *, min_size: int = 512) -> list[tuple[int, int]]:
    """Level shapes ``(h, w)``: halve until the larger side is at most ``min_size``."""
    shapes = [(height, width)]
    while max(shapes[-1]) > min_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes
