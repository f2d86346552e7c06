"""Region-read speed of `immunocto.io.open_slide` against tifffile used directly.

For each slide given, the same random regions (level 0, `--size` px square) are read three
ways, in the same run:

- `immunocto`: `open_slide(path).read_region(x, y, w, h)`;
- `tifffile zarr` (named baseline): tifffile's zarr view of level 0, sliced — the lowest-level
  lazy read tifffile offers, so the ratio is immunocto's overhead;
- `tifffile full` (naive baseline): decode the whole level-0 image once, then slice.

    python benchmarks/io_read.py ../shared/data/cmu_small_region.svs \
        ../shared/data/instanseg_he_example.ome.tif --reads 200 --size 512

MB/s counts decoded output bytes. Results are printed and appended to
benchmarks/results/io_read.jsonl.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
import zarr

from _results import record
from immunocto.io import open_slide


def regions(width: int, height: int, size: int, n: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [
        (int(rng.integers(0, max(width - size, 1))), int(rng.integers(0, max(height - size, 1))))
        for _ in range(n)
    ]


def bench(path: Path, reads: int, size: int, seed: int) -> dict:
    with open_slide(path) as slide:
        w, h = min(size, slide.width), min(size, slide.height)
        boxes = regions(slide.width, slide.height, size, reads, seed)
        slide.read_region(0, 0, 16, 16)  # open the level once
        t0 = time.perf_counter()
        nbytes = 0
        for x, y in boxes:
            nbytes += slide.read_region(x, y, w, h).nbytes
        t_ours = time.perf_counter() - t0
        kind, shape = slide.kind, slide.shape

    with tifffile.TiffFile(path) as tif:
        store = tif.series[0].aszarr(level=0)
        arr = zarr.open_array(store, mode="r")
        t0 = time.perf_counter()
        for x, y in boxes:
            np.asarray(arr[y : y + h, x : x + w])
        t_zarr = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = tif.series[0].levels[0].asarray()
        for x, y in boxes:
            np.ascontiguousarray(full[y : y + h, x : x + w])
        t_full = time.perf_counter() - t0
    mb = nbytes / 2**20
    return {
        "file": path.name,
        "kind": kind,
        "shape": list(shape),
        "reads": reads,
        "region_px": [h, w],
        "immunocto_mb_s": round(mb / t_ours, 1),
        "tifffile_zarr_mb_s": round(mb / t_zarr, 1),
        "tifffile_full_decode_mb_s": round(mb / t_full, 1),
        "ratio_vs_tifffile_zarr": round(t_zarr / t_ours, 2),
        "ratio_vs_full_decode": round(t_full / t_ours, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [bench(p, args.reads, args.size, args.seed) for p in args.paths]
    record("io_read", rows)


if __name__ == "__main__":
    main()
