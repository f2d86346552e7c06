"""Cutting 64 x 64 crops around cells, vectorised over the cells of a tile.

A crop is centred on the cell centroid (``x`` = column, ``y`` = row, H&E level-0 px) at
0.325 µm/px: the centroid (rounded to whole pixels at scale 1) is crop pixel ``[32, 32]``. At that pixel size the crop is a plain window of the slide (one fancy-index
gather for all cells of the tile); at another pixel size it is resampled (bilinear for H&E
and IF, nearest for the mask), and the scale is recorded. Pixels outside the slide are zeros
and the crop is flagged ``border``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage

from immunocto._parallel import ordered_map
from immunocto.db.store import CROP, STORE_MPP
from immunocto.io.base import Slide
from immunocto.io.open import open_slide
from immunocto.register.model import RegistrationModel


def crop_grid(
    xs: np.ndarray, ys: np.ndarray, scale: float, size: int = CROP
) -> tuple[np.ndarray, np.ndarray]:
    """Sample positions ``(N, size)`` along x and along y (level-0 px) of crops centred on
    ``(xs, ys)`` with ``scale`` slide pixels per crop pixel: the centre lands on crop pixel
    ``(size // 2, size // 2)`` (row, column), so at scale 1 with integer centres every sample
    is a whole slide pixel."""
    offsets = (np.arange(size) - size // 2) * float(scale)
    return xs[:, None] + offsets[None, :], ys[:, None] + offsets[None, :]


def gather(
    region: np.ndarray, gx: np.ndarray, gy: np.ndarray, ox: int, oy: int, *, order: int
) -> np.ndarray:
    """Crops ``(N, size, size, ...)`` of a ``(h, w, ...)`` region whose top-left is ``(ox, oy)``.

    ``gx``/``gy`` are the per-crop sample columns/rows (level-0 px). ``order=0`` picks the
    nearest pixel (one gather); ``order=1`` interpolates bilinearly.
    """
    n, size = gx.shape
    h, w = region.shape[:2]
    if order == 0:
        ix = np.clip(np.rint(gx).astype(np.int64) - ox, 0, w - 1)
        iy = np.clip(np.rint(gy).astype(np.int64) - oy, 0, h - 1)
        return region[iy[:, :, None], ix[:, None, :]]
    rows = np.broadcast_to((gy - oy)[:, :, None], (n, size, size))
    cols = np.broadcast_to((gx - ox)[:, None, :], (n, size, size))
    extra = region.shape[2:]
    flat = region.reshape(h, w, -1)
    out = np.empty((n, size, size, flat.shape[2]), np.float32)
    coords = np.stack([rows.ravel(), cols.ravel()])
    for c in range(flat.shape[2]):
        out[..., c] = ndimage.map_coordinates(
            flat[..., c].astype(np.float32), coords, order=1, mode="nearest"
        ).reshape(n, size, size)
    return out.reshape(n, size, size, *extra)


#: Cells are cut and read in groups of this many level-0 H&E px squares (one read per square).
GROUP_PX = 1024


def group_cells(xs: np.ndarray, ys: np.ndarray, group_px: int = GROUP_PX) -> list[np.ndarray]:
    """Row indices of the cells (``xs``, ``ys``: H&E level-0 px) grouped by ``group_px``
    squares of the slide, squares in row-major order, rows in their given order within one."""
    key = (np.asarray(ys) // group_px).astype(np.int64) * 1_000_000 + (
        np.asarray(xs) // group_px
    ).astype(np.int64)
    order = np.argsort(key, kind="stable")
    key = key[order]
    return np.split(order, np.flatnonzero(np.diff(key)) + 1) if len(order) else []


@dataclass(frozen=True)
class ExtractSpec:
    """What a worker needs to cut crops of one slide."""

    he: Path
    he_mpp: float
    mask: Path
    if_: Path | None = None
    markers_csv: Path | None = None
    registration: Path | None = None
    if_markers: tuple[str, ...] = ()

    def open(self) -> tuple[Slide, zarr.Array, Slide | None, RegistrationModel | None]:
        he = open_slide(self.he, mpp=self.he_mpp)
        mask = zarr.open_array(str(self.mask), mode="r")
        if_ = (
            open_slide(self.if_, markers=self.markers_csv) if self.if_ and self.if_markers else None
        )
        reg = (
            RegistrationModel.load(self.registration)
            if self.registration and self.if_markers
            else None
        )
        return he, mask, if_, reg


def extract_crops(
    opened: tuple[Slide, zarr.Array, Slide | None, RegistrationModel | None],
    job: tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]],
) -> dict[str, np.ndarray]:
    """Crops of the cells ``job = (cell_ids, xs, ys, if_markers)`` (one tile's worth).

    Returns ``he`` ``(N, 64, 64, 3)`` uint8, ``mask`` ``(N, 64, 64)`` uint8, ``if``
    ``(N, C, 64, 64)`` uint16 (when markers are given), ``border`` ``(N,)`` bool, ``scale``.
    """
    from immunocto.register.apply import read_if_in_he_frame

    he, mask_arr, if_, reg = opened
    cell_ids, xs, ys, markers = job
    scale = STORE_MPP / float(he.mpp)
    exact = abs(scale - 1.0) < 0.01
    if exact:
        scale = 1.0
        xs = np.rint(xs)
        ys = np.rint(ys)
    gx, gy = crop_grid(np.asarray(xs, float), np.asarray(ys, float), scale)
    x0 = int(np.floor(gx.min())) - 1
    y0 = int(np.floor(gy.min())) - 1
    x1 = int(np.ceil(gx.max())) + 2
    y1 = int(np.ceil(gy.max())) + 2
    rgb = he.read_region(x0, y0, x1 - x0, y1 - y0)
    order = 0 if exact else 1
    out: dict[str, np.ndarray] = {
        "he": np.clip(np.rint(gather(rgb, gx, gy, x0, y0, order=order)), 0, 255).astype(np.uint8)
    }
    # the mask store is the slide's label image; outside it reads as background
    mh, mw = mask_arr.shape
    labels = np.zeros((y1 - y0, x1 - x0), mask_arr.dtype)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, mh), min(x1, mw)
    if sy1 > sy0 and sx1 > sx0:
        labels[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = np.asarray(mask_arr[sy0:sy1, sx0:sx1])
    crop_labels = gather(labels, gx, gy, x0, y0, order=0)
    out["mask"] = (crop_labels == np.asarray(cell_ids)[:, None, None]).astype(np.uint8)
    if markers:
        if if_ is None or reg is None:
            raise ValueError("IF crops need the IF image and its registration")
        block = read_if_in_he_frame(if_, reg, x0, y0, x1 - x0, y1 - y0, channels=list(markers))
        crops = gather(np.moveaxis(block, 0, -1), gx, gy, x0, y0, order=order)
        out["if"] = np.clip(np.rint(np.moveaxis(crops, -1, 1)), 0, 65535).astype(np.uint16)
    w, h = he.width, he.height
    out["border"] = (
        (gx.min(axis=1) < 0)
        | (gy.min(axis=1) < 0)
        | (gx.max(axis=1) > w - 1)
        | (gy.max(axis=1) > h - 1)
    )
    out["scale"] = np.full(len(cell_ids), scale, np.float32)
    return out


def close_opened(opened) -> None:
    """Close the slides of an :meth:`ExtractSpec.open` tuple."""
    for part in (opened[0], opened[2]):
        if part is not None:
            part.close()


def row_blocks(sizes: list[int], block_rows: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Cut rows ``0..sum(sizes)`` (cells in :func:`group_cells` order, ``sizes`` the cells per
    square) into blocks of ``block_rows``: ``[(lo, hi, pieces)]`` with ``pieces`` the
    ``(a, b)`` row ranges of the block that lie in one square each (one slide read per piece).
    """
    bounds = np.cumsum([0, *sizes])
    total = int(bounds[-1])
    blocks = []
    for lo in range(0, total, block_rows):
        hi = min(lo + block_rows, total)
        cuts = bounds[(bounds > lo) & (bounds < hi)].tolist()
        edges = [lo, *cuts, hi]
        blocks.append((lo, hi, list(pairwise(edges))))
    return blocks


def crops_of_pieces(
    opened, ids: np.ndarray, xs: np.ndarray, ys: np.ndarray, pieces, markers: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """:func:`extract_crops` of each ``(a, b)`` piece of rows of ``ids``/``xs``/``ys``
    (positions relative to the arrays), concatenated in row order."""
    parts = [extract_crops(opened, (ids[a:b], xs[a:b], ys[a:b], markers)) for a, b in pieces]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def map_groups(
    fn,
    setup,
    setup_args: tuple,
    jobs: list,
    *,
    workers: int,
):
    """``fn(context, job)`` for every job, in order, on ``workers`` processes (or the Dask
    client in use); each worker builds its context with ``setup(*setup_args)`` once, and a
    one-process run builds it here and closes its slides at the end. The per-slide maps of
    ``build-db`` and ``expand``: the workers cut the crops and keep them; only small results
    (flags, probabilities) come back. A context is a tuple whose first item is an
    :meth:`ExtractSpec.open` tuple."""
    one = workers <= 1 or len(jobs) <= 1
    local = setup(*setup_args) if one else None
    try:
        yield from ordered_map(
            fn, jobs, workers=workers, setup=setup, setup_args=setup_args, local_context=local
        )
    finally:
        if local is not None:
            close_opened(local[0])
