"""Training of the H&E nucleus network (``immunocto train --kind nuclei``).

Batches mix the sources by weight (real CoNSeP and GBM40, the simulator), each augmented
hard (:mod:`immunocto.models.nuclei_aug`). Loss: BCE + soft Dice on the foreground, squared
error on the normalised distance map (weighted to nucleus pixels), cross-entropy of the type
head on typed nucleus pixels. The learning rate warms up, then follows a cosine to zero at
``steps``; a checkpoint (weights, optimiser, step, random state) is written every
``checkpoint_every`` steps and when the time budget ends, so a run resumes where it stopped.
At the end the post-processing thresholds are tuned on the validation images (whole source
images never used for training) and the model folder is written.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from immunocto._fs import atomic_path
from immunocto._modelfolder import write_model_folder
from immunocto.models.nuclei_aug import AugmentParams, appearance, appearance_nuclear, geometric
from immunocto.models.nuclei_data import SourceImage, TileSet
from immunocto.progress import NullProgress, Progress
from immunocto.segment.learned import NucleusModel, check_nucleus_config
from immunocto.segment.net import TYPES, NucleusNet, normalise_rgb
from immunocto.segment.nucleus_post import drop_objects, instances_from_maps

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: How far a new model folder's network adapts its batch-norm statistics to each slide
#: (``bn_adapt`` in ``config.json``; :mod:`immunocto.segment.bn_adapt`). 0.5 was best of
#: 0.3 / 0.5 / 0.7 on both leave-one-source-out models (``benchmarks/nuclei_real.py``).
BN_ADAPT = 0.5


@dataclass
class NucleusTraining:
    """Settings of one training run (recorded in ``config.json``)."""

    steps: int = 6000
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 150
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64, 128)
    model_mpp: float = 0.5
    source_weights: dict[str, float] = field(default_factory=dict)  # default: equal
    checkpoint_every: int = 200
    type_weight: float = 0.5
    augment: AugmentParams = field(default_factory=AugmentParams)
    #: ``rgb`` (H&E) or ``nuclear`` (a fluorescence nuclear stain: one channel, no types)
    input: str = "rgb"
    #: Views of each window averaged at inference (``tta`` in ``config.json``,
    #: :data:`immunocto.segment.learned.TTA_VIEWS`); the thresholds are tuned with them.
    tta: int = 1


def _lr_at(step: int, t: NucleusTraining) -> float:
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    frac = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def _type_class_weights(sets: dict[str, TileSet]) -> torch.Tensor:
    """Inverse square-root pixel frequency of each type over the typed sources (mean 1)."""
    counts = np.zeros(len(TYPES))
    for s in sets.values():
        counts += s.targets[:, 2 : 2 + len(TYPES)].astype(np.float32).sum(axis=(0, 2, 3))
    w = 1.0 / np.sqrt(np.maximum(counts, 1.0))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def draw_batch(
    sets: dict[str, TileSet], weights: dict[str, float], batch: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (B, 3, S, S) float 0..255, targets (B, T, S, S) float)``, sources drawn by
    weight, tiles uniformly within a source."""
    names = list(sets)
    p = torch.tensor([weights.get(n, 1.0) for n in names], dtype=torch.float64)
    which = torch.multinomial(p / p.sum(), batch, replacement=True, generator=gen).tolist()
    imgs, tgts = [], []
    for k in which:
        s = sets[names[k]]
        i = int(torch.randint(len(s), (1,), generator=gen))
        imgs.append(torch.from_numpy(s.images[i]).permute(2, 0, 1))
        tgts.append(torch.from_numpy(s.targets[i].astype(np.float32)))
    return torch.stack(imgs).float(), torch.stack(tgts)


