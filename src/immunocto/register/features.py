"""What registration compares: hematoxylin density of the H&E against the nuclear stain."""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2hed


def hematoxylin_density(rgb: np.ndarray, eosin_weight: float = 0.0) -> np.ndarray:
    """Hematoxylin optical density by colour deconvolution (Ruifrok & Johnston), minus
    ``eosin_weight`` x the eosin density (eosinophilic cytoplasm leaking into the H channel).

    Parameters
    ----------
    rgb : (h, w, 3) uint8 ndarray
    eosin_weight : float
        0 for registration; the H&E segmentation uses ``segment.he.EOSIN_WEIGHT``.

    Returns
    -------
    (h, w) float32 ndarray, 0 on glass, larger on nuclei
    """
    hed = rgb2hed(rgb)
    h = hed[..., 0] - eosin_weight * hed[..., 1] if eosin_weight else hed[..., 0]
    return np.clip(h, 0.0, None).astype(np.float32)


def nuclear_signal(channel: np.ndarray) -> np.ndarray:
    """The nuclear stain on a log scale (compresses bright nuclei against dim ones)."""
    return np.log1p(channel.astype(np.float32))


def standardise(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (a constant image stays zero)."""
    image = image.astype(np.float32)
    std = float(image.std())
    return (image - float(image.mean())) / (std if std > 0 else 1.0)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two same-shape images, in [-1, 1]."""
    a = standardise(a)
    b = standardise(b)
    return float((a * b).mean())
