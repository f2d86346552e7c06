"""Conventions shared by every stage: classes, channel names, pixel size.

Coordinates everywhere: ``x`` = column, ``y`` = row, in level-0 pixels of the H&E image.
Arrays are ``(y, x)`` / ``(y, x, 3)`` for RGB and ``(c, y, x)`` for IF.
"""

from __future__ import annotations

#: Microns per pixel of Orion (and Immunocto's database) at 40x.
ORION_MPP: float = 0.325

#: The five classes of the database, in the order models use.
CLASSES: tuple[str, ...] = ("cd4_t", "cd8_t", "b_cell", "macrophage", "other")
#: Labels a stage may give when it declines to decide. Never folded into ``other``.
UNDECIDED_LABELS: tuple[str, ...] = ("ambiguous", "unlabeled")
IMMUNE_CLASSES: tuple[str, ...] = ("cd4_t", "cd8_t", "b_cell", "macrophage")

#: Orion's 19 channels, in acquisition order.
ORION_CHANNELS: tuple[str, ...] = (
    "Hoechst",
    "AF1",
    "CD31",
    "CD45",
    "CD68",
    "Argo550",
    "CD4",
    "FOXP3",
    "CD8a",
    "CD45RO",
    "CD20",
    "PD-L1",
    "CD3e",
    "CD163",
    "E-cadherin",
    "PD-1",
    "Ki67",
    "Pan-CK",
    "SMA",
)

#: IF markers of Immunocto's 12-channel classifier input (RGB + mask + these 8).
CLASSIFIER_IF_MARKERS: tuple[str, ...] = (
    "Hoechst",
    "CD45",
    "CD3e",
    "CD4",
    "CD8a",
    "CD20",
    "CD163",
    "CD68",
)
