"""A preview figure of a simulated slide: H&E beside an IF false-colour composite.

Both panels show the same H&E region; the IF is resampled into it through the *global
affine* of the true registration only, so the local warp and FOV shifts that remain show
as an offset between the truth outlines and the IF signal, as a person would see it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy import ndimage
from skimage.segmentation import find_boundaries

from immunocto._fs import atomic_path
from immunocto.config import RunConfig
from immunocto.conventions import CLASS_COLOURS, CLASSES
from immunocto.io import open_slide

#: IF composite: marker -> colour.
COMPOSITE: dict[str, tuple[float, float, float]] = {
    "Hoechst": (0.15, 0.3, 1.0),
    "CD3e": (0.1, 1.0, 0.1),
    "CD20": (1.0, 0.15, 0.15),
    "CD68": (1.0, 0.8, 0.0),
    "Pan-CK": (0.45, 0.45, 0.45),
}


def pick_region(cells, size: int, window: int) -> tuple[int, int]:
    """Top-left ``(y0, x0)`` of a window rich in every immune class."""
    step = max(window // 4, 64)
    best, best_score = (0, 0), -1.0
    xs, ys, cls = cells["x"], cells["y"], cells["class"]
    for y0 in range(0, max(size - window, 0) + 1, step):
        for x0 in range(0, max(size - window, 0) + 1, step):
            inside = (xs >= x0) & (xs < x0 + window) & (ys >= y0) & (ys < y0 + window)
            counts = [int(np.sum(inside & (cls == c))) for c in CLASSES[:4]]
            score = min(counts) * 4 + sum(counts) * 0.1 + int(inside.sum()) * 0.01
            if score > best_score:
                best, best_score = (y0, x0), score
    return best


def _norm(channel: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(channel, [1.0, 99.7])
    return np.clip((channel.astype(np.float32) - lo) / max(hi - lo, 1.0), 0.0, 1.0)


def write_preview(cfg: RunConfig, slide_id: str, *, window: int = 768) -> Path:
    """Write ``RUN/preview/<slide_id>.png`` and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    slide = cfg.slide(slide_id)
    truth_dir = cfg.resolve(cfg.simulation.truth if cfg.simulation else "truth") / slide_id
    cells = pq.read_table(
        truth_dir / "cells.parquet", columns=["cell_id", "x", "y", "class"]
    ).to_pandas()
    cells_np = {k: cells[k].to_numpy() for k in cells.columns}
    registration = json.loads((truth_dir / "registration.json").read_text())
    size = int(registration["he_shape"][0])
    window = min(window, size)
    y0, x0 = pick_region(cells_np, size, window)

    with open_slide(cfg.resolve(slide.he)) as he_slide:
        he = he_slide.read_region(x0, y0, window, window)
    with open_slide(truth_dir / "nuclei.tif") as labels:
        nuclei = labels.read_region(x0, y0, window, window)[0]

    # IF window through the global affine: H&E (x, y) -> IF (u, v) = A @ (x, y, 1).
    affine = np.asarray(registration["affine"], float)
    corners = np.array(
        [[x0, y0, 1], [x0 + window, y0, 1], [x0, y0 + window, 1], [x0 + window, y0 + window, 1]],
        float,
    )
    uv = corners @ affine.T
    pad = 8
    u0 = int(np.floor(uv[:, 0].min())) - pad
    v0 = int(np.floor(uv[:, 1].min())) - pad
    u1 = int(np.ceil(uv[:, 0].max())) + pad
    v1 = int(np.ceil(uv[:, 1].max())) + pad
    cu0, cv0 = max(u0, 0), max(v0, 0)
    markers = cfg.resolve(slide.markers) if slide.markers else None
    with open_slide(cfg.resolve(slide.if_), markers=markers) as if_slide:
        if_block = if_slide.read_region(cu0, cv0, u1 - cu0, v1 - cv0, channels=list(COMPOSITE))
    # Output pixel (row r, col c) shows H&E (x0 + c, y0 + r) -> IF (u, v) - block origin.
    matrix = np.array([[affine[1, 1], affine[1, 0]], [affine[0, 1], affine[0, 0]]])
    offset = np.array(
        [
            affine[1, 0] * x0 + affine[1, 1] * y0 + affine[1, 2] - cv0,
            affine[0, 0] * x0 + affine[0, 1] * y0 + affine[0, 2] - cu0,
        ]
    )
    composite = np.zeros((window, window, 3), np.float32)
    for k, marker in enumerate(COMPOSITE):
        warped = ndimage.affine_transform(
            if_block[k].astype(np.float32),
            matrix,
            offset=offset,
            output_shape=(window, window),
            order=1,
        )
        composite += _norm(warped)[..., None] * np.array(COMPOSITE[marker], np.float32)
    composite = np.clip(composite, 0.0, 1.0)

    # Truth outlines coloured by class.
    cls_of = dict(zip(cells["cell_id"].to_numpy(), cells["class"].to_numpy(), strict=True))
    edges = find_boundaries(nuclei, mode="inner")
    overlay_he = he.astype(np.float32) / 255.0
    overlay_if = composite.copy()
    ids = nuclei[edges]
    colours = (
        np.array(
            [CLASS_COLOURS.get(cls_of.get(i, "other"), (255, 255, 255)) for i in ids], np.float32
        ).reshape(-1, 3)
        / 255
    )
    overlay_he[edges] = colours
    overlay_if[edges] = 0.5 * overlay_if[edges] + 0.5 * colours

    fig = Figure(figsize=(13, 6.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    um = window * slide.mpp
    extent = (0, um, um, 0)
    axes[0].imshow(overlay_he, extent=extent)
    axes[0].set_title("H&E with true nuclei (colour = class)")
    axes[1].imshow(overlay_if, extent=extent)
    axes[1].set_title("IF: Hoechst blue, CD3e green, CD20 red, CD68 yellow, Pan-CK grey")
    for ax in axes:
        ax.set_xlabel("µm")
    axes[0].set_ylabel("µm")
    handles = [Patch(color=np.divide(CLASS_COLOURS[c], 255), label=c) for c in CLASSES]
    fig.legend(handles=handles, loc="lower center", ncol=len(CLASSES), frameon=False)
    art = cfg.simulation.artifacts if cfg.simulation else "?"
    fig.suptitle(
        f"{slide_id}: region x {x0}-{x0 + window}, y {y0}-{y0 + window} px (level 0), "
        f"artifacts '{art}'; IF resampled by the global affine only"
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    path = cfg.run_dir / "preview" / f"{slide_id}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
