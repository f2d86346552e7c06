"""Positivity thresholds on log intensity: Otsu, three-class Otsu, a two-component Gaussian
mixture, or given.

All functions take and return values on the natural-log scale of the intensity feature.

``otsu3`` is for markers whose negatives form two groups: truly negative cells, and cells that
pick up a bright neighbour's signal at their edge (lateral spill: a macrophage's CD68-filled
cytoplasm wraps the lymphocytes around it). Two-class Otsu then cuts between the negatives and
the spill; the upper threshold of a three-class Otsu cuts above the spill.
"""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_multiotsu, threshold_otsu


def log_intensity(values: np.ndarray) -> np.ndarray:
    """Natural log of intensities, floored at 1 count (NaN stays NaN)."""
    return np.log(np.maximum(np.asarray(values, np.float64), 1.0))


def otsu_threshold(z: np.ndarray) -> float:
    """Otsu threshold of finite log values (the midpoint when they are all equal)."""
    z = z[np.isfinite(z)]
    if z.size == 0:
        return float("nan")
    if np.ptp(z) == 0:
        return float(z[0])
    return float(threshold_otsu(z, nbins=256))


def otsu3_threshold(z: np.ndarray) -> float:
    """Upper threshold of a three-class Otsu of finite log values (two-class Otsu when the
    values cannot support three classes)."""
    z = z[np.isfinite(z)]
    if z.size < 30 or len(np.unique(z)) < 3:
        return otsu_threshold(z)
    return float(threshold_multiotsu(z, classes=3, nbins=256)[1])


def gmm_threshold(z: np.ndarray, *, iterations: int = 200, tol: float = 1e-7) -> float:
    """Where the two components of a 1-D Gaussian mixture (EM, started from the Otsu split) are
    equally likely, between their means; Otsu when the data do not support two components."""
    z = z[np.isfinite(z)]
    t0 = otsu_threshold(z)
    if z.size < 10 or not np.isfinite(t0):
        return t0
    lo, hi = z[z <= t0], z[z > t0]
    if lo.size < 2 or hi.size < 2:
        return t0
    w = np.array([lo.size, hi.size], float) / z.size
    mu = np.array([lo.mean(), hi.mean()])
    var = np.array([max(lo.var(), 1e-6), max(hi.var(), 1e-6)])
    prev = -np.inf
    for _ in range(iterations):
        dens = w / np.sqrt(2 * np.pi * var) * np.exp(-((z[:, None] - mu) ** 2) / (2 * var))
        total = dens.sum(axis=1, keepdims=True) + 1e-300
        resp = dens / total
        ll = float(np.log(total).sum())
        nk = resp.sum(axis=0) + 1e-12
        w = nk / z.size
        mu = (resp * z[:, None]).sum(axis=0) / nk
        var = np.maximum((resp * (z[:, None] - mu) ** 2).sum(axis=0) / nk, 1e-6)
        if ll - prev < tol * abs(ll):
            break
        prev = ll
    order = np.argsort(mu)
    w, mu, var = w[order], mu[order], var[order]
    grid = np.linspace(mu[0], mu[1], 512)
    log_ratio = (np.log(w[1]) - 0.5 * np.log(var[1]) - (grid - mu[1]) ** 2 / (2 * var[1])) - (
        np.log(w[0]) - 0.5 * np.log(var[0]) - (grid - mu[0]) ** 2 / (2 * var[0])
    )
    crossing = np.flatnonzero(np.diff(np.sign(log_ratio)))
    return float(grid[crossing[0]]) if len(crossing) else t0


def estimate_threshold(z: np.ndarray, method: str) -> float:
    """Threshold of log values ``z`` by ``method`` (``otsu``, ``otsu3`` or ``gmm``)."""
    if method == "otsu":
        return otsu_threshold(z)
    if method == "otsu3":
        return otsu3_threshold(z)
    if method == "gmm":
        return gmm_threshold(z)
    raise ValueError(f"unknown threshold method {method!r} (otsu, otsu3, gmm, manual)")


def robust_scale(z: np.ndarray) -> float:
    """1.4826 x median absolute deviation of finite values (a standard deviation that ignores
    the other population's tail); at least 0.05 log units."""
    z = z[np.isfinite(z)]
    if z.size == 0:
        return 1.0
    return max(1.4826 * float(np.median(np.abs(z - np.median(z)))), 0.05)
