"""Slide-adaptive normalisation of the nucleus network (AdaBN; Li et al. 2016).

A lab's stain, scanner and section thickness shift the statistics of every feature map, and the
batch-norm layers of the network were fitted to the training sources' statistics. Re-estimating
them on the slide at hand (no labels needed) and blending them with the trained ones:

    mean = alpha * mean_slide + (1 - alpha) * mean_trained      (the same for the variance)

moves the network toward the new stain without forgetting what it learned. Measured on real
tissue held out from training (``benchmarks/nuclei_real.py``): +0.02 detection F1 on the
source a model never saw, neutral on the sources it was trained on.

Arrays are ``(y, x, 3)`` uint8 RGB at the caller's microns per pixel; the network sees them
resampled to its own (``config["mpp"]``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

#: Optical density (summed over R, G, B) above which a pixel counts as tissue, not glass.
TISSUE_OD = 0.25
#: A window is used when at least this share of it is tissue.
MIN_TISSUE_FRACTION = 0.5
#: Window edge at the model's resolution, and the most windows used.
WINDOW = 512
MAX_WINDOWS = 8


def tissue_fraction(rgb: np.ndarray) -> float:
    """Share of pixels of ``rgb`` ``(h, w, 3)`` uint8 that are tissue (not glass)."""
    od = -np.log10((rgb[..., :3].astype(np.float32) + 1.0) / 256.0).sum(axis=-1)
    return float(np.mean(od > TISSUE_OD)) if od.size else 0.0


def tissue_windows(x, *, window: int = WINDOW, most: int = MAX_WINDOWS) -> list:
    """Up to ``most`` windows (at most ``window`` square) of the model-resolution input ``x``
    ``(1, 3, H, W)`` float 0-255 that are mostly tissue, evenly spread over the grid, each cut
    to a multiple of 8 px."""
    import torch

    _, _, H, W = x.shape
    picks = []
    for y0 in range(0, H, window):
        for x0 in range(0, W, window):
            win = x[..., y0 : y0 + window, x0 : x0 + window]
            h, w = (win.shape[-2] // 8) * 8, (win.shape[-1] // 8) * 8
            if h < 64 or w < 64:
                continue
            win = win[..., :h, :w]
            rgb = win[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8)
            if tissue_fraction(rgb.numpy()) >= MIN_TISSUE_FRACTION:
                picks.append(win)
    if len(picks) > most:
        keep = np.unique(np.linspace(0, len(picks) - 1, most).round().astype(int))
        picks = [picks[i] for i in keep]
    return picks


#: Threads of the statistics pass, whatever the process' own setting (see
#: :func:`batchnorm_statistics`).
PROBE_THREADS = 2


def batchnorm_statistics(
    net, inputs: Sequence, *, bf16: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per batch-norm layer ``name -> (mean, var)`` of its input over ``inputs`` (each a
    normalised ``(1, 3, h, w)`` tensor), every input weighted equally; no gradients, ``net``
    left unchanged. The probe runs channels-last (oneDNN's fast layout) and, with ``bf16``, its
    convolutions in bfloat16 (statistics within ~1 % of a standard deviation of fp32's; they are
    accumulated in fp32 either way): 319 -> 88 ms on a 512² window on 2 cores. Channels-last
    batch-norm reductions depend on the number of threads, so the probe always runs on
    :data:`PROBE_THREADS` of them: the statistics, and so a slide's nuclei, are bit-identical in
    one process, in a 1-thread worker and in a client under Dask's ``OMP_NUM_THREADS=1``."""
    import contextlib

    import torch

    probe = copy.deepcopy(net).float().to(memory_format=torch.channels_last)
    device = next(probe.parameters()).device
    layers = {n: m for n, m in probe.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for m in layers.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the forward calls
    probe.train()
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    threads = torch.get_num_threads()
    torch.set_num_threads(PROBE_THREADS)
    try:
        with torch.no_grad(), cast:
            for t in inputs:
                probe(t.float().to(device).contiguous(memory_format=torch.channels_last))
    finally:
        torch.set_num_threads(threads)
    return {
        n: (m.running_mean.cpu().numpy().copy(), m.running_var.cpu().numpy().copy())
        for n, m in layers.items()
    }


def blended_state(
    net, slide: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float
) -> dict[str, np.ndarray]:
    """``{buffer name: array}`` of the running means/variances blended ``alpha`` toward the
    slide's statistics (small: a few kB; what a slide backend sends its workers)."""
    out = {}
    for name, module in net.named_modules():
        if name in slide:
            mean, var = slide[name]
            out[f"{name}.running_mean"] = (
                alpha * mean + (1 - alpha) * module.running_mean.detach().cpu().numpy()
            ).astype(np.float32)
            out[f"{name}.running_var"] = (
                alpha * var + (1 - alpha) * module.running_var.detach().cpu().numpy()
            ).astype(np.float32)
    return out


def with_state(net, state: dict[str, np.ndarray]):
    """A copy of ``net`` with the batch-norm buffers of ``state`` (from :func:`blended_state`)."""
    import torch

    out = copy.deepcopy(net)
    buffers = dict(out.named_buffers())
    for k, v in state.items():
        if k not in buffers or tuple(buffers[k].shape) != tuple(v.shape):
            raise ValueError(f"batch-norm state {k!r} does not fit this network")
        buffers[k].copy_(torch.from_numpy(np.asarray(v, np.float32)))
    out.eval()
    return out
