"""V1 against the simulator's truth: does expansion beat gating alone?

Simulates `--slides` slides (3 by default: the patient split gives one each to train,
validation and test), runs register -> segment -> quantify -> gate -> build-db, then trains the
bootstrap classifier and expands twice:

- **truth-corrected V0**: a stratified sample of `--v0` gate-labelled cells (equal per gate
  class) of the train and validation slides whose labels are replaced by the truth (a perfect
  reviewer stand-in), written as `review_label`; `train --labels review`;
- **noisy V0**: the raw gate labels of every stored cell; `train --labels gate`.

Each trained model expands under both V1 rules (`--rules`): `expand` (the default: V0 kept,
confident conflicts ambiguous, additions only with the cell's own IF support) and `model`
(Immunocto's rule: the classifier's call wherever p >= min_prob), see immunocto.models.v1.

Cells are matched to true cells within 4 µm (one-to-one). For gate_label and each V1 it reports
per-class precision and recall, the number of true immune cells given their correct immune
label ("covered") and its ratio to the gate's, and the share of true immune cells the gate
left ambiguous; on all slides and on the test slide alone (never used for training).
Target: V1 precision >= gate precision for every class with >= 1.5x the covered immune cells.

    python benchmarks/expand_sim.py --size 4096 --seed 3 --arch small
    python benchmarks/expand_sim.py --size 4096 --seed 3 --artifacts weak-stain
    python benchmarks/expand_sim.py --run /tmp/bench-expand   # reuse a gated run with a store
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from _results import record
from immunocto.config import load_config
from immunocto.conventions import CLASSES
from immunocto.db import build_db, read_index
from immunocto.models.expand import run_expand
from immunocto.models.train import train_bootstrap
from immunocto.phenotype import run_gate
from immunocto.simulate.dataset import simulate_dataset
from immunocto.validate import match_points

IMMUNE = ("cd4_t", "cd8_t", "b_cell", "macrophage")


def matched(run: Path, cfg, slide: str) -> pd.DataFrame:
    """The slide's cells matched to true cells: cell columns + ``true``."""
    cells = pq.read_table(run / "cells" / f"{slide}.parquet").to_pandas()
    truth = pq.read_table(
        run / "truth" / slide / "cells.parquet", columns=["x", "y", "class"]
    ).to_pandas()
    mpp = cfg.slides[0].mpp
    ti, pi = match_points(
        truth[["x", "y"]].to_numpy() * mpp, cells[["x", "y"]].to_numpy() * mpp, 4.0
    )
    out = cells.iloc[pi].reset_index(drop=True)
    out["true"] = truth["class"].to_numpy()[ti]
    return out


def scores(df: pd.DataFrame, column: str, gate_covered: int | None = None) -> dict:
    label, true = df[column].to_numpy(), df["true"].to_numpy()
    out = {}
    for c in CLASSES:
        given = label == c
        out[f"{c}_precision"] = round(float(np.mean(true[given] == c)), 4) if given.any() else None
        out[f"{c}_recall"] = (
            round(float(np.mean(label[true == c] == c)), 4) if (true == c).any() else None
        )
    out["immune_covered"] = int(np.sum((label == true) & np.isin(true, IMMUNE)))
    out["labelled"] = int(np.isin(label, CLASSES).sum())
    if gate_covered:
        out["covered_vs_gate"] = round(out["immune_covered"] / gate_covered, 3)
    return out


def drop_review(run: Path, cfg) -> None:
    """Remove the truth-corrected V0 so that the noisy variant sees gate labels only."""
    for s in cfg.slides:
        path = run / "cells" / f"{s.id}.parquet"
        t = pq.read_table(path)
        if "review_label" in t.column_names:
            pq.write_table(t.drop_columns(["review_label"]), path)


