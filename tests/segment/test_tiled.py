"""Tiles never duplicate or cut a cell: a tiled run equals one big tile."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from helpers import simulate_small
from immunocto.config import load_config
from immunocto.io import open_pair
from immunocto.register import load_registration, run_register
from immunocto.segment.base import SlideContext
from immunocto.segment.classical import HeBackend, IfNuclearBackend
from immunocto.segment.stage import run_segment
from immunocto.segment.tiled import segment_slide
from immunocto.validate import match_instances


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = simulate_small(tmp_path_factory.mktemp("tiles") / "run", size=768, seed=8, tile=256)
    cfg = load_config(out)
    run_register(cfg)
    return out, cfg


@pytest.mark.parametrize("backend", [IfNuclearBackend, HeBackend])
def test_small_tiles_equal_one_big_tile(run, tmp_path, backend):
    _, cfg = run
    he, if_ = open_pair(cfg, 0)
    with he, if_:
        ctx = SlideContext("sim000", he, if_, load_registration(cfg, "sim000"))
        be = backend()
        segment_slide(ctx, be, tmp_path / "whole.zarr", tile=768, halo=64)
        ctx.stats.clear()
        # 128 px tiles: the grid cuts through hundreds of nuclei
        tiled = segment_slide(ctx, be, tmp_path / "tiled.zarr", tile=128, halo=64)
    a = np.asarray(zarr.open_array(str(tmp_path / "whole.zarr"), mode="r")[:])
    b = np.asarray(zarr.open_array(str(tmp_path / "tiled.zarr"), mode="r")[:])
    assert int(np.sum(tiled["edge_dist_px"] < 10)) > 50  # many cells sat near a tile edge
    ov = match_instances(a, b)
    assert len(ov.truth_ids) == len(ov.pred_ids)  # nothing duplicated, nothing lost
    assert np.mean(ov.iou > 0.95) > 0.99  # and each cell is the same cell
    # labels are the cell ids of the table, areas are the written pixels
    ids = np.unique(b[b > 0])
    np.testing.assert_array_equal(np.sort(tiled["cell_id"]), ids)
    counts = np.bincount(b.ravel())
    np.testing.assert_array_equal(counts[tiled["cell_id"].astype(int)], tiled["area_px"])


def test_workers_give_the_same_cell_table(run):
    _, cfg = run
    tables = []
    for workers in (1, 2):
        params = cfg.segmentation.model_copy(update={"workers": workers, "tile_px": 256})
        res = run_segment(cfg, backend="if-nuclear", force=True, params=params)[0]
        tables.append(pq.read_table(res.cells).to_pandas())
    assert len(tables[0]) > 100
    assert tables[0].equals(tables[1])


class _SizedHe(HeBackend):
    """he-classical plus two per-object columns, the way the nucleus network adds its types:
    a string and a float, indexed by the window's object ids."""

    def segment(self, ctx, x, y, w, h):
        labels, scores = super().segment(ctx, x, y, w, h)
        area = np.bincount(labels.ravel(), minlength=len(scores)).astype(np.float64)
        kind = np.where(area >= 150, "big", "small").astype(object)
        return labels, scores, {"size_kind": kind, "window_area": area}

    def object_columns(self):
        return {"size_kind": "string", "window_area": "float32"}


def test_backend_columns_reach_the_cell_table_from_any_worker(run, tmp_path):
    from immunocto.segment.base import SlidePaths
    from immunocto.segment.stage import write_cell_table

    _, cfg = run
    paths = SlidePaths.for_slide(cfg, cfg.slides[0])
    tables = []
    he, if_ = open_pair(cfg, 0)
    with he, if_:
        for workers, tile in ((1, 768), (2, 128)):
            ctx = SlideContext("sim000", he)
            tables.append(
                segment_slide(
                    ctx,
                    _SizedHe(),
                    tmp_path / f"{workers}.zarr",
                    tile=tile,
                    halo=64,
                    workers=workers,
                    paths=paths,
                )
            )
    one, many = tables
    assert len(one["cell_id"]) > 100 and set(one["size_kind"]) == {"big", "small"}
    # each row's columns are its own object's, whichever tile and worker segmented it
    np.testing.assert_array_equal(
        one["size_kind"], np.where(one["window_area"] >= 150, "big", "small")
    )
    assert np.mean(one["window_area"] == one["area_px"]) > 0.99
    order = [np.lexsort((t["y"], t["x"])) for t in tables]
    np.testing.assert_array_equal(one["size_kind"][order[0]], many["size_kind"][order[1]])
    # written to Parquet with their types; an empty slide's table has them too
    path = write_cell_table(
        tmp_path / "c.parquet", "sim000", 0.5, "x", one, {}, _SizedHe().object_columns()
    )
    t = pq.read_table(path)
    assert str(t.schema.field("size_kind").type) == "string"
    assert str(t.schema.field("window_area").type) == "float"
    empty = {k: v[:0] for k, v in one.items()}
    e = pq.read_table(
        write_cell_table(
            tmp_path / "e.parquet", "s", 0.5, "x", empty, {}, _SizedHe().object_columns()
        )
    )
    assert e.num_rows == 0 and {"size_kind", "window_area"} <= set(e.schema.names)


def test_undeclared_backend_columns_are_refused(run, tmp_path):
    class Undeclared(_SizedHe):
        def object_columns(self):
            return {}

    _, cfg = run
    he, if_ = open_pair(cfg, 0)
    with he, if_, pytest.raises(RuntimeError, match="declared"):
        segment_slide(SlideContext("sim000", he), Undeclared(), tmp_path / "u.zarr", tile=768)
