"""``immunocto register``: estimate and store the registration of every slide of a run."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from immunocto._fs import atomic_path
from immunocto.config import RunConfig
from immunocto.errors import ImmunoctoError
from immunocto.io.open import open_pair
from immunocto.progress import NullProgress, Progress
from immunocto.register.estimate import estimate_registration
from immunocto.register.model import RegistrationModel

log = logging.getLogger(__name__)


@dataclass
class RegisterResult:
    slide_id: str
    status: str  # "registered" | "current" | "no IF"
    path: Path | None
    model: RegistrationModel | None
    seconds: float = 0.0


def registration_path(cfg: RunConfig, slide_id: str) -> Path:
    """``RUN/registration/<slide_id>.json``."""
    return cfg.run_dir / "registration" / f"{slide_id}.json"


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_registration(cfg: RunConfig, slide_id: str) -> RegistrationModel:
    """The stored registration of a slide (clear error when missing)."""
    return RegistrationModel.load(registration_path(cfg, slide_id))


def run_register(
    cfg: RunConfig,
    *,
    slides: list[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> list[RegisterResult]:
    """Register every slide (or the ``slides`` ids) whose inputs or parameters changed."""
    progress = progress or NullProgress()
    chosen = cfg.select_slides(slides)
    params = cfg.registration.model_dump()
    results = []
    for slide in chosen:
        i = cfg.slides.index(slide)  # the config entry, for open_pair's errors
        if slide.if_ is None:
            results.append(RegisterResult(slide.id, "no IF", None, None))
            continue
        out = registration_path(cfg, slide.id)
        inputs = {
            "he": _fingerprint(cfg.resolve(slide.he)),
            "if": _fingerprint(cfg.resolve(slide.if_)),
            "mpp": slide.mpp,
            "if_mpp": slide.if_mpp,
        }
        if not force and out.exists():
            try:
                old = RegistrationModel.load(out)
                if old.meta.get("inputs") == inputs and old.meta.get("params") == params:
                    results.append(RegisterResult(slide.id, "current", out, old))
                    continue
            except ImmunoctoError:
                pass
        t0 = time.perf_counter()
        he, if_ = open_pair(cfg, i)
        with he, if_:
            from immunocto.segment.base import SlidePaths

            paths = SlidePaths.for_slide(cfg, slide)
            model = estimate_registration(
                he, if_, cfg.registration, slide_id=slide.id, progress=progress, paths=paths,
                workers=cfg.segmentation.workers or os.cpu_count() or 1,
            )  # fmt: skip
            model.meta = {"inputs": inputs, "params": params}
            model.save(out)
            write_residual_png(model, he, out.with_name(f"{slide.id}_residual.png"))
        results.append(RegisterResult(slide.id, "registered", out, model, time.perf_counter() - t0))
        log.info("%s: registered (%s)", slide.id, model.stats)
    return results


def write_residual_png(model: RegistrationModel, he, path: Path) -> Path:
    """The residual heat map over an H&E thumbnail."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from immunocto.register.figures import plot_residuals

    level = he.best_level(max(he.width, he.height) / 1024)
    thumb = he.read_level(level)
    fig = Figure(figsize=(9, 8), dpi=100)
    FigureCanvasAgg(fig)
    plot_residuals(
        model, thumbnail=thumb, thumb_downsample=he.levels[level].downsample, ax=fig.subplots()
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def register_stage(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Pipeline stage: register every slide; summary for `immunocto run`."""
    results = run_register(cfg, progress=progress)
    done = [r for r in results if r.model is not None]
    flagged = sum(int(r.model.flagged.sum()) for r in done)
    med = [r.model.stats.get("residual_median_px") for r in done]
    med = [m for m in med if m is not None]
    return {
        "slides": len(done),
        "new": sum(r.status == "registered" for r in results),
        "median_residual_px": round(float(np.median(med)), 2) if med else "-",
        "flagged_tiles": flagged,
    }
