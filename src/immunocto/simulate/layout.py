"""Tissue architecture: where tumour, stroma, lymphoid aggregates, vessels and glass are.

Smooth fields live on a coarse grid (one node every ``GRID_PX`` pixels) and are read with
bilinear interpolation, so a region boundary is as sharp as a pixel wherever it is asked.
Lymphoid aggregates and vessels are analytic discs. The whole layout of a 50,000 px slide
is a few arrays of ~3,000 x 3,000 floats: small next to the slide itself.

Regions (codes stored per cell in truth as names):

==  ================  =====================================================
0   glass             no tissue
1   stroma            fibrous stroma with scattered immune cells
2   margin            stroma within ``MARGIN_UM`` of tumour (invasive front)
3   tumour            epithelial tumour nests
4   gland_lumen       lumens inside tumour nests (mucin, debris)
5   lymphoid_core     B-cell-rich follicle of a lymphoid aggregate
6   lymphoid_rim      T-cell-rich zone around it
7   vessel_lumen      blood (red cells)
8   vessel_wall       endothelium and smooth muscle
==  ================  =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from immunocto.simulate.noise import lattice_noise, smooth_grid_noise
from immunocto.simulate.params import SimParams

REGIONS: tuple[str, ...] = (
    "glass",
    "stroma",
    "margin",
    "tumour",
    "gland_lumen",
    "lymphoid_core",
    "lymphoid_rim",
    "vessel_lumen",
    "vessel_wall",
)
REGION_INDEX = {name: i for i, name in enumerate(REGIONS)}

GRID_PX = 16
#: Fraction of the slide interior covered by tissue (the rest is glass).
TISSUE_FRACTION = 0.9
MARGIN_UM = 45.0
LYMPHOID_CORE_FRACTION = 0.58

#: Cell packing per region with cells: (target nucleated-cell density in cells per
#: 10,000 um^2 (100 x 100 um), minimum distance between site centres in um). Regions not
#: listed (glass, lumens) hold no nucleated cells.
PACKING: dict[str, tuple[float, float]] = {
    #                 density, hard core
    "stroma":        (30.0, 8.0),
    "margin":        (55.0, 7.0),
    "tumour":        (70.0, 8.8),
    "lymphoid_core": (150.0, 5.5),
    "lymphoid_rim":  (135.0, 5.7),
    "vessel_wall":   (75.0, 6.0),
}  # fmt: skip
#: Target nucleated-cell density per region (every region; 0 where none), cells/10,000 um^2.
DENSITY: dict[str, float] = {r: PACKING[r][0] if r in PACKING else 0.0 for r in REGIONS}
#: Minimum distance between site centres per region with cells, in microns.
HARD_CORE_UM: dict[str, float] = {r: core for r, (_, core) in PACKING.items()}

#: Fine-type composition of each region (probabilities summing to 1).
COMPOSITION: dict[str, dict[str, float]] = {
    "stroma": {
        "fibroblast": 0.38,
        "cd4_t": 0.13,
        "treg": 0.02,
        "cd8_t": 0.08,
        "b_cell": 0.03,
        "macrophage": 0.14,
        "plasma": 0.12,
        "neutrophil": 0.04,
        "endothelial": 0.03,
        "smooth_muscle": 0.03,
    },
    "margin": {
        "fibroblast": 0.22,
        "cd4_t": 0.18,
        "treg": 0.03,
        "cd8_t": 0.16,
        "b_cell": 0.04,
        "macrophage": 0.18,
        "plasma": 0.09,
        "neutrophil": 0.06,
        "tumour": 0.04,
    },
    "tumour": {
        "tumour": 0.86,
        "cd8_t": 0.05,
        "cd4_t": 0.02,
        "macrophage": 0.03,
        "neutrophil": 0.02,
        "fibroblast": 0.02,
    },
    "lymphoid_core": {
        "b_cell": 0.82,
        "cd4_t": 0.09,
        "cd8_t": 0.02,
        "macrophage": 0.04,
        "fibroblast": 0.03,
    },
    "lymphoid_rim": {
        "cd4_t": 0.46,
        "treg": 0.05,
        "cd8_t": 0.24,
        "b_cell": 0.12,
        "macrophage": 0.06,
        "plasma": 0.03,
        "fibroblast": 0.04,
    },
    "vessel_wall": {"endothelial": 0.6, "smooth_muscle": 0.3, "fibroblast": 0.1},
    "vessel_lumen": {"rbc": 1.0},
}

#: Red blood cells packed into vessel lumens (objects per 10,000 um^2).
RBC_DENSITY = 120.0


@dataclass
class TissueLayout:
    """The tissue architecture of one slide.

    Coordinates are level-0 H&E pixels (``x`` = column, ``y`` = row). Grid fields are
    ``(rows, cols)`` arrays sampled at ``(y / GRID_PX, x / GRID_PX)``.
    """

    size: int
    mpp: float
    tissue: np.ndarray  # > 0 inside tissue
    tumour: np.ndarray  # > 0 inside tumour nests
    tumour_dist_um: np.ndarray  # distance to the nearest tumour, 0 inside
    tumour_depth_um: np.ndarray  # distance to the nest edge, inside nests
    lumen: np.ndarray  # > 0 where a nest interior opens into a gland lumen
    aggregates: np.ndarray  # (K, 4): cx, cy, radius_px, shape seed
    vessels: np.ndarray  # (V, 4): cx, cy, lumen radius px, wall radius px
    texture_seed: int

    # ------------------------------------------------------------------ sampling
    def _grid(self, field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        coords = np.stack([np.ravel(y) / GRID_PX, np.ravel(x) / GRID_PX])
        out = ndimage.map_coordinates(field, coords, order=1, mode="nearest")
        return out.reshape(np.shape(x)).astype(np.float32)

    def aggregate_radius(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised distance to the nearest aggregate centre (< 1 inside), shape of ``x``."""
        return nearest_discs(
            self.aggregates, np.ravel(x), np.ravel(y), radius_col=2, wobble=True
        ).reshape(np.shape(x))

    def vessel_distance(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance to the nearest vessel centre over its lumen radius and over its wall
        radius (each < 1 inside); both of the shape of ``x``."""
        xs, ys = np.ravel(x), np.ravel(y)
        lumen = nearest_discs(self.vessels, xs, ys, radius_col=2)
        wall = nearest_discs(self.vessels, xs, ys, radius_col=3)
        return lumen.reshape(np.shape(x)), wall.reshape(np.shape(x))

    def sample(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Every field the renderers need at the points ``(x, y)`` (any shape)."""
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.float32)
        tissue = self._grid(self.tissue, x, y)
        tumour = self._grid(self.tumour, x, y)
        lumen = self._grid(self.lumen, x, y)
        agg = self.aggregate_radius(x, y)
        v_lumen, v_wall = self.vessel_distance(x, y)
        return {
            "tissue": tissue,
            "tumour": tumour,
            "tumour_dist_um": self._grid(self.tumour_dist_um, x, y),
            "lumen": lumen,
            "aggregate": agg,
            "vessel_lumen": v_lumen,
            "vessel_wall": v_wall,
        }

    def regions(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Region code (index into :data:`REGIONS`) at each point; int8, shape of ``x``."""
        f = self.sample(x, y)
        return regions_from_fields(f)


def nearest_discs(
    discs: np.ndarray, x: np.ndarray, y: np.ndarray, *, radius_col: int, wobble: bool = False
) -> np.ndarray:
    """Smallest ``distance / radius`` from each point to the discs (inf when far from all).

    ``discs`` is ``(K, >=3)`` with columns cx, cy, and radii; with ``wobble`` the radius is
    modulated by smooth noise seeded by column 3, so aggregates are not perfect circles.
    """
    out = np.full(x.shape, np.inf, np.float32)
    if len(discs) == 0 or x.size == 0:
        return out
    reach = float(discs[:, radius_col].max()) * (1.5 if wobble else 1.0)
    near = (
        (discs[:, 0] > x.min() - reach)
        & (discs[:, 0] < x.max() + reach)
        & (discs[:, 1] > y.min() - reach)
        & (discs[:, 1] < y.max() + reach)
    )
    if near.sum() <= 12:
        # A tile: loop over the few discs that reach it, each vectorised over the pixels.
        for cx, cy, *rest in discs[near]:
            radius = float(rest[radius_col - 2])
            box = (np.abs(x - cx) < reach) & (np.abs(y - cy) < reach)
            if not box.any():
                continue
            r = np.full(int(box.sum()), radius, np.float32)
            if wobble:
                r = r * (
                    1.0
                    + 0.13 * lattice_noise(x[box], y[box], scale=radius / 2.5, seed=int(rest[1]))
                )
            out[box] = np.minimum(out[box], np.hypot(x[box] - cx, y[box] - cy) / r)
        return out
    k = min(3, len(discs))
    dist, idx = cKDTree(discs[:, :2]).query(
        np.stack([x, y], axis=1), k=k, distance_upper_bound=reach
    )
    dist = dist.reshape(x.size, k)
    idx = idx.reshape(x.size, k)
    for j in range(k):
        hit = np.isfinite(dist[:, j])
        if not hit.any():
            continue
        disc = discs[idx[hit, j]]
        radius = disc[:, radius_col].astype(np.float32)
        if wobble:
            # Each aggregate has its own seed: evaluate the noise per aggregate id.
            scale = np.ones(hit.sum(), np.float32)
            for a in np.unique(idx[hit, j]):
                sel = idx[hit, j] == a
                cx, cy, r, seed = discs[a][:4]
                scale[sel] = 1.0 + 0.13 * lattice_noise(
                    x[hit][sel], y[hit][sel], scale=float(r) / 2.5, seed=int(seed)
                )
            radius = radius * scale
        out[hit] = np.minimum(out[hit], dist[hit, j].astype(np.float32) / radius)
    return out


def regions_from_fields(f: dict[str, np.ndarray]) -> np.ndarray:
    """Region codes from the fields returned by :meth:`TissueLayout.sample`."""
    region = np.full(f["tissue"].shape, REGION_INDEX["stroma"], np.int8)
    region[f["tumour_dist_um"] < MARGIN_UM] = REGION_INDEX["margin"]
    tumour = f["tumour"] > 0
    region[tumour] = REGION_INDEX["tumour"]
    region[tumour & (f["lumen"] > 0)] = REGION_INDEX["gland_lumen"]
    in_agg = (f["aggregate"] < 1.0) & ~tumour
    region[in_agg] = REGION_INDEX["lymphoid_rim"]
    region[in_agg & (f["aggregate"] < LYMPHOID_CORE_FRACTION)] = REGION_INDEX["lymphoid_core"]
    vessel_ok = ~tumour & ~in_agg
    region[vessel_ok & (f["vessel_wall"] < 1.0)] = REGION_INDEX["vessel_wall"]
    region[vessel_ok & (f["vessel_lumen"] < 1.0)] = REGION_INDEX["vessel_lumen"]
    region[f["tissue"] <= 0] = REGION_INDEX["glass"]
    return region


def make_layout(params: SimParams, rng: np.random.Generator) -> TissueLayout:
    """Draw the tissue architecture of one slide.

    Parameters
    ----------
    params : SimParams
    rng : numpy Generator
        The slide's layout stream.
    """
    size = params.size
    n = size // GRID_PX + 2
    um_per_node = GRID_PX * params.mpp
    side_um = size * params.mpp

    # Tissue: a large blob with a little glass, more glass near the slide border.
    tissue_scale = float(np.clip(0.25 * side_um, 150.0, 1500.0)) / um_per_node
    tissue = smooth_grid_noise((n, n), tissue_scale, rng)
    tissue -= np.quantile(tissue, 1.0 - TISSUE_FRACTION)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    edge = np.minimum.reduce([xx, yy, n - 1 - xx, n - 1 - yy]) / max(n * 0.05, 1.0)
    tissue -= 3.0 * np.clip(1.0 - edge, 0.0, 1.0)

    # Tumour nests: the upper ~40% of a 130 um noise inside tissue.
    tumour_noise = smooth_grid_noise((n, n), 130.0 / um_per_node, rng)
    inside = tissue > 0
    threshold = float(np.quantile(tumour_noise[inside], 0.6)) if inside.any() else 0.0
    tumour = (tumour_noise - threshold) * 4.0
    tumour[~inside] = np.minimum(tumour[~inside], -1.0)
    is_tumour = tumour > 0
    tumour_dist = ndimage.distance_transform_edt(~is_tumour) * um_per_node
    tumour_depth = ndimage.distance_transform_edt(is_tumour) * um_per_node

    # Gland lumens: holes in the nest interiors.
    lumen_noise = smooth_grid_noise((n, n), 22.0 / um_per_node, rng)
    lumen = np.minimum(lumen_noise - 0.9, (tumour_depth - 18.0) / 10.0).astype(np.float32)

    area_mm2 = (side_um / 1000.0) ** 2

    # Lymphoid aggregates, centred in stroma.
    n_agg = max(1, int(rng.poisson(1.6 * area_mm2)))
    stroma_nodes = np.argwhere(inside & (tumour_dist > 40.0))
    if len(stroma_nodes) == 0:
        stroma_nodes = np.argwhere(np.ones((n, n), bool))
    aggregates = np.zeros((n_agg, 4), np.float64)
    max_radius_um = min(230.0, 0.22 * side_um)
    for k in range(n_agg):
        node = stroma_nodes[rng.integers(len(stroma_nodes))]
        radius = rng.uniform(0.55, 1.0) * max_radius_um / params.mpp
        aggregates[k] = (
            (node[1] + rng.uniform(-0.5, 0.5)) * GRID_PX,
            (node[0] + rng.uniform(-0.5, 0.5)) * GRID_PX,
            radius,
            int(rng.integers(1, 2**31)),
        )

    # Vessels: small discs in stroma, wall = endothelium (+ smooth muscle for larger ones).
    n_vessels = int(rng.poisson(28.0 * area_mm2))
    vessel_nodes = np.argwhere(inside & ~is_tumour)
    vessels = np.zeros((0, 4), np.float64)
    if n_vessels and len(vessel_nodes):
        pick = vessel_nodes[rng.integers(len(vessel_nodes), size=n_vessels)]
        lumen_um = rng.uniform(6.0, 22.0, n_vessels)
        wall_um = lumen_um + np.where(lumen_um > 14.0, 11.0, 6.0)
        vessels = np.stack(
            [
                (pick[:, 1] + rng.uniform(-0.5, 0.5, n_vessels)) * GRID_PX,
                (pick[:, 0] + rng.uniform(-0.5, 0.5, n_vessels)) * GRID_PX,
                lumen_um / params.mpp,
                wall_um / params.mpp,
            ],
            axis=1,
        )
        agg_r = np.full(n_vessels, np.inf)
        for cx, cy, r, _ in aggregates:
            agg_r = np.minimum(agg_r, np.hypot(vessels[:, 0] - cx, vessels[:, 1] - cy) / r)
        vessels = vessels[agg_r > 1.15]

    return TissueLayout(
        size=size,
        mpp=params.mpp,
        tissue=tissue.astype(np.float32),
        tumour=tumour.astype(np.float32),
        tumour_dist_um=tumour_dist.astype(np.float32),
        tumour_depth_um=tumour_depth.astype(np.float32),
        lumen=lumen,
        aggregates=aggregates,
        vessels=vessels,
        texture_seed=int(rng.integers(1, 2**31)),
    )
