"""Vectorised rasterisation of cells onto a tile.

Every (object, pixel) pair inside the object's bounding box is enumerated at once; the
shape test runs on those flat arrays, and each pixel keeps the object whose normalised
radius is smallest there (touching nuclei meet along a curved boundary, like a power
diagram). No Python loop runs over pixels or over objects.

The tile may sit on a distorted grid: the caller passes, per pixel, the H&E level-0
position it shows (``X``, ``Y``). For the H&E this is the pixel grid itself; for the IF it
is the inverse of the true registration transform, so the IF shows the same cells as the
H&E, moved by the misregistration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from immunocto.simulate.cells import HARMONICS, Objects


@dataclass
class Raster:
    """Per-pixel result, all arrays ``(h, w)``.

    ``nuc_obj`` / ``cell_obj`` index the ``objects`` passed to :func:`rasterize`
    (``-1``: none). ``nuc_obj`` is set where the pixel is inside a nucleus; ``cell_obj``
    where it is inside a cell body or a nucleus (a nucleus always belongs to its own cell).
    ``*_cov`` are anti-aliased coverages in [0, 1]; ``nuc_rho`` is the normalised radius
    inside the nucleus (0 centre, 1 edge); ``ring`` is the membrane profile of the cell;
    ``nucleolus`` in [0, 1].
    """

    nuc_obj: np.ndarray
    nuc_cov: np.ndarray
    nuc_rho: np.ndarray
    nucleolus: np.ndarray
    cell_obj: np.ndarray
    cell_cov: np.ndarray
    ring: np.ndarray


def select_objects(
    cx: np.ndarray, cy: np.ndarray, extent: np.ndarray, x0: float, y0: float, w: int, h: int
) -> np.ndarray:
    """Indices of objects whose disc ``(cx, cy, extent)`` touches the window."""
    return np.flatnonzero(
        (cx + extent >= x0) & (cx - extent < x0 + w) & (cy + extent >= y0) & (cy - extent < y0 + h)
    )


def _enumerate_pairs(
    px: np.ndarray,
    py: np.ndarray,
    ea: np.ndarray,
    eb: np.ndarray,
    cos_t: np.ndarray,
    sin_t: np.ndarray,
    w: int,
    h: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Flat (object, pixel index) of every pixel inside each object's ellipse.

    The ellipse of object ``i`` is centred at ``(px[i], py[i])`` (tile pixels) with
    semi-axes ``ea[i]`` along ``theta`` and ``eb[i]`` across it. Rows are enumerated per
    object, and per row only the span of columns the ellipse covers (solved from the
    ellipse's quadratic), so no pixel outside it is visited.
    """
    ey = np.sqrt((ea * sin_t) ** 2 + (eb * cos_t) ** 2)
    y0 = np.clip(np.floor(py - ey).astype(np.int64), 0, h)
    y1 = np.clip(np.ceil(py + ey).astype(np.int64) + 1, 0, h)
    n_rows = np.maximum(y1 - y0, 0)
    row_obj = np.repeat(np.arange(len(px), dtype=np.int64), n_rows)
    row_start = np.cumsum(n_rows) - n_rows
    rows = y0[row_obj] + (
        np.arange(int(n_rows.sum()), dtype=np.int64) - np.repeat(row_start, n_rows)
    )
    # Solve A dx^2 + B dx + C <= 0 for the columns of each row.
    inv_a2 = 1.0 / ea**2
    inv_b2 = 1.0 / eb**2
    qa = (cos_t**2 * inv_a2 + sin_t**2 * inv_b2)[row_obj]
    dy = rows - py[row_obj]
    qb = 2.0 * dy * (cos_t * sin_t * (inv_a2 - inv_b2))[row_obj]
    qc = dy**2 * (sin_t**2 * inv_a2 + cos_t**2 * inv_b2)[row_obj] - 1.0
    disc = np.maximum(qb * qb - 4 * qa * qc, 0.0)
    root = np.sqrt(disc)
    x_lo = px[row_obj] + (-qb - root) / (2 * qa)
    x_hi = px[row_obj] + (-qb + root) / (2 * qa)
    c0 = np.clip(np.floor(x_lo).astype(np.int64), 0, w)
    c1 = np.clip(np.ceil(x_hi).astype(np.int64) + 1, 0, w)
    span = np.where(disc > 0, np.maximum(c1 - c0, 0), 0)
    obj = np.repeat(row_obj, span).astype(np.int32)
    start = np.cumsum(span) - span
    col = np.repeat(c0, span) + (
        np.arange(int(span.sum()), dtype=np.int64) - np.repeat(start, span)
    )
    pix = np.repeat(rows * w, span) + col
    return obj, pix


