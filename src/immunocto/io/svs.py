"""Aperio SVS (and other formats tiffslide knows) through tiffslide: brightfield only."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from immunocto.errors import InputFileError
from immunocto.io.base import BRIGHTFIELD, Level, Slide

log = logging.getLogger(__name__)


def _positive_float(value: object) -> float | None:
    """A pixel size from the file's metadata; ``None`` where it is missing or not a positive
    number (a damaged or lying header: the run's ``mpp`` must then say it)."""
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) and out > 0 else None


class SvsSlide(Slide):
    """A brightfield slide read with tiffslide (SVS, NDPI, ...)."""

    def __init__(self, path: str | os.PathLike[str], *, mpp: float | None = None) -> None:
        import tiffslide

        self.path = Path(path)
        # our own handle, so that a file tiffslide rejects half-way is still closed here
        self._fh = None
        try:
            self._fh = open(self.path, "rb")  # closed in close()
            self._slide = tiffslide.TiffSlide(self._fh)
            dims = self._slide.level_dimensions
            downsamples = self._slide.level_downsamples
            props = self._slide.properties
        except Exception as err:
            if self._fh is not None:
                self._fh.close()
            detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            raise InputFileError(
                f"{self.path}: not a readable slide ({detail}); the file looks truncated or corrupt: "
                "copy or export it again"
            ) from None
        self.kind = BRIGHTFIELD
        self.channel_names = ("R", "G", "B")
        self.dtype = np.dtype(np.uint8)
        self.levels = tuple(
            Level((h, w), float(d)) for (w, h), d in zip(dims, downsamples, strict=True)
        )
        self._set_mpp(_positive_float(props.get("tiffslide.mpp-x")), mpp)

    def _read(
        self, level: int, y0: int, y1: int, x0: int, x1: int, channels: list[int]
    ) -> np.ndarray:
        ds = self.levels[level].downsample
        location = (round(x0 * ds), round(y0 * ds))
        try:
            region = self._slide.read_region(location, level, (x1 - x0, y1 - y0), as_array=True)
        except Exception as err:
            raise InputFileError(
                f"{self.path}: could not read tiles ({err}); the file may be damaged"
            ) from None
        region = np.asarray(region)
        return region[..., :3]

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()
