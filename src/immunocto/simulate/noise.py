"""Deterministic noise fields that can be evaluated at any point of the slide.

Tiles are rendered independently (and IF pixels are rendered at warped coordinates), so a
texture must be a *function of the slide position*, not the output of one random draw per
tile. We hash the integer lattice points ``(i, j)`` with a seed into values in [-1, 1] and
interpolate them with a cubic B-spline: the same point gives the same value whichever tile
asks, and two tiles meet without a seam.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_K_Y = np.uint64(0xC2B2AE3D27D4EB4F)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)

#: Standard deviation of a cubic-B-spline-smoothed lattice of U(-1, 1) values, measured
#: once; dividing by it gives noise with unit standard deviation.
_BSPLINE_STD = 0.2767


def hash_uniform(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Uniform values in [-1, 1) from integer lattice coordinates (splitmix64 finaliser).

    Parameters
    ----------
    ix, iy : int ndarrays (broadcastable)
        Lattice column and row.
    seed : int
        Field seed; different seeds give independent fields.

    Returns
    -------
    float32 ndarray
    """
    h = (
        ix.astype(np.uint64) * _M1
        ^ iy.astype(np.uint64) * _K_Y
        ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    )
    h = (h ^ (h >> _S30)) * _M2
    h = (h ^ (h >> _S27)) * _M3
    h = h ^ (h >> _S31)
    return ((h >> np.uint64(40)).astype(np.float32) / np.float32(2**23)) - np.float32(1.0)


def lattice_noise(x: np.ndarray, y: np.ndarray, *, scale: float, seed: int) -> np.ndarray:
    """Smooth value noise with unit standard deviation, evaluated at ``(x, y)``.

    Parameters
    ----------
    x, y : float ndarrays of the same shape
        Positions in level-0 H&E pixels (``x`` = column, ``y`` = row).
    scale : float
        Lattice spacing in pixels (the correlation length of the field).
    seed : int

    Returns
    -------
    float32 ndarray, same shape as ``x``
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.size == 0:
        return np.zeros(x.shape, np.float32)
    gx = x / scale
    gy = y / scale
    span = (np.ptp(gx) + 6) * (np.ptp(gy) + 6)
    if span > 16 * x.size + 4096:
        # Scattered points over a large area (e.g. one value per cell): evaluate the 4x4
        # lattice neighbourhood of each point instead of materialising the lattice.
        return (_bspline_at_points(gx, gy, seed) / _BSPLINE_STD).astype(np.float32)
    # Lattice window covering the points, with the 2 extra nodes the cubic kernel reads.
    x0 = int(np.floor(gx.min())) - 2
    y0 = int(np.floor(gy.min())) - 2
    x1 = int(np.floor(gx.max())) + 3
    y1 = int(np.floor(gy.max())) + 3
    ix = np.arange(x0, x1 + 1, dtype=np.int64)[None, :]
    iy = np.arange(y0, y1 + 1, dtype=np.int64)[:, None]
    lattice = hash_uniform(ix, iy, seed)
    coords = np.stack([(gy - y0).ravel(), (gx - x0).ravel()])
    out = ndimage.map_coordinates(lattice, coords, order=3, prefilter=False, mode="nearest")
    return (out.reshape(x.shape) / _BSPLINE_STD).astype(np.float32)


def _bspline_weights(t: np.ndarray) -> list[np.ndarray]:
    t2 = t * t
    t3 = t2 * t
    return [(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6]


def _bspline_at_points(gx: np.ndarray, gy: np.ndarray, seed: int) -> np.ndarray:
    """Cubic B-spline of the hashed lattice at lattice coordinates ``(gx, gy)``."""
    fx = np.floor(gx)
    fy = np.floor(gy)
    wx = _bspline_weights(gx - fx)
    wy = _bspline_weights(gy - fy)
    ix = fx.astype(np.int64)
    iy = fy.astype(np.int64)
    out = np.zeros(gx.shape, np.float64)
    for j in range(4):
        row = np.zeros(gx.shape, np.float64)
        for i in range(4):
            row += wx[i] * hash_uniform(ix + (i - 1), iy + (j - 1), seed)
        out += wy[j] * row
    return out


def _bspline_matrix(g: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense ``(len(g), n_nodes)`` B-spline weight matrix for lattice coordinates ``g``
    (sorted or not), and the index of its first lattice node."""
    f = np.floor(g).astype(np.int64)
    first = int(f.min()) - 1
    n_nodes = int(f.max()) - first + 3
    weights = _bspline_weights(g - f)
    mat = np.zeros((g.size, n_nodes), np.float32)
    rows = np.arange(g.size)
    for k in range(4):
        mat[rows, f - first + k - 1] = weights[k]
    return mat, first


def lattice_noise_grid(xs: np.ndarray, ys: np.ndarray, *, scale: float, seed: int) -> np.ndarray:
    """:func:`lattice_noise` on the regular grid ``ys x xs`` (separable, fast).

    Parameters
    ----------
    xs : (w,) float ndarray
        Column positions (level-0 px).
    ys : (h,) float ndarray
        Row positions (level-0 px).

    Returns
    -------
    (h, w) float32 ndarray, equal to ``lattice_noise(*np.meshgrid(xs, ys), ...)``
    """
    wx, fx = _bspline_matrix(np.asarray(xs, np.float64) / scale)
    wy, fy = _bspline_matrix(np.asarray(ys, np.float64) / scale)
    ix = np.arange(fx, fx + wx.shape[1], dtype=np.int64)[None, :]
    iy = np.arange(fy, fy + wy.shape[1], dtype=np.int64)[:, None]
    lattice = hash_uniform(ix, iy, seed)
    return (wy @ lattice @ wx.T) / np.float32(_BSPLINE_STD)


def fbm(
    x: np.ndarray, y: np.ndarray, *, scale: float, seed: int, octaves: int = 3, gain: float = 0.5
) -> np.ndarray:
    """Fractal sum of :func:`lattice_noise` octaves (scale halves each octave).

    Normalised to unit standard deviation. Shapes and coordinates as in
    :func:`lattice_noise`.
    """
    total = np.zeros(np.shape(x), np.float32)
    norm = 0.0
    amp = 1.0
    for k in range(octaves):
        total += np.float32(amp) * lattice_noise(x, y, scale=scale / 2**k, seed=seed + 7919 * k)
        norm += amp**2
        amp *= gain
    return total / np.float32(np.sqrt(norm))


def smooth_grid_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """White noise on a grid, Gaussian-smoothed with ``sigma`` grid cells, zero mean, unit std."""
    field = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect"
    )
    field -= field.mean()
    std = float(field.std())
    return field / (std if std > 0 else 1.0)
