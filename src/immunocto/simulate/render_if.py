"""Multiplexed IF rendering: 19 Orion channels, 16-bit counts, in IF pixel space.

Each IF pixel is mapped back to the H&E position it shows (the inverse of the true
registration), the cells are rasterised there, and each channel gets its marker's measured
expression in the right compartment (nuclear, membrane ring, granular cytoplasm), plus
autofluorescence, spillover, optical blur, exposure, and Poisson-Gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from immunocto.conventions import ORION_CHANNELS
from immunocto.simulate.artifacts import SlideArtifacts
from immunocto.simulate.biology import COMPARTMENT, FINE_INDEX
from immunocto.simulate.cells import FIBRE_SCALE_UM, FIBRE_TURNS, Objects, placeholder_objects
from immunocto.simulate.layout import TissueLayout
from immunocto.simulate.raster import rasterize, select_objects
from immunocto.simulate.sampling import TileGrid
from immunocto.simulate.transform import TruthTransform

IF_MARGIN = 8

#: Share of the autofluorescence that each channel picks up (AF1 is the AF channel itself;
#: the blank Argo550 channel sees AF and noise only).
AF_LEAK: dict[str, float] = {
    "Hoechst": 0.06,
    "AF1": 1.0,
    "CD31": 0.2,
    "CD45": 0.18,
    "CD68": 0.16,
    "Argo550": 0.3,
    "CD4": 0.12,
    "FOXP3": 0.1,
    "CD8a": 0.1,
    "CD45RO": 0.08,
    "CD20": 0.07,
    "PD-L1": 0.06,
    "CD3e": 0.06,
    "CD163": 0.05,
    "E-cadherin": 0.04,
    "PD-1": 0.04,
    "Ki67": 0.03,
    "Pan-CK": 0.03,
    "SMA": 0.02,
}

#: Counts per unit of expression.
GAIN: dict[str, float] = {name: 3200.0 for name in ORION_CHANNELS}
GAIN["Hoechst"] = 9000.0
GAIN["AF1"] = 2500.0
GAIN["Argo550"] = 2500.0
OFFSET = 180.0
READ_NOISE = 25.0


@dataclass(frozen=True)
class Exposure:
    """Per-slide, per-channel exposure factor (batch and instrument variation)."""

    factor: np.ndarray  # (C,)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Exposure:
        return cls(np.exp(rng.normal(0.0, 0.15, len(ORION_CHANNELS))).astype(np.float32))


_NUCLEAR = np.array([COMPARTMENT[m] == "nuclear" for m in ORION_CHANNELS])
_MEMBRANE = np.array([COMPARTMENT[m] == "membrane" for m in ORION_CHANNELS])
_CYTO = np.array([COMPARTMENT[m] == "cytoplasmic" for m in ORION_CHANNELS])
_AF = np.array([AF_LEAK[m] for m in ORION_CHANNELS], np.float32)
_GAIN = np.array([GAIN[m] for m in ORION_CHANNELS], np.float32)


def render_if_tile(
    u0: int,
    v0: int,
    w: int,
    h: int,
    *,
    objects: Objects,
    extent: np.ndarray,
    if_xy: tuple[np.ndarray, np.ndarray],
    expr: np.ndarray,
    layout: TissueLayout,
    transform: TruthTransform,
    artifacts: SlideArtifacts,
    exposure: Exposure,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render the IF window ``[:, v0:v0+h, u0:u0+w]`` (IF level-0 px).

    Parameters
    ----------
    objects : Objects
        All objects (positions and shapes in H&E level-0 px).
    extent : (N,) ndarray
        Bounding radius of each object (px).
    if_xy : tuple of (N,) ndarrays
        Object centres in IF level-0 px (``transform.he_to_if`` of ``objects.x, y``).
    expr : (N, C) ndarray
        Measured expression per object and channel (after per-cell artifacts).

    Returns
    -------
    (C, h, w) uint16 ndarray, channels in ``ORION_CHANNELS`` order
    """
    m = IF_MARGIN
    X, Y = transform.if_to_he_grid(u0 - m, v0 - m, w + 2 * m, h + 2 * m)
    grid = TileGrid(X=X, Y=Y)
    pad = 4.0 + float(np.abs(transform.fov_shift).max())
    sel = select_objects(if_xy[0], if_xy[1], extent + pad, u0 - m, v0 - m, w + 2 * m, h + 2 * m)
    sub = objects.take(sel)
    scale = float(np.sqrt(abs(np.linalg.det(transform.affine[:2, :2])))) * 1.01
    r = rasterize(sub, if_xy[0][sel] - (u0 - m), if_xy[1][sel] - (v0 - m), X, Y, grid_scale=scale)
    seed = layout.texture_seed
    sub_expr = expr[sel]
    if len(sub) == 0:  # nothing here: index 0 of a placeholder, under zero coverage
        sub = placeholder_objects()
        sub_expr = np.zeros((1, expr.shape[1]), expr.dtype)
    hh, ww = X.shape

    has_n = r.nuc_cov > 0
    owner_n = np.where(r.nuc_obj >= 0, r.nuc_obj, np.maximum(r.cell_obj, 0))
    has_c = r.cell_obj >= 0
    cell = np.maximum(r.cell_obj, 0)
    cyto_cov = np.where(has_c, r.cell_cov * (1.0 - r.nuc_cov), 0.0)

    # Compartment profiles.
    grain = np.zeros((hh, ww), np.float32)
    if has_n.any():
        grain[has_n] = grid_noise_at(X[has_n], Y[has_n], 1.6, seed + 21)
    nuc_profile = r.nuc_cov * np.clip(0.8 + 0.25 * grain, 0.2, None)
    granules = np.zeros((hh, ww), np.float32)
    in_cyto = cyto_cov > 0
    if in_cyto.any():
        granules[in_cyto] = grid_noise_at(X[in_cyto], Y[in_cyto], 1.4, seed + 22)
    cyto_profile = cyto_cov * np.clip(0.6 + 0.6 * granules, 0.0, None)
    mem_profile = np.where(has_c, r.ring + 0.08 * cyto_cov, 0.0)

    signal = np.zeros((len(ORION_CHANNELS), hh, ww), np.float32)
    e_n = sub_expr[owner_n]  # (h, w, C)
    e_c = sub_expr[cell]
    for ci in np.flatnonzero(_NUCLEAR):
        signal[ci] = e_n[..., ci] * nuc_profile
    for ci in np.flatnonzero(_MEMBRANE):
        signal[ci] = np.where(has_c, e_c[..., ci], 0.0) * mem_profile
    for ci in np.flatnonzero(_CYTO):
        signal[ci] = np.where(has_c, e_c[..., ci], 0.0) * cyto_profile

    # Autofluorescence: collagen, red cells, granular cytoplasm. These fields are smooth,
    # so the tile's regular-grid approximation (off by < 2 px) evaluates them fast.
    coarse = grid.regular_approximation()
    tissue = np.clip(coarse.grid_field(layout.tissue) * 4.0, 0.0, 1.0)
    fib = 0.5 + 0.5 * np.cos(
        2 * np.pi * FIBRE_TURNS * coarse.noise(FIBRE_SCALE_UM / layout.mpp, seed)
    )
    tumour = np.clip(coarse.grid_field(layout.tumour) * 2.0 + 0.5, 0.0, 1.0)
    free = tissue * (1.0 - np.clip(r.cell_cov, 0.0, 1.0))
    af = free * (1.0 - 0.6 * tumour) * (0.12 + 0.22 * fib**2)
    is_rbc = has_c & (sub.fine[cell] == FINE_INDEX["rbc"])
    af += np.where(is_rbc, 1.1 * r.cell_cov, 0.0)
    af += cyto_cov * sub.autofluor[cell] * np.clip(0.5 + granules, 0.0, None)
    signal += _AF[:, None, None] * af[None]

    # Spillover, optics, exposure and noise.
    source = signal.copy() if np.any(artifacts.spillover) else signal
    for dst, src in zip(*np.nonzero(artifacts.spillover), strict=True):
        signal[dst] += np.float32(artifacts.spillover[dst, src]) * source[src]
    signal = ndimage.gaussian_filter(signal, sigma=(0, 0.8, 0.8), truncate=3.0)
    counts = OFFSET + (_GAIN * exposure.factor)[:, None, None] * signal
    noise = rng.standard_normal(counts.shape, dtype=np.float32)
    counts += np.sqrt(counts + READ_NOISE**2) * noise
    return np.clip(np.rint(counts[:, m : m + h, m : m + w]), 0, 65535).astype(np.uint16)


def grid_noise_at(x: np.ndarray, y: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Noise at scattered pixel positions (a subset of a tile)."""
    return TileGrid(X=x.reshape(1, -1), Y=y.reshape(1, -1)).noise(scale, seed).ravel()
