"""Cell placement and per-cell shape parameters.

Sites are placed by random sequential adsorption with a region-dependent hard core (dense
lymphoid aggregates, packed tumour nests, sparse stroma); the fine type of each site is
then drawn from its region's composition, so type proportions per region are exactly the
configured ones in expectation (placing typed candidates would favour small cells).

The slide is processed in square superblocks in raster order; a superblock sees the cells
already accepted in earlier superblocks as obstacles, so the result is the same whatever
the slide size and is never held as one big candidate set.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.spatial import cKDTree

from immunocto.simulate.biology import (
    FINE_INDEX,
    FINE_TYPES,
    MACROPHAGE_MORPHS,
    MORPHOLOGY,
)
from immunocto.simulate.layout import (
    COMPOSITION,
    DENSITY,
    HARD_CORE_UM,
    RBC_DENSITY,
    REGION_INDEX,
    REGIONS,
    TissueLayout,
)
from immunocto.simulate.noise import lattice_noise
from immunocto.simulate.params import SimParams

SUPERBLOCK = 2048

RBC_HARD_CORE_UM = 6.8
OVERSAMPLE = 2.0

#: Shape-harmonic orders of the nuclear outline.
HARMONICS = (2, 3, 4)

#: Fibre field: isolines of ``FIBRE_TURNS * lattice_noise(scale=FIBRE_SCALE_UM)`` are the
#: collagen bundles; spindle cells lie along them.
FIBRE_SCALE_UM = 55.0
FIBRE_TURNS = 5.0


@dataclass
class Objects:
    """Struct of arrays, one entry per rendered object (cells and red blood cells).

    Positions ``x``, ``y`` are level-0 H&E pixels; lengths are pixels; angles radians
    (``theta`` is the direction of the nuclear major axis, measured from +x towards +y).
    """

    x: np.ndarray
    y: np.ndarray
    fine: np.ndarray  # int8 index into FINE_TYPES
    region: np.ndarray  # int8 index into REGIONS
    morph: np.ndarray  # int8: macrophage morphology index, -1 otherwise
    a: np.ndarray  # nuclear semi-major axis
    b: np.ndarray  # nuclear semi-minor axis
    theta: np.ndarray
    bend: np.ndarray  # kidney-shaped bending of the nucleus (0 = none)
    harm_amp: np.ndarray  # (N, 3) amplitudes of HARMONICS
    harm_phase: np.ndarray  # (N, 3)
    nuc_offset: np.ndarray  # offset of the nucleus along the major axis (eccentric nuclei)
    cyto_a: np.ndarray  # cell-body semi-axes
    cyto_b: np.ndarray
    hema: np.ndarray
    chrom_rim: np.ndarray
    chrom_grain: np.ndarray
    cyto_eosin: np.ndarray
    cyto_hema: np.ndarray
    autofluor: np.ndarray
    foam: np.ndarray  # 1 for foamy macrophages
    nucleolus: (
        np.ndarray
    )  # (N, 3): u, v offset (px, in the nuclear frame) and radius; radius 0 = none

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, idx: np.ndarray) -> Objects:
        """A new :class:`Objects` with the rows ``idx``."""
        return Objects(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @property
    def is_cell(self) -> np.ndarray:
        return self.fine != FINE_INDEX["rbc"]

    def extent(self) -> np.ndarray:
        """Radius (px) of a disc around ``(x, y)`` containing the whole object."""
        nuc = self.a * (1.0 + np.abs(self.harm_amp).sum(axis=1)) + np.abs(self.nuc_offset)
        return np.maximum(nuc, np.maximum(self.cyto_a, self.cyto_b)) + 2.0


def placeholder_objects() -> Objects:
    """One all-zero object: lets per-pixel lookups (index 0) run on tiles with no cells,
    where every coverage is zero anyway."""
    z = np.zeros(1, np.float32)
    return Objects(
        x=z, y=z, fine=np.zeros(1, np.int8), region=np.zeros(1, np.int8),
        morph=np.full(1, -1, np.int8), a=z, b=z, theta=z, bend=z,
        harm_amp=np.zeros((1, len(HARMONICS)), np.float32),
        harm_phase=np.zeros((1, len(HARMONICS)), np.float32),
        nuc_offset=z, cyto_a=z + 1, cyto_b=z + 1, hema=z, chrom_rim=z, chrom_grain=z,
        cyto_eosin=z, cyto_hema=z, autofluor=z, foam=z, nucleolus=np.zeros((1, 3), np.float32),
    )  # fmt: skip


def fibre_field(x: np.ndarray, y: np.ndarray, seed: int, mpp: float) -> np.ndarray:
    """Scalar field whose isolines are the collagen fibres (see ``FIBRE_TURNS``)."""
    return FIBRE_TURNS * lattice_noise(x, y, scale=FIBRE_SCALE_UM / mpp, seed=seed)


def fibre_angle(x: np.ndarray, y: np.ndarray, seed: int, mpp: float) -> np.ndarray:
    """Direction of the fibres at ``(x, y)`` (perpendicular to the field gradient)."""
    h = 1.5
    gx = fibre_field(x + h, y, seed, mpp) - fibre_field(x - h, y, seed, mpp)
    gy = fibre_field(x, y + h, seed, mpp) - fibre_field(x, y - h, seed, mpp)
    return (np.arctan2(gy, gx) + np.pi / 2).astype(np.float32)


# ----------------------------------------------------------------------------- sites


def _greedy_hard_core(pts: np.ndarray, core: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Random sequential adsorption in priority order, solved in parallel rounds.

    A candidate is accepted when no still-alive conflicting candidate has a lower priority;
    its conflicting neighbours are then removed. This gives exactly the result of adding
    candidates one by one in priority order (lowest first), with vectorised rounds.

    Parameters
    ----------
    pts : (N, 2) float ndarray
    core : (N,) float ndarray
        Hard-core diameter per candidate; ``i`` and ``j`` conflict when closer than
        ``(core_i + core_j) / 2``.
    priority : (N,) float ndarray, all distinct

    Returns
    -------
    (N,) bool ndarray, accepted candidates
    """
    n = len(pts)
    if n == 0:
        return np.zeros(0, bool)
    pairs = cKDTree(pts).query_pairs(r=float(core.max()), output_type="ndarray")
    if len(pairs):
        d = np.hypot(*(pts[pairs[:, 0]] - pts[pairs[:, 1]]).T)
        pairs = pairs[d < (core[pairs[:, 0]] + core[pairs[:, 1]]) / 2]
    # Orient each pair as (lower priority, higher priority).
    swap = priority[pairs[:, 0]] > priority[pairs[:, 1]]
    low = np.where(swap, pairs[:, 1], pairs[:, 0])
    high = np.where(swap, pairs[:, 0], pairs[:, 1])
    alive = np.ones(n, bool)
    accepted = np.zeros(n, bool)
    while alive.any():
        live_pair = alive[low] & alive[high]
        blocked = np.zeros(n, bool)
        blocked[high[live_pair]] = True
        winners = alive & ~blocked
        accepted |= winners
        alive &= ~winners
        lose = np.concatenate([high[winners[low]], low[winners[high]]])
        alive[lose] = False
    return accepted


