"""Segmentation and detection metrics as pure functions (no IO).

Instance label images are integer arrays of the same shape, 0 = background, one id per
object. Overlaps are counted once from the joint histogram of the two label images, so
every metric is vectorised over objects and pixels.

- :func:`match_instances` — the overlap table (``truth id``, ``pred id``, intersection) plus
  object areas.
- :func:`object_dice` — object-level Dice (Sirinukunwattana et al. 2017).
- :func:`aggregated_jaccard` — AJI (Kumar et al. 2017).
- :func:`panoptic_quality` — PQ = SQ x DQ with unique matching at IoU > 0.5 (Kirillov et al.).
- :func:`detection_by_iou` — precision/recall/F1 with matches at IoU >= ``thresh``.
- :func:`detection_by_distance` — precision/recall/F1 with one-to-one matches of centroids
  within ``radius`` (optimal assignment per connected group), per class when given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class Overlaps:
    """Pairwise intersections of two label images.

    ``truth_ids``/``pred_ids``: the object ids present (sorted); ``truth_area``/``pred_area``
    their pixel counts; ``pairs`` ``(K, 2)`` indices into those id arrays of every overlapping
    pair and ``inter`` ``(K,)`` their intersection areas.
    """

    truth_ids: np.ndarray
    pred_ids: np.ndarray
    truth_area: np.ndarray
    pred_area: np.ndarray
    pairs: np.ndarray
    inter: np.ndarray

    @property
    def iou(self) -> np.ndarray:
        union = self.truth_area[self.pairs[:, 0]] + self.pred_area[self.pairs[:, 1]] - self.inter
        return self.inter / np.maximum(union, 1)


def _check(truth: np.ndarray, pred: np.ndarray) -> None:
    if truth.shape != pred.shape:
        raise ValueError(
            f"`truth` (shape {truth.shape}) and `pred` (shape {pred.shape}) must have the same shape"
        )


def match_instances(truth: np.ndarray, pred: np.ndarray) -> Overlaps:
    """Overlap table of two instance label images (see :class:`Overlaps`)."""
    _check(truth, pred)
    t = np.asarray(truth).ravel()
    p = np.asarray(pred).ravel()
    truth_ids, t_inv, truth_area = np.unique(t, return_inverse=True, return_counts=True)
    pred_ids, p_inv, pred_area = np.unique(p, return_inverse=True, return_counts=True)
    both = (t > 0) & (p > 0)
    key = t_inv[both].astype(np.int64) * len(pred_ids) + p_inv[both]
    uniq, inter = np.unique(key, return_counts=True)
    pairs = np.stack([uniq // len(pred_ids), uniq % len(pred_ids)], axis=1)
    # drop the background entries (id 0) from the id lists, re-indexing the pairs
    t_keep = truth_ids > 0
    p_keep = pred_ids > 0
    t_map = np.cumsum(t_keep) - 1
    p_map = np.cumsum(p_keep) - 1
    pairs = np.stack([t_map[pairs[:, 0]], p_map[pairs[:, 1]]], axis=1).reshape(-1, 2)
    return Overlaps(
        truth_ids=truth_ids[t_keep],
        pred_ids=pred_ids[p_keep],
        truth_area=truth_area[t_keep],
        pred_area=pred_area[p_keep],
        pairs=pairs,
        inter=inter,
    )


def _best_partner(
    n: int, idx: np.ndarray, other: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n`` objects, the partner with the highest ``score`` (-1 if none)."""
    best = np.full(n, -1, np.int64)
    best_score = np.full(n, -np.inf)
    order = np.lexsort((-score, idx))  # by object, best score first
    first = np.ones(len(order), bool)
    first[1:] = idx[order][1:] != idx[order][:-1]
    sel = order[first]
    best[idx[sel]] = other[sel]
    best_score[idx[sel]] = score[sel]
    return best, best_score


def object_dice(truth: np.ndarray, pred: np.ndarray, ov: Overlaps | None = None) -> float:
    """Object-level Dice: area-weighted Dice of each object with its most overlapping partner,
    averaged over the truth side and the prediction side. 1 = perfect, 0 = no overlap."""
    ov = ov or match_instances(truth, pred)
    nt, n_p = len(ov.truth_ids), len(ov.pred_ids)
    if nt == 0 and n_p == 0:
        return 1.0
    if nt == 0 or n_p == 0 or len(ov.pairs) == 0:
        return 0.0
    t, p = ov.pairs[:, 0], ov.pairs[:, 1]
    dice = 2 * ov.inter / (ov.truth_area[t] + ov.pred_area[p])
    # partner = maximum intersection (the definition), its Dice counted
    bt, _ = _best_partner(nt, t, np.arange(len(t)), ov.inter.astype(float))
    bp, _ = _best_partner(n_p, p, np.arange(len(p)), ov.inter.astype(float))
    dt = np.where(bt >= 0, dice[np.maximum(bt, 0)], 0.0)
    dp = np.where(bp >= 0, dice[np.maximum(bp, 0)], 0.0)
    wt = ov.truth_area / ov.truth_area.sum()
    wp = ov.pred_area / ov.pred_area.sum()
    return float(0.5 * (np.sum(wt * dt) + np.sum(wp * dp)))


