"""The ``if-nuclear`` backend: nuclei from the IF nuclear stain (Hoechst/DAPI).

Denoise, threshold (the slide's Otsu), split touching nuclei by a watershed seeded at the
peaks of a distance + blob score. Every length scales with the nucleus diameter
(``diameter_um``: given, or ``"auto"`` = measured from the image's convex single nuclei), so a
20 µm nucleus at 0.5 µm/px stays whole and 6 µm lymphocytes still split. In a run, the stain
is read through the registration into the H&E frame, so the labels are H&E level-0 labels."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from immunocto.segment.nuclei import (
    REFERENCE_DIAMETER_UM,
    NucleusParams,
    estimate_nucleus_diameter,
    foreground_image,
    otsu,
    scale_params,
    segment_foreground,
)

log = logging.getLogger(__name__)

#: Fluorescence has no stained cytoplasm to flatten: global threshold, distance-led seeds.
#: Lengths are for 10 µm nuclei (:data:`REFERENCE_DIAMETER_UM`); :func:`scale_params` rescales.
IF_PARAMS = NucleusParams(smooth_um=0.3, seed_sigma_um=2.0, seed_min_distance_um=2.5, seed_mix=0.9)


def resolve_diameter(
    diameter_um: float | str | None,
    foregrounds: list[np.ndarray],
    *,
    mpp: float,
    threshold: float,
    params: NucleusParams = IF_PARAMS,
) -> float:
    """The nucleus diameter to segment with: ``diameter_um`` when a number, else (``"auto"``)
    the estimate from ``foregrounds`` (:func:`foreground_image` of sample windows), falling
    back to :data:`REFERENCE_DIAMETER_UM` when too few single nuclei show."""
    if diameter_um is None:
        return REFERENCE_DIAMETER_UM
    if isinstance(diameter_um, str):
        if diameter_um != "auto":
            raise ValueError(f"`diameter_um` must be a number or 'auto' (got {diameter_um!r})")
        est = estimate_nucleus_diameter(foregrounds, mpp=mpp, threshold=threshold, params=params)
        if est is None:
            log.info(
                "too few single nuclei to measure their size; using %g µm", REFERENCE_DIAMETER_UM
            )
            return REFERENCE_DIAMETER_UM
        return est
    return float(diameter_um)


def segment_nuclear_stain(
    image: np.ndarray,
    *,
    mpp: float,
    threshold: float | None = None,
    diameter_um: float | str | None = "auto",
    params: NucleusParams = IF_PARAMS,
    method: str = "classical",
    model: str | Path | None = None,
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
    diameter_um : float, 'auto' or None
        Typical nucleus diameter in microns; ``"auto"`` measures it from this image; None =
        the 10 µm the defaults are set for. Give a slide-level value in tiled runs.
    params : NucleusParams
        Lengths for 10 µm nuclei; scaled to ``diameter_um``.
    method : {"classical", "learned"}
        ``classical``: threshold + watershed (above); ``learned``: the fluorescence nucleus
        network (``model``: its folder, default the one shipped in the package; needs the
        ``train`` extra). ``threshold``, ``diameter_um`` and ``params`` are classical only.

    Returns
    -------
    (h, w) int32 ndarray, 0 = background
    """
    if image.ndim != 2:
        raise ValueError(f"`image` must be (h, w) (got shape {image.shape})")
    if mpp <= 0:
        raise ValueError(f"`mpp` must be > 0 (got {mpp})")
    if method == "learned":
        from immunocto.segment.learned import SHIPPED_IF, NucleusModel, shipped_model_dir

        net = NucleusModel.load(model if model is not None else shipped_model_dir(SHIPPED_IF))
        return net.segment(image, mpp, adapt=False, with_types=False)[0]
    if method != "classical":
        raise ValueError(f"`method` must be 'classical' or 'learned' (got {method!r})")
    if diameter_um == "auto":
        fg = foreground_image(image, mpp=mpp, params=params)
        thr = otsu(fg) if threshold is None else threshold
        diameter_um = resolve_diameter("auto", [fg], mpp=mpp, threshold=thr, params=params)
    params = scale_params(params, resolve_diameter(diameter_um, [], mpp=mpp, threshold=0.0))
    return segment_foreground(image, mpp=mpp, threshold=threshold, params=params)
