"""Choose the nucleus network's post-processing per slide, from its own test-time views.

The network's foreground, seed and score cut-offs (``nucleus_post.instances_from_maps``) are
tuned on annotated validation images, and each lab annotates (and stains) nuclei its own way:
cut-offs tuned on CoNSeP split GBM40's larger nuclei. A slide from a new lab has no annotation
to tune on, but it has the network's test-time views (the flips whose logits
``NucleusModel.maps`` averages). This module picks, on the slide's own tissue, the setting under
which the nuclei found in *each single view* best agree with those found in the averaged maps:
a setting that cuts where the network is unsure (a nucleus split in one view and whole in
another, a faint blob kept in one view only) disagrees with itself; one that follows the
network's stable structure does not.

Opt-in (``post_tuning: views`` in a model folder's ``config.json``): measured with each real
source left out of training, it lifts the GBM40 figures and lowers the CoNSeP ones (the table
is in the documentation's nucleus network page). Centroids are matched one-to-one within
:data:`RADIUS_UM`; arrays are ``(y, x)`` at one pixel size.
"""

from __future__ import annotations

import itertools

import numpy as np

from immunocto.segment.nucleus_post import instances_from_maps

#: The settings searched: foreground cut-off x seed cut-off x smallest mean object score.
FG = (0.4, 0.5, 0.6)
SEED = (0.3, 0.4, 0.5, 0.6, 0.7)
SCORE = (0.0, 0.7, 0.75, 0.8, 0.85)
#: Centroid match radius between a view's nuclei and the averaged maps' (µm).
RADIUS_UM = 1.5
#: Fewer nuclei than this in the samples (at the model's own setting): keep its setting.
MIN_NUCLEI = 60

Maps = tuple[np.ndarray, np.ndarray]  # (foreground, distance), (h, w) float each


def agreement(
    samples: list[tuple[Maps, list[Maps]]],
    *,
    mpp: float,
    min_area_px: float,
) -> dict[tuple[float, float, float], np.ndarray]:
    """Per setting ``(fg, seed, min_score)``: pooled ``[tp, fp, fn, n]`` of each view's nuclei
    matched to the averaged maps' nuclei (``n``: nuclei in the averaged maps).

    Parameters
    ----------
    samples : list of (combined, views)
        Per image: the averaged ``(foreground, distance)`` and each view's own pair, all on the
        same ``(h, w)`` grid (:meth:`NucleusModel.view_maps`).
    mpp : float
        Microns per pixel of the maps.
    min_area_px : float
        Smallest object kept (pixels of the maps).
    """
    from immunocto.validate.metrics import match_points

    out: dict[tuple[float, float, float], np.ndarray] = {}
    for (cfg, cdist), views in samples:
        maps = [(cfg, cdist), *views]
        for fg_t, seed_t in itertools.product(FG, SEED):
            objects = [
                _objects(
                    instances_from_maps(
                        f, d, fg_threshold=fg_t, seed_threshold=seed_t, min_area_px=min_area_px
                    ),
                    f,
                )
                for f, d in maps
            ]
            for smin in SCORE:
                # what drop_objects(..., min_score=smin) keeps, the same comparison
                pts = [xy[total >= smin * area] * mpp for xy, total, area in objects]
                acc = out.setdefault((fg_t, seed_t, smin), np.zeros(4))
                acc[3] += len(pts[0])
                for p in pts[1:]:
                    ti, _ = match_points(pts[0], p, RADIUS_UM)
                    acc[:3] += (len(ti), len(p) - len(ti), len(pts[0]) - len(ti))
    return out


def _objects(
    labels: np.ndarray, foreground: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroids ``(n, 2)`` as ``(x, y)``, summed ``foreground`` ``(n,)`` and area ``(n,)`` of
    the objects of a label image numbered 1..n."""
    from immunocto.validate.metrics import centroids

    n = int(labels.max())
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:].astype(float)
    total = np.bincount(flat, weights=foreground.ravel(), minlength=n + 1)[1:]
    return centroids(labels)[1].reshape(-1, 2), total, area


def choose(
    samples: list[tuple[Maps, list[Maps]]],
    *,
    mpp: float,
    min_area_px: float,
    default: dict[str, float],
) -> dict[str, float | bool]:
    """The setting whose single views agree best (F1) with the averaged maps.

    ``default`` holds the model's own ``fg_threshold``, ``seed_threshold`` and ``min_score``
    (tuned on its validation images); they stay when the views are identical (one view) or
    the samples hold fewer than :data:`MIN_NUCLEI` nuclei under them (too little to judge).

    Returns
    -------
    dict with ``fg_threshold``, ``seed_threshold``, ``min_score``, ``agreement`` (the view-F1
    of the choice; NaN when not tuned), ``nuclei`` (objects in the samples under the choice) and
    ``tuned`` (False when ``default`` was kept).
    """
    keep = {k: float(default[k]) for k in ("fg_threshold", "seed_threshold", "min_score")}
    if not samples or all(len(views) < 2 for _, views in samples):
        return {**keep, "agreement": float("nan"), "nuclei": 0.0, "tuned": False}
    table = agreement(samples, mpp=mpp, min_area_px=min_area_px)

    def f1(c: np.ndarray) -> float:
        return float(2 * c[0] / max(2 * c[0] + c[1] + c[2], 1.0))

    own = (keep["fg_threshold"], keep["seed_threshold"], keep["min_score"])
    n_own = table[own][3] if own in table else max(c[3] for c in table.values())
    if n_own < MIN_NUCLEI:
        return {**keep, "agreement": float("nan"), "nuclei": float(n_own), "tuned": False}
    # ties (rare) go to the earlier setting of the grid: deterministic
    best = max(table, key=lambda k: f1(table[k]))
    return {
        "fg_threshold": best[0],
        "seed_threshold": best[1],
        "min_score": best[2],
        "agreement": round(f1(table[best]), 5),
        "nuclei": float(table[best][3]),
        "tuned": True,
    }
