"""The failure modes of IF-derived labels, planted per cell and recorded in truth.

Biology first (:func:`~immunocto.simulate.biology.expression_table` gives the true
expression), then what the measurement does to it: antibody-penetration gradients, a
weakly staining T-cell subpopulation, nonspecific binding, CD4 on macrophages; spillover
and defocus act at pixel level in the renderers and are described here. Each artifact's
strength multiplies its default amount (0 = off).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from immunocto.conventions import ORION_CHANNELS
from immunocto.simulate.biology import FINE_INDEX, NON_IMMUNE_TYPES, T_CELL_TYPES
from immunocto.simulate.cells import Objects
from immunocto.simulate.noise import lattice_noise
from immunocto.simulate.params import SimParams
from immunocto.simulate.transform import MISREGISTRATION_FLAG_PX, TruthTransform

CH = {name: i for i, name in enumerate(ORION_CHANNELS)}

#: Spillover at strength 1: (source -> target, fraction of the source signal).
SPILLOVER: tuple[tuple[str, str, float], ...] = (
    ("CD4", "CD8a", 0.06),
    ("CD8a", "CD4", 0.03),
    ("CD3e", "CD163", 0.05),
    ("CD68", "CD4", 0.05),
    ("CD20", "PD-L1", 0.04),
    ("CD45", "CD68", 0.03),
    ("Hoechst", "AF1", 0.02),
)

#: How deep the penetration gradient bites per channel (membrane antibodies most).
GRADIENT_DEPTH = {name: (0.3 if name == "Hoechst" else 1.0) for name in ORION_CHANNELS}
GRADIENT_DEPTH["AF1"] = 0.0
GRADIENT_DEPTH["Argo550"] = 0.0

LINEAGE = ("CD45", "CD3e", "CD20", "CD68")


@dataclass
class SlideArtifacts:
    """Pixel-level artifact parameters the renderers need.

    Attributes
    ----------
    spillover : (C, C) ndarray
        ``observed[c] = signal[c] + sum_j spillover[c, j] * signal[j]``.
    focus_patches : (K, 3) ndarray
        Out-of-focus discs in the H&E scan: ``cx, cy, radius`` (level-0 px).
    focus_sigma : float
        Gaussian blur (px) at the centre of a patch.
    gradient_direction : float
        Direction (radians, from +x towards +y) in which antibody penetration worsens.
    gradient_max_loss : float
        Attenuation of membrane markers at the worst-stained edge (0 = none).
    """

    spillover: np.ndarray = field(default_factory=lambda: np.zeros((len(ORION_CHANNELS),) * 2))
    focus_patches: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    focus_sigma: float = 0.0
    gradient_direction: float = 0.0
    gradient_max_loss: float = 0.0

    def focus_weight(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Defocus weight in [0, 1] at H&E positions ``(x, y)`` (1 = fully blurred)."""
        w = np.zeros(np.shape(x), np.float32)
        for cx, cy, r in self.focus_patches:
            d = np.hypot(np.asarray(x) - cx, np.asarray(y) - cy) / r
            t = np.clip((1.0 - d) / 0.35, 0.0, 1.0)
            w = np.maximum(w, (t * t * (3 - 2 * t)).astype(np.float32))
        return w


def spillover_matrix(strength: float) -> np.ndarray:
    """(C, C) crosstalk matrix at ``strength`` (zero diagonal)."""
    m = np.zeros((len(ORION_CHANNELS), len(ORION_CHANNELS)))
    for src, dst, frac in SPILLOVER:
        m[CH[dst], CH[src]] = frac * strength
    return m


def gradient_field(
    x: np.ndarray, y: np.ndarray, size: int, seed: int, rng_dir: float
) -> np.ndarray:
    """Penetration deficit in [0, 1] across the slide: a ramp along a random direction,
    roughened by smooth noise (1 = worst stained)."""
    c = size / 2.0
    proj = ((np.asarray(x) - c) * np.cos(rng_dir) + (np.asarray(y) - c) * np.sin(rng_dir)) / (
        size / 2.0
    )
    g = 0.5 + 0.5 * proj + 0.12 * lattice_noise(x, y, scale=size / 3.0, seed=seed)
    return np.clip(g, 0.0, 1.0)


