"""Resolution pyramids built tile by tile in on-disk tile stores (memory stays bounded)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from immunocto.io.ome_tiff import pyramid_shapes
from immunocto.io.tilestore import TileStore


def downsample2(block: np.ndarray, y_axis: int = 0, x_axis: int = 1) -> np.ndarray:
    """2x2 mean (rounded) along ``y_axis`` and ``x_axis``; odd edges repeat the last row/col.

    Parameters
    ----------
    block : ndarray
        Integer image, e.g. ``(h, w)``, ``(h, w, 3)`` or ``(c, h, w)``.
    """
    pad = [(0, 0)] * block.ndim
    pad[y_axis] = (0, block.shape[y_axis] % 2)
    pad[x_axis] = (0, block.shape[x_axis] % 2)
    if any(p[1] for p in pad):
        block = np.pad(block, pad, mode="edge")
    acc = block.astype(np.uint32)

    def take(ay: int, ax: int) -> np.ndarray:
        s = [slice(None)] * block.ndim
        s[y_axis] = slice(ay, None, 2)
        s[x_axis] = slice(ax, None, 2)
        return acc[tuple(s)]

    total = take(0, 0) + take(0, 1) + take(1, 0) + take(1, 1)
    return ((total + 2) // 4).astype(block.dtype)


def half_shape(store_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Shape of the next pyramid level of an image of ``store_shape``."""
    if layout == "channels":
        c, h, w = store_shape
        return (c, (h + 1) // 2, (w + 1) // 2)
    h, w = store_shape[:2]
    return ((h + 1) // 2, (w + 1) // 2, *store_shape[2:])


def downsample_store(
    src: TileStore,
    root: str | os.PathLike[str],
    *,
    tile: int,
    on_tile: Callable[[], None] | None = None,
) -> TileStore:
    """The next pyramid level of ``src`` (2x2 mean), as a raw tile store under ``root``."""
    out = TileStore(root, half_shape(src.shape, src.layout), src.dtype, tile, layout=src.layout)
    rows, cols = out.grid
    for plane in range(out.planes):
        for ty in range(rows):
            for tx in range(cols):
                block = src.region(plane, 2 * ty * tile, 2 * tx * tile, 2 * tile, 2 * tile)
                out.write(plane, ty, tx, downsample2(block))
                if on_tile is not None:
                    on_tile()
    return out


def build_pyramid(
    level1: TileStore,
    scratch_dir: str | os.PathLike[str],
    *,
    tile: int,
    level0_shape: tuple[int, ...],
    min_size: int = 512,
) -> list[TileStore]:
    """Levels 1..n of a pyramid whose level 1 is given (levels 2+ are built from it)."""
    layout = level1.layout
    h, w = level0_shape[1:3] if layout == "channels" else level0_shape[:2]
    n_levels = len(pyramid_shapes(h, w, min_size=min_size))
    levels = [level1] if n_levels > 1 else []
    for k in range(2, n_levels):
        levels.append(downsample_store(levels[-1], Path(scratch_dir) / f"level{k}", tile=tile))
    return levels
