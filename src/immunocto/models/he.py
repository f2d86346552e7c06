"""``immunocto train --kind he|he-regression``: the H&E-only model.

Input: the 64 x 64 H&E crop + the cell's mask (4 channels, 0.325 µm/px) and, unless
``context`` is off, the 256 x 256 window around the cell box-averaged to 64 x 64
(:mod:`immunocto.models.context`, a second branch of :class:`~immunocto.models.arch.HENet`).

- ``he``: the five classes, or lymphocyte / macrophage / other with ``collapse_lymphocytes``;
  labels from ``v1_label`` (V1), ``review_label`` (V0), ``gate_label`` or the store's own index
  (``store``: e.g. an imported Immunocto release). ``unlabeled``/``ambiguous`` cells are never in
  the loss; with ``partial_labels: nnpu`` the ``other`` cells are treated as unlabelled
  (:mod:`immunocto.models.pu`).
- ``he-regression`` ("virtual IF"): ``log1p`` of each cell's mean intensity of the classifier
  IF markers (``<marker>_mean`` from ``immunocto quantify``), standardised; the report is
  Pearson r per marker on held-out slides.

Slides are split by patient as in the store (no validation slide: a spatial hold-out, flagged).
Augmentation: flips/rotations and HED stain jitter on crop and context alike.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from immunocto.config import HETrainParams, RunConfig
from immunocto.conventions import CLASSES, CLASSIFIER_IF_MARKERS
from immunocto.db.datasets import ShuffledCrops, hed_jitter, random_flips
from immunocto.db.store import CropStore, read_index, store_path
from immunocto.errors import ImmunoctoError
from immunocto.models import loop
from immunocto.models.arch import HENet, load_init, load_nucleus_encoder, nucleus_model_folder
from immunocto.models.channels import fit_spec, normalise, raw_input
from immunocto.models.checkpoint import models_dir, pick_device, save_model
from immunocto.models.metrics import classification_metrics, save_training_figure
from immunocto.models.pu import crop_features, estimate_prior, nnpu_loss
from immunocto.models.train import (
    TrainResult,
    _datasets,
    _restrict,
    class_weights,
    fit_temperature,
)
from immunocto.progress import NullProgress, Progress

log = logging.getLogger(__name__)

HE_LABELS = {"v1": "v1_label", "v0": "review_label", "gate": "gate_label", "store": None}
LYMPHOCYTES = ("cd4_t", "cd8_t", "b_cell")
COLLAPSED = ("lymphocyte", "macrophage", "other")
KINDS = ("he", "he-regression")


def output_classes(collapse: bool) -> tuple[tuple[str, ...], np.ndarray]:
    """Classes the model predicts and the map from :data:`CLASSES` indices to theirs."""
    if not collapse:
        return CLASSES, np.arange(len(CLASSES))
    lut = np.array(
        [COLLAPSED.index("lymphocyte") if c in LYMPHOCYTES else COLLAPSED.index(c) for c in CLASSES]
    )
    return COLLAPSED, lut


def he_database(run: str | os.PathLike[str], labels: str, kind: str = "he") -> Path:
    """The database folder the H&E model reads: the V1 database ``RUN/v1`` for V1 labels,
    else the run's own store (it may not exist yet)."""
    from immunocto.db.build import db_folder

    return db_folder(run, "v1" if kind == "he" and labels == "v1" else "gate")


def training_data(run: Path, labels: str, kind: str = "he") -> tuple[Path, str | None]:
    """The database folder the H&E model trains on and the cell-table label column (``None``:
    the index's own labels). V1 (the default) is the V1 database ``RUN/v1`` that
    ``build-db --labels v1`` writes (every cell the bootstrap model labelled); ``v0`` and
    ``gate`` join those columns onto the run's own store; ``store`` (and the regression) read
    the run's store as it is."""
    data = he_database(run, labels, kind)
    if data != Path(run):
        if not store_path(data).exists():
            raise ImmunoctoError(
                f"{store_path(data)}: no V1 database; run `immunocto expand CONFIG` then "
                "`immunocto build-db CONFIG --labels v1` (or train on --labels v0|gate)"
            )
        return data, None
    if not store_path(run).exists():
        raise ImmunoctoError(f"{store_path(run)}: no cell database; run `immunocto build-db` first")
    return run, HE_LABELS[labels] if kind == "he" else None