def loss_terms(
    logits: torch.Tensor, targets: torch.Tensor, type_weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Loss parts of logits ``(B, 2 + K, S, S)`` against augmented targets ``(B, 3 + K, S, S)``."""
    k = len(TYPES)
    fg_t = targets[:, 0].clamp(0, 1)
    dist_t = targets[:, 1].clamp(0, 1)
    onehot = targets[:, 2 : 2 + k]
    known = targets[:, 2 + k]
    fg_logit = logits[:, 0]
    bce = F.binary_cross_entropy_with_logits(fg_logit, fg_t)
    p = torch.sigmoid(fg_logit)
    inter = (p * fg_t).sum(dim=(1, 2))
    dice = 1 - ((2 * inter + 1) / (p.sum(dim=(1, 2)) + fg_t.sum(dim=(1, 2)) + 1)).mean()
    w = fg_t + 0.1
    dist = ((torch.sigmoid(logits[:, 1]) - dist_t) ** 2 * w).sum() / w.sum()
    typed = (fg_t > 0.5) & (known > 0.5) & (onehot.sum(dim=1) > 0.5)
    if typed.any():
        target = onehot.argmax(dim=1)[typed]
        tl = logits[:, 2:].permute(0, 2, 3, 1)[typed]
        types = F.cross_entropy(tl, target, weight=type_weights)
    else:
        types = logits.sum() * 0.0
    return {"bce": bce, "dice": dice, "distance": 10.0 * dist, "types": types}


def _save_checkpoint(path: Path, net, opt, step: int, gen: torch.Generator, history) -> None:
    state = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "step": torch.tensor(step),
        "generator": gen.get_state(),
        "history": torch.tensor(
            [[h["step"], h["loss"], h["seconds"]] for h in history], dtype=torch.float64
        ),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_nuclei(
    sets: dict[str, TileSet],
    out: str | Path,
    *,
    training: NucleusTraining | None = None,
    validation: dict[str, list[SourceImage]] | None = None,
    minutes: float | None = None,
    stop_after: int | None = None,
    provenance: dict[str, Any] | None = None,
    progress: Progress | None = None,
    device: str = "auto",
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) the nucleus network on ``sets`` and write the model folder ``out``.

    Parameters
    ----------
    sets : dict of name -> TileSet
        Training tiles per source, at ``training.model_mpp``.
    out : path
        Model folder; ``out/checkpoint.pt`` is the resume point while training runs.
    validation : dict of name -> list of SourceImage, optional
        Whole held-out images per source at their own resolution: the post-processing
        thresholds are tuned on them and their figures go into ``config.json``.
    device : str
        ``auto`` (a GPU when there is one), ``cpu``, ``cuda``...; augmentation stays on the CPU.
    minutes : float, optional
        Wall-clock budget: stop after it with a checkpoint (rerun to resume); the model
        folder is only written once ``training.steps`` are done.
    stop_after : int, optional
        Like ``minutes``, in steps of this call (checkpoint, then return).
    init : path, optional
        A nucleus model folder (same widths and input) whose weights the network starts from,
        with a fresh optimiser and schedule: e.g. the shipped model trained on for longer.

    Returns
    -------
    dict with ``done`` (bool), ``step`` and, when done, ``config`` (the folder's config).
    """
    t = training or NucleusTraining()
    progress = progress or NullProgress()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    from immunocto.models.checkpoint import pick_device

    dev = pick_device(device)
    nuclear = t.input == "nuclear"
    types = () if nuclear else TYPES
    net = NucleusNet(t.widths, n_types=len(types), in_channels=1 if nuclear else 3).to(dev)
    augment = appearance_nuclear if nuclear else appearance
    opt = torch.optim.AdamW(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    step, history = 0, []
    ck = out / CHECKPOINT
    if init is not None and not ck.exists():
        _load_init(net, init, t)
    if ck.exists():
        state = torch.load(ck, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        gen.set_state(state["generator"])
        history = [
            {"step": int(a), "loss": float(b), "seconds": float(c)}
            for a, b, c in state["history"].tolist()
        ]
        log.info("resuming nucleus training at step %d of %d", step, t.steps)
    type_w = _type_class_weights(sets).to(dev)
    t_start = time.perf_counter()
    elapsed0 = history[-1]["seconds"] if history else 0.0
    running: list[float] = []
    progress.start("train nuclei", t.steps)
    progress.advance("train nuclei", step)
    net.train()
    first = step
    while step < t.steps:
        out_of_time = minutes is not None and time.perf_counter() - t_start > minutes * 60
        if out_of_time or (stop_after is not None and step - first >= stop_after):
            _save_checkpoint(ck, net, opt, step, gen, history)
            log.info("time budget reached at step %d; checkpoint written", step)
            return {"done": False, "step": step}
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, t)
        imgs, tgts = draw_batch(sets, t.source_weights, t.batch, gen)
        imgs, tgts = geometric(imgs, tgts, gen, t.augment.max_scale)
        imgs = augment(imgs, gen, t.augment)
        imgs, tgts = imgs.to(dev), tgts.to(dev)
        logits = net(normalise_rgb(imgs))
        parts = loss_terms(logits, tgts, type_w)
        loss = parts["bce"] + parts["dice"] + parts["distance"] + t.type_weight * parts["types"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(float(loss.detach()))
        step += 1
        progress.advance("train nuclei")
        if step % 50 == 0 or step == t.steps:
            history.append(
                {
                    "step": step,
                    "loss": float(np.mean(running)),
                    "seconds": elapsed0 + time.perf_counter() - t_start,
                }
            )
            running = []
            log.info(
                "step %d: loss %.4f (%.0f s)", step, history[-1]["loss"], history[-1]["seconds"]
            )
        if step % t.checkpoint_every == 0:
            _save_checkpoint(ck, net, opt, step, gen, history)
    _save_checkpoint(ck, net, opt, step, gen, history)
    config = {
        "kind": "if-nuclei" if nuclear else "nuclei",
        "input": t.input,
        "in_channels": 1 if nuclear else 3,
        "mpp": t.model_mpp,
        "widths": list(t.widths),
        "types": list(types),
        "fg_threshold": 0.5,
        "seed_threshold": 0.5,
        "min_area_um2": 4.0,
        "bn_adapt": 0.0 if nuclear else BN_ADAPT,
        "tta": t.tta,
        # the tuned thresholds everywhere; "views" (segment.post_tune) is opt-in, see its page
        "post_tuning": "fixed",
        "training": {
            **{k: v for k, v in asdict(t).items() if k != "augment"},
            "augment": asdict(t.augment),
            "seconds": history[-1]["seconds"] if history else 0.0,
            "sources": {
                n: {"tiles": len(s), "images": sorted(set(s.groups))} for n, s in sets.items()
            },
        },
        "history": history,
        **(provenance or {}),
    }
    config["training"]["device"] = str(dev)
    if init is not None:
        config["training"]["init"] = str(init)
    net = net.cpu().eval()
    model = NucleusModel.from_network(net, config)
    if validation:
        tuned = tune_thresholds(model, validation)
        config.update(tuned["best"])
        config["validation"] = tuned
    tensors = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    write_model_folder(out, tensors, config)
    return {"done": True, "step": step, "config": config}


def _load_init(net: NucleusNet, folder: str | Path, t: NucleusTraining) -> None:
    """Start ``net`` from a nucleus model folder's weights (a clear error when they do not
    fit this training's network)."""
    from immunocto.errors import ImmunoctoError

    start = NucleusModel.load(folder)  # reads and checks the folder (errors name its files)
    config = start.config
    if list(config["widths"]) != list(t.widths) or config.get("input", "rgb") != t.input:
        raise ImmunoctoError(
            f"{folder}/config.json: widths {config['widths']} / input "
            f"{config.get('input', 'rgb')!r} do not fit this training "
            f"({list(t.widths)} / {t.input!r}); start from a folder of the same kind"
        )
    net.load_state_dict(start.net.state_dict())


def tune_thresholds(
    model: NucleusModel,
    validation: dict[str, list[SourceImage]],
    *,
    fg_grid: tuple[float, ...] = (0.4, 0.5, 0.6),
    seed_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7),
    score_grid: tuple[float, ...] = (0.0, 0.7, 0.75, 0.8, 0.85),
    radius_um: float = 1.5,
) -> dict[str, Any]:
    """Pick ``fg_threshold`` / ``seed_threshold`` / ``min_score`` maximising the mean over
    sources of the detection F1 (centroids one-to-one within ``radius_um``) on the
    validation images (whole source images never trained on)."""
    import dataclasses

    from immunocto.validate.metrics import centroids, detection_by_distance

    # full precision, so the tuned values do not depend on the machine's bf16 support
    model = dataclasses.replace(model, precision="fp32")
    # network maps and truth centroids once per image; only the post-processing varies
    maps = {name: validation_maps(model, imgs) for name, imgs in validation.items()}
    min_area_um2 = float(model.config.get("min_area_um2", 4.0))
    counts: dict[tuple[float, float, float], dict[str, np.ndarray]] = {}
    for fg_thr in fg_grid:
        for seed_thr in seed_grid:
            for name, items in maps.items():
                for img, (fg, dist, _), txy in items:
                    base = instances_from_maps(
                        fg, dist, fg_threshold=fg_thr, seed_threshold=seed_thr,
                        min_area_px=min_area_um2 / img.mpp**2,
                    )  # fmt: skip
                    for smin in score_grid:  # the watershed does not depend on min_score
                        lab = drop_objects(base, fg, min_score=smin) if smin > 0 else base
                        _, pxy = centroids(lab)
                        d = detection_by_distance(txy * img.mpp, pxy * img.mpp, radius=radius_um)
                        per = counts.setdefault((fg_thr, seed_thr, smin), {})
                        acc = per.setdefault(name, np.zeros(3))
                        acc += (d["all"]["tp"], d["all"]["fp"], d["all"]["fn"])
    scores = []
    for (fg_thr, seed_thr, smin), per in counts.items():
        f1 = {n: float(2 * tp / max(2 * tp + fp + fn, 1)) for n, (tp, fp, fn) in per.items()}
        scores.append(
            {
                "fg_threshold": fg_thr,
                "seed_threshold": seed_thr,
                "min_score": smin,
                "f1": f1,
                "mean_f1": float(np.mean(list(f1.values()))),
            }
        )
    best = max(scores, key=lambda s: s["mean_f1"])
    out = {
        "best": {k: best[k] for k in ("fg_threshold", "seed_threshold", "min_score")},
        "f1_at_best": best["f1"],
        "radius_um": radius_um,
        "images": {n: sorted({i.group for i in imgs}) for n, imgs in validation.items()},
    }
    typed = [
        (img, m, txy) for items in maps.values() for img, m, txy in items if img.types is not None
    ]
    if typed:
        weights = tune_type_weights(model, typed, out["best"], min_area_um2=min_area_um2)
        out["best"]["type_weights"] = weights.pop("type_weights")
        out["types"] = weights
    return out


def validation_maps(
    model: NucleusModel, images: list[SourceImage]
) -> list[tuple[SourceImage, tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]]:
    """``(image, model.maps(...), truth centroids)`` per image, the network first adapted to
    each source image (its patches together, as a slide backend adapts to its slide) when the
    config's ``bn_adapt`` is above 0: thresholds are tuned on the maps users will get."""
    from immunocto.validate.metrics import centroids

    groups: dict[str, list[SourceImage]] = {}
    for img in images:
        groups.setdefault(img.group, []).append(img)
    out = []
    # a fluorescence source image is stored scaled already (0-255)
    kw = {"scale": (0.0, 255.0)} if model.nuclear else {}
    for members in groups.values():
        m = model.adapted([i.rgb for i in members], members[0].mpp)
        for i in members:
            fg, dist, types = m.maps(i.rgb, i.mpp, **kw)
            if m is not model and i.types is not None:  # types come from the trained network
                types = model.maps(i.rgb, i.mpp)[2]
            out.append((i, (fg, dist, types), centroids(i.instances)[1]))
    return out


#: Candidate per-type weights of :func:`tune_type_weights`.
TYPE_WEIGHT_GRID = (0.5, 0.7, 1.0, 1.4, 2.0, 3.0)


def tune_type_weights(
    model: NucleusModel,
    typed: list[tuple[SourceImage, tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]],
    post: dict[str, float],
    *,
    min_area_um2: float,
    min_nuclei: int = 20,
    radius_um: float = 3.0,
) -> dict[str, Any]:
    """Per-type weights on the type head's mean probabilities (``argmax(w * p)``) maximising
    the mean per-type F1 of the detected nuclei (matched within ``radius_um``) on the typed
    validation images. Types with fewer than ``min_nuclei`` validation nuclei keep weight 1
    (too few to tune on). A prior correction: the head trained on class-imbalanced crops
    under-calls the rarer inflammatory nuclei."""
    import itertools

    from immunocto.validate.metrics import centroids, match_points

    k = len(model.types)
    probs, truth = [], []
    for img, (fg, dist, types), txy in typed:
        labels = instances_from_maps(
            fg, dist, fg_threshold=post["fg_threshold"], seed_threshold=post["seed_threshold"],
            min_area_px=min_area_um2 / img.mpp**2,
        )  # fmt: skip
        if post.get("min_score", 0) > 0:
            labels = drop_objects(labels, fg, min_score=post["min_score"])
        n = int(labels.max())
        sums = np.stack(
            [np.bincount(labels.ravel(), weights=p.ravel(), minlength=n + 1) for p in types], 1
        )
        pid, pxy = centroids(labels)
        tid, _ = centroids(img.instances)
        ti, pi = match_points(txy * img.mpp, pxy * img.mpp, radius=radius_um)
        cls = np.array([img.types.get(int(t), -1) for t in tid[ti]], int)
        keep = cls >= 0
        probs.append(sums[pid[pi][keep]])
        truth.append(cls[keep])
    p = np.concatenate(probs) if probs else np.zeros((0, k))
    t = np.concatenate(truth) if truth else np.zeros(0, int)
    counts = np.bincount(t, minlength=k)
    tuned = [c for c in range(k) if counts[c] >= min_nuclei]

    def f1s(w: np.ndarray) -> np.ndarray:
        pred = np.argmax(p * w, axis=1)
        tp = np.array([np.sum((pred == c) & (t == c)) for c in range(k)], float)
        fp = np.array([np.sum((pred == c) & (t != c)) for c in range(k)], float)
        fn = np.array([np.sum((pred != c) & (t == c)) for c in range(k)], float)
        return 2 * tp / np.maximum(2 * tp + fp + fn, 1)

    best_w, best = np.ones(k), -1.0
    for combo in itertools.product(TYPE_WEIGHT_GRID, repeat=len(tuned)):
        w = np.ones(k)
        w[tuned] = combo
        score = float(f1s(w)[tuned].mean()) if tuned else 0.0
        if score > best + 1e-9:
            best_w, best = w, score
    return {
        "type_weights": [float(v) for v in best_w],
        "nuclei_per_type": {model.types[c]: int(counts[c]) for c in range(k)},
        "tuned_types": [model.types[c] for c in tuned],
        "type_f1_unweighted": {
            model.types[c]: round(float(v), 4) for c, v in enumerate(f1s(np.ones(k)))
        },
        "type_f1_at_best": {model.types[c]: round(float(v), 4) for c, v in enumerate(f1s(best_w))},
    }


def retune_model_folder(
    folder: str | Path,
    validation: dict[str, list[SourceImage]],
    *,
    command: str | None = None,
    tta: int | None = None,
) -> dict:
    """Re-tune the post-processing of a finished model folder on ``validation`` and rewrite
    its ``config.json`` (the weights stay as they are; ``command`` is recorded as
    ``retune_command``; ``tta``, when given, becomes the folder's test-time views first, so
    the thresholds fit them). Returns the new config."""
    from immunocto._modelfolder import read_model_folder

    folder = Path(folder)
    tensors, config = read_model_folder(folder)
    config.setdefault("bn_adapt", BN_ADAPT)  # a folder from before slide adaptation adopts it
    if tta is not None:
        config["tta"] = int(tta)
    check_nucleus_config(config, f"{folder}/config.json")
    excluded = set(config.get("excluded_sources", []))
    leak = excluded & set(validation)
    if leak:
        raise ValueError(
            f"{folder}: the model was trained without {', '.join(sorted(leak))}; its images "
            "are test images and may not tune it"
        )
    tuned = tune_thresholds(NucleusModel.from_network(_network(tensors, config), config),
                            validation)  # fmt: skip
    config.update(tuned["best"])
    config["validation"] = tuned
    if command:
        config["retune_command"] = command
    write_model_folder(folder, tensors, config)
    return config


def _network(tensors: dict[str, np.ndarray], config: dict[str, Any]) -> NucleusNet:
    net = NucleusNet(tuple(config["widths"]), n_types=len(config["types"]))
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
    return net.eval()
