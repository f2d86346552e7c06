"""Simulate one co-registered H&E + IF slide pair with its ground truth.

Three phases, memory bounded by a few tiles whatever the slide size:

1. *Biology*: tissue layout, cells, true expression, artifacts, the true H&E->IF mapping
   (arrays of per-cell values: a few hundred bytes per cell).
2. *Rendering*, tile by tile on a thread pool: H&E RGB, the 19 IF channels in IF space, and
   the truth label images, written into scratch tile stores on disk (level 0 already
   deflate-encoded by the workers, level 1 raw).
3. *Writing*: pyramids built tile by tile, then tiled pyramidal OME-TIFFs streamed from the
   scratch arrays; the truth table, registration and artifact records.

Every random draw comes from a stream derived from ``(seed, slide_index, purpose[, tile])``,
so the output is byte-identical for a seed whatever the number of threads.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from immunocto._fs import atomic_path, atomic_write_text
from immunocto._parallel import ordered_map
from immunocto.conventions import ORION_CHANNELS
from immunocto.io.ome_tiff import write_ome_tiff
from immunocto.io.pyramid import build_pyramid, downsample2
from immunocto.io.tilestore import TileStore
from immunocto.progress import NullProgress, Progress
from immunocto.simulate.artifacts import SPILLOVER, SlideArtifacts, plant_artifacts
from immunocto.simulate.biology import (
    EXPRESSED_MARKERS,
    FINE_TO_CLASS,
    FINE_TYPES,
    MACROPHAGE_MORPHS,
    expression_table,
)
from immunocto.simulate.cells import Objects, generate_objects
from immunocto.simulate.layout import REGIONS, TissueLayout, make_layout
from immunocto.simulate.params import SimParams
from immunocto.simulate.render_he import Stain, render_he_tile
from immunocto.simulate.render_if import Exposure, render_if_tile
from immunocto.simulate.transform import TruthTransform, make_transform

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("5b0f5d7e-55a1-4c1b-9a59-6f1d6c0c0c7a")

#: Stream ids (``purpose``) of the slide's random generators.
_STREAMS = ("layout", "cells", "expression", "artifacts", "stain", "exposure", "transform")


@dataclass
class SlideFiles:
    """Where one simulated slide's files went."""

    slide_id: str
    he: Path
    if_: Path
    markers: Path
    truth_dir: Path
    n_cells: int
    class_counts: dict[str, int]


def _rng(params: SimParams, purpose: str, *extra: int) -> np.random.Generator:
    code = _STREAMS.index(purpose) if purpose in _STREAMS else 100 + sum(map(ord, purpose))
    return np.random.default_rng([params.seed, params.slide_index, code, *extra])