def marker_targets(run: Path, markers: tuple[str, ...]) -> np.ndarray:
    """``(rows, C)`` float32 ``log1p(<marker>_mean)`` per store row (NaN where unmeasured)."""
    index = read_index(run)[0].select(["row", "slide_id", "cell_id"]).to_pandas()
    out = np.full((int(index["row"].max()) + 1, len(markers)), np.nan, np.float32)
    cols = [f"{m}_mean" for m in markers]
    for sid, part in index.groupby("slide_id"):
        path = run / "cells" / f"{sid}.parquet"
        names = pq.read_schema(path).names if path.exists() else []
        if any(c not in names for c in cols):
            raise ImmunoctoError(
                f"{path}: no {', '.join(c for c in cols if c not in names)}; "
                "--kind he-regression needs `immunocto quantify`"
            )
        vals = pq.read_table(path, columns=["cell_id", *cols]).to_pandas()
        merged = part.merge(vals, on="cell_id", how="left")
        out[merged["row"].to_numpy()] = np.log1p(
            np.clip(merged[cols].to_numpy(np.float64), 0, None)
        )
    return out


def _prior_from_store(run: Path, ds: ShuffledCrops, other: int, seed: int) -> dict[str, float]:
    """Elkan–Noto prior of hidden positives among ``other`` on simple crop features."""
    store = CropStore.open_readonly(store_path(run))
    rows = ds.rows
    pick = np.sort(np.random.default_rng(seed).permutation(len(rows))[:20000])
    feats = []
    for lo in range(0, len(pick), 2048):
        r = rows[pick[lo : lo + 2048]]
        feats.append(
            crop_features(
                store.he.get_orthogonal_selection((r,)), store.mask.get_orthogonal_selection((r,))
            )
        )
    return estimate_prior(np.concatenate(feats), ds.labels[pick] != other, seed=seed)


def _inputs(b: dict[str, Any], spec, dev: torch.device, train: bool, gen) -> tuple:
    he, mask, ctx = b["he"], b["mask"], b.get("context")
    if train:
        if ctx is not None:
            he, mask, ctx = random_flips(he, mask, ctx, generator=gen)
            # one stain jitter per cell, shared by its crop and its context
            both = hed_jitter(torch.cat([he, ctx], dim=-1), generator=gen)
            he, ctx = both[..., : he.shape[-1]], both[..., he.shape[-1] :]
        else:
            he, mask = random_flips(he, mask, generator=gen)
            he = hed_jitter(he, generator=gen)
    x = normalise(raw_input(he, mask, None).to(dev, non_blocking=True), spec)
    c = None
    if ctx is not None:
        rgb = type(spec)(if_markers=(), mean=spec.mean[:3], std=spec.std[:3])
        c = normalise(ctx.float().div(255.0).to(dev, non_blocking=True), rgb)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
        c = None if c is None else c.contiguous(memory_format=torch.channels_last)
    return x, c


@dataclass
class _Targets:
    """What the H&E model predicts: ``classes`` (class names, or markers for regression);
    ``lut`` maps the database's five classes to them; regression targets are standardised
    log1p marker means per crop row (``values``, with the ``mean``/``std`` used)."""

    classes: tuple[str, ...]
    lut: np.ndarray | None = None
    values: torch.Tensor | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


def _targets(kind: str, p: HETrainParams, run: Path, sets: list) -> _Targets:
    """Classes for ``he``; for ``he-regression`` the marker targets, keeping only the cells
    of ``sets`` (train, val, test) that have all of them."""
    if kind == "he":
        classes, lut = output_classes(p.collapse_lymphocytes)
        return _Targets(classes, lut=lut)
    markers = tuple(CLASSIFIER_IF_MARKERS)
    targets = marker_targets(run, markers)
    for ds in sets:
        if ds is not None:
            _restrict(ds, ds.rows[np.isfinite(targets[ds.rows]).all(1)])
    mean = np.nanmean(targets[sets[0].rows], axis=0)
    std = np.nanstd(targets[sets[0].rows], axis=0) + 1e-6
    return _Targets(markers, values=torch.from_numpy((targets - mean) / std), mean=mean, std=std)


def _losses(kind: str, p: HETrainParams, data: Path, train_ds, tg: _Targets, dev):
    """(training loss, validation loss, class weights or None, train counts, PU prior info):
    weighted cross-entropy (or nnPU with ``partial_labels: nnpu``) for ``he``, MSE for
    ``he-regression``."""
    if kind != "he":
        loss = nn.MSELoss()
        return loss, loss, None, np.array([len(train_ds)]), None
    counts = np.bincount(tg.lut[train_ds.labels], minlength=len(tg.classes))
    weights = class_weights(counts, dev)
    eval_loss = nn.CrossEntropyLoss(weight=weights)
    if p.partial_labels != "nnpu":
        loss = nn.CrossEntropyLoss(weight=weights, label_smoothing=p.label_smoothing)
        return loss, eval_loss, weights, counts, None
    prior_info = (
        {"prior": p.pu_prior, "source": "given"}
        if p.pu_prior is not None
        else {**_prior_from_store(data, train_ds, CLASSES.index("other"), p.seed), "source": "Elkan-Noto on crop features"}
    )  # fmt: skip
    log.info("partial labels: %.3f of `other` taken as hidden positives", prior_info["prior"])
    prior, other = float(prior_info["prior"]), tg.classes.index("other")

    def loss_fn(z, y):
        return nnpu_loss(z, y, other, prior, class_weight=weights)

    return loss_fn, eval_loss, weights, counts, prior_info


