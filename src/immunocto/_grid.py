"""Separable interpolation on regular grids (a few small matrix products instead of a
per-pixel interpolation), shared by the simulator and the registration."""

from __future__ import annotations

import numpy as np


def linear_matrix(g: np.ndarray, n_nodes: int) -> np.ndarray:
    """Dense bilinear weight matrix ``(len(g), n_nodes)`` for grid coordinates ``g``
    (clamped at the ends, like ``mode='nearest'``)."""
    g = np.clip(np.asarray(g, np.float64), 0.0, n_nodes - 1.0)
    f = np.minimum(np.floor(g).astype(np.int64), max(n_nodes - 2, 0))
    t = (g - f).astype(np.float32)
    mat = np.zeros((g.size, n_nodes), np.float32)
    rows = np.arange(g.size)
    mat[rows, f] = 1.0 - t
    if n_nodes > 1:
        mat[rows, f + 1] = t
    return mat


def upsample_grid(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear ``values`` (a coarse grid) at fractional grid ``rows`` x ``cols``: ``(len(rows), len(cols))``."""
    return (
        linear_matrix(rows, values.shape[0])
        @ values.astype(np.float32)
        @ linear_matrix(cols, values.shape[1]).T
    )
