"""The two classical backends: ``if-nuclear`` (Hoechst through the registration) and
``he-classical`` (hematoxylin threshold; the learned ``he`` backend is in :mod:`.learned`)."""

from __future__ import annotations

import numpy as np

from immunocto.errors import ImmunoctoError
from immunocto.register.apply import read_if_in_he_frame
from immunocto.segment.base import Backend, SlideContext, mean_per_label
from immunocto.segment.he import HE_PARAMS, nuclear_density
from immunocto.segment.if_nuclear import IF_PARAMS, resolve_diameter
from immunocto.segment.nuclei import foreground_image, otsu, scale_params, segment_foreground


def nuclear_stain(ctx: SlideContext, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The IF nuclear stain of the H&E-frame window ``(x, y, w, h)``, through the registration."""
    if ctx.if_ is None or ctx.registration is None:
        raise ImmunoctoError(
            f"{ctx.slide_id}: IF nucleus segmentation needs the IF and its registration "
            "(run `immunocto register`), or use --backend he"
        )
    return read_if_in_he_frame(
        ctx.if_, ctx.registration, x, y, w, h, channels=[ctx.nuclear_channel]
    )[0]


class IfNuclearBackend(Backend):
    """Nuclei from the IF nuclear stain, read into the H&E frame through the registration.

    ``diameter_um``: the nucleus diameter every length scales with, or ``"auto"`` (measured
    once per slide from the sample windows, like the threshold, so every tile cuts the same
    way; stored as ``slide_stats["nucleus_diameter_um"]``)."""

    name = "if-nuclear"
    needs_if = True

    def __init__(self, params=IF_PARAMS, diameter_um: float | str = "auto") -> None:
        self.params = params
        self.diameter_um = diameter_um

    def prepare(self, ctx: SlideContext, sample_windows: list[tuple[int, int, int, int]]) -> None:
        stains = [nuclear_stain(ctx, *win) for win in sample_windows]
        values = [foreground_image(s, mpp=ctx.mpp, params=self.params) for s in stains]
        thr = otsu(np.concatenate([v.ravel() for v in values])) if values else 0.0
        diameter = resolve_diameter(
            self.diameter_um, values, mpp=ctx.mpp, threshold=thr, params=self.params
        )
        params = scale_params(self.params, diameter)
        if params is not self.params:  # the threshold of the rescaled smoothing
            values = [foreground_image(s, mpp=ctx.mpp, params=params) for s in stains]
            thr = otsu(np.concatenate([v.ravel() for v in values])) if values else 0.0
        ctx.stats["threshold"] = thr
        ctx.stats["nucleus_diameter_um"] = round(diameter, 3)

    def _params(self, ctx: SlideContext):
        return scale_params(self.params, ctx.stats.get("nucleus_diameter_um", 10.0))

    def segment(
        self, ctx: SlideContext, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray]:
        stain = nuclear_stain(ctx, x, y, w, h)
        thr = ctx.stats.get("threshold")
        params = self._params(ctx)
        labels = segment_foreground(stain, mpp=ctx.mpp, threshold=thr, params=params)
        fg = foreground_image(stain, mpp=ctx.mpp, params=params)
        return labels, mean_per_label(labels, fg) / max(thr or 1.0, 1e-6)

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "params": vars(self.params),
            "nucleus_diameter_um": self.diameter_um,
        }


class HeBackend(Backend):
    """``he-classical``: nuclei from hematoxylin density (colour deconvolution) of the H&E."""

    name = "he-classical"
    needs_if = False

    def __init__(self, params=HE_PARAMS) -> None:
        self.params = params

    def prepare(self, ctx: SlideContext, sample_windows: list[tuple[int, int, int, int]]) -> None:
        values = []
        for win in sample_windows:
            density = nuclear_density(ctx.he.read_region(*win))
            values.append(foreground_image(density, mpp=ctx.mpp, params=self.params).ravel())
        ctx.stats["threshold"] = otsu(np.concatenate(values)) if values else 0.0

    def segment(
        self, ctx: SlideContext, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray]:
        density = nuclear_density(ctx.he.read_region(x, y, w, h))
        thr = ctx.stats.get("threshold")
        labels = segment_foreground(density, mpp=ctx.mpp, threshold=thr, params=self.params)
        fg = foreground_image(density, mpp=ctx.mpp, params=self.params)
        return labels, mean_per_label(labels, fg) / max(abs(thr or 1.0), 1e-6)

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "params": vars(self.params)}
