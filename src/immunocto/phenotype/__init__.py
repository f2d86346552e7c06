"""Phenotyping: gating trees, thresholds (Otsu, 3-class Otsu, GMM, manual, iterative),
explained labels, and threshold sensitivity."""

from immunocto.phenotype.gate import (
    AMBIGUOUS,
    UNLABELED,
    GateResult,
    apply_tree,
    gate_cells,
    sensitivity,
)
from immunocto.phenotype.stage import run_gate
from immunocto.phenotype.thresholds import (
    estimate_threshold,
    gmm_threshold,
    log_intensity,
    otsu3_threshold,
    otsu_threshold,
)
from immunocto.phenotype.tree import (
    CRC_TREE,
    GateTree,
    Node,
    load_tree,
    tree_from_dict,
    tree_from_scimap_csv,
)

__all__ = [
    "AMBIGUOUS",
    "CRC_TREE",
    "UNLABELED",
    "GateResult",
    "GateTree",
    "Node",
    "apply_tree",
    "estimate_threshold",
    "gate_cells",
    "gmm_threshold",
    "load_tree",
    "log_intensity",
    "otsu3_threshold",
    "otsu_threshold",
    "run_gate",
    "sensitivity",
    "tree_from_dict",
    "tree_from_scimap_csv",
]
