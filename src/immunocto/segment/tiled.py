"""Tiled segmentation of a whole slide with the responsible-tile rule.

Every tile on tissue is segmented on its window (core + halo); only objects whose centroid
lies in the core are kept, so an object cut by one tile's edge is whole in the tile that owns
it and absent from the others (see :mod:`immunocto.io.tiling`). Kept objects are written into
the slide's label image in tile order, never over a pixel already claimed (first writer
wins), with ids 1, 2, ... in that order; ``area_px`` counts the pixels actually written.
Workers (local processes or Dask) segment the tiles and write each tile's result as a *part*
(:mod:`immunocto.segment.parts`); then workers compose the label image chunk by chunk from the
parts. The client only schedules and adds up object counts, and the result does not depend on
the number of workers (or on a resumed run).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from immunocto._parallel import ordered_map
from immunocto.io.tiling import Tile, make_tiles, tiles_on_tissue, tissue_mask
from immunocto.progress import NullProgress, Progress
from immunocto.segment.base import Backend, SlideContext, SlidePaths
from immunocto.segment.measure import object_features, solidity
from immunocto.segment.parts import TileParts

log = logging.getLogger(__name__)

MASK_CHUNK = 1024
#: Columns of the per-tile feature dicts carried into the cell table.
FEATURES = (
    "x", "y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
    "major_axis_px", "minor_axis_px", "eccentricity", "solidity",
)  # fmt: skip
#: Columns of the cell table a segmentation yields (and any the backend adds).
TABLE_COLUMNS = (*FEATURES, "cell_id", "area_px", "seg_score", "tile_id", "edge_dist_px")
#: Columns of a tile's part that are not the backend's own.
PART_COLUMNS = (*FEATURES, "seg_score")


@dataclass
class TileResult:
    """Responsible objects of one tile, relabelled ``1..k`` inside the tile's window."""

    tile: Tile
    labels: np.ndarray  # (h, w) window labels, 0 elsewhere
    features: dict[str, np.ndarray]  # (k,) each; coordinates in level-0 px
    scores: np.ndarray  # (k,)
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # the backend's, (k,) each


def segment_tile(ctx: SlideContext, backend: Backend, tile: Tile) -> TileResult:
    """Segment one tile's window and keep the objects the tile is responsible for."""
    x0, y0, x1, y1 = tile.window
    labels, scores, *more = backend.segment(ctx, x0, y0, x1 - x0, y1 - y0)
    columns = more[0] if more else {}
    if set(columns) != set(backend.object_columns()):
        raise RuntimeError(
            f"backend {backend.name!r} returned columns {sorted(columns)}, "
            f"declared {sorted(backend.object_columns())}"
        )
    feats = object_features(labels, x0=x0, y0=y0, hulls=False)
    present = feats["area_px"] > 0
    keep = present & tile.responsible(feats["x"], feats["y"])
    # convex hulls only for the objects this tile keeps (the halo's belong to neighbours)
    feats["solidity"][keep] = solidity(labels, feats["label"][keep])
    lookup = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    lookup[feats["label"][keep]] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    scores = np.asarray(scores, np.float64)
    kept_scores = scores[feats["label"][keep]] if len(scores) > 1 else np.ones(int(keep.sum()))
    return TileResult(
        tile=tile,
        labels=lookup[labels],
        features={k: v[keep] for k, v in feats.items() if k in FEATURES},
        scores=kept_scores,
        columns={k: np.asarray(v)[feats["label"][keep]] for k, v in columns.items()},
    )


def _open_worker(
    paths: SlidePaths, stats: dict[str, float], backend: Backend, parts: TileParts
) -> tuple[SlideContext, Backend, TileParts]:
    return paths.open(stats), backend, parts


def _segment_in_worker(context: tuple[SlideContext, Backend, TileParts], tile: Tile) -> int:
    """Segment ``tile`` and write its part; only the object count goes back to the client."""
    ctx, backend, parts = context
    res = segment_tile(ctx, backend, tile)
    return parts.write(tile.id, res.labels, {**res.features, **res.columns}, res.scores)


@dataclass(frozen=True)
class ChunkJob:
    """One chunk of the label image and the tiles whose windows reach into it (tile order)."""

    y0: int
    y1: int
    x0: int
    x1: int
    tiles: tuple[tuple[int, tuple[int, int, int, int], int, int], ...]  # (id, window, k, offset)


