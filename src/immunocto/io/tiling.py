"""Tiles with a halo, the responsible-tile rule, and tissue detection on a low level.

Every per-tile stage reads a tile's *window* (its core plus ``halo`` pixels on each side,
clipped to the slide) and keeps only the objects whose centroid lies in the tile's *core*.
Cores partition the slide, so each object is kept by exactly one tile.

Assumption (stated once, relied on everywhere): an object is smaller than the halo, i.e.
its extent from its centroid is at most ``halo`` pixels. Then an object whose centroid is
in a core lies entirely inside that tile's window and is seen whole. Immune-cell nuclei are
< 15 µm (46 px at 0.325 µm/px), so the default halo of 64 px holds with room to spare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from immunocto.io.base import BRIGHTFIELD, Slide

DEFAULT_TILE = 1024
DEFAULT_HALO = 64
#: Pixel size at which tissue is detected.
TISSUE_MPP = 8.0


@dataclass(frozen=True)
class Tile:
    """A tile of the level-0 grid.

    ``x0, y0, x1, y1`` bound the core (half-open, level-0 px); the window adds ``halo`` on
    every side, clipped to the slide.
    """

    id: int
    row: int
    col: int
    x0: int
    y0: int
    x1: int
    y1: int
    halo: int
    slide_width: int
    slide_height: int

    @property
    def window(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the core plus halo, clipped to the slide."""
        return (
            max(self.x0 - self.halo, 0),
            max(self.y0 - self.halo, 0),
            min(self.x1 + self.halo, self.slide_width),
            min(self.y1 + self.halo, self.slide_height),
        )

    def responsible(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True where the centroid ``(x, y)`` (level-0 px) lies in this tile's core."""
        x = np.asarray(x)
        y = np.asarray(y)
        return (x >= self.x0) & (x < self.x1) & (y >= self.y0) & (y < self.y1)


def make_tiles(
    width: int, height: int, *, tile: int = DEFAULT_TILE, halo: int = DEFAULT_HALO
) -> list[Tile]:
    """Row-major grid of tiles covering a ``width`` x ``height`` slide."""
    if tile <= 0 or halo < 0:
        raise ValueError(f"tile must be > 0 and halo >= 0 (got tile={tile}, halo={halo})")
    tiles = []
    for row, y0 in enumerate(range(0, height, tile)):
        for col, x0 in enumerate(range(0, width, tile)):
            tiles.append(
                Tile(
                    len(tiles),
                    row,
                    col,
                    x0,
                    y0,
                    min(x0 + tile, width),
                    min(y0 + tile, height),
                    halo,
                    width,
                    height,
                )
            )
    return tiles


def tile_of(tiles: list[Tile], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Id of the tile responsible for each centroid (-1 outside the slide)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if not tiles:
        return np.full(x.shape, -1)
    t0 = tiles[0]
    size = t0.x1 - t0.x0
    cols = max(t.col for t in tiles) + 1
    col = np.floor(x / size).astype(int)
    row = np.floor(y / size).astype(int)
    inside = (x >= 0) & (y >= 0) & (x < t0.slide_width) & (y < t0.slide_height)
    return np.where(inside, row * cols + col, -1)


# ---------------------------------------------------------------------------- tissue


def tissue_mask_from_image(image: np.ndarray, *, kind: str, min_area_px: int = 16) -> np.ndarray:
    """Tissue (True) versus glass on a low-resolution image.

    Parameters
    ----------
    image : ndarray
        ``(h, w, 3)`` uint8 brightfield, or ``(c, h, w)`` fluorescence.
    kind : {'brightfield', 'fluorescence'}
    min_area_px : int
        Smaller specks (dust) are dropped.

    Returns
    -------
    (h, w) bool ndarray
    """
    from skimage.filters import threshold_otsu

    if kind == BRIGHTFIELD:
        # Optical density: glass ~0.05, pale stroma ~0.2, nuclei ~1.
        signal = ndimage.gaussian_filter(
            -np.log10((image.astype(np.float32) + 1.0) / 256.0).sum(axis=2), 1.0
        )
        anchor = max(0.15, float(np.percentile(signal, 1)) + 0.05)
    else:
        # Nuclei + autofluorescence: mean log intensity over channels.
        signal = ndimage.gaussian_filter(np.log1p(image.astype(np.float32)).mean(axis=0), 1.0)
        anchor = float(np.percentile(signal, 1)) + 0.4
    if float(signal.max() - signal.min()) < 1e-6:
        return np.zeros(signal.shape, bool)
    # Otsu alone splits dense nuclei from pale stroma when there is little glass; a
    # threshold anchored just above the glass keeps pale tissue.
    mask = signal > min(float(threshold_otsu(signal)), anchor)
    # Close small gaps; pad first so the closing does not eat the image border.
    mask = ndimage.binary_closing(np.pad(mask, 2, mode="edge"), iterations=2)[2:-2, 2:-2]
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_area_px
        keep[0] = False
        mask = keep[labels]
    return mask


def tissue_mask(
    slide: Slide, *, target_mpp: float = TISSUE_MPP, channels: list[str] | None = None
) -> tuple[np.ndarray, float]:
    """Tissue mask of ``slide`` from its level nearest ``target_mpp``.

    Returns the mask and its downsample relative to level 0. Needs ``slide.mpp`` (else
    the level nearest 1/16 of level 0 is used).
    """
    wanted = target_mpp / slide.mpp if slide.mpp else 16.0
    level = slide.best_level(wanted)
    image = slide.read_level(level, channels=channels) if channels else slide.read_level(level)
    ds = slide.levels[level].downsample
    # Finer than wanted: shrink to the target so the mask is cheap to use.
    factor = int(wanted // ds)
    if factor > 1:
        if slide.kind == BRIGHTFIELD:
            image = image[::factor, ::factor]
        else:
            image = image[:, ::factor, ::factor]
        ds *= factor
    return tissue_mask_from_image(image, kind=slide.kind), ds


def tiles_on_tissue(
    tiles: list[Tile], mask: np.ndarray, downsample: float, *, min_fraction: float = 0.05
) -> list[Tile]:
    """Tiles whose core is at least ``min_fraction`` tissue on the low-level ``mask``."""
    keep = []
    h, w = mask.shape
    for t in tiles:
        ys = slice(
            int(t.y0 / downsample), max(int(np.ceil(t.y1 / downsample)), int(t.y0 / downsample) + 1)
        )
        xs = slice(
            int(t.x0 / downsample), max(int(np.ceil(t.x1 / downsample)), int(t.x0 / downsample) + 1)
        )
        block = mask[min(ys.start, h - 1) : ys.stop, min(xs.start, w - 1) : xs.stop]
        if block.size and block.mean() >= min_fraction:
            keep.append(t)
    return keep
