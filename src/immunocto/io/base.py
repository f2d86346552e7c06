"""The one reader interface every slide backend implements.

Coordinates: ``x`` = column, ``y`` = row. :meth:`Slide.read_region` takes the top-left
corner in **level-0** pixels (as OpenSlide and TIAToolbox do) and the size in pixels of the
requested level; parts outside the image come back as zeros. Brightfield regions are
``(h, w, 3)`` uint8; fluorescence regions are ``(c, h, w)`` in the file's dtype. IF is never
converted to RGB.
"""

from __future__ import annotations

import csv
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from immunocto.errors import InputFileError

log = logging.getLogger(__name__)

BRIGHTFIELD = "brightfield"
FLUORESCENCE = "fluorescence"


@dataclass(frozen=True)
class Level:
    """One pyramid level: ``shape`` is ``(height, width)``; ``downsample`` relative to level 0."""

    shape: tuple[int, int]
    downsample: float


def read_markers_csv(path: str | os.PathLike[str]) -> list[str]:
    """Channel names from an MCMICRO ``markers.csv`` (its ``marker_name`` column), in order.

    Raises
    ------
    InputFileError
        Missing file or column, empty or duplicate names.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "marker_name" not in fields:
                raise InputFileError(
                    f"{path}: no 'marker_name' column (found: {', '.join(fields) or 'nothing'}); "
                    "markers.csv needs a header row with marker_name (MCMICRO format)"
                )
            key = reader.fieldnames[fields.index("marker_name")]  # type: ignore[index]
            names = [(row.get(key) or "").strip() for row in reader]
    except FileNotFoundError:
        raise InputFileError(
            f"{path}: markers file not found; fix `markers:` in the config"
        ) from None
    except UnicodeDecodeError:
        raise InputFileError(f"{path}: not a text CSV file; give the markers.csv path") from None
    check_channel_names(names, source=str(path))
    return names


def read_marker_compartments(path: str | os.PathLike[str]) -> dict[str, str]:
    """``marker_name -> compartment`` from the optional ``compartment`` column of a
    ``markers.csv`` (``nuclear``, ``membrane`` or ``cytoplasm``; blank = not said). Empty when
    the column is absent.

    Raises
    ------
    InputFileError
        An unknown compartment value (naming the file, the row and the allowed values).
    """
    from immunocto.conventions import COMPARTMENTS

    path = Path(path)
    names = read_markers_csv(path)  # checks the file and the marker_name column
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "compartment" not in fields:
            return {}
        key = reader.fieldnames[fields.index("compartment")]  # type: ignore[index]
        values = [(row.get(key) or "").strip().lower() for row in reader]
    out = {}
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        if not value:
            continue
        if value not in COMPARTMENTS:
            raise InputFileError(
                f"{path}: row {i + 2} ({name}): compartment {value!r} is not one of "
                f"{', '.join(COMPARTMENTS)} (or blank); fix the compartment column"
            )
        out[name] = value
    return out


def check_channel_names(names: Sequence[str], *, source: str) -> None:
    """Raise :class:`InputFileError` for empty or duplicate channel names."""
    if not names:
        raise InputFileError(f"{source}: no channel names")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise InputFileError(f"{source}: channel {empty[0] + 1} has no name; name every channel")
    seen: dict[str, int] = {}
    dups = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        if seen[n] == 2:
            dups.append(n)
    if dups:
        raise InputFileError(
            f"{source}: duplicate marker names {', '.join(repr(d) for d in dups)}; "
            "channels are referred to by name, so each must be unique (e.g. CD45_1, CD45_2)"
        )


def resolve_channel_names(
    path: Path, n: int, given: Sequence[str] | None, found: Sequence[str] | None
) -> tuple[str, ...]:
    """Channel names of an ``n``-channel image: ``given`` (markers.csv) first, else the names
    ``found`` in the file's metadata, else ``C0..C{n-1}`` (with a warning)."""
    if given is not None:
        names = list(given)
        if len(names) != n:
            raise InputFileError(
                f"{path}: {n} channels but markers.csv names {len(names)}; "
                "markers.csv needs one row per channel, in channel order"
            )
        if found and list(found) != names and len(found) == n:
            log.info("%s: channel names from markers.csv override the file's", path)
    elif found and len(found) == n and all(found):
        names = list(found)
    else:
        if n > 1:
            log.warning(
                "%s: no channel names in the file; calling them C0..C%d (give markers.csv)",
                path,
                n - 1,
            )
        names = [f"C{i}" for i in range(n)]
    check_channel_names(names, source=str(path))
    return tuple(names)


