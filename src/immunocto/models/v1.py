"""The V1 rule: which classifier calls become labels.

Immunocto's rule (``v1_rule: model``) takes the bootstrap classifier's call wherever its
calibrated probability reaches ``min_prob``, over every cell. Measured on the simulator, that
rule breaks its own promise on the cells the gate left ``ambiguous``: the classifier was
calibrated on confidently gated cells, and a gate-ambiguous cell next to a macrophage, lit on
one side by its neighbour's CD68, is called a macrophage at p = 0.98 (V1 macrophage precision
0.75 against the gate's 0.91 on the demo). It also drops gate labels it is merely unsure about.

The default rule (``v1_rule: expand``) expands V0 instead of replacing it:

- a reviewer's ``review_label`` stands (``not_cell``/``ambiguous`` too: nothing is added);
- a cell with a gate label keeps it when the classifier gives that class a probability of at
  least ``v1_keep`` (0.5); where the classifier doubts it, the cell becomes ``ambiguous``
  (``conflict`` when it calls another class at ``>= min_prob``, else ``doubted``).
  ``v1_keep`` 0 keeps every gate label but confident conflicts;
- a cell with neither gets the classifier's call at ``>= min_prob`` only when its *own* IF
  supports it: on every node of the gating tree's path to that class, each positive marker
  (``pos``/``allpos``; at least one of ``anypos``) reaches ``v1_support`` x that node's
  threshold on the gate's own feature (e.g. CD68 ring *median*, which one-sided spill-over from
  a neighbour does not raise). Weakly stained cells pass; cells lit only by neighbours do not.

``v1_source`` records which of these decided: ``review``, ``gate``, ``model``, ``conflict``,
``doubted``, ``unsupported``, ``unsure`` (no V0 label and no call at ``>= min_prob``).

Measured (``benchmarks/expand_sim.py``, 4096², seed 3, the test slide never trained on): with
``v1_keep`` 0.5 V1 is at least as precise as the gate for every class (macrophage 0.944 vs
0.926) and covers 1.06x its immune cells; ``v1_keep`` 0 (V0 kept whole) leaves V1 macrophage
precision at the gate's (0.925).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from immunocto.phenotype.tree import GateTree

#: ``v1_source`` values, in the order the rule checks them.
SOURCES = ("review", "gate", "conflict", "doubted", "model", "unsupported", "unsure")
NO_LABEL = ("ambiguous", "unlabeled", "not_cell", "", "nan", "None")


@dataclass(frozen=True)
class Evidence:
    """One positive condition on a class's path: ``markers`` judged at ``parent``'s thresholds;
    ``any_of`` = one of them suffices (``anypos``), else all must pass."""

    parent: str
    markers: tuple[str, ...]
    any_of: bool


def positive_evidence(tree: GateTree) -> dict[str, list[Evidence]]:
    """Per class label, the positive-marker conditions along its path from the root.

    >>> from immunocto.phenotype.tree import CRC_TREE, tree_from_dict
    >>> ev = positive_evidence(tree_from_dict(CRC_TREE))
    >>> [(e.parent, e.markers, e.any_of) for e in ev["macrophage"]]
    [('root', ('CD45',), False), ('non_t', ('CD68', 'CD163'), True)]
    >>> ev["other"]
    []
    """
    by_name = {n.name: n for n in tree.nodes}
    out: dict[str, list[Evidence]] = {}
    for label, paths in tree.leaf_paths().items():
        conds = out.setdefault(label, [])
        for path in paths:
            for n in (by_name[name] for name in path[1:]):
                alls = tuple(n.rule.get("pos", ())) + tuple(n.rule.get("allpos", ()))
                if alls:
                    conds.append(Evidence(n.parent, alls, False))
                if n.rule.get("anypos"):
                    conds.append(Evidence(n.parent, tuple(n.rule["anypos"]), True))
    return out


def support_mask(
    labels: np.ndarray,
    features: dict[str, np.ndarray],
    gating: dict,
    evidence: dict[str, list[Evidence]],
    support: float,
) -> np.ndarray:
    """Whether each cell's own IF supports its proposed class.

    Parameters
    ----------
    labels : (N,) str ndarray
        Proposed class per cell.
    features : dict
        Gate feature column name -> (N,) values (the columns ``gating["features"]`` names).
    gating : dict
        The slide's ``RUN/gating/<slide>.json`` (``features``: marker -> column;
        ``thresholds``: parent node -> marker -> threshold, in the feature's units).
    evidence : dict
        :func:`positive_evidence` of the tree.
    support : float
        Fraction of each threshold a marker must reach (0 = no check).

    Returns
    -------
    (N,) bool ndarray; True for classes without positive markers (e.g. ``other``) and for
    labels the tree does not know.
    """
    ok = np.ones(len(labels), bool)
    if support <= 0:
        return ok
    for label, conds in evidence.items():
        sel = np.flatnonzero(labels == label)
        if not len(sel) or not conds:
            continue
        good = np.ones(len(sel), bool)
        for cond in conds:
            passes = []
            for m in cond.markers:
                thr = gating["thresholds"].get(cond.parent, {}).get(m)
                column = gating["features"].get(m)
                if thr is None or column is None:
                    continue  # marker not gated on this slide: nothing to check against
                passes.append(np.nan_to_num(features[column][sel], nan=-np.inf) >= support * thr)
            if passes:
                good &= np.any(passes, axis=0) if cond.any_of else np.all(passes, axis=0)
        ok[sel] = good
    return ok


def decide_v1(
    v0: np.ndarray,
    model_label: np.ndarray,
    confident: np.ndarray,
    supported: np.ndarray,
    *,
    rule: str = "expand",
    v0_prob: np.ndarray | None = None,
    keep: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(v1_label, v1_source)`` per cell (see the module docstring).

    Parameters
    ----------
    v0 : (N,) str ndarray
        V0 label per cell (``ambiguous``/``unlabeled`` = none).
    model_label, confident, supported : (N,) ndarrays
        The classifier's call, whether its probability reached ``min_prob``, and
        :func:`support_mask` of that call.
    rule : ``expand`` or ``model``
    v0_prob : (N,) float ndarray, optional
        The classifier's probability of each cell's V0 class (1 where it has no such class).
    keep : float
        A V0 label stays when ``v0_prob >= keep`` and no other class is called confidently.
    """
    n = len(v0)
    v0 = np.asarray(v0).astype(str)
    model_label = np.asarray(model_label).astype(str)
    if rule == "model":
        v1 = np.where(confident, model_label, "ambiguous")
        return v1, np.where(confident, "model", "unsure").astype(object)
    if rule != "expand":
        raise ValueError(f"unknown v1 rule {rule!r}; expand or model")
    has_v0 = ~np.isin(v0, NO_LABEL)
    conflict = has_v0 & confident & (model_label != v0)
    pv0 = np.ones(n) if v0_prob is None else np.asarray(v0_prob, float)
    doubted = has_v0 & ~conflict & (pv0 < keep)
    kept = has_v0 & ~conflict & ~doubted
    add = ~has_v0 & confident & supported
    v1 = np.where(kept, v0, np.where(add, model_label, "ambiguous"))
    source = np.select(
        [kept, conflict, doubted, add, ~has_v0 & confident],
        ["gate", "conflict", "doubted", "model", "unsupported"],
        default="unsure",
    ).astype(object)
    return v1, source
