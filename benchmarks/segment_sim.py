"""Segmentation backends against the simulator's truth, and their speed.

Simulates a slide (or uses `--run`), registers it, runs each backend through
`immunocto segment`, and compares `RUN/masks/<slide>.zarr` with `truth/<slide>/nuclei.tif`:
recall/precision/F1 of centroids within 4 µm (the acceptance criterion), object Dice, AJI,
PQ, F1 at IoU >= 0.5, and megapixels per second of tissue-covering tiles.

    python benchmarks/segment_sim.py --size 4096 --seed 3 --backends if-nuclear he
    python benchmarks/segment_sim.py --size 1024 --mpp 1.0 --backends if-nuclear   # 20x-like
    python benchmarks/segment_sim.py --size 2048 --backends sam --sam-mode guided --sam-model vit_t \
        --sam-random-weights          # SAM plumbing and prompt counts (masks meaningless)

Results are printed and appended to benchmarks/results/segment_sim.jsonl.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tifffile
import zarr

from _results import record
from immunocto.config import load_config
from immunocto.register import run_register
from immunocto.segment import run_segment
from immunocto.simulate.dataset import simulate_dataset
from immunocto.validate import segmentation_report


def evaluate(run: Path, slide: str, mpp: float) -> dict:
    truth = tifffile.imread(run / "truth" / slide / "nuclei.tif")
    pred = np.asarray(zarr.open_array(str(run / "masks" / f"{slide}.zarr"), mode="r")[:])
    rep = segmentation_report(truth, pred, mpp=mpp, radius_um=4.0)
    return {
        "recall_4um": rep["detection_centroid_4um"]["recall"],
        "precision_4um": rep["detection_centroid_4um"]["precision"],
        "f1_4um": rep["detection_centroid_4um"]["f1"],
        "object_dice": rep["object_dice"],
        "aji": rep["aji"],
        "pq": rep["pq"],
        "f1_iou50": rep["detection_iou50"]["f1"],
        "n_truth": rep["n_truth"],
        "n_pred": rep["n_pred"],
        "objects_per_nucleus": objects_per_nucleus(truth, pred),
    }


def objects_per_nucleus(truth: np.ndarray, pred: np.ndarray) -> float:
    """Predicted centroids per true nucleus, over the true nuclei holding at least one."""
    from immunocto.validate import centroids

    _, pxy = centroids(pred)
    r = np.clip(np.rint(pxy[:, 1]).astype(int), 0, truth.shape[0] - 1)
    c = np.clip(np.rint(pxy[:, 0]).astype(int), 0, truth.shape[1] - 1)
    counts = np.bincount(truth[r, c][truth[r, c] > 0])
    counts = counts[counts > 0]
    return round(float(counts.mean()), 3) if len(counts) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--mpp", type=float, default=None, help="simulate at this µm/px (default 0.325)"
    )
    parser.add_argument("--artifacts", default="default")
    parser.add_argument("--run", type=Path, help="an existing simulated run folder")
    parser.add_argument("--backends", nargs="+", default=["if-nuclear", "he"])
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--sam-mode", default="guided")
    parser.add_argument("--sam-model", default="vit_h")
    parser.add_argument("--sam-checkpoint", type=Path)
    parser.add_argument("--sam-random-weights", action="store_true")
    args = parser.parse_args()

    run = args.run or Path(tempfile.mkdtemp(prefix="bench-seg-")) / "run"
    if args.run is None:
        simulate_dataset(
            run, size=args.size, slides=1, seed=args.seed, artifacts=args.artifacts, mpp=args.mpp
        )
    cfg = load_config(run)
    run_register(cfg)
    slide = cfg.slides[0]
    rows = []
    for name in args.backends:
        params = cfg.segmentation.model_copy(deep=True)
        params.workers = args.workers
        if name == "sam":
            params.sam = params.sam.model_copy(
                update={
                    "mode": args.sam_mode,
                    "model": args.sam_model,
                    "checkpoint": args.sam_checkpoint,
                    "random_weights": args.sam_random_weights,
                    "pred_iou_thresh": 0.0
                    if args.sam_random_weights
                    else params.sam.pred_iou_thresh,
                }
            )
        t0 = time.perf_counter()
        res = run_segment(cfg, backend=name, force=True, params=params)[0]
        seconds = time.perf_counter() - t0
        meta = pq.read_schema(res.cells).metadata
        n_tiles = len(
            np.unique(pq.read_table(res.cells, columns=["tile_id"]).column("tile_id").to_numpy())
        )
        row = {
            "backend": name if name != "sam" else f"sam-{args.sam_mode}-{args.sam_model}",
            "size": args.size if args.run is None else None,
            "seconds": round(seconds, 2),
            "tissue_megapixels_per_s": round(n_tiles * params.tile_px**2 / 1e6 / seconds, 3),
            **evaluate(run, slide.id, slide.mpp),
        }
        del meta
        rows.append(row)
    record("segment_sim", rows)


if __name__ == "__main__":
    main()
