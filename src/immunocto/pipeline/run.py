"""``immunocto run``: simulate the demo when no config is given, then run every stage.

Stages register themselves in :data:`STAGES` in data-flow order (register -> segment ->
quantify -> gate -> ... -> validate). Each takes the run config and a progress reporter and
returns a small dict for the summary. Caching and resumption come with the pipeline issue;
today a stage decides for itself whether its outputs are current.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from immunocto.config import CONFIG_NAME, RunConfig, load_config
from immunocto.errors import ConfigError
from immunocto.progress import NullProgress, Progress

log = logging.getLogger(__name__)

#: Where ``immunocto run`` with no config puts the demo.
DEMO_DIR = Path("immunocto-demo")
#: The demo: small enough for 2 cores, two slides so later stages can split by slide.
DEMO_SIZE = 2048
DEMO_SLIDES = 2
DEMO_SEED = 0


@dataclass(frozen=True)
class Stage:
    """One arrow of the data flow."""

    name: str
    description: str
    run: Callable[[RunConfig, Progress], dict[str, Any]]


def _register(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.register.stage import register_stage

    return register_stage(cfg, progress)


def _segment(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.segment.stage import segment_stage

    return segment_stage(cfg, progress)


def _quantify(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.quantify.stage import quantify_stage

    return quantify_stage(cfg, progress)


def _gate(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.phenotype.stage import gate_stage

    return gate_stage(cfg, progress)


def _build_db(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.db.build import db_stage

    return db_stage(cfg, progress)


def _review(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.review.stage import review_stage

    return review_stage(cfg, progress)


def _train(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.models.stage import train_stage

    return train_stage(cfg, progress)


def _expand(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.models.stage import expand_stage

    return expand_stage(cfg, progress)


def _train_he(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.models.stage import train_he_stage

    return train_he_stage(cfg, progress)


def _predict(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """``predict`` on every slide's H&E; on simulated runs, lymphocyte and macrophage F1
    against the truth per slide (with its split)."""
    from immunocto.db.store import read_index
    from immunocto.models.stage import predict_stage
    from immunocto.validate.detection import evaluate_tables

    summary = predict_stage(cfg, progress)
    tables = summary.pop("tables")
    idx = read_index(cfg.run_dir)[0]
    split = {}
    if idx.num_rows:
        df = idx.select(["slide_id", "split"]).to_pandas().drop_duplicates("slide_id")
        split = dict(zip(df["slide_id"], df["split"], strict=True))
    for s in cfg.slides:
        truth = cfg.run_dir / "truth" / s.id / "cells.parquet"
        if s.id in tables and truth.exists():
            det = evaluate_tables(truth, tables[s.id], mpp=s.mpp)
            tag = f"{s.id}_{split.get(s.id, 'unsplit')}"
            summary[f"{tag}_lymphocyte_f1"] = det["groups"]["lymphocyte"]["f1"]
            summary[f"{tag}_macrophage_f1"] = det["groups"]["macrophage"]["f1"]
    return summary


def _validate(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.validate.report import run_validate

    _, html_path, rep = run_validate(cfg, progress=progress)
    out: dict[str, Any] = {"report": str(html_path), "flags": len(rep["bias_audit"]["flags"])}
    if rep["ambiguity"]["ambiguous_fraction"] is not None:
        out["ambiguous_pct"] = round(100 * rep["ambiguity"]["ambiguous_fraction"], 2)
    pl = rep["partial_labels"]
    out["hidden_immune_est"] = pl["hidden_immune_estimate"]
    if "hidden_immune_true" in pl:
        out["hidden_immune_true"] = pl["hidden_immune_true"]
    return out


#: The stages built so far, in order.
STAGES: list[Stage] = [
    Stage("register", "H&E -> IF registration: affine + per-tile residual grid", _register),
    Stage("segment", "candidate nuclei -> cells/<slide>.parquet + masks/<slide>.zarr", _segment),
    Stage("quantify", "per-cell IF statistics on raw IF pixels", _quantify),
    Stage("gate", "gating tree, iterative thresholds, sensitivity -> gate_label", _gate),
    Stage(
        "build-db",
        "64x64 crops + masks + IF of gated cells -> crops.zarr + crops.parquet",
        _build_db,
    ),
    Stage(
        "review", "agreement report + V0 export of the decisions in review.sqlite, if any", _review
    ),
    Stage("train", "12-channel bootstrap classifier (H&E + mask + 8 IF) on V0", _train),
    Stage("expand", "classify every candidate; keep p >= min_prob as v1_label (V1)", _expand),
    Stage(
        "train-he", "H&E-only model (crop + mask + 256 px context) on he_training.labels", _train_he
    ),
    Stage(
        "predict", "H&E alone -> typed cells (RUN/predictions); vs truth when simulated", _predict
    ),
    Stage("validate", "label-noise report -> RUN/reports/validation.html + .json", _validate),
]


@dataclass
class RunSummary:
    """What ``immunocto run`` did, for the closing table."""

    config: RunConfig
    simulated: bool = False
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _demo_is_current(demo_dir: Path, size: int, slides: int, seed: int) -> bool:
    path = demo_dir / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        cfg = load_config(path, check_files=True)
    except ConfigError:
        return False
    sim = cfg.simulation
    if sim is None or (sim.size, sim.slides, sim.seed, sim.artifacts) != (
        size,
        slides,
        seed,
        "default",
    ):
        return False
    truth = cfg.resolve(sim.truth)
    return all((truth / s.id / "cells.parquet").is_file() for s in cfg.slides)


def prepare_demo(
    demo_dir: Path = DEMO_DIR,
    *,
    size: int = DEMO_SIZE,
    slides: int = DEMO_SLIDES,
    seed: int = DEMO_SEED,
    workers: int | None = None,
    progress: Progress | None = None,
) -> tuple[Path, bool]:
    """Simulate the demo into ``demo_dir`` unless an identical one is already there.

    Returns the config path and whether it was (re)simulated.
    """
    if _demo_is_current(demo_dir, size, slides, seed):
        log.info("demo in %s is current; not simulating again", demo_dir)
        return demo_dir / CONFIG_NAME, False
    from immunocto.simulate.dataset import simulate_dataset

    simulate_dataset(
        demo_dir,
        size=size,
        slides=slides,
        seed=seed,
        preview=True,
        workers=workers,
        progress=progress,
    )
    return demo_dir / CONFIG_NAME, True


def run_pipeline(
    config: str | os.PathLike[str] | None = None,
    *,
    demo_dir: Path = DEMO_DIR,
    demo_size: int = DEMO_SIZE,
    demo_slides: int = DEMO_SLIDES,
    workers: int | None = None,
    progress: Progress | None = None,
) -> RunSummary:
    """Run every stage built so far on ``config`` (or on the demo when ``None``)."""
    progress = progress or NullProgress()
    simulated = False
    seconds: dict[str, float] = {}
    if config is None:
        t0 = time.perf_counter()
        config, simulated = prepare_demo(
            Path(demo_dir), size=demo_size, slides=demo_slides, workers=workers, progress=progress
        )
        seconds["simulate"] = time.perf_counter() - t0
    cfg = load_config(config)
    summary = RunSummary(config=cfg, simulated=simulated, seconds=seconds)
    for stage in STAGES:
        t0 = time.perf_counter()
        log.info("stage %s: %s", stage.name, stage.description)
        summary.stages[stage.name] = stage.run(cfg, progress)
        summary.seconds[stage.name] = time.perf_counter() - t0
    return summary
