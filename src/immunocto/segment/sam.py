"""The ``sam`` backend: segment-anything with the user's checkpoint.

Two prompt modes on each tile:

- ``grid`` — Immunocto's recipe: a regular grid of point prompts, 64 x 64 per 1024 px tile
  (scaled with the tile), every prompt decoded;
- ``guided`` — one point prompt per nucleus found by a guide backend (``if-nuclear``, ``he``
  or both, ``if-nuclear+he``: the IF nuclei's centroids, then the H&E network's centroids that
  lie farther than ``dedupe`` x the nucleus diameter from every prompt so far, so a nucleus
  one guide missed or merged still gets its prompt and one both found gets one): a few hundred
  prompts per tile instead of 4,096.

Decoded masks are kept when SAM's predicted IoU reaches ``pred_iou_thresh`` and their area is
nucleus-like, holes are filled, and overlaps are resolved by painting masks in score order and
dropping a mask that keeps less than half of itself.

Weights never download: vit_h/l/b need ``checkpoint`` (the ``.pth`` from the SAM release).
``vit_t`` is a tiny architecture (256 px input, 64-d embeddings) for plumbing tests and
timing on CPU; with ``random_weights`` its masks are meaningless by design.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from immunocto.config import SamParams
from immunocto.errors import ImmunoctoError, InputFileError
from immunocto.segment.base import Backend, SlideContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamArch:
    embed_dim: int
    depth: int
    heads: int
    global_attn: tuple[int, ...]
    img_size: int = 1024
    prompt_dim: int = 256
    decoder_mlp: int = 2048
    decoder_heads: int = 8
    window: int = 14


#: The three released architectures, and a tiny one for tests.
ARCHITECTURES: dict[str, SamArch] = {
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
    "vit_t": SamArch(
        64, 2, 2, (1,), img_size=256, prompt_dim=32, decoder_mlp=64, decoder_heads=2, window=4
    ),
}


def build_sam(
    model: str = "vit_h",
    checkpoint: str | Path | None = None,
    *,
    random_weights: bool = False,
    device: str = "cpu",
) -> Any:
    """A SAM model, weights from ``checkpoint`` (never downloaded).

    Raises
    ------
    InputFileError
        Missing checkpoint (unless ``random_weights``), unreadable file, or weights that do not
        fit the architecture.
    """
    try:
        import torch
        from segment_anything.modeling import (
            ImageEncoderViT,
            MaskDecoder,
            PromptEncoder,
            Sam,
            TwoWayTransformer,
        )
    except ImportError:
        raise ImmunoctoError(
            "the sam backend needs torch and segment-anything: pip install 'immunocto[sam]'"
        ) from None
    if model not in ARCHITECTURES:
        raise ImmunoctoError(
            f"unknown SAM model {model!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    if checkpoint is None and not random_weights:
        raise InputFileError(
            f"SAM {model} needs its checkpoint: download e.g. sam_vit_h_4b8939.pth from the "
            "segment-anything release and give it as `checkpoint` (segmentation.sam.checkpoint)",
            arguments=("checkpoint",),
        )
    a = ARCHITECTURES[model]
    grid = a.img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=a.depth,
            embed_dim=a.embed_dim,
            img_size=a.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=a.heads,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=a.global_attn,
            window_size=a.window,
            out_chans=a.prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=a.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(a.img_size, a.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=a.prompt_dim,
                mlp_dim=a.decoder_mlp,
                num_heads=a.decoder_heads,
            ),
            transformer_dim=a.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=max(a.prompt_dim, 32),
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise InputFileError(
                f"{path}: SAM checkpoint not found; fix `checkpoint` (segmentation.sam.checkpoint)",
                arguments=("checkpoint",),
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise InputFileError(
                f"{path}: not a readable PyTorch checkpoint ({type(err).__name__})"
            ) from None
        try:
            sam.load_state_dict(state)
        except RuntimeError as err:
            first = (
                str(err).splitlines()[1].strip()
                if len(str(err).splitlines()) > 1
                else str(err)[:120]
            )
            raise InputFileError(
                f"{path}: these weights do not fit SAM {model} ({first}); pass the matching --sam-model"
            ) from None
    sam.eval()
    return sam.to(device)


def grid_points(w: int, h: int, per_1024: int) -> np.ndarray:
    """Immunocto's prompt grid: ``per_1024`` points per side of a 1024 px tile, scaled to the
    window, at cell centres. Returns ``(n, 2)`` (x, y) window pixels."""
    nx = max(1, round(per_1024 * w / 1024))
    ny = max(1, round(per_1024 * h / 1024))
    xs = (np.arange(nx) + 0.5) * w / nx
    ys = (np.arange(ny) + 0.5) * h / ny
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def resolve_masks(
    masks: list[np.ndarray], scores: np.ndarray, shape: tuple[int, int], *, min_keep: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Paint masks in descending score order; a mask keeping less than ``min_keep`` of its
    pixels is dropped. Returns labels ``(h, w)`` and the kept masks' scores (index = label)."""
    labels = np.zeros(shape, np.int32)
    kept_scores = [0.0]
    for k in np.argsort(-np.asarray(scores), kind="stable"):
        m = masks[k]
        free = m & (labels == 0)
        if m.sum() == 0 or free.sum() < min_keep * m.sum():
            continue
        labels[free] = len(kept_scores)
        kept_scores.append(float(scores[k]))
    return labels, np.array(kept_scores)


