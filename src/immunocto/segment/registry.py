"""Backend names -> backend objects."""

from __future__ import annotations

from immunocto.config import SegmentParams
from immunocto.errors import ImmunoctoError
from immunocto.segment.base import Backend

BACKENDS = ("if-nuclear", "if-learned", "he", "he-classical", "sam", "cellpose", "stardist")
#: Backends whose tiles run a PyTorch network (Dask workers import it ahead: ``warm_workers``).
TORCH_BACKENDS = ("if-learned", "he", "sam", "cellpose")


def resolve_backend_name(name: str, *, has_if: bool) -> str:
    """``auto`` -> ``if-learned`` (the fluorescence nucleus network) when the slide has IF,
    else ``he`` (the H&E nucleus network); ``if-nuclear`` / ``he-classical`` are the classical
    ones."""
    if name == "auto":
        return "if-learned" if has_if else "he"
    if name not in BACKENDS:
        raise ImmunoctoError(
            f"unknown segmentation backend {name!r}; choose one of auto, {', '.join(BACKENDS)}"
        )
    return name


def make_backend(name: str, params: SegmentParams, *, has_if: bool) -> Backend:
    """A backend instance from its name and the ``segmentation:`` parameters."""
    from immunocto.segment.classical import HeBackend, IfNuclearBackend

    name = resolve_backend_name(name, has_if=has_if)
    if name == "if-nuclear":
        if not has_if:
            raise ImmunoctoError(
                "the if-nuclear backend needs an IF image for the slide; use --backend he"
            )
        return IfNuclearBackend(diameter_um=params.nucleus_diameter_um)
    if name == "if-learned":
        if not has_if:
            raise ImmunoctoError(
                "the if-learned backend needs an IF image for the slide; use --backend he"
            )
        from immunocto.segment.learned import LearnedIfBackend

        return LearnedIfBackend(params.if_nucleus_model)
    if name == "he":
        from immunocto.segment.learned import LearnedHeBackend

        return LearnedHeBackend(params.nucleus_model)
    if name == "he-classical":
        return HeBackend()
    if name == "sam":
        from immunocto.segment.sam import SamBackend

        guide = None
        if params.sam.mode == "guided":
            names = params.sam.guide.split("+")
            if not has_if:  # no IF: the H&E network guides alone
                names = [n for n in names if n != "if-nuclear"] or ["he"]
            from immunocto.segment.learned import LearnedHeBackend

            # a guide gives prompts: the H&E network needs no nucleus types for them
            guide = [
                LearnedHeBackend(params.nucleus_model, types=False)
                if n == "he"
                else make_backend(n, params, has_if=has_if)
                for n in names
            ]
        return SamBackend(params.sam, guide=guide)
    from immunocto.segment.adapters import CellposeBackend, StardistBackend

    if name == "cellpose":
        return CellposeBackend(params.model_path)
    return StardistBackend(params.model_path)
