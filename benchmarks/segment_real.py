"""Segmentation on real annotated images.

- CoNSeP (H&E, colorectal, 40x ~0.25 µm/px): the `he` backend's detection F1 (centroids within
  12 px = 3 µm, HoVer-Net's criterion), F1 at IoU >= 0.5, object Dice, AJI, PQ, and the recall of
  the inflammatory class (type 2, mostly lymphocytes).
- DSB 2018 fluorescence nuclei: the `if-nuclear` segmentation (nucleus size `auto` and the
  fixed 10 µm settings) and the fluorescence nucleus network (`if-learned`, `--if-model DIR`
  or the shipped one) next to a naive DAPI watershed on the image's held-out bottom half, at
  its own scale, at 20x, and with 20 µm nuclei; F1 at IoU 0.5, centroid F1, Dice, AJI and
  objects per true nucleus.
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


def naive_dapi_watershed(img: np.ndarray, mpp: float) -> np.ndarray:
    """The ten-line baseline: Otsu on the smoothed stain, distance transform, peaks 2 µm apart,
    watershed (what a user writes first)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    s = ndi.gaussian_filter(img.astype(np.float32), 1.0)
    mask = s > threshold_otsu(s)
    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=max(1, round(2.0 / mpp)), labels=ndi.label(mask)[0])
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask).astype(np.int32)


def objects_per_nucleus(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean number of predicted objects whose centroid falls in a true nucleus, over the true
    nuclei that hold at least one (1.0 = no splits; over-segmentation raises it)."""
    _, pxy = centroids(pred)
    if not len(pxy):
        return float("nan")
    r = np.clip(np.rint(pxy[:, 1]).astype(int), 0, truth.shape[0] - 1)
    c = np.clip(np.rint(pxy[:, 0]).astype(int), 0, truth.shape[1] - 1)
    hit = truth[r, c]
    counts = np.bincount(hit[hit > 0])
    counts = counts[counts > 0]
    return round(float(counts.mean()), 3) if len(counts) else float("nan")


def score_if(truth: np.ndarray, pred: np.ndarray, mpp: float, diameter_um: float) -> dict:
    """F1 at IoU >= 0.5, centroid F1 within half a nucleus diameter, Dice, AJI, splits."""
    ov = match_instances(truth, pred)
    _, txy = centroids(truth)
    _, pxy = centroids(pred)
    radius = diameter_um / 2
    return {
        "n_truth": len(ov.truth_ids),
        "n_pred": len(ov.pred_ids),
        "f1_iou50": round(detection_by_iou(truth, pred, ov=ov).f1, 4),
        "detection_f1_half_diameter": round(
            detection_by_distance(txy * mpp, pxy * mpp, radius=radius)["all"]["f1"], 4
        ),
        "object_dice": round(object_dice(truth, pred, ov), 4),
        "aji": round(aggregated_jaccard(truth, pred, ov), 4),
        "objects_per_nucleus": objects_per_nucleus(truth, pred),
    }


def learned_if_model(folder: Path | None):
    """The fluorescence nucleus network to score (the shipped one by default), refused if the
    DSB test half was among its training images."""
    from immunocto.segment.learned import SHIPPED_IF, NucleusModel, shipped_model_dir

    model = NucleusModel.load(folder or shipped_model_dir(SHIPPED_IF))
    used = model.config.get("data", {}).get("dsb", {})
    if "dsb_test" in used.get("train_images", []) or "dsb_test" in used.get("val_images", []):
        raise SystemExit(f"{model.folder}: trained or tuned on the DSB test half; not a fair test")
    return model


def dsb(img_path: Path, mask_path: Path, if_model: Path | None = None) -> list[dict]:
    """The IF-nuclear segmentation on the DSB 2018 image next to the naive watershed.

    DSB images carry no pixel size. Their nuclei are ~24 px across (median); cultured-cell
    nuclei are ~10 µm, so we read them at 0.42 µm/px. The rows:

    - ``test half``: rows 256-511 (the top half chose the size estimator's factor, see
      ``segment.nuclei.estimate_nucleus_diameter``; nothing was tuned on this half);
    - ``20x``: the test half downsampled 2x (0.84 µm/px, same nuclei, fewer pixels);
    - ``large nuclei``: the test half's pixels declared at 0.84 µm/px, i.e. 20 µm nuclei, the
      case where fixed 10 µm settings cut nuclei into pieces.

    Each with ``auto`` (the default: size measured from the image), the old fixed 10 µm
    settings, the naive watershed, and the fluorescence nucleus network (``if-learned``;
    trained on the simulator's Hoechst, the top-left quarter of this image, thresholds tuned
    on its top-right quarter: see ``immunocto.models.nuclei_data.read_dsb``).
    """
    import tifffile
    from skimage.transform import rescale

    img = tifffile.imread(img_path).astype(np.float32)[256:]
    truth = tifffile.imread(mask_path)[256:]
    small = rescale(img, 0.5, order=1, anti_aliasing=True, preserve_range=True)
    small_truth = truth[::2, ::2]
    cases = [
        ("test half", img, truth, DSB_MPP, 10.0),
        ("20x (downsampled 2x)", small, small_truth, 2 * DSB_MPP, 10.0),
        ("large nuclei (declared 2x mpp)", img, truth, 2 * DSB_MPP, 20.0),
    ]
    net = learned_if_model(if_model)
    rows = []
    for case, im, tr, mpp, true_d in cases:
        methods = {
            "naive watershed": lambda im=im, mpp=mpp: naive_dapi_watershed(im, mpp),
            "if-nuclear, fixed 10 µm": lambda im=im, mpp=mpp: segment_nuclear_stain(
                im, mpp=mpp, diameter_um=10.0
            ),
            "if-nuclear, auto": lambda im=im, mpp=mpp: segment_nuclear_stain(
                im, mpp=mpp, diameter_um="auto"
            ),
            f"if-learned ({'shipped, default' if if_model is None else Path(if_model).name})": lambda im=im, mpp=mpp: (
                net.segment(im, mpp, adapt=False, with_types=False)[0]
            ),
        }
        for name, fn in methods.items():
            t0 = time.perf_counter()
            pred = fn()
            seconds = time.perf_counter() - t0
            rows.append({
                "dataset": f"DSB 2018, {case}", "method": name, "mpp": mpp,
                **score_if(tr, pred, mpp, true_d),
                "megapixels_per_s": round(im.size / 1e6 / seconds, 2),
            })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--consep", type=Path)
    parser.add_argument("--consep-csv", type=Path)
    parser.add_argument("--patches", type=int, default=None)
    parser.add_argument("--dsb", type=Path, nargs=2, metavar=("IMAGE", "MASK"))
    parser.add_argument(
        "--if-model", type=Path, default=None,
        help="a fluorescence nucleus model folder to score (default: the shipped one)",
    )  # fmt: skip
    args = parser.parse_args()
    rows = []
    if args.consep:
        rows.append(consep(args.consep, args.consep_csv, args.patches))
    if args.dsb:
        rows.extend(dsb(*args.dsb, if_model=args.if_model))
    record("segment_real", rows)


if __name__ == "__main__":
    main()
