"""``immunocto quantify``: per-cell IF statistics into ``RUN/cells/<slide>.parquet``.

Adds ``<marker>_<stat>`` for every IF channel and every statistic of
:data:`immunocto.quantify.features.STATS`, plus ``nuclear_confirmed`` (Immunocto's rule on the
cell's mean nuclear stain). Columns written by later stages are kept only when the cell set
is unchanged; provenance goes into the Parquet metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from immunocto._fs import atomic_write_bytes
from immunocto._parallel import ordered_map
from immunocto._parts import PartFolder, decode_arrays, encode_arrays, parts_key
from immunocto._table import ROW_GROUP, rewrite_table
from immunocto.config import RunConfig
from immunocto.errors import ImmunoctoError
from immunocto.io.open import open_slide
from immunocto.io.tiling import Tile, make_tiles, tile_of
from immunocto.progress import NullProgress, Progress
from immunocto.quantify.features import STATS
from immunocto.quantify.tiles import QuantifyContext, prefetch_tile, quantify_tile
from immunocto.register.model import RegistrationModel

log = logging.getLogger(__name__)

META_KEY = b"immunocto.quantify"


@dataclass
class QuantifyResult:
    slide_id: str
    status: str  # "quantified" | "current" | "no IF"
    n_cells: int
    columns: int
    seconds: float = 0.0


@dataclass(frozen=True)
class QuantifyOpener:
    """Reopens the IF, registration and mask in a worker (file handles must not cross a fork)."""

    if_path: Path
    markers: Path | None
    if_mpp: float | None  # the config's IF pixel size (overrides the file's)
    he_mpp: float  # used when neither gives one (as open_pair does)
    registration: Path
    mask: Path
    nuclear_channel: str
    confirm_fraction: float
    ring_um: float
    cell_um: float
    bg_inner_um: float
    bg_outer_um: float

    @classmethod
    def for_slide(cls, cfg: RunConfig, slide) -> QuantifyOpener:
        from immunocto.register.stage import registration_path
        from immunocto.segment.stage import mask_path

        p = cfg.quantification
        return cls(
            if_path=cfg.resolve(slide.if_),
            markers=cfg.resolve(slide.markers) if slide.markers else None,
            if_mpp=slide.if_mpp,
            he_mpp=slide.mpp,
            registration=registration_path(cfg, slide.id),
            mask=mask_path(cfg, slide.id),
            nuclear_channel=cfg.registration.nuclear_channel,
            confirm_fraction=cfg.registration.nuclear_confirm_fraction,
            ring_um=p.ring_um,
            cell_um=p.cell_um,
            bg_inner_um=p.background_inner_um,
            bg_outer_um=p.background_outer_um,
        )

    def open(self) -> QuantifyContext:
        if_ = open_slide(self.if_path, markers=self.markers, mpp=self.if_mpp)
        if if_.mpp is None:
            if_.mpp = self.he_mpp
        model = RegistrationModel.load(self.registration)
        if model.hoechst_otsu is None:
            raise ImmunoctoError(
                f"{self.registration}: no nuclear Otsu stored; run `immunocto register --force`"
            )
        return QuantifyContext(
            if_=if_,
            registration=model,
            mask=zarr.open_array(str(self.mask), mode="r"),
            nuclear_channel=self.nuclear_channel,
            confirm_level=self.confirm_fraction * model.hoechst_otsu,
            ring_um=self.ring_um,
            cell_um=self.cell_um,
            bg_inner_um=self.bg_inner_um,
            bg_outer_um=self.bg_outer_um,
        )


#: Centroid columns in the IF frame (IF level-0 pixels) added next to ``x, y`` (H&E frame).
FRAME_COLUMNS = ("x_if", "y_if")


def quantify_columns(channels: list[str]) -> list[str]:
    return [f"{m}_{s}" for s in STATS for m in channels]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _meta(path: Path, key: bytes) -> dict[str, Any] | None:
    raw = (pq.read_schema(path).metadata or {}).get(key)
    return json.loads(raw) if raw else None


def run_quantify(
    cfg: RunConfig,
    *,
    slides: list[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> list[QuantifyResult]:
    """Quantify every slide with IF (or the ``slides`` ids) whose inputs changed."""
    from immunocto.register.stage import registration_path
    from immunocto.segment.stage import META_KEY as SEG_KEY
    from immunocto.segment.stage import cells_path, mask_path, run_segment

    progress = progress or NullProgress()
    params = cfg.quantification
    results = []
    for slide in cfg.select_slides(slides):
        if slide.if_ is None:
            results.append(QuantifyResult(slide.id, "no IF", 0, 0))
            continue
        cells_file, mask_dir = cells_path(cfg, slide.id), mask_path(cfg, slide.id)
        if not cells_file.exists() or not mask_dir.exists():
            log.info("%s: no segmentation yet; segmenting first", slide.id)
            run_segment(cfg, slides=[slide.id], progress=progress)
        reg_file = registration_path(cfg, slide.id)
        if not reg_file.exists():
            from immunocto.register.stage import run_register

            run_register(cfg, slides=[slide.id], progress=progress)
        seg_meta = _meta(cells_file, SEG_KEY) or {}
        fingerprint = {
            "segmentation": _digest(seg_meta.get("fingerprint")),
            "n_cells": seg_meta.get("n_cells"),
            "registration": _digest(json.loads(reg_file.read_text())["affine"]),
            "params": params.model_dump(mode="json"),
            "confirm_fraction": cfg.registration.nuclear_confirm_fraction,
        }
        old = _meta(cells_file, META_KEY)
        if not force and old and old.get("fingerprint") == fingerprint:
            results.append(
                QuantifyResult(
                    slide.id, "current", int(old.get("n_cells", 0)), len(old.get("columns", []))
                )
            )
            continue
        t0 = time.perf_counter()
        opener = QuantifyOpener.for_slide(cfg, slide)
        local = opener.open()
        try:
            channels = list(local.if_.channel_names)
            parts = QuantifyParts(quantify_parts_path(cfg, slide.id)).open_for(
                {**parts_key(fingerprint), "channels": channels}
            )
            jobs, n_cells = _plan_jobs(cells_file, local.mask.shape, params.tile_px, params.halo_px)
            missing = [j for j in jobs if not parts.done(j.tile.id)]
            task = f"{slide.id} quantify"
            progress.start(task, len(jobs))
            progress.advance(task, len(jobs) - len(missing))
            if len(missing) < len(jobs):
                log.info("%s: %d of %d tiles already quantified (resuming)",
                         slide.id, len(jobs) - len(missing), len(jobs))  # fmt: skip
            for _ in ordered_map(
                _quantify_part, missing, workers=params.workers or os.cpu_count() or 1,
                setup=_open_part_context, setup_args=(opener, parts.folder),
                local_context=(local, parts), prefetch=_prefetch_part,
            ):  # fmt: skip
                progress.advance(task)
            confirm_level = local.confirm_level
        finally:
            local.ahead.close()
            local.if_.close()
        names = quantify_columns(channels)
        meta_value = json.dumps(
            {
                "stage": "quantify",
                "fingerprint": fingerprint,
                "n_cells": n_cells,
                "channels": channels,
                "stats": list(STATS),
                "columns": names,
                "confirm_level": confirm_level,
                "space": "statistics on raw IF pixels; masks carried into IF space through the registration",
            }
        ).encode()
        _merge_parts(cells_file, parts, jobs, names, confirm_level,
                     RegistrationModel.load(reg_file), meta_value)  # fmt: skip
        parts.remove()
        results.append(
            QuantifyResult(slide.id, "quantified", n_cells, len(names), time.perf_counter() - t0)
        )
    return results


def quantify_parts_path(cfg: RunConfig, slide_id: str) -> Path:
    """Per-tile statistics of an unfinished quantification (removed once the slide is done)."""
    return cfg.run_dir / "cells" / f".{slide_id}.quantify.parts"


class QuantifyParts(PartFolder):
    """Per-tile statistics written by the workers: the table rows of the tile's cells, their
    statistics ``(len(STATS) * channels, n)`` float32 in :func:`quantify_columns` order, and
    the mean nuclear stain ``(n,)`` float64 (the confirmation compares it)."""

    def _path(self, tile_id: int) -> Path:
        return self.folder / f"tile-{tile_id:06d}.stats.zst"

    def done(self, tile_id: int) -> bool:
        return self._path(tile_id).exists()

    def write(
        self, tile_id: int, rows: np.ndarray, values: np.ndarray, nuclear: np.ndarray
    ) -> None:
        blob = encode_arrays(rows.astype(np.int64), values.astype(np.float32), nuclear)
        atomic_write_bytes(self._path(tile_id), blob)

    def read(self, tile_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, values, nuclear = decode_arrays(self._path(tile_id).read_bytes(), 3)
        return rows, values, nuclear


@dataclass(frozen=True)
class QuantifyJob:
    """One tile and the cells it is responsible for: their table rows and ids."""

    tile: Tile
    rows: np.ndarray  # (n,) int64, positions in the cell table
    cell_ids: np.ndarray  # (n,) int64


def _plan_jobs(
    cells_file: Path, shape: tuple[int, ...], tile_px: int, halo_px: int
) -> tuple[list[QuantifyJob], int]:
    """Group the cells by responsible tile, reading only ``cell_id, x, y`` of the table."""
    head = pq.read_table(cells_file, columns=["cell_id", "x", "y"])
    ids = head.column("cell_id").to_numpy()
    owner = tile_of(
        tiles := make_tiles(shape[1], shape[0], tile=tile_px, halo=halo_px),
        head.column("x").to_numpy(),
        head.column("y").to_numpy(),
    )
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(len(tiles) + 1))
    jobs = [
        QuantifyJob(
            t, order[bounds[t.id] : bounds[t.id + 1]], ids[order[bounds[t.id] : bounds[t.id + 1]]]
        )
        for t in tiles
        if bounds[t.id + 1] > bounds[t.id]
    ]
    return jobs, len(ids)


def _open_part_context(
    opener: QuantifyOpener, folder: Path
) -> tuple[QuantifyContext, QuantifyParts]:
    return opener.open(), QuantifyParts(folder)


def _prefetch_part(context: tuple[QuantifyContext, QuantifyParts], job: QuantifyJob) -> None:
    prefetch_tile(context[0], job.tile)


def _quantify_part(context: tuple[QuantifyContext, QuantifyParts], job: QuantifyJob) -> int:
    """Quantify one tile in the worker and write its part; only the cell count goes back."""
    ctx, parts = context
    _, stats = quantify_tile(ctx, (job.tile, job.cell_ids))
    nuclear = stats["mean"][:, ctx.if_.channel_names.index(ctx.nuclear_channel)]
    values = np.concatenate([np.asarray(stats[s], np.float32).T for s in STATS], axis=0)
    parts.write(job.tile.id, job.rows, values, np.asarray(nuclear, np.float64))
    return len(job.rows)


def _merge_parts(
    cells_file: Path,
    parts: QuantifyParts,
    jobs: list[QuantifyJob],
    names: list[str],
    confirm_level: float,
    registration: RegistrationModel,
    meta_value: bytes,
) -> None:
    """Rewrite ``cells_file`` with the statistics of ``parts``, one row group at a time.

    Rows keep their order; each part is read once and dropped once the rows it covers are
    written, so memory holds a row group and the parts reaching into it, not the slide.
    """
    fields = [*(pa.field(n, pa.float32()) for n in names),
              pa.field("nuclear_confirmed", pa.bool_()),
              *(pa.field(c, pa.float32()) for c in FRAME_COLUMNS)]  # fmt: skip
    spans = sorted(
        (int(j.rows.min()), int(j.rows.max()), j.tile.id) for j in jobs
    )  # row range of each part, by first row
    cache: dict[int, tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    nxt = 0

    def columns_for(batch: pa.RecordBatch, r0: int) -> list[pa.Array]:
        nonlocal nxt
        n = batch.num_rows
        r1 = r0 + n
        for tid in [t for t, (last, _) in cache.items() if last < r0]:
            del cache[tid]  # every row of that part is written
        while nxt < len(spans) and spans[nxt][0] < r1:
            _, last, tid = spans[nxt]
            cache[tid] = (last, parts.read(tid))
            nxt += 1
        values = np.full((len(names), n), np.nan, np.float32)
        nuclear = np.full(n, np.nan)
        for _, (rows, vals, nuc) in cache.values():
            sel = (rows >= r0) & (rows < r1)
            values[:, rows[sel] - r0] = vals[:, sel]
            nuclear[rows[sel] - r0] = nuc[sel]
        # the centroid in the IF frame too (IF level-0 px, through the registration)
        u, v = registration.he_to_if(
            batch.column("x").to_numpy().astype(np.float64),
            batch.column("y").to_numpy().astype(np.float64),
        )
        return [*(pa.array(values[k]) for k in range(len(names))),
                pa.array(nuclear >= confirm_level),
                pa.array(u.astype(np.float32)), pa.array(v.astype(np.float32))]  # fmt: skip

    rewrite_table(cells_file, fields, columns_for, meta={META_KEY: meta_value}, row_group=ROW_GROUP)


def quantify_stage(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Pipeline stage summary."""
    results = run_quantify(cfg, progress=progress)
    return {
        "slides": sum(r.status != "no IF" for r in results),
        "new": sum(r.status == "quantified" for r in results),
        "cells": sum(r.n_cells for r in results),
        "columns": max((r.columns for r in results), default=0),
    }
