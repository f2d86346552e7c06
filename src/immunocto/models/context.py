"""The H&E context of a cell: a 256 x 256 window (0.325 µm/px, 83 µm) around its centroid,
box-averaged to 64 x 64 (1.3 µm/px), the second input of the H&E-only model.

- :func:`context_windows` — vectorised over the cells of one region read from a slide: one box
  filter (an integral image) of the region, then one gather for all cells;
- :class:`ContextStore` — ``RUN/context.zarr``, ``(N, 64, 64, 3)`` uint8 aligned with the rows of
  the crop store (row ``r`` of both is the same cell), filled on demand by :func:`ensure_context`
  for the rows it does not hold yet. The crop store only grows (a re-cut slide gets new rows),
  so rows never change meaning and the cache never goes stale.

Coordinates: ``x`` = column, ``y`` = row, H&E level-0 px; the window's centre pixel
``[128, 128]`` (at 0.325 µm/px) is the rounded centroid, as for the 64 x 64 crops.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import zarr

from immunocto.db.extract import group_cells
from immunocto.db.store import CHUNK, STORE_MPP, read_index, row_array
from immunocto.errors import ImmunoctoError
from immunocto.progress import NullProgress, Progress

log = logging.getLogger(__name__)

WINDOW = 256  # px at STORE_MPP
OUT = 64  # context pixels per side


def context_path(run: str | os.PathLike[str]) -> Path:
    return Path(run) / "context.zarr"


def box_mean(region: np.ndarray, f: int) -> np.ndarray:
    """``B[p, q] = mean(region[p:p+f, q:q+f])`` for ``(h, w, c)`` uint8, as float32
    ``(h - f + 1, w - f + 1, c)``, by an integral image (no per-pixel loop)."""
    if f <= 1:
        return region.astype(np.float32)
    s = np.zeros((region.shape[0] + 1, region.shape[1] + 1, region.shape[2]), np.float64)
    np.cumsum(np.cumsum(region, axis=0, dtype=np.float64), axis=1, out=s[1:, 1:])
    total = s[f:, f:] - s[:-f, f:] - s[f:, :-f] + s[:-f, :-f]
    return (total / (f * f)).astype(np.float32)


def context_windows(
    slide, xs: np.ndarray, ys: np.ndarray, *, window: int = WINDOW, out: int = OUT
) -> np.ndarray:
    """Context images ``(N, out, out, 3)`` uint8 of cells at ``(xs, ys)`` (level-0 px).

    ``window`` is measured at 0.325 µm/px; on a slide of another pixel size the window covers
    the same micrometres (``window * 0.325 / mpp`` slide px), averaged over boxes of the nearest
    whole number of slide pixels. Outside the slide reads as zeros (black)."""
    xs = np.rint(np.asarray(xs, float)).astype(np.int64)
    ys = np.rint(np.asarray(ys, float)).astype(np.int64)
    if len(xs) == 0:
        return np.zeros((0, out, out, 3), np.uint8)
    span = window * STORE_MPP / float(slide.mpp)  # slide px per window
    step = span / out
    f = max(1, round(step))
    offsets = np.rint(-span / 2 + step * np.arange(out)).astype(np.int64)
    x0 = int(xs.min() + offsets[0])
    y0 = int(ys.min() + offsets[0])
    x1 = int(xs.max() + offsets[-1]) + f
    y1 = int(ys.max() + offsets[-1]) + f
    region = slide.read_region(x0, y0, x1 - x0, y1 - y0)
    boxes = box_mean(region[..., :3], f)
    ix = xs[:, None] + offsets[None, :] - x0
    iy = ys[:, None] + offsets[None, :] - y0
    ctx = boxes[iy[:, :, None], ix[:, None, :]]
    return np.clip(np.rint(ctx), 0, 255).astype(np.uint8)


class ContextStore:
    """``RUN/context.zarr``: array ``context`` ``(N, 64, 64, 3)`` uint8 and a ``done`` flag per
    row (rows of the crop store that were never filled are zeros with ``done`` 0)."""

    def __init__(self, root: str | os.PathLike[str], mode: str = "r") -> None:
        self.root = Path(root)
        if mode == "r" and not self.root.exists():
            raise ImmunoctoError(
                f"{self.root}: no context store; `immunocto train --kind he` builds it"
            )
        if not self.root.exists():
            group = zarr.open_group(str(self.root), mode="w")
            group.attrs.update({"window_px": WINDOW, "out_px": OUT, "mpp": STORE_MPP})
            row_array(group, "context", (OUT, OUT, 3), np.uint8)
            group.create_array("done", shape=(0,), chunks=(65536,), dtype=np.uint8, fill_value=0)
        self.group = zarr.open_group(str(self.root), mode=mode if mode == "r" else "a")
        self.context = self.group["context"]
        self.done = self.group["done"]

    @property
    def rows(self) -> int:
        return int(self.context.shape[0])


def ensure_context(
    cfg,
    *,
    db: str | os.PathLike[str] | None = None,
    workers: int = 1,
    progress: Progress | None = None,
) -> tuple[ContextStore, int]:
    """Fill ``DB/context.zarr`` for every row of the crop store ``DB/crops.zarr`` it lacks;
    ``DB`` is ``db`` (e.g. the V1 database ``RUN/v1``) or the run folder. The windows are cut
    from the slides of ``cfg``.

    Writes whole chunks (a chunk is written once, after all its rows are cut), so a crash
    loses at most the chunk in hand; returns the store and the number of rows cut."""
    from immunocto.io import open_slide

    progress = progress or NullProgress()
    run = Path(db) if db is not None else cfg.run_dir
    index, _ = read_index(run)
    if index.num_rows == 0:
        raise ImmunoctoError(f"{run}: the cell database is empty; run `immunocto build-db` first")
    store = ContextStore(context_path(run), mode="a")
    total = int(index.column("row").to_numpy().max()) + 1
    if store.rows < total:
        store.context.resize((total, OUT, OUT, 3))
        store.done.resize((total,))
    done = np.asarray(store.done[:]).astype(bool)
    df = index.select(["row", "slide_id", "x", "y"]).to_pandas()
    todo = df[~done[df["row"].to_numpy()]]
    if todo.empty:
        return store, 0
    slides = {s.id: s for s in cfg.slides}
    task = "context windows"
    progress.start(task, len(todo), unit="cells")
    cut = 0
    opened: dict[str, object] = {}
    try:
        cut = _fill(store, todo, slides, opened, total, run, progress, task, open_slide, cfg)
    finally:
        for slide in opened.values():
            slide.close()
    log.info("context windows: %d cells cut", cut)
    return store, cut


def _fill(store, todo, slides, opened, total, run, progress, task, open_slide, cfg) -> int:
    cut = 0
    for chunk, part in todo.groupby(todo["row"].to_numpy() // CHUNK, sort=True):
        lo = int(chunk) * CHUNK
        hi = min(lo + CHUNK, total)
        block = np.asarray(store.context[lo:hi])
        for sid, cells in part.groupby("slide_id"):
            if sid not in slides:
                raise ImmunoctoError(
                    f"{run / 'crops.parquet'}: slide {sid!r} is not in the run config; the "
                    "context needs the slide (train with --context none for imported crops)"
                )
            if sid not in opened:
                s = slides[sid]
                opened[sid] = open_slide(cfg.resolve(s.he), mpp=s.mpp)
            for g in group_cells(cells["x"].to_numpy(), cells["y"].to_numpy()):
                sub = cells.iloc[g]
                block[sub["row"].to_numpy() - lo] = context_windows(
                    opened[sid], sub["x"].to_numpy(), sub["y"].to_numpy()
                )
        store.context[lo:hi] = block
        flags = np.asarray(store.done[lo:hi])
        flags[part["row"].to_numpy() - lo] = 1
        store.done[lo:hi] = flags
        cut += len(part)
        progress.advance(task, len(part))
    return cut