def _place_sites(
    layout: TissueLayout,
    bounds: tuple[float, float, float, float],
    density: dict[str, float],
    core_um: dict[str, float],
    rng: np.random.Generator,
    obstacles: np.ndarray,
    obstacle_core: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sites in ``bounds = (x0, y0, x1, y1)`` avoiding ``obstacles``.

    Returns positions ``(M, 2)``, their region codes ``(M,)`` and hard-core diameters (px).
    """
    x0, y0, x1, y1 = bounds
    mpp = layout.mpp
    area_um2 = (x1 - x0) * (y1 - y0) * mpp * mpp
    lam_max = max(density.values()) * OVERSAMPLE / 1e4
    n = int(rng.poisson(lam_max * area_um2))
    xs = rng.uniform(x0, x1, n)
    ys = rng.uniform(y0, y1, n)
    keep_u = rng.random(n)
    priority = rng.random(n)
    region = layout.regions(xs, ys)
    dens = np.zeros(len(REGIONS))
    core_px = np.zeros(len(REGIONS))
    for name, value in density.items():
        dens[REGION_INDEX[name]] = value * OVERSAMPLE / 1e4
    for name, value in core_um.items():
        core_px[REGION_INDEX[name]] = value / mpp
    keep = keep_u < dens[region] / lam_max
    pts = np.stack([xs[keep], ys[keep]], axis=1)
    region = region[keep]
    priority = priority[keep]
    core = core_px[region]
    if len(obstacles) and len(pts):
        reach = float(max(core.max(), obstacle_core.max()))
        near = cKDTree(pts).sparse_distance_matrix(cKDTree(obstacles), reach, output_type="ndarray")
        clash = near["v"] < (core[near["i"]] + obstacle_core[near["j"]]) / 2
        ok = np.ones(len(pts), bool)
        ok[near["i"][clash]] = False
        pts, region, priority, core = pts[ok], region[ok], priority[ok], core[ok]
    accepted = _greedy_hard_core(pts, core, priority)
    return pts[accepted], region[accepted], core[accepted]


def place_sites(
    layout: TissueLayout, params: SimParams, *, rbc: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Sites for nucleated cells (or, with ``rbc``, red blood cells) over the whole slide.

    Returns
    -------
    pts : (N, 2) float64 ndarray of (x, y) in level-0 px
    region : (N,) int8 ndarray
    """
    if rbc:
        density = {"vessel_lumen": RBC_DENSITY}
        core_um = {"vessel_lumen": RBC_HARD_CORE_UM}
    else:
        density = {k: v for k, v in DENSITY.items() if v > 0}
        core_um = HARD_CORE_UM
    size = params.size
    n_sb = -(-size // SUPERBLOCK)
    halo = max(core_um.values()) / params.mpp
    all_pts: list[np.ndarray] = []
    all_reg: list[np.ndarray] = []
    all_core: list[np.ndarray] = []
    done_pts = np.zeros((0, 2))
    done_core = np.zeros(0)
    for by in range(n_sb):
        for bx in range(n_sb):
            rng = np.random.default_rng([params.seed, params.slide_index, 1 + int(rbc), by, bx])
            bounds = (
                bx * SUPERBLOCK,
                by * SUPERBLOCK,
                min((bx + 1) * SUPERBLOCK, size),
                min((by + 1) * SUPERBLOCK, size),
            )
            near = (
                (done_pts[:, 0] > bounds[0] - halo)
                & (done_pts[:, 0] < bounds[2] + halo)
                & (done_pts[:, 1] > bounds[1] - halo)
                & (done_pts[:, 1] < bounds[3] + halo)
            )
            pts, reg, core = _place_sites(
                layout, bounds, density, core_um, rng, done_pts[near], done_core[near]
            )
            all_pts.append(pts)
            all_reg.append(reg)
            all_core.append(core)
            # Keep as obstacles only the sites that can reach a superblock still to come:
            # the rest of this row (right of here) and every later row.
            done_pts = np.concatenate([done_pts, pts])
            done_core = np.concatenate([done_core, core])
            keep = (done_pts[:, 1] >= (by + 1) * SUPERBLOCK - halo) | (
                (done_pts[:, 0] >= (bx + 1) * SUPERBLOCK - halo)
                & (done_pts[:, 1] >= by * SUPERBLOCK - halo)
            )
            done_pts, done_core = done_pts[keep], done_core[keep]
    return np.concatenate(all_pts), np.concatenate(all_reg).astype(np.int8)


# ----------------------------------------------------------------------------- types


def draw_fine_types(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fine type per site from :data:`COMPOSITION` of its region (int8 indices)."""
    u = rng.random(region.shape[0])
    fine = np.full(region.shape[0], -1, np.int8)
    for name, comp in COMPOSITION.items():
        sel = region == REGION_INDEX[name]
        if not sel.any():
            continue
        names = list(comp)
        cum = np.cumsum([comp[k] for k in names])
        cum /= cum[-1]
        pick = np.searchsorted(cum, u[sel], side="right")
        fine[sel] = np.array([FINE_INDEX[k] for k in names], np.int8)[
            np.minimum(pick, len(names) - 1)
        ]
    if (fine < 0).any():
        bad = sorted({REGIONS[r] for r in region[fine < 0]})
        raise ValueError(f"no composition for region(s) {bad}")
    return fine


def build_objects(
    pts: np.ndarray,
    region: np.ndarray,
    fine: np.ndarray,
    layout: TissueLayout,
    params: SimParams,
    rng: np.random.Generator,
) -> Objects:
    """Shape and stain parameters for every site (vectorised over cells)."""
    n = len(pts)
    mpp = params.mpp
    x = pts[:, 0].astype(np.float32)
    y = pts[:, 1].astype(np.float32)

    def per_type(attr: str) -> np.ndarray:
        table = np.array([getattr(MORPHOLOGY[t], attr) for t in FINE_TYPES], np.float32)
        return table[fine]

    # All random draws happen for every cell, in a fixed order: reproducible streams.
    z_r, z_asp = rng.standard_normal((2, n)).astype(np.float32)
    u_theta, u_morph, u_bend = rng.random((3, n)).astype(np.float32)
    harm_u = rng.uniform(-1.0, 1.0, (n, len(HARMONICS))).astype(np.float32)
    harm_phase = rng.uniform(0, 2 * np.pi, (n, len(HARMONICS))).astype(np.float32)
    nucleolus_u = rng.uniform(-0.35, 0.35, (n, 2)).astype(np.float32)
    z_stain = rng.standard_normal((3, n)).astype(np.float32)

    radius = np.maximum(
        per_type("radius_um") + per_type("radius_sd") * z_r, 0.6 * per_type("radius_um")
    )
    aspect = np.maximum(per_type("aspect") + per_type("aspect_sd") * z_asp, 1.0)
    cyto_scale = per_type("cyto_scale").copy()
    cyto_pad = per_type("cyto_pad_um").copy()
    bend = np.zeros(n, np.float32)
    foam = np.zeros(n, np.float32)
    eccentric = per_type("eccentric").copy()
    morph = np.full(n, -1, np.int8)

    is_mac = fine == FINE_INDEX["macrophage"]
    if is_mac.any():
        names = list(MACROPHAGE_MORPHS)
        cum = np.cumsum(list(MACROPHAGE_MORPHS.values()))
        m = np.minimum(
            np.searchsorted(cum / cum[-1], u_morph[is_mac], side="right"), len(names) - 1
        )
        morph[is_mac] = m
        kidney = is_mac & (morph == names.index("kidney"))
        foamy = is_mac & (morph == names.index("foamy"))
        spindle = is_mac & (morph == names.index("spindle"))
        rounded = is_mac & (morph == names.index("round"))
        bend[kidney] = 0.35 + 0.3 * u_bend[kidney]
        aspect[kidney] = np.maximum(aspect[kidney], 1.45)
        aspect[spindle] = 2.6 + 0.8 * u_bend[spindle]
        cyto_scale[spindle] = 1.55
        aspect[rounded] = np.minimum(aspect[rounded], 1.25)
        foam[foamy] = 1.0
        cyto_scale[foamy] = 2.9
        radius[foamy] *= 0.85
        eccentric[foamy] = 0.3

    a_um = radius * np.sqrt(aspect)
    b_um = radius / np.sqrt(aspect)

    # Nearest-neighbour distance caps the nucleus so neighbours touch rather than overlap.
    if n > 1:
        nn = cKDTree(pts).query(pts, k=2)[0][:, 1].astype(np.float32) * mpp
        cap = np.clip(0.62 * nn / a_um, 0.45, 1.0)
        a_um *= cap
        b_um *= np.maximum(cap, np.minimum(1.0, 0.62 * nn / np.maximum(b_um, 1e-3)))
        b_um = np.minimum(b_um, a_um)

    # Orientation: spindle cells follow the fibres (or wrap around their vessel).
    theta = (u_theta * np.pi).astype(np.float32)
    along_fibres = np.isin(fine, [FINE_INDEX["fibroblast"], FINE_INDEX["smooth_muscle"]]) | (
        is_mac & (morph == list(MACROPHAGE_MORPHS).index("spindle"))
    )
    if along_fibres.any():
        theta[along_fibres] = fibre_angle(
            x[along_fibres], y[along_fibres], layout.texture_seed, mpp
        )
    wall = np.isin(fine, [FINE_INDEX["endothelial"], FINE_INDEX["smooth_muscle"]]) & (
        region == REGION_INDEX["vessel_wall"]
    )
    if wall.any() and len(layout.vessels):
        _, iv = cKDTree(layout.vessels[:, :2]).query(pts[wall])
        radial = np.arctan2(y[wall] - layout.vessels[iv, 1], x[wall] - layout.vessels[iv, 0])
        theta[wall] = (radial + np.pi / 2).astype(np.float32)

    harm_amp = per_type("irregularity")[:, None] * harm_u
    lobes = per_type("lobes")
    lobed = lobes > 0
    harm_amp[lobed, HARMONICS.index(3)] = 0.32  # trefoil: three lobes

    nuc_offset = eccentric * (a_um * cyto_scale) / mpp * 0.8
    cyto_a = (a_um * cyto_scale + cyto_pad) / mpp
    cyto_b = (b_um * cyto_scale + cyto_pad) / mpp
    has_nucleus = per_type("has_nucleus") > 0
    a_px = np.where(has_nucleus, a_um / mpp, 0.0).astype(np.float32)
    b_px = np.where(has_nucleus, b_um / mpp, 0.0).astype(np.float32)
    # Red cells: the "cell body" is the disc.
    rbc = ~has_nucleus
    cyto_a[rbc] = a_um[rbc] / mpp
    cyto_b[rbc] = b_um[rbc] / mpp

    nucleolus = np.zeros((n, 3), np.float32)
    with_nucleolus = per_type("nucleolus") > 0
    nucleolus[with_nucleolus, :2] = nucleolus_u[with_nucleolus] * a_px[with_nucleolus, None]
    nucleolus[with_nucleolus, 2] = 0.9 / mpp

    stain_jitter = np.exp(0.12 * z_stain).astype(np.float32)
    return Objects(
        x=x,
        y=y,
        fine=fine.astype(np.int8),
        region=region.astype(np.int8),
        morph=morph,
        a=a_px,
        b=b_px,
        theta=theta,
        bend=bend,
        harm_amp=harm_amp.astype(np.float32),
        harm_phase=harm_phase,
        nuc_offset=nuc_offset.astype(np.float32),
        cyto_a=cyto_a.astype(np.float32),
        cyto_b=cyto_b.astype(np.float32),
        hema=per_type("hema") * stain_jitter[0],
        chrom_rim=per_type("chrom_rim"),
        chrom_grain=per_type("chrom_grain"),
        cyto_eosin=per_type("cyto_eosin") * stain_jitter[1],
        cyto_hema=per_type("cyto_hema") * stain_jitter[2],
        autofluor=per_type("autofluor"),
        foam=foam,
        nucleolus=nucleolus,
    )


def generate_objects(layout: TissueLayout, params: SimParams, rng: np.random.Generator) -> Objects:
    """All objects of a slide: nucleated cells first (in raster order of superblocks), then
    red blood cells. Cell ``i`` (0-based) gets ``cell_id = i + 1``."""
    pts, region = place_sites(layout, params)
    fine = draw_fine_types(region, rng)
    rbc_pts, rbc_region = place_sites(layout, params, rbc=True)
    rbc_fine = np.full(len(rbc_pts), FINE_INDEX["rbc"], np.int8)
    all_pts = np.concatenate([pts, rbc_pts])
    return build_objects(
        all_pts,
        np.concatenate([region, rbc_region]),
        np.concatenate([fine, rbc_fine]),
        layout,
        params,
        rng,
    )
