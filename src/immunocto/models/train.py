"""``immunocto train --kind bootstrap``: the 12-channel classifier (H&E + mask + 8 IF) on V0.

Data: the crop store, labels from ``gate_label`` or ``review_label`` (V0) of the cell tables,
splits from the index (by patient). With no validation slide (a one-slide run) a spatial
hold-out is used instead: the cells in the rightmost 20 % of the slide's width, flagged in
``metrics.json`` as not independent. Class-weighted cross-entropy with label smoothing,
AdamW + cosine schedule, flips + HED jitter, bf16 autocast and channels_last on a GPU,
early stopping on the validation loss (the best epoch is kept).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from immunocto.config import RunConfig, TrainParams
from immunocto.conventions import CLASSES, CLASSIFIER_IF_MARKERS
from immunocto.db.datasets import ShuffledCrops, hed_jitter, random_flips
from immunocto.db.store import CropStore, read_index, store_path
from immunocto.errors import ImmunoctoError
from immunocto.models.arch import build_model, load_init
from immunocto.models.channels import fit_spec, normalise, raw_input
from immunocto.models.checkpoint import models_dir, pick_device, save_model
from immunocto.models.loop import (
    crop_loader,
    evaluate,
    fit,
    metrics_record,
    provenance,
    with_overrides,
)
from immunocto.models.metrics import classification_metrics, save_training_figure
from immunocto.progress import NullProgress, Progress

log = logging.getLogger(__name__)

LABEL_COLUMNS = {"gate": "gate_label", "gate-margin": "gate_label", "review": "review_label"}


def resolve_labels(cfg: RunConfig, labels: str) -> str:
    """``auto`` -> ``review`` when any cell table has exported review labels, else
    ``gate-margin`` (Immunocto's V0 without reviewers: the confident gate calls)."""
    if labels != "auto":
        return labels
    import pyarrow.parquet as pq

    from immunocto.conventions import CLASSES as classes

    for s in cfg.slides:
        path = cfg.run_dir / "cells" / f"{s.id}.parquet"
        if path.exists() and "review_label" in pq.read_schema(path).names:
            col = (
                pq.read_table(path, columns=["review_label"])
                .column(0)
                .to_numpy(zero_copy_only=False)
            )
            if np.isin(col, classes).any():
                return "review"
    return "gate-margin"


def margin_rows(run: Path, min_margin: float) -> np.ndarray:
    """Store rows whose ``gate_margin`` (robust SDs from the deciding threshold) is at least
    ``min_margin``."""
    import pandas as pd
    import pyarrow.parquet as pq

    index = read_index(run)[0].select(["row", "slide_id", "cell_id"]).to_pandas()
    parts = []
    for sid in index["slide_id"].unique():
        path = run / "cells" / f"{sid}.parquet"
        if "gate_margin" not in pq.read_schema(path).names:
            raise ImmunoctoError(f"{path}: no gate_margin; run `immunocto gate`")
        parts.append(
            pq.read_table(path, columns=["cell_id", "gate_margin"]).to_pandas().assign(slide_id=sid)
        )
    merged = index.merge(pd.concat(parts), on=["slide_id", "cell_id"], how="left")
    return merged.loc[merged["gate_margin"] >= min_margin, "row"].to_numpy()


@dataclass
class TrainResult:
    folder: Path
    metrics: dict[str, Any]
    best_epoch: int
    seconds: float


def _restrict(ds: ShuffledCrops, allowed: np.ndarray) -> ShuffledCrops:
    keep = np.isin(ds.rows, allowed)
    ds.rows, ds.labels = ds.rows[keep], ds.labels[keep]
    return ds


def _datasets(
    run: Path, column: str | None, batch_size: int, seed: int, **kwargs: Any
) -> tuple[ShuffledCrops, ShuffledCrops, ShuffledCrops | None, str]:
    """Train / validation / test streams: the index's patient splits, or (no validation slide)
    a spatial hold-out. ``kwargs`` go to :class:`ShuffledCrops` (default ``with_if=True``)."""
    kwargs.setdefault("with_if", True)

    def make(split: str | None, shuffle: bool) -> ShuffledCrops:
        return ShuffledCrops(
            run,
            split=split,
            label_column=column,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            **kwargs,
        )

    index = read_index(run)[0].to_pandas()
    splits = set(index["split"])
    if "val" in splits:
        train, val = make("train", True), make("val", False)
        test = make("test", False) if "test" in splits else None
        return train, val, test, "held-out slides (split by patient)"
    # one slide (or no validation slide): a spatial hold-out, the rightmost 20 % of each slide
    edge = index.groupby("slide_id")["x"].transform(lambda x: x.min() + 0.8 * (x.max() - x.min()))
    held = index.loc[index["x"] > edge, "row"].to_numpy()
    kept = index.loc[index["x"] <= edge, "row"].to_numpy()
    log.warning(
        "no validation slide: validating on a spatial hold-out (not independent of training)"
    )
    return (
        _restrict(make("train", True), kept),
        _restrict(make("train", False), held),
        None,
        "spatial hold-out within the training slides (not independent)",
    )


def class_weights(counts: np.ndarray, device: torch.device) -> torch.Tensor:
    """Inverse-frequency class weights (balanced), clipped to [0.1, 10]."""
    w = np.clip(counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.1, 10.0)
    return torch.tensor(w, dtype=torch.float32, device=device)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature ``T`` minimising the validation NLL of ``softmax(logits / T)`` (Guo et al.
    2017). Label smoothing and class weights leave a model under-confident; calibrated
    probabilities make a threshold such as 0.95 mean what it says."""
    z = torch.from_numpy(np.asarray(logits, np.float64))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    if len(y) == 0 or not torch.isfinite(z).all():
        return 1.0

    def nll(beta: float) -> float:
        return float(nn.functional.cross_entropy(z * beta, y))

    # the NLL is convex in beta = 1/T: a golden-section search over T in [0.05, 20] finds the
    # minimum without the divergence a gradient step hits when validation is separable
    lo, hi = 1 / 20.0, 1 / 0.05
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(1 / ((lo + hi) / 2))


def train_bootstrap(
    cfg: RunConfig,
    params: TrainParams | None = None,
    *,
    name: str = "bootstrap",
    workers: int = 0,
    max_steps: int | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train the bootstrap classifier into ``RUN/models/<name>/``. ``params`` defaults to
    ``cfg.training``; ``overrides`` replace its fields (e.g. ``labels="gate"``,
    ``epochs=5``; ``None`` keeps the config's value). The same call style as
    :func:`immunocto.models.he.train_he`."""
    t = with_overrides(params or cfg.training, overrides)
    labels = resolve_labels(cfg, t.labels)
    arch, epochs, batch_size, lr, init = t.arch, t.epochs, t.batch_size, t.lr, t.init
    progress = progress or NullProgress()
    if labels not in LABEL_COLUMNS:
        raise ImmunoctoError(
            f"`labels` must be auto, gate, gate-margin or review (got {labels!r})",
            arguments=("labels",),
        )
    run = cfg.run_dir
    store = CropStore.open_readonly(store_path(run)) if store_path(run).exists() else None
    if store is None:
        raise ImmunoctoError(f"{store_path(run)}: no cell database; run `immunocto build-db` first")
    if store.if_ is None or tuple(store.if_markers) != tuple(CLASSIFIER_IF_MARKERS):
        raise ImmunoctoError(
            f"{store_path(run)}: the bootstrap classifier needs IF crops of {', '.join(CLASSIFIER_IF_MARKERS)}; rebuild without --no-if"
        )
    torch.manual_seed(t.seed)
    dev = pick_device(t.device)
    column = LABEL_COLUMNS[labels]
    train_ds, val_ds, test_ds, val_kind = _datasets(run, column, batch_size, t.seed)
    if labels == "gate-margin":
        confident = margin_rows(run, t.min_margin)
        for ds in (train_ds, val_ds, test_ds):
            if ds is not None:
                _restrict(ds, confident)
        log.info("V0 = gate labels with margin >= %.2f robust SD (no reviews)", t.min_margin)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise ImmunoctoError(
            f"{run}: {len(train_ds)} training and {len(val_ds)} validation cells with {column}; label more cells"
        )
    counts = np.bincount(train_ds.labels, minlength=len(CLASSES))
    log.info(
        "training on %d cells (%s), validating on %d (%s)",
        len(train_ds),
        dict(zip(CLASSES, counts.tolist(), strict=True)),
        len(val_ds),
        val_kind,
    )

    loader = crop_loader(workers, dev)
    spec_source = ShuffledCrops(
        run,
        split=None,
        with_if=True,
        label_column=column,
        batch_size=512,
        shuffle=True,
        seed=t.seed,
    )
    spec = fit_spec(_restrict(spec_source, train_ds.rows), tuple(CLASSIFIER_IF_MARKERS))
    model = build_model(arch, len(spec.channels), len(CLASSES))
    skipped = load_init(model, init) if init else []
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    weights = class_weights(counts, dev)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=t.label_smoothing)
    eval_loss = nn.CrossEntropyLoss(weight=weights)
    gen = torch.Generator().manual_seed(t.seed)

    def forward(b: dict[str, Any], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        he, mask, ifs = b["he"], b["mask"], b["if"]
        if train:
            he, mask, ifs = random_flips(he, mask, ifs.to(torch.int32), generator=gen)
            he = hed_jitter(he, generator=gen)
        x = normalise(raw_input(he, mask, ifs).to(dev, non_blocking=True), spec)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return model(x), b["label"].to(dev, non_blocking=True)

    t_start = time.perf_counter()
    fitted = fit(
        model, forward, loader, train_ds, val_ds, loss_fn=loss_fn, eval_loss=eval_loss,
        epochs=epochs, lr=lr, weight_decay=t.weight_decay, patience=t.patience, device=dev,
        name="bootstrap", progress=progress, max_steps=max_steps,
    )  # fmt: skip
    history, best_epoch = fitted.history, fitted.best_epoch
    evaluations = {}
    t0 = time.perf_counter()
    _, vy, vlogits = evaluate(model, loader(val_ds), forward, eval_loss, dev)
    vy = vy.astype(int)
    infer_rate = len(vy) / max(time.perf_counter() - t0, 1e-9)
    evaluations["validation"] = classification_metrics(vy, vlogits.argmax(1), CLASSES)
    temperature = fit_temperature(vlogits, vy)
    log.info("calibration: temperature %.3f on the validation cells", temperature)
    if test_ds is not None and len(test_ds):
        _, ty, tz = evaluate(model, loader(test_ds), forward, eval_loss, dev)
        evaluations["test"] = classification_metrics(ty.astype(int), tz.argmax(1), CLASSES)
    folder = models_dir(run) / name
    index, manifest = read_index(run)
    config = {
        "kind": "bootstrap", "arch": arch, "classes": list(CLASSES), "input": spec.to_dict(),
        "labels": labels, "label_column": column, "min_margin": t.min_margin if labels == "gate-margin" else None, "validation": val_kind, "temperature": temperature,
        "train": {"epochs_run": len(history), "best_epoch": best_epoch, "batch_size": batch_size, "lr": lr,
                  "weight_decay": t.weight_decay, "label_smoothing": t.label_smoothing, "class_weights": weights.tolist(),
                  "train_counts": dict(zip(CLASSES, counts.tolist(), strict=True)), "seed": t.seed, "init": str(init) if init else None,
                  "init_skipped": skipped},
        **provenance(index.to_pandas(), manifest, dev),
    }  # fmt: skip
    metrics = metrics_record(fitted, evaluations, infer_rate, dev)
    save_model(folder, model, config, metrics)
    save_training_figure(history, evaluations, CLASSES, folder / "metrics.png")
    return TrainResult(folder, metrics, best_epoch, time.perf_counter() - t_start)
