"""Batch augmentation for the nucleus network (torch, whole batch at once).

Geometry (rotation by any angle, flips, scale 1/``max_scale``..``max_scale``, shift) is one
``affine_grid`` + ``grid_sample`` over images and targets together. Appearance is what makes
the network hold on other labs' slides: colour deconvolution into hematoxylin/eosin/residual
optical densities (Ruifrok & Johnston), each scaled and shifted per image (``hed_scale``),
the stain vectors themselves tilted, brightness/contrast/saturation/gamma, blur (defocus,
20x optics), sensor noise and JPEG re-encoding.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

#: Ruifrok & Johnston stain optical-density vectors (rows: H, E, DAB/residual), RGB.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)


@dataclass(frozen=True)
class AugmentParams:
    """Strengths of the augmentation (defaults: the shipped model's training)."""

    max_scale: float = 1.3  # zoom between 1/max_scale and max_scale
    hed_scale: float = 0.4  # per-stain optical density x U(1 - s, 1 + s)
    hed_shift: float = 0.04  # per-stain optical density + U(-s, s)
    vector_tilt: float = 0.08  # stain vectors + N(0, s) per image, renormalised
    brightness: float = 0.12
    contrast: float = 0.25
    saturation: float = 0.35
    gamma: float = 0.25
    blur_p: float = 0.4
    blur_max: float = 1.6  # px at the model's resolution
    noise_max: float = 6.0  # grey levels
    jpeg_p: float = 0.3


def geometric(
    images: torch.Tensor, targets: torch.Tensor, gen: torch.Generator, max_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation, flip, zoom and shift of ``images`` ``(B, C, S, S)`` float and
    ``targets`` ``(B, T, S, S)`` float alike (bilinear, reflected at the borders)."""
    b = images.shape[0]
    u = torch.rand(b, 5, generator=gen)
    angle = u[:, 0] * 2 * math.pi
    scale = torch.exp((u[:, 1] * 2 - 1) * math.log(max_scale))
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
    tx, ty = (u[:, 3] - 0.5) * 0.4, (u[:, 4] - 0.5) * 0.4
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    both = torch.cat([images, targets], dim=1)
    out = F.grid_sample(both, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    c = images.shape[1]
    return out[:, :c], out[:, c:]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(
        F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c
    )
    return F.conv2d(
        F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )


def _blur_some(x: torch.Tensor, gen: torch.Generator, p: AugmentParams) -> torch.Tensor:
    """Blur a random ``blur_p`` share of the batch ``x`` (in place), one sigma for all."""
    if p.blur_p > 0:
        pick = torch.rand(x.shape[0], generator=gen) < p.blur_p
        if pick.any():
            sigma = 0.4 + float(torch.rand(1, generator=gen)) * (p.blur_max - 0.4)
            idx = torch.nonzero(pick).ravel()
            x[idx] = _blur(x[idx], sigma)
    return x


def appearance(images: torch.Tensor, gen: torch.Generator, p: AugmentParams) -> torch.Tensor:
    """Stain/colour/blur/noise/JPEG augmentation of ``(B, 3, S, S)`` float images in 0..255."""
    b = images.shape[0]
    dev = images.device
    # stain space: OD = -log10(I / 255) = hed @ M  ->  hed = OD @ M^-1
    m = _RGB_FROM_HED.to(dev)
    od = -torch.log10(torch.clamp(images, 1.0, 255.0) / 255.0)  # (B, 3, S, S)
    hed = torch.einsum("bcyx,cd->bdyx", od, torch.linalg.inv(m))
    scale = 1 + (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * p.hed_scale
    shift = (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * p.hed_shift
    hed = hed * scale.to(dev) + shift.to(dev)
    m_b = m.unsqueeze(0) + torch.randn(b, 3, 3, generator=gen).to(dev) * p.vector_tilt
    m_b = torch.clamp(m_b, min=0.0)
    m_b = m_b / torch.clamp(m_b.norm(dim=2, keepdim=True), min=1e-6)
    od = torch.einsum("bdyx,bdc->bcyx", hed, m_b)
    x = 255.0 * torch.pow(10.0, -torch.clamp(od, min=0.0))
    # brightness, contrast, saturation, gamma
    r = lambda a: ((torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * a).to(dev)  # noqa: E731
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * (1 + r(p.saturation))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * (1 + r(p.contrast)) + 255.0 * r(p.brightness)
    x = 255.0 * torch.pow(torch.clamp(x / 255.0, 1e-4, 1.0), torch.exp(r(p.gamma)))
    x = _blur_some(x, gen, p)
    noise = torch.rand(b, 1, 1, 1, generator=gen) * p.noise_max
    x = x + torch.randn(x.shape, generator=gen) * noise.to(dev)
    x = torch.clamp(x, 0.0, 255.0)
    if p.jpeg_p > 0:
        x = _jpeg(x, gen, p.jpeg_p)
    return x


def appearance_nuclear(
    images: torch.Tensor, gen: torch.Generator, p: AugmentParams
) -> torch.Tensor:
    """Microscope and staining variation of ``(B, 1, S, S)`` nuclear-stain images in 0..255
    (already scaled by the image's own percentiles): gain and gamma (stain uptake, exposure,
    a different percentile scaling), a background offset (autofluorescence, out-of-focus
    light), blur and shot + read noise."""
    b = images.shape[0]
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=gen)  # noqa: E731
    x = images.clamp(0.0, 255.0) / 255.0
    x = x ** torch.exp((torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * 2 * p.gamma)
    x = x * r(0.55, 1.4) + r(0.0, 0.12) * (1.0 - x)
    x = _blur_some(x, gen, p)
    shot = r(0.0, 0.05) * torch.sqrt(x.clamp(min=0.0))
    read = r(0.0, p.noise_max / 255.0)
    x = x + torch.randn(x.shape, generator=gen) * (shot + read)
    return (x * 255.0).clamp(0.0, 255.0)


def _jpeg(x: torch.Tensor, gen: torch.Generator, prob: float) -> torch.Tensor:
    from PIL import Image

    pick = torch.nonzero(torch.rand(x.shape[0], generator=gen) < prob).ravel().tolist()
    for i in pick:
        q = int(35 + float(torch.rand(1, generator=gen)) * 60)
        arr = x[i].permute(1, 2, 0).round().to(torch.uint8).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=q)
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        x[i] = torch.from_numpy(dec.copy()).permute(2, 0, 1).float()
    return x


def hed_perturb(rgb: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    """Scale each stain's optical density of ``rgb`` ``(h, w, 3)`` uint8 by ``factors``
    (hematoxylin, eosin, residual); the stain-robustness check of the benchmark."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    m = _RGB_FROM_HED
    od = -torch.log10(torch.clamp(x, 1.0, 255.0) / 255.0)
    hed = torch.einsum("bcyx,cd->bdyx", od, torch.linalg.inv(m))
    hed = hed * torch.tensor(factors, dtype=torch.float32).view(1, 3, 1, 1)
    od = torch.einsum("bdyx,dc->bcyx", hed, m)
    out = 255.0 * torch.pow(10.0, -torch.clamp(od, min=0.0))
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
