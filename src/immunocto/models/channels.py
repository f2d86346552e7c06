"""The 12 input channels of the bootstrap classifier and their normalisation.

Channel order: ``R, G, B`` (H&E / 255), ``mask`` (0/1), then ``log1p`` of the raw IF counts of
Hoechst, CD45, CD3e, CD4, CD8a, CD20, CD163, CD68. Each channel is standardised with the mean
and standard deviation measured on the training crops (recorded in the model's
``config.json``), so a model always sees its inputs as it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from immunocto.conventions import CLASSIFIER_IF_MARKERS

IMAGE_CHANNELS = ("R", "G", "B", "mask")


@dataclass
class InputSpec:
    """Channel names and their standardisation (``(x - mean) / std``)."""

    if_markers: tuple[str, ...] = CLASSIFIER_IF_MARKERS
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def channels(self) -> tuple[str, ...]:
        return (*IMAGE_CHANNELS, *self.if_markers)

    def to_dict(self) -> dict:
        return asdict(self) | {
            "channels": list(self.channels),
            "if_transform": "log1p(counts)",
            "rgb_transform": "/255",
        }

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(if_markers=tuple(d["if_markers"]), mean=list(d["mean"]), std=list(d["std"]))


def raw_input(he: torch.Tensor, mask: torch.Tensor, if_: torch.Tensor | None) -> torch.Tensor:
    """Unnormalised ``(B, 4 + C, 64, 64)`` float32 from a batch: ``he`` ``(B, 3, h, w)`` uint8
    or float in [0, 255], ``mask`` ``(B, 1, h, w)``, ``if_`` ``(B, C, h, w)`` raw counts."""
    parts = [he.float() / 255.0, (mask > 0).float()]
    if if_ is not None:
        parts.append(
            torch.log1p(if_.float() if if_.dtype != torch.uint16 else if_.to(torch.int32).float())
        )
    return torch.cat(parts, dim=1)


def fit_spec(batches, if_markers: tuple[str, ...], max_crops: int = 8192) -> InputSpec:
    """Per-channel mean/std over up to ``max_crops`` crops of ``batches`` (dicts with he, mask, if)."""
    total, sq, n = None, None, 0
    for b in batches:
        x = raw_input(b["he"], b["mask"], b.get("if")).double()
        s = x.sum(dim=(0, 2, 3))
        q = (x * x).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        sq = q if sq is None else sq + q
        n += x.shape[0] * x.shape[2] * x.shape[3]
        if n >= max_crops * 64 * 64:
            break
    if total is None:
        raise ValueError("no training crops to measure the channel statistics on")
    mean = total / n
    std = torch.sqrt(torch.clamp(sq / n - mean * mean, min=1e-8))
    return InputSpec(
        if_markers=if_markers, mean=mean.tolist(), std=np.maximum(std.numpy(), 1e-3).tolist()
    )


def normalise(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean) / std
