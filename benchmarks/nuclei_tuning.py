"""Which images should tune the nucleus network's post-processing? Measured on a source the
model never saw.

The network's thresholds (foreground, seed, ``min_score``) are tuned on validation images
(`immunocto.models.nuclei.tune_thresholds`). Tuned on one source's images they fit that
source's annotation habits; on an unseen lab's tissue they may over- or under-split. This
benchmark takes a model trained without a source (`train --kind nuclei --exclude SOURCE`),
tunes the thresholds on several choices of validation images, and scores each choice on every
image of the left-out source (and on the held-out test images of the sources it trained on):

- ``consep``: CoNSeP's validation images (what `train --retune` uses for a leave-GBM40-out model);
- ``consep+sim``: those and a simulator run the model never trained on (`--sim-val RUN`, made by
  `immunocto simulate RUN --seed S` with a seed other than the training run's);
- ``sim``: the simulator run alone;
- ``oracle``: the best thresholds for the left-out source itself (a ceiling, not a method).

    python benchmarks/nuclei_tuning.py W/no_gbm40 --consep DATA/consep_train.npz \
        --consep-csv DATA/consep_train_nuclei.csv --gbm40 DATA/gbm40_he.npz --sim-val SIMVAL

Detection F1 with centroids matched one-to-one within 1.5 µm (the tuning criterion) and 3 µm;
the network adapts to each source image as in `segment_he`. Rows go to
benchmarks/results/nuclei_tuning.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import numpy as np

from _results import record
from immunocto.models.nuclei import validation_maps
from immunocto.models.nuclei_data import HELD_OUT, read_consep, read_gbm40, read_simulated
from immunocto.segment.learned import NucleusModel
from immunocto.segment.nucleus_post import drop_objects, instances_from_maps
from immunocto.validate.metrics import centroids, detection_by_distance

FG = (0.4, 0.5, 0.6)
SEED = (0.3, 0.4, 0.5, 0.6, 0.7)
SCORE = (0.0, 0.7, 0.75, 0.8, 0.85)
RADII = (1.5, 3.0)


def counts(maps, min_area_um2: float) -> dict[tuple, np.ndarray]:
    """``(fg, seed, min_score) -> (len(RADII), 3)`` pooled tp, fp, fn over the images."""
    out: dict[tuple, np.ndarray] = {}
    for fg_t, seed_t in itertools.product(FG, SEED):
        for img, (fg, dist, _), txy in maps:
            base = instances_from_maps(
                fg, dist, fg_threshold=fg_t, seed_threshold=seed_t,
                min_area_px=min_area_um2 / img.mpp**2,
            )  # fmt: skip
            for smin in SCORE:
                lab = drop_objects(base, fg, min_score=smin) if smin > 0 else base
                pxy = centroids(lab)[1]
                acc = out.setdefault((fg_t, seed_t, smin), np.zeros((len(RADII), 3)))
                for k, r in enumerate(RADII):
                    d = detection_by_distance(txy * img.mpp, pxy * img.mpp, radius=r)["all"]
                    acc[k] += (d["tp"], d["fp"], d["fn"])
    return out


def f1(c: np.ndarray) -> np.ndarray:
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    return 2 * tp / np.maximum(2 * tp + fp + fn, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a model folder trained without one source")
    parser.add_argument("--consep", type=Path, required=True)
    parser.add_argument("--consep-csv", type=Path)
    parser.add_argument("--gbm40", type=Path, required=True)
    parser.add_argument("--sim-val", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="first N images per set")
    args = parser.parse_args()

    model = dataclasses.replace(NucleusModel.load(args.model), precision="fp32")
    excluded = set(model.config.get("excluded_sources", []))
    if len(excluded) != 1:
        raise SystemExit(f"{args.model}: not a leave-one-source-out model ({excluded or 'none'})")
    (left_out,) = excluded
    consep = read_consep(args.consep, args.consep_csv)
    gbm40 = read_gbm40(args.gbm40)
    by_source = {"consep": consep, "gbm40": gbm40}

    def part(source: str, split: str):
        groups = set(HELD_OUT[source][split])
        return [i for i in by_source[source] if i.group in groups]

    sets = {"sim": read_simulated(args.sim_val)}
    for source in by_source:
        if source == left_out:
            sets[f"{source} (left out, all)"] = by_source[source]
        else:
            sets[source] = part(source, "val")
            sets[f"{source} test"] = part(source, "test")
    area = float(model.config.get("min_area_um2", 4.0))
    table = {}
    for name, images in sets.items():
        images = images[: args.limit] if args.limit else images
        print(f"{name}: {len(images)} images ...", flush=True)
        table[name] = counts(validation_maps(model, images), area)
    keys = list(table["sim"])
    target = f"{left_out} (left out, all)"
    tuned_on = [s for s in by_source if s != left_out]
    strategies = {
        "+".join(tuned_on): tuned_on,
        "+".join([*tuned_on, "sim"]): [*tuned_on, "sim"],
        "sim": ["sim"],
        "oracle": [target],
    }
    print(f"\nmodel {args.model} (left out: {left_out})")
    print("| tuned on | fg | seed | min_score | " + " | ".join(
        f"{s} F1 {r} µm" for s in (target, *(f"{t} test" for t in tuned_on)) for r in RADII
    ) + " |")  # fmt: skip
    rows = []
    for label, used in strategies.items():
        best = max(keys, key=lambda k: float(np.mean([f1(table[s][k])[0] for s in used])))
        scores = {s: f1(table[s][best]) for s in (target, *(f"{t} test" for t in tuned_on))}
        cells = " | ".join(f"{v:.3f}" for s in scores.values() for v in s)
        print(f"| {label} | {best[0]} | {best[1]} | {best[2]} | {cells} |")
        rows.append(
            {"model": str(args.model), "left_out": left_out, "tuned_on": label,
             "thresholds": {"fg": best[0], "seed": best[1], "min_score": best[2]},
             "f1": {s: {str(r): round(float(v), 4) for r, v in zip(RADII, f, strict=True)}
                    for s, f in scores.items()}}
        )  # fmt: skip
    record("nuclei_tuning", rows, echo=False)


if __name__ == "__main__":
    main()
