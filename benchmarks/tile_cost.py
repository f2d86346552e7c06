"""Per-tile segmentation cost against slide size: does one tile cost more on a bigger slide?

For each registered run folder given (e.g. the `sim<size>` folders `benchmarks/scale.py`
leaves in its `--workdir`), `--tiles` tissue tiles spread evenly over the slide are segmented
one by one in this process, exactly as `immunocto segment` does it (`segment_tile`: read the
IF nuclear stain through the registration, segment, keep the tile's own cells). If the
pipeline is linear in area, seconds per tile and cells per tile are the same at every size.

    python benchmarks/tile_cost.py W/sim8192 W/sim16384 --tiles 20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _results import record
from immunocto.config import load_config
from immunocto.io.open import open_pair
from immunocto.register.model import RegistrationModel
from immunocto.register.stage import registration_path, run_register
from immunocto.segment.base import SlideContext
from immunocto.segment.registry import make_backend, resolve_backend_name
from immunocto.segment.tiled import plan_tiles, segment_tile


def tile_cost(run: Path, n_tiles: int) -> dict:
    cfg = load_config(run)
    run_register(cfg, slides=[cfg.slides[0].id])  # cached when current
    slide = cfg.slides[0]
    params = cfg.segmentation
    he, if_ = open_pair(cfg, 0)
    try:
        name = resolve_backend_name(params.backend, has_if=if_ is not None)
        reg = None
        if if_ is not None:
            reg = RegistrationModel.load(registration_path(cfg, slide.id))
        ctx = SlideContext(slide.id, he, if_, reg, cfg.registration.nuclear_channel)
        backend = make_backend(name, params, has_if=if_ is not None)
        todo = plan_tiles(ctx, backend, tile=params.tile_px, halo=params.halo_px)
        pick = np.unique(np.linspace(0, len(todo) - 1, min(n_tiles, len(todo))).round())
        seconds, cells = [], []
        for i in pick.astype(int):
            t0 = time.perf_counter()
            res = segment_tile(ctx, backend, todo[i])
            seconds.append(time.perf_counter() - t0)
            cells.append(len(res.scores))
    finally:
        he.close()
        if if_ is not None:
            if_.close()
    return {
        "run": str(run), "width": he.width, "height": he.height, "backend": name,
        "tiles_on_tissue": len(todo), "tiles_timed": len(seconds),
        "s_per_tile": round(float(np.mean(seconds)), 3),
        "s_per_tile_median": round(float(np.median(seconds)), 3),
        "cells_per_tile": round(float(np.mean(cells)), 1),
        "ms_per_cell": round(1000 * float(np.sum(seconds)) / max(sum(cells), 1), 2),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", type=Path, nargs="+", help="registered (or registrable) run folders")
    ap.add_argument("--tiles", type=int, default=20)
    args = ap.parse_args()
    rows = [tile_cost(run, args.tiles) for run in args.runs]
    record("tile_cost", rows)


if __name__ == "__main__":
    main()
