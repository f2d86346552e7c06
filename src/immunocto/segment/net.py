"""The nucleus network: a small U-Net with three heads (PyTorch).

Input ``(B, C, H, W)`` float32 at the model's own microns per pixel (``config.json``: ``mpp``),
``H`` and ``W`` multiples of ``2 ** depth``: RGB H&E (``C = 3``), or a fluorescence nuclear
stain (``C = 1``, ``config.json`` ``input: nuclear``) scaled to 0-255 by
:func:`immunocto.segment.learned.nuclear_to_uint8`; both normalised by :func:`normalise_rgb`.
Output ``(B, 2 + n_types, H, W)`` logits:

- channel 0 ``foreground``: nucleus vs background;
- channel 1 ``distance``: each nucleus pixel's distance to its nucleus' edge divided by that
  nucleus' largest distance (1 at the centre, ~0 at the rim; a scale-free target, so one
  seed threshold suits small lymphocytes and big tumour nuclei);
- channels 2.. ``types``: the nucleus type (``TYPES``), trained on nucleus pixels only.

Touching nuclei are separated downstream by a marker watershed on the distance map
(:mod:`immunocto.segment.nucleus_post`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: Nucleus types of the type head, in output order (CoNSeP's four merged classes).
TYPES: tuple[str, ...] = ("inflammatory", "epithelial", "stromal", "other")


def normalise_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` uint8 or 0-255 float -> the network's input scale (~zero mean)."""
    return (rgb.float() / 255.0 - 0.5) / 0.25


class Block(nn.Sequential):
    """Two 3 x 3 conv + batch-norm + ReLU layers (one U-Net level)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class NucleusNet(nn.Module):
    """U-Net: ``len(widths)`` levels, max-pool down, bilinear up + skip concatenation.

    Parameters
    ----------
    widths : tuple of int
        Channels per level, finest first. ``(16, 32, 64, 128)`` has ~0.47 M parameters.
    n_types : int
        Outputs of the type head (0: none, e.g. the fluorescence model).
    in_channels : int
        3 for RGB H&E, 1 for a nuclear stain.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        n_types: int = len(TYPES),
        in_channels: int = 3,
    ):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.n_types = int(n_types)
        self.in_channels = int(in_channels)
        self.down = nn.ModuleList()
        c = self.in_channels
        for w in self.widths:
            self.down.append(Block(c, w))
            c = w
        self.up = nn.ModuleList(
            Block(self.widths[i + 1] + self.widths[i], self.widths[i])
            for i in reversed(range(len(self.widths) - 1))
        )
        self.head = nn.Conv2d(self.widths[0], 2 + self.n_types, 1)

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The encoder's weights (``down.*``), e.g. to initialise another network."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("down.")}
