"""``immunocto build-db``: crops, masks (and IF) of the labelled cells, with their index.

Labels come from one column of the cell tables: ``gate`` -> ``gate_label`` (version
``gate``), ``review`` -> ``review_label`` (``V0``), ``v1`` -> ``v1_label`` (``V1``). Only cells
with one of the five classes are stored. Each slide (patient) goes wholly to one split.

Where: gate and review labels go to the run's own store (``RUN/crops.zarr`` +
``RUN/crops.parquet``, what the bootstrap classifier trains on); V1 goes to its own database
folder ``RUN/v1/`` (the H&E model's training set: every cell the bootstrap model labelled, not
only the gated ones), so storing V1 never disturbs the store the bootstrap model was trained on.
``out`` chooses another folder.

Incremental: a slide whose cells, labels and parameters are unchanged is kept as it is; a
changed slide is re-cut and appended, its old rows dropped from the index (``--rebuild``
starts the store afresh and reclaims the space). Rows reach the index only after their chunk
is written, so an interrupted build leaves a readable store; the next run cuts the interrupted
slide again in its own place, so the store ends as an uninterrupted build would have left it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from immunocto.config import RunConfig, SlideConfig
from immunocto.conventions import CLASSES, CLASSIFIER_IF_MARKERS
from immunocto.db.extract import (
    GROUP_PX,
    ExtractSpec,
    crops_of_pieces,
    group_cells,
    map_groups,
    row_blocks,
)
from immunocto.db.split import assign_splits
from immunocto.db.store import (
    CHUNK,
    CROP,
    INDEX_COLUMNS,
    STORE_MPP,
    CropStore,
    empty_index,
    index_path,
    read_index,
    store_path,
    write_index,
)
from immunocto.errors import ImmunoctoError
from immunocto.progress import NullProgress, Progress

log = logging.getLogger(__name__)

#: ``--labels`` choice -> (cell-table column, version name, command that writes it).
LABEL_COLUMNS = {
    "gate": ("gate_label", "gate", "immunocto gate"),
    "review": ("review_label", "V0", "immunocto review export"),
    "v1": ("v1_label", "V1", "immunocto expand"),
}
#: The V1 database folder, inside the run folder.
V1_FOLDER = "v1"
#: Rows written between index updates (a multiple of the chunk).
FLUSH_ROWS = 16 * CHUNK


@dataclass
class BuildResult:
    slide_id: str
    status: str  # "built" | "current"
    cells: int
    seconds: float = 0.0
    split: str = ""


def db_folder(run: str | os.PathLike[str], labels: str) -> Path:
    """Where ``build-db --labels LABELS`` stores by default: ``RUN/v1`` for V1, else ``RUN``."""
    return Path(run) / V1_FOLDER if labels == "v1" else Path(run)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class _SlideWriter:
    """Indexes one slide's crops as the workers report their blocks written, committing the
    index every ``FLUSH_ROWS`` rows (blocks arrive in row order: the index only ever lists
    rows whose chunks are on disk)."""

    run: Path
    manifest: dict[str, Any]
    slide: SlideConfig
    cells: pd.DataFrame  # cell_id, x, y, label, confidence; in cutting order
    column: str
    version: str
    split: str
    start: int
    kept: pa.Table  # the index rows of the other slides
    written: int = 0
    pending: int = 0
    tables: list[pa.Table] = field(default_factory=list)

    def index(self) -> pa.Table:
        return pa.concat_tables([self.kept, *self.tables]).select(list(INDEX_COLUMNS))

    def add(self, lo: int, hi: int, border: np.ndarray, scale: np.ndarray) -> None:
        """Rows ``lo..hi`` of the slide are on disk."""
        if lo != self.written:
            raise RuntimeError(f"block {lo}..{hi} reported out of order (expected {self.written})")
        self.tables.append(self._rows(lo, hi, border, scale))
        self.written = hi
        self.pending += hi - lo
        if self.pending >= FLUSH_ROWS:
            self._commit(final=False)

    def finish(self) -> None:
        self._commit(final=True)

    def _commit(self, final: bool) -> None:
        self.pending = 0
        self.manifest["slides"][self.slide.id]["complete"] = final
        write_index(self.run, self.index(), self.manifest)

    def _rows(self, lo: int, hi: int, border: np.ndarray, scale: np.ndarray) -> pa.Table:
        sub = self.cells.iloc[lo:hi]
        n = hi - lo
        return pa.table({
            "row": pa.array(np.arange(self.start + lo, self.start + hi, dtype=np.int64)),
            "slide_id": pa.array([self.slide.id] * n),
            "patient": pa.array([self.slide.patient or self.slide.id] * n),
            "cell_id": pa.array(sub["cell_id"].to_numpy(np.int64)),
            "x": pa.array(sub["x"].to_numpy(np.float64)),
            "y": pa.array(sub["y"].to_numpy(np.float64)),
            "label": pa.array(sub["label"].astype(str).to_numpy()),
            "label_source": pa.array([self.column] * n),
            "version": pa.array([self.version] * n),
            "split": pa.array([self.split] * n),
            "confidence": pa.array(sub["confidence"].to_numpy(np.float32)),
            "border": pa.array(np.asarray(border, bool)),
            "scale": pa.array(np.asarray(scale, np.float32)),
        })  # fmt: skip


def block_rows(rows: int, workers: int) -> int:
    """Rows one task cuts and writes: whole chunks (no two tasks write one chunk), about four
    tasks per worker (a block that ends inside a 1024 px square makes that square read twice,
    so fewer, larger blocks read less), at most ``FLUSH_ROWS`` (the index's step). One
    process: blocks of ``FLUSH_ROWS``."""
    most = max(FLUSH_ROWS // CHUNK, 1)
    if workers <= 1:
        return most * CHUNK
    chunks = -(-rows // CHUNK)
    per_task = max(1, -(-chunks // (4 * workers)))
    return min(per_task, most) * CHUNK


def _open_cutter(spec: ExtractSpec, root: Path) -> tuple[Any, CropStore]:
    return spec.open(), CropStore(root)


def _cut_block(context: tuple[Any, CropStore], job) -> tuple[int, int, np.ndarray, np.ndarray]:
    """On a worker: cut rows ``lo..hi`` of a slide's cells and write them at store row
    ``start + lo``; returns ``(lo, hi, border, scale)`` for the index."""
    opened, store = context
    start, lo, hi, pieces, ids, xs, ys, markers = job
    rel = [(a - lo, b - lo) for a, b in pieces]
    crops = crops_of_pieces(opened, ids, xs, ys, rel, markers)
    store.write(start + lo, crops["he"], crops["mask"], crops.get("if"))
    return lo, hi, crops["border"], crops["scale"]


def cut_slide(
    spec: ExtractSpec, store: CropStore, start: int, cells: pd.DataFrame, *, workers: int
):
    """Crops of ``cells`` (cutting order, see :func:`_labelled_cells`) written by the workers
    into store rows ``start..start+len(cells)`` (already reserved), :func:`block_rows` per task;
    yields ``(lo, hi, border, scale)`` per block, in row order. Nothing crop-sized comes back."""
    ids, xs, ys = (cells[c].to_numpy() for c in ("cell_id", "x", "y"))
    sizes = [len(g) for g in group_cells(xs, ys, GROUP_PX)]
    jobs = [
        (start, lo, hi, pieces, ids[lo:hi], xs[lo:hi], ys[lo:hi], spec.if_markers)
        for lo, hi, pieces in row_blocks(sizes, block_rows(len(cells), workers))
    ]
    yield from map_groups(_cut_block, _open_cutter, (spec, store.root), jobs, workers=workers)


def _labelled_cells(
    cfg: RunConfig, slide: SlideConfig, column: str, labels: str, progress: Progress
) -> pd.DataFrame:
    """The slide's cells with one of the five classes in ``column`` (gating them if needed)."""
    from immunocto.segment.stage import cells_path

    path = cells_path(cfg, slide.id)
    has = path.exists() and column in pq.read_schema(path).names
    if not has and labels == "gate" and slide.if_ is not None:
        from immunocto.phenotype.stage import run_gate

        log.info("%s: not gated yet; gating first", slide.id)
        run_gate(cfg, slides=[slide.id], with_sensitivity=True, progress=progress)
        has = column in pq.read_schema(path).names
    if not path.exists():
        raise ImmunoctoError(
            f"{path}: no cell table for {slide.id}; run `immunocto segment` (and quantify, gate) first"
        )
    if not has:
        hint = LABEL_COLUMNS[labels][2]
        raise ImmunoctoError(
            f"{path}: no {column} column; run `{hint}` first (or choose another --labels)"
        )
    # only the columns a crop needs, only the labelled rows (not the ~150 IF columns)
    cols = ["cell_id", "x", "y", column] + (
        ["gate_stability"] if "gate_stability" in pq.read_schema(path).names else []
    )
    table = pq.read_table(path, columns=cols)
    table = table.filter(pc.is_in(table.column(column), value_set=pa.array(list(CLASSES))))
    df = table.to_pandas().rename(columns={column: "label", "gate_stability": "confidence"})
    if "confidence" not in df:
        df["confidence"] = 1.0
    # in the order crops are cut: by GROUP_PX square, and top to bottom within one, so a
    # block of rows that covers part of a square reads a band of it, not all of it
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    by_row = np.lexsort((x, y))
    groups = group_cells(x[by_row], y[by_row], GROUP_PX)
    order = by_row[np.concatenate(groups)] if groups else np.zeros(0, np.int64)
    return df.iloc[order].reset_index(drop=True)


def build_db(
    cfg: RunConfig,
    *,
    labels: str = "gate",
    with_if: bool = True,
    rebuild: bool = False,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    workers: int | None = None,
    progress: Progress | None = None,
    out: str | os.PathLike[str] | None = None,
) -> list[BuildResult]:
    """Build or update the crop store ``DB/crops.zarr`` and its index ``DB/crops.parquet``
    (see the module docstring); ``DB`` is ``out`` or :func:`db_folder` of the run and labels.

    ``with_if`` stores IF crops of the classifier markers when every slide has IF.
    ``split_fractions``/``seed`` decide the patient-level train/val/test split (recorded in the
    index metadata). Returns one :class:`BuildResult` per slide.
    """
    from immunocto.register.stage import registration_path
    from immunocto.segment.stage import mask_path

    progress = progress or NullProgress()
    if labels not in LABEL_COLUMNS:
        raise ImmunoctoError(
            f"`labels` must be one of {', '.join(LABEL_COLUMNS)} (got {labels!r})",
            arguments=("labels",),
        )
    column, version, _ = LABEL_COLUMNS[labels]
    run = Path(out) if out is not None else db_folder(cfg.run_dir, labels)
    markers = (
        tuple(CLASSIFIER_IF_MARKERS)
        if with_if and all(s.if_ is not None for s in cfg.slides)
        else ()
    )
    splits = assign_splits(cfg, fractions=split_fractions, seed=seed)
    root = store_path(run)
    index, manifest = read_index(run)
    settings = {
        "labels": labels,
        "if_markers": list(markers),
        "split_seed": seed,
        "split_fractions": list(split_fractions),
    }
    if rebuild or not root.exists() or any(manifest.get(k) != v for k, v in settings.items()):
        if root.exists():
            log.info(
                "starting the crop store afresh (%s)",
                "--rebuild" if rebuild else "labels, IF or split changed",
            )
        index, manifest = empty_index(), {"slides": {}}
        if index_path(run).exists():  # first the index, so it never names rows that are gone
            write_index(run, index, manifest)
        shutil.rmtree(root, ignore_errors=True)
        store = CropStore(root, if_markers=list(markers), create=True)
    else:
        store = CropStore(root)
        # rows past the index's last are an interrupted write's (rows reach the index only
        # after their chunk is on disk): drop them, so the next slide starts where it would have
        rows = index.column("row").to_numpy()
        store.truncate(-(-(int(rows.max()) + 1) // CHUNK) * CHUNK if len(rows) else 0)
    manifest.update(settings | {"version": version, "crop_px": CROP, "mpp": STORE_MPP})
    workers = workers or os.cpu_count() or 1
    results = []
    for slide in cfg.slides:
        cells = _labelled_cells(cfg, slide, column, labels, progress)
        fp = _fingerprint({
            "cells": _fingerprint(cells[["cell_id", "x", "y", "label", "confidence"]].to_numpy().tolist()),
            "he": [str(slide.he), (st := cfg.resolve(slide.he).stat()).st_size, st.st_mtime_ns],
            "markers": markers, "mpp": slide.mpp, "split": splits[slide.id],
        })  # fmt: skip
        entry = manifest["slides"].get(slide.id)
        if entry and entry.get("fingerprint") == fp and entry.get("complete"):
            results.append(
                BuildResult(slide.id, "current", int(entry.get("cells", 0)), split=splits[slide.id])
            )
            continue
        t0 = time.perf_counter()
        # forget this slide's old rows (their chunks stay until a --rebuild) ...
        index = index.filter(pc.not_equal(index.column("slide_id"), slide.id))
        start = store.next_start()
        interrupted = entry is not None and entry.get("complete") is False
        if interrupted and all(
            v.get("start", 0) < entry["start"]
            for k, v in manifest["slides"].items()
            if k != slide.id
        ):  # ... unless a build was killed in this slide, the store's last: cut it again in
            start = int(entry["start"])  # place, so a resumed build equals an uninterrupted one
            store.truncate(start)
        manifest["slides"][slide.id] = {
            "fingerprint": fp,
            "complete": False,
            "start": start,
            "cells": len(cells),
        }
        writer = _SlideWriter(
            run, manifest, slide, cells, column, version, splits[slide.id], start, index
        )
        spec = ExtractSpec(
            he=cfg.resolve(slide.he),
            he_mpp=slide.mpp,
            mask=mask_path(cfg, slide.id),
            if_=cfg.resolve(slide.if_) if slide.if_ else None,
            markers_csv=cfg.resolve(slide.markers) if slide.markers else None,
            registration=registration_path(cfg, slide.id) if markers else None,
            if_markers=markers,
        )
        task = f"{slide.id} crops"
        progress.start(task, len(cells), unit="cells")
        store.reserve(start + len(cells))  # the workers write into rows that exist
        for lo, hi, border, scale in cut_slide(spec, store, start, cells, workers=workers):
            writer.add(lo, hi, border, scale)
            progress.advance(task, hi - lo)
        writer.finish()
        index = writer.index()
        results.append(
            BuildResult(slide.id, "built", len(cells), time.perf_counter() - t0, splits[slide.id])
        )
        log.info("%s: %d crops (%s)", slide.id, len(cells), splits[slide.id])
    # slides no longer in the config leave the index
    known = {s.id for s in cfg.slides}
    index = index.filter(pc.is_in(index.column("slide_id"), value_set=pa.array(sorted(known))))
    manifest["slides"] = {k: v for k, v in manifest["slides"].items() if k in known}
    write_index(run, index, manifest)
    return results


def _stage_summary(folder: Path, results: list[BuildResult]) -> dict[str, Any]:
    index, _ = read_index(folder)
    counts = pc.value_counts(index.column("label")).to_pylist()
    return {
        "crops": index.num_rows,
        "built": sum(r.status == "built" for r in results),
        "per_class": {c["values"]: c["counts"] for c in counts},
        "splits": {r.slide_id: r.split for r in results},
        "store": str(store_path(folder)),
    }


def db_stage(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """The ``build-db`` stage of ``immunocto run`` (gate labels, ``RUN/crops.zarr``)."""
    return _stage_summary(cfg.run_dir, build_db(cfg, labels="gate", progress=progress))


def v1_db_stage(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """The ``build-db-v1`` stage: V1 (``v1_label``, H&E and masks only) into ``RUN/v1/``,
    split by patient as the gate store; skipped until ``expand`` wrote V1."""
    from immunocto.segment.stage import cells_path

    have = [
        s.id
        for s in cfg.slides
        if (p := cells_path(cfg, s.id)).exists() and "v1_label" in pq.read_schema(p).names
    ]
    if not have:
        return {"status": "skipped: no v1_label yet (run expand)"}
    if len(have) < len(cfg.slides):
        missing = sorted({s.id for s in cfg.slides} - set(have))
        return {"status": f"skipped: no v1_label for {', '.join(missing)}"}
    _, main = read_index(cfg.run_dir)
    split = {}
    if "split_seed" in main:  # the same patients in the same splits as the bootstrap store
        split = {"seed": main["split_seed"], "split_fractions": tuple(main["split_fractions"])}
    folder = db_folder(cfg.run_dir, "v1")
    # H&E + masks; a V1 store a user built with IF (`build-db --labels v1`) keeps its IF
    with_if = bool(read_index(folder)[1].get("if_markers"))
    results = build_db(cfg, labels="v1", with_if=with_if, progress=progress, **split)
    return _stage_summary(folder, results)
