"""Gate labels against the simulator's truth, per class, for default and harsh artifacts.

For each artifact preset: simulate, register, segment (if-nuclear), quantify, gate (with the
sensitivity sweep), then match cells to true cells within 4 µm (one-to-one) and report, for
cd4_t, cd8_t, b_cell, macrophage and other, the precision (of the matched cells given that
label, the share whose true class agrees) and recall (of the matched true cells of that
class, the share given that label). Unmatched segmentation candidates are left out, as the
acceptance criterion says.

    python benchmarks/gate_sim.py --size 4096 --seed 3 --artifacts default harsh
    python benchmarks/gate_sim.py --run /tmp/sim         # an existing, already gated run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from _results import record
from immunocto.config import load_config
from immunocto.conventions import CLASSES
from immunocto.phenotype import run_gate
from immunocto.quantify import run_quantify
from immunocto.register import run_register
from immunocto.segment import run_segment
from immunocto.simulate.dataset import simulate_dataset
from immunocto.validate import match_points


def evaluate(run: Path, slide: str = "sim000") -> dict:
    cfg = load_config(run)
    mpp = cfg.slides[0].mpp
    cells = pq.read_table(
        run / "cells" / f"{slide}.parquet", columns=["x", "y", "gate_label", "gate_stability"]
    ).to_pandas()
    truth = pq.read_table(
        run / "truth" / slide / "cells.parquet", columns=["x", "y", "class"]
    ).to_pandas()
    ti, pi = match_points(
        truth[["x", "y"]].to_numpy() * mpp, cells[["x", "y"]].to_numpy() * mpp, 4.0
    )
    label = cells["gate_label"].to_numpy()[pi]
    true = truth["class"].to_numpy()[ti]
    out = {"matched": len(ti), "ambiguous": round(float(np.mean(label == "ambiguous")), 4)}
    for c in CLASSES:
        given = label == c
        out[f"{c}_precision"] = round(float(np.mean(true[given] == c)), 4) if given.any() else None
        out[f"{c}_recall"] = (
            round(float(np.mean(label[true == c] == c)), 4) if (true == c).any() else None
        )
    if "gate_stability" in cells:
        out["mean_stability"] = round(float(cells["gate_stability"].mean()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--artifacts", nargs="+", default=["default", "harsh"])
    parser.add_argument("--run", type=Path)
    parser.add_argument(
        "--backends", nargs="+", default=["auto"],
        help="segmentation backends to gate after, each on the same slide (e.g. if-nuclear if-learned)",
    )  # fmt: skip
    args = parser.parse_args()
    rows = []
    if args.run:
        rows.append({"run": str(args.run), **evaluate(args.run)})
    for preset in [] if args.run else args.artifacts:
        run = Path(tempfile.mkdtemp(prefix=f"bench-gate-{preset}-")) / "run"
        t0 = time.perf_counter()
        simulate_dataset(run, size=args.size, slides=1, seed=args.seed, artifacts=preset)
        cfg = load_config(run)
        run_register(cfg)
        for backend in args.backends:
            run_segment(cfg, backend=None if backend == "auto" else backend, force=True)
            run_quantify(cfg)
            run_gate(cfg, with_sensitivity=True)
            rows.append({
                "artifacts": preset, "size": args.size, "seed": args.seed, "backend": backend,
                "seconds": round(time.perf_counter() - t0, 1), **evaluate(run),
            })  # fmt: skip
            t0 = time.perf_counter()
    record("gate_sim", rows)


if __name__ == "__main__":
    main()
