"""``immunocto predict SLIDE [--model DIR] --out OUT``: typed cells on an H&E slide alone.

Segment (``he``, ``he-classical`` or ``sam`` backend, tiled, in worker processes) -> cut each
cell's 64 x 64 crop, mask and 256 px context (grouped by 1024 px squares: one read per group)
-> the H&E-only model -> ``OUT/<slide>.parquet`` (the cell table plus ``nucleus_grey`` (mean
grey inside the mask), ``pred_label``, ``pred_prob_<class>``, ``pred_confidence``; or
``pred_<marker>`` = predicted ``log1p`` mean intensity for a ``he-regression`` model),
``OUT/<slide>.geojson`` (QuPath cells, classified), ``OUT/<slide>.masks.zarr`` (label image,
label = cell_id) and ``OUT/<slide>.png`` (the slide beside one density map per class, cells
per 50 µm square). No IF is read.

Without a model (nothing trained yet) the ``he`` backend's nucleus network alone types the
nuclei: the table's ``nucleus_type`` (inflammatory / epithelial / stromal / other) and
``nucleus_p_<type>`` columns classify the GeoJSON and make the density maps.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import zarr

from immunocto._fs import atomic_path
from immunocto.db.extract import group_cells
from immunocto.errors import ImmunoctoError
from immunocto.io import open_slide
from immunocto.models.checkpoint import INFERENCE_BATCH, HEModel, load_model
from immunocto.models.context import context_windows
from immunocto.progress import NullProgress, Progress

log = logging.getLogger(__name__)

GENERIC_STEMS = {"he", "h&e", "image", "slide", "img"}
DENSITY_UM = 50.0


@dataclass
class PredictResult:
    slide_id: str
    cells: int
    counts: dict[str, int]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def slide_name(path: Path) -> str:
    """``sample.ome.tif`` -> ``sample``; a generic name (``he.ome.tif``) takes its folder's."""
    stem = re.sub(r"(\.ome)?\.(tiff?|svs|zarr|ndpi|scn|mrxs)$", "", path.name, flags=re.I)
    if stem.lower() in GENERIC_STEMS and path.parent.name:
        return path.parent.name
    return stem


