"""Figures a person checks: gate densities with thresholds, and threshold sensitivity.

Plot functions take ``ax`` / ``fig`` and return them; nothing is saved here.
"""

from __future__ import annotations

import itertools

import numpy as np

from immunocto.phenotype.gate import GateResult
from immunocto.phenotype.tree import GateTree


def gate_panels(tree: GateTree) -> list[tuple[str, tuple[str, ...]]]:
    """(population, markers) of every panel: one histogram per single-marker decision, one
    2-D density per pair of deciding markers."""
    panels = []
    for parent in tree.internal():
        markers = tree.deciding_markers(parent)
        if len(markers) == 1:
            panels.append((parent, (markers[0],)))
        else:
            panels += [(parent, pair) for pair in itertools.combinations(markers, 2)]
    return panels


def plot_gates(
    tree: GateTree,
    z: dict[str, np.ndarray],
    result: GateResult,
    *,
    fig,
    title: str = "",
    features: dict[str, str] | None = None,
):
    """Every gate of the tree on ``fig``: densities of the deciding markers (log intensity)
    inside each population, with that population's thresholds. ``features`` (marker -> cell
    table column, e.g. ``Ki67_mean``) names the statistic on each axis."""
    features = features or {}

    def axis(m: str) -> str:
        col = features.get(m)
        return f"log {m} ({col[len(m) + 1 :]})" if col else f"log {m}"

    panels = gate_panels(tree)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (parent, markers) in zip(axes, panels, strict=False):
        inside = result.reach.get(parent, np.zeros(0, bool))
        n = int(inside.sum())
        thr = result.thresholds[parent]
        if len(markers) == 1:
            m = markers[0]
            v = z[m][inside]
            v = v[np.isfinite(v)]
            ax.hist(v, bins=80, color="0.35")
            ax.axvline(thr[m], color="red", lw=1.5)
            ax.set_xlabel(axis(m))
            ax.set_ylabel("cells")
        else:
            a, b = markers
            va, vb = z[a][inside], z[b][inside]
            ok = np.isfinite(va) & np.isfinite(vb)
            if ok.sum() > 1:
                ax.hist2d(va[ok], vb[ok], bins=70, cmap="magma", cmin=1)
            ax.axvline(thr[a], color="cyan", lw=1.2)
            ax.axhline(thr[b], color="cyan", lw=1.2)
            ax.set_xlabel(axis(a))
            ax.set_ylabel(axis(b))
        ax.set_title(f"{parent} (n={n})", fontsize=9)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title or f"gates of {tree.name} (lines: thresholds of each population)")
    return fig


def plot_sensitivity(
    counts: dict[float, dict[str, int]],
    flips: dict[tuple[str, str], int],
    classes: list[str],
    *,
    fig,
    title: str = "",
):
    """Class counts against the threshold factor (left) and the flip matrix, summed over all
    factors (right: rows = label at factor 1, columns = label after scaling)."""
    ax1, ax2 = fig.subplots(1, 2)
    factors = sorted(counts)
    for c in classes:
        ax1.plot(factors, [counts[f].get(c, 0) for f in factors], marker="o", label=c)
    ax1.axvline(1.0, color="0.5", lw=0.8, ls="--")
    ax1.set_xlabel("threshold x factor")
    ax1.set_ylabel("cells")
    ax1.legend(fontsize=8)
    ax1.set_title("class counts")
    mat = np.array([[flips.get((a, b), 0) for b in classes] for a in classes], float)
    im = ax2.imshow(np.log1p(mat), cmap="viridis")
    ax2.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax2.set_yticks(range(len(classes)), classes, fontsize=8)
    for i, j in zip(*np.nonzero(mat), strict=True):
        ax2.text(j, i, int(mat[i, j]), ha="center", va="center", color="white", fontsize=7)
    ax2.set_xlabel("label after scaling")
    ax2.set_ylabel("label at factor 1")
    ax2.set_title("flips (all factors)")
    fig.colorbar(im, ax=ax2, label="log(1 + cells)", shrink=0.8)
    fig.suptitle(title or "threshold sensitivity")
    return fig
