"""Contact sheets of stored cells: H&E with the mask contour beside an IF composite."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from immunocto._fs import atomic_path
from immunocto.db.store import CropStore, read_index, store_path
from immunocto.errors import ImmunoctoError

#: IF composite colours of the classifier markers.
COLOURS = {
    "Hoechst": (0.2, 0.35, 1.0),
    "CD3e": (0.1, 1.0, 0.1),
    "CD20": (1.0, 0.15, 0.15),
    "CD68": (1.0, 0.8, 0.0),
    "CD8a": (0.0, 0.9, 0.9),
    "CD4": (1.0, 0.4, 0.9),
}


def composite(if_crops: np.ndarray, markers: list[str]) -> np.ndarray:
    """``(N, C, h, w)`` uint16 -> ``(N, h, w, 3)`` float RGB, each marker scaled by its own 1-99.5%."""
    out = np.zeros((*if_crops.shape[:1], *if_crops.shape[2:], 3), np.float32)
    for c, m in enumerate(markers):
        if m not in COLOURS:
            continue
        v = if_crops[:, c].astype(np.float32)
        lo, hi = np.percentile(v, [1, 99.5])
        out += np.clip((v - lo) / max(hi - lo, 1.0), 0, 1)[..., None] * np.array(
            COLOURS[m], np.float32
        )
    return np.clip(out, 0, 1)


def gallery(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    label: str | None = None,
    n: int = 100,
    seed: int = 0,
    columns: int = 10,
) -> Path:
    """Write a PNG contact sheet of ``n`` random stored cells (of ``label``) and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from skimage.segmentation import find_boundaries

    index, _ = read_index(run)
    if label:
        index = index.filter(pc.equal(index.column("label"), label))
    if index.num_rows == 0:
        raise ImmunoctoError(
            f"{run}: no stored cells{f' labelled {label!r}' if label else ''}; build the database first"
        )
    pick = np.sort(
        np.random.default_rng(seed).choice(index.num_rows, min(n, index.num_rows), replace=False)
    )
    rows = index.column("row").to_numpy()[pick]
    store = CropStore.open_readonly(store_path(run))
    he = store.he.get_orthogonal_selection((rows,))
    mask = store.mask.get_orthogonal_selection((rows,))
    tiles = he.astype(np.float32) / 255.0
    edges = np.stack([find_boundaries(m, mode="inner") for m in mask])
    tiles[edges] = (0.0, 1.0, 0.3)
    if store.if_ is not None:
        comp = composite(store.if_.get_orthogonal_selection((rows,)), store.if_markers)
        comp[edges] = 0.5 * comp[edges] + 0.5
        tiles = np.concatenate(
            [tiles, np.ones((len(tiles), tiles.shape[1], 2, 3), np.float32), comp], axis=2
        )
    k = len(tiles)
    cols = min(columns, k)
    rows_n = -(-k // cols)
    h, w = tiles.shape[1:3]
    sheet = np.ones((rows_n * (h + 4), cols * (w + 4), 3), np.float32)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * (h + 4) : r * (h + 4) + h, c * (w + 4) : c * (w + 4) + w] = t
    fig = Figure(figsize=(max(4, cols * w / 60), max(3, rows_n * h / 60 + 0.6)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(sheet)
    ax.axis("off")
    names = index.column("label").to_numpy(zero_copy_only=False)[pick]
    title = f"{label or 'all labels'}: {k} of {index.num_rows} cells (H&E + mask contour"
    title += (
        ", IF: Hoechst blue, CD3e green, CD20 red, CD68 yellow, CD8a cyan, CD4 pink)"
        if store.if_ is not None
        else ")"
    )
    ax.set_title(
        title if label else title + f"; classes shown: {', '.join(sorted(set(names)))}", fontsize=9
    )
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out)
