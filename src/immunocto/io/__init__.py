"""Slide IO: one reader interface (:func:`open_slide`), one module per backend, tiling,
and streaming pyramidal OME-TIFF writing. IO code does no science."""

from immunocto.io.base import BRIGHTFIELD, FLUORESCENCE, Level, Slide, read_markers_csv
from immunocto.io.checks import check_pair
from immunocto.io.ome_tiff import pyramid_shapes, write_ome_tiff
from immunocto.io.open import open_pair, open_slide
from immunocto.io.tilestore import TileStore
from immunocto.io.tiling import Tile, make_tiles, tile_of, tiles_on_tissue, tissue_mask

__all__ = [
    "BRIGHTFIELD",
    "FLUORESCENCE",
    "Level",
    "Slide",
    "Tile",
    "TileStore",
    "check_pair",
    "make_tiles",
    "open_pair",
    "open_slide",
    "pyramid_shapes",
    "read_markers_csv",
    "tile_of",
    "tiles_on_tissue",
    "tissue_mask",
    "write_ome_tiff",
]
