"""Simulation parameters: slide size, seed, and the strength of every artifact.

Each artifact is switched by a strength: ``0`` off, ``1`` the default amount, larger is
stronger. Presets: ``none`` (all 0), ``default`` (all 1), ``harsh`` (all 2.5), and
``weak-stain`` (default, with many dim immune cells: the gates leave >= 35 % of the immune
cells ``ambiguous``, as Immunocto's Orion gates left most candidates unlabelled).
``weak_lineage`` came later and is 0 in ``none``/``default``/``harsh``, so those slides are
the same as before it existed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from immunocto.conventions import ORION_MPP
from immunocto.errors import ImmunoctoError

#: Artifacts the simulator can plant, each recorded per cell in truth as ``art_<name>``.
ARTIFACTS: tuple[str, ...] = (
    "misregistration",  # global offset + small affine + smooth warp + per-FOV stitching shifts
    "stain_gradient",  # antibody-penetration attenuation across the slide
    "weak_staining",  # a subpopulation of true T cells with faint CD3e/CD45
    "nonspecific",  # non-immune cells picking up lineage-marker signal
    "spillover",  # channel crosstalk (pixel level)
    "cd4_macrophage",  # macrophages expressing CD4 (biology that trips CD4 gates)
    "out_of_focus",  # blurred patches in the H&E scan
    "weak_lineage",  # B cells and macrophages with dim CD20 / CD68, CD163 (and CD45)
)

#: Strength per artifact for each preset (a float = every artifact but ``weak_lineage``).
PRESETS: dict[str, float | dict[str, float]] = {
    "none": 0.0,
    "default": 1.0,
    "harsh": 2.5,
    "weak-stain": {"weak_staining": 4.0, "weak_lineage": 4.0, "stain_gradient": 1.5},
}


def artifact_strengths(
    preset: str = "default", overrides: dict[str, float] | None = None
) -> dict[str, float]:
    """Strength per artifact from a preset name plus per-artifact overrides.

    Raises
    ------
    ImmunoctoError
        For an unknown preset or artifact name, or a negative strength.
    """
    if preset not in PRESETS:
        raise ImmunoctoError(
            f"unknown artifact preset {preset!r}; choose one of {', '.join(PRESETS)}"
        )
    base = PRESETS[preset]
    if isinstance(base, dict):  # default strengths, these changed
        strengths = {**dict.fromkeys(ARTIFACTS, 1.0), "weak_lineage": 0.0, **base}
    else:
        strengths = {**dict.fromkeys(ARTIFACTS, base), "weak_lineage": 0.0}
    for name, value in (overrides or {}).items():
        if name not in strengths:
            raise ImmunoctoError(
                f"unknown artifact {name!r}; known artifacts: {', '.join(ARTIFACTS)}"
            )
        if not value >= 0:
            raise ImmunoctoError(f"artifact {name!r}: strength must be >= 0 (got {value})")
        strengths[name] = float(value)
    return strengths


@dataclass(frozen=True)
class SimParams:
    """Parameters of one simulated slide pair.

    Attributes
    ----------
    size : int
        Width and height of the square slide in level-0 pixels.
    seed : int
        Dataset seed; slide ``k`` derives its own stream from ``(seed, k)``.
    slide_index : int
        Index of the slide in the dataset (``sim000`` is 0).
    artifacts : dict
        Strength per artifact (see :data:`ARTIFACTS`).
    mpp : float
        Microns per pixel at level 0 (Orion: 0.325).
    tile : int
        Tile edge in pixels, for rendering and for the TIFF tiles.
    """

    size: int = 2048
    seed: int = 0
    slide_index: int = 0
    artifacts: dict[str, float] = field(default_factory=lambda: artifact_strengths("default"))
    mpp: float = ORION_MPP
    tile: int = 512

    def __post_init__(self) -> None:
        if self.size < 256:
            raise ImmunoctoError(
                f"`size` must be at least 256 px (got {self.size})", arguments=("size",)
            )
        if self.tile % 16 or self.tile < 64:
            raise ImmunoctoError(
                f"`tile` must be a multiple of 16 and >= 64 (got {self.tile})", arguments=("tile",)
            )
        missing = set(ARTIFACTS) - set(self.artifacts)
        if missing:
            raise ImmunoctoError(f"artifact strengths missing for: {', '.join(sorted(missing))}")

    @property
    def slide_id(self) -> str:
        return f"sim{self.slide_index:03d}"

    def strength(self, name: str) -> float:
        return float(self.artifacts[name])

    def um(self, microns: float) -> float:
        """Convert microns to level-0 pixels."""
        return microns / self.mpp
