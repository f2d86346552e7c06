"""Per-object morphology of an instance label image, vectorised over objects.

Moments (area, centroid, axes, eccentricity) come from one pass of ``np.bincount`` over all
pixels; bounding boxes from ``ndimage.find_objects``; only the convex hull (for solidity) is
computed per object, on the object's pixel coordinates.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError


def object_features(
    labels: np.ndarray, *, x0: int = 0, y0: int = 0, hulls: bool = True
) -> dict[str, np.ndarray]:
    """Morphology of objects ``1..labels.max()`` (absent ids get area 0).

    Parameters
    ----------
    labels : (h, w) int ndarray
    x0, y0 : int
        Offset added to coordinates (the window's position on the slide, level-0 px).
    hulls : bool
        Compute ``solidity`` (one convex hull per object, the costly part); when ``False`` it
        is NaN and :func:`solidity` can fill it in for the objects one keeps.

    Returns
    -------
    dict of (n,) arrays: ``label``, ``area_px``, ``x``, ``y`` (centroid), ``bbox_x0``,
    ``bbox_y0``, ``bbox_x1``, ``bbox_y1`` (half-open), ``major_axis_px``, ``minor_axis_px``,
    ``eccentricity``, ``solidity``.
    """
    n = int(labels.max()) if labels.size else 0
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    area = np.bincount(ids, minlength=n + 1).astype(np.float64)
    safe = np.maximum(area, 1)
    sx = np.bincount(ids, xs, minlength=n + 1)
    sy = np.bincount(ids, ys, minlength=n + 1)
    cx = sx / safe
    cy = sy / safe
    dx = xs - cx[ids]
    dy = ys - cy[ids]
    mu20 = np.bincount(ids, dx * dx, minlength=n + 1) / safe
    mu02 = np.bincount(ids, dy * dy, minlength=n + 1) / safe
    mu11 = np.bincount(ids, dx * dy, minlength=n + 1) / safe
    # eigenvalues of the covariance (as skimage's regionprops)
    root = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    l1 = (mu20 + mu02) / 2 + root
    l2 = np.maximum((mu20 + mu02) / 2 - root, 0)
    bbox = np.zeros((n + 1, 4), np.int64)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None:
            bbox[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    solid = np.ones(n + 1)
    if hulls:
        solid[1:] = _hull_solidity(xs, ys, ids, area, np.arange(1, n + 1))
    else:
        solid[:] = np.nan
    sel = slice(1, n + 1)
    return {
        "label": np.arange(1, n + 1),
        "area_px": area[sel].astype(np.int64),
        "x": cx[sel] + x0,
        "y": cy[sel] + y0,
        "bbox_x0": bbox[sel, 0] + x0,
        "bbox_y0": bbox[sel, 1] + y0,
        "bbox_x1": bbox[sel, 2] + x0,
        "bbox_y1": bbox[sel, 3] + y0,
        "major_axis_px": 4 * np.sqrt(l1[sel]),
        "minor_axis_px": 4 * np.sqrt(l2[sel]),
        "eccentricity": np.sqrt(np.clip(1 - l2[sel] / np.maximum(l1[sel], 1e-12), 0, 1)),
        "solidity": solid[sel],
    }


def solidity(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Solidity (area over convex-hull area) of the objects ``ids`` of ``labels``, in that
    order: the same values :func:`object_features` gives."""
    ids = np.asarray(ids, np.int64)
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    area = np.bincount(lab, minlength=int(labels.max(initial=0)) + 1).astype(np.float64)
    return _hull_solidity(xs, ys, lab, area, ids)


def _hull_solidity(
    xs: np.ndarray, ys: np.ndarray, ids: np.ndarray, area: np.ndarray, wanted: np.ndarray
) -> np.ndarray:
    """Per ``wanted`` object: area / pixels inside the convex hull of its pixel centres (Qhull,
    one call per object; 1 for tiny or collinear objects)."""
    out = np.ones(len(wanted))
    if not len(wanted):
        return out
    n = len(area) - 1
    order = np.argsort(ids, kind="stable")
    starts = np.searchsorted(ids[order], np.arange(n + 2))
    for k, i in enumerate(wanted):
        a, b = starts[i], starts[i + 1]
        if b - a < 4:
            continue
        pts = np.stack([xs[order[a:b]], ys[order[a:b]]], axis=1)
        try:
            hull = ConvexHull(pts)
        except QhullError:  # collinear pixels: a line is its own hull
            continue
        # pixels inside the hull of pixel centres, by Pick's theorem (interior + boundary)
        hull_pixels = hull.volume + hull.area / 2 + 1
        out[k] = min(area[i] / hull_pixels, 1.0)
    return out
