"""The H&E nucleus network on real tissue, next to `he-classical` and a naive watershed.

Every figure is on whole source images held out from the model's training (see
`immunocto.models.nuclei_data.HELD_OUT` and each model's `config.json`), at 40x (the images
as they are, 0.25 µm/px) and at 20x (the same images downsampled 2x, given as 0.5 µm/px).

- detection F1 with centroids matched one-to-one within 1.5 µm and 3 µm; foreground Dice
  (pixels, pooled over the images); object Dice, AJI and PQ (mean over images); per-type F1 on
  CoNSeP (a match counts for type t when truth and prediction both say t, 3 µm);
- leave-one-source-out: a model trained without GBM40 scored on all 40 GBM40 tiles, one
  trained without CoNSeP scored on the held-out CoNSeP images (`--loso source=MODEL_DIR`);
- stain robustness: the held-out tiles with each stain's optical density scaled by 0.65 and
  1.35 (hematoxylin, eosin): the largest loss of detection F1 at 1.5 µm;
- CPU speed: megapixels of 0.25 µm/px input per second, whole `segment_he` call;
- a figure: real tiles of every source with the predicted outlines coloured by type.

    python benchmarks/nuclei_real.py --consep ../shared/data/consep_train.npz \
        --consep-csv ../shared/data/consep_train_nuclei.csv --gbm40 ../shared/data/gbm40_he.npz \
        --loso gbm40=W/nuclei_no_gbm40 --loso consep=W/nuclei_no_consep \
        --figure-dir ../shared/data --figure docs/nuclei_real.jpg

`--limit N` scores the first N test images of each source (quick check). Rows are printed and
appended to benchmarks/results/nuclei_real.jsonl; a Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed
from skimage.transform import resize

from _results import record
from immunocto.models.nuclei import BN_ADAPT
from immunocto.models.nuclei_aug import hed_perturb
from immunocto.models.nuclei_data import HELD_OUT, SourceImage, read_consep, read_gbm40
from immunocto.segment.he import segment_he_classical
from immunocto.segment.learned import NucleusModel, inference_precision
from immunocto.segment.net import TYPES
from immunocto.validate.metrics import (
    aggregated_jaccard,
    centroids,
    detection_by_distance,
    match_instances,
    object_dice,
    panoptic_quality,
)


def naive_watershed(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """The ten-line baseline: Otsu on hematoxylin, distance transform, peaks, watershed."""
    h = ndi.gaussian_filter(rgb2hed(rgb)[..., 0], 1.0)
    mask = h > threshold_otsu(h)
    mask = ndi.binary_opening(mask, iterations=1)
    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=max(1, round(2.0 / mpp)), labels=ndi.label(mask)[0])
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask).astype(np.int32)


def at_20x(img: SourceImage) -> SourceImage:
    """The image downsampled 2x (anti-aliased) and its truth by nearest neighbour."""
    h, w = img.instances.shape
    rgb = resize(img.rgb, (h // 2, w // 2), order=1, anti_aliasing=True, preserve_range=True)
    inst = img.instances[::2, ::2][: h // 2, : w // 2]
    return SourceImage(img.name, img.group, np.clip(np.rint(rgb), 0, 255).astype(np.uint8),
                       inst, img.mpp * 2, img.types)  # fmt: skip


def score(images: list[SourceImage], preds: list[np.ndarray], types: list | None = None) -> dict:
    """Pooled detection and foreground figures over images; per-image means of the rest."""
    acc = {"tp15": 0, "fp15": 0, "fn15": 0, "tp3": 0, "fp3": 0, "fn3": 0, "inter": 0, "sum": 0}
    dice, aji, pq = [], [], []
    per_type = {t: [0, 0, 0] for t in TYPES}
    for k, (img, pred) in enumerate(zip(images, preds, strict=True)):
        truth = img.instances.astype(np.int32)
        tid, txy = centroids(truth)
        pid, pxy = centroids(pred)
        for r, tag in ((1.5, "15"), (3.0, "3")):
            d = detection_by_distance(txy * img.mpp, pxy * img.mpp, radius=r)["all"]
            acc["tp" + tag] += d["tp"]
            acc["fp" + tag] += d["fp"]
            acc["fn" + tag] += d["fn"]
        acc["inter"] += int(np.sum((truth > 0) & (pred > 0)))
        acc["sum"] += int(np.sum(truth > 0) + np.sum(pred > 0))
        ov = match_instances(truth, pred)
        dice.append(object_dice(truth, pred, ov))
        aji.append(aggregated_jaccard(truth, pred, ov))
        pq.append(panoptic_quality(truth, pred, ov)["pq"])
        if types is not None and img.types is not None:
            tcls = np.array([img.types.get(int(i), -1) for i in tid])
            pcls = np.array([types[k][int(i)] for i in pid])
            d = detection_by_distance(
                txy * img.mpp, pxy * img.mpp, radius=3.0, truth_class=tcls, pred_class=pcls
            )
            for c, v in d.get("by_class", {}).items():
                if int(float(c)) >= 0:
                    t = TYPES[int(float(c))]
                    per_type[t][0] += v["tp"]
                    per_type[t][1] += v["fp"]
                    per_type[t][2] += v["fn"]
    f1 = lambda tp, fp, fn: round(2 * tp / max(2 * tp + fp + fn, 1), 4)  # noqa: E731
    out = {
        "images": len(images),
        "nuclei": int(sum(len(np.unique(i.instances)) - 1 for i in images)),
        "f1_1.5um": f1(acc["tp15"], acc["fp15"], acc["fn15"]),
        "f1_3um": f1(acc["tp3"], acc["fp3"], acc["fn3"]),
        "precision_1.5um": round(acc["tp15"] / max(acc["tp15"] + acc["fp15"], 1), 4),
        "recall_1.5um": round(acc["tp15"] / max(acc["tp15"] + acc["fn15"], 1), 4),
        "dice": round(2 * acc["inter"] / max(acc["sum"], 1), 4),
        "object_dice": round(float(np.mean(dice)), 4),
        "aji": round(float(np.mean(aji)), 4),
        "pq": round(float(np.mean(pq)), 4),
    }
    if types is not None and any(sum(v) for v in per_type.values()):
        out["type_f1"] = {t: f1(*v) for t, v in per_type.items() if sum(v)}
    return out


def learned(
    images: list[SourceImage], model: NucleusModel, adapt: bool = True, tune: bool = True
) -> list[tuple]:
    """``model.segment`` of every image; with ``adapt``, the network's batch-norm statistics
    first adapted to each source image (all patches of one ``group``: what a slide backend does
    with its slide), at the model's ``bn_adapt`` or, for folders trained before that key,
    the trainer's default; with ``tune`` (and ``post_tuning: views`` in the model's config),
    the post-processing then chosen on that source image's patches from the test-time views,
    again as the slide backend does."""
    if not adapt and not tune:
        return [model.segment(i.rgb, i.mpp, adapt=False, tune=False) for i in images]
    alpha = float(model.config.get("bn_adapt", BN_ADAPT)) if adapt else 0.0
    groups: dict[str, list[int]] = {}
    for k, img in enumerate(images):
        groups.setdefault(img.group, []).append(k)
    out: list = [None] * len(images)
    for ks in groups.values():
        rgbs = [images[k].rgb for k in ks]
        m = model.adapted(rgbs, images[ks[0]].mpp, alpha=alpha) if alpha else model
        post = m.tune_post(rgbs, images[ks[0]].mpp) if tune else m.default_post()
        post = {k: float(post[k]) for k in m.default_post()}
        for k in ks:
            out[k] = m.segment(images[k].rgb, images[k].mpp, adapt=False, tune=False, **post)
    return out


def views(model: NucleusModel) -> str:
    """How many test-time views the model folder averages (``tta`` in its config)."""
    n = int(model.config.get("tta", 1))
    return f"{n} view{'s' if n > 1 else ''}"


def run_methods(images: list[SourceImage], model: NucleusModel, label: str) -> list[dict]:
    rows = []
    variants = [(True, True, ""), (False, True, ", no slide adaptation")]
    if model.self_tuning:  # the same network with its folder's fixed thresholds
        variants.insert(1, (True, False, ", fixed thresholds"))
    for adapt, tune, tag in variants:
        t0 = time.perf_counter()
        res = learned(images, model, adapt, tune)
        rows.append({"method": label + tag, **score(images, [x[0] for x in res], [x[1] for x in res]),
                     "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    t0 = time.perf_counter()
    rows.append({"method": "he-classical",
                 **score(images, [segment_he_classical(i.rgb, mpp=i.mpp) for i in images]),
                 "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    t0 = time.perf_counter()
    rows.append({"method": "naive watershed",
                 **score(images, [naive_watershed(i.rgb, i.mpp) for i in images]),
                 "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    return rows


def stain_check(images: list[SourceImage], model: NucleusModel) -> dict:
    base = score(images, [x[0] for x in learned(images, model)])["f1_1.5um"]
    out = {"base_f1_1.5um": base}
    for name, f in {"H x0.65": (0.65, 1, 1), "H x1.35": (1.35, 1, 1),
                    "E x0.65": (1, 0.65, 1), "E x1.35": (1, 1.35, 1)}.items():  # fmt: skip
        pert = [replace(i, rgb=hed_perturb(i.rgb, f)) for i in images]
        pert = [x[0] for x in learned(pert, model)]
        out[name] = score(images, pert)["f1_1.5um"]
    out["largest_loss"] = round(base - min(v for k, v in out.items() if "x" in k), 4)
    return out


def speed(images: list[SourceImage], model: NucleusModel, reps: int = 2) -> dict:
    """Mpx/s of a 1024 x 1024 mosaic of 40x images through ``segment_he``-equivalent calls."""
    from immunocto.segment.he import segment_he

    tiles = [i.rgb for i in images if i.rgb.shape[:2] == (256, 256)][:16]
    if len(tiles) < 16:
        tiles = [np.asarray(images[0].rgb)[:256, :256]] * 16
    mosaic = np.concatenate([np.concatenate(tiles[r * 4 : r * 4 + 4], axis=1) for r in range(4)])
    mpx = mosaic.shape[0] * mosaic.shape[1] / 1e6
    out = {"mosaic_px": list(mosaic.shape[:2])}
    for precision in ("fp32", "auto"):  # same run, same input: the ratio is what counts
        with precision_env(precision):
            segment_he(mosaic, mpp=0.25, model=model.folder)  # warm-up
            t0 = time.perf_counter()
            for _ in range(reps):
                segment_he(mosaic, mpp=0.25, model=model.folder)
            s = (time.perf_counter() - t0) / reps
            out[f"learned_mpx_s_{precision}"] = round(mpx / s, 2)
            out[f"precision_{precision}"] = inference_precision()
    t0 = time.perf_counter()
    segment_he_classical(mosaic, mpp=0.25)
    sc = time.perf_counter() - t0
    import torch

    return {**out, "classical_mpx_s": round(mpx / sc, 2), "torch_threads": torch.get_num_threads()}


@contextlib.contextmanager
def precision_env(precision: str):
    """``IMMUNOCTO_NUCLEUS_PRECISION`` set to ``precision`` inside the block."""
    old = os.environ.get("IMMUNOCTO_NUCLEUS_PRECISION")
    os.environ["IMMUNOCTO_NUCLEUS_PRECISION"] = precision
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("IMMUNOCTO_NUCLEUS_PRECISION")
        else:
            os.environ["IMMUNOCTO_NUCLEUS_PRECISION"] = old


def figure(model: NucleusModel, sources: dict[str, tuple[np.ndarray, float]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from skimage.segmentation import find_boundaries

    colours = {"inflammatory": (230, 30, 30), "epithelial": (30, 200, 60),
               "stromal": (40, 110, 255), "other": (250, 200, 0)}  # fmt: skip
    n = len(sources)
    fig = Figure(figsize=(3.2 * n, 3.7), dpi=110)
    FigureCanvasAgg(fig)
    for k, (name, (rgb, mpp)) in enumerate(sources.items()):
        labels, tidx, _ = model.segment(rgb, mpp)
        img = rgb.copy()
        b = find_boundaries(labels, mode="inner")
        lut = np.array([(0, 0, 0)] + [colours[model.types[int(t)]] for t in tidx[1:]], np.uint8)
        img[b] = lut[labels[b]]
        ax = fig.add_subplot(1, n, k + 1)
        ax.imshow(img)
        ax.set_title(f"{name}: {mpp:.3g} µm/px, {labels.max()} nuclei", fontsize=8)
        ax.axis("off")
    handles = [Patch(color=np.array(c) / 255, label=t) for t, c in colours.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, pil_kwargs={"quality": 85} if out.suffix == ".jpg" else None)
    print(f"figure: {out}")


def figure_sources(data_dir: Path, consep: list[SourceImage], gbm: list[SourceImage]) -> dict:
    import tifffile

    busiest = max(consep, key=lambda i: len(np.unique(i.instances)))
    g = gbm[0].rgb[128:384, 128:384]
    out = {"CoNSeP (held out)": (busiest.rgb, 0.25), "GBM40 (held out)": (g, 0.25)}
    orion = [
        tifffile.imread(p)[..., :3] for p in sorted((data_dir / "orion_he_tiles").glob("*.tif"))
    ]
    if orion:  # the tile with the least glass
        out["Orion CRC"] = (min(orion, key=lambda a: float(np.mean(a))), 0.325)
    jpg = data_dir / "tcga_he_histo.jpg"
    if jpg.exists():
        from PIL import Image

        out["TCGA"] = (np.asarray(Image.open(jpg).convert("RGB"))[:256, :256], 0.5)
    svs = data_dir / "cmu_small_region.svs"
    if svs.exists():
        from immunocto.io import open_slide

        s = open_slide(svs)
        out["CMU SVS"] = (s.read_region(1000, 1000, 256, 256)[..., :3], float(s.mpp))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--consep", type=Path, required=True)
    parser.add_argument("--consep-csv", type=Path)
    parser.add_argument("--gbm40", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--loso", action="append", default=[], metavar="SOURCE=DIR")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["stain", "speed", "figure", "loso", "fp32"]
    )
    parser.add_argument("--figure-dir", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=Path("docs/nuclei_real.jpg"))
    args = parser.parse_args()

    model = NucleusModel.load(args.model)
    consep = read_consep(args.consep, args.consep_csv)
    gbm = read_gbm40(args.gbm40)
    held = {
        "consep": [i for i in consep if i.group in HELD_OUT["consep"]["test"]],
        "gbm40": [i for i in gbm if i.group in HELD_OUT["gbm40"]["test"]],
    }
    trained_on = model.config.get("data", {})
    for src, imgs in held.items():
        used = set(trained_on.get(src, {}).get("train_images", []))
        leak = used & {i.group for i in imgs}
        if leak:
            raise SystemExit(f"{src}: test images {sorted(leak)} were used to train {model.folder}")
    if args.limit:
        held = {k: v[: args.limit] for k, v in held.items()}
    rows = []
    for src, imgs in held.items():
        for scale, ims in (("40x", imgs), ("20x", [at_20x(i) for i in imgs])):
            label = f"learned (shipped, {inference_precision()}, {views(model)})"
            for r in run_methods(ims, model, label):
                rows.append({"table": "held-out images", "source": src, "scale": scale, **r})
    if "fp32" not in args.skip and inference_precision() != "fp32":
        with precision_env("fp32"):  # the fast bf16 path against full precision, same images
            ims = held["consep"]
            t0 = time.perf_counter()
            out = learned(ims, model)
            rows.append({"table": "held-out images", "source": "consep", "scale": "40x",
                         "method": "learned (shipped, fp32)",
                         **score(ims, [x[0] for x in out], [x[1] for x in out]),
                         "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    if "loso" not in args.skip:
        for spec in args.loso:
            src, _, folder = spec.partition("=")
            m = NucleusModel.load(folder)
            if src in m.config.get("data", {}):
                raise SystemExit(f"{folder} was trained on {src}: not a leave-{src}-out model")
            imgs = gbm if src == "gbm40" else consep  # every image of a left-out source
            if args.limit:
                imgs = imgs[: args.limit]
            for scale, ims in (("40x", imgs), ("20x", [at_20x(i) for i in imgs])):
                for r in run_methods(ims, m, f"learned without {src} ({views(m)})"):
                    rows.append(
                        {"table": "leave-one-source-out", "source": src, "scale": scale, **r}
                    )
    if "stain" not in args.skip:
        rows.append({"table": "stain", **stain_check(held["consep"] + held["gbm40"], model)})
    if "speed" not in args.skip:
        rows.append({"table": "speed", **speed(held["consep"], model)})
    record("nuclei_real", rows, extra={"model": str(model.folder)})
    print(
        "\n| table | source | scale | method | F1 1.5 µm | F1 3 µm | Dice | AJI | PQ | inflammatory F1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "method" in r:
            infl = r.get("type_f1", {}).get("inflammatory", "")
            print(f"| {r['table']} | {r['source']} | {r['scale']} | {r['method']} | {r['f1_1.5um']} | "
                  f"{r['f1_3um']} | {r['dice']} | {r['aji']} | {r['pq']} | {infl} |")  # fmt: skip
    if "figure" not in args.skip and args.figure_dir:
        figure(model, figure_sources(args.figure_dir, held["consep"], held["gbm40"]), args.figure)


if __name__ == "__main__":
    main()
