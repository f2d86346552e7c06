"""Classical backends on real annotated images (no training).

- CoNSeP (H&E, colorectal, 40x ~0.25 µm/px): the `he` backend's detection F1 (centroids within
  12 px = 3 µm, HoVer-Net's criterion), F1 at IoU >= 0.5, object Dice, AJI, PQ, and the recall of
  the inflammatory class (type 2, mostly lymphocytes).
- DSB 2018 fluorescence nuclei: the `if-nuclear` pipeline's Dice and F1.
- CPU throughput of both, megapixels per second, on this machine.

    python benchmarks/segment_real.py --consep ../shared/data/consep_train.npz \
        --consep-csv ../shared/data/consep_train_nuclei.csv \
        --dsb ../shared/data/dsb2018_nuclei_img.tif ../shared/data/dsb2018_nuclei_mask.tif

`--patches N` evaluates the first N CoNSeP patches (default all 432). Results are printed and
appended to benchmarks/results/segment_real.jsonl.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _results import record
from immunocto.segment import segment_he, segment_nuclear_stain
from immunocto.validate import (
    aggregated_jaccard,
    centroids,
    detection_by_distance,
    detection_by_iou,
    match_instances,
    object_dice,
    panoptic_quality,
)

CONSEP_MPP = 0.25
DSB_MPP = 0.42


def consep(npz: Path, csv: Path | None, n: int | None) -> dict:
    data = np.load(npz)
    images, instances = data["images"], data["instances"]
    if n:
        images, instances = images[:n], instances[:n]
    types = {}
    if csv is not None:
        import pandas as pd

        table = pd.read_csv(csv)
        types = {(int(r.patch_index), int(r.instance_id)): int(r.type) for r in table.itertuples()}
    tp = fp = fn = 0
    tp_iou = fp_iou = fn_iou = 0
    dice, aji, pq, found_inflam, n_inflam = [], [], [], 0, 0
    t0 = time.perf_counter()
    preds = [segment_he(img, mpp=CONSEP_MPP) for img in images]
    seconds = time.perf_counter() - t0
    for k, (truth, pred) in enumerate(zip(instances, preds, strict=True)):
        ov = match_instances(truth, pred)
        tid, txy = centroids(truth)
        _, pxy = centroids(pred)
        tclass = np.array([types.get((k, int(i)), 0) for i in tid])
        det = detection_by_distance(txy, pxy, radius=12.0, truth_class=tclass)
        tp += det["all"]["tp"]
        fp += det["all"]["fp"]
        fn += det["all"]["fn"]
        if "2" in det.get("recall_by_truth_class", {}):
            n2 = int(np.sum(tclass == 2))
            n_inflam += n2
            found_inflam += round(det["recall_by_truth_class"]["2"] * n2)
        d = detection_by_iou(truth, pred, ov=ov)
        tp_iou += d.tp
        fp_iou += d.fp
        fn_iou += d.fn
        dice.append(object_dice(truth, pred, ov))
        aji.append(aggregated_jaccard(truth, pred, ov))
        pq.append(panoptic_quality(truth, pred, ov)["pq"])
    mp = images.shape[0] * images.shape[1] * images.shape[2] / 1e6
    return {
        "dataset": "CoNSeP train",
        "patches": int(images.shape[0]),
        "backend": "he",
        "detection_f1_12px": round(2 * tp / (2 * tp + fp + fn), 4),
        "detection_precision_12px": round(tp / max(tp + fp, 1), 4),
        "detection_recall_12px": round(tp / max(tp + fn, 1), 4),
        "f1_iou50": round(2 * tp_iou / (2 * tp_iou + fp_iou + fn_iou), 4),
        "object_dice": round(float(np.mean(dice)), 4),
        "aji": round(float(np.mean(aji)), 4),
        "pq": round(float(np.mean(pq)), 4),
        "inflammatory_recall": round(found_inflam / n_inflam, 4) if n_inflam else None,
        "megapixels_per_s": round(mp / seconds, 2),
    }


def dsb(img_path: Path, mask_path: Path) -> dict:
    import tifffile

    img = tifffile.imread(img_path).astype(np.float32)
    truth = tifffile.imread(mask_path)
    # DSB images carry no pixel size. Their nuclei are ~24 px across (median); cultured-cell
    # nuclei are ~10 µm, so we read them at 0.42 µm/px. This sets the physical scale of the
    # size parameters; it is not tuned on the scores.
    mpp = DSB_MPP
    t0 = time.perf_counter()
    pred = segment_nuclear_stain(img, mpp=mpp)
    seconds = time.perf_counter() - t0
    ov = match_instances(truth, pred)
    d = detection_by_iou(truth, pred, ov=ov)
    _, txy = centroids(truth)
    _, pxy = centroids(pred)
    return {
        "dataset": "DSB 2018 (stardist example)",
        "backend": "if-nuclear",
        "n_truth": len(ov.truth_ids),
        "n_pred": len(ov.pred_ids),
        "object_dice": round(object_dice(truth, pred, ov), 4),
        "f1_iou50": round(d.f1, 4),
        "detection_f1_centroid_4um": detection_by_distance(txy * mpp, pxy * mpp, radius=4.0)["all"][
            "f1"
        ],
        "aji": round(aggregated_jaccard(truth, pred, ov), 4),
        "megapixels_per_s": round(img.size / 1e6 / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--consep", type=Path)
    parser.add_argument("--consep-csv", type=Path)
    parser.add_argument("--patches", type=int, default=None)
    parser.add_argument("--dsb", type=Path, nargs=2, metavar=("IMAGE", "MASK"))
    args = parser.parse_args()
    rows = []
    if args.consep:
        rows.append(consep(args.consep, args.consep_csv, args.patches))
    if args.dsb:
        rows.append(dsb(*args.dsb))
    record("segment_real", rows)


if __name__ == "__main__":
    main()
