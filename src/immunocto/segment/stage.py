"""``immunocto segment``: candidate cells of every slide -> ``RUN/cells/<slide>.parquet`` and
``RUN/masks/<slide>.zarr``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from immunocto._fs import atomic_path
from immunocto._parallel import warm_workers
from immunocto._parts import parts_key
from immunocto._table import ROW_GROUP
from immunocto.config import RunConfig, SegmentParams
from immunocto.io.open import open_pair
from immunocto.progress import NullProgress, Progress
from immunocto.segment.base import SlideContext, SlidePaths
from immunocto.segment.parts import TileParts
from immunocto.segment.registry import TORCH_BACKENDS, make_backend, resolve_backend_name
from immunocto.segment.tiled import segment_slide_parts

log = logging.getLogger(__name__)

META_KEY = b"immunocto.segment"


@dataclass
class SegmentResult:
    slide_id: str
    status: str  # "segmented" | "current"
    backend: str
    n_cells: int
    cells: Path
    mask: Path
    seconds: float = 0.0


def cells_path(cfg: RunConfig, slide_id: str) -> Path:
    return cfg.run_dir / "cells" / f"{slide_id}.parquet"


def mask_path(cfg: RunConfig, slide_id: str) -> Path:
    return cfg.run_dir / "masks" / f"{slide_id}.zarr"


def parts_path(cfg: RunConfig, slide_id: str) -> Path:
    """Per-tile results of an unfinished segmentation (removed once the slide is done)."""
    return cfg.run_dir / "masks" / f".{slide_id}.parts"


def file_id(path: Path | None) -> Any:
    """What identifies an input file in a fingerprint: ``[path, size, mtime_ns]`` (``None``
    when it does not exist)."""
    if path is None or not path.exists():
        return None
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_segment_meta(path: Path) -> dict[str, Any] | None:
    """The provenance stored with a cell table by this stage (``None`` when absent)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    raw = meta.get(META_KEY)
    return json.loads(raw) if raw else None


def nucleus_model_digest(folder: Path | None) -> str:
    """SHA-256 of a nucleus model's weights and post-processing settings (the shipped model
    when ``folder`` is None): a new model or re-tuned thresholds re-segment, a reinstalled
    identical one does not."""
    from immunocto.segment.learned import shipped_model_dir

    folder = Path(folder or shipped_model_dir())
    path = folder / "model.safetensors"
    if not path.is_file():
        return "missing"
    h = hashlib.sha256(path.read_bytes())
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    keys = ("mpp", "fg_threshold", "seed_threshold", "min_score", "min_area_um2", "bn_adapt",
            "bn_adapt_min_px", "tta", "post_tuning", "types", "type_weights")  # fmt: skip
    post = {k: cfg.get(k) for k in keys} if isinstance(cfg, dict) else {}
    if post.get("post_tuning") in (None, "fixed"):  # the default: digests of before stay
        post.pop("post_tuning", None)
    h.update(json.dumps(post, sort_keys=True).encode())
    return h.hexdigest()[:16]


def run_segment(
    cfg: RunConfig,
    *,
    backend: str | None = None,
    slides: list[str] | None = None,
    force: bool = False,
    params: SegmentParams | None = None,
    progress: Progress | None = None,
) -> list[SegmentResult]:
    """Segment every slide (or ``slides``) whose inputs or parameters changed."""
    from immunocto.register.stage import registration_path, run_register

    progress = progress or NullProgress()
    params = params or cfg.segmentation
    if params.nucleus_model is not None:
        params = params.model_copy(update={"nucleus_model": cfg.resolve(params.nucleus_model)})
    chosen = cfg.select_slides(slides)
    results = []
    for slide in chosen:
        i = cfg.slides.index(slide)  # the config entry, for open_pair's errors
        name = resolve_backend_name(backend or params.backend, has_if=slide.if_ is not None)
        # backends reading the IF nuclear stain through the registration register first
        needs_reg = name in ("if-nuclear", "if-learned") or (
            name == "sam"
            and params.sam.mode == "guided"
            and slide.if_ is not None
            and "if-nuclear" in params.sam.guide.split("+")
        )
        reg_path = registration_path(cfg, slide.id) if slide.if_ is not None else None
        if needs_reg:
            run_register(cfg, slides=[slide.id], progress=progress)  # cached when current
        fingerprint = {
            "backend": name,
            "params": params.model_dump(mode="json"),
            "he": file_id(cfg.resolve(slide.he)),
            "if": file_id(cfg.resolve(slide.if_)) if slide.if_ else None,
            "registration": _digest(json.loads(reg_path.read_text())["affine"])
            if needs_reg and reg_path
            else None,
            "nucleus_model": nucleus_model_digest(params.nucleus_model)
            if name in ("he", "sam")
            else None,
        }
        out_cells, out_mask = cells_path(cfg, slide.id), mask_path(cfg, slide.id)
        old = read_segment_meta(out_cells) if out_cells.exists() else None
        if not force and old and old.get("fingerprint") == fingerprint and out_mask.exists():
            results.append(
                SegmentResult(
                    slide.id, "current", name, int(old.get("n_cells", 0)), out_cells, out_mask
                )
            )
            continue
        t0 = time.perf_counter()
        he, if_ = open_pair(cfg, i)
        registration = None
        if needs_reg:
            from immunocto.register.model import RegistrationModel

            registration = RegistrationModel.load(reg_path)
        ctx = SlideContext(slide.id, he, if_, registration, cfg.registration.nuclear_channel)
        if name in TORCH_BACKENDS:
            warm_workers()  # while make_backend and prepare run here
        be = make_backend(name, params, has_if=if_ is not None)
        paths = SlidePaths.for_slide(cfg, slide, reg_path if needs_reg else None)
        workers = params.workers or os.cpu_count() or 1
        if name == "sam" and be.device.startswith("cuda"):  # type: ignore[attr-defined]
            workers = 1  # one process owns the GPU
        # finished tiles survive a crash here and are reused by the next run with the same key
        parts = TileParts(parts_path(cfg, slide.id)).open_for(parts_key(fingerprint))
        try:
            with atomic_path(out_mask) as tmp_mask:
                result = segment_slide_parts(
                    ctx, be, tmp_mask, parts, tile=params.tile_px, halo=params.halo_px,
                    workers=workers, paths=paths, progress=progress,
                )  # fmt: skip
                n_cells = result.n_cells
                write_cell_table_parts(out_cells, slide.id, he.mpp, name, result.tables(), {
                    "stage": "segment", "fingerprint": fingerprint, "backend": be.describe(),
                    "tile_px": params.tile_px, "halo_px": params.halo_px, "n_cells": n_cells,
                    "slide_stats": ctx.stats,
                }, be.object_columns())  # fmt: skip
            parts.remove()
        finally:
            he.close()
            if if_ is not None:
                if_.close()
        results.append(
            SegmentResult(
                slide.id,
                "segmented",
                name,
                n_cells,
                out_cells,
                out_mask,
                time.perf_counter() - t0,
            )
        )
    return results


