"""``immunocto run``: simulate the demo when no config is given, then run every stage.

Stages register themselves in :data:`STAGES` in data-flow order (register -> segment ->
quantify -> gate -> ... -> validate). Each takes the run config and a progress reporter and
returns a small dict for the summary. Each stage decides for itself whether its outputs are
current (fingerprints of inputs and parameters in its outputs' metadata), and every write is
atomic, so re-running after a crash redoes only the unfinished work.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from immunocto._parallel import local_cluster
from immunocto.config import CONFIG_NAME, RunConfig, load_config
from immunocto.errors import ConfigError, ImmunoctoError, is_out_of_space, out_of_space
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
    """One arrow of the data flow.

    ``target`` is ``"module:function"``, a function ``(cfg, progress) -> dict`` for the
    summary, imported only when the stage runs (so ``immunocto run --until gate`` never imports
    torch). ``immune_classes``: the stage is built for the database's five classes
    (:data:`conventions.CLASSES`) and is skipped, with the reason, when the gating tree gives
    other classes (a custom panel)."""

    name: str
    description: str
    target: str
    immune_classes: bool = False

    def run(self, cfg: RunConfig, progress: Progress) -> dict[str, Any]:
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)(cfg, progress)


def predict_with_scores(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
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


def validate_summary(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """The validation report, summarised: its path, the bias flags, ambiguity, hidden positives."""
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


_HERE = __name__
#: The pipeline, in data-flow order: (name, what it does, ``module:function``, immune classes only).
_TABLE: list[tuple[str, str, str, bool]] = [
    ("register", "H&E -> IF registration: affine + per-tile residual grid",
     "immunocto.register.stage:register_stage", False),
    ("segment", "candidate nuclei -> cells/<slide>.parquet + masks/<slide>.zarr",
     "immunocto.segment.stage:segment_stage", False),
    ("quantify", "per-cell IF statistics on raw IF pixels",
     "immunocto.quantify.stage:quantify_stage", False),
    ("gate", "gating tree, iterative thresholds, sensitivity -> gate_label",
     "immunocto.phenotype.stage:gate_stage", False),
    ("build-db", "64x64 crops + masks + IF of gated cells -> crops.zarr + crops.parquet",
     "immunocto.db.build:db_stage", True),
    ("review", "agreement report + V0 export of the decisions in review.sqlite, if any",
     "immunocto.review.stage:review_stage", True),
    ("train", "12-channel bootstrap classifier (H&E + mask + 8 IF) on V0",
     "immunocto.models.stage:train_stage", True),
    ("expand", "classify every candidate; V1 = V0 + confident calls the IF supports",
     "immunocto.models.stage:expand_stage", True),
    ("build-db-v1", "crops + masks of the V1 cells -> v1/crops.zarr: the H&E model's database",
     "immunocto.db.build:v1_db_stage", True),
    ("train-he", "H&E-only model (crop + mask + 256 px context) on he_training.labels",
     "immunocto.models.stage:train_he_stage", True),
    ("predict", "H&E alone -> typed cells (RUN/predictions); vs truth when simulated",
     f"{_HERE}:predict_with_scores", True),
    ("validate", "label-noise report -> RUN/reports/validation.html + .json",
     f"{_HERE}:validate_summary", True),
]  # fmt: skip

#: The stages, in order.
STAGES: list[Stage] = [Stage(*row) for row in _TABLE]


@dataclass
class RunSummary:
    """What ``immunocto run`` did, for the closing table."""

    config: RunConfig
    simulated: bool = False
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    log: Path | None = None
    skip_reason: str | None = None  # why the immune-class stages were skipped


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
        demo_dir, size=size, slides=slides, seed=seed, preview=True, workers=workers,
        progress=progress
    )  # fmt: skip
    return demo_dir / CONFIG_NAME, True


class _RunLog:
    """``RUN/logs/run.log``: every ``immunocto`` log record of the run, appended, with times."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "logs" / "run.log"
        self.handler: logging.Handler | None = None

    def __enter__(self) -> _RunLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        root = logging.getLogger("immunocto")
        self._level = root.level
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)
        root.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger("immunocto")
        if self.handler is not None:
            root.removeHandler(self.handler)
            self.handler.close()
        root.setLevel(self._level)


#: How long ``--scheduler`` waits for the scheduler to answer.
SCHEDULER_TIMEOUT = "30s"


