"""H&E nuclei: :func:`segment_he`, the learned network by default (``method="learned"``,
:mod:`immunocto.segment.learned`), or the classical hematoxylin threshold + seeded watershed
(``method="classical"``, the ``he-classical`` backend; for IHC with a hematoxylin counterstain
too)."""

from __future__ import annotations

import os

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


#: Eosin subtracted from hematoxylin: eosinophilic cytoplasm that leaks into the H channel of
#: the deconvolution stops looking like nucleus (CoNSeP F1 +0.01).
EOSIN_WEIGHT = 0.3


def nuclear_density(rgb: np.ndarray) -> np.ndarray:
    """``(h, w)`` float32 hematoxylin minus ``EOSIN_WEIGHT`` x eosin optical density of an
    ``(h, w, 3)`` uint8 H&E image: 0 on glass and stroma, high on nuclei."""
    return hematoxylin_density(rgb, eosin_weight=EOSIN_WEIGHT)


def segment_he(
    rgb: np.ndarray,
    *,
    mpp: float,
    return_types: bool = False,
    method: str = "learned",
    model: str | os.PathLike[str] | None = None,
) -> np.ndarray | tuple[np.ndarray, dict[int, str]]:
    """Nucleus instance labels (and types) of an H&E image.

    Parameters
    ----------
    rgb : (h, w, 3) uint8 ndarray
        Rows ``y``, columns ``x``.
    mpp : float
        Microns per pixel of ``rgb`` (0.25 for 40x, 0.5 for 20x; the learned model resamples
        its input to its own resolution and returns labels on the input's grid).
    return_types : bool
        Also return each nucleus' type (``inflammatory``, ``epithelial``, ``stromal``,
        ``other``); learned method only.
    method : {'learned', 'classical'}
        ``learned``: the nucleus network (the shipped model, or ``model``); ``classical``:
        :func:`segment_he_classical`.
    model : path, optional
        A nucleus model folder (``config.json`` + ``model.safetensors``) instead of the
        shipped one.

    Returns
    -------
    labels : (h, w) int32 ndarray
        0 = background, nuclei 1..n.
    types : dict of int -> str
        Only with ``return_types``: label id -> type name.

    Examples
    --------
    >>> import numpy as np
    >>> from immunocto.segment import segment_he
    >>> segment_he(np.full((256, 256, 3), 230, np.uint8), mpp=0.25).max()
    np.int32(0)
    """
    _check_rgb(rgb, mpp)
    if method == "classical":
        if return_types:
            raise ValueError("`return_types=True` needs method='learned' (classical has no types)")
        return segment_he_classical(rgb, mpp=mpp)
    if method != "learned":
        raise ValueError(f"`method` must be 'learned' or 'classical' (got {method!r})")
    from immunocto.segment.learned import NucleusModel

    net = NucleusModel.load(model)
    labels, type_idx, _ = net.segment(rgb, mpp, with_types=return_types)
    if not return_types:
        return labels
    names = net.types
    return labels, {int(i): names[int(type_idx[i])] for i in range(1, int(labels.max()) + 1)}


def _check_rgb(rgb: np.ndarray, mpp: float) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        raise ValueError(f"`rgb` must be (h, w, 3) uint8 RGB (got shape {shape})")
    if rgb.dtype != np.uint8:
        raise ValueError(f"`rgb` must be uint8 0-255 (got dtype {rgb.dtype})")
    if not (np.isfinite(mpp) and 0.05 <= float(mpp) <= 5.0):
        raise ValueError(f"`mpp` must be microns per pixel between 0.05 and 5 (got {mpp})")


def segment_he_classical(
    rgb: np.ndarray,
    *,
    mpp: float,
    threshold: float | None = None,
    params: NucleusParams = HE_PARAMS,
) -> np.ndarray:
    """Nucleus instance labels of an H&E image by thresholding hematoxylin density.

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
