"""``immunocto simulate``: a run folder of simulated slide pairs with their ground truth.

Layout written under ``OUT``::

    immunocto.yaml                      ready-to-run config (slides + how they were made)
    slides/<slide_id>/he.ome.tif        H&E, RGB uint8, tiled, pyramidal, mpp in OME
    slides/<slide_id>/if.ome.tif        19 Orion channels, uint16, named in OME, pyramidal
    slides/<slide_id>/markers.csv       marker_name column (MCMICRO)
    truth/<slide_id>/cells.parquet      one row per true cell (class, fine type, artifacts ...)
    truth/<slide_id>/nuclei.tif         instance labels (H&E space), id = cell_id
    truth/<slide_id>/cells.tif          whole-cell instance labels (H&E space)
    truth/<slide_id>/registration.json  the true H&E -> IF mapping
    truth/<slide_id>/artifacts.json     what was planted
    preview/<slide_id>.png              with --preview

Truth lives apart from the slides so that no stage reads it by accident.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from immunocto.config import (
    CONFIG_NAME,
    ConfigError,
    HETrainParams,
    RunConfig,
    SimulationRecord,
    SlideConfig,
    TrainParams,
    load_config,
    write_config,
)
from immunocto.errors import ImmunoctoError
from immunocto.progress import Progress
from immunocto.simulate.params import SimParams, artifact_strengths
from immunocto.simulate.slide import SlideFiles, simulate_slide

log = logging.getLogger(__name__)

MAX_SIZE = 200_000


#: What a simulation writes at the top of its folder (a killed run leaves a subset).
_OWN_ENTRIES = {CONFIG_NAME, "slides", "truth", "preview"}


def _check_out_dir(out: Path, force: bool) -> None:
    """``out`` must be new, empty, or an earlier (possibly interrupted) simulation, unless
    ``force``: we never write over someone else's files by accident."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ImmunoctoError(f"{out}: exists and is not a folder; choose another OUT")
    entries = {e.name for e in out.iterdir()}
    if force or not entries:
        return
    if CONFIG_NAME not in entries and entries <= _OWN_ENTRIES:
        # An interrupted simulation: only our folders, holding only simN slides.
        names = {
            e.name
            for sub in ("slides", "truth")
            if (out / sub).is_dir()
            for e in (out / sub).iterdir()
        }
        if all(n.startswith(("sim", ".scratch-sim")) for n in names):
            return
    config = out / CONFIG_NAME
    if config.is_file():
        try:
            cfg = load_config(config, check_files=False)
        except ConfigError:
            cfg = None
        if cfg is not None and cfg.simulation is not None:
            return
    raise ImmunoctoError(
        f"{out}: folder is not empty and holds no earlier simulation; "
        "choose a new OUT or pass --force to write into it"
    )


def simulate_dataset(
    out: str | os.PathLike[str],
    *,
    size: int = 2048,
    slides: int = 1,
    seed: int = 0,
    artifacts: str = "default",
    artifact_overrides: dict[str, float] | None = None,
    tile: int = 512,
    mpp: float | None = None,
    workers: int | None = None,
    preview: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> RunConfig:
    """Simulate ``slides`` co-registered H&E + IF slide pairs into the run folder ``out``.

    Parameters
    ----------
    out : path-like
        Run folder (created). An earlier simulation there is overwritten.
    size : int
        Slide width and height in level-0 pixels.
    slides : int
        Number of slide pairs (``sim000``, ``sim001``, ...).
    seed : int
        Same seed, same bytes.
    artifacts : {'none', 'default', 'harsh', 'weak-stain'}
        Artifact preset; ``artifact_overrides`` sets single strengths on top.
    tile : int
        Tile edge for rendering and for the TIFFs.
    mpp : float, optional
        Level-0 microns per pixel of both images (default: Orion's 0.325). Cells keep their
        size in microns, so a larger ``mpp`` gives fewer pixels per nucleus.
    workers : int, optional
        Processes rendering tiles (default: the number of CPUs). Does not change output.
    preview : bool
        Also write ``preview/<slide_id>.png``.
    force : bool
        Write into a non-empty folder that is not an earlier simulation.

    Returns
    -------
    RunConfig
        The config written to ``out/immunocto.yaml``.
    """
    if slides < 1:
        raise ImmunoctoError(f"`slides` must be at least 1 (got {slides})", arguments=("slides",))
    if size > MAX_SIZE:
        raise ImmunoctoError(
            f"`size` {size} is larger than the supported {MAX_SIZE} px", arguments=("size",)
        )
    strengths = artifact_strengths(artifacts, artifact_overrides)
    out = Path(out).expanduser().resolve()
    _check_out_dir(out, force)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else max(1, os.cpu_count() or 1)

    results: list[SlideFiles] = []
    for k in range(slides):
        params = SimParams(
            size=size, seed=seed, slide_index=k, artifacts=strengths, tile=tile,
            mpp=mpp or SimParams().mpp,
        )  # fmt: skip
        log.info("simulating %s (%d x %d px)", params.slide_id, size, size)
        results.append(
            simulate_slide(
                params,
                out / "slides" / params.slide_id,
                out / "truth" / params.slide_id,
                workers=workers,
                progress=progress,
            )
        )
    _remove_stale(out, {r.slide_id for r in results})

    record = SimulationRecord(
        seed=seed, size=size, slides=slides, artifacts=artifacts, artifact_strengths=strengths,
        truth=Path("truth")
    )  # fmt: skip
    cfg = RunConfig(
        slides=[
            SlideConfig(
                id=r.slide_id,
                he=r.he.relative_to(out),
                **{"if": r.if_.relative_to(out)},
                markers=r.markers.relative_to(out),
                mpp=mpp or SimParams().mpp,
            )
            for r in results
        ],
        simulation=record,
        # simulated slides hold few cells: a short training schedule is enough
        training=TrainParams(epochs=8),
        he_training=HETrainParams(epochs=8),
    )
    cfg._run_dir = out
    write_config(cfg)
    if preview:
        from immunocto.simulate.preview import write_preview

        for r in results:
            write_preview(cfg, r.slide_id)
    return cfg


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Drop slides of an earlier, larger simulation in the same folder."""
    for sub in ("slides", "truth", "preview"):
        folder = out / sub
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            sid = entry.name.removesuffix(".png")
            if sid.startswith("sim") and sid not in keep:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
