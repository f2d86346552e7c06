"""The backend interface, and what a backend can read of a slide.

A backend segments one window of the H&E level-0 grid and returns an instance label image
of that window plus a score per label (and any per-object columns it declares, such as the
H&E network's nucleus types). Everything else (tiles, seams, writing, the cell table) is the
tiled driver's job, so a new backend is a small class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from immunocto.io.base import Slide
from immunocto.register.model import RegistrationModel


@dataclass
class SlideContext:
    """What a backend may read: the H&E, the IF and its registration (when they exist).

    Coordinates handed to backends are H&E level-0 pixels (``x`` = column, ``y`` = row).
    """

    slide_id: str
    he: Slide
    if_: Slide | None = None
    registration: RegistrationModel | None = None
    nuclear_channel: str = "Hoechst"
    stats: dict[str, float] = field(default_factory=dict)  # slide-level values set by prepare()

    @property
    def mpp(self) -> float:
        return float(self.he.mpp)


@dataclass(frozen=True)
class SlidePaths:
    """How a worker process reopens the slides (file handles must not cross a fork)."""

    slide_id: str
    he: Path
    he_mpp: float
    if_: Path | None
    markers: Path | None
    registration: Path | None
    nuclear_channel: str
    if_mpp: float | None = None  # the config's IF pixel size (overrides the file's)

    @classmethod
    def for_slide(cls, cfg, slide, registration: Path | None = None) -> SlidePaths:
        """How workers reopen ``slide`` (a ``SlideConfig`` of ``cfg``), with its pixel sizes."""
        return cls(
            slide_id=slide.id,
            he=cfg.resolve(slide.he),
            he_mpp=slide.mpp,
            if_=cfg.resolve(slide.if_) if slide.if_ else None,
            markers=cfg.resolve(slide.markers) if slide.markers else None,
            registration=registration,
            nuclear_channel=cfg.registration.nuclear_channel,
            if_mpp=slide.if_mpp,
        )

    def open(self, stats: dict[str, float]) -> SlideContext:
        from immunocto.io.open import open_slide

        he = open_slide(self.he, mpp=self.he_mpp)
        if_ = open_slide(self.if_, markers=self.markers, mpp=self.if_mpp) if self.if_ else None
        if if_ is not None and if_.mpp is None:
            if_.mpp = he.mpp
        reg = RegistrationModel.load(self.registration) if self.registration else None
        return SlideContext(self.slide_id, he, if_, reg, self.nuclear_channel, dict(stats))


class Backend(ABC):
    """A segmentation method.

    Subclasses set ``name`` and ``needs_if``, may compute slide-level values once in
    :meth:`prepare` (stored in ``ctx.stats`` so every tile cuts the same way), and implement
    :meth:`segment`.
    """

    name: str = "backend"
    needs_if: bool = False

    def prepare(self, ctx: SlideContext, sample_windows: list[tuple[int, int, int, int]]) -> None:  # noqa: B027
        """Slide-level set-up from a few windows ``(x, y, w, h)`` on tissue (default: none)."""

    @abstractmethod
    def segment(
        self, ctx: SlideContext, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Segment the H&E window ``[y:y+h, x:x+w]``.

        Returns
        -------
        labels : (h, w) int32 ndarray
            0 = background, objects 1..n.
        scores : (n + 1,) float ndarray
            ``scores[i]`` is the confidence of object ``i`` (index 0 unused).
        columns : dict of (n + 1,) ndarrays, optional third element
            More per-object columns of the cell table, indexed like ``scores``: exactly the
            names of :meth:`object_columns` (a backend that declares none returns two).
        """

    def object_columns(self) -> dict[str, str]:
        """The extra per-object columns :meth:`segment` returns, name -> ``float32`` or
        ``string`` (default: none). They go into the cell table after ``seg_score``; an
        empty slide's table still has them."""
        return {}

    def describe(self) -> dict[str, object]:
        """Parameters to record with the results."""
        return {"backend": self.name}


def mean_per_label(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over each label (index = label id; 0 for absent ids)."""
    n = int(labels.max()) + 1 if labels.size else 1
    sums = np.bincount(labels.ravel(), weights=values.ravel().astype(np.float64), minlength=n)
    counts = np.bincount(labels.ravel(), minlength=n)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
