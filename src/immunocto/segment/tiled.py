"""Tiled segmentation of a whole slide with the responsible-tile rule.

Every tile on tissue is segmented on its window (core + halo); only objects whose centroid
lies in the core are kept, so an object cut by one tile's edge is whole in the tile that owns
it and absent from the others (see :mod:`immunocto.io.tiling`). Kept objects are written into
the slide's label image in tile order, never over a pixel already claimed (first writer
wins), with ids 1, 2, ... in that order; ``area_px`` counts the pixels actually written.
Tiles are segmented on a pool of worker processes; writing stays in this process, so the
result does not depend on the number of workers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import zarr

from immunocto._parallel import ordered_map
from immunocto.io.tiling import Tile, make_tiles, tiles_on_tissue, tissue_mask
from immunocto.progress import NullProgress, Progress
from immunocto.segment.base import Backend, SlideContext, SlidePaths
from immunocto.segment.measure import object_features, solidity

log = logging.getLogger(__name__)

MASK_CHUNK = 1024
#: Columns of the per-tile feature dicts carried into the cell table.
FEATURES = (
    "x", "y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
    "major_axis_px", "minor_axis_px", "eccentricity", "solidity",
)  # fmt: skip


@dataclass
class TileResult:
    """Responsible objects of one tile, relabelled ``1..k`` inside the tile's window."""

    tile: Tile
    labels: np.ndarray  # (h, w) window labels, 0 elsewhere
    features: dict[str, np.ndarray]  # (k,) each; coordinates in level-0 px
    scores: np.ndarray  # (k,)


def segment_tile(ctx: SlideContext, backend: Backend, tile: Tile) -> TileResult:
    """Segment one tile's window and keep the objects the tile is responsible for."""
    x0, y0, x1, y1 = tile.window
    labels, scores = backend.segment(ctx, x0, y0, x1 - x0, y1 - y0)
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
    )


def _open_worker(
    paths: SlidePaths, stats: dict[str, float], backend: Backend
) -> tuple[SlideContext, Backend]:
    return paths.open(stats), backend


def _segment_in_worker(context: tuple[SlideContext, Backend], tile: Tile) -> TileResult:
    ctx, backend = context
    return segment_tile(ctx, backend, tile)


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
    """Segment a slide tile by tile into a zarr label image at ``mask_store``.

    Parameters
    ----------
    ctx : SlideContext
    backend : Backend
    mask_store : path-like
        Folder of the zarr v3 array ``(height, width)`` uint32 to create (label = cell id).
    tile, halo : int
        Tile core edge and halo (level-0 px); objects must be smaller than ``halo``.
    workers : int
        Processes segmenting tiles (needs ``paths`` to reopen the slides in each).

    Returns
    -------
    dict of (n,) arrays: the cell table columns ``cell_id``, ``area_px``, ``x``, ``y``, bbox,
    axes, ``eccentricity``, ``solidity``, ``seg_score``, ``tile_id``, ``edge_dist_px``.
    """
    progress = progress or NullProgress()
    he = ctx.he
    todo = plan_tiles(ctx, backend, tile=tile, halo=halo)
    labels_out = zarr.create_array(
        store=str(mask_store),
        shape=(he.height, he.width),
        chunks=(min(MASK_CHUNK, he.height), min(MASK_CHUNK, he.width)),
        dtype=np.uint32,
        fill_value=0,
        overwrite=True,
    )
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in (*FEATURES, "cell_id", "area_px", "seg_score", "tile_id", "edge_dist_px")
    }
    next_id = 1
    task = f"{ctx.slide_id} segment"
    progress.start(task, len(todo))
    results = ordered_map(
        _segment_in_worker,
        todo,
        workers=workers if paths is not None else 1,
        setup=_open_worker,
        setup_args=(paths, ctx.stats, backend),
        local_context=(ctx, backend),
    )
    for res in results:
        k = len(res.scores)
        if k:
            x0, y0, x1, y1 = res.tile.window
            region = np.asarray(labels_out[y0:y1, x0:x1])
            free = (res.labels > 0) & (region == 0)
            ids = np.arange(next_id, next_id + k, dtype=np.uint32)
            region[free] = ids[res.labels[free] - 1]
            labels_out[y0:y1, x0:x1] = region
            written = np.bincount(res.labels[free], minlength=k + 1)[1:]
            ok = written > 0
            for name in FEATURES:
                cols[name].append(res.features[name][ok])
            cols["cell_id"].append(ids[ok].astype(np.int64))
            cols["area_px"].append(written[ok].astype(np.int64))
            cols["seg_score"].append(res.scores[ok].astype(np.float32))
            cols["tile_id"].append(np.full(int(ok.sum()), res.tile.id, np.int32))
            t = res.tile
            fx, fy = res.features["x"][ok], res.features["y"][ok]
            edge = np.minimum.reduce([fx - t.x0, t.x1 - fx, fy - t.y0, t.y1 - fy])
            cols["edge_dist_px"].append(edge.astype(np.float32))
            next_id += k
        progress.advance(task)
    table = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
    labels_out.attrs.update(
        {
            "slide_id": ctx.slide_id,
            "convention": "label = cell_id, H&E level-0 pixels",
            "mpp": ctx.mpp,
        }
    )
    log.info("%s: %d cells from %d tiles", ctx.slide_id, len(table["cell_id"]), len(todo))
    return table
