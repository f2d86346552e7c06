"""Estimating the H&E -> IF mapping from hematoxylin density against the nuclear stain.

1. *Coarse* (on a level near ``coarse_mpp``): the IF is resampled into the H&E frame at a
   range of rotations (scale from the two pixel sizes); phase correlation gives the shift at
   each, and the rotation whose shifted images correlate best wins.
2. *Fine* (level 0, per tile on tissue): the nuclear stain is resampled through the coarse
   affine into the tile's H&E frame, and phase correlation (1/20 px) measures what shift is
   left. Each tile gives one correspondence, tile centre -> IF position, with its match.
3. *Fit*: a least-squares affine over the well-matched tiles, refitted without gross
   outliers; what it leaves per tile is the residual grid (the local misregistration).

Coordinates follow the package convention: ``x`` = column, ``y`` = row, level-0 pixels;
coarse pixel ``j`` of a level with effective downsample ``S`` is centred on level-0
``(j + 0.5) * S - 0.5``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu, window
from skimage.registration import phase_cross_correlation
from skimage.transform import downscale_local_mean

from immunocto._parallel import one_blas_thread, ordered_map
from immunocto.config import RegisterParams
from immunocto.errors import ImmunoctoError
from immunocto.io.base import Slide
from immunocto.io.tiling import make_tiles, tiles_on_tissue, tissue_mask
from immunocto.progress import NullProgress, Progress
from immunocto.register.features import hematoxylin_density, ncc, nuclear_signal, standardise
from immunocto.register.model import RegistrationModel

if TYPE_CHECKING:
    from immunocto.segment.base import SlidePaths

log = logging.getLogger(__name__)


@dataclass
class CoarseResult:
    affine: np.ndarray  # (3, 3) level-0 H&E -> level-0 IF
    rotation_deg: float
    match: float


def _level_image(
    slide: Slide, target_ds: float, channels: list[str] | None = None
) -> tuple[np.ndarray, float]:
    """The slide near ``target_ds`` (level-0 px per pixel): finest level not coarser than it,
    then block-averaged down by an integer factor. Returns the image and its downsample."""
    level = slide.best_level(target_ds)
    ds = slide.levels[level].downsample
    image = slide.read_level(level, channels=channels) if channels else slide.read_level(level)
    factor = max(int(target_ds // ds), 1)
    image = image.astype(np.float32)
    if factor > 1:
        if image.ndim == 3 and slide.kind == "brightfield":
            image = downscale_local_mean(image, (factor, factor, 1))
        else:
            image = downscale_local_mean(image, (1, factor, factor))
    return image, ds * factor


def _xy_to_rc(matrix: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Convert ``(x, y) -> M (x, y) + t`` into ndimage's ``(row, col)`` form."""
    rc = np.array([[matrix[1, 1], matrix[1, 0]], [matrix[0, 1], matrix[0, 0]]])
    return rc, np.array([offset[1], offset[0]])


def _warp(
    image: np.ndarray, matrix: np.ndarray, offset: np.ndarray, shape: tuple[int, int], cval: float
) -> np.ndarray:
    """``out(x, y) = image(M (x, y) + t)`` (bilinear), in the package's (x, y) convention."""
    rc, off = _xy_to_rc(matrix, offset)
    return ndimage.affine_transform(image, rc, offset=off, output_shape=shape, order=1, cval=cval)


