"""A custom one-marker panel (Ki67) through `immunocto run`, next to a naive pipeline.

For each pixel size (the same 665 µm of simulated tissue rendered at 0.25, 0.5 and 1 µm/px;
tumour nuclei are ~12 µm, lymphocytes ~7 µm), the simulated slide pair is run with a Ki67
gating tree and the IF pixel size set in the config, `--until gate`. The project's Ki67+ calls
are scored against the simulator's truth (a cell is Ki67+ when its true expression is > 0.2;
negatives sit at ~0.015) next to the naive pipeline a user would write first: a DAPI watershed
on the IF's nuclear channel, the per-nucleus mean of Ki67, Otsu on its log. Both are matched
to the true nuclei within 4 µm (the project in the H&E frame, the naive one in the IF frame,
each against the truth in its frame).

    python benchmarks/panel_sim.py --mpps 0.25 0.5 1.0 --extent-um 665 --seed 5

Rows: mpp, method, Ki67+ precision / recall / F1, cells found, objects per true nucleus. The
project runs with its default IF segmentation (`if-learned`, the fluorescence nucleus network;
trained on other simulated slides, seed 101), with the classical `if-nuclear` (nucleus size
`auto`), and with its former settings (classical, fixed 10 µm nucleus lengths, Ki67 gated on
the membrane ring), to show what the network, the nucleus size and the compartment add.
Printed and appended to benchmarks/results/panel_sim.jsonl.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from _results import record
from immunocto.io import open_slide
from immunocto.pipeline import run_pipeline
from immunocto.simulate.dataset import simulate_dataset
from immunocto.validate import match_points
from segment_real import naive_dapi_watershed

KI67_TREE = {
    "name": "proliferation",
    "nodes": [
        {"name": "ki67_pos", "parent": "root", "rule": {"pos": ["Ki67"]}, "label": "ki67_pos"},
        {"name": "ki67_neg", "parent": "root", "rule": {"neg": ["Ki67"]}, "label": "ki67_neg"},
    ],
}
TRUE_POSITIVE_LEVEL = 0.2


def ki67_scores(truth_xy, truth_pos, pred_xy, pred_pos, radius_px) -> dict:
    """Ki67+ precision / recall / F1: a true positive is a Ki67+ nucleus matched one-to-one
    (within ``radius_px``) to a cell called Ki67+."""
    ti, pi = match_points(truth_xy, pred_xy, radius=radius_px)
    tp = int(np.sum(truth_pos[ti] & pred_pos[pi]))
    fp = int(pred_pos.sum()) - tp
    fn = int(truth_pos.sum()) - tp
    return {
        "ki67_precision": round(tp / max(tp + fp, 1), 4),
        "ki67_recall": round(tp / max(tp + fn, 1), 4),
        "ki67_f1": round(2 * tp / max(2 * tp + fp + fn, 1), 4),
        "cells": len(pred_xy),
        "cells_matched": len(ti),
        "true_nuclei": len(truth_xy),
    }


def naive_pipeline(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """DAPI watershed in the IF frame, mean Ki67 per nucleus, Otsu on log: (xy, positive)."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    s = open_slide(run / "slides/sim000/if.ome.tif", markers=run / "slides/sim000/markers.csv")
    with s:
        names = list(s.channel_names)
        data = s.read_level(0)
    dapi, ki67 = data[names.index("Hoechst")], data[names.index("Ki67")].astype(np.float64)
    labels = naive_dapi_watershed(dapi, s.mpp)
    ids = np.arange(1, labels.max() + 1)
    mean = np.asarray(ndi.mean(ki67, labels, ids))
    xy = np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids))[:, ::-1]
    logv = np.log(np.maximum(mean, 1e-3))
    return xy, logv > threshold_otsu(logv)


def one_size(mpp: float, extent_um: float, seed: int, workdir: Path) -> list[dict]:
    size = round(extent_um / mpp / 16) * 16
    run = workdir / f"mpp{mpp:g}"
    simulate_dataset(run, size=size, slides=1, seed=seed, mpp=mpp, force=True)
    (run / "ki67.yaml").write_text(yaml.safe_dump(KI67_TREE))
    cfg = yaml.safe_load((run / "immunocto.yaml").read_text())
    cfg["slides"][0]["if_mpp"] = mpp
    cfg["gating"] = {"tree": "ki67.yaml"}
    (run / "immunocto.yaml").write_text(yaml.safe_dump(cfg))

    truth = pq.read_table(run / "truth/sim000/cells.parquet").to_pandas()
    truth = truth[truth["nucleus_area_px"] > 0]
    truth_pos = truth["expr_Ki67"].to_numpy() > TRUE_POSITIVE_LEVEL
    radius = 4.0 / mpp
    rows = []

    import tifffile
    import zarr

    from segment_sim import objects_per_nucleus

    nuclei = tifffile.imread(run / "truth/sim000/nuclei.tif")
    variants = {
        "immunocto run --until gate (Ki67 tree; default: if-learned)": {},
        "immunocto, --backend if-nuclear (classical, auto nucleus size)": {
            "segmentation": {"backend": "if-nuclear"},
        },
        "immunocto, former settings (fixed 10 µm nuclei, Ki67 on ring)": {
            "segmentation": {"backend": "if-nuclear", "nucleus_diameter_um": 10.0},
            "gating": {"tree": "ki67.yaml", "nuclear_feature": "ring"},
        },
    }
    for name, overrides in variants.items():
        conf = {**cfg, **overrides}
        (run / "immunocto.yaml").write_text(yaml.safe_dump(conf))
        t0 = time.perf_counter()
        summary = run_pipeline(run / "immunocto.yaml", workers=1, until="gate")
        seconds = time.perf_counter() - t0
        cells = pq.read_table(run / "cells/sim000.parquet").to_pandas()
        mask = np.asarray(zarr.open_array(str(run / "masks/sim000.zarr"), mode="r")[:])
        rows.append({
            "mpp": mpp, "method": name,
            **ki67_scores(truth[["x", "y"]].to_numpy(), truth_pos, cells[["x", "y"]].to_numpy(),
                          cells["gate_label"].to_numpy() == "ki67_pos", radius),
            "objects_per_nucleus": objects_per_nucleus(nuclei, mask),
            "backend": summary.stages["segment"].get("backend"), "seconds": round(seconds, 1),
        })  # fmt: skip

    t0 = time.perf_counter()
    xy, pos = naive_pipeline(run)
    seconds = time.perf_counter() - t0
    rows.append({
        "mpp": mpp, "method": "naive (DAPI watershed, mean Ki67, Otsu on log)",
        **ki67_scores(truth[["if_x", "if_y"]].to_numpy(), truth_pos, xy, pos, radius),
        "seconds": round(seconds, 1),
    })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mpps", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--extent-um", type=float, default=665.0, help="tissue edge in µm")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-panel-"))
    rows = []
    for mpp in args.mpps:
        rows.extend(one_size(mpp, args.extent_um, args.seed, workdir))
    record("panel_sim", rows)


if __name__ == "__main__":
    main()
