"""SAM point prompts per tile: Immunocto's grid against prompts guided by nucleus guides.

For every full 1024 px tile of a simulated slide it counts the prompts each mode would decode
and the share of true nuclei (centroid in the tile) that hold at least one prompt (a nucleus
without a prompt cannot be found by SAM). No SAM model runs: the prompts are what the `sam`
backend's `prompts()` returns, with the guides prepared on the slide as in a run.

    python benchmarks/sam_prompts.py --size 4096 --seed 3
    python benchmarks/sam_prompts.py --run RUN            # a simulated run with registration

On real H&E (no IF there, so the network guides alone), on the images held out from the
shipped nucleus network's training (CoNSeP test images, GBM40 tiles 31-40), next to the
classical H&E segmentation as guide; prompts per 1024² px and the share of annotated nuclei
hit. `--loso SOURCE=DIR` adds a model trained without that source (`immunocto train --kind
nuclei --exclude SOURCE`), scored on all of that source's images:

    python benchmarks/sam_prompts.py --consep ../shared/data/consep_train.npz \
        --gbm40 ../shared/data/gbm40_he.npz [--loso gbm40=DIR]

Target (issue 22): guided >= 7x fewer prompts than the grid with >= 99 % of true nuclei hit.
Results are printed and appended to benchmarks/results/sam_prompts.jsonl.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from _results import record
from immunocto.config import SamParams, SegmentParams, load_config
from immunocto.register import run_register
from immunocto.register.stage import registration_path
from immunocto.segment.base import SlidePaths
from immunocto.segment.registry import make_backend
from immunocto.segment.sam import grid_points
from immunocto.segment.tiled import sample_windows
from immunocto.simulate.dataset import simulate_dataset
from immunocto.validate import centroids


def hits(truth_tile: np.ndarray, points: np.ndarray, inside: np.ndarray) -> tuple[int, int]:
    """(true nuclei of ``inside`` hit by a point, len(inside))."""
    if len(points):
        ij = np.clip(np.round(points).astype(int), 0, np.array(truth_tile.shape[::-1]) - 1)
        hit_ids = np.unique(truth_tile[ij[:, 1], ij[:, 0]])
    else:
        hit_ids = np.zeros(0, int)
    return int(np.isin(inside, hit_ids).sum()), len(inside)


def real_rows(consep: Path, gbm40: Path, loso: list[str]) -> list[dict]:
    """Grid vs guides on held-out real H&E images (see the module docstring)."""
    from immunocto.models.nuclei_data import HELD_OUT, read_consep, read_gbm40
    from immunocto.segment import segment_he

    sources = {"consep": read_consep(consep), "gbm40": read_gbm40(gbm40)}
    runs = [(src, [i for i in imgs if i.group in HELD_OUT[src]["test"]], None)
            for src, imgs in sources.items()]  # fmt: skip
    for item in loso:
        src, folder = item.split("=", 1)
        runs.append((src, sources[src], Path(folder)))
    rows = []
    for src, images, folder in runs:
        guides = {
            "grid": lambda img: grid_points(img.rgb.shape[1], img.rgb.shape[0], 64),
            "guided by he-classical": lambda img: segment_he(img.rgb, mpp=img.mpp, method="classical"),
            "guided by he (the nucleus network)": lambda img, folder=folder: segment_he(img.rgb, mpp=img.mpp, model=folder),
        }  # fmt: skip
        for name, guide in guides.items():
            t0 = time.perf_counter()
            n_prompts = n_hit = n_true = 0
            pixels = 0
            for img in images:
                out = guide(img)
                pts = out if name == "grid" else centroids(out)[1]
                ids = np.unique(img.instances)[1:]
                a, b = hits(img.instances, pts, ids)
                n_prompts, n_hit, n_true = n_prompts + len(pts), n_hit + a, n_true + b
                pixels += img.rgb.shape[0] * img.rgb.shape[1]
            rows.append({
                "source": src, "images": "all (model trained without it)" if folder else "held out",
                "model": str(folder) if folder else "shipped", "mode": name,
                "prompts_per_1024px2": round(n_prompts / pixels * 1024**2, 1),
                "nuclei": n_true, "nuclei_hit": round(n_hit / max(n_true, 1), 4),
                "seconds": round(time.perf_counter() - t0, 1),
            })  # fmt: skip
        grid = rows[-3]["prompts_per_1024px2"]
        for r in rows[-3:]:
            r["fewer_than_grid"] = round(grid / max(r["prompts_per_1024px2"], 1e-9), 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--artifacts", default="default")
    ap.add_argument("--run", type=Path)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--modes", nargs="+", help="Only these modes (names as printed).")
    ap.add_argument("--consep", type=Path, help="Real H&E mode: CoNSeP npz (with --gbm40).")
    ap.add_argument("--gbm40", type=Path)
    ap.add_argument("--loso", action="append", default=[], metavar="SOURCE=DIR")
    args = ap.parse_args()
    if args.consep or args.gbm40:
        if not (args.consep and args.gbm40):
            ap.error("--consep and --gbm40 go together")
        record("sam_prompts", real_rows(args.consep, args.gbm40, args.loso))
        return
    run = args.run or Path(tempfile.mkdtemp(prefix="bench-prompts-")) / "run"
    if not (run / "immunocto.yaml").exists():
        simulate_dataset(run, size=args.size, slides=1, seed=args.seed, artifacts=args.artifacts)
    cfg = load_config(run)
    slide = cfg.slides[0]
    if not registration_path(cfg, slide.id).exists():
        run_register(cfg)
    ctx = SlidePaths.for_slide(cfg, slide, registration_path(cfg, slide.id)).open({})
    truth = tifffile.imread(run / "truth" / slide.id / "nuclei.tif")
    h, w = truth.shape
    ids, centre = centroids(truth)
    cx, cy = centre[:, 0], centre[:, 1]
    modes = {
        "grid": None,
        "guided by if-nuclear": SamParams(mode="guided", guide="if-nuclear"),
        "guided by he (the nucleus network)": SamParams(mode="guided", guide="he"),
        "guided by if-nuclear+he (deduplicated)": SamParams(mode="guided", guide="if-nuclear+he"),
        "guided by he+if-nuclear (deduplicated)": SamParams(mode="guided", guide="he+if-nuclear"),
    }
    rows = []
    for name, params in modes.items():
        if args.modes and name != "grid" and name not in args.modes:
            continue
        t0 = time.perf_counter()
        n_prompts, n_hit, n_true, n_tiles = [], 0, 0, 0
        backend = None
        if params is not None:
            backend = make_backend("sam", SegmentParams(sam=params), has_if=True)
            # the guides' slide-level set-up, as SamBackend.prepare does (without loading SAM)
            ctx.stats.clear()
            backend.prepare_guides(ctx, sample_windows(w, h, np.ones((1, 1), bool), max(w, h)))
        for y0 in range(0, h - args.tile + 1, args.tile):
            for x0 in range(0, w - args.tile + 1, args.tile):
                tile = truth[y0 : y0 + args.tile, x0 : x0 + args.tile]
                inside = ids[
                    (cx >= x0) & (cx < x0 + args.tile) & (cy >= y0) & (cy < y0 + args.tile)
                ]
                if backend is None:
                    pts = grid_points(args.tile, args.tile, 64)
                else:
                    pts = backend.prompts(ctx, x0, y0, args.tile, args.tile)
                a, b = hits(tile, pts, inside)
                n_hit, n_true, n_tiles = n_hit + a, n_true + b, n_tiles + 1
                n_prompts.append(len(pts))
        rows.append({
            "size": w, "run": str(run), "slide": slide.id, "mode": name,
            "tiles": n_tiles, "prompts_per_tile": round(float(np.mean(n_prompts)), 1),
            "true_nuclei_per_tile": round(n_true / n_tiles, 1),
            "nuclei_hit": round(n_hit / max(n_true, 1), 4),
            "seconds": round(time.perf_counter() - t0, 1),
        })  # fmt: skip
    grid = rows[0]["prompts_per_tile"]
    for r in rows:
        r["fewer_than_grid"] = round(grid / max(r["prompts_per_tile"], 1e-9), 2)
    record("sam_prompts", rows)


if __name__ == "__main__":
    main()
