"""The ``he`` backend: nuclei from hematoxylin (colour deconvolution) + seeded watershed.

For H&E-only slides (and IHC with a hematoxylin counterstain)."""

from __future__ import annotations

import numpy as np

from immunocto.register.features import hematoxylin_density
from immunocto.segment.nuclei import NucleusParams, segment_foreground

#: Tuned on CoNSeP and simulated H&E together (benchmarks/segment_real.py, segment_sim.py):
#: flatten the cytoplasm/stroma hematoxylin, keep pale nuclei that stand out locally, seed
#: mostly by distance (a little blob response splits touching lymphocytes).
HE_PARAMS = NucleusParams(
    smooth_um=0.35,
    background_um=6.0,
    threshold_scale=0.6,
    local_um=3.0,
    local_offset=-0.2,
    seed_sigma_um=2.0,
    seed_min_distance_um=2.0,
    seed_mix=0.97,
)


def segment_he(
    rgb: np.ndarray,
    *,
    mpp: float,
    threshold: float | None = None,
    params: NucleusParams = HE_PARAMS,
) -> np.ndarray:
    """Nucleus instance labels of an H&E image.

    Parameters
    ----------
    rgb : (h, w, 3) uint8 ndarray
    mpp : float
        Microns per pixel of ``rgb``.
    threshold : float, optional
        Hematoxylin optical-density threshold (Otsu of the image when omitted).

    Returns
    -------
    (h, w) int32 ndarray, 0 = background
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"`rgb` must be (h, w, 3) (got shape {rgb.shape})")
    return segment_foreground(hematoxylin_density(rgb), mpp=mpp, threshold=threshold, params=params)
