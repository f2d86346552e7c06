"""``immunocto expand``: the bootstrap classifier on every candidate cell (V0 -> V1).

For each slide with IF, crops (H&E, mask, 8 IF markers through the registration) of *all*
candidates are cut tile by tile (worker processes) and classified in batches here. Written
into ``RUN/cells/<slide>.parquet``: ``model_label`` (argmax), ``model_prob_<class>`` for the
five classes, ``v1_label`` and ``v1_source`` by the V1 rule (:mod:`immunocto.models.v1`: by
default V0 kept, confident conflicts ``ambiguous``, confident calls (``min_prob``, Immunocto:
0.95) added where the cell's own IF supports them; ``v1_rule: model`` = the classifier's call
everywhere). ``immunocto build-db --labels v1`` then stores V1.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from immunocto._parallel import warm_workers
from immunocto._table import append_columns, column_names
from immunocto.config import RunConfig
from immunocto.db.extract import (
    GROUP_PX,
    ExtractSpec,
    crops_of_pieces,
    group_cells,
    map_groups,
)
from immunocto.errors import ImmunoctoError
from immunocto.models.checkpoint import INFERENCE_BATCH, Classifier, load_model, models_dir
from immunocto.progress import NullProgress, Progress

log = logging.getLogger(__name__)
META_KEY = b"immunocto.expand"


def model_columns(classes: tuple[str, ...]) -> tuple[str, ...]:
    return ("model_label", *(f"model_prob_{c}" for c in classes), "v1_label", "v1_source")


@dataclass
class ExpandResult:
    slide_id: str
    cells: int
    v1_counts: dict[str, int]
    versus_gate: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0


def _open_classifier(spec: ExtractSpec, folder: str, device: str) -> tuple[Any, Classifier]:
    """A worker's context; its tasks run beside the other workers', so torch uses one
    thread there (a one-process run keeps torch's own threads)."""
    torch.set_num_threads(1)
    return spec.open(), load_model(folder, device)


def _cut_group(context: tuple[Any, ...], job) -> dict[str, np.ndarray]:
    """Crops of one square's cells (job: ``(cell_ids, xs, ys, markers, batch_size)``)."""
    ids, xs, ys, markers, _ = job
    return crops_of_pieces(context[0], ids, xs, ys, [(0, len(ids))], markers)


def _infer(clf: Classifier, crops: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Probabilities ``(n, K)`` float32 of one square's crops, in batches."""
    he = torch.from_numpy(np.ascontiguousarray(np.moveaxis(crops["he"], -1, 1)))
    mask = torch.from_numpy(crops["mask"][:, None])
    ifs = torch.from_numpy(crops["if"].astype(np.int32))
    out = [
        clf.predict_proba(he[lo : lo + batch_size], mask[lo : lo + batch_size],
                          ifs[lo : lo + batch_size]).numpy()
        for lo in range(0, len(he), batch_size)
    ]  # fmt: skip
    return np.concatenate(out).astype(np.float32, copy=False)


def _classify_group(context: tuple[Any, Classifier], job) -> np.ndarray:
    """On a worker: crops of one square's cells, classified there; probabilities ``(n, K)``
    come back (20 bytes per cell instead of the ~80 kB crops with IF)."""
    return _infer(context[1], _cut_group(context, job), job[-1])


def _open_only(spec: ExtractSpec) -> tuple[Any]:
    return (spec.open(),)


def predict_slide(
    cfg: RunConfig,
    slide,
    folder: str | os.PathLike[str],
    clf: Classifier,
    *,
    device: str = "cpu",
    batch_size: int = INFERENCE_BATCH,
    workers: int | None = None,
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Probabilities ``(N, K)`` for every cell of the slide's table (in table order).

    The workers cut each square's crops and run the classifier (``folder``, loaded once
    per worker) themselves; only the probabilities travel back. On a GPU (``device`` not
    ``cpu``) one process (this one, with ``clf``) does it all.
    """
    from immunocto.register.stage import registration_path
    from immunocto.segment.stage import cells_path, mask_path

    progress = progress or NullProgress()
    cells = pq.read_table(cells_path(cfg, slide.id), columns=["cell_id", "x", "y"]).to_pandas()
    markers = tuple(clf.spec.if_markers)
    spec = ExtractSpec(
        he=cfg.resolve(slide.he), he_mpp=slide.mpp, mask=mask_path(cfg, slide.id), if_=cfg.resolve(slide.if_),
        markers_csv=cfg.resolve(slide.markers) if slide.markers else None,
        registration=registration_path(cfg, slide.id), if_markers=markers,
    )  # fmt: skip
    ids, xs, ys = (cells[c].to_numpy() for c in ("cell_id", "x", "y"))
    probs = np.zeros((len(cells), len(clf.classes)), np.float32)
    task = f"{slide.id} expand"
    progress.start(task, len(cells), unit="cells")
    workers = workers or os.cpu_count() or 1
    if clf.device.type != "cpu":
        workers = 1  # one process owns the GPU
    groups = group_cells(xs, ys, GROUP_PX)
    jobs = [(ids[g], xs[g], ys[g], markers, batch_size) for g in groups]
    if workers > 1 and len(jobs) > 1:
        results = map_groups(
            _classify_group, _open_classifier, (spec, str(folder), "cpu"), jobs, workers=workers
        )
    else:  # one process: cut with one BLAS thread (as the workers do), infer with torch's own
        crops = map_groups(_cut_group, _open_only, (spec,), jobs, workers=1)
        results = (_infer(clf, c, batch_size) for c in crops)
    for g, p in zip(groups, results, strict=True):
        probs[g] = p
        progress.advance(task, len(g))
    return cells, probs


def run_expand(
    cfg: RunConfig,
    *,
    model: str = "bootstrap",
    min_prob: float | None = None,
    rule: str | None = None,
    support: float | None = None,
    keep: float | None = None,
    device: str | None = None,
    batch_size: int = INFERENCE_BATCH,
    workers: int | None = None,
    progress: Progress | None = None,
    stamp: int | None = None,
) -> list[ExpandResult]:
    """Label every candidate with ``RUN/models/<model>`` and write the V1 columns
    (``rule``/``support``/``keep`` default to ``training.v1_rule``/``v1_support``/``v1_keep``)."""
    from immunocto.segment.stage import cells_path

    min_prob = cfg.training.min_prob if min_prob is None else min_prob
    rule = cfg.training.v1_rule if rule is None else rule
    support = cfg.training.v1_support if support is None else support
    keep = cfg.training.v1_keep if keep is None else keep
    if not 0.0 <= keep <= 1.0:
        raise ImmunoctoError(f"`keep` must be in [0, 1] (got {keep})", arguments=("keep",))
    if rule not in ("expand", "model"):
        raise ImmunoctoError(f"`rule` must be expand or model (got {rule!r})", arguments=("rule",))
    if not support >= 0:
        raise ImmunoctoError(f"`support` must be >= 0 (got {support})", arguments=("support",))
    if not 0.0 < min_prob <= 1.0:
        raise ImmunoctoError(
            f"`min_prob` must be in (0, 1] (got {min_prob})", arguments=("min_prob",)
        )
    folder = models_dir(cfg.run_dir) / model
    warm_workers()  # Dask workers import PyTorch while the model loads here
    clf = load_model(folder, device or cfg.training.device)
    if not isinstance(clf, Classifier):
        raise ImmunoctoError(
            f"{folder}: an H&E-only model ({clf.kind}); expansion uses the bootstrap classifier"
        )
    classes = clf.classes
    results = []
    for slide in cfg.slides:
        if slide.if_ is None:
            log.info("%s: no IF; the bootstrap classifier needs it, skipped", slide.id)
            continue
        path = cells_path(cfg, slide.id)
        if not path.exists():
            raise ImmunoctoError(f"{path}: no cell table; run `immunocto segment` first")
        t0 = time.perf_counter()
        cells, probs = predict_slide(
            cfg, slide, folder, clf, batch_size=batch_size, workers=workers, progress=progress
        )
        best = probs.argmax(1)
        label = np.asarray(classes, dtype=object)[best]
        v1, source, gate = _v1(cfg, slide.id, path, cells, label, probs, classes,
                               min_prob=min_prob, rule=rule, support=support, keep=keep)  # fmt: skip
        has_gate = gate is not None
        new = {"model_label": pa.array(label.astype(str))}
        for k, c in enumerate(classes):
            new[f"model_prob_{c}"] = pa.array(probs[:, k])
        new["v1_label"] = pa.array(v1.astype(str))
        new["v1_source"] = pa.array(source.astype(str))
        stage_meta = {"stage": "expand", "model": str(folder), "min_prob": min_prob,
                      "v1_rule": rule, "v1_support": support, "v1_keep": keep,
             "model_mtime": stamp if stamp is not None else (folder / "model.pt").stat().st_mtime_ns}  # fmt: skip
        append_columns(path, new, drop=model_columns(classes),
                       meta={META_KEY: json.dumps(stage_meta).encode()})  # fmt: skip
        values, n = np.unique(v1, return_counts=True)
        versus = {}
        if has_gate:
            cross = pd.crosstab(gate, v1)
            versus = {
                str(g): {str(k): int(v) for k, v in row.items() if v} for g, row in cross.iterrows()
            }
        results.append(
            ExpandResult(
                slide.id,
                len(cells),
                {str(v): int(c) for v, c in zip(values, n, strict=True)},
                versus,
                time.perf_counter() - t0,
            )
        )
    return results


def _v1(
    cfg: RunConfig,
    slide_id: str,
    path,
    cells: pd.DataFrame,
    label: np.ndarray,
    probs: np.ndarray,
    classes: tuple[str, ...],
    *,
    min_prob: float,
    rule: str,
    support: float,
    keep: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(v1_label, v1_source, gate_label or None)`` of one slide's cells (table order);
    ``probs`` ``(N, K)`` over ``classes``."""
    from immunocto.models.v1 import NO_LABEL, decide_v1, positive_evidence, support_mask
    from immunocto.phenotype.stage import gating_path
    from immunocto.phenotype.tree import tree_from_dict

    names = column_names(path)
    n = len(cells)
    gate = None
    v0 = np.full(n, "unlabeled", object)
    gating = None
    gpath = gating_path(cfg, slide_id)
    if rule == "expand" and "gate_label" in names and gpath.exists():
        gating = json.loads(gpath.read_text())
    wanted = ["cell_id"]
    if "gate_label" in names:
        wanted.append("gate_label")
    if rule == "expand" and "review_label" in names:
        wanted.append("review_label")
    if gating is not None:
        wanted += [c for c in dict.fromkeys(gating["features"].values()) if c in names]
    table = pq.read_table(path, columns=wanted)
    if not np.array_equal(table.column("cell_id").to_numpy(), cells["cell_id"].to_numpy()):
        raise ImmunoctoError(f"{path}: changed while expanding; run again")
    if "gate_label" in names:
        gate = table.column("gate_label").to_numpy(zero_copy_only=False).astype(object)
        v0 = gate.copy()
    if "review_label" in wanted:
        review = table.column("review_label").to_numpy(zero_copy_only=False).astype(str)
        reviewed = ~np.isin(review, NO_LABEL)
        v0[reviewed] = review[reviewed]
        # a reviewer's "not a cell" / "can't tell" stands: the model adds nothing there
        declined = np.isin(review, ("not_cell", "ambiguous"))
    if rule == "expand" and gating is None:
        log.warning(
            "%s: no gate labels/thresholds (run `immunocto gate`); V1 = confident calls "
            "without the IF support check",
            slide_id,
        )
    confident = probs.max(1) >= min_prob
    column = {c: k for k, c in enumerate(classes)}
    k_v0 = pd.Series(v0, dtype=object).map(column).fillna(-1).to_numpy().astype(np.int64)
    v0_prob = np.where(k_v0 >= 0, probs[np.arange(n), np.maximum(k_v0, 0)], 1.0)
    supported = np.ones(n, bool)
    if gating is not None:
        tree = tree_from_dict(gating["tree"], source=str(gpath))
        features = {c: table.column(c).to_numpy(zero_copy_only=False) for c in wanted[1:]
                    if c not in ("gate_label", "review_label")}  # fmt: skip
        missing = [c for c in dict.fromkeys(gating["features"].values()) if c not in features]
        if missing:
            raise ImmunoctoError(
                f"{path}: gate feature column(s) {', '.join(missing)} missing; "
                "run `immunocto quantify` and `immunocto gate` again"
            )
        supported = support_mask(
            label.astype(str), features, gating, positive_evidence(tree), support
        )
    v1, source = decide_v1(v0, label, confident, supported, rule=rule, v0_prob=v0_prob, keep=keep)  # fmt: skip
    if "review_label" in wanted:  # a person looked: their call stands, whatever the model says
        v1 = v1.astype(object)
        v1[reviewed] = v0[reviewed]
        v1[declined] = "ambiguous"
        source[reviewed | declined] = "review"
    return v1, source, gate
