"""Quantification speed against skimage's regionprops (what MCMICRO's mcquant uses).

On a simulated slide (`--size`, or an existing segmented `--run`), the whole `immunocto quantify`
stage is timed (IO, mask mapping into IF space, statistics; all tissue tiles). Then, on
`--tiles` of its tiles, the same inputs (IF-space labels + 19 raw channels) are fed to:

- `immunocto`: `cell_intensity_stats` with all 8 statistics, and with the mean only;
- baseline, as MCMICRO's mcquant does it: `regionprops_table(labels, intensity_image=channel,
  properties=("label", "intensity_mean"))` once per channel;
- the same with the 19-channel image in one call (skimage's fastest use);
- ceiling: a plain numpy sum over the same pixels (memory-bound).

Ratios are times over the same tiles in the same run. Bytes/s count the 19 x uint16 pixels.

    python benchmarks/quantify_speed.py --size 16384 --tiles 12
    python benchmarks/quantify_speed.py --run /tmp/sim --tiles 12
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage.measure import regionprops_table

from _results import record
from immunocto.config import load_config
from immunocto.io.tiling import make_tiles, tile_of
from immunocto.quantify import cell_intensity_stats, run_quantify
from immunocto.quantify.stage import QuantifyOpener
from immunocto.quantify.tiles import tile_inputs
from immunocto.register import run_register
from immunocto.segment import run_segment
from immunocto.segment.stage import cells_path, mask_path
from immunocto.simulate.dataset import simulate_dataset


def prepared(cfg, slide, tiles, ids, xs, ys):
    """(labels, IF box, cell ids) of each tile, as the quantify stage builds them."""
    ctx = QuantifyOpener.for_slide(cfg, slide).open()
    owner = tile_of(tiles, xs, ys)
    out = [(*tile_inputs(ctx, t), ids[owner == t.id]) for t in tiles]
    ctx.if_.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--tiles", type=int, default=12, help="tiles for the per-method comparison")
    args = parser.parse_args()
    run = args.run or Path(tempfile.mkdtemp(prefix="bench-quant-")) / "run"
    if args.run is None:
        simulate_dataset(run, size=args.size, slides=1, seed=args.seed)
    cfg = load_config(run)
    run_register(cfg)
    run_segment(cfg)
    t0 = time.perf_counter()
    res = run_quantify(cfg, force=True)[0]
    stage_s = time.perf_counter() - t0
    slide = cfg.slides[0]

    import pyarrow.parquet as pq

    table = pq.read_table(cells_path(cfg, slide.id), columns=["cell_id", "x", "y"]).to_pandas()
    import zarr

    shape = zarr.open_array(str(mask_path(cfg, slide.id)), mode="r").shape
    tiles = make_tiles(
        shape[1], shape[0], tile=cfg.quantification.tile_px, halo=cfg.quantification.halo_px
    )
    owner = tile_of(tiles, table["x"].to_numpy(), table["y"].to_numpy())
    busy = sorted(tiles, key=lambda t: -np.sum(owner == t.id))[: args.tiles]
    inputs = prepared(
        cfg, slide, busy, table["cell_id"].to_numpy(), table["x"].to_numpy(), table["y"].to_numpy()
    )
    nbytes = sum(b.nbytes for _, b, _ in inputs)
    n_cells = sum(len(c) for _, _, c in inputs)

    def timed(fn) -> float:
        t = time.perf_counter()
        for labels, box, ids in inputs:
            fn(labels, box, ids)
        return time.perf_counter() - t

    t_all = timed(lambda lab, box, ids: cell_intensity_stats(lab, box, ids))
    t_mean = timed(cell_means_only)
    t_rp = timed(
        lambda lab, box, ids: regionprops_table(
            lab, intensity_image=np.moveaxis(box, 0, -1), properties=("label", "intensity_mean")
        )
    )
    # mcquant's way: one regionprops_table call per channel image
    t_rp_each = timed(
        lambda lab, box, ids: [
            regionprops_table(lab, intensity_image=ch, properties=("label", "intensity_mean"))
            for ch in box
        ]
    )
    t_sum = timed(lambda lab, box, ids: box.sum(axis=(1, 2)))
    row = {
        "size": args.size if args.run is None else None,
        "cells": res.n_cells,
        "stage_seconds": round(stage_s, 1),
        "stage_cells_per_s": round(res.n_cells / stage_s, 1),
        "tiles_compared": len(inputs),
        "cells_compared": n_cells,
        "immunocto_all_stats_s": round(t_all, 3),
        "immunocto_mean_only_s": round(t_mean, 3),
        "regionprops_all_channels_mean_s": round(t_rp, 3),
        "regionprops_per_channel_mean_s (mcquant)": round(t_rp_each, 3),
        "numpy_sum_s": round(t_sum, 3),
        "speedup_mean_vs_mcquant_regionprops": round(t_rp_each / t_mean, 1),
        "speedup_all_stats_vs_mcquant_regionprops": round(t_rp_each / t_all, 1),
        "speedup_mean_vs_multichannel_regionprops": round(t_rp / t_mean, 1),
        "immunocto_all_stats_MB_s": round(nbytes / 2**20 / t_all, 1),
        "numpy_sum_MB_s": round(nbytes / 2**20 / t_sum, 1),
    }
    record("quantify_speed", [row])


def cell_means_only(labels: np.ndarray, box: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The mean statistic alone, computed the way cell_intensity_stats does (bincount)."""
    flat = labels.ravel()
    inside = np.flatnonzero(flat)
    lab = flat[inside]
    counts = np.bincount(lab, minlength=int(flat.max()) + 1)
    vals = box.reshape(box.shape[0], -1)[:, inside]
    return np.stack(
        [np.bincount(lab, weights=v, minlength=len(counts)) for v in vals]
    ) / np.maximum(counts, 1)


if __name__ == "__main__":
    main()
