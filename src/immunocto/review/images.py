"""PNG renderings for the review page: H&E with the mask contour, IF composites, context.

All take a crop ``row`` (an integer) and read the crop store; the context view reads a
256 x 256 window around the cell from the slide (when the run has its ``immunocto.yaml``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from immunocto.db.gallery import COLOURS
from immunocto.db.store import CropStore, read_index, store_path

CONTOUR = np.array([0, 255, 80], np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Renderer:
    """Renders crops of one run; IF display ranges are fixed per marker from a sample of the
    store (1st-99.5th percentile), so a bright crop looks bright."""

    def __init__(self, run: str | os.PathLike[str], *, sample: int = 1024, seed: int = 0) -> None:
        self.run = Path(run)
        self.store = CropStore.open_readonly(store_path(run))
        self.markers = list(self.store.if_markers)
        self.ranges: dict[str, tuple[float, float]] = {}
        if self.store.if_ is not None and self.store.rows:
            rows = np.sort(read_index(run)[0].column("row").to_numpy())
            pick = np.sort(
                np.random.default_rng(seed).choice(rows, min(sample, len(rows)), replace=False)
            )
            data = self.store.if_.get_orthogonal_selection((pick,)).astype(np.float32)
            for c, m in enumerate(self.markers):
                lo, hi = np.percentile(data[:, c], [1, 99.5])
                self.ranges[m] = (float(lo), float(max(hi, lo + 1)))
        self._context = None

    def he(self, row: int, *, contour: bool = True) -> bytes:
        img = np.array(self.store.he[row])
        if contour:
            img[find_boundaries(self.store.mask[row] > 0, mode="inner")] = CONTOUR
        return png_bytes(img)

    def if_composite(self, row: int, channels: list[str], *, contour: bool = True) -> bytes:
        """Additive composite of ``channels`` (names of the store's IF markers)."""
        data = self.store.if_[row].astype(np.float32)
        out = np.zeros((*data.shape[1:], 3), np.float32)
        for m in channels:
            c = self.markers.index(m)
            lo, hi = self.ranges[m]
            out += np.clip((data[c] - lo) / (hi - lo), 0, 1)[..., None] * np.array(
                COLOURS.get(m, (1.0, 1.0, 1.0)), np.float32
            )
        img = (np.clip(out, 0, 1) * 255).astype(np.uint8)
        if contour:
            edge = find_boundaries(self.store.mask[row] > 0, mode="inner")
            img[edge] = (0.5 * img[edge] + 127).astype(np.uint8)
        return png_bytes(img)

    def context(self, row: int, *, size: int = 256) -> bytes | None:
        """``size`` x ``size`` H&E around the cell with the 64 px crop outlined, or None when the
        slides are not reachable (e.g. an imported database)."""
        if self._context is None:
            config = self.run / "immunocto.yaml"
            if not config.exists():
                return None
            from immunocto.db.windows import SlideWindows

            self._context = SlideWindows.from_config(config, size=size)
            index = read_index(self.run)[0].to_pandas()
            self._where = dict(
                zip(
                    index["row"].astype(int),
                    zip(index["slide_id"], index["x"], index["y"], strict=True),
                    strict=True,
                )
            )
        where = self._where.get(int(row))
        if where is None:
            return None
        img = self._context.window(*where).copy()
        c0, c1 = size // 2 - 32, size // 2 + 32
        for a, b in ((c0, c0), (c1 - 1, c1 - 1)):
            img[a, c0:c1] = CONTOUR
            img[c0:c1, b] = CONTOUR
        return png_bytes(img)

    def close(self) -> None:
        if self._context is not None:
            self._context.close()