class SamBackend(Backend):
    """segment-anything on each tile, prompted by a grid or by classical nucleus seeds."""

    name = "sam"

    def __init__(
        self,
        params: SamParams,
        *,
        guide: Backend | list[Backend] | None = None,
        min_area_um2: float = 7.0,
        max_area_um2: float = 600.0,
    ) -> None:
        self.params = params
        guides = [] if guide is None else list(guide) if isinstance(guide, list) else [guide]
        self.guides = guides if params.mode == "guided" else []
        if params.mode == "guided" and not guides:
            raise ValueError("guided mode needs a guide backend")
        self.guide = self.guides[0] if self.guides else None
        self.needs_if = any(g.needs_if for g in self.guides)
        self.min_area_um2 = min_area_um2
        self.max_area_um2 = max_area_um2
        self._predictor = None
        self.decoded_prompts: list[int] = []  # per segmented window, for benchmarks

    @property
    def device(self) -> str:
        if self.params.device != "auto":
            return self.params.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def predictor(self):
        if self._predictor is None:
            from segment_anything import SamPredictor

            sam = build_sam(
                self.params.model,
                self.params.checkpoint,
                random_weights=self.params.random_weights,
                device=self.device,
            )
            self._predictor = SamPredictor(sam)
        return self._predictor

    def prepare(self, ctx: SlideContext, sample_windows: list[tuple[int, int, int, int]]) -> None:
        self.predictor()  # fail early on a bad checkpoint
        self.prepare_guides(ctx, sample_windows)

    def prepare_guides(
        self, ctx: SlideContext, sample_windows: list[tuple[int, int, int, int]]
    ) -> None:
        """The guides' slide-level set-up (no SAM model needed: prompt counts alone)."""
        for g in self.guides:
            g.prepare(ctx, sample_windows)

    def prompts(self, ctx: SlideContext, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Point prompts ``(n, 2)`` (x, y) in window pixels."""
        if self.guide is None:
            return grid_points(w, h, self.params.points_per_side)
        from scipy.spatial import cKDTree

        radius = self.params.dedupe * ctx.stats.get("nucleus_diameter_um", 10.0) / ctx.mpp
        points = np.zeros((0, 2))
        for g in self.guides:
            seeds = g.segment(ctx, x, y, w, h)[0]
            if seeds.max() == 0:
                continue
            centres = ndimage.center_of_mass(seeds > 0, seeds, np.arange(1, seeds.max() + 1))
            new = np.array(centres, float)[:, ::-1].reshape(-1, 2)
            new = new[np.isfinite(new).all(1)]  # ids without pixels (cropped to the window)
            if len(points) and radius > 0:
                far = cKDTree(points).query(new, distance_upper_bound=radius)[0] > radius
                new = new[far]
            points = np.concatenate([points, new])
        return points

    def segment(
        self, ctx: SlideContext, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray]:
        import torch

        points = self.prompts(ctx, x, y, w, h)
        self.decoded_prompts.append(len(points))
        if len(points) == 0:
            return np.zeros((h, w), np.int32), np.zeros(1)
        rgb = ctx.he.read_region(x, y, w, h)
        pred = self.predictor()
        pred.set_image(rgb)
        area_px = (self.min_area_um2 / ctx.mpp**2, self.max_area_um2 / ctx.mpp**2)
        masks: list[np.ndarray] = []
        scores: list[float] = []
        multimask = self.guide is None  # a grid point is ambiguous; a nucleus seed is not
        with torch.inference_mode():
            for start in range(0, len(points), self.params.points_per_batch):
                batch = points[start : start + self.params.points_per_batch]
                coords = pred.transform.apply_coords(batch, (h, w))
                coords_t = torch.as_tensor(coords, dtype=torch.float32, device=pred.device)[
                    :, None, :
                ]
                labels_t = torch.ones(coords_t.shape[:2], dtype=torch.int64, device=pred.device)
                out, iou, _ = pred.predict_torch(coords_t, labels_t, multimask_output=multimask)
                best = iou.argmax(dim=1)
                idx = torch.arange(len(best), device=best.device)
                chosen = out[idx, best].cpu().numpy()
                chosen_iou = iou[idx, best].float().cpu().numpy()
                for m, s in zip(chosen, chosen_iou, strict=True):
                    area = int(m.sum())
                    if s >= self.params.pred_iou_thresh and area_px[0] <= area <= area_px[1]:
                        masks.append(ndimage.binary_fill_holes(m))
                        scores.append(float(s))
        return resolve_masks(masks, np.array(scores), (h, w))

    def describe(self) -> dict[str, object]:
        p = self.params
        return {
            "backend": self.name,
            "model": p.model,
            "checkpoint": str(p.checkpoint) if p.checkpoint else None,
            "random_weights": p.random_weights,
            "mode": p.mode,
            "guide": self.guide.name if self.guide else None,
            "points_per_side": p.points_per_side,
            "pred_iou_thresh": p.pred_iou_thresh,
        }
