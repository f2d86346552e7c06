"""The ``if-nuclear`` backend: nuclei from the IF nuclear stain (Hoechst/DAPI).

Denoise, threshold (the slide's Otsu), split touching nuclei by a watershed on the distance
transform seeded at h-maxima. In a run, the stain is read through the registration into the
H&E frame, so the labels are H&E level-0 labels."""

from __future__ import annotations

import numpy as np

from immunocto.segment.nuclei import NucleusParams, segment_foreground

#: Fluorescence has no stained cytoplasm to flatten: global threshold, distance-led seeds.
IF_PARAMS = NucleusParams(smooth_um=0.3, seed_sigma_um=2.0, seed_min_distance_um=2.5, seed_mix=0.9)


def segment_nuclear_stain(
    image: np.ndarray,
    *,
    mpp: float,
    threshold: float | None = None,
    params: NucleusParams = IF_PARAMS,
) -> np.ndarray:
    """Nucleus instance labels of a nuclear-stain image.

    Parameters
    ----------
    image : (h, w) ndarray
        Nuclear stain (raw counts; bright = nucleus).
    mpp : float
        Microns per pixel.
    threshold : float, optional
        Foreground threshold in the image's units (the slide's Otsu in a tiled run); Otsu of
        this image when omitted.

    Returns
    -------
    (h, w) int32 ndarray, 0 = background
    """
    if image.ndim != 2:
        raise ValueError(f"`image` must be (h, w) (got shape {image.shape})")
    return segment_foreground(image, mpp=mpp, threshold=threshold, params=params)