def _argmin_per_pixel(pix: np.ndarray, rho: np.ndarray, n_pix: int) -> np.ndarray:
    """For each pixel, the index (into ``pix``) of the pair with the smallest finite ``rho``;
    -1 where no pair covers the pixel. Exact ties (equal float32 values) keep the later pair."""
    out = np.full(n_pix, -1, np.int64)
    if pix.size == 0:
        return out
    rho = rho.astype(np.float32, copy=False)
    best = np.full(n_pix, np.inf, np.float32)
    np.minimum.at(best, pix, rho)
    win = np.flatnonzero((rho == best[pix]) & np.isfinite(rho))
    out[pix[win]] = win
    return out


def rasterize(
    objects: Objects,
    px: np.ndarray,
    py: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    *,
    grid_scale: float = 1.0,
) -> Raster:
    """Rasterise ``objects`` onto a tile.

    Parameters
    ----------
    objects : Objects
        The objects that may touch the tile (shape parameters in H&E level-0 px).
    px, py : (N,) float ndarrays
        Object centres in *tile pixel* coordinates (column, row), for the bounding boxes.
    X, Y : (h, w) float32 ndarrays
        H&E level-0 position shown by each tile pixel.
    grid_scale : float
        Upper bound of tile pixels per H&E pixel (1 for the H&E; about 1 for the IF).

    Returns
    -------
    Raster
    """
    h, w = X.shape
    n_pix = h * w
    empty_i = np.full((h, w), -1, np.int32)
    zeros = np.zeros((h, w), np.float32)
    if len(objects) == 0:
        return Raster(
            empty_i, zeros, zeros.copy(), zeros.copy(), empty_i.copy(), zeros.copy(), zeros.copy()
        )

    # Per-object constants, gathered per pair below.
    cos_t = np.cos(objects.theta)
    sin_t = np.sin(objects.theta)
    nucleated_o = objects.a > 0
    a_o = np.where(nucleated_o, objects.a, 1.0).astype(np.float32)
    b_o = np.where(nucleated_o, objects.b, 1.0).astype(np.float32)
    harm_total = np.abs(objects.harm_amp).sum(axis=1)
    # An ellipse containing both the cell body and the (offset, bent, lobed) nucleus.
    outer_a = (
        np.maximum(objects.cyto_a, objects.a * (1 + harm_total) + np.abs(objects.nuc_offset)) + 1.0
    )
    outer_b = (
        np.maximum(
            objects.cyto_b,
            objects.b * (1 + harm_total) + objects.bend * objects.a * (1 + harm_total) ** 2,
        )
        + 1.0
    )
    outer_b = np.maximum(outer_b, objects.a * 0.5 * np.where(harm_total > 0.25, 1.0, 0.0))
    obj, pix = _enumerate_pairs(
        px.astype(np.float64),
        py.astype(np.float64),
        outer_a * grid_scale + 1.0,
        outer_b * grid_scale + 1.0,
        cos_t.astype(np.float64),
        sin_t.astype(np.float64),
        w,
        h,
    )
    dx = X.ravel()[pix] - objects.x[obj]
    dy = Y.ravel()[pix] - objects.y[obj]
    c = cos_t[obj]
    s = sin_t[obj]
    u = dx * c + dy * s
    v = dy * c - dx * s

    # Cell body: an ellipse around the object centre.
    inv_A = (1.0 / objects.cyto_a).astype(np.float32)
    inv_B = (1.0 / objects.cyto_b).astype(np.float32)
    rho_c = np.sqrt((u * inv_A[obj]) ** 2 + (v * inv_B[obj]) ** 2)
    r_cell = np.sqrt(objects.cyto_a * objects.cyto_b).astype(np.float32)[obj]

    # Nucleus: offset, bent, with a harmonic outline (cos/sin of k*phi by recurrences),
    # evaluated only for the pairs inside an ellipse bounding the nucleus.
    nuc_box_a = objects.a * (1 + harm_total) + 1.0
    nuc_box_b = (
        objects.b * (1 + harm_total) + objects.bend * objects.a * (1 + harm_total) ** 2 + 1.0
    )
    nuc_box_b = np.maximum(nuc_box_b, np.where(harm_total > 0.25, objects.a, 0.0))
    inv_na = np.where(nucleated_o, 1.0 / nuc_box_a, 0.0).astype(np.float32)
    inv_nb = np.where(nucleated_o, 1.0 / nuc_box_b, 0.0).astype(np.float32)
    un_all = u - objects.nuc_offset[obj]
    near_n = np.flatnonzero(
        nucleated_o[obj] & ((un_all * inv_na[obj]) ** 2 + (v * inv_nb[obj]) ** 2 < 1.0)
    )
    on = obj[near_n]
    a = a_o[on]
    un = un_all[near_n]
    vn = v[near_n] - objects.bend[on] * un * un / a
    p = un / a
    q = vn * (1.0 / b_o)[on]
    r = np.sqrt(p * p + q * q)
    inv_r = 1.0 / np.maximum(r, 1e-6)
    c1 = p * inv_r
    s1 = q * inv_r
    c2 = 2 * c1 * c1 - 1
    s2 = 2 * s1 * c1
    cos_k = {2: c2, 3: c1 * (4 * c1 * c1 - 3), 4: 2 * c2 * c2 - 1}
    sin_k = {2: s2, 3: s1 * (3 - 4 * s1 * s1), 4: 2 * s2 * c2}
    alpha = (objects.harm_amp * np.cos(objects.harm_phase)).astype(np.float32)
    beta = (objects.harm_amp * np.sin(objects.harm_phase)).astype(np.float32)
    modulation = np.ones_like(r)
    for j, k in enumerate(HARMONICS):
        modulation += alpha[on, j] * cos_k[k] - beta[on, j] * sin_k[k]
    rho_n = np.full(u.shape, np.inf, np.float32)
    rho_n[near_n] = r / np.maximum(modulation, 0.3)
    r_nuc = np.ones(u.shape, np.float32)
    r_nuc[near_n] = np.sqrt(a_o * b_o)[on] * modulation
    un_full = np.zeros(u.shape, np.float32)
    vn_full = np.zeros(u.shape, np.float32)
    un_full[near_n] = un
    vn_full[near_n] = vn
    un, vn = un_full, vn_full

    # Keep the pairs that can touch a pixel (with half a pixel of anti-aliasing).
    soft_n = 0.75 / np.maximum(r_nuc, 1.0)
    soft_c = 0.75 / np.maximum(r_cell, 1.0)
    keep = (rho_n < 1.0 + soft_n) | (rho_c < 1.0 + soft_c)
    idx = np.flatnonzero(keep)
    pix_k = pix[idx]

    # Nucleus winner per pixel.
    win_n = _argmin_per_pixel(pix_k, rho_n[idx], n_pix)
    has_n = win_n >= 0
    sel_n = idx[win_n[has_n]]
    nuc_rho_flat = np.zeros(n_pix, np.float32)
    nuc_rho_flat[has_n] = rho_n[sel_n]
    nuc_cov_flat = np.zeros(n_pix, np.float32)
    nuc_cov_flat[has_n] = np.clip((1.0 - rho_n[sel_n]) * r_nuc[sel_n] + 0.5, 0.0, 1.0)
    nuc_obj_flat = np.full(n_pix, -1, np.int32)
    inside_n = has_n.copy()
    inside_n[has_n] = rho_n[sel_n] < 1.0
    nuc_obj_flat[inside_n] = obj[idx[win_n[inside_n]]]
    nucleolus_flat = np.zeros(n_pix, np.float32)
    nrad = objects.nucleolus[:, 2][obj[sel_n]]
    with_nl = nrad > 0
    if with_nl.any():
        nl = objects.nucleolus[obj[sel_n]]
        d_nl = np.hypot(un[sel_n] - nl[:, 0], vn[sel_n] - nl[:, 1])
        val = np.clip(1.0 - d_nl / np.maximum(nl[:, 2], 1e-3), 0.0, 1.0) * with_nl
        nucleolus_flat[np.flatnonzero(has_n)] = val

    # Cell-body winner per pixel (a pixel inside a nucleus belongs to that nucleus's cell).
    win_c = _argmin_per_pixel(pix_k, rho_c[idx], n_pix)
    has_c = win_c >= 0
    sel_c = idx[win_c[has_c]]
    cell_cov_flat = np.zeros(n_pix, np.float32)
    cell_cov_flat[has_c] = np.clip((1.0 - rho_c[sel_c]) * r_cell[sel_c] + 0.5, 0.0, 1.0)
    ring_flat = np.zeros(n_pix, np.float32)
    depth = (1.0 - rho_c[sel_c]) * r_cell[sel_c]
    ring_flat[has_c] = np.exp(-(((depth - 0.6) / 1.1) ** 2)) * (rho_c[sel_c] < 1.0 + soft_c[sel_c])
    cell_obj_flat = np.full(n_pix, -1, np.int32)
    inside_c = has_c.copy()
    inside_c[has_c] = rho_c[sel_c] < 1.0
    cell_obj_flat[inside_c] = obj[idx[win_c[inside_c]]]
    cell_obj_flat[inside_n] = nuc_obj_flat[inside_n]
    cell_cov_flat = np.maximum(cell_cov_flat, nuc_cov_flat)

    return Raster(
        nuc_obj=nuc_obj_flat.reshape(h, w),
        nuc_cov=nuc_cov_flat.reshape(h, w),
        nuc_rho=nuc_rho_flat.reshape(h, w),
        nucleolus=nucleolus_flat.reshape(h, w),
        cell_obj=cell_obj_flat.reshape(h, w),
        cell_cov=cell_cov_flat.reshape(h, w),
        ring=ring_flat.reshape(h, w),
    )