def write_truth_v0(run: Path, cfg, n: int, seed: int) -> int:
    """review_label = truth for a stratified sample of gate-labelled cells of train/val slides."""
    index = read_index(run)[0].to_pandas()
    split = index.groupby("slide_id")["split"].first()
    rng = np.random.default_rng(seed)
    frames = []
    for s in cfg.slides:
        m = matched(run, cfg, s.id)
        m = m[m["gate_label"].isin(CLASSES)]
        m["slide_id"] = s.id
        frames.append(
            m[["slide_id", "cell_id", "gate_label", "true"]]
            if split.get(s.id) in ("train", "val")
            else m.iloc[:0][["slide_id", "cell_id", "gate_label", "true"]]
        )
    pool = pd.concat(frames)
    per = n // len(CLASSES)
    picks = [g.iloc[rng.permutation(len(g))[:per]] for _, g in pool.groupby("gate_label")]
    v0 = pd.concat(picks)
    for s in cfg.slides:
        path = run / "cells" / f"{s.id}.parquet"
        t = pq.read_table(path)
        lab = pd.Series("unlabeled", index=t.column("cell_id").to_numpy(), dtype=object)
        mine = v0[v0["slide_id"] == s.id]
        lab.loc[mine["cell_id"].to_numpy()] = mine["true"].to_numpy()
        t = t.drop_columns([c for c in ("review_label",) if c in t.column_names]).append_column(
            "review_label", pa.array(lab.to_numpy().astype(str))
        )
        pq.write_table(t, path)
    return len(v0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--artifacts", default="default")
    ap.add_argument("--arch", default="small")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--v0", type=int, default=2000, help="Cells in the truth-corrected V0.")
    ap.add_argument("--min-prob", type=float, default=0.95)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--run", type=Path)
    ap.add_argument("--rules", nargs="+", default=["expand", "model"], choices=["expand", "model"])
    args = ap.parse_args()
    run = args.run or Path(tempfile.mkdtemp(prefix="bench-expand-")) / "run"
    t0 = time.perf_counter()
    if not (run / "crops.parquet").exists():
        simulate_dataset(
            run, size=args.size, slides=args.slides, seed=args.seed, artifacts=args.artifacts
        )
        cfg = load_config(run)
        run_gate(cfg, with_sensitivity=True)
        build_db(cfg, labels="gate")
    cfg = load_config(run)
    prep = time.perf_counter() - t0
    index = read_index(run)[0].to_pandas()
    test_slides = sorted(index.loc[index["split"] == "test", "slide_id"].unique())
    rows = []
    base = {
        "size": args.size,
        "slides": args.slides,
        "seed": args.seed,
        "artifacts": args.artifacts,
        "arch": args.arch,
        "min_prob": args.min_prob,
    }
    gate_all = pd.concat([matched(run, cfg, s.id).assign(slide_id=s.id) for s in cfg.slides])
    immune = gate_all["true"].isin(IMMUNE)
    ambiguous_share = round(float((gate_all.loc[immune, "gate_label"] == "ambiguous").mean()), 4)
    rows.append(
        {
            **base,
            "labels": "gate (no model)",
            "where": "all slides",
            **scores(gate_all, "gate_label"),
            "immune_gate_ambiguous": ambiguous_share,
            "prep_s": round(prep, 1),
        }
    )
    for variant in ("truth-corrected V0", "noisy V0 (gate labels)"):
        if variant.startswith("truth"):
            n = write_truth_v0(run, cfg, args.v0, args.seed)
            labels = "review"
        else:
            n = int(index["label"].isin(CLASSES).sum())
            labels = "gate"
        t1 = time.perf_counter()
        result = train_bootstrap(
            cfg,
            labels=labels,
            arch=args.arch,
            epochs=args.epochs,
            device=args.device,
            name=f"bootstrap-{labels}",
        )
        train_s = time.perf_counter() - t1
        for rule in args.rules:
            t1 = time.perf_counter()
            run_expand(cfg, model=f"bootstrap-{labels}", min_prob=args.min_prob, rule=rule,
                       device=args.device)  # fmt: skip
            expand_s = time.perf_counter() - t1
            v1_all = pd.concat([matched(run, cfg, s.id).assign(slide_id=s.id) for s in cfg.slides])
            v1_test = v1_all[v1_all["slide_id"].isin(test_slides)]
            common = {**base, "labels": variant, "v1_rule": rule, "v0_cells": n, "val_accuracy": round(result.metrics["validation"]["accuracy"], 4),
                      "train_s": round(train_s, 1), "expand_s": round(expand_s, 1),
                      "train_cells_per_s": round(result.metrics["speed"]["train_cells_per_s"]), "expand_cells_per_s": round(len(v1_all) / expand_s)}  # fmt: skip
            covered = rows[0]["immune_covered"]
            rows.append({**common, "where": "all slides", **scores(v1_all, "v1_label", covered)})
            if len(v1_test):
                g = gate_all[gate_all["slide_id"].isin(test_slides)]
                gate_test = {**base, "labels": "gate (no model)", "where": f"test slide {','.join(test_slides)}", **scores(g, "gate_label")}  # fmt: skip
                if not any(
                    r["labels"] == "gate (no model)" and r["where"] == gate_test["where"]
                    for r in rows
                ):
                    rows.append(gate_test)
                covered = gate_test["immune_covered"]
                rows.append(
                    {**common, "where": gate_test["where"], **scores(v1_test, "v1_label", covered)}
                )
        if variant.startswith("truth"):
            drop_review(run, cfg)
    record("expand_sim", rows)
    print(f"run folder: {run}")


if __name__ == "__main__":
    main()
