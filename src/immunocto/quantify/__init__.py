"""Per-cell IF quantification: statistics on raw IF pixels through the registration."""

from immunocto.quantify.features import STATS, cell_intensity_stats
from immunocto.quantify.stage import quantify_columns, run_quantify
from immunocto.quantify.tiles import labels_in_if_space, quantify_tile

__all__ = [
    "STATS",
    "cell_intensity_stats",
    "labels_in_if_space",
    "quantify_columns",
    "quantify_tile",
    "run_quantify",
]