def _match_shift(
    reference: np.ndarray, moving: np.ndarray, upsample: int
) -> tuple[np.ndarray, float]:
    """Shift ``s`` (x, y) such that ``moving`` moved by ``s`` matches ``reference``, and the
    correlation of the matched pair (central region)."""
    win = window("hann", reference.shape).astype(np.float32)
    ref = standardise(reference)
    mov = standardise(moving)
    # the sub-pixel refinement is a matmul: one BLAS thread, so the shift does not depend on
    # the core count or OMP_NUM_THREADS
    with one_blas_thread():
        shift_rc, _, _ = phase_cross_correlation(
            ref * win, mov * win, upsample_factor=upsample, normalization=None
        )
    aligned = ndimage.shift(mov, shift_rc, order=1, mode="nearest")
    h, w = reference.shape
    core = (slice(h // 8, h - h // 8), slice(w // 8, w - w // 8))
    return np.array([shift_rc[1], shift_rc[0]]), ncc(ref[core], aligned[core])


def _rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def estimate_coarse(he: Slide, if_: Slide, params: RegisterParams) -> CoarseResult:
    """Rotation and shift on low-resolution images (see the module docstring)."""
    if_mpp = if_.mpp or he.mpp
    he_img, s_he = _level_image(he, params.coarse_mpp / he.mpp)
    nuc_img, s_if = _level_image(if_, params.coarse_mpp / if_mpp, channels=[params.nuclear_channel])
    h_c = hematoxylin_density(np.clip(he_img, 0, 255).astype(np.uint8))
    n_c = nuclear_signal(nuc_img[0])
    scale = (s_he * he.mpp) / (s_if * if_mpp)  # IF coarse px per H&E coarse px
    centre_he = np.array([h_c.shape[1] - 1, h_c.shape[0] - 1]) / 2.0
    centre_if = np.array([n_c.shape[1] - 1, n_c.shape[0] - 1]) / 2.0
    background = float(np.median(n_c))

    def score(deg: float) -> tuple[float, np.ndarray, np.ndarray]:
        m = scale * _rotation(deg)
        t0 = centre_if - m @ centre_he
        warped = _warp(n_c, m, t0, h_c.shape, background)
        shift, match = _match_shift(h_c, warped, upsample=10)
        return match, m, t0 - m @ shift  # t = t0 - M s (see module docstring of _match_shift)

    step = 0.5
    angles = (
        np.arange(-params.max_rotation_deg, params.max_rotation_deg + 1e-9, step)
        if params.max_rotation_deg
        else [0.0]
    )
    results = {float(a): score(float(a)) for a in angles}
    best = max(results, key=lambda a: results[a][0])
    if params.max_rotation_deg:
        for a in np.arange(best - step, best + step + 1e-9, step / 5):
            results.setdefault(float(a), score(float(a)))
        best = max(results, key=lambda a: results[a][0])
    match, m, t = results[best]
    # Coarse pixels -> level 0: p_c = (p0 + 0.5) / S_he - 0.5, q0 = (q_c + 0.5) S_if - 0.5.
    affine = np.eye(3)
    affine[:2, :2] = (s_if / s_he) * m
    affine[:2, 2] = s_if * (m @ np.full(2, 0.5 / s_he - 0.5) + t + 0.5) - 0.5
    log.info("coarse registration: rotation %.2f deg, match %.2f", best, match)
    return CoarseResult(affine=affine, rotation_deg=best, match=match)


def _fit_affine(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    design = np.column_stack([p, np.ones(len(p))])
    coef, *_ = np.linalg.lstsq(design, q, rcond=None)
    affine = np.eye(3)
    affine[:2] = coef.T
    return affine


def robust_affine(
    p: np.ndarray, q: np.ndarray, *, floor_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares affine ``p -> q`` refitted without gross outliers.

    Points further than ``max(floor_px, 4 * 1.4826 * MAD)`` from the fit are left out, three
    times. Returns the affine and the inlier mask.
    """
    inlier = np.ones(len(p), bool)
    affine = _fit_affine(p, q)
    for _ in range(3):
        pred = p @ affine[:2, :2].T + affine[:2, 2]
        err = np.hypot(*(q - pred).T)
        mad = 1.4826 * np.median(np.abs(err[inlier] - np.median(err[inlier])))
        new = err <= max(floor_px, 4.0 * mad + np.median(err[inlier]))
        if new.sum() < 3 or np.array_equal(new, inlier):
            break
        inlier = new
        affine = _fit_affine(p[inlier], q[inlier])
    return affine, inlier


def measure_tile(
    he: Slide, if_: Slide, coarse: np.ndarray, x0: int, y0: int, x1: int, y1: int, channel: str
) -> tuple[np.ndarray, float]:
    """Shift ``delta`` (H&E px, x/y) left by the coarse affine in one tile, and its match.

    The IF nuclear stain is resampled through ``coarse`` into the tile's H&E frame; then the
    true IF position of the tile centre ``c`` is ``coarse @ (c + delta)``.
    """
    w, h = x1 - x0, y1 - y0
    rgb = he.read_region(x0, y0, w, h)
    h_d = hematoxylin_density(rgb)
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], float) @ coarse.T
    margin = 32
    u_a = int(np.floor(corners[:, 0].min())) - margin
    v_a = int(np.floor(corners[:, 1].min())) - margin
    u_b = int(np.ceil(corners[:, 0].max())) + margin
    v_b = int(np.ceil(corners[:, 1].max())) + margin
    box = if_.read_region(u_a, v_a, u_b - u_a, v_b - v_a, channels=[channel])[0]
    signal = nuclear_signal(box)
    offset = coarse[:2, :2] @ np.array([x0, y0]) + coarse[:2, 2] - np.array([u_a, v_a])
    warped = _warp(signal, coarse[:2, :2], offset, (h, w), float(np.median(signal)))
    shift, match = _match_shift(h_d, warped, upsample=20)
    return -shift, match


def _open_for_measure(
    paths: SlidePaths, affine: np.ndarray, channel: str
) -> tuple[Slide, Slide, np.ndarray, str]:
    ctx = paths.open({})
    return ctx.he, ctx.if_, affine, channel


def _measure_in_worker(
    context: tuple[Slide, Slide, np.ndarray, str], box: tuple[int, int, int, int]
) -> tuple[np.ndarray, float]:
    he, if_, affine, channel = context
    return measure_tile(he, if_, affine, *box, channel)


#: Smallest fine-stage tile (level-0 px): below it too few nuclei to correlate.
MIN_TILE_PX = 128


def fine_tile_px(width: int, height: int, tile_px: int) -> int:
    """The fine stage's tile edge: ``tile_px``, shrunk (to a multiple of 16, at least
    :data:`MIN_TILE_PX`) so that a small image still gives a 3 x 3 grid of tiles."""
    fit = (min(width, height) // 3) // 16 * 16
    return int(min(tile_px, max(MIN_TILE_PX, fit)))


def estimate_registration(
    he: Slide,
    if_: Slide,
    params: RegisterParams,
    *,
    slide_id: str = "",
    progress: Progress | None = None,
    paths: SlidePaths | None = None,
    workers: int = 1,
) -> RegistrationModel:
    """Estimate the affine and the residual grid of one slide pair (see module docstring).

    The fine tiles are matched on ``workers`` processes (or the Dask cluster of
    :func:`immunocto._parallel.use_dask`), which reopen the slides from ``paths``; the result
    does not depend on the number of workers.
    """
    progress = progress or NullProgress()
    if params.nuclear_channel not in if_.channel_names:
        raise ImmunoctoError(
            f"{if_.path}: no nuclear channel {params.nuclear_channel!r} "
            f"(channels: {', '.join(if_.channel_names)}); set registration.nuclear_channel in the config"
        )
    coarse = estimate_coarse(he, if_, params)
    tile_px = fine_tile_px(he.width, he.height, params.tile_px)
    if tile_px != params.tile_px:
        log.info(
            "%s: %d x %d px is small for %d px tiles; matching %d px tiles instead",
            slide_id, he.width, he.height, params.tile_px, tile_px,
        )  # fmt: skip
    tiles = make_tiles(he.width, he.height, tile=tile_px, halo=0)
    mask, mask_ds = tissue_mask(he)
    on_tissue = tiles_on_tissue(tiles, mask, mask_ds, min_fraction=0.25)
    if len(on_tissue) > params.max_tiles:
        pick = np.linspace(0, len(on_tissue) - 1, params.max_tiles).round().astype(int)
        on_tissue = [on_tissue[i] for i in np.unique(pick)]
    rows = max(t.row for t in tiles) + 1
    cols = max(t.col for t in tiles) + 1
    task = f"{slide_id} register"
    progress.start(task, len(on_tissue))
    centres, targets, matches, where = [], [], [], []
    measured = ordered_map(
        _measure_in_worker,
        [(t.x0, t.y0, t.x1, t.y1) for t in on_tissue],
        workers=workers if paths is not None else 1,
        setup=_open_for_measure,
        setup_args=(paths, coarse.affine, params.nuclear_channel),
        local_context=(he, if_, coarse.affine, params.nuclear_channel),
    )
    for t, (delta, match) in zip(on_tissue, measured, strict=True):
        c = np.array([(t.x0 + t.x1 - 1) / 2.0, (t.y0 + t.y1 - 1) / 2.0])
        centres.append(c)
        targets.append(coarse.affine[:2, :2] @ (c + delta) + coarse.affine[:2, 2])
        matches.append(match)
        where.append((t.row, t.col))
        progress.advance(task)
    centres_a = np.array(centres).reshape(-1, 2)
    targets_a = np.array(targets).reshape(-1, 2)
    matches_a = np.array(matches)
    good = matches_a >= params.min_match
    match_grid = np.full((rows, cols), np.nan)
    for (r, c), m in zip(where, matches_a, strict=True):
        match_grid[r, c] = m
    if good.sum() >= 3:
        affine, inlier = robust_affine(
            centres_a[good], targets_a[good], floor_px=max(8.0, 2 * params.max_residual_px)
        )
        source = "fine"
    else:
        if coarse.match < params.min_match:
            raise ImmunoctoError(
                f"{he.path.name} / {if_.path.name}: registration failed (coarse match {coarse.match:.2f}, "
                f"{int(good.sum())} matching tiles); check that both images are the same tissue section"
            )
        log.warning(
            "%s: only %d of %d tiles matched (a local correction needs 3); keeping the coarse "
            "affine (rotation, scale, shift) without local correction. Expected for images "
            "under ~3 x %d px; otherwise check the residual figure and "
            "registration.min_match / tile_px",
            slide_id, int(good.sum()), len(on_tissue), MIN_TILE_PX,
        )  # fmt: skip
        affine, inlier = coarse.affine, np.zeros(0, bool)
        source = "coarse"
    dx = np.full((rows, cols), np.nan)
    dy = np.full((rows, cols), np.nan)
    pred = centres_a @ affine[:2, :2].T + affine[:2, 2] if len(centres_a) else np.zeros((0, 2))
    for i, (r, c) in enumerate(where):
        if good[i]:
            dx[r, c], dy[r, c] = targets_a[i] - pred[i]
    model = RegistrationModel(
        slide_id=slide_id, affine=affine, tile_px=tile_px, residual_dx=dx, residual_dy=dy,
        match=match_grid, max_residual_px=params.max_residual_px, he_shape=(he.height, he.width),
        if_shape=(if_.height, if_.width), nuclear_confirm_fraction=params.nuclear_confirm_fraction
    )  # fmt: skip
    mag = model.residual_magnitude[np.isfinite(model.residual_magnitude)]
    lin = affine[:2, :2]
    model.stats = {
        "source": source,
        "tiles_total": len(tiles),
        "tiles_on_tissue": len(on_tissue),
        "tiles_matched": int(good.sum()),
        "tiles_outliers": int(good.sum() - inlier.sum()) if source == "fine" else 0,
        "tiles_flagged": int(model.flagged.sum()),
        "residual_median_px": round(float(np.median(mag)), 3) if mag.size else None,
        "residual_p95_px": round(float(np.percentile(mag, 95)), 3) if mag.size else None,
        "residual_max_px": round(float(mag.max()), 3) if mag.size else None,
        "rotation_deg": round(float(np.degrees(np.arctan2(lin[1, 0], lin[0, 0]))), 4),
        "scale": round(float(np.sqrt(abs(np.linalg.det(lin)))), 6),
        "translation_px": [round(float(v), 3) for v in affine[:2, 2]],
        "coarse_rotation_deg": round(coarse.rotation_deg, 3),
        "coarse_match": round(coarse.match, 3),
    }
    model.hoechst_otsu = nuclear_otsu(if_, params.nuclear_channel)
    return model


def nuclear_otsu(if_: Slide, channel: str = "Hoechst", *, max_pixels: int = 4096**2) -> float:
    """Otsu threshold of the nuclear stain, on the finest level with at most ``max_pixels``
    (a 1.3 µm/px level still resolves 7 µm nuclei)."""
    level = len(if_.levels) - 1
    for k, lv in enumerate(if_.levels):
        if lv.shape[0] * lv.shape[1] <= max_pixels:
            level = k
            break
    image = if_.read_level(level, channels=[channel])[0].astype(np.float32)
    return float(threshold_otsu(image))
