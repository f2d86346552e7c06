"""OME-Zarr (NGFF 0.4 and 0.5 multiscales) with zarr: axes, scales and channel labels from
the metadata."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from immunocto.errors import InputFileError
from immunocto.io.base import BRIGHTFIELD, FLUORESCENCE, Level, Slide, resolve_channel_names

_UNIT_TO_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "meter": 1e6}


def _multiscales(attrs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    ome = attrs.get("ome", attrs)  # 0.5 nests under "ome"
    if "multiscales" not in ome:
        raise KeyError("multiscales")
    return ome["multiscales"][0], ome.get("omero", {})


class OmeZarrSlide(Slide):
    """A slide stored as OME-Zarr (a folder)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mpp: float | None = None,
        channel_names: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(path)
        try:
            group = zarr.open_group(str(self.path), mode="r")
            ms, omero = _multiscales(dict(group.attrs))
            self._arrays = [group[d["path"]] for d in ms["datasets"]]
        except Exception as err:
            raise InputFileError(
                f"{self.path}: not a readable OME-Zarr ({type(err).__name__}: {err}); "
                "expected a folder with NGFF 'multiscales' metadata"
            ) from None
        try:
            self._axes = [
                a["name"] if isinstance(a, dict) else str(a)
                for a in ms.get("axes", ["c", "y", "x"])
            ]
            arr0 = self._arrays[0]
            self.dtype = np.dtype(arr0.dtype)
            y_axis, x_axis = self._axes.index("y"), self._axes.index("x")
            n_c = arr0.shape[self._axes.index("c")] if "c" in self._axes else 1
            for a in self._axes:
                if a not in ("c", "y", "x") and arr0.shape[self._axes.index(a)] > 1:
                    raise InputFileError(
                        f"{self.path}: more than one plane along axis {a!r}; export a 2-D slide"
                    )
            width0 = arr0.shape[x_axis]
            self.levels = tuple(
                Level((a.shape[y_axis], a.shape[x_axis]), width0 / a.shape[x_axis])
                for a in self._arrays
            )
            labels = [str(c.get("label", "")) for c in omero.get("channels", [])]
            if n_c == 3 and self.dtype == np.uint8 and (not labels or labels == ["R", "G", "B"]):
                self.kind = BRIGHTFIELD
                self.channel_names = ("R", "G", "B")
            else:
                self.kind = FLUORESCENCE
                self.channel_names = resolve_channel_names(self.path, n_c, channel_names, labels)
            file_mpp = None
            try:
                scale = next(
                    t["scale"]
                    for t in ms["datasets"][0]["coordinateTransformations"]
                    if t["type"] == "scale"
                )
                unit = (
                    ms["axes"][x_axis].get("unit", "micrometer")
                    if isinstance(ms["axes"][x_axis], dict)
                    else "micrometer"
                )
                file_mpp = float(scale[x_axis]) * _UNIT_TO_UM.get(unit, 1.0)
            except (KeyError, StopIteration, TypeError, IndexError):
                pass
        except InputFileError:
            raise
        except Exception as err:  # damaged or unexpected NGFF metadata
            raise InputFileError(
                f"{self.path}: OME-Zarr metadata that cannot be used ({type(err).__name__}: "
                f"{str(err)[:120]}); expected NGFF 'multiscales' with axes c/y/x and datasets"
            ) from None
        self._set_mpp(file_mpp, mpp)

    def _read(
        self, level: int, y0: int, y1: int, x0: int, x1: int, channels: list[int]
    ) -> np.ndarray:
        key: list[Any] = []
        for a in self._axes:
            if a == "y":
                key.append(slice(y0, y1))
            elif a == "x":
                key.append(slice(x0, x1))
            elif a == "c":
                key.append(channels if self.kind == FLUORESCENCE else [0, 1, 2])
            else:
                key.append(0)
        try:
            block = np.asarray(self._arrays[level].get_orthogonal_selection(tuple(key)))
        except Exception as err:  # zarr and its codecs raise many kinds on damaged chunks
            raise InputFileError(
                f"{self.path}: could not read level {level} ({type(err).__name__}: "
                f"{str(err)[:120]}); a chunk looks damaged: copy or export the slide again"
            ) from None
        kept = [a for a in self._axes if a in ("c", "y", "x")]
        if "c" not in kept:
            block = block[None]
            kept = ["c", *kept]
        block = np.transpose(block, [kept.index("c"), kept.index("y"), kept.index("x")])
        return np.moveaxis(block, 0, -1) if self.kind == BRIGHTFIELD else block
