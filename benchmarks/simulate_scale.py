"""Wall time and peak memory of `immunocto simulate` against slide size.

Each size runs `immunocto simulate` in a fresh process; the peak resident memory of the
whole process tree (the command and its render workers, summed) is sampled from /proc every
0.1 s. The named baseline is the same command with one worker (`--workers 1`), run in the
same session, so the speed-up ratio is measured, not assumed.

    python benchmarks/simulate_scale.py --sizes 2048 4096 16384 --workers 2
    python benchmarks/simulate_scale.py --sizes 4096 --baseline      # also run --workers 1

Results are printed as a table and appended to benchmarks/results/simulate_scale.jsonl.
Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _results import record


def tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over ``root`` and all its descendants."""
    total = 0
    stack = [root]
    seen = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    stack.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_once(size: int, workers: int, seed: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-sim-{size}-"))
    cmd = [
        sys.executable, "-m", "immunocto", "simulate", str(out / "run"),
        "--size", str(size), "--seed", str(seed), "--workers", str(workers),
    ]  # fmt: skip
    peak = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_bytes(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"simulate --size {size} failed:\n{err}")
    slide_bytes = sum(p.stat().st_size for p in (out / "run" / "slides").rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "size": size,
        "workers": workers,
        "seconds": round(wall, 2),
        "megapixels_per_s": round(size * size / 1e6 / wall, 3),
        "peak_rss_mb": round(peak / 2**20, 1),
        "slide_files_mb": round(slide_bytes / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[2048, 4096], help="slide edges in px"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--baseline", action="store_true", help="also run each size with --workers 1"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        row = run_once(size, args.workers, args.seed)
        if args.baseline and args.workers > 1:
            base = run_once(size, 1, args.seed)
            row["baseline_1_worker_s"] = base["seconds"]
            row["speedup_vs_1_worker"] = round(base["seconds"] / row["seconds"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    header = f"{'size':>7} {'workers':>7} {'seconds':>8} {'MP/s':>6} {'peak MB':>8} {'files MB':>9} {'x vs 1w':>8}"
    print(header)
    for r in rows:
        print(
            f"{r['size']:>7} {r['workers']:>7} {r['seconds']:>8} {r['megapixels_per_s']:>6} "
            f"{r['peak_rss_mb']:>8} {r['slide_files_mb']:>9} {r.get('speedup_vs_1_worker', '-'):>8}"
        )
    record(
        "simulate_scale",
        rows,
        extra={"cpus": os.cpu_count(), "machine": platform.machine()},
        echo=False,
    )


if __name__ == "__main__":
    main()
