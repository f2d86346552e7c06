"""Label-noise audits of gated cell tables: pure functions on data frames and numbers.

Each returns a JSON-ready dict. Intensities are the gating features (``<marker>_<stat>``) on the
log scale ``log1p``; coordinates ``x``/``y`` are H&E level-0 px (``x`` = column).

- :func:`ambiguity` — Immunocto's clustering analysis: for each population of the gating tree
  and each pair of its deciding channels, a logistic regression between the gated child
  branches; the fraction of cells in the ambiguous band (predicted probability in [0.1, 0.9]).
- :func:`pu_estimate` — positives hiding among ``other``/``ambiguous``/``unlabeled``: an
  Elkan–Noto class-prior estimate from a labelled-vs-unlabelled classifier on features the
  immune gates did not select on (:func:`remove_spatial_trend` takes a staining gradient out
  of the nuclear stain first).
- :func:`gradient_audit` — staining gradients: among cells positive for a marker, does its
  intensity trend across the slide? A linear fit of log intensity on position (F-test) and the
  fold change it implies from one side of the tissue to the other.
- :func:`subpopulation_audit` — weakly staining subpopulations: among cells clearly positive for
  a lineage marker deeper in the tree (e.g. CD8a), the fraction that fail an ancestor's gate
  (CD3e, CD45); a binomial test against a tolerated rate.
- :func:`rate_audit` — does a class's label rate depend on a nuisance variable (distance to the
  tile edge, local registration residual, nucleus size)? Rates over quintiles, chi-square test.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from immunocto.conventions import CLASSES
from immunocto.models.pu import _logistic, estimate_prior

IMMUNE = tuple(c for c in CLASSES if c != "other")
BAND = (0.1, 0.9)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def branch_of(labels: np.ndarray, tree, population: str) -> np.ndarray:
    """For each cell, the child of ``population`` its gate label went through ('' if none)."""
    paths = tree.leaf_paths()
    lookup = {}
    for label, ps in paths.items():
        for p in ps:
            if population in p and p.index(population) + 1 < len(p):
                lookup.setdefault(label, p[p.index(population) + 1])
    return np.array([lookup.get(v, "") for v in labels], dtype=object)


def ambiguity(
    cells: pd.DataFrame, tree, features: dict[str, str], *, band: tuple[float, float] = BAND
) -> dict[str, Any]:
    """Pairwise-channel linear separability of the gated branches (see the module docstring)."""
    labels = cells["gate_label"].to_numpy(object)
    pairs = []
    in_band = np.zeros(len(cells), bool)
    considered = np.zeros(len(cells), bool)
    for pop in tree.internal():
        markers = [m for m in tree.deciding_markers(pop) if features.get(m) in cells]
        branch = branch_of(labels, tree, pop)
        kids = [k for k in np.unique(branch) if k]
        for m1, m2 in itertools.combinations(markers, 2):
            x = np.log1p(np.clip(cells[[features[m1], features[m2]]].to_numpy(float), 0, None))
            for a, b in itertools.combinations(kids, 2):
                sel = np.isin(branch, (a, b))
                if sel.sum() < 20 or min((branch == a).sum(), (branch == b).sum()) < 5:
                    continue
                xs = x[sel]
                mu, sd = xs.mean(0), xs.std(0) + 1e-9
                y = (branch[sel] == b).astype(float)
                w = _logistic((xs - mu) / sd, y, ridge=1e-2)
                p = _sigmoid(np.hstack([(xs - mu) / sd, np.ones((len(xs), 1))]) @ w)
                amb = (p > band[0]) & (p < band[1])
                idx = np.flatnonzero(sel)
                in_band[idx[amb]] = True
                considered[idx] = True
                acc = float(np.mean((p > 0.5) == (y > 0.5)))
                pairs.append({"population": pop, "channels": [m1, m2], "classes": [a, b],
                              "cells": int(sel.sum()), "ambiguous_fraction": round(float(amb.mean()), 5),
                              "accuracy": round(acc, 4), "weights": [round(float(v), 4) for v in w]})  # fmt: skip
    total = int(considered.sum())
    return {
        "band": list(band),
        "pairs": pairs,
        "cells": total,
        "ambiguous_cells": int(in_band.sum()),
        "ambiguous_fraction": round(float(in_band.sum() / total), 5) if total else None,
        "paper_fraction": 0.0051,
    }


def remove_spatial_trend(values: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``values`` ``(N,)`` intensities with the plane ``log1p(v) ~ a + b x + c y`` fitted over
    the cells at ``x, y`` (px) divided out, on the original scale: ``log1p`` of the result is
    ``log1p(values)`` minus the fitted trend (its mean kept). A penetration gradient dims every
    cell on one side of the tissue; without this the cells an attenuated stain hid would differ
    from the labelled ones in their nuclear stain as well."""
    v = np.log1p(np.clip(np.asarray(values, np.float64), 0, None))
    ok = np.isfinite(v)
    if ok.sum() < 10:
        return np.asarray(values, np.float64)
    xy = np.column_stack([x, y]).astype(np.float64)
    xy = (xy - xy[ok].mean(0)) / (xy[ok].std(0) + 1e-9)
    a = np.column_stack([np.ones(len(v)), xy])
    beta, *_ = np.linalg.lstsq(a[ok], v[ok], rcond=None)
    return np.expm1(v - a[:, 1:] @ beta[1:])