def plant_artifacts(
    objects: Objects,
    expr_true: np.ndarray,
    params: SimParams,
    transform: TruthTransform,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, np.ndarray], SlideArtifacts]:
    """Apply the per-cell artifacts.

    Parameters
    ----------
    objects : Objects
    expr_true : (N, C) ndarray
        True expression per object and channel of ``ORION_CHANNELS``.
    params : SimParams
    transform : TruthTransform
    rng : numpy Generator

    Returns
    -------
    expr_obs : (N, C) float32 ndarray
        Expression the IF measures (before pixel-level spillover, blur and noise).
    columns : dict of (N,) arrays
        Truth columns: ``art_<name>`` flags and the continuous values behind them.
    slide : SlideArtifacts
        Pixel-level parameters for the renderers.
    """
    n = len(objects)
    x, y = objects.x, objects.y
    fine = objects.fine
    expr = expr_true.astype(np.float32).copy()
    cols: dict[str, np.ndarray] = {}
    s = params.strength
    # Every draw happens whatever the strengths, so switching one artifact off does not
    # change the others.
    u_weak, u_nonspec, u_cd4 = rng.random((3, n))
    u_marker = rng.random((n, 4))
    z_cd4 = rng.standard_normal(n)
    nonspec_amp = rng.uniform(0.35, 1.0, (n, 4))
    grad_dir = float(rng.uniform(0, 2 * np.pi))
    grad_seed = int(rng.integers(1, 2**31))
    nonspec_seed = int(rng.integers(1, 2**31))
    area_mm2 = (params.size * params.mpp / 1000.0) ** 2
    n_focus = max(1, int(rng.poisson(1.0 * area_mm2)))
    focus = np.stack(
        [
            rng.uniform(0.1, 0.9, n_focus) * params.size,
            rng.uniform(0.1, 0.9, n_focus) * params.size,
            rng.uniform(50.0, 140.0, n_focus) / params.mpp,
        ],
        axis=1,
    )

    # Antibody-penetration gradient.
    g = gradient_field(x, y, params.size, grad_seed, grad_dir)
    depth = np.array([GRADIENT_DEPTH[m] for m in ORION_CHANNELS], np.float32)
    max_loss = min(0.45 * s("stain_gradient"), 0.9)
    att = np.clip(1.0 - max_loss * g[:, None] * depth[None, :], 0.05, 1.0)
    expr *= att.astype(np.float32)
    lineage = [CH[m] for m in LINEAGE]
    cols["stain_attenuation"] = att[:, lineage].mean(axis=1).astype(np.float32)
    cols["art_stain_gradient"] = cols["stain_attenuation"] < 0.85

    # Weakly staining T cells.
    is_t = np.isin(fine, [FINE_INDEX[t] for t in T_CELL_TYPES])
    weak = is_t & (u_weak < min(0.15 * s("weak_staining"), 0.6))
    expr[weak, CH["CD3e"]] *= 0.12
    expr[weak, CH["CD45"]] *= 0.45
    cols["art_weak_staining"] = weak

    # Weakly staining B cells and macrophages: lineage markers at 25-60 % (CD45 at 60-80 %).
    # The draws are the per-cell uniforms above, which B cells and macrophages did not use, so
    # the other artifacts are unchanged by this one.
    dim = 0.25 + 0.35 * u_marker[:, 0]
    weak_bm = np.zeros(n, bool)
    for cell_type, markers in (("b_cell", ("CD20",)), ("macrophage", ("CD68", "CD163"))):
        hit = (fine == FINE_INDEX[cell_type]) & (u_weak < min(0.15 * s("weak_lineage"), 0.75))
        for marker in markers:
            expr[hit, CH[marker]] *= dim[hit]
        expr[hit, CH["CD45"]] *= 0.6 + 0.2 * u_marker[hit, 1]
        weak_bm |= hit
    cols["art_weak_lineage"] = weak_bm

    # Nonspecific binding in non-immune cells, patchy over the slide.
    non_immune = np.isin(fine, [FINE_INDEX[t] for t in NON_IMMUNE_TYPES])
    patchy = (
        np.clip(0.5 + 0.5 * lattice_noise(x, y, scale=600.0, seed=nonspec_seed), 0.0, 1.0) * 2.0
    )
    sticky = non_immune & (u_nonspec < min(0.04 * s("nonspecific"), 0.5) * patchy)
    for k, marker in enumerate(("CD45", "CD3e", "CD20", "CD8a")):
        hit = sticky & (u_marker[:, k] < 0.65)
        expr[hit, CH[marker]] += nonspec_amp[hit, k].astype(np.float32) * att[hit, CH[marker]]
    cols["art_nonspecific"] = sticky

    # CD4 on macrophages.
    is_mac = fine == FINE_INDEX["macrophage"]
    cd4_mac = is_mac & (u_cd4 < min(0.35 * s("cd4_macrophage"), 0.9))
    expr[cd4_mac, CH["CD4"]] = (
        np.exp(np.log(0.55) + 0.4 * z_cd4[cd4_mac]) * att[cd4_mac, CH["CD4"]]
    ).astype(np.float32)
    cols["art_cd4_macrophage"] = cd4_mac

    # Spillover (applied to pixels by the IF renderer); flag the cells where it matters.
    spill = spillover_matrix(s("spillover"))
    received = expr @ spill.T
    cols["art_spillover"] = np.any((received > 0.12) & (received > 0.5 * expr), axis=1)

    # Misregistration (the transform is applied when the IF is rendered).
    if_x, if_y = transform.he_to_if(x, y)
    dx, dy = transform.local_displacement(x, y)
    cols["if_x"] = if_x.astype(np.float32)
    cols["if_y"] = if_y.astype(np.float32)
    cols["reg_dx"] = dx.astype(np.float32)
    cols["reg_dy"] = dy.astype(np.float32)
    cols["art_misregistration"] = np.hypot(dx, dy) >= MISREGISTRATION_FLAG_PX

    # Out-of-focus patches in the H&E scan.
    slide = SlideArtifacts(
        spillover=spill,
        focus_patches=focus if s("out_of_focus") > 0 else np.zeros((0, 3)),
        focus_sigma=float(min(2.2 * s("out_of_focus"), 7.0)),
        gradient_direction=grad_dir,
        gradient_max_loss=max_loss,
    )
    w = slide.focus_weight(x, y)
    cols["focus_blur_px"] = (w * slide.focus_sigma).astype(np.float32)
    cols["art_out_of_focus"] = (w > 0.5) & (slide.focus_sigma > 0)

    for name in list(cols):
        if name.startswith("art_"):
            cols[name] = np.asarray(cols[name], bool) & objects.is_cell
    return expr, cols, slide
