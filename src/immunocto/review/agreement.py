"""Agreement statistics: Cohen's κ per reviewer pair, Fleiss' κ, concordance with the automatic
labels per class with bootstrap 95 % intervals, confusion matrices. Pure functions on label
arrays (vectorised, bootstrap included) plus :func:`agreement_report` over a run.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from immunocto.conventions import CLASSES

#: Label order of the confusion matrices.
LABEL_ORDER: tuple[str, ...] = (*CLASSES, "not_cell", "ambiguous")


def confusion(a: np.ndarray, b: np.ndarray, labels: tuple[str, ...] = LABEL_ORDER) -> np.ndarray:
    """``(K, K)`` counts, rows = ``a``'s label, columns = ``b``'s (labels outside ``labels`` dropped)."""
    lookup = {lab: i for i, lab in enumerate(labels)}
    ia = np.array([lookup.get(x, -1) for x in a], np.int64)
    ib = np.array([lookup.get(x, -1) for x in b], np.int64)
    keep = (ia >= 0) & (ib >= 0)
    k = len(labels)
    return np.bincount(ia[keep] * k + ib[keep], minlength=k * k).reshape(k, k)


def kappa_from_confusion(m: np.ndarray) -> float:
    """Cohen's κ of a confusion matrix; 1.0 when both raters agree on every item (even when
    they use a single label, where chance agreement is 1 as well), NaN when empty."""
    n = m.sum()
    if n == 0:
        return float("nan")
    po = np.trace(m) / n
    pe = float((m.sum(0) * m.sum(1)).sum()) / n**2
    if pe >= 1.0:
        return 1.0 if po >= 1.0 else 0.0
    return float((po - pe) / (1.0 - pe))


def cohen_kappa(a: np.ndarray, b: np.ndarray, labels: tuple[str, ...] = LABEL_ORDER) -> float:
    """Cohen's κ between two raters of the same items."""
    return kappa_from_confusion(confusion(a, b, labels))


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' κ of ``(items, categories)`` rating counts; every item needs the same number
    (≥ 2) of ratings."""
    counts = np.asarray(counts, float)
    n_items = counts.shape[0]
    raters = counts.sum(1)
    if n_items == 0 or raters.min() < 2 or not np.allclose(raters, raters[0]):
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings per item")
    r = raters[0]
    p_j = counts.sum(0) / (n_items * r)
    p_i = ((counts**2).sum(1) - r) / (r * (r - 1))
    pbar, pe = p_i.mean(), (p_j**2).sum()
    if pe >= 1.0:
        return 1.0 if pbar >= 1.0 else 0.0
    return float((pbar - pe) / (1 - pe))


def bootstrap_ci(
    agree: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of a 0/1 array with a percentile bootstrap interval (all resamples at once)."""
    agree = np.asarray(agree, float)
    if len(agree) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(agree), size=(n_boot, len(agree)))
    means = agree[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(agree.mean()), float(lo), float(hi)


def concordance(
    reviewer: np.ndarray,
    automatic: np.ndarray,
    *,
    classes: tuple[str, ...] = CLASSES,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """How often the reviewer confirms the automatic label: overall and per automatic class,
    each with a bootstrap 95 % interval. Cells the reviewer marked ``ambiguous`` are left out
    (and counted)."""
    reviewer, automatic = np.asarray(reviewer, object), np.asarray(automatic, object)
    sure = reviewer != "ambiguous"
    agree = (reviewer == automatic)[sure]
    auto = automatic[sure]
    out: dict[str, Any] = {"n": int(sure.sum()), "ambiguous": int((~sure).sum())}
    out["overall"] = dict(
        zip(("value", "lo", "hi"), bootstrap_ci(agree, n_boot=n_boot, seed=seed), strict=True)
    )
    out["per_class"] = {}
    for c in classes:
        sel = auto == c
        v, lo, hi = bootstrap_ci(agree[sel], n_boot=n_boot, seed=seed)
        out["per_class"][c] = {"n": int(sel.sum()), "value": v, "lo": lo, "hi": hi}
    return out


def agreement_report(
    latest: pd.DataFrame, index: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Agreement of the decisions in force (``ReviewStore.latest()``) with each other and with
    the automatic labels of the crop ``index`` (its ``label`` column, by ``row``)."""
    auto = index.set_index("row")["label"]
    reviewers = sorted(latest["reviewer"].unique())
    wide = latest.pivot_table(index="row", columns="reviewer", values="label", aggfunc="last")
    report: dict[str, Any] = {
        "reviewers": reviewers,
        "cells_reviewed": len(wide),
        "pairs": [],
        "concordance": {},
        "confusion": {},
    }
    for r in reviewers:
        mine = latest[latest["reviewer"] == r]
        mine = mine[mine["row"].isin(auto.index)]
        a = mine["label"].to_numpy(object)
        b = auto.loc[mine["row"]].to_numpy(object)
        report["concordance"][r] = concordance(a, b, n_boot=n_boot, seed=seed)
        report["confusion"][f"{r} vs automatic"] = confusion(a, b).tolist()
    for r1, r2 in itertools.combinations(reviewers, 2):
        both = wide[[r1, r2]].dropna()
        m = confusion(both[r1].to_numpy(object), both[r2].to_numpy(object))
        report["pairs"].append(
            {
                "a": r1,
                "b": r2,
                "n": len(both),
                "kappa": kappa_from_confusion(m),
                "agreement": float(np.trace(m) / m.sum()) if m.sum() else float("nan"),
            }
        )
        report["confusion"][f"{r1} vs {r2}"] = m.tolist()
    if len(reviewers) >= 3:
        full = wide[reviewers].dropna()
        counts = np.stack([(full.to_numpy(object) == lab).sum(1) for lab in LABEL_ORDER], axis=1)
        report["fleiss"] = {
            "n": len(full),
            "kappa": fleiss_kappa(counts) if len(full) else float("nan"),
        }
    report["labels"] = list(LABEL_ORDER)
    return report


def draw_confusion(ax, m: np.ndarray, labels, *, rotation: int = 45) -> None:
    """A count matrix on ``ax`` (log colour scale, counts written in), labels on both axes."""
    ax.imshow(np.log1p(m), cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        if v:
            color = "black" if v < m.max() / 2 else "white"
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=rotation, fontsize=7, ha="right")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)


def save_confusion_figure(report: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """One panel per confusion matrix of the report (rows = first rater, columns = second)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from immunocto._fs import atomic_path

    items = list(report["confusion"].items())
    labels = report["labels"]
    cols = min(3, max(len(items), 1))
    rows = -(-max(len(items), 1) // cols)
    fig = Figure(figsize=(4.6 * cols, 4.4 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for k, (name, m) in enumerate(items):
        ax = fig.add_subplot(rows, cols, k + 1)
        draw_confusion(ax, np.asarray(m), labels, rotation=60)
        first, _, second = name.partition(" vs ")
        ax.set_ylabel(first, fontsize=8)
        ax.set_xlabel(second, fontsize=8)
        ax.set_title(name, fontsize=9)
    if not items:
        fig.text(0.5, 0.5, "no decisions yet", ha="center")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out)