def classify_cells(
    model: HEModel,
    slide,
    mask_arr,
    cells: dict[str, np.ndarray],
    *,
    batch_size: int = INFERENCE_BATCH,
    progress: Progress | None = None,
    task: str = "classify",
    start: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Model outputs ``(N, K)`` for the cells (``cell_id``, ``x``, ``y`` arrays) of one slide,
    and each cell's mean grey level inside its mask in the crop ``(N,)`` (nuclear darkness).
    ``start=False``: ``task`` was started by the caller (cells classified in several calls)."""
    from immunocto.db.extract import extract_crops

    progress = progress or NullProgress()
    ids, xs, ys = (np.asarray(cells[k]) for k in ("cell_id", "x", "y"))
    out = np.zeros((len(ids), len(model.classes)), np.float32)
    grey = np.zeros(len(ids), np.float32)
    if start:
        progress.start(task, len(ids), unit="cells")
    for g in group_cells(xs, ys):
        crops = extract_crops((slide, mask_arr, None, None), (ids[g], xs[g], ys[g], ()))
        he = torch.from_numpy(np.ascontiguousarray(np.moveaxis(crops["he"], -1, 1)))
        mask = torch.from_numpy(crops["mask"][:, None])
        m = crops["mask"].astype(np.float32)
        grey[g] = (crops["he"].astype(np.float32).mean(axis=3) * m).sum(axis=(1, 2)) / np.maximum(
            m.sum(axis=(1, 2)), 1.0
        )
        ctx = None
        if model.uses_context:
            win = context_windows(slide, xs[g], ys[g])
            ctx = torch.from_numpy(np.ascontiguousarray(np.moveaxis(win, -1, 1)))
        for lo in range(0, len(g), batch_size):
            sl = slice(lo, lo + batch_size)
            out[g[sl]] = model.predict(he[sl], mask[sl], None if ctx is None else ctx[sl]).numpy()
        progress.advance(task, len(g))
    return out, grey


def _open_classify(path: Path, mpp: float, masks: Path, model_dir: str) -> tuple[Any, HEModel]:
    """A worker's context: the slide and label image opened, the H&E model on the CPU."""
    torch.set_num_threads(1)  # workers run side by side (one process keeps torch's threads)
    opened = (open_slide(path, mpp=mpp), zarr.open_array(str(masks), mode="r"), None, None)
    return opened, load_model(model_dir, "cpu")


def _classify_tile(context: tuple[Any, HEModel], job) -> tuple[np.ndarray, np.ndarray]:
    """On a worker: one tile's cells classified (:func:`classify_cells`); the outputs
    ``(n, K)`` and grey levels ``(n,)`` come back."""
    (slide, mask_arr, _, _), model = context
    ids, xs, ys, batch_size = job
    return classify_cells(
        model, slide, mask_arr, {"cell_id": ids, "x": xs, "y": ys}, batch_size=batch_size
    )


def classify_tiles(
    model: HEModel,
    model_dir: str | os.PathLike[str],
    path: Path,
    mpp: float,
    masks: Path,
    tiles: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    workers: int,
    batch_size: int = INFERENCE_BATCH,
):
    """:func:`classify_cells` of each tile's ``(cell_id, x, y)`` on ``workers`` processes (or
    the Dask client in use), each with its own copy of the model: yields ``(outputs, grey)``
    per tile, in order. A model on a GPU classifies here, in one process."""
    from immunocto.db.extract import map_groups

    if model.device.type != "cpu" or workers <= 1 or len(tiles) <= 1:  # here, torch's threads
        slide = open_slide(path, mpp=mpp)
        try:
            mask_arr = zarr.open_array(str(masks), mode="r")
            for ids, xs, ys in tiles:
                yield classify_cells(
                    model, slide, mask_arr, {"cell_id": ids, "x": xs, "y": ys},
                    batch_size=batch_size,
                )  # fmt: skip
        finally:
            slide.close()
        return
    jobs = [(ids, xs, ys, batch_size) for ids, xs, ys in tiles]
    yield from map_groups(
        _classify_tile, _open_classify, (path, mpp, masks, str(model_dir)), jobs, workers=workers
    )


def predict_file(
    path: str | os.PathLike[str],
    model_dir: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    backend: str = "he",
    mpp: float | None = None,
    slide_id: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    sam_checkpoint: Path | None = None,
    nucleus_model: Path | None = None,
    batch_size: int = INFERENCE_BATCH,
    progress: Progress | None = None,
    extra_meta: dict | None = None,
) -> PredictResult:
    """Segment and classify one H&E slide into ``out`` (see the module docstring); with
    ``model_dir`` None, the nucleus network's types are the classes."""
    from immunocto._parts import parts_key
    from immunocto.config import SegmentParams
    from immunocto.db.geojson import write_geojson
    from immunocto.segment.base import SlideContext, SlidePaths
    from immunocto.segment.parts import TileParts
    from immunocto.segment.registry import make_backend
    from immunocto.segment.stage import file_id, write_cell_table_parts
    from immunocto.segment.tiled import segment_slide_parts

    progress = progress or NullProgress()
    path = Path(path)
    if not path.exists():
        raise ImmunoctoError(f"{path}: no such slide")
    if backend not in ("he", "he-classical", "sam"):
        raise ImmunoctoError(f"backend must be he, he-classical or sam (got {backend!r})")
    if model_dir is None and backend != "he":
        raise ImmunoctoError(
            f"backend {backend} does not type nuclei: give `model` (an H&E-only model folder "
            "from `immunocto train --kind he`) or use backend he (the nucleus network's types)",
            arguments=("model", "backend"),
        )
    model = load_model(model_dir, device) if model_dir is not None else None
    if model is not None and not isinstance(model, HEModel):
        raise ImmunoctoError(
            f"{model_dir}: a {model.config.get('kind', 'bootstrap')} model needs IF; "
            "predict takes an H&E-only model (`immunocto train --kind he`)"
        )
    slide = open_slide(path, mpp=mpp)
    if slide.mpp is None:
        slide.close()
        raise ImmunoctoError(
            f"{path}: no pixel size in the file; give `mpp` (µm per pixel)", arguments=("mpp",)
        )
    if slide.kind != "brightfield":
        slide.close()
        raise ImmunoctoError(
            f"{path}: a {slide.kind} image ({len(slide.channel_names)} channels); predict reads RGB H&E"
        )
    sid = slide_id or slide_name(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "cells": out / f"{sid}.parquet",
        "masks": out / f"{sid}.masks.zarr",
        "geojson": out / f"{sid}.geojson",
        "overview": out / f"{sid}.png",
    }
    seconds: dict[str, float] = {}
    params = SegmentParams(backend=backend, nucleus_model=nucleus_model)
    if backend == "sam":
        if sam_checkpoint is None:
            slide.close()
            raise ImmunoctoError(
                "`backend` sam needs `sam_checkpoint` PATH (never downloaded)",
                arguments=("backend", "sam_checkpoint"),
            )
        params = params.model_copy(
            update={"sam": params.sam.model_copy(update={"checkpoint": sam_checkpoint})}
        )
    try:
        t0 = time.perf_counter()
        be = make_backend(backend, params, has_if=False)
        if model is None and "nucleus_type" not in be.object_columns():
            raise ImmunoctoError(
                f"{getattr(be, 'model_dir', 'the nucleus model')}: no type head, so nothing "
                "types the nuclei; give `model` (an H&E-only model folder from `immunocto "
                "train --kind he`) or a nucleus model with types",
                arguments=("model", "nucleus_model"),
            )
        ctx = SlideContext(sid, slide)
        paths = SlidePaths(sid, path, float(slide.mpp), None, None, None, "Hoechst")
        n_workers = workers or os.cpu_count() or 1
        if backend == "sam":
            n_workers = 1
        # workers write tile parts here; a killed predict segments only the missing tiles
        key = {"slide": file_id(path.resolve()), "mpp": float(slide.mpp),
               "backend": be.describe(), "params": params.model_dump(mode="json")}  # fmt: skip
        parts = TileParts(out / f".{sid}.parts").open_for(parts_key(key))
        with atomic_path(files["masks"]) as tmp_mask:
            result = segment_slide_parts(
                ctx, be, tmp_mask, parts, tile=params.tile_px, halo=params.halo_px,
                workers=n_workers, paths=paths, progress=progress,
            )  # fmt: skip
        seconds["segment"] = time.perf_counter() - t0
        n_cells = result.n_cells
        columns = dict(be.object_columns())
        if model is None:  # the nucleus network's types are the classes
            classes = [c.removeprefix("nucleus_p_") for c in columns if c != "nucleus_type"]
            label_column: str | None = "nucleus_type"
        else:
            classes = list(model.classes)
            label_column = "pred_label" if model.kind == "he" else None
            columns.update(prediction_columns(model))
        task = f"{sid} classify"
        if model is not None:
            progress.start(task, n_cells, unit="cells")

        def rows():
            """The cell table one tile at a time, each tile's cells classified by the workers
            (only the outputs come back here)."""
            tables = result.tables()
            if model is None:
                yield from tables
                return
            tiles = list(result.positions())
            outputs = classify_tiles(
                model, model_dir, path, float(slide.mpp), files["masks"], tiles,
                workers=n_workers, batch_size=batch_size,
            )  # fmt: skip
            for table, (out_k, grey) in zip(tables, outputs, strict=True):
                progress.advance(task, len(grey))
                yield {**table, **prediction_values(model, out_k, grey)}

        t0 = time.perf_counter()
        meta = {"stage": "predict", "backend": be.describe(), "slide": str(path.resolve()),
                "model": str(Path(model_dir).resolve()) if model is not None else None,
                "kind": model.kind if model is not None else "nucleus-types",
                "n_cells": n_cells, **(extra_meta or {})}  # fmt: skip
        write_cell_table_parts(
            files["cells"], sid, float(slide.mpp), backend, rows(), meta, columns
        )
        if model is not None:
            seconds["classify"] = time.perf_counter() - t0
        parts.remove()
        shown = [label_column] if label_column else [f"pred_{c}" for c in classes]
        cells = pq.read_table(files["cells"], columns=["x", "y", *shown]).to_pandas()
        counts: dict[str, int] = {}
        if label_column is not None:
            counts = {
                str(k): int(v) for k, v in cells[label_column].value_counts().sort_index().items()
            }
        t0 = time.perf_counter()
        write_geojson(files["cells"], files["masks"], files["geojson"], label_column=label_column)
        seconds["geojson"] = time.perf_counter() - t0
        overview_figure(slide, cells, classes, files["overview"], label_column=label_column)
    finally:
        slide.close()
    log.info("%s: %d cells, %s", sid, n_cells, counts)
    return PredictResult(sid, n_cells, counts, files, seconds)


def prediction_columns(model: HEModel) -> dict[str, str]:
    """The columns :func:`prediction_values` adds, name -> ``float32`` / ``string``."""
    empty = prediction_values(
        model, np.zeros((0, len(model.classes)), np.float32), np.zeros(0, np.float32)
    )
    return {k: "string" if v.dtype == object else "float32" for k, v in empty.items()}


def prediction_values(
    model: HEModel, outputs: np.ndarray, grey: np.ndarray
) -> dict[str, np.ndarray]:
    """Cell-table columns from the model's outputs ``(n, K)`` and the cells' mask grey ``(n,)``:
    for a classifier the label, the calibrated probabilities and the confidence; for a
    virtual-IF model ``pred_<marker>``."""
    if model.kind != "he":
        return {
            "nucleus_grey": grey,
            **{f"pred_{m}": outputs[:, k] for k, m in enumerate(model.classes)},
        }
    best = outputs.argmax(1) if len(outputs) else np.zeros(0, int)
    return {
        "nucleus_grey": grey,
        "pred_label": np.asarray(model.classes, dtype=object)[best],
        **{f"pred_prob_{c}": outputs[:, k] for k, c in enumerate(model.classes)},
        "pred_confidence": outputs.max(1) if len(outputs) else np.zeros(0, np.float32),
    }


def density_maps(
    x: np.ndarray,
    y: np.ndarray,
    labels: np.ndarray,
    classes,
    *,
    width: int,
    height: int,
    bin_px: float,
) -> np.ndarray:
    """Cells per bin ``(K, ny, nx)`` for each class (one ``bincount`` for all classes)."""
    nx, ny = max(1, int(np.ceil(width / bin_px))), max(1, int(np.ceil(height / bin_px)))
    lookup = {c: i for i, c in enumerate(classes)}
    k = np.array([lookup.get(v, -1) for v in labels], np.int64)
    ok = k >= 0
    bx = np.clip((x[ok] // bin_px).astype(np.int64), 0, nx - 1)
    by = np.clip((y[ok] // bin_px).astype(np.int64), 0, ny - 1)
    flat = np.bincount((k[ok] * ny + by) * nx + bx, minlength=len(classes) * ny * nx)
    return flat.reshape(len(classes), ny, nx)


def overview_figure(
    slide, cells, classes: list[str], out: Path, *, label_column: str | None = "pred_label"
) -> Path:
    """The slide (its smallest level, or a strided read) beside cell-density maps per class of
    ``label_column``; with ``label_column`` None (a regression model), the cells coloured by
    each ``pred_<class>`` instead."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    level = slide.best_level(max(slide.width, slide.height) / 1024)
    thumb = slide.read_level(level)
    stride = max(1, int(max(thumb.shape[:2]) // 1024))
    thumb = thumb[::stride, ::stride]
    if thumb.ndim == 3 and thumb.shape[0] in (3, 4) and thumb.shape[-1] not in (3, 4):
        thumb = np.moveaxis(thumb, 0, -1)
    bin_px = DENSITY_UM / float(slide.mpp)
    if label_column is not None:
        labels = cells[label_column].to_numpy().astype(str)
        title = "cells / (50 µm)²"
    else:
        labels = np.array([], str)
        title = "predicted log1p intensity"
    panels = 1 + len(classes)
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig = Figure(figsize=(4.2 * cols, 3.8 * rows), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(rows, cols, 1)
    ax.imshow(thumb[..., :3], extent=(0, slide.width, slide.height, 0))
    ax.set_title(f"{len(cells)} cells", fontsize=9)
    ax.set_axis_off()
    x, y = cells["x"].to_numpy(), cells["y"].to_numpy()
    if label_column is not None:
        maps = density_maps(
            x, y, labels, classes, width=slide.width, height=slide.height, bin_px=bin_px
        )
    for i, c in enumerate(classes):
        ax = fig.add_subplot(rows, cols, i + 2)
        if label_column is not None:
            im = ax.imshow(
                maps[i], cmap="magma", vmin=0, vmax=max(int(maps[i].max()), 1),
                extent=(0, slide.width, slide.height, 0),
            )  # fmt: skip
            ax.set_title(f"{c}: {int(maps[i].sum())}", fontsize=9)
        else:
            im = ax.scatter(x, y, c=cells[f"pred_{c}"].to_numpy(), s=1, cmap="viridis")
            ax.set_xlim(0, slide.width)
            ax.set_ylim(slide.height, 0)
            ax.set_title(c, fontsize=9)
        ax.set_aspect("equal")
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.046, label=title)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
