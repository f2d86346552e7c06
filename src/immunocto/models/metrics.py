"""Classification metrics and the confusion-matrix / loss-curve figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def classification_metrics(
    true: np.ndarray, pred: np.ndarray, classes: tuple[str, ...]
) -> dict[str, Any]:
    """Per-class precision, recall (= per-class accuracy), F1 and support; overall accuracy,
    macro F1 and the confusion matrix (rows = true, columns = predicted)."""
    k = len(classes)
    m = np.bincount(np.asarray(true) * k + np.asarray(pred), minlength=k * k).reshape(k, k)
    per = {}
    for i, c in enumerate(classes):
        tp = m[i, i]
        prec = tp / m[:, i].sum() if m[:, i].sum() else float("nan")
        rec = tp / m[i].sum() if m[i].sum() else float("nan")
        f1 = (
            2 * prec * rec / (prec + rec)
            if (prec + rec) and np.isfinite(prec) and np.isfinite(rec)
            else float("nan")
        )
        per[c] = {
            "precision": float(prec),
            "recall": float(rec),
            "f1": float(f1),
            "support": int(m[i].sum()),
        }
    f1s = [v["f1"] for v in per.values() if np.isfinite(v["f1"])]
    return {
        "accuracy": float(np.trace(m) / m.sum()) if m.sum() else float("nan"),
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "per_class": per,
        "confusion": m.tolist(),
        "n": int(m.sum()),
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
