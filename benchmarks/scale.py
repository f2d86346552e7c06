"""Segment + quantify at slide scale: wall time and peak memory against slide area, and the
speed-up from 1 to 2 workers (local processes, and a Dask LocalCluster).

For each `--sizes` edge: simulate one slide pair (not timed), then run segment + quantify
with each `--modes` entry on a fresh copy of the run folder. Peak memory is the summed RSS
of this process and all its children (Dask workers included), sampled every 0.2 s.
Expect: time linear in area, memory flat (tiles are processed a few at a time).

    python benchmarks/scale.py --sizes 4096 8192 --modes local1 local2 dask2
    python benchmarks/scale.py --sizes 16384 32768 --modes dask2     # ~1 h, ~45 GB disk
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

from _results import record
from immunocto.config import load_config
from immunocto.quantify.stage import run_quantify
from immunocto.segment.stage import run_segment
from immunocto.simulate.dataset import simulate_dataset


class PeakRSS:
    """Peak summed RSS (bytes) of this process tree while in the ``with`` block."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_mode(run: Path, mode: str) -> tuple[float, int, int]:
    from immunocto._parallel import use_dask

    cfg = load_config(run)
    workers = int(mode[-1])
    cfg.segmentation.workers = workers
    cfg.quantification.workers = workers
    with PeakRSS() as mem:
        if mode.startswith("dask"):
            from distributed import Client, LocalCluster

            with (
                LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cl,
                Client(cl) as client,
                use_dask(client),
            ):
                t0 = time.perf_counter()
                seg = run_segment(cfg, force=True)
                run_quantify(cfg)
                seconds = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            seg = run_segment(cfg, force=True)
            run_quantify(cfg)
            seconds = time.perf_counter() - t0
    return seconds, mem.peak, seg[0].n_cells


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--modes", nargs="+", default=["local1", "local2", "dask2"])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    for size in args.sizes:
        src = work / f"sim{size}"
        if not (src / "immunocto.yaml").exists():
            simulate_dataset(src, size=size, slides=1, seed=args.seed, workers=2)
        base = None
        for mode in args.modes:
            run = work / f"run{size}-{mode}"
            shutil.rmtree(run, ignore_errors=True)
            # Slides and truth are read only: link them (a 32k² pair is ~35 GB) and copy the rest.
            shutil.copytree(
                src,
                run,
                ignore=shutil.ignore_patterns(
                    "cells", "masks", "registration", "slides", "truth", "preview"
                ),
            )
            for sub in ("slides", "truth"):
                if (src / sub).exists():
                    (run / sub).symlink_to((src / sub).resolve(), target_is_directory=True)
            seconds, peak, cells = run_mode(run, mode)
            base = base or seconds
            rows.append({"size": size, "megapixels": round(size * size / 1e6, 1), "mode": mode,
                         "seconds": round(seconds, 1), "mp_per_s": round(size * size / 1e6 / seconds, 2),
                         "peak_rss_mb": round(peak / 2**20), "cells": cells,
                         "speedup_vs_first_mode": round(base / seconds, 2)})  # fmt: skip
            print(rows[-1], flush=True)
            shutil.rmtree(run, ignore_errors=True)
    record("scale", rows, echo=False)


if __name__ == "__main__":
    main()
