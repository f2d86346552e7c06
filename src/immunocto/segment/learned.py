"""The learned H&E nucleus model: load a model folder, run it at its own resolution on any
input pixel size, and turn its maps into typed nucleus instances.

Coordinates: arrays are ``(y, x)`` / ``(y, x, 3)`` in the input's own pixels; the network
runs at ``config["mpp"]`` (the input is resampled to it and the maps resampled back, so
labels come out on the input's grid and post-processing sees the input's resolution).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from immunocto.errors import ImmunoctoError
from immunocto.segment.base import Backend, SlideContext, mean_per_label
from immunocto.segment.nucleus_post import instances_from_maps, type_probs_per_object

log = logging.getLogger(__name__)

#: The model folder shipped inside the package.
SHIPPED = "nuclei_he"
#: The shipped fluorescence (nuclear stain) nucleus network's folder.
SHIPPED_IF = "nuclei_if"
#: Largest network input tile edge at the model's resolution: a larger input runs as the
#: fewest overlapping tiles of equal size (:func:`tile_plan`). 768 takes a 1024 px slide tile
#: at 0.25 µm/px with its margins (560 px at 0.5 µm/px) in one pass; 512 ran it as four
#: (3.3x the pixels).
TILE = 768
#: Pixels of each tile's border (model resolution) overwritten by its neighbour's centre.
OVERLAP = 48


#: ``auto``, ``bf16`` or ``fp32``: the arithmetic of the network's forward pass. Environment
#: variable ``IMMUNOCTO_NUCLEUS_PRECISION`` overrides ``auto``.
PRECISIONS = ("auto", "bf16", "fp32")


def inference_precision(requested: str = "auto", device: str = "cpu") -> str:
    """``bf16`` or ``fp32``. ``auto`` (the default): bf16 on a CUDA device with bf16, or where
    the CPU has native bf16 (AVX512-BF16 / AMX, through oneDNN: ~4x faster on a 512² tile, fg
    probabilities within 1e-4 of fp32), else fp32; ``IMMUNOCTO_NUCLEUS_PRECISION`` overrides
    ``auto``."""
    import os

    if requested == "auto":
        requested = os.environ.get("IMMUNOCTO_NUCLEUS_PRECISION", "auto").lower()
    if requested not in PRECISIONS:
        raise ImmunoctoError(
            f"nucleus precision {requested!r}: choose one of {', '.join(PRECISIONS)} "
            "(IMMUNOCTO_NUCLEUS_PRECISION)"
        )
    if requested != "auto":
        return requested
    torch = _torch()
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):  # pragma: no cover - older or unusual builds
        return "fp32"


def shipped_model_dir(name: str = SHIPPED) -> Path:
    """Path of a model folder shipped in ``immunocto/segment/weights/``."""
    return Path(str(resources.files("immunocto.segment") / "weights" / name))


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImmunoctoError(
            "the learned H&E nucleus model needs PyTorch: pip install 'immunocto[train]' "
            "(or use method='classical' / --backend he-classical)"
        ) from None
    return torch


#: Percentiles of a nuclear stain mapped to 0 and 255 for the fluorescence model.
NUCLEAR_PERCENTILES = (1.0, 99.5)


def nuclear_scale(images: list[np.ndarray], max_px: int = 4_000_000) -> tuple[float, float]:
    """``(low, high)``: the :data:`NUCLEAR_PERCENTILES` of the nuclear-stain ``images``
    (``(h, w)``, raw counts) together, on an even subsample of at most ``max_px`` pixels. A
    slide backend measures it once per slide so every tile is scaled alike."""
    flat = np.concatenate([np.asarray(im, np.float32).ravel() for im in images])
    flat = flat[:: max(1, len(flat) // max_px)]
    lo, hi = np.percentile(flat, NUCLEAR_PERCENTILES) if len(flat) else (0.0, 1.0)
    return float(lo), float(max(hi, lo + 1e-6))


def nuclear_to_uint8(image: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """``(h, w)`` nuclear stain -> ``(h, w, 1)`` float32 in 0..255 (``scale`` = ``(low, high)``
    counts mapped to 0 and 255, clipped): the fluorescence network's input image."""
    lo, hi = scale
    x = (np.asarray(image, np.float32) - lo) * (255.0 / max(hi - lo, 1e-6))
    return np.clip(x, 0.0, 255.0)[..., None]


