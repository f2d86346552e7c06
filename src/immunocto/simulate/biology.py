"""The simulated biology: fine cell types, their morphology, and their marker expression.

Sizes are in microns (converted to pixels with the slide's mpp). Expression is in
arbitrary units where ``1.0`` is a typical positive cell; the IF renderer turns it into
16-bit counts. Every table here is data, so a study can change the biology in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from immunocto.conventions import ORION_CHANNELS

#: Fine types, in a fixed order (their index is stored per object).
FINE_TYPES: tuple[str, ...] = (
    "tumour",
    "fibroblast",
    "endothelial",
    "smooth_muscle",
    "plasma",
    "neutrophil",
    "cd4_t",
    "treg",
    "cd8_t",
    "b_cell",
    "macrophage",
    "rbc",  # red blood cell: rendered, but not a nucleated cell and not in truth
)
FINE_INDEX = {name: i for i, name in enumerate(FINE_TYPES)}

#: Our five classes from the fine type. Plasma cells and neutrophils are immune but outside
#: Immunocto's four subtypes; with the non-immune cells they form ``other``.
FINE_TO_CLASS: dict[str, str] = {
    "tumour": "other",
    "fibroblast": "other",
    "endothelial": "other",
    "smooth_muscle": "other",
    "plasma": "other",
    "neutrophil": "other",
    "cd4_t": "cd4_t",
    "treg": "cd4_t",
    "cd8_t": "cd8_t",
    "b_cell": "b_cell",
    "macrophage": "macrophage",
}

T_CELL_TYPES = ("cd4_t", "treg", "cd8_t")
NON_IMMUNE_TYPES = ("tumour", "fibroblast", "endothelial", "smooth_muscle")

#: Macrophage morphologies (deliberately diffuse) and their frequencies.
MACROPHAGE_MORPHS: dict[str, float] = {"round": 0.35, "kidney": 0.25, "foamy": 0.2, "spindle": 0.2}


@dataclass(frozen=True)
class Morphology:
    """Shape and stain appearance of a fine type (sizes in microns).

    The nucleus is an ellipse with semi-axes ``a >= b`` (``a`` = ``radius_um`` * sqrt(aspect),
    ``b`` = ``radius_um`` / sqrt(aspect)), radially modulated by random harmonics of
    relative amplitude ``irregularity``, optionally bent (kidney) or lobed (neutrophil).
    The cell body is an ellipse ``cyto_scale`` times the nucleus plus ``cyto_pad_um``.
    """

    radius_um: float  # mean equivalent nuclear radius
    radius_sd: float
    aspect: float  # mean a/b of the nucleus
    aspect_sd: float
    irregularity: float  # harmonic amplitude of the nuclear outline
    cyto_scale: float
    cyto_pad_um: float
    hema: float  # nuclear hematoxylin density (1 = lymphocyte)
    chrom_rim: float  # 0 dense chromatin .. 1 vesicular with a dark rim
    chrom_grain: float  # chromatin texture amplitude
    cyto_eosin: float
    cyto_hema: float  # amphophilic / basophilic cytoplasm
    autofluor: float  # cytoplasmic autofluorescence (lipofuscin, granules)
    lobes: int = 0  # >0: lobed nucleus (neutrophil)
    nucleolus: bool = False
    eccentric: float = 0.0  # nucleus offset inside the cell, fraction of the cell radius
    has_nucleus: bool = True


MORPHOLOGY: dict[str, Morphology] = {
    "tumour": Morphology(
        6.0, 1.1, 1.35, 0.25, 0.12, 1.9, 1.5, 0.62, 0.75, 0.35, 0.55, 0.08, 0.05, nucleolus=True
    ),
    "fibroblast": Morphology(3.6, 0.5, 3.6, 0.8, 0.05, 1.25, 0.6, 0.85, 0.2, 0.2, 0.45, 0.0, 0.05),
    "endothelial": Morphology(3.4, 0.4, 3.2, 0.6, 0.05, 1.2, 0.5, 0.8, 0.2, 0.2, 0.35, 0.0, 0.05),
    "smooth_muscle": Morphology(
        3.8, 0.4, 4.2, 0.8, 0.04, 1.35, 0.8, 0.7, 0.3, 0.2, 0.75, 0.0, 0.05
    ),
    "plasma": Morphology(
        3.1, 0.3, 1.15, 0.1, 0.05, 1.9, 0.5, 0.9, 0.55, 0.6, 0.35, 0.3, 0.05, eccentric=0.45
    ),
    "neutrophil": Morphology(
        3.4, 0.3, 1.2, 0.1, 0.05, 1.75, 0.3, 1.0, 0.1, 0.25, 0.5, 0.02, 0.25, lobes=3
    ),
    "cd4_t": Morphology(3.35, 0.3, 1.08, 0.06, 0.04, 1.22, 0.3, 1.0, 0.05, 0.25, 0.2, 0.05, 0.03),
    "treg": Morphology(3.35, 0.3, 1.08, 0.06, 0.04, 1.22, 0.3, 1.0, 0.05, 0.25, 0.2, 0.05, 0.03),
    "cd8_t": Morphology(3.3, 0.3, 1.08, 0.06, 0.04, 1.22, 0.3, 1.0, 0.05, 0.25, 0.2, 0.05, 0.03),
    "b_cell": Morphology(3.55, 0.3, 1.06, 0.05, 0.04, 1.2, 0.3, 0.95, 0.1, 0.25, 0.2, 0.05, 0.03),
    "macrophage": Morphology(4.4, 0.8, 1.3, 0.25, 0.1, 2.1, 0.8, 0.55, 0.6, 0.3, 0.38, 0.02, 0.35),
    "rbc": Morphology(
        3.7, 0.2, 1.05, 0.04, 0.02, 1.0, 0.0, 0.0, 0.0, 0.0, 1.25, 0.0, 1.0, has_nucleus=False
    ),
}


@dataclass(frozen=True)
class Expression:
    """Expression of one marker in one fine type.

    A fraction ``p_pos`` of cells is positive with log-normal level
    ``exp(N(log(level), sigma))``; the rest sit at a low background ``neg_level``.
    """

    level: float
    sigma: float = 0.35
    p_pos: float = 1.0


NEG_LEVEL = 0.015
NEG_SIGMA = 0.6

#: Marker compartment: where in the cell the signal lives.
COMPARTMENT: dict[str, str] = {
    "Hoechst": "nuclear",
    "FOXP3": "nuclear",
    "Ki67": "nuclear",
    "CD31": "membrane",
    "CD45": "membrane",
    "CD4": "membrane",
    "CD8a": "membrane",
    "CD45RO": "membrane",
    "CD20": "membrane",
    "PD-L1": "membrane",
    "CD3e": "membrane",
    "E-cadherin": "membrane",
    "PD-1": "membrane",
    "CD68": "cytoplasmic",
    "CD163": "cytoplasmic",
    "Pan-CK": "cytoplasmic",
    "SMA": "cytoplasmic",
    "AF1": "autofluorescence",
    "Argo550": "blank",
}

_LYMPH_T = {
    "Hoechst": Expression(1.0, 0.2),
    "CD45": Expression(1.0),
    "CD3e": Expression(1.0),
    "CD45RO": Expression(0.8, 0.4, 0.55),
    "PD-1": Expression(0.7, 0.5, 0.25),
}

#: Expression per fine type; markers not listed are at background.
EXPRESSION: dict[str, dict[str, Expression]] = {
    "tumour": {
        "Hoechst": Expression(0.85, 0.25),
        "E-cadherin": Expression(1.0, 0.4),
        "Pan-CK": Expression(1.0, 0.4),
        "Ki67": Expression(1.0, 0.3, 0.35),
        "PD-L1": Expression(0.6, 0.6, 0.15),
    },
    "fibroblast": {"Hoechst": Expression(0.9, 0.2), "SMA": Expression(0.6, 0.5, 0.4)},
    "endothelial": {"Hoechst": Expression(0.9, 0.2), "CD31": Expression(1.0, 0.35)},
    "smooth_muscle": {"Hoechst": Expression(0.9, 0.2), "SMA": Expression(1.0, 0.3)},
    "plasma": {
        "Hoechst": Expression(0.95, 0.2),
        "CD45": Expression(0.35, 0.4),
        "CD45RO": Expression(0.3, 0.5, 0.3),
    },
    "neutrophil": {
        "Hoechst": Expression(0.9, 0.2),
        "CD45": Expression(0.6, 0.35),
        "CD68": Expression(0.15, 0.5),
    },
    "cd4_t": {**_LYMPH_T, "CD4": Expression(1.0)},
    "treg": {**_LYMPH_T, "CD4": Expression(0.9), "FOXP3": Expression(1.0, 0.3)},
    "cd8_t": {**_LYMPH_T, "CD8a": Expression(1.0)},
    "b_cell": {
        "Hoechst": Expression(1.0, 0.2),
        "CD45": Expression(1.0),
        "CD20": Expression(1.0),
        "Ki67": Expression(1.0, 0.3, 0.2),
    },
    "macrophage": {
        "Hoechst": Expression(0.8, 0.25),
        "CD45": Expression(0.7, 0.4),
        "CD68": Expression(1.0, 0.45),
        "CD163": Expression(0.8, 0.7, 0.7),
        "PD-L1": Expression(0.6, 0.6, 0.3),
        "CD4": Expression(0.05, 0.5),
    },
    "rbc": {},
}

#: Channels with a biological expression per cell (AF1 and the blank channel have none).
EXPRESSED_MARKERS: tuple[str, ...] = tuple(
    m for m in ORION_CHANNELS if COMPARTMENT[m] not in ("autofluorescence", "blank")
)


def expression_table(fine_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sample true expression for objects of the given fine types.

    Parameters
    ----------
    fine_idx : (N,) int ndarray
        Index into :data:`FINE_TYPES` per object.
    rng : numpy Generator

    Returns
    -------
    (N, C) float32 ndarray
        Expression per object and channel of ``ORION_CHANNELS`` (0 for AF1/blank/RBC).
    """
    n = fine_idx.shape[0]
    n_ch = len(ORION_CHANNELS)
    # Draw every random number for every (cell, channel) so the stream does not depend on
    # which markers a type expresses.
    z = rng.standard_normal((n, n_ch)).astype(np.float32)
    u = rng.random((n, n_ch), dtype=np.float32)
    level = np.full((len(FINE_TYPES), n_ch), NEG_LEVEL, np.float32)
    sigma = np.full((len(FINE_TYPES), n_ch), NEG_SIGMA, np.float32)
    p_pos = np.zeros((len(FINE_TYPES), n_ch), np.float32)
    for t, name in enumerate(FINE_TYPES):
        for marker, ex in EXPRESSION[name].items():
            c = ORION_CHANNELS.index(marker)
            level[t, c], sigma[t, c], p_pos[t, c] = ex.level, ex.sigma, ex.p_pos
    positive = u < p_pos[fine_idx]
    log_level = np.where(positive, np.log(level[fine_idx]), np.log(NEG_LEVEL))
    log_sigma = np.where(positive, sigma[fine_idx], NEG_SIGMA)
    expr = np.exp(log_level + log_sigma * z).astype(np.float32)
    no_expr = [ORION_CHANNELS.index(m) for m in ORION_CHANNELS if m not in EXPRESSED_MARKERS]
    expr[:, no_expr] = 0.0
    expr[fine_idx == FINE_INDEX["rbc"]] = 0.0
    return expr
