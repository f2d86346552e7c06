"""H&E rendering by Beer-Lambert optical density.

Per pixel we build a hematoxylin and an eosin concentration from the rasterised cells
(chromatin texture, vesicular rims, nucleoli, cytoplasm, foamy vacuoles, red cells) and
the tissue fields (wavy collagen, lumens, glass), then
``RGB = I0 * 10 ** -(c_H * h_vec + c_E * e_vec)`` with slide-specific stain vectors,
followed by optical blur, defocus patches and sensor noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from immunocto.simulate.artifacts import SlideArtifacts
from immunocto.simulate.biology import FINE_INDEX
from immunocto.simulate.cells import FIBRE_SCALE_UM, FIBRE_TURNS, Objects, placeholder_objects
from immunocto.simulate.layout import LYMPHOID_CORE_FRACTION, TissueLayout
from immunocto.simulate.raster import Raster, rasterize, select_objects
from immunocto.simulate.sampling import TileGrid

#: Ruifrok & Johnston hematoxylin and eosin optical-density vectors (RGB).
H_VECTOR = np.array([0.650, 0.704, 0.286])
E_VECTOR = np.array([0.20, 0.90, 0.42])  # pinker than Ruifrok's, as Orion scans look
#: Red cells absorb green and blue (haemoglobin + eosin): they look red, not magenta.
RBC_VECTOR = np.array([0.06, 0.80, 0.60])

HE_MARGIN = 24  # px rendered around a tile so blur has context


@dataclass(frozen=True)
class Stain:
    """Slide-level stain appearance (varies between slides like real batches do)."""

    h_vector: np.ndarray
    e_vector: np.ndarray
    h_scale: float
    e_scale: float
    background: np.ndarray  # glass intensity per RGB channel

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Stain:
        def jitter(vec: np.ndarray, amount: float) -> np.ndarray:
            v = np.clip(vec + rng.normal(0, amount, 3), 0.01, None)
            return v / np.linalg.norm(v)

        return cls(
            h_vector=jitter(H_VECTOR, 0.04),
            e_vector=jitter(E_VECTOR, 0.03),
            h_scale=float(0.6 * np.exp(rng.normal(0, 0.1))),
            e_scale=float(0.27 * np.exp(rng.normal(0, 0.12))),
            background=np.clip(np.array([247.0, 245.0, 249.0]) + rng.normal(0, 2, 3), 230, 254),
        )


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def he_concentrations(
    r: Raster,
    objects: Objects,
    grid: TileGrid,
    layout: TissueLayout,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hematoxylin, eosin and red-cell concentration maps ``(h, w)`` for a rasterised tile."""
    seed = layout.texture_seed
    grain = grid.noise(1.3, seed + 11)
    grain2 = grid.noise(3.2, seed + 12)
    fields = grid.layout_fields(layout)

    if len(objects) == 0:  # glass or empty stroma: no cell parameters to look up
        objects = placeholder_objects()
    nuc = r.nuc_obj
    in_nuc = r.nuc_cov > 0
    # The covered nucleus might be the nearest one even where nuc_obj is -1 (soft edge):
    # fall back to the cell owner for per-object parameters.
    owner_n = np.where(nuc >= 0, nuc, np.maximum(r.cell_obj, 0))
    hema = objects.hema[owner_n]
    rim = objects.chrom_rim[owner_n]
    grain_amp = objects.chrom_grain[owner_n]
    dense = 0.92 + grain_amp * (0.8 * grain + 0.4 * grain2)
    vesicular = (
        0.32 + 0.85 * _smoothstep(0.6, 0.98, r.nuc_rho) + grain_amp * 0.9 * np.maximum(grain, 0)
    )
    profile = (1 - rim) * dense + rim * vesicular + 0.9 * r.nucleolus
    H = np.where(in_nuc, r.nuc_cov * hema * np.maximum(profile, 0.05), 0.0).astype(np.float32)
    E = np.where(in_nuc, 0.15 * r.nuc_cov, 0.0).astype(np.float32)

    cell = np.maximum(r.cell_obj, 0)
    has_cell = r.cell_obj >= 0
    cyto = np.where(has_cell, r.cell_cov * (1.0 - r.nuc_cov), 0.0)
    is_rbc = has_cell & (objects.fine[cell] == FINE_INDEX["rbc"])
    foam = objects.foam[cell]
    bubbles = _smoothstep(0.2, 0.9, grid.noise(3.5, seed + 13)) if foam.any() else 0.0
    cyto_e = objects.cyto_eosin[cell] * (1.0 - 0.8 * foam * bubbles) * (0.85 + 0.25 * grain2)
    E += cyto * np.where(is_rbc, 0.0, cyto_e)
    R = np.where(
        is_rbc, cyto * objects.cyto_eosin[cell] * (0.8 + 0.25 * np.minimum(r.cell_cov, 1.0)), 0.0
    )
    H += cyto * objects.cyto_hema[cell] * 0.6

    # Extracellular matrix: wavy collagen bundles in stroma, thinner in nests and aggregates.
    tissue = np.clip(fields["tissue"] * 4.0, 0.0, 1.0)
    in_agg = np.clip((1.0 - fields["aggregate"]) * 5.0, 0.0, 1.0)
    tumour = np.clip(fields["tumour"] * 2.0 + 0.5, 0.0, 1.0)
    gland = np.clip(fields["lumen"] * 3.0, 0.0, 1.0) * tumour
    vessel = np.clip((1.0 - fields["vessel_lumen"]) * 6.0, 0.0, 1.0)
    density = 1.0 - 0.6 * tumour - 0.55 * in_agg * (1 - tumour)
    density = density * (1.0 - gland) * (1.0 - vessel)
    fib = 0.5 + 0.5 * np.cos(
        2 * np.pi * FIBRE_TURNS * grid.noise(FIBRE_SCALE_UM / layout.mpp, seed)
    )
    breaks = np.clip(grid.noise(14.0, seed + 14) * 0.6 + 0.7, 0.0, 1.0)
    pattern = 0.45 + 0.55 * breaks * fib**2 + 0.1 * grain2
    free = tissue * (1.0 - np.clip(r.cell_cov, 0.0, 1.0))
    E += free * density * 0.5 * np.maximum(pattern, 0.0)
    H += free * density * 0.035
    # Lumens: pale plasma in vessels, faint bluish mucin and debris in glands.
    E += free * vessel * 0.16
    E += free * gland * 0.05 * np.maximum(1 + 0.5 * grain2, 0)
    H += free * gland * 0.04 * np.maximum(1 + 0.4 * grain2, 0)
    # Follicle cores are a little paler (B-cell cytoplasm, follicular dendritic cells).
    H *= 1.0 - 0.08 * np.clip((LYMPHOID_CORE_FRACTION - fields["aggregate"]) * 4, 0, 1)
    return H.astype(np.float32), E.astype(np.float32), R.astype(np.float32)


