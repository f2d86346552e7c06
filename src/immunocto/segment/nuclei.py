"""Classical nucleus segmentation shared by the H&E and IF backends.

A foreground image (nuclear-stain intensity or hematoxylin density) is smoothed, optionally
flattened (a wide Gaussian background subtracted), thresholded globally and, optionally,
locally (a pixel must also stand out from its neighbourhood, which catches pale nuclei next to
dark ones), cleaned, and split into nuclei by a watershed seeded at the peaks of a mix of the
distance transform and a Laplacian-of-Gaussian blob response. Lengths are in microns and
converted with ``mpp``, so the same parameters work at 20x and 40x.

Nuclei of another size (cultured cells, tumour nuclei of 15-25 µm) need the parameters scaled
with the nucleus: :func:`scale_params` scales every length by ``diameter_um / 10`` (the
defaults are set for 10 µm nuclei), and :func:`estimate_nucleus_diameter` measures the typical
diameter from the convex (single-nucleus) objects of the thresholded mask.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

#: Nucleus diameter (µm) the default lengths of :class:`NucleusParams` are set for.
REFERENCE_DIAMETER_UM = 10.0
#: Range an estimated or given nucleus diameter is clipped to (µm).
DIAMETER_RANGE_UM = (3.0, 60.0)
#: Equivalent diameter of the thresholded mask -> diameter of the nucleus (see
#: :func:`estimate_nucleus_diameter`).
DIAMETER_FACTOR = 1.15


@dataclass(frozen=True)
class NucleusParams:
    """Parameters of :func:`segment_foreground` (lengths in microns)."""

    smooth_um: float = 0.35  # Gaussian denoising
    background_um: float | None = None  # subtract a Gaussian of this width (None: no flattening)
    threshold_scale: float = 1.0  # multiplies the global (Otsu or given) threshold
    local_um: float | None = None  # also require fg > local mean (Gaussian of this width) + offset
    local_offset: float = 0.0  # in units of the global threshold
    open_um: float = 0.3  # opening radius that detaches thin bridges
    seed_sigma_um: float = 2.0  # LoG scale of the seed response (~ nucleus radius / sqrt 2)
    seed_min_distance_um: float = 2.0  # seeds closer than this merge
    seed_mix: float = 0.6  # weight of the distance transform (1 - it: LoG) in the seed score
    seed_distance_um: float = 3.0  # distance-transform unit of the seed score (capped at 1.5)
    min_area_um2: float = 7.0  # smaller objects are debris
    max_area_um2: float = 600.0  # larger ones are clumps


def scale_params(params: NucleusParams, diameter_um: float) -> NucleusParams:
    """``params`` scaled for nuclei of ``diameter_um``: lengths by ``k = diameter_um / 10``,
    areas by ``k**2``, the seed blob scale and spacing by ``sqrt(k)``.

    ``scale_params(p, REFERENCE_DIAMETER_UM)`` is ``p``. Seeds, smoothing, opening and the area
    limits grow with the nucleus, so a 20 µm nucleus gets one seed where the 10 µm defaults
    would cut it into several.
    """
    lo, hi = DIAMETER_RANGE_UM
    if not lo <= diameter_um <= hi:
        raise ValueError(f"`diameter_um` must be within {lo}-{hi} µm (got {diameter_um:g})")
    k = diameter_um / REFERENCE_DIAMETER_UM
    if k == 1.0:
        return params

    def mul(v: float | None, f: float) -> float | None:
        return None if v is None else v * f

    return replace(
        params,
        smooth_um=params.smooth_um * k,
        background_um=mul(params.background_um, k),
        local_um=mul(params.local_um, k),
        open_um=params.open_um * k,
        # seed scale and spacing grow more slowly: an over-estimated size then still splits
        # touching nuclei (measured on DSB 2018's top half: F1 0.80 vs 0.77 at 1.4x the size)
        seed_sigma_um=params.seed_sigma_um * np.sqrt(k),
        seed_min_distance_um=params.seed_min_distance_um * np.sqrt(k),
        seed_distance_um=params.seed_distance_um * k,
        min_area_um2=params.min_area_um2 * k * k,
        max_area_um2=params.max_area_um2 * k * k,
    )


def estimate_nucleus_diameter(
    images: list[np.ndarray], *, mpp: float, threshold: float, params: NucleusParams
) -> float | None:
    """Typical nucleus diameter (µm) in foreground images, or None when too few nuclei show.

    Thresholds each :func:`foreground_image` at ``threshold``, keeps the convex objects
    (solidity >= 0.9, less for objects of few pixels: single nuclei, not clumps) of at least 3 µm², and returns
    :data:`DIAMETER_FACTOR` x the 90th percentile of their equivalent diameters, clipped to
    :data:`DIAMETER_RANGE_UM`. Needs at least 10 such objects. The upper percentile follows
    the larger nuclei of a mixed population (the ones the 10 µm defaults over-split); the
    factor was chosen on the simulator (0.25-1 µm/px) and the top half of the DSB 2018 image,
    whose bottom half stays a test image (``benchmarks/segment_real.py --dsb``).

    Parameters
    ----------
    images : list of (h, w) ndarray
        Foreground images (:func:`foreground_image` of sample windows).
    """
    from immunocto.segment.measure import object_features

    diameters = []
    for fg in images:
        labels, n = ndimage.label(fg > threshold * params.threshold_scale)
        if not n:
            continue
        props = object_features(labels)  # vectorised moments; solidity from Qhull hulls
        area_px = props["area_px"].astype(np.float64)
        area_um2 = area_px * mpp * mpp
        # pixelated small discs are less solid (0.86 for 50 px): allow for it
        min_solidity = 0.9 - 0.5 / np.sqrt(np.maximum(area_px, 1.0))
        ok = (props["solidity"] >= min_solidity) & (area_um2 >= 3.0)
        diameters.append(2.0 * np.sqrt(area_um2[ok] / np.pi))
    d = np.concatenate(diameters) if diameters else np.zeros(0)
    if len(d) < 10:
        return None
    lo, hi = DIAMETER_RANGE_UM
    return float(np.clip(DIAMETER_FACTOR * np.percentile(d, 90), lo, hi))


def remove_by_area(labels: np.ndarray, min_px: float, max_px: float) -> np.ndarray:
    """Objects outside ``[min_px, max_px]`` set to 0; labels renumbered 1..n in raster order."""
    counts = np.bincount(labels.ravel())
    keep = (counts >= min_px) & (counts <= max_px)
    keep[0] = False
    lookup = np.zeros(len(counts), np.int32)
    lookup[keep] = np.arange(1, keep.sum() + 1, dtype=np.int32)
    return lookup[labels]


def foreground_image(image: np.ndarray, *, mpp: float, params: NucleusParams) -> np.ndarray:
    """The smoothed (and flattened) image that is thresholded; use it to compute a slide-level
    threshold from sample tiles."""
    img = image.astype(np.float32)
    fg = ndimage.gaussian_filter(img, params.smooth_um / mpp)
    if params.background_um:
        # truncated at 3.5 sigma: the support must fit in a tile's halo (see io.tiling)
        fg = fg - ndimage.gaussian_filter(img, params.background_um / mpp, truncate=3.5)
    return fg


def otsu(values: np.ndarray) -> float:
    """Otsu threshold of ``values`` (their maximum + 1 when constant)."""
    from skimage.filters import threshold_otsu

    values = np.asarray(values, np.float32)
    return float(threshold_otsu(values)) if np.ptp(values) > 0 else float(values.max()) + 1.0


def split_touching(
    mask: np.ndarray, smooth: np.ndarray, *, mpp: float, params: NucleusParams, contrast: float
) -> np.ndarray:
    """Instance labels of a nucleus mask: watershed on a distance + LoG score from its peaks.

    Both terms are scaled by fixed quantities (``params.seed_distance_um``; the slide's foreground
    ``contrast``), never by statistics of the window, so a nucleus gets the same seeds in
    whichever tile it is segmented.

    Parameters
    ----------
    mask : (h, w) bool ndarray
    smooth : (h, w) float ndarray
        Smoothed nuclear signal (bright = nucleus), for the blob response.
    contrast : float
        Typical nucleus-vs-background difference of ``smooth`` (the global threshold).
    """
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    dist = ndimage.distance_transform_edt(mask)
    s = params.seed_sigma_um / mpp
    blob = -ndimage.gaussian_laplace(smooth, s) * s * s
    score = params.seed_mix * np.minimum(dist * mpp / params.seed_distance_um, 1.5) + (
        1 - params.seed_mix
    ) * blob / max(abs(contrast), 1e-6)
    components, _ = ndimage.label(mask)
    peaks = peak_local_max(
        score,
        min_distance=max(1, round(params.seed_min_distance_um / mpp)),
        labels=components,
        exclude_border=False,
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    # components without a peak (flat plateaus) still get one seed
    missing = np.setdiff1d(np.unique(components[mask]), np.unique(components[markers > 0]))
    if len(missing):
        centres = ndimage.maximum_position(dist, components, missing)
        for k, (r, c) in enumerate(centres):
            markers[r, c] = len(peaks) + 1 + k
    return watershed(-score, markers, mask=mask).astype(np.int32)


def segment_foreground(
    image: np.ndarray,
    *,
    mpp: float,
    threshold: float | None = None,
    params: NucleusParams = NucleusParams(),
) -> np.ndarray:
    """Nuclei of a single-channel foreground image (bright = nucleus).

    Parameters
    ----------
    image : (h, w) ndarray
        Nuclear-stain intensity or hematoxylin optical density.
    mpp : float
        Microns per pixel.
    threshold : float, optional
        Global threshold on :func:`foreground_image`; Otsu of this image when omitted. Give a
        slide-level value in tiled runs so every tile cuts the same way.

    Returns
    -------
    (h, w) int32 ndarray, 0 = background, objects 1..n
    """
    if mpp <= 0:
        raise ValueError(f"`mpp` must be > 0 (got {mpp})")
    fg = foreground_image(image, mpp=mpp, params=params)
    if threshold is None:
        threshold = otsu(fg)
    mask = fg > threshold * params.threshold_scale
    if params.local_um:
        local = ndimage.gaussian_filter(fg, params.local_um / mpp)
        mask &= fg > local + params.local_offset * abs(threshold)
    r = max(round(params.open_um / mpp), 1)
    disk = np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(mask, disk))
    smooth = ndimage.gaussian_filter(image.astype(np.float32), params.smooth_um / mpp)
    labels = split_touching(mask, smooth, mpp=mpp, params=params, contrast=threshold)
    area = mpp * mpp
    return remove_by_area(labels, params.min_area_um2 / area, params.max_area_um2 / area)
