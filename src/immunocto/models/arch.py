"""Architectures: torchvision ResNets (weights=None) with a 12-channel stem, a small CNN for
CPUs and tests, and the H&E nucleus network's encoder (``nuclei``, H&E-only model). Local
weights (``--init PATH``, or ``--init nuclei`` for the shipped nucleus network) can seed a
model; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from immunocto.errors import ImmunoctoError

ARCHS = ("small", "resnet18", "resnet50", "nuclei")


class SmallNet(nn.Module):
    """A compact CNN for CPUs and tests (~0.3 M parameters, ~35 M multiply-adds per crop):
    a stride-2 stem to 32 x 32, then three conv blocks (48-96-192, BN, ReLU, 2 x 2 pooling),
    global average pooling and a linear head."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 24) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w, stride=2),  # 32 x 32
            *block(w, 2 * w), nn.MaxPool2d(2),  # 16 x 16
            *block(2 * w, 4 * w), nn.MaxPool2d(2),  # 8 x 8
            *block(4 * w, 8 * w), nn.MaxPool2d(2),  # 4 x 4
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * w, n_classes)
        )

        self.feature_dim = 8 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, feature_dim)``."""
        return self.head[1](self.head[0](self.features(x)))


def build_model(arch: str, in_channels: int, n_classes: int) -> nn.Module:
    """A randomly initialised model taking ``(B, in_channels, 64, 64)``."""
    if arch == "small":
        return SmallNet(in_channels, n_classes)
    if arch in ("resnet18", "resnet50"):
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None, num_classes=n_classes)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model
    raise ImmunoctoError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def load_init(model: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Seed ``model`` from a local state dict (e.g. ImageNet ResNet weights saved with
    ``torch.save(m.state_dict())``). A 3-channel first conv is widened (RGB kept, extra
    channels start at the RGB mean); the classifier head is skipped when its shape differs.
    Returns the names of the tensors that were not taken."""
    path = Path(path)
    if not path.exists():
        raise ImmunoctoError(
            f"{path}: no such weights file (`init` / training.init)", arguments=("init",)
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ImmunoctoError(f"{path}: not a PyTorch state dict ({type(err).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    taken, skipped = {}, []
    for name, value in state.items():
        name = name.removeprefix("module.")
        if name not in own:
            skipped.append(name)
            continue
        target = own[name]
        if value.shape == target.shape:
            taken[name] = value
        elif (
            value.ndim == 4
            and value.shape[1] == 3
            and value.shape[0] == target.shape[0]
            and value.shape[2:] == target.shape[2:]
        ):
            widened = value.mean(dim=1, keepdim=True).repeat(1, target.shape[1], 1, 1)
            widened[:, :3] = value
            taken[name] = widened * (3.0 / target.shape[1])
        else:
            skipped.append(name)
    model.load_state_dict(taken, strict=False)
    return skipped


def trunk(arch: str, in_channels: int) -> tuple[nn.Module, int]:
    """A feature extractor ``(B, in_channels, 64, 64) -> (B, D)`` and its ``D``."""
    if arch == "nuclei":
        enc = NucleusEncoder(in_channels)
        return enc, enc.feature_dim
    if arch == "small":
        net = SmallNet(in_channels, 1)
        return _Embed(net), net.feature_dim
    model = build_model(arch, in_channels, 1)
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, dim


class _Embed(nn.Module):
    def __init__(self, net: SmallNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)


class HENet(nn.Module):
    """The H&E-only model: a crop branch (``arch``) on the 64 x 64 crop + mask (4 channels) and,
    with ``context``, a small branch on the 64 x 64 box-averaged 256 x 256 context window (3
    channels); their pooled features are concatenated into a linear head of ``n_out`` outputs
    (class logits, or marker intensities for the regression kind).

    ``forward(x, ctx)``: ``x`` ``(B, 4, 64, 64)``, ``ctx`` ``(B, 3, 64, 64)`` or ``None``.
    """

    def __init__(self, arch: str, n_out: int, *, context: bool = True) -> None:
        super().__init__()
        self.crop, dim = trunk(arch, 4)
        self.context = None
        if context:
            self.context, cdim = trunk("small", 3)
            dim += cdim
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(dim, n_out))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.crop(x)
        if self.context is not None:
            if ctx is None:
                raise ValueError("this model was trained with a context window: give ctx")
            feats = torch.cat([feats, self.context(ctx)], dim=1)
        return self.head(feats)


class NucleusEncoder(nn.Module):
    """The H&E nucleus network's encoder as a crop trunk: the ``down.*`` levels of
    :class:`immunocto.segment.net.NucleusNet` (same names, so its weights load one to one),
    max-pool between levels, global average pool at the end.

    ``forward(x)``: ``(B, in_channels, h, w)`` (``h``, ``w`` multiples of 8) -> ``(B, widths[-1])``.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        from immunocto.segment.net import Block

        self.widths = tuple(int(w) for w in widths)
        self.down = nn.ModuleList()
        c = in_channels
        for w in self.widths:
            self.down.append(Block(c, w))
            c = w
        self.feature_dim = self.widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.down):
            if i:
                x = nn.functional.max_pool2d(x, 2)
            x = block(x)
        return x.mean(dim=(2, 3))


def nucleus_model_folder(
    init: str | os.PathLike[str] | None, *, shipped: str | None = None
) -> Path | None:
    """The nucleus model folder ``init`` names (``"nuclei"``: the shipped one, ``shipped``
    naming which: the H&E network by default), or ``None`` when ``init`` is something else
    (a state-dict file)."""
    if init is None:
        return None
    if str(init) == "nuclei":
        from immunocto.segment.learned import SHIPPED, shipped_model_dir

        return shipped_model_dir(shipped or SHIPPED)
    path = Path(init)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    return None


def load_nucleus_encoder(
    enc: NucleusEncoder, folder: str | os.PathLike[str], *, rgb_std: list[float] | None = None
) -> dict[str, Any]:
    """Start ``enc`` from a nucleus model folder's encoder (``down.*`` of its safetensors).

    The nucleus network reads RGB as ``(x / 255 - 0.5) / 0.25``; a trunk fed standardised
    channels ``(x / 255 - mean) / std`` gets its first-layer RGB weights scaled by
    ``std / 0.25`` (``rgb_std``) so the first layer sees the same contrast (the offset is
    removed by batch norm). Channels past RGB (the cell mask) start at zero.

    Returns ``{"folder", "tensors" (taken), "widths"}``.
    """
    from immunocto._modelfolder import read_model_folder

    folder = Path(folder)
    tensors, cfg = read_model_folder(folder)
    if cfg.get("kind") != "nuclei" or "widths" not in cfg:
        raise ImmunoctoError(
            f"{folder}/config.json: not a nucleus model folder (kind {cfg.get('kind')!r}); "
            "--init nuclei takes one written by `immunocto train --kind nuclei`"
        )
    if tuple(cfg["widths"]) != enc.widths:
        raise ImmunoctoError(
            f"{folder}/config.json: widths {cfg['widths']} differ from the trunk's "
            f"{list(enc.widths)}"
        )
    own = enc.state_dict()
    taken = {}
    for name, value in tensors.items():
        if not name.startswith("down."):
            continue
        t = torch.from_numpy(np.array(value))
        if name == "down.0.0.weight":
            first = torch.zeros_like(own[name])
            rgb = t[:, :3]
            if rgb_std is not None:
                rgb = rgb * (torch.tensor(rgb_std[:3], dtype=t.dtype) / 0.25)[None, :, None, None]
            first[:, :3] = rgb
            t = first
        taken[name] = t
    enc.load_state_dict(taken, strict=True)
    return {"folder": str(folder), "tensors": len(taken), "widths": list(enc.widths)}
