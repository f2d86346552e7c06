"""Where a tile's pixels sit in H&E level-0 space, and fast field evaluation there.

An H&E tile is a regular grid (``xs`` columns x ``ys`` rows), so smooth fields are
evaluated separably (two small matrix products); an IF tile is a warped grid (arbitrary
``X``, ``Y`` per pixel) and uses point-wise interpolation.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from immunocto._grid import linear_matrix
from immunocto.simulate.layout import GRID_PX, TissueLayout, nearest_discs
from immunocto.simulate.noise import lattice_noise, lattice_noise_grid


class TileGrid:
    """H&E level-0 positions of a tile's pixels: a regular grid or a warped one.

    Parameters
    ----------
    xs, ys : 1-D float ndarrays, optional
        Regular grid: column and row positions.
    X, Y : (h, w) float ndarrays, optional
        Warped grid: the position of every pixel.
    """

    def __init__(
        self,
        xs: np.ndarray | None = None,
        ys: np.ndarray | None = None,
        X: np.ndarray | None = None,
        Y: np.ndarray | None = None,
    ) -> None:
        self.regular = xs is not None
        if self.regular:
            self.xs = np.asarray(xs, np.float32)
            self.ys = np.asarray(ys, np.float32)
            self.X, self.Y = np.meshgrid(self.xs, self.ys)
        else:
            self.X = np.asarray(X, np.float32)
            self.Y = np.asarray(Y, np.float32)

    def regular_approximation(self) -> TileGrid:
        """A regular grid with this grid's shape and mean offset (for smooth fields only:
        a warped IF grid differs from it by the rotation and warp, a pixel or two)."""
        if self.regular:
            return self
        h, w = self.shape
        dx = float(self.X.mean()) - (w - 1) / 2.0
        dy = float(self.Y.mean()) - (h - 1) / 2.0
        return TileGrid(
            xs=np.arange(w, dtype=np.float32) + dx, ys=np.arange(h, dtype=np.float32) + dy
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.X.shape

    def noise(self, scale: float, seed: int) -> np.ndarray:
        """Unit-variance smooth noise at the pixels, ``(h, w)`` float32."""
        if self.regular:
            return lattice_noise_grid(self.xs, self.ys, scale=scale, seed=seed)
        return lattice_noise(self.X, self.Y, scale=scale, seed=seed)

    def grid_field(self, field: np.ndarray) -> np.ndarray:
        """Bilinear sample of a layout grid field (one node every ``GRID_PX`` px)."""
        if self.regular:
            wy = linear_matrix(self.ys / GRID_PX, field.shape[0])
            wx = linear_matrix(self.xs / GRID_PX, field.shape[1])
            # Only the nodes this tile touches take part in the product.
            rows = np.flatnonzero(wy.any(axis=0))
            cols = np.flatnonzero(wx.any(axis=0))
            sub = field[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            return wy[:, rows[0] : rows[-1] + 1] @ sub @ wx[:, cols[0] : cols[-1] + 1].T
        coords = np.stack([self.Y.ravel() / GRID_PX, self.X.ravel() / GRID_PX])
        return ndimage.map_coordinates(field, coords, order=1, mode="nearest").reshape(self.shape)

    def layout_fields(self, layout: TissueLayout) -> dict[str, np.ndarray]:
        """The fields of :meth:`TissueLayout.sample` at the pixels."""
        X, Y = self.X.ravel(), self.Y.ravel()
        agg = nearest_discs(layout.aggregates, X, Y, radius_col=2, wobble=True)
        v_lumen = nearest_discs(layout.vessels, X, Y, radius_col=2)
        v_wall = nearest_discs(layout.vessels, X, Y, radius_col=3)
        return {
            "tissue": self.grid_field(layout.tissue),
            "tumour": self.grid_field(layout.tumour),
            "tumour_dist_um": self.grid_field(layout.tumour_dist_um),
            "lumen": self.grid_field(layout.lumen),
            "aggregate": agg.reshape(self.shape),
            "vessel_lumen": v_lumen.reshape(self.shape),
            "vessel_wall": v_wall.reshape(self.shape),
        }
