"""Draws docs/pipeline.png, the stage diagram of the Getting-started page, from the pipeline's
own stage list (``immunocto.pipeline.STAGES``), so the picture cannot drift from the code.

    python docs/pipeline_figure.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from immunocto.pipeline import STAGES

INPUTS = "H&E + IF slide pair\n(OME-TIFF, SVS, OME-Zarr)\n+ immunocto.yaml"
PER_ROW = 4
OUTPUTS = {
    "segment": "cells/<slide>.parquet\nmasks/<slide>.zarr",
    "gate": "gate_label",
    "build-db": "crops.zarr + crops.parquet",
    "review": "review.sqlite → V0",
    "expand": "v1_label (V1)",
    "train-he": "models/he",
    "predict": "predictions/",
    "validate": "reports/validation.html",
}


def main(out: Path = Path(__file__).with_name("pipeline.png")) -> Path:
    names = [s.name for s in STAGES]
    rows = (len(names) + PER_ROW - 1) // PER_ROW
    fig, ax = plt.subplots(figsize=(11, 1.5 * rows + 0.8))
    ax.set_xlim(-1.6, PER_ROW * 2.6)
    ax.set_ylim(-(rows - 1) * 1.9 - 0.9, 1.0)
    ax.axis("off")
    ax.text(-1.5, 0.55, INPUTS, fontsize=8.5, va="center", ha="left", color="#444")
    pos = []
    for i, name in enumerate(names):
        r, c = divmod(i, PER_ROW)
        if r % 2:  # serpentine: every other row runs right to left
            c = PER_ROW - 1 - c
        x, y = 0.9 + c * 2.6, -r * 1.9
        pos.append((x, y))
        ax.add_patch(
            FancyBboxPatch(
                (x - 0.9, y - 0.32),
                1.8,
                0.64,
                boxstyle="round,pad=0.05",
                fc="#e8eef7",
                ec="#34558b",
                lw=1.2,
            )
        )
        ax.text(x, y + 0.02, name, ha="center", va="center", fontsize=11, weight="bold")
        if name in OUTPUTS:
            ax.text(
                x, y - 0.62, OUTPUTS[name], ha="center", va="center", fontsize=7.5, color="#555"
            )
    for (x0, y0), (x1, y1) in itertools.pairwise(pos):
        if y0 == y1:
            start, end = (
                (x0 + (0.95 if x1 > x0 else -0.95), y0),
                (x1 - (0.95 if x1 > x0 else -0.95), y1),
            )
        else:
            start, end = (x0 + 0.55, y0 - 0.36), (x1 + 0.55, y1 + 0.36)
        ax.add_patch(
            FancyArrowPatch(
                start, end, arrowstyle="-|>", mutation_scale=14, color="#34558b", lw=1.2
            )
        )
    ax.set_title(
        "immunocto run: one stage after another, each skipped when its outputs are current",
        fontsize=11,
        loc="left",
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main())