def render_he_tile(
    x0: int,
    y0: int,
    w: int,
    h: int,
    *,
    objects: Objects,
    extent: np.ndarray,
    layout: TissueLayout,
    stain: Stain,
    artifacts: SlideArtifacts,
    rng: np.random.Generator,
) -> tuple[np.ndarray, Raster]:
    """Render the H&E window ``[y0:y0+h, x0:x0+w]`` (level-0 px).

    Returns
    -------
    rgb : (h, w, 3) uint8 ndarray
    raster : Raster
        The rasterisation of the window (without the margin), with indices into ``objects``.
    """
    m = HE_MARGIN
    grid = TileGrid(
        xs=np.arange(x0 - m, x0 + w + m, dtype=np.float32),
        ys=np.arange(y0 - m, y0 + h + m, dtype=np.float32),
    )
    sel = select_objects(objects.x, objects.y, extent, x0 - m, y0 - m, w + 2 * m, h + 2 * m)
    sub = objects.take(sel)
    r = rasterize(sub, sub.x - (x0 - m), sub.y - (y0 - m), grid.X, grid.Y)
    H, E, R = he_concentrations(r, sub, grid, layout)
    od = (
        H[..., None] * (stain.h_scale * stain.h_vector)[None, None, :]
        + E[..., None] * (stain.e_scale * stain.e_vector)[None, None, :]
        + R[..., None] * (stain.e_scale * RBC_VECTOR)[None, None, :]
        + 0.01
    )
    rgb = stain.background[None, None, :] * np.power(10.0, -od, dtype=np.float32)
    rgb = ndimage.gaussian_filter(rgb, sigma=(0.6, 0.6, 0))
    if artifacts.focus_sigma > 0 and len(artifacts.focus_patches):
        weight = artifacts.focus_weight(grid.X, grid.Y)
        if weight.max() > 0:
            blurred = ndimage.gaussian_filter(
                rgb, sigma=(artifacts.focus_sigma, artifacts.focus_sigma, 0)
            )
            rgb = rgb + weight[..., None] * (blurred - rgb)
    rgb += rng.normal(0.0, 1.8, rgb.shape).astype(np.float32)
    out = np.clip(np.rint(rgb[m : m + h, m : m + w]), 0, 255).astype(np.uint8)
    crop = (slice(m, m + h), slice(m, m + w))
    r_crop = Raster(**{k: getattr(r, k)[crop] for k in r.__dataclass_fields__})
    # Map subset indices back to indices into ``objects``.
    for name in ("nuc_obj", "cell_obj"):
        arr = getattr(r_crop, name)
        lookup = np.append(sel, -1).astype(np.int32)  # index -1 -> -1 (no object)
        setattr(r_crop, name, lookup[arr])
    return out, r_crop
