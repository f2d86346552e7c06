"""Cell-database throughput: build (cells/s), store layout (bytes/cell, reads/s), training reads.

On a gated run (`--run`, or one simulated at `--size`, segmented, quantified and gated here):

1. build: `build_db` from scratch with IF crops and H&E-only, against the notebook baseline of
   one `read_region` per cell (64 x 64 H&E + mask) on the first `--baseline-cells` cells;
2. layout: the built H&E crops repeated to `--rows` rows, written with each candidate
   chunking/codec; bytes per crop, whole-chunk reads/s (what training uses) and random
   batches of 256 through `get_orthogonal_selection` (what evaluation uses);
3. training reads: `ShuffledCrops` through a `DataLoader` at batch 256 (0 and 2 workers,
   H&E-only and with IF) against the per-item map-style baseline (a `Dataset` whose
   `__getitem__` reads one crop, shuffled `DataLoader(batch_size=256)`).

    python benchmarks/db_read.py --run /tmp/sim4k
    python benchmarks/db_read.py --size 4096 --rows 65536
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset
from zarr.codecs import BloscCodec, ZstdCodec

from _results import record
from immunocto.config import load_config
from immunocto.db import CropStore, build_db, read_index, store_path
from immunocto.db.datasets import ShuffledCrops
from immunocto.io import open_slide
from immunocto.segment.stage import mask_path
from immunocto.simulate.dataset import simulate_dataset


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def bench_build(cfg, n_base: int) -> list[dict]:
    rows = []
    for with_if in (True, False):
        t0 = time.perf_counter()
        results = build_db(cfg, labels="gate", with_if=with_if, rebuild=True)
        dt = time.perf_counter() - t0
        n = sum(r.cells for r in results)
        size = dir_bytes(store_path(cfg.run_dir))
        rows.append({"part": "build", "what": f"immunocto build-db{' (+IF)' if with_if else ''}", "cells": n,
                     "seconds": round(dt, 2), "cells_per_s": round(n / dt), "bytes_per_cell": round(size / n)})  # fmt: skip
    # baseline: one read_region per cell (H&E + its mask), as a notebook would
    index = read_index(cfg.run_dir)[0].to_pandas()
    slide = cfg.slides[0]
    part = index[index["slide_id"] == slide.id].head(n_base)
    mask = zarr.open_array(str(mask_path(cfg, slide.id)), mode="r")
    t0 = time.perf_counter()
    with open_slide(cfg.resolve(slide.he), mpp=slide.mpp) as he:
        for r in part.itertuples():
            cx, cy = round(r.x), round(r.y)
            he.read_region(cx - 32, cy - 32, 64, 64)
            _ = np.asarray(mask[max(cy - 32, 0) : cy + 32, max(cx - 32, 0) : cx + 32]) == r.cell_id
    dt = time.perf_counter() - t0
    rows.append({"part": "build", "what": "baseline: read_region per cell (H&E + mask, no write)", "cells": len(part),
                 "seconds": round(dt, 2), "cells_per_s": round(len(part) / dt)})  # fmt: skip
    ours = next(r for r in rows if r["what"] == "immunocto build-db")
    ours["vs_baseline"] = round(ours["cells_per_s"] / rows[-1]["cells_per_s"], 1)
    return rows


LAYOUTS = [
    ("chunk 256, zstd 3 (ours)", 256, ZstdCodec(level=3)),
    ("chunk 256, zstd 1", 256, ZstdCodec(level=1)),
    ("chunk 256, blosc-lz4", 256, BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")),
    ("chunk 256, none", 256, None),
    ("chunk 64, zstd 3", 64, ZstdCodec(level=3)),
    ("chunk 1024, zstd 3", 1024, ZstdCodec(level=3)),
    ("chunk 1, zstd 3", 1, ZstdCodec(level=3)),
]


def bench_layouts(run: Path, n_rows: int, tmp: Path) -> list[dict]:
    store = CropStore.open_readonly(store_path(run))
    index = read_index(run)[0]
    base = store.he.get_orthogonal_selection((np.sort(index.column("row").to_numpy()),))
    data = np.concatenate([base] * (-(-n_rows // len(base))))[:n_rows]
    rng = np.random.default_rng(0)
    rows = []
    for name, chunk, codec in LAYOUTS:
        path = tmp / "layout.zarr"
        shutil.rmtree(path, ignore_errors=True)
        arr = zarr.create_array(
            store=str(path),
            shape=data.shape,
            dtype=np.uint8,
            chunks=(chunk, 64, 64, 3),
            compressors=codec,
        )
        t0 = time.perf_counter()
        arr[:] = data
        write = time.perf_counter() - t0
        step = max(chunk, 256)
        t0 = time.perf_counter()
        n = 0
        for k in rng.permutation(n_rows // step)[:64]:
            n += len(arr[k * step : (k + 1) * step])
        seq = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        m = 0
        while time.perf_counter() - t0 < 2.0:
            m += len(
                arr.get_orthogonal_selection((np.sort(rng.choice(n_rows, 256, replace=False)),))
            )
        rand = m / (time.perf_counter() - t0)
        rows.append({"part": "layout", "what": name, "rows": n_rows, "bytes_per_crop": round(dir_bytes(path) / n_rows),
                     "write_crops_per_s": round(n_rows / write), "chunk_read_crops_per_s": round(seq),
                     "random_batch_crops_per_s": round(rand)})  # fmt: skip
    return rows


class PerItem(Dataset):
    """Baseline: one zarr read per crop (a plain map-style dataset)."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.rows = np.sort(read_index(run)[0].column("row").to_numpy())
        self.store = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        if self.store is None:
            self.store = CropStore.open_readonly(store_path(self.run))
        r = int(self.rows[i])
        return {
            "he": torch.from_numpy(self.store.he[r]).permute(2, 0, 1),
            "mask": torch.from_numpy(self.store.mask[r]),
        }


