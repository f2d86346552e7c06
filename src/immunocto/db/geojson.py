"""QuPath GeoJSON of a slide's cells, streamed: a million cells never sit in memory as objects.

One Feature per cell: ``geometry`` = the mask outline as a Polygon in H&E level-0 pixel
coordinates (``x`` = column, ``y`` = row, what QuPath uses for the full-resolution image),
``properties.objectType`` = ``cell`` (with the same outline as ``nucleusGeometry``: our masks
are nuclei) or ``detection``, ``properties.classification`` = ``{"name": label, "color":
[r, g, b]}``, and ``properties.measurements``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

from immunocto._fs import atomic_path
from immunocto.conventions import CLASS_COLOURS, CLASSES, NUCLEUS_TYPE_COLOURS
from immunocto.errors import ImmunoctoError
from immunocto.progress import NullProgress, Progress

#: Class and nucleus-type colours by name (QuPath shows them on the outlines).
COLOURS = {**NUCLEUS_TYPE_COLOURS, **CLASS_COLOURS}
#: Label columns in order of preference (the most curated first; the H&E network's nucleus
#: type where nothing else labels the cells).
LABEL_PREFERENCE = ("v1_label", "review_label", "model_label", "gate_label", "nucleus_type")
MEASUREMENT_COLUMNS = (
    "area_um2",
    "eccentricity",
    "solidity",
    "seg_score",
    "gate_margin",
    "gate_stability",
)


def outline(mask: np.ndarray) -> np.ndarray | None:
    """Closed outline ``(K, 2)`` as (x, y) of a binary mask (the longest contour), or None."""
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.uint8), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return None
    c = max(contours, key=len)
    xy = np.stack([c[:, 1] - 1, c[:, 0] - 1], axis=1)
    if not np.array_equal(xy[0], xy[-1]):
        xy = np.vstack([xy, xy[:1]])
    return xy


def write_geojson(
    cells_parquet: str | os.PathLike[str],
    mask_store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    object_type: str = "cell",
    label_column: str | None = None,
    tile: int = 2048,
    progress: Progress | None = None,
) -> tuple[Path, int]:
    """Write the GeoJSON FeatureCollection; returns the path and the number of features."""
    if object_type not in ("cell", "detection"):
        raise ImmunoctoError(
            f"`object_type` must be cell or detection (got {object_type!r})",
            arguments=("object_type",),
        )
    progress = progress or NullProgress()
    names = pq.read_schema(cells_parquet).names
    label_column = label_column or next((c for c in LABEL_PREFERENCE if c in names), None)
    if label_column is not None and label_column not in names:
        raise ImmunoctoError(f"{cells_parquet}: no column {label_column!r}")
    keep = ["cell_id", "x", "y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]
    extra = [c for c in MEASUREMENT_COLUMNS if c in names] + [
        c for c in names if c.endswith("_mean")
    ]
    columns = keep + ([label_column] if label_column else []) + extra
    df = pq.read_table(cells_parquet, columns=columns).to_pandas()  # only what is written
    mask = zarr.open_array(str(mask_store), mode="r")
    h, w = mask.shape
    tx = (df["x"].to_numpy() // tile).astype(np.int64)
    ty = (df["y"].to_numpy() // tile).astype(np.int64)
    groups = df.groupby([ty, tx], sort=True)
    n = 0
    progress.start("geojson", len(df), unit="cells")
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [\n')
        for _, cells in groups:
            # one read of the label image covering every bbox of this tile's cells
            x0, y0 = int(cells["bbox_x0"].min()), int(cells["bbox_y0"].min())
            x1, y1 = int(cells["bbox_x1"].max()), int(cells["bbox_y1"].max())
            block = np.asarray(mask[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)])
            for row in cells.itertuples(index=False):
                sub = (
                    block[row.bbox_y0 - y0 : row.bbox_y1 - y0, row.bbox_x0 - x0 : row.bbox_x1 - x0]
                    == row.cell_id
                )
                xy = outline(sub)
                if xy is None:
                    continue
                xy = xy + np.array([row.bbox_x0, row.bbox_y0], float)
                geometry = {"type": "Polygon", "coordinates": [np.round(xy, 2).tolist()]}
                label = getattr(row, label_column) if label_column else None
                props: dict[str, object] = {"objectType": object_type}
                if object_type == "cell":
                    props["nucleusGeometry"] = geometry
                if label is not None:
                    props["classification"] = {
                        "name": str(label),
                        "color": list(COLOURS.get(str(label), (255, 255, 255))),
                    }
                props["measurements"] = {
                    c: (None if v != v else round(float(v), 4))
                    for c in extra
                    if (v := getattr(row, c, None)) is not None
                }
                feature = {
                    "type": "Feature",
                    "id": f"cell-{int(row.cell_id)}",
                    "geometry": geometry,
                    "properties": props,
                }
                fh.write(("" if n == 0 else ",\n") + json.dumps(feature, separators=(",", ":")))
                n += 1
            progress.advance("geojson", len(cells))
        fh.write("\n]}\n")
    return Path(out), n


__all__ = ["CLASSES", "CLASS_COLOURS", "outline", "write_geojson"]
