"""Checks of a slide pair before any stage spends time on it (one-line errors)."""

from __future__ import annotations

import numpy as np

from immunocto.errors import InputFileError
from immunocto.io.base import BRIGHTFIELD, FLUORESCENCE, Slide

#: Relative difference of physical extent above which H&E and IF cannot be one section.
EXTENT_TOLERANCE = 0.1


def check_pair(he: Slide, if_: Slide | None, *, where: str = "slides[0]") -> None:
    """Raise :class:`InputFileError` when the pair cannot be a co-registered H&E + IF.

    ``where`` names the config entry in messages (e.g. ``slides[2]``).
    """
    if he.kind != BRIGHTFIELD:
        raise InputFileError(
            f"{he.path}: expected an RGB H&E for {where}.he, found {len(he.channel_names)} "
            "fluorescence channel(s); swap `he:` and `if:` if they are the wrong way round"
        )
    if he.mpp is None:
        raise InputFileError(
            f"{he.path}: no pixel size in the file; add `mpp:` (microns per pixel, e.g. 0.325) "
            f"to {where} in immunocto.yaml"
        )
    if if_ is None:
        return
    if if_.kind != FLUORESCENCE:
        raise InputFileError(
            f"{if_.path}: expected multiplexed IF for {where}.if, found an RGB image"
        )
    if if_.dtype == np.uint8:
        raise InputFileError(
            f"{if_.path}: 8-bit IF; intensities are clipped and quantised, so gates and thresholds "
            "would be wrong: export the raw 16-bit (or float) channels"
        )
    if_mpp = if_.mpp if if_.mpp is not None else he.mpp
    he_um = np.array([he.width, he.height]) * he.mpp
    if_um = np.array([if_.width, if_.height]) * if_mpp
    rel = np.abs(he_um - if_um) / np.maximum(he_um, if_um)
    if np.any(rel > EXTENT_TOLERANCE):
        raise InputFileError(
            f"{if_.path}: physical extent {if_um[0]:.0f} x {if_um[1]:.0f} µm disagrees with the H&E "
            f"{he.path.name} ({he_um[0]:.0f} x {he_um[1]:.0f} µm); check that both are the same section "
            f"and that {where}.mpp ({he.mpp:g}, H&E) and the IF pixel size (`{where}.if_mpp` or the IF file: {if_mpp:g}) are right"
        )
