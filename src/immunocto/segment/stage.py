"""``immunocto segment``: candidate cells of every slide -> ``RUN/cells/<slide>.parquet`` and
``RUN/masks/<slide>.zarr``."""

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

from immunocto._fs import atomic_path
from immunocto.config import RunConfig, SegmentParams
from immunocto.errors import ImmunoctoError
from immunocto.io.open import open_pair
from immunocto.progress import NullProgress, Progress
from immunocto.segment.base import SlideContext, SlidePaths
from immunocto.segment.registry import make_backend, resolve_backend_name
from immunocto.segment.tiled import segment_slide

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


def _file_id(path: Path | None) -> Any:
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
            "bn_adapt_min_px")  # fmt: skip
    post = {k: cfg.get(k) for k in keys} if isinstance(cfg, dict) else {}
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
    wanted = set(slides) if slides else None
    if wanted and wanted - {s.id for s in cfg.slides}:
        unknown = ", ".join(sorted(wanted - {s.id for s in cfg.slides}))
        raise ImmunoctoError(
            f"unknown slide id(s) {unknown} (known: {', '.join(s.id for s in cfg.slides)})"
        )
    results = []
    for i, slide in enumerate(cfg.slides):
        if wanted and slide.id not in wanted:
            continue
        name = resolve_backend_name(backend or params.backend, has_if=slide.if_ is not None)
        needs_reg = name == "if-nuclear" or (
            name == "sam"
            and params.sam.mode == "guided"
            and slide.if_ is not None
            and params.sam.guide == "if-nuclear"
        )
        reg_path = registration_path(cfg, slide.id) if slide.if_ is not None else None
        if needs_reg:
            run_register(cfg, slides=[slide.id], progress=progress)  # cached when current
        fingerprint = {
            "backend": name,
            "params": params.model_dump(mode="json"),
            "he": _file_id(cfg.resolve(slide.he)),
            "if": _file_id(cfg.resolve(slide.if_)) if slide.if_ else None,
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
        be = make_backend(name, params, has_if=if_ is not None)
        paths = SlidePaths(
            slide_id=slide.id,
            he=cfg.resolve(slide.he),
            he_mpp=slide.mpp,
            if_=cfg.resolve(slide.if_) if slide.if_ else None,
            markers=cfg.resolve(slide.markers) if slide.markers else None,
            registration=reg_path if needs_reg else None,
            nuclear_channel=cfg.registration.nuclear_channel,
        )
        workers = params.workers or os.cpu_count() or 1
        if name == "sam" and be.device.startswith("cuda"):  # type: ignore[attr-defined]
            workers = 1  # one process owns the GPU
        try:
            with atomic_path(out_mask) as tmp_mask:
                table = segment_slide(
                    ctx, be, tmp_mask, tile=params.tile_px, halo=params.halo_px,
                    workers=workers, paths=paths, progress=progress,
                )  # fmt: skip
                write_cell_table(out_cells, slide.id, he.mpp, name, table, {
                    "stage": "segment", "fingerprint": fingerprint, "backend": be.describe(),
                    "tile_px": params.tile_px, "halo_px": params.halo_px, "n_cells": len(table["cell_id"]),
                    "slide_stats": ctx.stats,
                })  # fmt: skip
        finally:
            he.close()
            if if_ is not None:
                if_.close()
        results.append(
            SegmentResult(
                slide.id,
                "segmented",
                name,
                len(table["cell_id"]),
                out_cells,
                out_mask,
                time.perf_counter() - t0,
            )
        )
    return results


def write_cell_table(
    path: Path,
    slide_id: str,
    mpp: float,
    source: str,
    table: dict[str, np.ndarray],
    meta: dict[str, Any],
) -> Path:
    """Write ``RUN/cells/<slide>.parquet`` atomically, with provenance in the schema metadata."""
    n = len(table["cell_id"])
    data = {
        "slide_id": np.full(n, slide_id, dtype=object),
        "cell_id": table["cell_id"].astype(np.int64),
        "x": table["x"].astype(np.float64),
        "y": table["y"].astype(np.float64),
        "x_um": table["x"] * mpp,
        "y_um": table["y"] * mpp,
        "area_px": table["area_px"].astype(np.int64),
        "area_um2": table["area_px"] * mpp * mpp,
        **{k: table[k].astype(np.int64) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")},
        "major_axis_px": table["major_axis_px"].astype(np.float32),
        "minor_axis_px": table["minor_axis_px"].astype(np.float32),
        "eccentricity": table["eccentricity"].astype(np.float32),
        "solidity": table["solidity"].astype(np.float32),
        "tile_id": table["tile_id"].astype(np.int32),
        "edge_dist_px": table["edge_dist_px"].astype(np.float32),
        "seg_source": np.full(n, source, dtype=object),
        "seg_score": table["seg_score"].astype(np.float32),
    }
    arrow = pa.table(data).replace_schema_metadata(
        {META_KEY: json.dumps(meta, default=str).encode()}
    )
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp, compression="zstd")
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