def aggregated_jaccard(truth: np.ndarray, pred: np.ndarray, ov: Overlaps | None = None) -> float:
    """Aggregated Jaccard Index: each truth object with its best-IoU prediction; predictions
    never chosen add their whole area to the union."""
    ov = ov or match_instances(truth, pred)
    nt, n_p = len(ov.truth_ids), len(ov.pred_ids)
    if nt == 0 and n_p == 0:
        return 1.0
    t, p = ov.pairs[:, 0], ov.pairs[:, 1]
    iou = ov.iou
    best, _ = _best_partner(nt, t, np.arange(len(t)), iou)
    has = best >= 0
    inter = ov.inter[best[has]].sum()
    union = (ov.truth_area[has] + ov.pred_area[p[best[has]]] - ov.inter[best[has]]).sum()
    union += ov.truth_area[~has].sum()
    used = np.zeros(n_p, bool)
    used[p[best[has]]] = True
    union += ov.pred_area[~used].sum()
    return float(inter / union) if union else 0.0


@dataclass(frozen=True)
class Detection:
    """Detection counts and scores."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else 1.0

    def as_dict(self) -> dict[str, float]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
        }


def _iou_matches(ov: Overlaps, thresh: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches with IoU >= thresh (optimal assignment; unique when thresh > 0.5)."""
    iou = ov.iou
    ok = iou >= thresh
    if not ok.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    t, p, s = ov.pairs[ok, 0], ov.pairs[ok, 1], iou[ok]
    if thresh > 0.5:  # IoU > 0.5 matches are unique already
        return t, p, s
    return _assign(t, p, -s, len(ov.truth_ids), len(ov.pred_ids))


