"""Reading IF through the registration: IF pixels resampled onto the H&E pixel grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from immunocto.io.base import Slide
from immunocto.register.model import RegistrationModel


def read_if_in_he_frame(
    if_: Slide,
    model: RegistrationModel,
    x: int,
    y: int,
    w: int,
    h: int,
    *,
    channels: Sequence[str | int] | None = None,
    order: int = 1,
) -> np.ndarray:
    """IF channels of the H&E window ``[y:y+h, x:x+w]`` (level-0 H&E px), registered.

    Each output pixel shows the IF at ``model.he_to_if`` of its H&E position (affine plus
    local residual), interpolated with spline ``order`` (1 = bilinear).

    Returns
    -------
    (c, h, w) float32 ndarray
    """
    u, v = model.he_to_if_window(x, y, w, h)
    u0 = int(np.floor(u.min())) - 2
    v0 = int(np.floor(v.min())) - 2
    u1 = int(np.ceil(u.max())) + 3
    v1 = int(np.ceil(v.max())) + 3
    block = if_.read_region(u0, v0, u1 - u0, v1 - v0, channels=channels).astype(np.float32)
    coords = np.stack([(v - v0).ravel(), (u - u0).ravel()])
    out = np.empty((block.shape[0], h, w), np.float32)
    for c in range(block.shape[0]):
        out[c] = ndimage.map_coordinates(block[c], coords, order=order, mode="nearest").reshape(
            h, w
        )
    return out
