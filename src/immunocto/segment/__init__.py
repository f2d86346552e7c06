"""Candidate segmentation: backends (IF-nuclear, H&E, SAM, cellpose/stardist adapters) behind
one interface, run tile by tile with the responsible-tile rule."""

from immunocto.segment.base import Backend, SlideContext
from immunocto.segment.he import segment_he
from immunocto.segment.if_nuclear import segment_nuclear_stain
from immunocto.segment.measure import object_features
from immunocto.segment.nuclei import (
    NucleusParams,
    foreground_image,
    otsu,
    segment_foreground,
    split_touching,
)
from immunocto.segment.registry import BACKENDS, make_backend
from immunocto.segment.stage import cells_path, mask_path, run_segment
from immunocto.segment.tiled import segment_slide

__all__ = [
    "BACKENDS",
    "Backend",
    "NucleusParams",
    "SlideContext",
    "cells_path",
    "foreground_image",
    "make_backend",
    "mask_path",
    "object_features",
    "otsu",
    "run_segment",
    "segment_foreground",
    "segment_he",
    "segment_nuclear_stain",
    "segment_slide",
    "split_touching",
]