class Slide(ABC):
    """A whole-slide image, opened lazily: only the tiles a region needs are read.

    Attributes
    ----------
    path : Path
    kind : {'brightfield', 'fluorescence'}
    mpp : float or None
        Level-0 microns per pixel (``None`` when the file does not say and none was given).
    channel_names : tuple of str
        ``('R', 'G', 'B')`` for brightfield; marker names for fluorescence.
    levels : tuple of Level
    dtype : numpy dtype
    """

    path: Path
    kind: str
    mpp: float | None
    file_mpp: float | None = None  # what the file says (``mpp`` may be overridden)
    channel_names: tuple[str, ...]
    levels: tuple[Level, ...]
    dtype: np.dtype

    def _set_mpp(self, file_mpp: float | None, given: float | None) -> None:
        """``file_mpp`` = what the file says, ``mpp`` = ``given`` when there is one (logged
        when the file says otherwise by more than 1 %), else the file's."""
        if given is not None and file_mpp is not None and abs(file_mpp - given) > 0.01 * given:
            log.info("%s: file says %.4f um/px, using the given %.4f", self.path, file_mpp, given)
        self.file_mpp = file_mpp
        self.mpp = float(given) if given is not None else file_mpp

    # ------------------------------------------------------------------ geometry
    @property
    def height(self) -> int:
        return self.levels[0].shape[0]

    @property
    def width(self) -> int:
        return self.levels[0].shape[1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Level-0 array shape: ``(h, w, 3)`` brightfield, ``(c, h, w)`` fluorescence."""
        if self.kind == BRIGHTFIELD:
            return (self.height, self.width, 3)
        return (len(self.channel_names), self.height, self.width)

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for k, level in enumerate(self.levels):
            if level.downsample <= downsample * 1.001:
                best = k
        return best

    def channel_index(self, channels: Sequence[str | int] | None) -> list[int]:
        """Indices of ``channels`` (names or indices); all channels for ``None``."""
        if channels is None:
            return list(range(len(self.channel_names)))
        out = []
        for c in channels:
            if isinstance(c, str):
                if c not in self.channel_names:
                    raise InputFileError(
                        f"{self.path}: no channel {c!r} (channels: {', '.join(self.channel_names)})"
                    )
                out.append(self.channel_names.index(c))
            else:
                if not 0 <= int(c) < len(self.channel_names):
                    raise InputFileError(f"{self.path}: channel index {c} out of range")
                out.append(int(c))
        return out

    # ------------------------------------------------------------------ pixels
    def read_region(
        self,
        x: int,
        y: int,
        w: int,
        h: int,
        *,
        level: int = 0,
        channels: Sequence[str | int] | None = None,
    ) -> np.ndarray:
        """Pixels of a rectangle.

        Parameters
        ----------
        x, y : int
            Top-left corner in level-0 pixels (``x`` = column, ``y`` = row).
        w, h : int
            Width and height in pixels of ``level``.
        level : int
            Pyramid level (0 = full resolution).
        channels : sequence of str or int, optional
            Fluorescence only: channel names (or indices) to read, in that order.

        Returns
        -------
        ndarray
            ``(h, w, 3)`` uint8 for brightfield, ``(c, h, w)`` for fluorescence; zeros
            outside the image.
        """
        if not 0 <= level < len(self.levels):
            raise InputFileError(
                f"{self.path}: no level {level} (levels: 0..{len(self.levels) - 1})"
            )
        if self.kind == BRIGHTFIELD and channels is not None:
            raise InputFileError(
                f"{self.path}: brightfield slides have no named channels to select"
            )
        lv = self.levels[level]
        lx = int(np.floor(x / lv.downsample))
        ly = int(np.floor(y / lv.downsample))
        idx = self.channel_index(channels) if self.kind == FLUORESCENCE else [0, 1, 2]
        lh, lw = lv.shape
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lw), min(ly + h, lh)
        shape = (h, w, 3) if self.kind == BRIGHTFIELD else (len(idx), h, w)
        if x1 <= x0 or y1 <= y0:
            return np.zeros(shape, self.dtype)
        block = self._read(level, y0, y1, x0, x1, idx)
        if (x0, y0, x1, y1) == (lx, ly, lx + w, ly + h) and block.shape == shape:
            return block  # all in bounds: no second buffer and copy
        out = np.zeros(shape, self.dtype)
        if self.kind == BRIGHTFIELD:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = block
        else:
            out[:, y0 - ly : y1 - ly, x0 - lx : x1 - lx] = block
        return out

    def read_level(self, level: int, channels: Sequence[str | int] | None = None) -> np.ndarray:
        """A whole (low-resolution) level; mind the size of level 0."""
        h, w = self.levels[level].shape
        return self.read_region(0, 0, w, h, level=level, channels=channels)

    @abstractmethod
    def _read(
        self, level: int, y0: int, y1: int, x0: int, x1: int, channels: list[int]
    ) -> np.ndarray:
        """In-bounds block of ``level``: ``(y1-y0, x1-x0, 3)`` or ``(len(channels), y1-y0, x1-x0)``."""

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Release file handles."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.mpp:g}" if self.mpp else "unknown"
        return (
            f"{type(self).__name__}({self.path.name!r}, kind={self.kind}, shape={self.shape}, "
            f"mpp={mpp}, levels={len(self.levels)})"
        )
