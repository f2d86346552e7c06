"""Classification metrics and the confusion-matrix / loss-curve figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from immunocto.review.agreement import kappa_from_confusion


def _label_array(x: np.ndarray, k: int, what: str) -> np.ndarray:
    """``x`` as a flat int64 array of class indices in ``[0, k)`` (empty input: any dtype)."""
    a = np.asarray(x).ravel()
    if a.size == 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{what} must hold integer class indices, got dtype {a.dtype}")
    if a.min() < 0 or a.max() >= k:
        raise ValueError(f"{what} holds class indices outside [0, {k})")
    return a.astype(np.int64, copy=False)


def classification_metrics(
    true: np.ndarray, pred: np.ndarray, classes: tuple[str, ...]
) -> dict[str, Any]:
    """Per-class precision, recall (= per-class accuracy), F1 and support; overall accuracy,
    macro F1, Cohen's κ and the confusion matrix (rows = true, columns = predicted).

    ``true`` and ``pred`` are integer indices into ``classes``. The convention is that of
    scikit-learn's ``precision_recall_fscore_support`` / ``f1_score(average="macro")`` with
    ``zero_division=0`` and ``labels`` = the classes present in ``true`` or ``pred``:

    * a class present on at least one side counts in the macro F1; a ratio whose denominator
      is 0 is 0, never NaN. So a class with support that is never predicted has precision 0,
      recall 0 and F1 0; a class that is predicted but has no support has precision 0,
      recall 0 and F1 0; a class with P = R = 0 has F1 0. F1 = 2·TP / (2·TP + FP + FN).
    * a class absent on both sides (no support, never predicted) has NaN precision, recall and
      F1 and is left out of the macro F1.

    ``kappa`` is Cohen's κ of the confusion matrix (:func:`kappa_from_confusion`: equal to
    scikit-learn's ``cohen_kappa_score`` except that perfect agreement on a single class gives
    1.0 rather than NaN). With no cells (``n`` = 0) accuracy, macro F1 and κ are NaN.
    """
    k = len(classes)
    t = _label_array(true, k, "true")
    p = _label_array(pred, k, "pred")
    if t.shape != p.shape:
        raise ValueError(f"true and pred differ in length ({t.size} vs {p.size})")
    m = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(m).astype(float)
    support = m.sum(1)
    predicted = m.sum(0)
    present = (support + predicted) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(predicted > 0, tp / predicted, 0.0)
        rec = np.where(support > 0, tp / support, 0.0)
        denom = 2 * tp + (predicted - tp) + (support - tp)  # 2·TP + FP + FN
        f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
    nan = float("nan")
    per = {
        c: {
            "precision": float(prec[i]) if present[i] else nan,
            "recall": float(rec[i]) if present[i] else nan,
            "f1": float(f1[i]) if present[i] else nan,
            "support": int(support[i]),
        }
        for i, c in enumerate(classes)
    }
    n = int(m.sum())
    return {
        "accuracy": float(np.trace(m) / n) if n else nan,
        "macro_f1": float(f1[present].mean()) if present.any() else nan,
        "kappa": kappa_from_confusion(m),
        "per_class": per,
        "confusion": m.tolist(),
        "n": n,
    }


def save_training_figure(
    history: list[dict[str, float]],
    evaluations: dict[str, dict[str, Any]],
    classes: tuple[str, ...],
    out: str | os.PathLike[str],
) -> Path:
    """Loss curves (train/validation per epoch) beside one confusion matrix per evaluated split."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from immunocto._fs import atomic_path
    from immunocto.review.agreement import draw_confusion

    panels = 1 + len(evaluations)
    fig = Figure(figsize=(4.6 * panels, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, panels, 1)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h.get("val_loss", np.nan) for h in history], "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("loss")
    for k, (name, ev) in enumerate(evaluations.items()):
        ax = fig.add_subplot(1, panels, k + 2)
        draw_confusion(ax, np.asarray(ev["confusion"]), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("label")
        ax.set_title(
            f"{name}: accuracy {ev['accuracy']:.3f}, macro F1 {ev['macro_f1']:.3f}", fontsize=9
        )
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out)
