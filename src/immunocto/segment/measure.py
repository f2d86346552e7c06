"""Per-object morphology of an instance label image, vectorised over objects.

Moments (area, centroid, axes, eccentricity) come from one pass of ``np.bincount`` over all
pixels; bounding boxes from ``ndimage.find_objects``; convex hulls (for solidity) by a monotone
chain over the objects' row extremes, run for all objects at once (one numpy step per row of
the tallest object, not one Qhull call per object).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


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
    """Per ``wanted`` object: area / pixels inside the convex hull of its pixel centres (by
    Pick's theorem: hull area + perimeter / 2 + 1); 1 for objects under 4 pixels or on a line.

    ``xs, ys, ids`` are the foreground pixels in row-major order (as ``np.nonzero`` gives
    them). The hull of a pixel set is the hull of each row's leftmost and rightmost pixel; the
    left chain is the convex minorant of ``x_min(y)`` and the right chain the concave majorant
    of ``x_max(y)``, both built by Andrew's monotone chain for every object in parallel."""
    wanted = np.asarray(wanted, np.int64)
    out = np.ones(len(wanted))
    if not len(wanted) or not len(ids):
        return out
    ok = area[wanted] >= 4
    sel = np.zeros(len(area), bool)
    sel[wanted[ok]] = True
    keep = sel[ids]
    x, y, o = xs[keep].astype(np.int64), ys[keep].astype(np.int64), ids[keep].astype(np.int64)
    if not len(o):
        return out
    # row extremes: group pixels by (object, row); x ascends within a group (row-major input)
    key = o * (int(y.max()) + 1) + y
    order = np.argsort(key, kind="stable")
    key, x = key[order], x[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    last = np.r_[first[1:] - 1, len(key) - 1]
    row_obj, row_y = o[order][first], y[order][first]
    xl, xr = x[first].astype(np.float64), x[last].astype(np.float64)
    # objects' runs of rows (rows of one object are consecutive, ascending in y)
    objs, start, nrows = np.unique(row_obj, return_index=True, return_counts=True)
    yy = row_y.astype(np.float64)
    left = _chain(yy, xl, start, nrows, lower=True)
    right = _chain(yy, xr, start, nrows, lower=False)
    hull_area, perimeter = _polygon(yy, xl, xr, start, left, right)
    hull_pixels = hull_area + perimeter / 2 + 1
    solid = np.where(hull_area > 0, np.minimum(area[objs] / hull_pixels, 1.0), 1.0)
    pos = np.full(len(area), -1, np.int64)
    pos[objs] = np.arange(len(objs))
    got = pos[wanted]
    out[got >= 0] = solid[got[got >= 0]]
    return out


def _chain(
    u: np.ndarray, v: np.ndarray, start: np.ndarray, nrows: np.ndarray, *, lower: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Monotone chain over each object's points ``(u, v)[start : start + nrows]`` (``u``
    ascending): the lower (``v`` smallest) or upper hull. Returns ``(stack, size)``: per object
    the indices of its chain's points in ``stack[start : start + size]``."""
    stack = np.zeros(len(u), np.int64)
    size = np.zeros(len(start), np.int64)
    sign = 1.0 if lower else -1.0
    for k in range(int(nrows.max())):
        act = np.flatnonzero(nrows > k)
        p = start[act] + k
        # pop while the last two chain points and p do not turn the chain's way
        cand = act
        while len(cand):
            s, n = start[cand], size[cand]
            two = n >= 2
            cand, s, n = cand[two], s[two], n[two]
            if not len(cand):
                break
            a, b, q = stack[s + n - 2], stack[s + n - 1], start[cand] + k
            cross = (u[b] - u[a]) * (v[q] - v[a]) - (v[b] - v[a]) * (u[q] - u[a])
            bad = sign * cross <= 0
            cand = cand[bad]
            size[cand] -= 1
        stack[start[act] + size[act]] = p
        size[act] += 1
    return stack, size


def _polygon(
    u: np.ndarray, xl: np.ndarray, xr: np.ndarray, start: np.ndarray, left, right
) -> tuple[np.ndarray, np.ndarray]:
    """Area and perimeter per object of the polygon: the left chain downwards, then the right
    chain upwards (``(x, y)`` = ``(xl or xr, u)``)."""
    (ls, ln), (rs, rn) = left, right
    n_obj = len(start)
    owner_l = np.repeat(np.arange(n_obj), ln)
    owner_r = np.repeat(np.arange(n_obj), rn)
    rank_l = np.arange(len(owner_l)) - np.repeat(np.cumsum(ln) - ln, ln)
    rank_r = np.arange(len(owner_r)) - np.repeat(np.cumsum(rn) - rn, rn)
    li = ls[start[owner_l] + rank_l]
    ri = rs[start[owner_r] + (rn[owner_r] - 1 - rank_r)]  # reversed: bottom to top
    px = np.concatenate([xl[li], xr[ri]])
    py = np.concatenate([u[li], u[ri]])
    owner = np.concatenate([owner_l, owner_r])
    order = np.argsort(owner, kind="stable")  # left chain, then right chain, per object
    px, py, owner = px[order], py[order], owner[order]
    total = ln + rn
    first = np.cumsum(total) - total
    nxt = np.arange(len(px)) + 1
    ends = first + total - 1
    nxt[ends] = first  # close each polygon
    cross = px * py[nxt] - px[nxt] * py
    edge = np.hypot(px[nxt] - px, py[nxt] - py)
    hull_area = np.abs(np.bincount(owner, cross, minlength=n_obj)) / 2
    return hull_area, np.bincount(owner, edge, minlength=n_obj)
