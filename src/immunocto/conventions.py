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
#: One colour per label (RGB 0-255) wherever a class is drawn: previews, QuPath GeoJSON.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "cd4_t": (40, 200, 40), "cd8_t": (0, 190, 230), "b_cell": (230, 50, 50),
    "macrophage": (240, 200, 0), "other": (150, 150, 150),
    "ambiguous": (200, 100, 200), "unlabeled": (90, 90, 90),
}  # fmt: skip
#: Colours of the H&E nucleus network's types (``nucleus_type``; its ``other`` is grey, as above).
NUCLEUS_TYPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "inflammatory": (230, 30, 30), "epithelial": (30, 200, 60), "stromal": (40, 110, 255),
}  # fmt: skip

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


#: Where a marker's signal lives; picks the statistic that gates it (nuclear -> the mean
#: over the nucleus, membrane / cytoplasm -> the ring around it). Markers not listed here
#: are membrane markers unless ``markers.csv`` has a ``compartment`` column saying otherwise.
COMPARTMENTS: tuple[str, ...] = ("nuclear", "membrane", "cytoplasm")
#: Common nuclear markers (lower case, without dashes / spaces).
NUCLEAR_MARKERS: frozenset[str] = frozenset(
    {
        "hoechst", "dapi", "dna", "dna1", "dna2", "ki67", "mki67", "foxp3", "pcna", "p53", "tp53",
        "sox10", "sox2", "sox9", "ttf1", "nkx21", "er", "esr1", "pr", "pgr", "ar", "gata3",
        "cdx2", "mitf", "h3", "phh3", "h3k27me3", "h3k27m", "tcf1", "tcf7", "bcl6", "olig2",
        "myod1", "wt1", "p63", "p40", "yap", "cmyc", "myc", "tox", "irf4", "pax5", "pax8",
        "ercc1", "mlh1", "msh2", "msh6", "pms2", "cyclind1", "ccnd1", "p16", "p21", "ezh2",
        "lamin", "laminb1", "laminac", "histone", "nucleolin",
    }
)  # fmt: skip


def marker_compartment(name: str, declared: str | None = None) -> str:
    """``declared`` (from ``markers.csv``) when given, else ``nuclear`` for the markers of
    :data:`NUCLEAR_MARKERS` and ``membrane`` for the rest."""
    if declared:
        return declared
    return "nuclear" if marker_key(name) in NUCLEAR_MARKERS else "membrane"


def marker_key(name: str) -> str:
    """A marker name as the marker sets here spell it: lower case, letters and digits only."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


#: Markers of non-immune lineages (epithelium, stroma, endothelium, melanocytes; lower case,
#: without dashes / spaces): an immune cell sits at background in them however well its own
#: lineage markers stained, so they describe the cells an immune gate missed as well as the
#: ones it caught. The partial-label estimate (``validate``) uses them for that reason.
EXCLUSION_MARKERS: frozenset[str] = frozenset(
    {
        "panck", "pancytokeratin", "cytokeratin", "keratin", "ck", "ck8", "ck18", "ck19",
        "ecadherin", "cdh1", "epcam", "sma", "asma", "alphasma", "acta2", "desmin", "cd31",
        "pecam1", "cd34", "podoplanin", "pdpn", "fap", "sox10", "melana", "pmel", "hmb45",
    }
)  # fmt: skip


def is_exclusion_marker(name: str) -> bool:
    """True for a marker of :data:`EXCLUSION_MARKERS` (case, dashes and spaces ignored)."""
    return marker_key(name) in EXCLUSION_MARKERS