def _assign(
    t: np.ndarray, p: np.ndarray, cost: np.ndarray, nt: int, n_p: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal one-to-one assignment on a sparse bipartite graph, solved per connected group."""
    graph = coo_matrix((np.ones(len(t)), (t, p + nt)), shape=(nt + n_p, nt + n_p))
    _, comp = connected_components(graph, directed=False)
    order = np.argsort(comp[t], kind="stable")
    t, p, cost = t[order], p[order], cost[order]
    groups = np.split(np.arange(len(t)), np.flatnonzero(np.diff(comp[t])) + 1)
    out_t, out_p, out_c = [], [], []
    for g in groups:
        if len(g) == 1:
            out_t.append(t[g])
            out_p.append(p[g])
            out_c.append(cost[g])
            continue
        ut, ti = np.unique(t[g], return_inverse=True)
        up, pi = np.unique(p[g], return_inverse=True)
        big = 1e9
        m = np.full((len(ut), len(up)), big)
        m[ti, pi] = cost[g]
        r, c = linear_sum_assignment(m)
        keep = m[r, c] < big
        out_t.append(ut[r[keep]])
        out_p.append(up[c[keep]])
        out_c.append(m[r[keep], c[keep]])
    if not out_t:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(out_t), np.concatenate(out_p), -np.concatenate(out_c)


def detection_by_iou(
    truth: np.ndarray, pred: np.ndarray, *, thresh: float = 0.5, ov: Overlaps | None = None
) -> Detection:
    """Detection counts with one-to-one matches at IoU >= ``thresh``."""
    ov = ov or match_instances(truth, pred)
    t, _, _ = _iou_matches(ov, thresh)
    tp = len(t)
    return Detection(tp=tp, fp=len(ov.pred_ids) - tp, fn=len(ov.truth_ids) - tp)


def panoptic_quality(
    truth: np.ndarray, pred: np.ndarray, ov: Overlaps | None = None
) -> dict[str, float]:
    """PQ, SQ (mean IoU of matches) and DQ (F1 of matches), matches at IoU > 0.5."""
    ov = ov or match_instances(truth, pred)
    iou = ov.iou
    ok = iou > 0.5
    tp = int(ok.sum())
    fp = len(ov.pred_ids) - tp
    fn = len(ov.truth_ids) - tp
    sq = float(iou[ok].mean()) if tp else 0.0
    dq = tp / (tp + 0.5 * fp + 0.5 * fn) if (tp + fp + fn) else 1.0
    return {"pq": round(sq * dq, 4), "sq": round(sq, 4), "dq": round(dq, 4)}


def centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids and centroids ``(N, 2)`` as ``(x, y)`` of the objects of a label image."""
    flat = labels.ravel()
    ys, xs = np.divmod(np.arange(flat.size), labels.shape[1])
    if (
        flat.size
        and np.issubdtype(flat.dtype, np.integer)
        and 0 <= flat.min()
        and (flat.max() <= 4 * flat.size)
    ):  # ids index the bins directly: no sort of the image (the same sums, in pixel order)
        counts = np.bincount(flat)
        ids = np.flatnonzero(counts[1:]) + 1
        cx = np.bincount(flat, weights=xs)[ids] / counts[ids]
        cy = np.bincount(flat, weights=ys)[ids] / counts[ids]
        return ids.astype(flat.dtype), np.stack([cx, cy], axis=1)
    ids, inv, counts = np.unique(flat, return_inverse=True, return_counts=True)
    cx = np.bincount(inv, weights=xs) / counts
    cy = np.bincount(inv, weights=ys) / counts
    keep = ids > 0
    return ids[keep], np.stack([cx[keep], cy[keep]], axis=1)


def match_points(
    truth_xy: np.ndarray, pred_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of points within ``radius`` minimising total distance.

    Returns index arrays ``(i_truth, i_pred)`` of the matched pairs.
    """
    truth_xy = np.asarray(truth_xy, float).reshape(-1, 2)
    pred_xy = np.asarray(pred_xy, float).reshape(-1, 2)
    if len(truth_xy) == 0 or len(pred_xy) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sdm = cKDTree(truth_xy).sparse_distance_matrix(cKDTree(pred_xy), radius, output_type="ndarray")
    if len(sdm) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # A zero distance is not stored by the sparse matrix as "missing": add a tiny epsilon.
    t, p, _ = _assign(
        sdm["i"].astype(np.int64),
        sdm["j"].astype(np.int64),
        sdm["v"] + 1e-9,
        len(truth_xy),
        len(pred_xy),
    )
    return t, p


def detection_by_distance(
    truth_xy: np.ndarray,
    pred_xy: np.ndarray,
    *,
    radius: float,
    truth_class: np.ndarray | None = None,
    pred_class: np.ndarray | None = None,
) -> dict[str, object]:
    """Detection with centroid matches within ``radius`` (same units as the coordinates).

    With ``truth_class``, also the recall per truth class (was that class's object found at
    all?); with both class arrays, per-class precision/recall/F1 where a match counts for
    class ``c`` only if both sides say ``c``.
    """
    ti, pi = match_points(truth_xy, pred_xy, radius)
    n_t, n_p = len(np.asarray(truth_xy).reshape(-1, 2)), len(np.asarray(pred_xy).reshape(-1, 2))
    out: dict[str, object] = {"all": Detection(len(ti), n_p - len(ti), n_t - len(ti)).as_dict()}
    if truth_class is not None:
        truth_class = np.asarray(truth_class)
        found = np.zeros(n_t, bool)
        found[ti] = True
        out["recall_by_truth_class"] = {
            str(c): round(float(found[truth_class == c].mean()), 4) for c in np.unique(truth_class)
        }
        if pred_class is not None:
            pred_class = np.asarray(pred_class)
            per = {}
            for c in np.unique(np.concatenate([truth_class, pred_class])):
                tp = int(np.sum((truth_class[ti] == c) & (pred_class[pi] == c)))
                per[str(c)] = Detection(
                    tp, int(np.sum(pred_class == c)) - tp, int(np.sum(truth_class == c)) - tp
                ).as_dict()
            out["by_class"] = per
    return out


def segmentation_report(
    truth: np.ndarray, pred: np.ndarray, *, mpp: float = 1.0, radius_um: float = 4.0
) -> dict[str, object]:
    """Every metric of this module for one pair of label images."""
    ov = match_instances(truth, pred)
    _, txy = centroids(truth)
    _, pxy = centroids(pred)
    return {
        "n_truth": len(ov.truth_ids),
        "n_pred": len(ov.pred_ids),
        "object_dice": round(object_dice(truth, pred, ov), 4),
        "aji": round(aggregated_jaccard(truth, pred, ov), 4),
        **panoptic_quality(truth, pred, ov),
        "detection_iou50": detection_by_iou(truth, pred, thresh=0.5, ov=ov).as_dict(),
        f"detection_centroid_{radius_um:g}um": detection_by_distance(
            txy * mpp, pxy * mpp, radius=radius_um
        )["all"],
    }
