"""``open_slide``: pick the backend for a path."""

from __future__ import annotations

import logging
import os

from immunocto._fs import local_path
from immunocto.errors import InputFileError
from immunocto.io.base import Slide, read_markers_csv

#: Formats read by tiffslide (vendor brightfield formats).
TIFFSLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif")


log = logging.getLogger(__name__)


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
    path = local_path(path, "slide").expanduser()
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

    The config's ``mpp`` applies to the H&E, ``if_mpp`` (when set) to the IF, each with a
    warning when the file says otherwise; an IF without a pixel size takes the H&E's. Errors
    name the config entry (``slides[i]``); on an error both files are closed.
    """
    from immunocto.io.checks import check_pair

    slide = cfg.slides[index]
    where = f"slides[{index}]"
    he = open_slide(cfg.resolve(slide.he), mpp=slide.mpp)
    if_ = None
    try:
        _warn_disagreement(he, f"{where}.mpp")
        if slide.if_ is not None:
            markers = cfg.resolve(slide.markers) if slide.markers is not None else None
            if_ = open_slide(cfg.resolve(slide.if_), markers=markers, mpp=slide.if_mpp)
            if slide.if_mpp is not None:
                _warn_disagreement(if_, f"{where}.if_mpp")
            if if_.mpp is None:
                log.warning(
                    "%s: the IF file has no pixel size; assuming the H&E's %.4g µm/px "
                    "(set %s.if_mpp in the config if it differs)", if_.path, he.mpp, where,
                )  # fmt: skip
                if_.mpp = he.mpp
        check_pair(he, if_, where=where)
    except BaseException:  # a bad pair: close what was opened before raising
        he.close()
        if if_ is not None:
            if_.close()
        raise
    return he, if_


_warned: set[tuple[str, float, float]] = set()


def _warn_disagreement(slide: Slide, key: str) -> None:
    """Warn (once per file and values) when the config's pixel size differs from the file's
    by more than 2 %; the config's value is used."""
    given, said = slide.mpp, getattr(slide, "file_mpp", None)
    if not given or not said or abs(said - given) <= 0.02 * given:
        return
    mark = (str(slide.path), float(given), float(said))
    if mark in _warned:
        return
    _warned.add(mark)
    log.warning(
        "%s: the file says %.4g µm/px, the config's %s says %.4g; using the config's",
        slide.path, said, key, given,
    )  # fmt: skip
