"""The ``he`` backend: nuclei from hematoxylin (colour deconvolution) + seeded watershed.

For H&E-only slides (and IHC with a hematoxylin counterstain)."""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2hed

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


#: Eosin subtracted from hematoxylin: eosinophilic cytoplasm that leaks into the H channel of
#: the deconvolution stops looking like nucleus (CoNSeP F1 +0.01).
EOSIN_WEIGHT = 0.3


def nuclear_density(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin minus ``EOSIN_WEIGHT`` x eosin optical density (colour deconvolution).

    Parameters
    ----------
    rgb : (h, w, 3) uint8 ndarray

    Returns
    -------
    (h, w) float32 ndarray, 0 on glass and stroma, high on nuclei
    """
    hed = rgb2hed(rgb)
    return np.clip(hed[..., 0] - EOSIN_WEIGHT * hed[..., 1], 0.0, None).astype(np.float32)


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
        Threshold on the flattened :func:`nuclear_density` (Otsu of the image when omitted).

    Returns
    -------
    (h, w) int32 ndarray, 0 = background
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"`rgb` must be (h, w, 3) (got shape {rgb.shape})")
    return segment_foreground(nuclear_density(rgb), mpp=mpp, threshold=threshold, params=params)