@dataclass
class NucleusModel:
    """A loaded nucleus network with its post-processing settings.

    ``config`` keys used here: ``mpp`` (float), ``widths`` (list of int), ``types`` (list of
    str), ``fg_threshold``, ``seed_threshold``, ``min_score`` (0 when absent), ``min_area_um2``,
    ``type_weights`` (per-type weights on the type probabilities; 1 when absent),
    ``bn_adapt`` (0..1, how far :meth:`segment` moves the batch-norm statistics toward the
    image's own, :mod:`immunocto.segment.bn_adapt`; 0 when absent) and ``bn_adapt_min_px``
    (tissue pixels at the model's resolution needed to adapt; 65,536 when absent), ``tta``
    (views of each window averaged, :data:`TTA_VIEWS`; 1 when absent).
    """

    net: Any
    config: dict[str, Any]
    folder: Path | None = None
    precision: str = "auto"  # see inference_precision
    device: str = "cpu"  # where the forward pass runs (tiles run on CPU worker processes)
    #: Set on a slide-adapted copy (:meth:`adapted`): ``alpha``, ``windows``, ``tissue_px`` and
    #: ``state`` (the blended batch-norm buffers, numpy); ``None`` on the trained model.
    adaptation: dict[str, Any] | None = None
    #: On a slide-adapted copy, the trained model it came from: nucleus types come from it
    #: (adapted statistics help find nuclei on a new stain but blur the type head's calibration).
    base: NucleusModel | None = None

    @property
    def mpp(self) -> float:
        return float(self.config["mpp"])

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self.config["types"])

    @property
    def nuclear(self) -> bool:
        """A fluorescence model (``input: nuclear``): one nuclear-stain channel, no types."""
        return self.config.get("input", "rgb") == "nuclear"

    @classmethod
    def load(cls, folder: str | Path | None = None) -> NucleusModel:
        """Load a model folder (``config.json`` + ``model.safetensors``); the shipped one
        when ``folder`` is ``None``."""
        folder = Path(folder) if folder is not None else shipped_model_dir()
        return _load_cached(str(folder.resolve()))

    @classmethod
    def from_network(cls, net: Any, config: dict[str, Any]) -> NucleusModel:
        """Wrap an in-memory network (training, tests)."""
        return cls(net, dict(config), None)

    def maps(
        self, image: np.ndarray, mpp: float, *, scale: tuple[float, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Network maps on the input's grid.

        Parameters
        ----------
        image : ndarray
            ``(h, w, 3)`` uint8 RGB for an H&E model; for a fluorescence model (``nuclear``)
            the ``(h, w)`` nuclear stain in raw counts.
        mpp : float
            Microns per pixel of ``image``.
        scale : (low, high), optional
            Fluorescence models: the stain counts mapped to 0 and 255 (:func:`nuclear_scale`
            of the slide); this image's own percentiles when omitted.

        Returns
        -------
        foreground : (h, w) float32, nucleus probability
        distance : (h, w) float32, normalised distance to the nucleus edge
        types : (k, h, w) float32, type probabilities (softmax); k = 0 without a type head
        """
        logits, size = self._logits(image, mpp, scale, per_view=False)
        return self._from_logits(logits, size, views=False)

    def view_maps(
        self, image: np.ndarray, mpp: float, *, scale: tuple[float, float] | None = None
    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
        """:meth:`maps` (the views' logits averaged, the same values) and each test-time
        view's own ``(foreground, distance)`` on the input's grid, one per view of the config's
        ``tta`` (one view: the combined pair). The views' disagreement is what
        :mod:`immunocto.segment.post_tune` reads (:meth:`tune_post` reads it on the network's
        own grid); the forward passes are the same ones."""
        logits, size = self._logits(image, mpp, scale, per_view=True)
        return self._from_logits(logits, size, views=True)

    def _logits(self, image, mpp, scale, *, per_view: bool):
        """``((V or 1, C, H, W) logits at the model's resolution, (h, w) of the input)``."""
        from immunocto.segment.net import normalise_rgb

        if self.nuclear:
            stain = image[..., 0] if image.ndim == 3 else image
            image = nuclear_to_uint8(stain, scale or nuclear_scale([stain]))
        x = self._resampled(image, mpp)
        return self._run(normalise_rgb(x), per_view=per_view), image.shape[:2]

    def _from_logits(self, logits, size: tuple[int, int] | None, *, views: bool):
        """Maps of ``_logits``: combined ``(fg, dist, types)`` (and each view's ``(fg, dist)``
        with ``views``), resampled to ``size`` when given."""
        torch = _torch()
        from torch.nn import functional as F

        def grid(t):
            if size is not None and tuple(t.shape[-2:]) != tuple(size):
                t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
            return t

        out = sum(logits[1:], logits[0]) / len(logits) if len(logits) > 1 else logits[0]
        out = grid(out[None].contiguous())  # one layout on every path: identical interpolation
        fg = torch.sigmoid(out[0, 0]).numpy()
        dist = torch.sigmoid(out[0, 1]).numpy()
        types = torch.softmax(out[0, 2:], dim=0).numpy() if out.shape[1] > 2 else out[0, 2:].numpy()
        if not views:
            return fg, dist, types
        if len(logits) == 1:
            return (fg, dist, types), [(fg, dist)]
        each = grid(logits[:, :2].contiguous())
        return (fg, dist, types), [
            (torch.sigmoid(v[0]).numpy(), torch.sigmoid(v[1]).numpy()) for v in each
        ]

    def _resampled(self, image: np.ndarray, mpp: float):
        """``image`` ``(h, w, c)`` (RGB, or the scaled nuclear stain) as a ``(1, c, H, W)``
        float 0-255 tensor at the model's µm/px."""
        torch = _torch()
        from torch.nn import functional as F

        h, w = image.shape[:2]
        c = 1 if self.nuclear else 3
        x = torch.from_numpy(np.ascontiguousarray(image[..., :c])).permute(2, 0, 1)[None].float()
        factor = float(mpp) / self.mpp
        H, W = max(1, round(h * factor)), max(1, round(w * factor))
        if (H, W) != (h, w):
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
        return x

    def adapted(
        self, images: list[np.ndarray], mpp: float, *, alpha: float | None = None
    ) -> NucleusModel:
        """A copy whose batch-norm statistics moved ``alpha`` (default: the config's
        ``bn_adapt``) toward those of ``images`` (``(h, w, 3)`` uint8 RGB at ``mpp``: the
        slide's tissue); ``self`` when ``alpha`` is 0 or the images hold fewer than
        ``bn_adapt_min_px`` tissue pixels at the model's resolution (a small or glassy image
        says too little about the stain)."""
        from immunocto.segment import bn_adapt
        from immunocto.segment.net import normalise_rgb

        alpha = float(self.config.get("bn_adapt", 0.0) if alpha is None else alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ImmunoctoError(f"bn_adapt must be between 0 and 1 (got {alpha})")
        if alpha == 0.0 or self.adaptation is not None or self.nuclear:
            return self
        wins = []
        for rgb in images:
            wins += bn_adapt.tissue_windows(self._resampled(rgb, mpp))
        wins = wins[:: max(1, -(-len(wins) // bn_adapt.MAX_WINDOWS))]
        px = int(sum(w.shape[-1] * w.shape[-2] for w in wins))
        if px < int(self.config.get("bn_adapt_min_px", 65536)):
            return self
        stats = bn_adapt.batchnorm_statistics(
            self.net,
            [normalise_rgb(w) for w in wins],
            bf16=inference_precision(self.precision, self.device) == "bf16",
        )
        state = bn_adapt.blended_state(self.net, stats, alpha)
        return self.with_bn_state(state, alpha=alpha, windows=len(wins), tissue_px=px)

    def with_bn_state(self, state: dict[str, np.ndarray], **info: Any) -> NucleusModel:
        """A copy using the batch-norm buffers ``state`` (from :meth:`adapted`)."""
        torch = _torch()
        from immunocto.segment import bn_adapt

        net = bn_adapt.with_state(self.net, state).to(memory_format=torch.channels_last)
        return NucleusModel(
            net, self.config, self.folder, self.precision, self.device, {**info, "state": state},
            self.base or self,
        )  # fmt: skip

    def _run(self, x, *, per_view: bool = False):
        """Logits of the normalised input ``(1, 3, H, W)``, in overlapping tiles (float32;
        the forward pass in :func:`inference_precision`, channels-last for oneDNN): the
        test-time views averaged, ``(1, C, H, W)``, or with ``per_view`` each view's own,
        ``(V, C, H, W)``."""
        import contextlib

        torch = _torch()
        from torch.nn import functional as F

        m = 2 ** (len(self.config["widths"]) - 1)
        _, _, H, W = x.shape
        c_out = 2 + len(self.types)
        dev = torch.device(self.device)
        cast = (
            torch.autocast(dev.type, dtype=torch.bfloat16)
            if inference_precision(self.precision, self.device) == "bf16"
            else contextlib.nullcontext()
        )
        if next(self.net.parameters()).device != dev:
            self.net.to(dev)

        flips = int(self.config.get("tta", 1))

        def net(t):
            self.net.eval()
            with cast:
                t = t.to(dev)
                ys = []
                for k in range(flips):
                    y = self.net(_dihedral(t, k).contiguous(memory_format=torch.channels_last))
                    ys.append(_dihedral(y.float(), k, inverse=True))
                y = torch.cat(ys) if per_view else sum(ys[1:], ys[0]) / flips
                return y.cpu()

        with torch.inference_mode():
            if H <= TILE and W <= TILE:
                ph, pw = (-H) % m, (-W) % m
                xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x
                return net(xp)[..., :H, :W]
            out = torch.zeros((flips if per_view else 1, c_out, H, W))
            th_, ys_ = tile_plan(H, TILE, OVERLAP, m)
            tw_, xs_ = tile_plan(W, TILE, OVERLAP, m)
            for ys in ys_:
                for xs in xs_:
                    win = x[..., ys : ys + th_, xs : xs + tw_]
                    th, tw = win.shape[-2:]
                    ph, pw = (-th) % m, (-tw) % m
                    if ph or pw:
                        win = F.pad(win, (0, pw, 0, ph), mode="replicate")
                    pred = net(win)[..., :th, :tw]
                    # keep the centre of each tile (tile borders only at the image border)
                    cy0 = 0 if ys == 0 else OVERLAP
                    cx0 = 0 if xs == 0 else OVERLAP
                    cy1 = th if ys + th >= H else th - OVERLAP
                    cx1 = tw if xs + tw >= W else tw - OVERLAP
                    out[..., ys + cy0 : ys + cy1, xs + cx0 : xs + cx1] = pred[..., cy0:cy1, cx0:cx1]
            return out

    @property
    def self_tuning(self) -> bool:
        """Whether :meth:`segment` picks its post-processing per image / slide from the
        test-time views (config ``post_tuning: views``, :mod:`immunocto.segment.post_tune`)."""
        return (
            self.config.get("post_tuning", "fixed") == "views"
            and int(self.config.get("tta", 1)) > 1
        )

    def default_post(self) -> dict[str, float]:
        """The config's own post-processing settings (tuned on its validation images)."""
        cfg = self.config
        return {
            "fg_threshold": float(cfg.get("fg_threshold", 0.5)),
            "seed_threshold": float(cfg.get("seed_threshold", 0.5)),
            "min_score": float(cfg.get("min_score", 0.0)),
        }

    def tune_post(
        self, images: list[np.ndarray], mpp: float, *, max_px: int = 1_000_000
    ) -> dict[str, float | bool]:
        """The post-processing for a slide whose tissue ``images`` shows (``(h, w, 3)`` uint8 RGB
        at ``mpp``; call on the slide-adapted model): :func:`post_tune.choose` on the views'
        maps at the network's own resolution, over whole images in order up to ``max_px``
        pixels of that resolution. Without ``post_tuning: views`` in the config, the config's
        own settings (``tuned`` False)."""
        if not self.self_tuning:
            return self._choose_post([])  # the config's own settings, not tuned
        samples, px = [], 0
        factor = float(mpp) / self.mpp
        for rgb in images:
            n = max(1, round(rgb.shape[0] * factor)) * max(1, round(rgb.shape[1] * factor))
            if px and px + n > max_px:
                break
            px += n
            logits, _ = self._logits(rgb, mpp, None, per_view=True)
            samples.append(self._tuning_sample(logits, rgb.shape[:2], mpp))
        return self._choose_post(samples)

    def _tuning_sample(self, logits, size: tuple[int, int], mpp: float):
        """``((fg, dist), views, mpp of the network's grid)`` of per-view ``logits``."""
        (fg, dist, _), views = self._from_logits(logits, None, views=True)
        return (fg, dist), views, float(mpp) * size[0] / logits.shape[-2]

    def _choose_post(self, samples) -> dict[str, float | bool]:
        from immunocto.segment import post_tune

        grid_mpp = samples[0][2] if samples else self.mpp
        return post_tune.choose(
            [(c, v) for c, v, _ in samples], mpp=grid_mpp, min_area_px=self.min_area_px(grid_mpp),
            default=self.default_post(),
        )  # fmt: skip

    def min_area_px(self, mpp: float) -> float:
        """The config's smallest nucleus (``min_area_um2``) in pixels of ``mpp``."""
        return float(self.config.get("min_area_um2", 4.0)) / float(mpp) ** 2

    def segment(
        self, rgb: np.ndarray, mpp: float, **options: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(labels (h, w) int32, type index per label (n + 1,), score per label (n + 1,))``:
        :meth:`segment_objects` (the same ``options``) with each object's most probable type
        (-1 for the background and without types)."""
        labels, probs, scores = self.segment_objects(rgb, mpp, **options)
        if probs is None:
            return labels, np.full(int(labels.max()) + 1, -1, np.int64), scores
        index = np.argmax(probs, axis=1).astype(np.int64)
        index[0] = -1
        return labels, index, scores

    def segment_objects(
        self,
        rgb: np.ndarray,
        mpp: float,
        *,
        fg_threshold: float | None = None,
        seed_threshold: float | None = None,
        min_score: float | None = None,
        adapt: bool = True,
        tune: bool = True,
        with_types: bool = True,
        scale: tuple[float, float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(labels (h, w) int32, type probabilities (n + 1, k) or None, score per label
        (n + 1,))``; row ``i`` of the probabilities is object ``i``'s (row 0 zeros), in the
        order of :attr:`types`, after the folder's ``type_weights``.

        The post-processing settings default to the model folder's tuned ones; with ``tune``
        and ``post_tuning: views`` in the config (the shipped H&E model), to the ones the
        image's own test-time views agree on best (:meth:`tune_post`; the folder's where the
        image holds too few nuclei to judge). Settings given here override both. With ``adapt``
        (and ``bn_adapt`` > 0 in the config) the network first adapts its batch-norm
        statistics to ``rgb`` itself (:meth:`adapted`; skipped on small or glassy images).
        A slide backend adapts and tunes once per slide instead and passes ``adapt=False``,
        ``tune=False`` and its settings per tile.
        On an adapted model the types come from the trained network in one more forward pass
        of a single view (:data:`TYPE_VIEWS`: adapted statistics help find nuclei on a new
        stain but blur the type head's calibration); ``with_types=False`` skips it and gives
        ``None``, as does a model without a type head. ``scale``: see :meth:`maps`
        (fluorescence models)."""
        if adapt:
            model = self.adapted([rgb], mpp)
            if model is not self:
                return model.segment_objects(
                    rgb, mpp, fg_threshold=fg_threshold, seed_threshold=seed_threshold,
                    min_score=min_score, adapt=False, tune=tune, with_types=with_types,
                )  # fmt: skip
        post = self.default_post()
        if tune and self.self_tuning:  # the same forward passes: views kept apart
            logits, size = self._logits(rgb, mpp, scale, per_view=True)
            chosen = self._choose_post([self._tuning_sample(logits, size, mpp)])
            post = {k: float(chosen[k]) for k in post}
            fg, dist, types = self._from_logits(logits, size, views=False)
        else:
            fg, dist, types = self.maps(rgb, mpp, scale=scale)
        for key, value in (("fg_threshold", fg_threshold), ("seed_threshold", seed_threshold),
                           ("min_score", min_score)):  # fmt: skip
            if value is not None:
                post[key] = float(value)
        labels = instances_from_maps(fg, dist, **post, min_area_px=self.min_area_px(mpp))
        scores = mean_per_label(labels, fg)
        if not (with_types and len(types) > 0):
            return labels, None, scores
        if self.base is not None:
            one = replace(self.base, config={**self.base.config, "tta": TYPE_VIEWS})
            types = one.maps(rgb, mpp, scale=scale)[2]
        return labels, type_probs_per_object(labels, types, self.config.get("type_weights")), scores


#: Views of the trained network's type pass on an adapted model (one: the same per-type F1 on
#: held-out CoNSeP as four, within 0.02 either way, at a quarter of the cost).
TYPE_VIEWS = 1
#: Test-time augmentation: the config's ``tta`` is how many of these views of each window the
#: network sees (their logits averaged): 1 (none), 2 (+ left-right flip), 4 (+ up-down, both), 8
#: (+ the four transposed).
TTA_VIEWS = (1, 2, 4, 8)
#: ``post_tuning``: ``fixed`` (the config's thresholds everywhere) or ``views`` (chosen per
#: image / slide from the test-time views' agreement, :mod:`immunocto.segment.post_tune`).
POST_TUNING = ("fixed", "views")


def tile_plan(n: int, max_tile: int, overlap: int, multiple: int = 1) -> tuple[int, list[int]]:
    """``(edge, starts)``: the fewest tiles of one ``edge`` (at most ``max_tile``) that cover
    ``0..n`` with neighbours overlapping by at least ``2 * overlap``. Starts and ``edge`` are
    multiples of ``multiple`` (the network's total pooling), so every tile sees the same
    pooling grid as one whole pass would; the last tile may run past ``n`` (the caller cuts it
    there). Equal tiles instead of fixed ones: an input just past ``max_tile`` costs two tiles
    of about half its size, not two full ones."""
    if n <= max_tile:
        return n, [0]
    m = max(int(multiple), 1)
    blocks, most, keep = -(-n // m), max_tile // m, -(-overlap // m)
    count = -(-(blocks - 2 * keep) // (most - 2 * keep))
    edge = -(-(blocks + (count - 1) * 2 * keep) // count)
    step = (blocks - edge) / (count - 1)
    return edge * m, [m * round(k * step) for k in range(count)]


def _dihedral(t, k: int, *, inverse: bool = False):
    """View ``k`` (0..7) of a ``(n, c, h, w)`` tensor: bit 0 flips left-right, bit 1 up-down,
    bit 2 transposes; ``inverse`` undoes it (the transpose first)."""
    flips = [d for bit, d in ((1, -1), (2, -2)) if k & bit]
    if inverse and k & 4:
        t = t.transpose(-1, -2)
    if flips:
        t = t.flip(flips)
    if not inverse and k & 4:
        t = t.transpose(-1, -2)
    return t


def check_nucleus_config(config: Any, source: str) -> None:
    """Raise an :class:`ImmunoctoError` naming ``source`` and the key when a nucleus model's
    ``config.json`` lacks a field the network needs or holds a value it cannot take."""

    def bad(key: str, want: str) -> ImmunoctoError:
        got = config.get(key, "nothing") if isinstance(config, dict) else config
        return ImmunoctoError(
            f"{source}: {key!r} must be {want} (got {got!r}); not a nucleus model folder?"
        )

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(config, dict):
        raise bad("config", "a JSON object")
    for key in ("mpp", "widths", "types"):
        if key not in config:
            raise ImmunoctoError(f"{source}: missing {key!r} (not a nucleus model folder)")
    if not number(config["mpp"]) or not 0.05 <= config["mpp"] <= 10:
        raise bad("mpp", "microns per pixel between 0.05 and 10")
    w = config["widths"]
    if (
        not isinstance(w, list)
        or not 1 <= len(w) <= 8
        or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 1024 for x in w)
    ):
        raise bad("widths", "a list of 1-8 channel counts between 1 and 1024")
    if not isinstance(config["types"], list) or not all(
        isinstance(t, str) for t in config["types"]
    ):
        raise bad("types", "a list of type names")
    if config.get("input", "rgb") not in ("rgb", "nuclear"):
        raise bad("input", "'rgb' or 'nuclear'")
    if config.get("in_channels", 3) not in (1, 3) or isinstance(config.get("in_channels"), bool):
        raise bad("in_channels", "1 or 3")
    for key in ("fg_threshold", "seed_threshold", "min_score", "bn_adapt"):
        if key in config and (not number(config[key]) or not 0 <= config[key] <= 1):
            raise bad(key, "a number between 0 and 1")
    if "min_area_um2" in config and (
        not number(config["min_area_um2"]) or config["min_area_um2"] < 0
    ):
        raise bad("min_area_um2", "a number >= 0")
    if "tta" in config and (
        not isinstance(config["tta"], int) or isinstance(config["tta"], bool)
        or config["tta"] not in TTA_VIEWS
    ):  # fmt: skip
        raise bad("tta", f"one of {', '.join(map(str, TTA_VIEWS))} (views averaged per window)")
    if config.get("post_tuning", "fixed") not in POST_TUNING:
        raise bad("post_tuning", " or ".join(repr(x) for x in POST_TUNING))
    tw = config.get("type_weights")
    if tw is not None and (
        not isinstance(tw, list)
        or len(tw) != len(config["types"])
        or not all(number(x) for x in tw)
    ):
        raise bad("type_weights", "one number per type")


@functools.lru_cache(maxsize=4)
def _load_cached(folder: str) -> NucleusModel:
    torch = _torch()

    from immunocto._modelfolder import read_model_folder
    from immunocto.segment.net import NucleusNet

    tensors, config = read_model_folder(folder)
    check_nucleus_config(config, f"{folder}/config.json")
    net = NucleusNet(
        tuple(config["widths"]),
        n_types=len(config["types"]),
        in_channels=int(config.get("in_channels", 3)),
    )
    state = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ImmunoctoError(
            f"{folder}/model.safetensors does not fit the network in config.json ({first})"
        ) from None
    net.eval()
    net.to(memory_format=torch.channels_last)  # oneDNN's fast layout (also in fp32: ~1.4x)
    return NucleusModel(net, config, Path(folder))


def with_margin(
    ctx: SlideContext, x: int, y: int, w: int, h: int, margin_um: float
) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``: the window ``(x, y, w, h)`` grown by ``margin_um`` on each side,
    within the slide (a network sees its nuclei whole at the window's edges)."""
    m = int(np.ceil(margin_um / ctx.mpp))
    return (max(0, x - m), max(0, y - m), min(ctx.he.width, x + w + m),
            min(ctx.he.height, y + h + m))  # fmt: skip


def _process_threads() -> int:
    """Intra-op threads for one process: ``OMP_NUM_THREADS`` where set, else the CPUs this
    process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _TorchThreads:
    """Torch on one intra-op thread inside the block in a worker process (tiles already run
    in parallel there, :func:`immunocto._parallel.in_worker`); with its own thread count
    where one process runs the tiles. The maps are the same either way to float rounding
    (~1e-9: a vectorised loop's scalar tail falls on other pixels when the rows are split
    otherwise; ``tests/segment/test_learned.py`` holds this)."""

    def __enter__(self):
        from immunocto._parallel import in_worker

        torch = _torch()
        self._n = torch.get_num_threads()
        # one process: the cores it may use (OMP_NUM_THREADS where set), also inside
        # ordered_map's one-BLAS-thread block, which limits torch's OpenMP pool too
        torch.set_num_threads(1 if in_worker() else _process_threads())

    def __exit__(self, *exc):
        _torch().set_num_threads(self._n)


class LearnedHeBackend(Backend):
    """``he``: nuclei of the H&E from the learned nucleus network.

    Each window is read with a margin of ``MARGIN_UM`` around it so the network never
    sees a window edge near the objects the tile keeps.
    """

    name = "he"
    needs_if = False
    MARGIN_UM = 12.0

    def __init__(self, model: str | Path | None = None, *, types: bool = True) -> None:
        self.model_dir = Path(model) if model is not None else shipped_model_dir()
        loaded = NucleusModel.load(self.model_dir)  # fail early on a bad folder
        #: the nucleus type columns in the cell table (a model with a type head; a SAM guide
        #: needs only the nuclei)
        self.types = loaded.types if types else ()
        self._bn_states: dict[str, dict[str, np.ndarray]] = {}  # slide id -> adapted buffers
        self._post: dict[str, dict[str, float]] = {}  # slide id -> chosen post-processing
        self._models: dict[str, NucleusModel] = {}  # per process, never pickled

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_models"] = {}
        return state

    def prepare(self, ctx: SlideContext, sample_windows: list[tuple[int, int, int, int]]) -> None:
        """Adapt the network's batch-norm statistics to this slide's stain from the sample
        windows, then choose the post-processing on them from the test-time views when the
        model self-tunes (once per slide, so every tile of every run sees the same network and
        settings; ``ctx.stats`` records them)."""
        model = NucleusModel.load(self.model_dir)
        self._bn_states.pop(ctx.slide_id, None)
        self._models.pop(ctx.slide_id, None)
        self._post[ctx.slide_id] = model.default_post()
        if not float(model.config.get("bn_adapt", 0.0)) and not model.self_tuning:
            return
        images = [ctx.he.read_region(*win)[..., :3] for win in sample_windows]
        with _TorchThreads():
            adapted = model.adapted(images, ctx.mpp)
            post = adapted.tune_post(images, ctx.mpp)
        if adapted.adaptation is not None:
            self._bn_states[ctx.slide_id] = adapted.adaptation["state"]
            ctx.stats["bn_adapt_windows"] = float(adapted.adaptation["windows"])
            self._models[ctx.slide_id] = adapted
        if post["tuned"]:
            self._post[ctx.slide_id] = {k: float(post[k]) for k in model.default_post()}
            ctx.stats.update({f"post_{k}": v for k, v in self._post[ctx.slide_id].items()})
            ctx.stats["post_view_agreement"] = float(post["agreement"])
            log.info(
                "%s: post-processing from the test-time views: fg %.2f, seed %.2f, min score "
                "%.2f (view agreement %.3f over %d nuclei)", ctx.slide_id,
                post["fg_threshold"], post["seed_threshold"], post["min_score"],
                post["agreement"], post["nuclei"],
            )  # fmt: skip

    def _model(self, slide_id: str) -> NucleusModel:
        if slide_id not in self._models:
            model = NucleusModel.load(self.model_dir)
            state = self._bn_states.get(slide_id)
            self._models[slide_id] = model.with_bn_state(state) if state else model
        return self._models[slide_id]

    def segment(
        self, ctx: SlideContext, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray]:
        x0, y0, x1, y1 = with_margin(ctx, x, y, w, h, self.MARGIN_UM)
        rgb = ctx.he.read_region(x0, y0, x1 - x0, y1 - y0)
        model = self._model(ctx.slide_id)
        post = self._post.get(ctx.slide_id) or model.default_post()
        with _TorchThreads():
            labels, probs, scores = model.segment_objects(
                rgb[..., :3], ctx.mpp, adapt=False, tune=False, with_types=bool(self.types),
                **post,
            )  # fmt: skip
        labels = labels[y - y0 : y - y0 + h, x - x0 : x - x0 + w]
        if not self.types:
            return labels, scores
        return labels, scores, type_columns(probs, self.types)

    def object_columns(self) -> dict[str, str]:
        """``nucleus_type`` and ``nucleus_p_<type>`` per type of the model's type head (none
        without one)."""
        if not self.types:
            return {}
        return {"nucleus_type": "string", **{f"nucleus_p_{t}": "float32" for t in self.types}}

    def describe(self) -> dict[str, object]:
        cfg = NucleusModel.load(self.model_dir).config
        return {
            "backend": self.name,
            "model": str(self.model_dir),
            "model_mpp": cfg.get("mpp"),
            "fg_threshold": cfg.get("fg_threshold"),
            "seed_threshold": cfg.get("seed_threshold"),
            "min_score": cfg.get("min_score", 0.0),
            "bn_adapt": cfg.get("bn_adapt", 0.0),
            "post_tuning": cfg.get("post_tuning", "fixed"),
            "precision": inference_precision(),
            "types": list(self.types),
        }


def type_columns(probs: np.ndarray, types: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Cell-table columns from per-object type probabilities ``(n + 1, k)``: ``nucleus_type``
    (the most probable type's name; ``""`` for row 0) and ``nucleus_p_<type>`` (float32)."""
    names = np.asarray(types, dtype=object)[np.argmax(probs, axis=1)]
    if len(names):
        names[0] = ""
    return {
        "nucleus_type": names,
        **{f"nucleus_p_{t}": probs[:, k].astype(np.float32) for k, t in enumerate(types)},
    }


class LearnedIfBackend(Backend):
    """``if-learned``: the fluorescence nucleus network on the IF nuclear stain, read into the
    H&E frame through the registration (like ``if-nuclear``). The stain's scale (its 1st and
    99.5th percentiles) is measured once per slide from the sample windows, so every tile is
    scaled alike; the network resamples any pixel size to its own."""

    name = "if-learned"
    needs_if = True
    MARGIN_UM = 12.0

    def __init__(self, model: str | Path | None = None) -> None:
        self.model_dir = Path(model) if model is not None else shipped_model_dir(SHIPPED_IF)
        loaded = NucleusModel.load(self.model_dir)  # fail early on a bad folder
        if not loaded.nuclear:
            raise ImmunoctoError(
                f"{self.model_dir}/config.json: an H&E model (input {loaded.config.get('input', 'rgb')!r}); "
                "the if-learned backend needs a fluorescence model (train --kind if-nuclei)"
            )

    def prepare(self, ctx: SlideContext, sample_windows: list[tuple[int, int, int, int]]) -> None:
        from immunocto.segment.classical import nuclear_stain

        lo, hi = nuclear_scale([nuclear_stain(ctx, *win) for win in sample_windows])
        ctx.stats["stain_low"], ctx.stats["stain_high"] = lo, hi

    def segment(
        self, ctx: SlideContext, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray]:
        from immunocto.segment.classical import nuclear_stain

        x0, y0, x1, y1 = with_margin(ctx, x, y, w, h, self.MARGIN_UM)

        stain = nuclear_stain(ctx, x0, y0, x1 - x0, y1 - y0)
        scale = (
            (ctx.stats["stain_low"], ctx.stats["stain_high"]) if "stain_high" in ctx.stats else None
        )
        with _TorchThreads():
            labels, _, scores = NucleusModel.load(self.model_dir).segment(
                stain, ctx.mpp, adapt=False, with_types=False, scale=scale
            )
        return labels[y - y0 : y - y0 + h, x - x0 : x - x0 + w], scores

    def describe(self) -> dict[str, object]:
        cfg = NucleusModel.load(self.model_dir).config
        return {
            "backend": self.name, "model": str(self.model_dir), "model_mpp": cfg.get("mpp"),
            "fg_threshold": cfg.get("fg_threshold"), "seed_threshold": cfg.get("seed_threshold"),
            "min_score": cfg.get("min_score", 0.0), "precision": inference_precision(),
        }  # fmt: skip