def _open_mask(store: str, parts: TileParts) -> tuple[Any, TileParts]:
    return zarr.open_array(store, mode="r+"), parts


def _compose_chunk(context: tuple[Any, TileParts], job: ChunkJob) -> list[tuple[int, np.ndarray]]:
    """Write one chunk of the label image from the tile parts, first writer (in tile order)
    wins; return for each tile the pixels written per object (its local ids ``1..k``)."""
    array, parts = context
    out = np.zeros((job.y1 - job.y0, job.x1 - job.x0), np.uint32)
    written = []
    for tile_id, (wx0, wy0, wx1, wy1), k, offset in job.tiles:
        lab = parts.labels(tile_id)
        ys, xs = (
            slice(max(job.y0, wy0), min(job.y1, wy1)),
            slice(max(job.x0, wx0), min(job.x1, wx1)),
        )
        sub = lab[ys.start - wy0 : ys.stop - wy0, xs.start - wx0 : xs.stop - wx0]
        region = out[ys.start - job.y0 : ys.stop - job.y0, xs.start - job.x0 : xs.stop - job.x0]
        free = (sub > 0) & (region == 0)
        values = sub[free]
        region[free] = values.astype(np.uint32) + np.uint32(offset)
        written.append((tile_id, np.bincount(values, minlength=k + 1)[1:]))
    if out.any():  # all-zero chunks stay unwritten (the fill value)
        array[job.y0 : job.y1, job.x0 : job.x1] = out
    return written


