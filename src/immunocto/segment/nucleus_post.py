"""Network maps -> nucleus instances: marker watershed on the predicted distance map.

All arrays are ``(y, x)`` images of one window at one resolution.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed


def instances_from_maps(
    foreground: np.ndarray,
    distance: np.ndarray,
    *,
    fg_threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_area_px: float = 8.0,
    min_seed_px: float = 2.0,
    min_score: float = 0.0,
) -> np.ndarray:
    """Instance labels from a foreground probability and a normalised distance map.

    Seeds are connected regions where ``distance > seed_threshold`` inside the foreground;
    each seed grows by watershed over ``-distance`` within ``foreground > fg_threshold``.
    A foreground component without any seed (a small or faint nucleus) becomes one object
    of its own rather than being lost. Objects under ``min_area_px`` are dropped, and so are
    objects whose mean foreground probability is under ``min_score`` (faint blobs: debris,
    out-of-focus stain; the main source of false nuclei on tissue the network never saw).

    Parameters
    ----------
    foreground : (h, w) float ndarray
        Nucleus probability in [0, 1].
    distance : (h, w) float ndarray
        Predicted normalised distance to the nucleus edge in [0, 1].
    fg_threshold, seed_threshold : float
        Cut-offs on the two maps.
    min_area_px : float
        Smallest object kept (pixels at this resolution).
    min_seed_px : float
        Smaller seeds are ignored (noise in the distance map).
    min_score : float
        Smallest mean foreground probability of a kept object (0 keeps all).

    Returns
    -------
    (h, w) int32 ndarray, 0 = background, objects 1..n (consecutive)
    """
    if foreground.shape != distance.shape or foreground.ndim != 2:
        raise ValueError(
            f"`foreground` {foreground.shape} and `distance` {distance.shape} must be the "
            "same 2-D shape"
        )
    mask = foreground > fg_threshold
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    seeds, n_seeds = ndi.label(mask & (distance > seed_threshold))
    if n_seeds:
        seed_size = np.bincount(seeds.ravel(), minlength=n_seeds + 1)
        seed_size[0] = 0
        keep = seed_size >= min_seed_px
        relabel = np.zeros(n_seeds + 1, np.int32)
        relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        seeds = relabel[seeds]
        n_seeds = int(keep.sum())
    # foreground components that hold no seed get one (their whole component)
    comps, n_comps = ndi.label(mask)
    has_seed = np.zeros(n_comps + 1, bool)
    has_seed[np.unique(comps[seeds > 0])] = True
    orphan = ~has_seed
    orphan[0] = False
    if orphan.any():
        extra = np.zeros(n_comps + 1, np.int32)
        extra[orphan] = n_seeds + np.arange(1, int(orphan.sum()) + 1, dtype=np.int32)
        seeds = np.where(seeds > 0, seeds, extra[comps])
    labels = watershed(-distance.astype(np.float32), seeds, mask=mask).astype(np.int32)
    return drop_objects(labels, foreground, min_area_px=min_area_px, min_score=min_score)


def drop_objects(
    labels: np.ndarray,
    foreground: np.ndarray,
    *,
    min_area_px: float = 0.0,
    min_score: float = 0.0,
) -> np.ndarray:
    """Labels ``(h, w)`` renumbered 1..m without the objects smaller than ``min_area_px``
    pixels or with mean ``foreground`` probability under ``min_score``."""
    n = int(labels.max())
    if n == 0:
        return labels
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)
    keep = area >= min_area_px
    if min_score > 0:
        total = np.bincount(flat, weights=foreground.ravel(), minlength=n + 1)
        keep &= total >= min_score * area
    keep[0] = False
    relabel = np.zeros(n + 1, np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return relabel[labels]


def type_probs_per_object(
    labels: np.ndarray, type_probs: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Type probabilities of each object: the mean probability over its pixels, times the
    per-type ``weights`` tuned on validation images when given (a prior correction), then
    normalised to sum to 1.

    Parameters
    ----------
    labels : (h, w) int ndarray, objects 1..n
    type_probs : (k, h, w) float ndarray
    weights : (k,) float array-like, optional

    Returns
    -------
    (n + 1, k) float64 ndarray; row 0 (background) and absent ids are all zeros
    """
    n = int(labels.max()) if labels.size else 0
    flat = labels.ravel()
    sums = np.stack(
        [np.bincount(flat, weights=p.ravel(), minlength=n + 1) for p in type_probs], axis=1
    )
    if weights is not None:
        sums = sums * np.asarray(weights, np.float64)[None, :]
    sums[0] = 0.0
    total = sums.sum(axis=1, keepdims=True)
    return np.divide(sums, total, out=np.zeros_like(sums), where=total > 0)


def type_per_object(
    labels: np.ndarray, type_probs: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Index of the most probable type of each object (the argmax of
    :func:`type_probs_per_object`).

    Returns
    -------
    (n + 1,) int ndarray; entry 0 (background) is -1
    """
    out = np.argmax(type_probs_per_object(labels, type_probs, weights), axis=1).astype(np.int64)
    out[0] = -1
    return out