def _cell_batch(
    slide_id: str,
    mpp: float,
    source: str,
    table: dict[str, np.ndarray],
    columns: dict[str, str] | None = None,
) -> pa.Table:
    """The cell-table rows of ``table`` (columns of :data:`~immunocto.segment.tiled.TABLE_COLUMNS`
    and the backend's ``columns``, name -> ``float32`` / ``string``)."""
    n = len(table["cell_id"])
    extra = {
        name: pa.array(np.asarray(table[name], object), pa.string())
        if kind == "string"
        else np.asarray(table[name], np.float32)
        for name, kind in (columns or {}).items()
    }
    data = {
        "slide_id": pa.array(np.full(n, slide_id, dtype=object), pa.string()),
        "cell_id": table["cell_id"].astype(np.int64),
        "x": table["x"].astype(np.float64),
        "y": table["y"].astype(np.float64),
        "x_um": table["x"].astype(np.float64) * mpp,
        "y_um": table["y"].astype(np.float64) * mpp,
        "area_px": table["area_px"].astype(np.int64),
        "area_um2": table["area_px"].astype(np.int64) * mpp * mpp,
        **{k: table[k].astype(np.int64) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")},
        "major_axis_px": table["major_axis_px"].astype(np.float32),
        "minor_axis_px": table["minor_axis_px"].astype(np.float32),
        "eccentricity": table["eccentricity"].astype(np.float32),
        "solidity": table["solidity"].astype(np.float32),
        "tile_id": table["tile_id"].astype(np.int32),
        "edge_dist_px": table["edge_dist_px"].astype(np.float32),
        "seg_source": pa.array(np.full(n, source, dtype=object), pa.string()),
        "seg_score": table["seg_score"].astype(np.float32),
        **extra,
    }
    return pa.table(data)


def write_cell_table(
    path: Path,
    slide_id: str,
    mpp: float,
    source: str,
    table: dict[str, np.ndarray],
    meta: dict[str, Any],
    columns: dict[str, str] | None = None,
) -> Path:
    """Write ``RUN/cells/<slide>.parquet`` atomically, with provenance in the schema metadata
    (``columns``: the backend's own, :meth:`~immunocto.segment.base.Backend.object_columns`)."""
    return write_cell_table_parts(path, slide_id, mpp, source, [table], meta, columns)


def write_cell_table_parts(
    path: Path,
    slide_id: str,
    mpp: float,
    source: str,
    tables: Iterable[dict[str, np.ndarray]],
    meta: dict[str, Any],
    columns: dict[str, str] | None = None,
) -> Path:
    """Write ``RUN/cells/<slide>.parquet`` atomically from ``tables`` (column dicts, e.g. one
    per tile), holding at most one row group (:data:`ROW_GROUP` rows) in memory; ``columns``
    are the backend's own (name -> ``float32`` / ``string``), present even when no cell is."""
    empty = {
        "cell_id": np.zeros(0, np.int64), "x": np.zeros(0), "y": np.zeros(0),
        "area_px": np.zeros(0, np.int64), "tile_id": np.zeros(0, np.int32),
        **{k: np.zeros(0, np.int64) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")},
        **{k: np.zeros(0, np.float32) for k in ("major_axis_px", "minor_axis_px",
           "eccentricity", "solidity", "edge_dist_px", "seg_score")},
        **{k: np.zeros(0, object) for k in (columns or {})},
    }  # fmt: skip
    schema = _cell_batch(slide_id, mpp, source, empty, columns).schema.with_metadata(
        {META_KEY: json.dumps(meta, default=str).encode()}
    )
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            pending: list[pa.Table] = []
            rows = written = 0
            for table in tables:
                batch = _cell_batch(slide_id, mpp, source, table, columns)
                if batch.num_rows:
                    pending.append(batch)
                    rows += batch.num_rows
                if rows >= ROW_GROUP:
                    writer.write_table(pa.concat_tables(pending).cast(schema))
                    written += rows
                    pending, rows = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending).cast(schema))
            elif not written:
                writer.write_table(schema.empty_table())
    return path


def segment_stage(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Pipeline stage: segment every slide; summary for `immunocto run`."""
    results = run_segment(cfg, progress=progress)
    return {
        "slides": len(results),
        "new": sum(r.status == "segmented" for r in results),
        "backend": ",".join(sorted({r.backend for r in results})),
        "cells": sum(r.n_cells for r in results),
    }
