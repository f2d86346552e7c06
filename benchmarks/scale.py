"""Segment + quantify at slide scale: wall time, MP/s, cells/s and peak memory against slide
area, from 1 to 2 workers (local processes, and a Dask LocalCluster), for this checkout and,
with `--compare REV`, for an older commit in the same invocation (so speed-ups are ratios from
one run on one machine).

For each `--sizes` edge: simulate one slide pair (not timed; reused from `--workdir`) and register
it once (timed on its own, one process: `register_s`), then run segment + quantify with each
`--modes` entry on a fresh copy of the run folder, each row in its own process
(`benchmarks/scale_row.py`) with `PYTHONPATH` set to the code under test: this checkout's `src`,
or a `git worktree` of REV. `seconds` is segment + quantify only. Memory: `client_peak_mb` is the
row process' own peak RSS (the client that schedules, gathers and writes), `all_peak_mb` the
summed RSS of it and all its children (pool or Dask workers), sampled every 0.2 s;
`this_speedup` (REV rows) is REV's seconds over this checkout's. Each row is appended to
`benchmarks/results/scale.jsonl` as soon as it is measured. Compare rows of one invocation
only: machines differ (the same code ran 2-3x slower on one session's machine than another's).

    python benchmarks/scale.py --sizes 4096 8192 --modes local1 local2 dask2
    python benchmarks/scale.py --sizes 4096 16384 --modes local1 dask2 --compare 66a9b92
    python benchmarks/scale.py --sizes 32768 --modes dask2 --workdir W   # ~1.5 h, ~40 GB disk
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from _results import print_table, record
from immunocto.config import load_config
from immunocto.register.stage import run_register
from immunocto.simulate.dataset import simulate_dataset

ROW = Path(__file__).with_name("scale_row.py")
REPO = Path(__file__).resolve().parents[1]


class PeakRSS:
    """Peak summed RSS (bytes) of process ``pid`` and all its children while in the block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            total = 0
            with contextlib.suppress(psutil.Error):
                for p in [root, *root.children(recursive=True)]:
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


def run_row(run: Path, mode: str, src: Path, script: Path = ROW) -> dict:
    """One mode on ``run`` in a fresh process (``script RUN MODE``, printing a JSON line that
    names the ``immunocto`` it imported) importing ``immunocto`` from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, str(script), str(run), mode]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    with PeakRSS(proc.pid) as mem:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} on {run} with {src} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    if Path(result["immunocto"]).resolve() != (src / "immunocto").resolve():
        raise SystemExit(f"imported {result['immunocto']}, not the code under test in {src}")
    return {**result, "all_peak_mb": mem.peak / 2**20}


@contextlib.contextmanager
def checkout(rev: str, work: Path):
    """A detached `git worktree` of ``rev`` (removed afterwards); yields its ``src``."""
    tree = work / f"worktree-{rev}"
    git = ["git", "-C", str(REPO), "worktree"]
    if tree.exists():
        subprocess.run([*git, "remove", "--force", str(tree)], check=False)
    subprocess.run([*git, "add", "--detach", str(tree), rev], check=True, capture_output=True)
    try:
        yield tree / "src"
    finally:
        subprocess.run([*git, "remove", "--force", str(tree)], check=False)


def fresh_run(src: Path, run: Path) -> None:
    """A copy of the registered run ``src`` without results; slides and truth are linked
    (read only; a 32k² pair is ~35 GB)."""
    shutil.rmtree(run, ignore_errors=True)
    skip = shutil.ignore_patterns("cells", "masks", "slides", "truth", "preview")
    shutil.copytree(src, run, ignore=skip)
    for sub in ("slides", "truth"):
        if (src / sub).exists():
            (run / sub).symlink_to((src / sub).resolve(), target_is_directory=True)


def measure_size(size: int, args: argparse.Namespace, work: Path, codes: dict[str, Path]) -> list:
    src = work / f"sim{size}"
    if not (src / "immunocto.yaml").exists():
        simulate_dataset(src, size=size, slides=1, seed=args.seed, workers=2)
    t0 = time.perf_counter()
    reg = run_register(load_config(src))  # cached when already registered
    register_s = round(time.perf_counter() - t0, 1) if reg[0].status == "registered" else None
    rows: list[dict] = []
    first: dict[str, float] = {}
    mp = size * size / 1e6
    for mode in args.modes:
        for code, code_src in codes.items():
            run = work / f"run{size}-{mode}"
            fresh_run(src, run)
            r = run_row(run, mode, code_src)
            shutil.rmtree(run, ignore_errors=True)
            seconds = r["segment_s"] + r["quantify_s"]
            first.setdefault(code, seconds)
            row = {"size": size, "megapixels": round(mp, 1), "mode": mode, "code": code,
                   "seconds": round(seconds, 1), "segment_s": round(r["segment_s"], 1),
                   "quantify_s": round(r["quantify_s"], 1), "register_s": register_s,
                   "mp_per_s": round(mp / seconds, 3), "cells": r["cells"],
                   "cells_per_s": round(r["cells"] / seconds), "s_per_mp": round(seconds / mp, 3),
                   "client_peak_mb": round(r["client_peak_mb"]),
                   "all_peak_mb": round(r["all_peak_mb"]),
                   "speedup_vs_first_mode": round(first[code] / seconds, 2)}  # fmt: skip
            if code != "this":
                mine = next(x for x in rows if x["mode"] == mode and x["code"] == "this")
                row["this_speedup"] = round(seconds / mine["seconds"], 2)
            rows.append(row)
            print(row, flush=True)
            record("scale", [row], echo=False)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--modes", nargs="+", default=["local1", "local2", "dask2"])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--compare", metavar="REV", help="also run every row with commit REV")
    ap.add_argument(
        "--drop-slides", action="store_true",
        help="delete each size's simulated pair after its rows (disk: a 32k² pair is ~35 GB)",
    )  # fmt: skip
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    with contextlib.ExitStack() as stack:
        codes = {"this": REPO / "src"}
        if args.compare:
            codes[args.compare] = stack.enter_context(checkout(args.compare, work))
        for size in args.sizes:
            rows += measure_size(size, args, work, codes)
            if args.drop_slides:
                shutil.rmtree(work / f"sim{size}" / "slides", ignore_errors=True)
    print_table(
        ["size", "mode", "code", "s", "segment s", "quantify s", "MP/s", "cells/s", "client MB",
         "all MB", "REV / this"],
        [[r["size"], r["mode"], r["code"], r["seconds"], r["segment_s"], r["quantify_s"],
          r["mp_per_s"], r["cells_per_s"], r["client_peak_mb"], r["all_peak_mb"],
          r.get("this_speedup", "")] for r in rows],
    )  # fmt: skip


if __name__ == "__main__":
    main()
