"""Typed cell detection against truth points, and the size + darkness baseline.

- :func:`typed_detection` — one-to-one centroid matching within ``radius`` (µm); per class,
  a predicted cell is a true positive only when it matched a true cell of the same class.
  Grouped scores: ``lymphocyte`` (cd4_t ∪ cd8_t ∪ b_cell: a CD4⁺ T called CD8⁺ still counts)
  and ``macrophage``.
- :func:`evaluate_tables` — the same on a prediction table (``pred_label``) and a truth
  table (``x``, ``y``, ``class``) as Parquet files.
- :class:`SizeDarknessBaseline` — a per-class Gaussian (quadratic discriminant) classifier on
  two numbers per nucleus, ``log(area)`` and mean grey level inside the mask: what a model
  that only measures nuclear size and darkness can do, so a model's gain is visible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from immunocto.validate.metrics import detection_by_distance

GROUPS: dict[str, tuple[str, ...]] = {
    "lymphocyte": ("cd4_t", "cd8_t", "b_cell"),
    "macrophage": ("macrophage",),
}


def _group(labels: np.ndarray, members: tuple[str, ...], name: str) -> np.ndarray:
    return np.where(np.isin(labels, members), name, "rest")


def typed_detection(
    truth_xy: np.ndarray,
    truth_class: np.ndarray,
    pred_xy: np.ndarray,
    pred_class: np.ndarray,
    *,
    radius: float = 4.0,
    groups: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, object]:
    """Detection scores (``precision``, ``recall``, ``f1``, counts) overall, per class and per
    group. Coordinates in µm (or any unit shared with ``radius``)."""
    groups = GROUPS if groups is None else groups
    truth_class = np.asarray(truth_class).astype(str)
    pred_class = np.asarray(pred_class).astype(str)
    out = detection_by_distance(
        truth_xy, pred_xy, radius=radius, truth_class=truth_class, pred_class=pred_class
    )
    out["groups"] = {}
    for name, members in groups.items():
        g = detection_by_distance(
            truth_xy,
            pred_xy,
            radius=radius,
            truth_class=_group(truth_class, members, name),
            pred_class=_group(pred_class, members, name),
        )
        out["groups"][name] = g["by_class"].get(
            name, {"tp": 0, "fp": 0, "fn": 0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
        )
    return out


def evaluate_tables(
    truth: str | os.PathLike[str],
    pred: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    radius_um: float = 4.0,
    label_column: str = "pred_label",
    truth_column: str = "class",
) -> dict[str, object]:
    """:func:`typed_detection` of two Parquet tables with ``x``, ``y`` in level-0 px (the
    pixel size comes from the prediction table's ``x_um`` column unless ``mpp`` is given)."""
    import pyarrow.parquet as pq

    from immunocto.errors import InputFileError

    t = pq.read_table(truth).to_pandas()
    p = pq.read_table(pred).to_pandas()
    for df, path, col in ((t, truth, truth_column), (p, pred, label_column)):
        missing = [c for c in ("x", "y", col) if c not in df.columns]
        if missing:
            raise InputFileError(f"{path}: no column(s) {', '.join(missing)}")
    if mpp is None:
        if "x_um" not in p.columns or not (p["x"] > 0).any():
            raise InputFileError(
                f"{pred}: no x_um column to take the pixel size from; give `mpp`",
                arguments=("mpp",),
            )
        nz = p["x"] > 0
        mpp = float(np.median(p.loc[nz, "x_um"] / p.loc[nz, "x"]))
    res = typed_detection(
        t[["x", "y"]].to_numpy() * mpp,
        t[truth_column].to_numpy(),
        p[["x", "y"]].to_numpy() * mpp,
        p[label_column].to_numpy(),
        radius=radius_um,
    )
    res["mpp"] = mpp
    res["radius_um"] = radius_um
    return res


@dataclass
class SizeDarknessBaseline:
    """Gaussian class-conditional model on ``(log area, grey)``; ``fit`` then ``predict``."""

    classes: list[str] = field(default_factory=list)
    means: np.ndarray | None = None
    covs: np.ndarray | None = None
    log_prior: np.ndarray | None = None

    @staticmethod
    def features(area: np.ndarray, grey: np.ndarray) -> np.ndarray:
        return np.column_stack([np.log(np.maximum(np.asarray(area, float), 1.0)), grey])

    def fit(self, area: np.ndarray, grey: np.ndarray, labels: np.ndarray) -> SizeDarknessBaseline:
        x = self.features(area, grey)
        labels = np.asarray(labels).astype(str)
        self.classes = sorted(set(labels.tolist()))
        means, covs, priors = [], [], []
        for c in self.classes:
            xc = x[labels == c]
            means.append(xc.mean(0))
            cov = np.cov(xc.T) if len(xc) > 2 else np.eye(2)
            covs.append(cov + 1e-3 * np.eye(2) * np.trace(cov + np.eye(2)) / 2)
            priors.append(len(xc) / len(x))
        self.means, self.covs = np.array(means), np.array(covs)
        self.log_prior = np.log(np.array(priors))
        return self

    def log_likelihood(self, area: np.ndarray, grey: np.ndarray) -> np.ndarray:
        """``(N, K)`` log posterior up to a constant."""
        x = self.features(area, grey)
        out = np.empty((len(x), len(self.classes)))
        for k in range(len(self.classes)):
            d = x - self.means[k]
            inv = np.linalg.inv(self.covs[k])
            out[:, k] = (
                -0.5 * np.einsum("ni,ij,nj->n", d, inv, d)
                - 0.5 * np.log(np.linalg.det(self.covs[k]))
                + self.log_prior[k]
            )
        return out

    def predict(self, area: np.ndarray, grey: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[
            self.log_likelihood(area, grey).argmax(1)
        ].astype(str)