def _rate(loader, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in loader:
            n += len(b["he"])
            if time.perf_counter() - t0 >= seconds:
                break
    return n / (time.perf_counter() - t0)


def bench_loaders(run: Path, seconds: float) -> list[dict]:
    rows = []
    base = _rate(
        DataLoader(
            PerItem(run), batch_size=256, shuffle=True, num_workers=2, persistent_workers=True
        ),
        seconds,
    )
    rows.append(
        {
            "part": "dataloader",
            "what": "baseline: per-item zarr reads, DataLoader(batch 256, 2 workers)",
            "crops_per_s": round(base),
        }
    )
    for with_if in (False, True):
        for workers in (0, 2):
            ds = ShuffledCrops(run, split=None, with_if=with_if, batch_size=256)
            loader = DataLoader(
                ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0
            )
            rate = _rate(loader, seconds)
            rows.append({"part": "dataloader", "what": f"ShuffledCrops batch 256{' +IF' if with_if else ''}, {workers} workers",
                         "crops_per_s": round(rate), "vs_baseline": round(rate / base, 1)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--run", type=Path, help="An existing gated run folder (its crop store is rebuilt)."
    )
    ap.add_argument("--size", type=int, default=4096, help="Slide size to simulate when no --run.")
    ap.add_argument("--rows", type=int, default=65536, help="Rows of the layout comparison.")
    ap.add_argument("--baseline-cells", type=int, default=1000)
    ap.add_argument(
        "--seconds", type=float, default=8.0, help="Seconds per DataLoader measurement."
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="immunocto-db-bench-"))
    try:
        run = args.run
        if run is None:
            run = tmp / "run"
            simulate_dataset(run, size=args.size, slides=1, seed=3)
        cfg = load_config(run)
        rows = bench_build(cfg, args.baseline_cells)
        rows += bench_layouts(run, args.rows, tmp)
        build_db(
            cfg, labels="gate", with_if=True, rebuild=True
        )  # the store with IF, for the loaders
        rows += bench_loaders(run, args.seconds)
        record("db_read", rows, extra={"run": str(run), "cpus": os.cpu_count()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
