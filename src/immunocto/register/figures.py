"""Figures of a registration: the residual heat map."""

from __future__ import annotations

import numpy as np

from immunocto.register.model import RegistrationModel


def plot_residuals(
    model: RegistrationModel,
    *,
    thumbnail: np.ndarray | None = None,
    thumb_downsample: float = 1.0,
    ax=None,
):
    """Residual magnitude per tile over an optional H&E thumbnail, arrows for direction,
    flagged tiles outlined in red. Returns the Axes (nothing is saved)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if ax is None:
        fig = Figure(figsize=(8, 7), dpi=100)
        ax = fig.subplots()
    rows, cols = model.residual_dx.shape
    t = model.tile_px
    h, w = model.he_shape if model.he_shape != (0, 0) else (rows * t, cols * t)
    if thumbnail is not None:
        th, tw = thumbnail.shape[:2]
        ax.imshow(thumbnail, extent=(0, tw * thumb_downsample, th * thumb_downsample, 0))
    mag = model.residual_magnitude
    vmax = max(float(np.nanmax(mag)) if np.isfinite(mag).any() else 1.0, model.max_residual_px)
    im = ax.imshow(
        np.ma.masked_invalid(mag),
        extent=(0, cols * t, rows * t, 0),
        cmap="magma",
        alpha=0.6,
        vmin=0,
        vmax=vmax,
    )
    cy, cx = (np.mgrid[0:rows, 0:cols] + 0.5) * t
    ok = np.isfinite(model.residual_dx)
    if ok.any():
        ax.quiver(
            cx[ok],
            cy[ok],
            model.residual_dx[ok],
            -model.residual_dy[ok],
            color="cyan",
            angles="xy",
            width=0.003,
        )
    for r, c in zip(*np.nonzero(model.flagged), strict=True):
        ax.add_patch(Rectangle((c * t, r * t), t, t, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xlabel("x (H&E level-0 px)")
    ax.set_ylabel("y (H&E level-0 px)")
    s = model.stats
    ax.set_title(
        f"{model.slide_id}: residual after affine (median {s.get('residual_median_px')} px, "
        f"max {s.get('residual_max_px')} px); red = above {model.max_residual_px:g} px"
    )
    ax.figure.colorbar(im, ax=ax, label="residual (IF px)", shrink=0.8)
    return ax
