"""The H&E-only model against the simulator's truth, a size + darkness baseline, partial labels,
virtual IF, prediction speed, and (optional) the domain shift to real H&E (CoNSeP).

Needs a run with a crop store and ``v1_label`` (e.g. the one `expand_sim.py` leaves; or give
`--size` and it runs simulate -> gate -> build-db -> bootstrap -> expand first); the V1
database ``RUN/v1`` is built when missing. Rows:

- **typed detection on the test slide** (never trained on): `immunocto predict` (he
  segmentation + the model) vs truth cells within 4 µm: per-class F1, lymphocyte F1
  (cd4_t ∪ cd8_t ∪ b_cell), macrophage F1 — for the model with context, without context,
  and the size + darkness baseline (same cells, same labels to learn from);
- **partial labels**: truth labels of the stored training cells with `--drop` of the true
  lymphocytes moved to `other`, trained with `--partial-labels ignore` and `nnpu`; recall of
  true lymphocytes on the test slide;
- **virtual IF**: Pearson r per marker on the test slide (`--kind he-regression`);
- **speed**: predict cells/s (segmentation + classification) on this machine;
- **CoNSeP** (`--consep consep_train.npz` with its `_nuclei.csv`): the true nuclei of 432 real
  patches classified by the sim-trained model; precision/recall of CoNSeP's inflammatory class
  (type 2) vs our lymphocyte call, beside the baseline.

    python benchmarks/he_sim.py --run /tmp/bench-expand/run --consep ../shared/data/consep_train.npz
    python benchmarks/he_sim.py --run RUN --arch nuclei [--init nuclei]   # nucleus-encoder start
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from _results import record
from immunocto.config import load_config
from immunocto.db import build_db, read_index
from immunocto.db.store import CropStore, store_path
from immunocto.models.checkpoint import load_model
from immunocto.models.he import train_he
from immunocto.models.predict import classify_cells, predict_file
from immunocto.models.pu import crop_features
from immunocto.validate import match_points
from immunocto.validate.detection import SizeDarknessBaseline, typed_detection

LYMPH = ("cd4_t", "cd8_t", "b_cell")


def truth_of(run: Path, slide: str) -> pd.DataFrame:
    return pq.read_table(
        run / "truth" / slide / "cells.parquet", columns=["x", "y", "class"]
    ).to_pandas()


def detection_row(truth: pd.DataFrame, pred: pd.DataFrame, column: str, mpp: float) -> dict:
    r = typed_detection(
        truth[["x", "y"]].to_numpy() * mpp, truth["class"].to_numpy(),
        pred[["x", "y"]].to_numpy() * mpp, pred[column].to_numpy(), radius=4.0,
    )  # fmt: skip
    out = {"detection_f1": r["all"]["f1"]}
    for c, d in r["by_class"].items():
        out[f"{c}_f1"] = d["f1"]
    for g, d in r["groups"].items():
        out[f"{g}_f1"] = d["f1"]
        out[f"{g}_recall"] = d["recall"]
        out[f"{g}_precision"] = d["precision"]
    return out


def store_features(run: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask area px, mean grey inside the mask) of stored crops."""
    store = CropStore.open_readonly(store_path(run))
    feats = []
    for lo in range(0, len(rows), 4096):
        r = rows[lo : lo + 4096]  # sorted by the caller
        feats.append(
            crop_features(
                store.he.get_orthogonal_selection((r,)), store.mask.get_orthogonal_selection((r,))
            )
        )
    f = np.concatenate(feats)
    return f[:, 6], f[:, :3].mean(1)


def labels_of(run: Path, index: pd.DataFrame, column: str) -> pd.Series:
    parts = []
    for sid in index["slide_id"].unique():
        t = pq.read_table(run / "cells" / f"{sid}.parquet", columns=["cell_id", column]).to_pandas()
        parts.append(t.assign(slide_id=sid))
    merged = index.merge(pd.concat(parts), on=["slide_id", "cell_id"], how="left")
    return merged[column]


def write_partial_v0(run: Path, cfg, drop: float, seed: int) -> dict:
    """review_label = truth (matched within 4 µm) for stored train/val cells, with ``drop`` of
    the true lymphocytes relabelled ``other``; test slides and unmatched cells unlabeled."""
    index = read_index(run)[0].to_pandas()
    rng = np.random.default_rng(seed)
    mpp = cfg.slides[0].mpp
    dropped = total = 0
    for s in cfg.slides:
        path = run / "cells" / f"{s.id}.parquet"
        t = pq.read_table(path)
        cells = t.select(["cell_id", "x", "y"]).to_pandas()
        lab = np.full(len(cells), "unlabeled", dtype=object)
        split = index.loc[index["slide_id"] == s.id, "split"]
        if len(split) and split.iloc[0] in ("train", "val"):
            truth = truth_of(run, s.id)
            ti, pi = match_points(
                truth[["x", "y"]].to_numpy() * mpp, cells[["x", "y"]].to_numpy() * mpp, 4.0
            )
            lab[pi] = truth["class"].to_numpy()[ti]
            lym = np.flatnonzero(np.isin(lab, LYMPH))
            hide = lym[rng.random(len(lym)) < drop]
            lab[hide] = "other"
            dropped += len(hide)
            total += len(lym)
        t = t.drop_columns([c for c in ("review_label",) if c in t.column_names]).append_column(
            "review_label", pa.array(lab.astype(str))
        )
        pq.write_table(t, path)
    return {"lymphocytes": total, "dropped": dropped}


