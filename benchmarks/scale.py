"""Segment + quantify at slide scale: wall time and peak memory against slide area, and the
speed-up from 1 to 2 workers (local processes, and a Dask LocalCluster).

For each `--sizes` edge: simulate one slide pair (not timed) and register it once (timed on
its own, one process: `register_s`), then run segment + quantify with each `--modes` entry on
a fresh copy of the run folder that keeps the registration, so `seconds` is segment + quantify
only (`segment_s` + `quantify_s`). Peak memory is the summed RSS of this process and all its
children (Dask workers included), sampled every 0.2 s. Each row is appended to
`benchmarks/results/scale.jsonl` as soon as it is measured. Compare rows of one invocation
only: machines differ (the same code ran 2-3x slower on one session's machine than another's).
Expect: time linear in area, memory flat (tiles are processed a few at a time).

    python benchmarks/scale.py --sizes 4096 8192 --modes local1 local2 dask2
    python benchmarks/scale.py --sizes 4096 8192 16384 --modes dask2 local1
    python benchmarks/scale.py --sizes 32768 --modes dask2 --workdir W   # ~1.5 h, ~40 GB disk
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
from immunocto.register.stage import run_register
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


def run_mode(run: Path, mode: str) -> tuple[float, float, int, int]:
    """``(segment_s, quantify_s, peak_rss_bytes, cells)`` of one mode on ``run``."""
    from immunocto._parallel import use_dask
    from immunocto.pipeline.run import dask_cluster

    cfg = load_config(run)
    workers = int(mode[-1])
    cfg.segmentation.workers = workers
    cfg.quantification.workers = workers
    # the LocalCluster `immunocto run` starts; local modes run without Dask
    dask = dask_cluster(workers, None) if mode.startswith("dask") else contextlib.nullcontext()
    with PeakRSS() as mem, dask as client, use_dask(client):
        seg_s, quant_s, cells = _segment_quantify(cfg)
    return seg_s, quant_s, mem.peak, cells


def _segment_quantify(cfg) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    seg = run_segment(cfg, force=True)
    t1 = time.perf_counter()
    run_quantify(cfg)
    return t1 - t0, time.perf_counter() - t1, seg[0].n_cells


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--modes", nargs="+", default=["local1", "local2", "dask2"])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument(
        "--drop-slides", action="store_true",
        help="delete each size's simulated pair after its rows (disk: a 32k² pair is ~35 GB)",
    )  # fmt: skip
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    for size in args.sizes:
        src = work / f"sim{size}"
        if not (src / "immunocto.yaml").exists():
            simulate_dataset(src, size=size, slides=1, seed=args.seed, workers=2)
        t0 = time.perf_counter()
        reg = run_register(load_config(src))  # cached when already registered
        register_s = round(time.perf_counter() - t0, 1) if reg[0].status == "registered" else None
        base = None
        for mode in args.modes:
            run = work / f"run{size}-{mode}"
            shutil.rmtree(run, ignore_errors=True)
            # Slides and truth are read only: link them (a 32k² pair is ~35 GB) and copy the rest.
            shutil.copytree(
                src,
                run,
                ignore=shutil.ignore_patterns("cells", "masks", "slides", "truth", "preview"),
            )
            for sub in ("slides", "truth"):
                if (src / sub).exists():
                    (run / sub).symlink_to((src / sub).resolve(), target_is_directory=True)
            seg_s, quant_s, peak, cells = run_mode(run, mode)
            seconds = seg_s + quant_s
            base = base or seconds
            row = {"size": size, "megapixels": round(size * size / 1e6, 1), "mode": mode,
                   "seconds": round(seconds, 1), "segment_s": round(seg_s, 1),
                   "quantify_s": round(quant_s, 1), "register_s": register_s,
                   "mp_per_s": round(size * size / 1e6 / seconds, 2),
                   "peak_rss_mb": round(peak / 2**20), "cells": cells,
                   "speedup_vs_first_mode": round(base / seconds, 2)}  # fmt: skip
            print(row, flush=True)
            record("scale", [row], echo=False)
            shutil.rmtree(run, ignore_errors=True)
        if args.drop_slides:
            shutil.rmtree(src / "slides", ignore_errors=True)


if __name__ == "__main__":
    main()