def write_markers_csv(path: Path) -> Path:
    """MCMICRO-style ``markers.csv`` for the 19 Orion channels."""
    lines = ["channel_number,cycle,marker_name"]
    lines += [f"{i + 1},1,{name}" for i, name in enumerate(ORION_CHANNELS)]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def simulate_slide(
    params: SimParams,
    slide_dir: Path,
    truth_dir: Path,
    *,
    workers: int = 2,
    progress: Progress | None = None,
) -> SlideFiles:
    """Simulate one slide pair into ``slide_dir`` (images) and ``truth_dir`` (truth).

    Parameters
    ----------
    params : SimParams
    slide_dir : Path
        Receives ``he.ome.tif``, ``if.ome.tif`` and ``markers.csv``.
    truth_dir : Path
        Receives ``cells.parquet``, ``nuclei.tif``, ``cells.tif``, ``registration.json``
        and ``artifacts.json``.
    workers : int
        Threads rendering tiles (the result does not depend on it).
    progress : Progress, optional
    """
    progress = progress or NullProgress()
    sid = params.slide_id
    t_start = time.perf_counter()
    size, tile = params.size, params.tile

    # 1. biology ---------------------------------------------------------------------
    layout = make_layout(params, _rng(params, "layout"))
    objects = generate_objects(layout, params, _rng(params, "cells"))
    n_cells = int(objects.is_cell.sum())
    expr_true = expression_table(objects.fine, _rng(params, "expression"))
    transform = make_transform(size, params.strength("misregistration"), _rng(params, "transform"))
    expr_obs, truth_cols, slide_art = plant_artifacts(
        objects, expr_true, params, transform, _rng(params, "artifacts")
    )
    stain = Stain.draw(_rng(params, "stain"))
    exposure = Exposure.draw(_rng(params, "exposure"))
    extent = objects.extent()
    if_xy = (truth_cols["if_x"], truth_cols["if_y"])
    # Object index -> label id: cells get 1..n_cells, red blood cells 0.
    label_of = np.zeros(len(objects) + 1, np.uint32)
    label_of[:n_cells] = np.arange(1, n_cells + 1, dtype=np.uint32)
    log.info(
        "%s: %d cells, %d red blood cells (%.1f s)",
        sid, n_cells, len(objects) - n_cells, time.perf_counter() - t_start,
    )  # fmt: skip

    # 2. rendering into scratch tile stores ---------------------------------------------
    scratch = slide_dir.parent / f".scratch-{sid}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        n_ch = len(ORION_CHANNELS)
        half = (size + 1) // 2
        stores = {
            "he": TileStore(scratch / "he0", (size, size, 3), np.uint8, tile, layout="rgb", encoded=True),
            "if": TileStore(scratch / "if0", (n_ch, size, size), np.uint16, tile, layout="channels", encoded=True),
            "nuc": TileStore(scratch / "nuc", (size, size), np.uint32, tile, layout="labels", encoded=True),
            "cell": TileStore(scratch / "cell", (size, size), np.uint32, tile, layout="labels", encoded=True),
            "he1": TileStore(scratch / "he1", (half, half, 3), np.uint8, tile // 2, layout="rgb"),
            "if1": TileStore(scratch / "if1", (n_ch, half, half), np.uint16, tile // 2, layout="channels"),
        }  # fmt: skip
        world = _World(
            params=params, objects=objects, extent=extent, layout=layout, stain=stain,
            artifacts=slide_art, transform=transform, exposure=exposure, expr=expr_obs,
            if_xy=if_xy, label_of=label_of, n_cells=n_cells, stores=stores,
        )  # fmt: skip
        n_t = -(-size // tile)
        tiles = [(ty, tx) for ty in range(n_t) for tx in range(n_t)]
        nuc_area = np.zeros(n_cells + 1, np.int64)
        cell_area = np.zeros(n_cells + 1, np.int64)
        progress.start(f"{sid} render", len(tiles))
        rendered = ordered_map(
            _render_in_worker,
            tiles,
            workers=workers,
            setup=_same_world,
            setup_args=(world,),
            local_context=world,
        )
        for a_nuc, a_cell in rendered:
            nuc_area += a_nuc
            cell_area += a_cell
            progress.advance(f"{sid} render")
        log.info("%s: rendered %d tiles (%.1f s)", sid, len(tiles), time.perf_counter() - t_start)

        # 3. files -------------------------------------------------------------------------
        slide_dir.mkdir(parents=True, exist_ok=True)
        truth_dir.mkdir(parents=True, exist_ok=True)
        he_levels = [
            stores["he"],
            *build_pyramid(
                stores["he1"], scratch / "he", tile=tile, level0_shape=stores["he"].shape
            ),
        ]
        if_levels = [
            stores["if"],
            *build_pyramid(
                stores["if1"], scratch / "if", tile=tile, level0_shape=stores["if"].shape
            ),
        ]
        log.info("%s: pyramids built (%.1f s)", sid, time.perf_counter() - t_start)
        n_write = 4
        # level-0 scratch tiles are deleted as they are copied in (consume_stores): a 32768²
        # pair would otherwise need its ~35 GB twice, scratch and files side by side
        progress.start(f"{sid} write", n_write, unit="files")
        jobs = [
            lambda: write_ome_tiff(
                slide_dir / "he.ome.tif", he_levels, layout="rgb", mpp=params.mpp, tile=tile,
                uuid=str(uuid.uuid5(_NAMESPACE, f"{params.seed}/{sid}/he")), name=f"{sid} H&E",
                consume_stores=True,
            ),
            lambda: write_ome_tiff(
                slide_dir / "if.ome.tif", if_levels, layout="channels", mpp=params.mpp, tile=tile,
                channel_names=ORION_CHANNELS, name=f"{sid} IF",
                uuid=str(uuid.uuid5(_NAMESPACE, f"{params.seed}/{sid}/if")), consume_stores=True,
            ),
            lambda: write_ome_tiff(truth_dir / "nuclei.tif", [stores["nuc"]], layout="labels", mpp=params.mpp, tile=tile, consume_stores=True),
            lambda: write_ome_tiff(truth_dir / "cells.tif", [stores["cell"]], layout="labels", mpp=params.mpp, tile=tile, consume_stores=True),
        ]  # fmt: skip
        with ThreadPoolExecutor(max_workers=max(1, min(workers, n_write))) as pool:
            for _ in pool.map(lambda job: job(), jobs):
                progress.advance(f"{sid} write")
        log.info("%s: OME-TIFFs written (%.1f s)", sid, time.perf_counter() - t_start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    markers = write_markers_csv(slide_dir / "markers.csv")
    table = truth_table(
        objects, n_cells, expr_true, expr_obs, truth_cols, nuc_area, cell_area, params
    )
    with atomic_path(truth_dir / "cells.parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    registration = {
        "slide_id": sid,
        "he_shape": [size, size],
        "if_shape": [size, size],
        "mpp": params.mpp,
        **transform.to_dict(),
    }
    atomic_write_text(truth_dir / "registration.json", json.dumps(registration, indent=1) + "\n")
    atomic_write_text(
        truth_dir / "artifacts.json",
        json.dumps(artifact_record(params, slide_art), indent=1) + "\n",
    )
    classes = table.column("class").to_pylist()
    counts = {c: classes.count(c) for c in sorted(set(classes))}
    return SlideFiles(
        slide_id=sid,
        he=slide_dir / "he.ome.tif",
        if_=slide_dir / "if.ome.tif",
        markers=markers,
        truth_dir=truth_dir,
        n_cells=table.num_rows,
        class_counts=counts,
    )


@dataclass
class _World:
    """Everything a worker needs to render any tile of the slide (pickled once per worker)."""

    params: SimParams
    objects: Objects
    extent: np.ndarray
    layout: TissueLayout
    stain: Stain
    artifacts: SlideArtifacts
    transform: TruthTransform
    exposure: Exposure
    expr: np.ndarray
    if_xy: tuple[np.ndarray, np.ndarray]
    label_of: np.ndarray
    n_cells: int
    stores: dict[str, TileStore]

    def render_tile(self, ty: int, tx: int) -> tuple[np.ndarray, np.ndarray]:
        """Render tile ``(ty, tx)`` into the scratch stores (level 0 encoded, level 1 raw);
        return its per-cell nuclear and cell areas (bincounts over label ids)."""
        p = self.params
        tile, size = p.tile, p.size
        x0, y0 = tx * tile, ty * tile
        w, h = min(tile, size - x0), min(tile, size - y0)
        rgb, raster = render_he_tile(
            x0, y0, w, h,
            objects=self.objects, extent=self.extent, layout=self.layout, stain=self.stain,
            artifacts=self.artifacts, rng=_rng(p, "he-noise", ty, tx),
        )  # fmt: skip
        nuc = self.label_of[raster.nuc_obj]  # index -1 reads the trailing 0
        cel = self.label_of[raster.cell_obj]
        ifs = render_if_tile(
            x0, y0, w, h,
            objects=self.objects, extent=self.extent, if_xy=self.if_xy, expr=self.expr,
            layout=self.layout, transform=self.transform, artifacts=self.artifacts,
            exposure=self.exposure, rng=_rng(p, "if-noise", ty, tx),
        )  # fmt: skip
        st = self.stores
        st["he"].write_planes(ty, tx, rgb)
        st["if"].write_planes(ty, tx, ifs)
        st["nuc"].write_planes(ty, tx, nuc)
        st["cell"].write_planes(ty, tx, cel)
        st["he1"].write_planes(ty, tx, downsample2(rgb, 0, 1))
        st["if1"].write_planes(ty, tx, downsample2(ifs, 1, 2))
        return (
            np.bincount(nuc.ravel(), minlength=self.n_cells + 1),
            np.bincount(cel.ravel(), minlength=self.n_cells + 1),
        )


def _render_in_worker(world: _World, tile: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return world.render_tile(*tile)


def _same_world(world: _World) -> _World:
    return world


def truth_table(
    objects,
    n_cells: int,
    expr_true: np.ndarray,
    expr_obs: np.ndarray,
    cols: dict[str, np.ndarray],
    nuc_area: np.ndarray,
    cell_area: np.ndarray,
    params: SimParams,
) -> pa.Table:
    """One row per nucleated cell (``cell_id`` = its label in ``nuclei.tif``/``cells.tif``).

    Cells whose nucleus got no pixel (fully covered by neighbours) are left out, so every
    row has pixels in both label images.
    """
    cells = slice(0, n_cells)
    cell_id = np.arange(1, n_cells + 1, dtype=np.int32)
    fine_names = np.array(FINE_TYPES)[objects.fine[cells]]
    class_names = np.array([FINE_TO_CLASS[f] for f in fine_names]) if n_cells else np.array([], str)
    morph_names = np.array([*MACROPHAGE_MORPHS, ""])[objects.morph[cells]]
    x = objects.x[cells].astype(np.float64)
    y = objects.y[cells].astype(np.float64)
    data: dict[str, np.ndarray] = {
        "cell_id": cell_id,
        "x": x,
        "y": y,
        "x_um": x * params.mpp,
        "y_um": y * params.mpp,
        "class": class_names,
        "fine_type": fine_names,
        "morphology": morph_names,
        "region": np.array(REGIONS)[objects.region[cells]],
        "nucleus_area_px": nuc_area[1:].astype(np.int32),
        "cell_area_px": cell_area[1:].astype(np.int32),
        "nucleus_major_um": 2 * objects.a[cells] * params.mpp,
        "nucleus_minor_um": 2 * objects.b[cells] * params.mpp,
        "if_x": cols["if_x"][cells],
        "if_y": cols["if_y"][cells],
        "if_inside": (
            (cols["if_x"][cells] >= 0)
            & (cols["if_x"][cells] < params.size)
            & (cols["if_y"][cells] >= 0)
            & (cols["if_y"][cells] < params.size)
        ),
        "reg_dx": cols["reg_dx"][cells],
        "reg_dy": cols["reg_dy"][cells],
        "stain_attenuation": cols["stain_attenuation"][cells],
        "focus_blur_px": cols["focus_blur_px"][cells],
    }
    for name in sorted(k for k in cols if k.startswith("art_")):
        data[name] = cols[name][cells]
    for marker in EXPRESSED_MARKERS:
        c = ORION_CHANNELS.index(marker)
        data[f"expr_{marker}"] = expr_true[cells, c]
    for marker in EXPRESSED_MARKERS:
        c = ORION_CHANNELS.index(marker)
        data[f"measured_{marker}"] = expr_obs[cells, c]
    keep = data["nucleus_area_px"] > 0
    if not keep.all():
        log.warning(
            "%s: %d cells without visible nucleus left out of truth",
            params.slide_id,
            int((~keep).sum()),
        )
    table = pa.table({k: np.asarray(v)[keep] for k, v in data.items()})
    meta = {
        b"immunocto": json.dumps(
            {
                "what": "simulated ground truth",
                "slide_id": params.slide_id,
                "seed": params.seed,
                "size": params.size,
                "mpp": params.mpp,
                "artifacts": params.artifacts,
                "columns": {
                    "x, y": "nucleus-centre of the cell, H&E level-0 px (x = column, y = row)",
                    "if_x, if_y": "the same point in IF level-0 px (true registration)",
                    "reg_dx, reg_dy": "non-affine part of the misregistration at the cell (IF px)",
                    "expr_*": "true expression (1 = typical positive)",
                    "measured_*": "expression after per-cell artifacts, before pixel effects",
                    "art_*": "True where that artifact touched the cell",
                },
            }
        ).encode()
    }
    return table.replace_schema_metadata(meta)


def artifact_record(params: SimParams, slide_art) -> dict:
    """What was planted on the slide, for validation reports."""
    return {
        "slide_id": params.slide_id,
        "strengths": params.artifacts,
        "spillover": [
            {"source": s, "target": t, "fraction": f * params.strength("spillover")}
            for s, t, f in SPILLOVER
        ],
        "stain_gradient": {
            "direction_rad": round(slide_art.gradient_direction, 9),
            "max_loss": slide_art.gradient_max_loss,
            "model": "attenuation = 1 - max_loss * g * depth(marker); g in [0, 1] rises along direction_rad",
        },
        "out_of_focus": {
            "sigma_px": slide_art.focus_sigma,
            "patches_px": np.asarray(slide_art.focus_patches).round(3).tolist(),
        },
    }
