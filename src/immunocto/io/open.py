"""``open_slide``: pick the backend for a path."""

from __future__ import annotations

import os
from pathlib import Path

from immunocto.errors import InputFileError
from immunocto.io.base import Slide, read_markers_csv

#: Formats read by tiffslide (vendor brightfield formats).
TIFFSLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif")


def open_slide(
    path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    markers: str | os.PathLike[str] | None = None,
) -> Slide:
    """Open a slide for lazy, tiled reading.

    Parameters
    ----------
    path : path-like
        OME-TIFF / TIFF (tifffile), SVS and other vendor formats (tiffslide), or an
        OME-Zarr folder.
    mpp : float, optional
        Level-0 microns per pixel; overrides what the file says (the config's ``mpp``).
    markers : path-like, optional
        ``markers.csv`` naming the channels of a fluorescence image (overrides OME names).

    Returns
    -------
    Slide
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputFileError(f"{path}: file not found")
    names = read_markers_csv(markers) if markers is not None else None
    if path.is_dir():
        if any((path / marker).exists() for marker in ("zarr.json", ".zattrs", ".zgroup")):
            from immunocto.io.omezarr import OmeZarrSlide

            return OmeZarrSlide(path, mpp=mpp, channel_names=names)
        raise InputFileError(f"{path}: a folder but not an OME-Zarr (no zarr.json or .zattrs)")
    if path.suffix.lower() in TIFFSLIDE_SUFFIXES:
        from immunocto.io.svs import SvsSlide

        if names is not None:
            raise InputFileError(f"{path}: markers.csv given for a brightfield {path.suffix} slide")
        return SvsSlide(path, mpp=mpp)
    from immunocto.io.tiff import TiffFileSlide

    return TiffFileSlide(path, mpp=mpp, channel_names=names)


def open_pair(cfg, index: int) -> tuple[Slide, Slide | None]:
    """Open ``cfg.slides[index]``'s H&E and IF and check that they can be a pair.

    The config's ``mpp`` applies to the H&E; the IF keeps its own pixel size (or the H&E's
    when its file has none). Errors name the config entry (``slides[i]``).
    """
    from immunocto.io.checks import check_pair

    slide = cfg.slides[index]
    where = f"slides[{index}]"
    he = open_slide(cfg.resolve(slide.he), mpp=slide.mpp)
    if_ = None
    if slide.if_ is not None:
        markers = cfg.resolve(slide.markers) if slide.markers is not None else None
        if_ = open_slide(cfg.resolve(slide.if_), markers=markers)
        if if_.mpp is None:
            if_.mpp = he.mpp
    check_pair(he, if_, where=where)
    return he, if_
