"""The training loop shared by the bootstrap classifier (:func:`models.train.train_bootstrap`)
and the H&E-only model (:func:`models.he.train_he`).

A trainer describes its model by one function, ``forward(batch, train) -> (outputs, targets)``:
it builds the input from a :class:`~immunocto.db.datasets.ShuffledCrops` batch (augmented
when ``train``), runs the model and returns the outputs ``(n, k)`` and their targets, both on
the device. The loop owns the rest: AdamW with a one-cycle cosine schedule, bf16 autocast on
CUDA, progress, a validation pass per epoch, early stopping on the validation loss, and the
best epoch's weights put back at the end.
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from immunocto.db.store import CHUNK
from immunocto.progress import Progress

log = logging.getLogger(__name__)

#: ``(batch, train) -> (outputs (n, k), targets)``, both on the model's device.
Forward = Callable[[dict[str, Any], bool], tuple[torch.Tensor, torch.Tensor]]
#: ``dataset -> iterable of batches`` (a DataLoader over a ShuffledCrops).
Loader = Callable[[Any], Iterable[dict[str, Any]]]


@dataclass
class Fitted:
    """What :func:`fit` did: one history row per epoch, the epoch whose weights were kept,
    and the training throughput."""

    history: list[dict[str, float]]
    best_epoch: int
    train_seconds: float
    train_cells: int


def with_overrides(params, overrides: dict[str, Any]):
    """``params`` (a pydantic section of the run config, e.g. ``TrainParams``) with the
    ``overrides`` that are not ``None``, validated. A value out of range raises an
    :class:`~immunocto.errors.ImmunoctoError` naming the argument (an explicit 0 is an error,
    never silently the default); an unknown name is a ``TypeError``, as for any function."""
    from pydantic import ValidationError

    from immunocto.errors import ImmunoctoError

    unknown = sorted(set(overrides) - set(type(params).model_fields))
    if unknown:
        raise TypeError(f"unexpected argument(s): {', '.join(unknown)}")
    data = {**params.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return type(params).model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        name = str(e["loc"][0]) if e["loc"] else "params"
        msg = e["msg"].replace("Input should be", "should be").replace("Value error, ", "")
        raise ImmunoctoError(
            f"`{name}` {msg} (got {e.get('input')!r})", arguments=(name,)
        ) from None


def crop_loader(workers: int, device: torch.device) -> Loader:
    """``dataset -> DataLoader`` of its ready-made batches, ``workers`` processes."""
    from torch.utils.data import DataLoader

    def loader(ds) -> DataLoader:
        return DataLoader(
            ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )  # fmt: skip

    return loader


def make_optimiser(
    model: nn.Module, lr: float, weight_decay: float, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a one-cycle cosine schedule over ``steps`` updates."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=lr, total_steps=steps + 1, pct_start=0.1, anneal_strategy="cos"
    )
    return optimiser, schedule


def batches_per_epoch(ds) -> int:
    """An upper bound on the batches of one epoch of a ShuffledCrops ``ds`` (each shuffle
    buffer of store chunks (:data:`immunocto.db.store.CHUNK` rows) may end with a short batch)."""
    return (
        -(-len(ds) // ds.batch_size)
        + len(np.unique(ds.rows // CHUNK)) // max(ds.buffer_chunks, 1)
        + 1
    )


def total_steps(ds, epochs: int, max_steps: int | None) -> int:
    """Optimiser steps of a run over ``ds``: every batch of every epoch, at most ``max_steps``."""
    n = batches_per_epoch(ds) * epochs
    return max(1, n if max_steps is None else min(max_steps, n))


def _outputs(forward: Forward, batch: dict[str, Any], train: bool, device: torch.device):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        z, y = forward(batch, train)
    return z.float(), y


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[dict[str, Any]], forward: Forward, loss_fn, device
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, targets and outputs (float32) over ``batches``, in eval mode."""
    model.eval()
    total, n, ys, zs = 0.0, 0, [], []
    for b in batches:
        z, y = _outputs(forward, b, False, device)
        total += float(loss_fn(z, y)) * len(y)
        n += len(y)
        ys.append(y.cpu().numpy())
        zs.append(z.cpu().numpy())
    if n == 0:
        return float("nan"), np.zeros(0), np.zeros((0, 0), np.float32)
    return total / n, np.concatenate(ys), np.concatenate(zs)


