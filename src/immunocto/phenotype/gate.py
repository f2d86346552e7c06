"""Applying a gating tree to every cell at once, with Immunocto's iterative thresholds.

Each population (``root`` and every node with children) has its own threshold for each marker
its children decide on. With ``iterative``, thresholds are re-estimated inside each population
from the cells that reached it, the tree is applied again, and so on until no label changes
(Immunocto's scheme); otherwise one threshold per marker, estimated on all cells.

Every cell gets a label, a ``margin`` — the smallest distance, over the decisions on its path,
between its log intensity and the deciding threshold, in robust standard deviations of that
population — and a human-readable ``reason``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from immunocto.phenotype.thresholds import estimate_threshold, robust_scale
from immunocto.phenotype.tree import ROOT, RULE_KINDS, GateTree, Node

AMBIGUOUS = "ambiguous"
UNLABELED = "unlabeled"


@dataclass
class GateResult:
    """Labels of ``n`` cells and how they were decided.

    ``thresholds`` and ``scales`` map population -> marker -> log value (use
    ``np.exp`` for intensities); ``reach`` maps population/node -> bool mask of the cells in it.
    """

    label: np.ndarray
    margin: np.ndarray
    reason: np.ndarray
    thresholds: dict[str, dict[str, float]]
    scales: dict[str, dict[str, float]]
    iterations: int
    reach: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[int] = field(default_factory=list)  # label changes per iteration

    def counts(self) -> dict[str, int]:
        names, counts = np.unique(self.label, return_counts=True)
        return {str(k): int(v) for k, v in zip(names, counts, strict=True)}


def _rule_mask(node: Node, positive: dict[str, np.ndarray]) -> np.ndarray:
    n = len(next(iter(positive.values())))
    ok = np.ones(n, bool)
    for kind in RULE_KINDS:
        markers = node.rule.get(kind, ())
        if not markers:
            continue
        pos = np.stack([positive[m] for m in markers])
        if kind in ("pos", "allpos"):
            ok &= pos.all(axis=0)
        elif kind in ("neg", "allneg"):
            ok &= (~pos).all(axis=0)
        elif kind == "anypos":
            ok &= pos.any(axis=0)
        else:
            ok &= (~pos).any(axis=0)
    return ok


def _order(tree: GateTree) -> list[str]:
    """Populations parents-first."""
    out, queue = [], [ROOT]
    while queue:
        p = queue.pop(0)
        if tree.children(p):
            out.append(p)
            queue += [c.name for c in tree.children(p)]
    return out


def _path_text(tree: GateTree, leaf: Node) -> str:
    steps = []
    node: Node | None = leaf
    by_name = {n.name: n for n in tree.nodes}
    while node is not None:
        steps.append(node.describe())
        node = by_name.get(node.parent)
    return " > ".join(reversed(steps))


def apply_tree(
    tree: GateTree,
    z: dict[str, np.ndarray],
    thresholds: dict[str, dict[str, float]],
    scales: dict[str, dict[str, float]],
    eligible: np.ndarray,
    *,
    ineligible_reason: str = "not a confirmed nucleus",
) -> GateResult:
    """Labels from fixed thresholds (log scale) for every population."""
    n = len(eligible)
    label = np.full(n, UNLABELED, dtype=object)
    reason = np.full(n, f"{UNLABELED}: {ineligible_reason}", dtype=object)
    margin = np.full(n, np.inf)
    reach: dict[str, np.ndarray] = {ROOT: eligible.copy()}
    for parent in _order(tree):
        inside = reach.get(parent, np.zeros(n, bool))
        markers = tree.deciding_markers(parent)
        positive = {m: z[m] > thresholds[parent][m] for m in markers}
        for m in markers:
            d = np.abs(z[m] - thresholds[parent][m]) / scales[parent][m]
            margin = np.where(inside, np.fmin(margin, d), margin)
        kids = tree.children(parent)
        sat = np.stack([_rule_mask(k, positive) & inside for k in kids])
        count = sat.sum(axis=0)
        for k, s in zip(kids, sat, strict=True):
            reach[k.name] = s & (count == 1)
            if k.label is not None:
                label[reach[k.name]] = k.label
                reason[reach[k.name]] = _path_text(tree, k)
        stuck = inside & (count != 1)
        if stuck.any():
            # describe the deciding markers' states of the stuck cells, one string per combination
            states = np.stack([positive[m][stuck] for m in markers], axis=1)
            several = count[stuck] > 1
            codes = (states.astype(np.int64) * (2 ** np.arange(len(markers)))).sum(
                axis=1
            ) * 2 + several
            texts = np.empty(len(codes), dtype=object)
            for code in np.unique(codes):
                sel = codes == code
                row = states[np.flatnonzero(sel)[0]]
                what = "several children matched" if code % 2 else "no child matched"
                marks = " ".join(
                    f"{m}{'+' if p else '-'}" for m, p in zip(markers, row, strict=True)
                )
                texts[sel] = f"{AMBIGUOUS} at {parent}: {what} ({marks})"
            label[stuck] = AMBIGUOUS
            reason[stuck] = texts
    margin[~np.isfinite(margin)] = np.nan
    return GateResult(label, margin, reason, thresholds, scales, 0, reach)


def _estimate(
    tree: GateTree,
    z: dict[str, np.ndarray],
    reach: dict[str, np.ndarray],
    methods: dict[str, str],
    manual: dict[str, float],
    per_population: bool,
):
    thresholds: dict[str, dict[str, float]] = {}
    scales: dict[str, dict[str, float]] = {}
    root = reach[ROOT]
    for parent in _order(tree):
        pop = reach.get(parent, root) if per_population else root
        if pop.sum() < 20:  # too few cells to split: fall back to the whole population
            pop = root
        thresholds[parent], scales[parent] = {}, {}
        for m in tree.deciding_markers(parent):
            values = z[m][pop]
            thresholds[parent][m] = (
                manual[m] if m in manual else estimate_threshold(values, methods[m])
            )
            scales[parent][m] = robust_scale(values)
    return thresholds, scales


def gate_cells(
    tree: GateTree,
    z: dict[str, np.ndarray],
    eligible: np.ndarray,
    *,
    method: str = "otsu",
    methods: dict[str, str] | None = None,
    iterative: bool = True,
    max_iterations: int = 10,
    manual: dict[str, float] | None = None,
    ineligible_reason: str = "not a confirmed nucleus",
) -> GateResult:
    """Gate cells with log intensities ``z`` (marker -> ``(n,)``).

    Parameters
    ----------
    tree : GateTree
    z : dict of (n,) float arrays
        Natural-log intensity per marker (see :func:`~immunocto.phenotype.thresholds.log_intensity`).
    eligible : (n,) bool ndarray
        Cells that may be gated (others are ``unlabeled`` with ``ineligible_reason``).
    method : {'otsu', 'otsu3', 'gmm', 'manual'}
        Threshold method for every marker, unless ``methods`` names another for it.
    methods : dict, optional
        Marker -> method overrides.
    manual : dict, optional
        Log thresholds fixed per marker (all of them for ``manual``).
    """
    manual = dict(manual or {})
    missing = [m for m in tree.markers if m not in z]
    if missing:
        raise KeyError(f"no intensities for marker(s) {', '.join(missing)}")
    if method == "manual":
        absent = [m for m in tree.markers if m not in manual]
        if absent:
            raise ValueError(f"manual thresholds missing for {', '.join(absent)}")
    per_marker = {m: (methods or {}).get(m, method) for m in tree.markers}
    reach = {ROOT: eligible}
    thresholds, scales = _estimate(tree, z, reach, per_marker, manual, per_population=False)
    result = apply_tree(tree, z, thresholds, scales, eligible, ineligible_reason=ineligible_reason)
    history = []
    iterations = 1
    if iterative and method != "manual":
        for _ in range(max_iterations - 1):
            thresholds, scales = _estimate(
                tree, z, result.reach, per_marker, manual, per_population=True
            )
            new = apply_tree(
                tree, z, thresholds, scales, eligible, ineligible_reason=ineligible_reason
            )
            changed = int(np.sum(new.label != result.label))
            history.append(changed)
            result = new
            iterations += 1
            if changed == 0:
                break
    result.iterations = iterations
    result.history = history
    return result


def sensitivity(
    tree: GateTree,
    z: dict[str, np.ndarray],
    eligible: np.ndarray,
    base: GateResult,
    factors: list[float],
) -> tuple[dict[float, dict[str, int]], dict[float, np.ndarray], np.ndarray]:
    """Scale every threshold by each factor (in intensity, i.e. ``+ log(factor)`` on the log
    scale), relabel without re-estimating, and report.

    Returns per-factor class counts, per-factor labels, and each cell's stability: the fraction
    of factors that keep its base label.
    """
    counts: dict[float, dict[str, int]] = {}
    labels: dict[float, np.ndarray] = {}
    same = np.zeros(len(eligible))
    for f in factors:
        shifted = {
            p: {m: t + np.log(f) for m, t in ms.items()} for p, ms in base.thresholds.items()
        }
        res = apply_tree(tree, z, shifted, base.scales, eligible)
        labels[f] = res.label
        counts[f] = res.counts()
        same += res.label == base.label
    return counts, labels, same / max(len(factors), 1)