@contextlib.contextmanager
def dask_cluster(workers: int | None, scheduler: str | None):
    """A ``distributed.Client``: on ``scheduler`` (an existing cluster, e.g. from
    dask-jobqueue or dask-kubernetes) or on a fresh ``LocalCluster`` of ``workers`` processes
    (one thread each); ``None`` when neither is asked for (local process pools)."""
    if not scheduler and not (workers and workers > 1):
        yield None
        return
    try:
        from distributed import Client
    except ImportError:
        if scheduler:
            raise ConfigError(
                "--scheduler needs dask.distributed: pip install 'immunocto[dist]'"
            ) from None
        log.warning("dask.distributed is not installed; using local worker processes")
        yield None
        return
    if scheduler:
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as e:
            raise ConfigError(
                f"--scheduler {scheduler}: no Dask scheduler answered within "
                f"{SCHEDULER_TIMEOUT} ({type(e).__name__}: {e}); start one (`dask scheduler`, "
                "or your dask-jobqueue / dask-kubernetes cluster) and give its address, or "
                "leave --scheduler out to use a LocalCluster"
            ) from None
        with client:
            log.info("per-tile work on the Dask cluster at %s", scheduler)
            try:
                yield client
            except Exception as e:
                if isinstance(e, ImmunoctoError) or client.status == "running":
                    raise  # the stage's own error, not the cluster's
                raise ImmunoctoError(
                    f"the Dask scheduler at {scheduler} stopped answering during the run "
                    f"({type(e).__name__}: {e}); what finished is kept: start the scheduler "
                    "again (or use a LocalCluster) and run the same command to resume"
                ) from None
        return
    with (
        local_cluster(workers, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        log.info("per-tile work on a Dask LocalCluster of %d workers", workers)
        yield client


def select_stages(from_stage: str | None = None, until: str | None = None) -> list[Stage]:
    """The stages from ``from_stage`` through ``until`` (both included; None = first / last).

    Raises
    ------
    ConfigError
        An unknown stage name (the message lists the names) or ``from`` after ``until``.
    """
    names = [s.name for s in STAGES]
    for flag, value in (("from_stage", from_stage), ("until", until)):
        if value is not None and value not in names:
            raise ConfigError(f"`{flag}`: unknown stage {value!r}; stages: {', '.join(names)}")
    first = names.index(from_stage) if from_stage else 0
    last = names.index(until) if until else len(names) - 1
    if first > last:
        raise ConfigError(
            f"`from_stage` {from_stage!r} comes after `until` {until!r} (order: {', '.join(names)})"
        )
    return STAGES[first : last + 1]


def custom_panel_reason(cfg: RunConfig) -> str | None:
    """Why the immune-class stages cannot run on this config's gating tree, or None.

    They can when every label of the tree is one of :data:`conventions.CLASSES` and at least
    one is an immune class (a tree with fewer classes, e.g. only T cells, still runs).
    """
    from immunocto.conventions import CLASSES, IMMUNE_CLASSES
    from immunocto.phenotype.tree import load_tree

    labels = load_tree(cfg.gating.tree, base=cfg.run_dir).labels
    if set(labels) <= set(CLASSES) and set(labels) & set(IMMUNE_CLASSES):
        return None
    return (
        f"custom panel: the gating tree's classes ({', '.join(labels)}) are not the database's "
        f"({', '.join(CLASSES)}); the cell database and the models are built for those. "
        "Gate labels are in RUN/cells/<slide>.parquet (gate_label), thresholds in RUN/gating/"
    )


def run_pipeline(
    config: str | os.PathLike[str] | None = None,
    *,
    demo_dir: Path = DEMO_DIR,
    demo_size: int = DEMO_SIZE,
    demo_slides: int = DEMO_SLIDES,
    workers: int | None = None,
    scheduler: str | None = None,
    dask: bool = False,
    from_stage: str | None = None,
    until: str | None = None,
    progress: Progress | None = None,
) -> RunSummary:
    """Run every stage on ``config`` (or on the demo when ``None``).

    With ``dask`` (and ``workers`` > 1) or a ``scheduler`` address, per-tile work (segment,
    quantify, crop cutting) runs as Dask tasks; otherwise on local worker processes. The log
    goes to ``RUN/logs/run.log``. Stages skip what is current, so a killed run resumes.

    ``from_stage`` / ``until`` run only the stages from / through the named ones (a stage
    still computes what it needs and is missing, e.g. ``gate`` quantifies first). Stages built
    for the five immune classes are skipped, with the reason in the summary, when the gating
    tree has other classes (:func:`custom_panel_reason`).
    """
    from immunocto._parallel import use_dask

    progress = progress or NullProgress()
    simulated = False
    seconds: dict[str, float] = {}
    if config is None:
        t0 = time.perf_counter()
        config, simulated = prepare_demo(
            Path(demo_dir), size=demo_size, slides=demo_slides, workers=workers, progress=progress
        )
        seconds["simulate"] = time.perf_counter() - t0
    stages = select_stages(from_stage, until)
    cfg = load_config(config)
    summary = RunSummary(config=cfg, simulated=simulated, seconds=seconds)
    custom = custom_panel_reason(cfg) if any(st.immune_classes for st in stages) else None
    removed = clean_stale_temporaries(cfg.run_dir)
    if removed:
        log.info("removed %d temporaries left by an interrupted run", removed)
    with (
        _RunLog(cfg.run_dir) as run_log,
        dask_cluster(workers if dask else None, scheduler) as client,
        use_dask(client) if client is not None else contextlib.nullcontext(),
    ):
        log.info(
            "run %s: %d slide(s), stages %s",
            cfg.run_dir,
            len(cfg.slides),
            ", ".join(s.name for s in stages),
        )
        for stage in stages:
            t0 = time.perf_counter()
            if custom and stage.immune_classes:
                log.info("stage %s skipped: %s", stage.name, custom)
                summary.stages[stage.name] = {"skipped": "custom panel (see log)"}
                summary.seconds[stage.name] = 0.0
                summary.skip_reason = custom
                continue
            log.info("stage %s: %s", stage.name, stage.description)
            try:
                summary.stages[stage.name] = stage.run(cfg, progress)
            except OSError as exc:  # a full disk where no atomic write could name the file
                if not is_out_of_space(exc):
                    raise
                raise out_of_space(exc, f"stage {stage.name}'s outputs in {cfg.run_dir}") from exc
            summary.seconds[stage.name] = time.perf_counter() - t0
            log.info(
                "stage %s done in %.1f s: %s",
                stage.name,
                summary.seconds[stage.name],
                summary.stages[stage.name],
            )
        summary.log = run_log.path
        summary.class_counts = class_counts(cfg)
    return summary


def clean_stale_temporaries(run_dir: Path) -> int:
    """Remove the ``.<name>.<random>.tmp`` folders (and ``.<name>.old``) that atomic writes
    leave behind when a run is killed; the outputs they were replacing are untouched."""
    import re
    import shutil

    pattern = re.compile(r"^\..+\.(tmp|old)$")
    removed = 0
    for folder in [
        run_dir,
        *(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
    ]:
        for entry in folder.iterdir():
            if pattern.match(entry.name):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
    return removed


def class_counts(cfg: RunConfig) -> dict[str, dict[str, int]]:
    """Cells per class at each labelling step: truth (simulated runs), gate, V0, V1 (its
    classes are what the V1 database holds), prediction."""
    import pyarrow.parquet as pq

    out: dict[str, dict[str, int]] = {}

    def add(name: str, values) -> None:
        row = out.setdefault(name, {})
        for v in values:
            row[str(v)] = row.get(str(v), 0) + 1

    for s in cfg.slides:
        truth = cfg.run_dir / "truth" / s.id / "cells.parquet"
        if truth.exists():
            add("truth", pq.read_table(truth, columns=["class"]).column(0).to_pylist())
        cells = cfg.run_dir / "cells" / f"{s.id}.parquet"
        if cells.exists():
            names = pq.read_schema(cells).names
            for col, name in (
                ("gate_label", "gate"),
                ("review_label", "V0 (review)"),
                ("v1_label", "V1"),
            ):
                if col in names:
                    add(name, pq.read_table(cells, columns=[col]).column(0).to_pylist())
        pred = cfg.run_dir / "predictions" / f"{s.id}.parquet"
        if pred.exists() and "pred_label" in pq.read_schema(pred).names:
            add(
                "H&E model",
                pq.read_table(pred, columns=["pred_label"]).column(0).to_pylist(),
            )
    return out