def _model(p: HETrainParams, n_out: int, spec, dev) -> tuple[HENet, HETrainParams, list, Any]:
    """The network, started from ``p.init`` (local weights, or a nucleus model folder whose
    encoder becomes the crop branch); returns it, the params (arch may change), the tensors
    not taken and a record of the start."""
    nucleus_init = nucleus_model_folder(p.init)
    if nucleus_init is not None and p.arch != "nuclei":
        log.info("--init %s is a nucleus model: the crop branch becomes its encoder", p.init)
        p = p.model_copy(update={"arch": "nuclei"})
    model = HENet(p.arch, n_out, context=p.context)
    if nucleus_init is not None:
        skipped: list = []
        init_info = load_nucleus_encoder(model.crop, nucleus_init, rgb_std=spec.std[:3])
    else:
        skipped = load_init(model.crop, p.init) if p.init else []
        init_info = {"file": str(p.init)} if p.init else None
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model, p, skipped, init_info


def train_he(
    run: str | Path,
    params: HETrainParams | None = None,
    *,
    cfg: RunConfig | None = None,
    kind: str = "he",
    name: str | None = None,
    workers: int = 0,
    max_steps: int | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train the H&E-only model into ``RUN/models/<name>/`` (default ``he`` or
    ``he-regression``). ``params`` defaults to ``cfg.he_training``; ``overrides`` replace its
    fields (e.g. ``arch="small"``). ``cfg`` (the run config) is needed for the context
    windows, which are cut from the slides."""
    run = Path(run)
    if kind not in KINDS:
        raise ImmunoctoError(
            f"`kind` must be one of bootstrap, {', '.join(KINDS)} (got {kind!r})",
            arguments=("kind",),
        )
    p = loop.with_overrides(params or (cfg.he_training if cfg else HETrainParams()), overrides)
    progress = progress or NullProgress()
    name = name or kind
    data, column = training_data(run, p.labels, kind)
    if p.context:
        if cfg is None:
            raise ImmunoctoError(
                f"{run}: the context branch reads the slides, which need the run config "
                "(immunocto.yaml); give it, or train with --no-context"
            )
        from immunocto.models.context import ensure_context

        ensure_context(cfg, db=data, progress=progress)
    torch.manual_seed(p.seed)
    dev = pick_device(p.device)
    train_ds, val_ds, test_ds, val_kind = _datasets(
        data, column, p.batch_size, p.seed, with_if=False, with_context=p.context
    )
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise ImmunoctoError(
            f"{data}: {len(train_ds)} training and {len(val_ds)} validation cells "
            f"with {column or 'a stored label'}; label more cells"
        )
    tg = _targets(kind, p, run, [train_ds, val_ds, test_ds])
    spec_src = _restrict(
        ShuffledCrops(data, split=None, label_column=column, batch_size=512, seed=p.seed),
        train_ds.rows,
    )
    spec = fit_spec(spec_src, ())
    model, p, skipped, init_info = _model(p, len(tg.classes), spec, dev)
    loss_fn, eval_loss, weights, counts, prior_info = _losses(kind, p, data, train_ds, tg, dev)
    lut_t = torch.from_numpy(tg.lut) if tg.lut is not None else None
    gen = torch.Generator().manual_seed(p.seed)

    def forward(b: dict[str, Any], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, c = _inputs(b, spec, dev, train, gen if train else None)
        y = lut_t[b["label"]] if lut_t is not None else tg.values[b["row"]]
        return model(x, c), y.to(dev, non_blocking=True)

    loader = loop.crop_loader(workers, dev)
    t_start = time.perf_counter()
    fitted = loop.fit(
        model, forward, loader, train_ds, val_ds, loss_fn=loss_fn, eval_loss=eval_loss,
        epochs=p.epochs, lr=p.lr, weight_decay=p.weight_decay, patience=p.patience, device=dev,
        name=name, progress=progress, max_steps=max_steps, accuracy=kind == "he",
    )  # fmt: skip

    def evaluate_on(ds) -> tuple[float, np.ndarray, np.ndarray]:
        return loop.evaluate(model, loader(ds), forward, eval_loss, dev)

    t0 = time.perf_counter()
    _, vy, vz = evaluate_on(val_ds)
    infer_rate = len(vy) / max(time.perf_counter() - t0, 1e-9)
    test = evaluate_on(test_ds)[1:] if test_ds is not None and len(test_ds) else None
    evaluations, extra = _evaluations(kind, p, tg, weights, (vy, vz), test)
    index, manifest = read_index(data)
    config = {
        "kind": kind, "arch": p.arch, "classes": list(tg.classes), "input": spec.to_dict(),
        "context": p.context, "labels": p.labels, "label_column": column,
        "database": str(data), "label_version": manifest.get("version"),
        "collapse_lymphocytes": p.collapse_lymphocytes, "partial_labels": p.partial_labels,
        "pu_prior": prior_info, "validation": val_kind, **extra,
        "train": {**p.model_dump(mode="json"), "epochs_run": len(fitted.history),
                  "best_epoch": fitted.best_epoch, "train_counts": counts.tolist(),
                  "init_skipped": skipped, "init": init_info},
        **loop.provenance(index.select(["slide_id", "split"]).to_pandas(), manifest, dev),
    }  # fmt: skip
    metrics = loop.metrics_record(fitted, evaluations, infer_rate, dev)
    folder = models_dir(run) / name
    save_model(folder, model, config, metrics)
    if kind == "he":
        save_training_figure(fitted.history, evaluations, tg.classes, folder / "metrics.png")
    else:
        save_regression_figure(fitted.history, evaluations, folder / "metrics.png")
    return TrainResult(folder, metrics, fitted.best_epoch, time.perf_counter() - t_start)


def _evaluations(kind: str, p: HETrainParams, tg: _Targets, weights, val, test):
    """Validation (and test) metrics from ``(targets, outputs)`` pairs, and the config's
    extra keys: the logit adjustment and temperature (``he``) or the target transform."""
    (vy, vz), evaluations, extra = val, {}, {}
    if kind == "he":
        # class weights make the model's posteriors those of a class-balanced population; the
        # logit adjustment -log(weight) restores the training prior (Menon et al. 2021), so
        # predicted counts follow the data rather than over-calling rare classes
        n_out = len(tg.classes)
        adjust = -np.log(weights.cpu().numpy()) if p.partial_labels == "ignore" else np.zeros(n_out)
        extra["logit_adjustment"] = adjust.round(6).tolist()
        vz = vz + adjust
        evaluations["validation"] = classification_metrics(vy.astype(int), vz.argmax(1), tg.classes)
        extra["temperature"] = fit_temperature(vz, vy.astype(int))
        if test is not None:
            ty, tz = test
            evaluations["test"] = classification_metrics(
                ty.astype(int), (tz + adjust).argmax(1), tg.classes
            )
        return evaluations, extra
    evaluations["validation"] = regression_metrics(vy, vz, tg.classes)
    if test is not None:
        evaluations["test"] = regression_metrics(*test, tg.classes)
    extra["targets"] = {"markers": list(tg.classes), "transform": "log1p(<marker>_mean)",
                        "mean": tg.mean.tolist(), "std": tg.std.tolist()}  # fmt: skip
    return evaluations, extra


def regression_metrics(y: np.ndarray, z: np.ndarray, markers: tuple[str, ...]) -> dict[str, Any]:
    """Pearson r and RMSE (standardised units) per marker; rows = cells."""
    per = {}
    for k, m in enumerate(markers):
        a, b = y[:, k], z[:, k]
        r = (
            float(np.corrcoef(a, b)[0, 1])
            if len(a) > 2 and a.std() > 0 and b.std() > 0
            else float("nan")
        )
        per[m] = {
            "pearson_r": r,
            "rmse": float(np.sqrt(np.mean((a - b) ** 2))) if len(a) else float("nan"),
        }
    return {"per_marker": per, "n": len(y)}


def save_regression_figure(history, evaluations, out: Path) -> Path:
    """Loss curves beside Pearson r per marker for each evaluated split."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from immunocto._fs import atomic_path

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(
        [h["epoch"] for h in history], [h["val_loss"] for h in history], "s-", label="validation"
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (standardised)")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    width = 0.8 / max(len(evaluations), 1)
    for k, (split, ev) in enumerate(evaluations.items()):
        markers = list(ev["per_marker"])
        r = [ev["per_marker"][m]["pearson_r"] for m in markers]
        ax.bar(np.arange(len(markers)) + k * width, r, width, label=split)
        ax.set_xticks(
            np.arange(len(markers)) + width * (len(evaluations) - 1) / 2,
            markers,
            rotation=45,
            ha="right",
        )
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("Pearson r, predicted vs measured")
    ax.set_title("virtual IF from H&E")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out)