def fit(
    model: nn.Module,
    forward: Forward,
    loader: Loader,
    train_ds,
    val_ds,
    *,
    loss_fn,
    eval_loss,
    epochs: int,
    lr: float,
    weight_decay: float,
    patience: int,
    device: torch.device,
    name: str,
    progress: Progress,
    max_steps: int | None = None,
    accuracy: bool = True,
) -> Fitted:
    """Train ``model`` in place; it ends holding the weights of its best validation epoch.

    ``train_ds`` / ``val_ds`` are ShuffledCrops (``len`` = cells, ``set_epoch`` reshuffles);
    ``loss_fn`` trains, ``eval_loss`` (unsmoothed, no partial-label correction) scores the
    validation cells. ``accuracy`` adds the validation accuracy of ``argmax`` to each row.
    """
    steps = total_steps(train_ds, epochs, max_steps)
    optimiser, schedule = make_optimiser(model, lr, weight_decay, steps)
    history: list[dict[str, float]] = []
    best: tuple[float, int, Any] = (float("inf"), -1, None)
    step, train_seconds, train_cells = 0, 0.0, 0
    for epoch in range(1, epochs + 1):
        model.train()
        train_ds.set_epoch(epoch)
        task = f"{name} epoch {epoch}/{epochs}"
        progress.start(task, len(train_ds), unit="cells")
        total, n = 0.0, 0
        t0 = time.perf_counter()
        for b in loader(train_ds):
            z, y = _outputs(forward, b, True, device)
            loss = loss_fn(z, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if step < steps:
                schedule.step()
            step += 1
            total += float(loss.detach()) * len(y)
            n += len(y)
            progress.advance(task, len(y))
            if max_steps is not None and step >= max_steps:
                break
        train_seconds += time.perf_counter() - t0
        train_cells += n
        val_loss, vy, vz = evaluate(model, loader(val_ds), forward, eval_loss, device)
        row = {"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss,
               "lr": float(schedule.get_last_lr()[0])}  # fmt: skip
        if accuracy:
            row["val_accuracy"] = float(np.mean(vy == vz.argmax(1))) if len(vy) else float("nan")
        history.append(row)
        log.info(
            "%s epoch %d: train loss %.4f, validation loss %.4f%s", name, epoch,
            row["train_loss"], val_loss,
            f", accuracy {row['val_accuracy']:.3f}" if accuracy else "",
        )  # fmt: skip
        if val_loss < best[0] - 1e-4:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= patience:
            log.info("early stop: no better validation loss for %d epochs", patience)
            break
        if max_steps is not None and step >= max_steps:
            break
    if best[2] is not None:
        model.load_state_dict(best[2])
    return Fitted(history, best[1], train_seconds, train_cells)


def provenance(
    index: pd.DataFrame, manifest: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """The part of a model's ``config.json`` every trainer writes: the slides of each split of
    the database it trained on, the split seed, and where and with what it ran."""
    return {
        "splits": {s: sorted(index.loc[index["split"] == s, "slide_id"].unique().tolist())
                   for s in ("train", "val", "test")},
        "split_seed": manifest.get("split_seed"),
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip


def metrics_record(
    fitted: Fitted, evaluations: dict[str, Any], eval_cells_per_s: float, device: torch.device
) -> dict[str, Any]:
    """``metrics.json``: the history, the kept epoch, the evaluations and the speeds."""
    return {
        "history": fitted.history, "best_epoch": fitted.best_epoch, **evaluations,
        "speed": {"train_cells_per_s": fitted.train_cells / max(fitted.train_seconds, 1e-9),
                  "eval_cells_per_s": eval_cells_per_s, "device": str(device)},
    }  # fmt: skip
