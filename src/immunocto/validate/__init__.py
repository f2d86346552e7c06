"""Validation: metrics as pure functions (no IO), label-noise audits and reports."""

from immunocto.validate.metrics import (
    Detection,
    Overlaps,
    aggregated_jaccard,
    centroids,
    detection_by_distance,
    detection_by_iou,
    match_instances,
    match_points,
    object_dice,
    panoptic_quality,
    segmentation_report,
)

__all__ = [
    "Detection",
    "Overlaps",
    "aggregated_jaccard",
    "centroids",
    "detection_by_distance",
    "detection_by_iou",
    "match_instances",
    "match_points",
    "object_dice",
    "panoptic_quality",
    "segmentation_report",
]