def pu_estimate(
    cells: pd.DataFrame, feature_columns: list[str], *, seed: int = 0
) -> dict[str, Any]:
    """Hidden immune cells among the cells not labelled immune (``other``, ``ambiguous``,
    ``unlabeled``): Elkan–Noto on ``feature_columns`` (``log1p`` except the shape ratios
    eccentricity and solidity)."""
    labelled = cells["gate_label"].isin(IMMUNE).to_numpy()
    cols = [c for c in feature_columns if c in cells]
    x = cells[cols].to_numpy(float)
    logged = [c not in ("eccentricity", "solidity") for c in cols]
    x[:, logged] = np.log1p(np.clip(x[:, logged], 0, None))
    est = estimate_prior(x, labelled, seed=seed)
    return {
        "features": cols,
        "labelled": labelled,
        "labelled_immune": int(labelled.sum()),
        "not_labelled_immune": int((~labelled).sum()),
        "hidden_immune_estimate": round(est["hidden"], 1),
        "prior": round(est["prior"], 4),
        "c": round(est["c"], 4) if np.isfinite(est["c"]) else None,
    }


def gradient_audit(
    x: np.ndarray, y: np.ndarray, values: np.ndarray, *, min_cells: int = 50
) -> dict[str, Any] | None:
    """Linear trend of ``log1p(values)`` with position (µm): F-test p-value, the direction, and
    the fold change the fit implies between the 5th and 95th percentile of position along it."""
    ok = np.isfinite(values) & (values > 0)
    if ok.sum() < min_cells:
        return None
    x, y, v = x[ok], y[ok], np.log1p(values[ok])
    X = np.column_stack([np.ones(len(x)), x - x.mean(), y - y.mean()])
    beta, *_ = np.linalg.lstsq(X, v, rcond=None)
    resid = v - X @ beta
    rss1 = float(resid @ resid)
    rss0 = float(((v - v.mean()) ** 2).sum())
    n = len(v)
    f = ((rss0 - rss1) / 2) / max(rss1 / (n - 3), 1e-12)
    p = float(stats.f.sf(f, 2, n - 3))
    g = np.hypot(beta[1], beta[2])
    direction = (beta[1:] / g) if g > 0 else np.array([1.0, 0.0])
    along = (x - x.mean()) * direction[0] + (y - y.mean()) * direction[1]
    span = float(np.percentile(along, 95) - np.percentile(along, 5))
    fold = float(np.exp(g * span))
    return {"cells": int(n), "f": round(float(f), 2), "p": p, "fold_change": round(fold, 3),
            "direction": [round(float(d), 3) for d in direction], "r2": round(1 - rss1 / max(rss0, 1e-12), 4)}  # fmt: skip


def subpopulation_audit(
    child_positive: np.ndarray, parent_negative: np.ndarray, *, tolerated: float = 0.05
) -> dict[str, Any]:
    """Among ``child_positive`` cells, the fraction with ``parent_negative``; one-sided binomial
    test against ``tolerated``."""
    n = int(child_positive.sum())
    k = int((child_positive & parent_negative).sum())
    p = float(stats.binomtest(k, n, tolerated, alternative="greater").pvalue) if n else 1.0
    return {"child_positive": n, "failing_parent": k, "fraction": round(k / n, 4) if n else None,
            "tolerated": tolerated, "p": p}  # fmt: skip


def rate_audit(
    is_class: np.ndarray, nuisance: np.ndarray, *, bins: int = 5, split: float | None = None
) -> dict[str, Any] | None:
    """Label rate over quantile bins of ``nuisance`` (or two groups, ``nuisance > split``):
    chi-square test of independence and the ratio of the highest to the lowest group rate."""
    ok = np.isfinite(nuisance)
    if ok.sum() < 100 or is_class[ok].sum() < 5:
        return None
    v, c = nuisance[ok], is_class[ok]
    if split is not None:
        b = (v > split).astype(np.int64)
        edges = [float(v.min()), split, float(v.max())]
    else:
        edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)))
        if len(edges) < 3:
            return None
        b = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2)
    k = len(edges) - 1
    pos = np.bincount(b, weights=c.astype(float), minlength=k)
    tot = np.bincount(b, minlength=k).astype(float)
    if (tot == 0).any():
        return None
    table = np.vstack([pos, tot - pos])
    chi2, p, *_ = stats.chi2_contingency(table + 0.5)
    rate = pos / tot
    return {"bins": [round(float(e), 3) for e in edges], "cells": tot.astype(int).tolist(),
            "rate": [round(float(r), 4) for r in rate], "chi2": round(float(chi2), 2), "p": float(p),
            "ratio": round(float(rate.max() / rate.min()), 3) if rate.min() > 0 else None}  # fmt: skip