def consep_rows(path: Path, models: dict, baseline: SizeDarknessBaseline) -> list[dict]:
    from immunocto.io.array import ArraySlide

    data = np.load(path)
    nuclei = pd.read_csv(path.with_name(path.stem + "_nuclei.csv"))
    preds = {k: [] for k in models}
    base, truth = [], []
    t0 = time.perf_counter()
    for i in range(len(data["images"])):
        sub = nuclei[nuclei["patch_index"] == i]
        if sub.empty:
            continue
        slide = ArraySlide(data["images"][i], mpp=0.25, name=f"consep[{i}]")
        cells = {
            "cell_id": sub["instance_id"].to_numpy(),
            "x": sub["x"].to_numpy(),
            "y": sub["y"].to_numpy(),
        }
        for k, m in models.items():
            out, grey = classify_cells(m, slide, data["instances"][i], cells)
            preds[k].append(np.asarray(m.classes)[out.argmax(1)])
        area = np.bincount(data["instances"][i].ravel())[sub["instance_id"].to_numpy()]
        base.append(baseline.predict(area * (0.25 / 0.325) ** 2, grey))
        truth.append(sub["type"].to_numpy())
    seconds = time.perf_counter() - t0
    truth_a = np.concatenate(truth) == 2  # inflammatory
    rows = []
    for name, p in [
        *((k, np.concatenate(v)) for k, v in preds.items()),
        ("size+darkness baseline", np.concatenate(base)),
    ]:
        call = np.isin(p, (*LYMPH, "lymphocyte"))
        tp = int(np.sum(call & truth_a))
        prec = tp / max(call.sum(), 1)
        rec = tp / max(truth_a.sum(), 1)
        rows.append({"what": "CoNSeP inflammatory (true nuclei)", "model": name, "nuclei": len(truth_a),
                     "inflammatory": int(truth_a.sum()), "called_lymphocyte": int(call.sum()),
                     "precision": round(prec, 4), "recall": round(rec, 4),
                     "f1": round(2 * prec * rec / max(prec + rec, 1e-9), 4), "seconds": round(seconds, 1)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", type=Path)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--arch", default="small", help="small, resnet18, resnet50 or nuclei")
    ap.add_argument(
        "--init",
        default=None,
        help="start the crop branch from `nuclei` (the shipped nucleus network) or a file",
    )
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--labels", default="v1")
    ap.add_argument("--drop", type=float, default=0.4)
    ap.add_argument("--consep", type=Path)
    ap.add_argument("--skip", nargs="*", default=[], choices=["ablation", "partial", "regression"])
    args = ap.parse_args()
    run = args.run or Path(tempfile.mkdtemp(prefix="bench-he-")) / "run"
    if not (run / "crops.parquet").exists():
        from immunocto.models.expand import run_expand
        from immunocto.models.train import train_bootstrap
        from immunocto.phenotype import run_gate
        from immunocto.simulate.dataset import simulate_dataset

        simulate_dataset(run, size=args.size, slides=args.slides, seed=args.seed)
        cfg = load_config(run)
        run_gate(cfg)
        build_db(cfg, labels="gate")
        train_bootstrap(cfg)
        run_expand(cfg)
    cfg = load_config(run)
    if args.labels == "v1" and not (run / "v1" / "crops.parquet").exists():
        build_db(cfg, labels="v1", with_if=False)  # the V1 database the H&E model reads
    mpp = cfg.slides[0].mpp
    index = read_index(run)[0].to_pandas()
    test = sorted(index.loc[index["split"] == "test", "slide_id"].unique())
    slides = {s.id: s for s in cfg.slides}
    base = {
        "size": args.size,
        "arch": args.arch,
        "init": args.init,
        "epochs": args.epochs,
        "labels": args.labels,
        "test": ",".join(test),
    }
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="he-pred-"))

    def evaluate(model_dir: Path, tag: str, extra: dict) -> pd.DataFrame:
        frames = []
        for sid in test:
            r = predict_file(cfg.resolve(slides[sid].he), model_dir, tmp / tag, slide_id=sid)
            pred = pq.read_table(r.files["cells"]).to_pandas()
            frames.append(pred)
            rows.append({**base, **extra, "what": "typed detection, test slide", "model": tag, "slide": sid,
                         "cells": r.cells, "predict_cells_per_s": round(r.cells / sum(r.seconds.values()), 1),
                         "segment_s": round(r.seconds["segment"], 1), "classify_s": round(r.seconds["classify"], 1),
                         **detection_row(truth_of(run, sid), pred, "pred_label", mpp)})  # fmt: skip
            print(rows[-1], flush=True)
        return pd.concat(frames)

    # 1. the model with context, on the chosen labels
    t0 = time.perf_counter()
    main_model = train_he(
        run,
        cfg=cfg,
        kind="he",
        labels=args.labels,
        arch=args.arch,
        init=args.init,
        epochs=args.epochs,
        name="he-bench",
    )
    train_s = time.perf_counter() - t0
    base_extra = {"train_s": round(train_s, 1), "val_macro_f1": round(main_model.metrics["validation"]["macro_f1"], 4),
                  "train_cells_per_s": round(main_model.metrics["speed"]["train_cells_per_s"], 1)}  # fmt: skip
    preds = evaluate(main_model.folder, "he (crop + context)", base_extra)
    # 2. the size + darkness baseline, trained on the same labels of the same training cells
    data = run / "v1" if args.labels == "v1" else run
    train_idx = read_index(data)[0].to_pandas()
    train_idx = train_idx[train_idx["split"] == "train"].copy()
    train_idx["lab"] = (
        train_idx["label"].to_numpy()
        if args.labels in ("v1", "store")
        else labels_of(
            run, train_idx, {"gate": "gate_label", "v0": "review_label"}[args.labels]
        ).to_numpy()
    )
    train_idx = train_idx[
        train_idx["lab"].isin(["cd4_t", "cd8_t", "b_cell", "macrophage", "other"])
    ]
    train_idx = train_idx.sort_values("row")
    area, grey = store_features(data, train_idx["row"].to_numpy())
    baseline = SizeDarknessBaseline().fit(area, grey, train_idx["lab"].to_numpy())
    for sid in test:
        pred = preds[preds["slide_id"] == sid].copy()
        pred["base_label"] = baseline.predict(
            pred["area_px"].to_numpy(), pred["nucleus_grey"].to_numpy()
        )
        rows.append({**base, "what": "typed detection, test slide", "model": "size+darkness baseline", "slide": sid,
                     **detection_row(truth_of(run, sid), pred, "base_label", mpp)})  # fmt: skip
        print(rows[-1], flush=True)
    models = {"he (crop + context)": load_model(main_model.folder, "cpu")}
    # 3. ablation: no context
    if "ablation" not in args.skip:
        r = train_he(
            run,
            cfg=cfg,
            kind="he",
            labels=args.labels,
            arch=args.arch,
            init=args.init,
            epochs=args.epochs,
            context=False,
            name="he-bench-crop",
        )
        evaluate(
            r.folder,
            "he (crop only)",
            {"val_macro_f1": round(r.metrics["validation"]["macro_f1"], 4)},
        )
        models["he (crop only)"] = load_model(r.folder, "cpu")
    # 4. partial labels
    if "partial" not in args.skip:
        info = write_partial_v0(run, cfg, args.drop, args.seed)
        for mode in ("ignore", "nnpu"):
            r = train_he(
                run,
                cfg=cfg,
                kind="he",
                labels="v0",
                arch=args.arch,
                init=args.init,
                epochs=args.epochs,
                partial_labels=mode,
                name=f"he-bench-{mode}",
            )
            prior = json.loads((r.folder / "config.json").read_text())["pu_prior"]
            extra = {"partial_labels": mode, "drop": args.drop, **info, "pu_prior": prior}
            evaluate(r.folder, f"partial labels: {mode}", extra)
    # 5. virtual IF
    if "regression" not in args.skip:
        r = train_he(
            run,
            cfg=cfg,
            kind="he-regression",
            arch=args.arch,
            init=args.init,
            epochs=args.epochs,
            name="he-bench-regression",
        )
        ev = r.metrics.get("test", r.metrics["validation"])
        rows.append({**base, "what": "virtual IF (Pearson r, test slide)" if "test" in r.metrics else "virtual IF (Pearson r, validation)",
                     **{m: round(v["pearson_r"], 4) for m, v in ev["per_marker"].items()}, "n": ev["n"]})  # fmt: skip
        print(rows[-1], flush=True)
    # 6. CoNSeP
    if args.consep:
        for row in consep_rows(args.consep, models, baseline):
            rows.append({**base, **row})
            print(rows[-1], flush=True)
    record("he_sim", rows, echo=False)
    print(f"run folder: {run}")


if __name__ == "__main__":
    main()
