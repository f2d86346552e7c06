"""An in-memory H&E image as a :class:`~immunocto.io.base.Slide` (one level), for patches that
come as arrays (e.g. public datasets shipped as ``.npz``) and for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from immunocto.errors import InputFileError
from immunocto.io.base import BRIGHTFIELD, Level, Slide


class ArraySlide(Slide):
    """``rgb`` ``(h, w, 3)`` uint8 at ``mpp`` µm/px; ``name`` stands in for a path in messages."""

    def __init__(self, rgb: np.ndarray, *, mpp: float, name: str = "<array>") -> None:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
            raise InputFileError(
                f"{name}: expected an (h, w, 3) uint8 RGB array (got {rgb.shape} {rgb.dtype})"
            )
        self.path = Path(name)
        self.kind = BRIGHTFIELD
        self.mpp = float(mpp)
        self.channel_names = ("R", "G", "B")
        self.levels = (Level((rgb.shape[0], rgb.shape[1]), 1.0),)
        self.dtype = np.dtype(np.uint8)
        self._rgb = np.ascontiguousarray(rgb[..., :3])

    def _read(
        self, level: int, y0: int, y1: int, x0: int, x1: int, channels: list[int]
    ) -> np.ndarray:
        return self._rgb[y0:y1, x0:x1].copy()  # callers own what they read