def chunk_jobs(
    shape: tuple[int, int], chunk: tuple[int, int], tiles: list[tuple[Tile, int, int]]
) -> list[ChunkJob]:
    """The chunks of a ``shape`` label image reached by the windows of ``tiles`` (each
    ``(tile, k, id offset)`` with ``k > 0``), each with its tiles in tile order."""
    height, width = shape
    ch, cw = chunk
    reach: dict[tuple[int, int], list[tuple[int, tuple[int, int, int, int], int, int]]] = {}
    for t, k, offset in tiles:
        x0, y0, x1, y1 = t.window
        for cy in range(y0 // ch, (y1 - 1) // ch + 1):
            for cx in range(x0 // cw, (x1 - 1) // cw + 1):
                reach.setdefault((cy, cx), []).append((t.id, t.window, k, offset))
    return [
        ChunkJob(
            cy * ch,
            min((cy + 1) * ch, height),
            cx * cw,
            min((cx + 1) * cw, width),
            tuple(reach[(cy, cx)]),
        )
        for cy, cx in sorted(reach)
    ]


@dataclass
class SlideParts:
    """The outcome of :func:`segment_slide_parts`: per tile its object count, the id offset and
    the pixels each object got in the label image. Rows come from :meth:`tables`, one tile at a
    time, so a slide's cell table never has to sit in memory whole."""

    parts: TileParts
    tiles: list[tuple[Tile, int, int]]  # (tile, k, id offset), tile order, k > 0
    written: dict[int, np.ndarray]  # tile id -> (k,) pixels written per local id

    @property
    def n_cells(self) -> int:
        return int(sum(int((self.written[t.id] > 0).sum()) for t, _k, _o in self.tiles))

    def _kept(self, tile_id: int, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ok, ids)``: which of the tile's ``k`` objects got pixels, and their cell ids."""
        return self.written[tile_id] > 0, np.arange(offset + 1, offset + k + 1, dtype=np.int64)

    def positions(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(cell_id, x, y)`` of each tile's cells, in tile order (the rows of :meth:`tables`;
        only the two position columns of each part are read)."""
        for t, k, offset in self.tiles:
            feats = self.parts.features(t.id, columns=["x", "y"])
            ok, ids = self._kept(t.id, k, offset)
            yield ids[ok], feats["x"][ok], feats["y"][ok]

    def tables(self) -> Iterator[dict[str, np.ndarray]]:
        """The cell table's columns, one tile (in tile order) at a time."""
        for t, k, offset in self.tiles:
            feats = self.parts.features(t.id)
            written = self.written[t.id]
            ok, ids = self._kept(t.id, k, offset)
            fx, fy = feats["x"][ok], feats["y"][ok]
            edge = np.minimum.reduce([fx - t.x0, t.x1 - fx, fy - t.y0, t.y1 - fy])
            yield {
                **{name: feats[name][ok] for name in FEATURES},
                "cell_id": ids[ok],
                "area_px": written[ok].astype(np.int64),
                "seg_score": feats["seg_score"][ok].astype(np.float32),
                "tile_id": np.full(int(ok.sum()), t.id, np.int32),
                "edge_dist_px": edge.astype(np.float32),
                # the backend's own columns (Backend.object_columns)
                **{k: v[ok] for k, v in feats.items() if k not in PART_COLUMNS},
            }

    def table(self, columns: dict[str, str] | None = None) -> dict[str, np.ndarray]:
        """The whole cell table in memory (small slides, tests), with the backend's
        ``columns`` (:meth:`Backend.object_columns`)."""
        names = (*TABLE_COLUMNS, *(columns or {}))
        cols: dict[str, list[np.ndarray]] = {k: [] for k in names}
        for part in self.tables():
            for k in names:
                cols[k].append(part[k])
        empty = {k: np.zeros(0, object if v == "string" else np.float32)
                 for k, v in (columns or {}).items()}  # fmt: skip
        return {k: (np.concatenate(v) if v else empty.get(k, np.zeros(0))) for k, v in cols.items()}


def sample_windows(
    width: int, height: int, mask: np.ndarray, downsample: float, *, n: int = 8, size: int = 1024
) -> list[tuple[int, int, int, int]]:
    """Up to ``n`` evenly spread ``size`` windows ``(x, y, w, h)`` on tissue. They depend on the
    slide only (not on the run's tile size), so slide-level values are the same in any run."""
    grid = tiles_on_tissue(
        make_tiles(width, height, tile=size, halo=0), mask, downsample, min_fraction=0.25
    )
    if not grid:
        grid = make_tiles(width, height, tile=size, halo=0)
    pick = np.unique(np.linspace(0, len(grid) - 1, min(n, len(grid))).round().astype(int))
    return [
        (grid[i].x0, grid[i].y0, grid[i].x1 - grid[i].x0, grid[i].y1 - grid[i].y0) for i in pick
    ]


def plan_tiles(ctx: SlideContext, backend: Backend, *, tile: int, halo: int) -> list[Tile]:
    """The tiles of ``ctx``'s slide that touch tissue, after ``backend.prepare`` has seen it.

    Tiles (level-0 H&E px, core ``tile`` wide plus ``halo``) are kept when at least 1 % of
    their core is tissue on the thumbnail mask; ``prepare`` gets a few tissue windows to set
    slide-level statistics (e.g. stain ranges) before any tile is segmented.
    """
    he = ctx.he
    mask, ds = tissue_mask(he)
    backend.prepare(ctx, sample_windows(he.width, he.height, mask, ds))
    diameter = ctx.stats.get("nucleus_diameter_um")
    if diameter and ctx.mpp:
        need = int(np.ceil(1.25 * diameter / ctx.mpp))  # objects must fit in the halo
        if need > halo:
            log.info(
                "%s: nuclei of %.1f µm need a %d px halo (halo_px is %d); using %d",
                ctx.slide_id, diameter, need, halo, need,
            )  # fmt: skip
            halo = need
            ctx.stats["halo_px"] = halo
    grid = make_tiles(he.width, he.height, tile=tile, halo=halo)
    return tiles_on_tissue(grid, mask, ds, min_fraction=0.01)


def segment_slide_parts(
    ctx: SlideContext,
    backend: Backend,
    mask_store: str | os.PathLike[str],
    parts: TileParts,
    *,
    tile: int = 1024,
    halo: int = 64,
    workers: int = 1,
    paths: SlidePaths | None = None,
    progress: Progress | None = None,
) -> SlideParts:
    """Segment a slide tile by tile into a zarr label image at ``mask_store``, the cell rows
    staying in ``parts`` (read them with :meth:`SlideParts.tables`).

    Two maps on the workers (local processes or Dask): each tile is segmented and its part
    written by the worker (tiles whose part ``parts`` already holds are skipped: a killed run
    resumes), then each chunk of the label image is composed from the parts of the tiles
    reaching into it and written by one worker. Ids and pixels are those of a sequential run:
    ids ``1, 2, ...`` in tile order, a pixel claimed by two objects goes to the earlier tile.

    Parameters
    ----------
    mask_store : path-like
        Folder of the zarr v3 array ``(height, width)`` uint32 to create (label = cell id).
    parts : TileParts
        The part folder (already keyed by :meth:`TileParts.open_for`).
    tile, halo : int
        Tile core edge and halo (level-0 px); objects must be smaller than ``halo``.
    workers : int
        Processes (needs ``paths`` to reopen the slides in each).
    """
    progress = progress or NullProgress()
    he = ctx.he
    todo = plan_tiles(ctx, backend, tile=tile, halo=halo)
    counts = {t.id: parts.done(t.id) for t in todo}
    missing = [t for t in todo if counts[t.id] is None]
    if len(missing) < len(todo):
        log.info("%s: %d of %d tiles already segmented (resuming)",
                 ctx.slide_id, len(todo) - len(missing), len(todo))  # fmt: skip
    task = f"{ctx.slide_id} segment"
    progress.start(task, len(todo))
    progress.advance(task, len(todo) - len(missing))
    n_workers = workers if paths is not None else 1
    for t, k in zip(
        missing,
        ordered_map(
            _segment_in_worker,
            missing,
            workers=n_workers,
            setup=_open_worker,
            setup_args=(paths, ctx.stats, backend, parts),
            local_context=(ctx, backend, parts),
        ),
        strict=True,
    ):
        counts[t.id] = k
        progress.advance(task)
    tiles, offset = [], 0
    for t in todo:
        k = int(counts[t.id] or 0)
        if k:
            tiles.append((t, k, offset))
            offset += k
    chunk = (min(MASK_CHUNK, he.height), min(MASK_CHUNK, he.width))
    labels_out = zarr.create_array(
        store=str(mask_store), shape=(he.height, he.width), chunks=chunk, dtype=np.uint32,
        fill_value=0, overwrite=True,
    )  # fmt: skip
    labels_out.attrs.update(
        {
            "slide_id": ctx.slide_id,
            "convention": "label = cell_id, H&E level-0 pixels",
            "mpp": ctx.mpp,
        }
    )
    jobs = chunk_jobs((he.height, he.width), chunk, tiles)
    written = {t.id: np.zeros(k, np.int64) for t, k, _o in tiles}
    mask_task = f"{ctx.slide_id} mask"
    progress.start(mask_task, len(jobs), unit="chunks")
    for result in ordered_map(
        _compose_chunk, jobs, workers=n_workers, setup=_open_mask,
        setup_args=(os.path.abspath(mask_store), parts), local_context=(labels_out, parts),
    ):  # fmt: skip
        for tile_id, pixels in result:
            written[tile_id] += pixels
        progress.advance(mask_task)
    out = SlideParts(parts, tiles, written)
    log.info("%s: %d cells from %d tiles", ctx.slide_id, out.n_cells, len(todo))
    return out


def segment_slide(
    ctx: SlideContext,
    backend: Backend,
    mask_store: str | os.PathLike[str],
    *,
    tile: int = 1024,
    halo: int = 64,
    workers: int = 1,
    paths: SlidePaths | None = None,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Segment a slide tile by tile into a zarr label image at ``mask_store`` and return its
    cell table in memory (:func:`segment_slide_parts` with a temporary part folder).

    Returns
    -------
    dict of (n,) arrays: the cell table columns ``cell_id``, ``area_px``, ``x``, ``y``, bbox,
    axes, ``eccentricity``, ``solidity``, ``seg_score``, ``tile_id``, ``edge_dist_px``, and
    the backend's own (:meth:`~immunocto.segment.base.Backend.object_columns`).
    """
    folder = Path(tempfile.mkdtemp(prefix=".parts.", dir=Path(mask_store).parent))
    parts = TileParts(folder)
    try:
        result = segment_slide_parts(
            ctx, backend, mask_store, parts, tile=tile, halo=halo, workers=workers,
            paths=paths, progress=progress,
        )  # fmt: skip
        return result.table(backend.object_columns())
    finally:
        parts.remove()
