"""Quantifying one tile: the cell masks are carried into IF pixel space, so statistics are
computed on raw, uninterpolated IF pixels.

For each IF pixel of the box covering the tile's window, its H&E position (inverse of the
registration, solved on a coarse grid and interpolated: the mapping is smooth) picks the label
of the nearest H&E mask pixel. Rings and background annuli are then grown in IF pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import zarr

from immunocto._grid import upsample_grid
from immunocto._readahead import ReadAhead
from immunocto.io.base import Slide
from immunocto.io.tiling import Tile
from immunocto.quantify.features import cell_intensity_stats
from immunocto.register.model import RegistrationModel


@dataclass
class QuantifyContext:
    """What a worker needs: the IF, the registration, the mask store, the confirmation level."""

    if_: Slide
    registration: RegistrationModel
    mask: zarr.Array
    nuclear_channel: str
    confirm_level: float  # nuclear-stain value a pixel needs (fraction x Otsu)
    ring_um: float
    cell_um: float
    bg_inner_um: float
    bg_outer_um: float
    #: The reads of the next tile, started while this one is computed (one process).
    ahead: ReadAhead = field(default_factory=ReadAhead, repr=False, compare=False)


def labels_in_if_space(
    model: RegistrationModel,
    he_labels: np.ndarray,
    x0: int,
    y0: int,
    u0: int,
    v0: int,
    width: int,
    height: int,
    step: int = 16,
) -> np.ndarray:
    """Labels of the IF box ``[v0:v0+height, u0:u0+width]`` from an H&E label window whose
    top-left is ``(x0, y0)`` (nearest H&E pixel; 0 where the window does not reach)."""
    gu = np.arange(u0 - step, u0 + width + 2 * step, step, dtype=np.float64)
    gv = np.arange(v0 - step, v0 + height + 2 * step, step, dtype=np.float64)
    gx, gy = model.if_to_he(*np.meshgrid(gu, gv))
    rows = (np.arange(v0, v0 + height) - gv[0]) / step
    cols = (np.arange(u0, u0 + width) - gu[0]) / step
    hx = np.rint(upsample_grid(gx, rows, cols)).astype(np.int64) - x0
    hy = np.rint(upsample_grid(gy, rows, cols)).astype(np.int64) - y0
    h, w = he_labels.shape
    ok = (hx >= 0) & (hx < w) & (hy >= 0) & (hy < h)
    out = np.zeros((height, width), he_labels.dtype)
    out[ok] = he_labels[hy[ok], hx[ok]]
    return out


def _if_box(ctx: QuantifyContext, tile: Tile) -> tuple[int, int, int, int]:
    """``(u0, v0, u1, v1)``: the IF level-0 box (2-3 px margin) covering the tile's window."""
    x0, y0, x1, y1 = tile.window
    u, v = ctx.registration.he_to_if(
        np.array([x0, x1, x0, x1], float), np.array([y0, y0, y1, y1], float)
    )
    u0, v0 = int(np.floor(u.min())) - 2, int(np.floor(v.min())) - 2
    return u0, v0, int(np.ceil(u.max())) + 3, int(np.ceil(v.max())) + 3


def _read_tile(ctx: QuantifyContext, tile: Tile) -> tuple[np.ndarray, np.ndarray, tuple]:
    """The tile's H&E mask window, its IF box ``(c, h, w)`` and that box's ``(u0, v0, u1,
    v1)`` (what :class:`ReadAhead` runs, ahead or when asked)."""
    x0, y0, x1, y1 = tile.window
    u0, v0, u1, v1 = _if_box(ctx, tile)
    he_labels = np.asarray(ctx.mask[y0:y1, x0:x1])
    return he_labels, ctx.if_.read_region(u0, v0, u1 - u0, v1 - v0), (u0, v0, u1, v1)


def prefetch_tile(ctx: QuantifyContext, tile: Tile) -> None:
    """Start reading ``tile``'s inputs in the background (:func:`tile_inputs` takes them)."""
    ctx.ahead.submit(tile.window, partial(_read_tile, ctx, tile))


def tile_inputs(ctx: QuantifyContext, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """The IF box covering the tile's window, ``(c, h, w)`` raw, and the cell labels on its
    pixel grid ``(h, w)`` (read ahead by :func:`prefetch_tile` when it was called)."""
    x0, y0, _, _ = tile.window
    he_labels, box, (u0, v0, u1, v1) = ctx.ahead.get(tile.window, partial(_read_tile, ctx, tile))
    labels = labels_in_if_space(ctx.registration, he_labels, x0, y0, u0, v0, u1 - u0, v1 - v0)
    return labels, box


def quantify_tile(
    ctx: QuantifyContext, job: tuple[Tile, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Statistics of the cells ``job[1]`` (ids whose centroid lies in the tile ``job[0]``)."""
    tile, cell_ids = job
    labels, box = tile_inputs(ctx, tile)
    nuclear = box[ctx.if_.channel_names.index(ctx.nuclear_channel)] >= ctx.confirm_level
    mpp = ctx.if_.mpp or 0.325
    stats = cell_intensity_stats(
        labels,
        box.astype(np.uint16, copy=False),
        cell_ids,
        nuclear_ok=nuclear,
        ring_px=ctx.ring_um / mpp,
        cell_px=ctx.cell_um / mpp,
        bg_inner_px=ctx.bg_inner_um / mpp,
        bg_outer_px=ctx.bg_outer_um / mpp,
    )
    return cell_ids, stats
