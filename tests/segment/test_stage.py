from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import yaml
import zarr
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from helpers import simulate_small
from immunocto.cli import app
from immunocto.config import load_config
from immunocto.segment import run_segment
from immunocto.segment.stage import read_segment_meta
from immunocto.validate import centroids, detection_by_distance

COLUMNS = {
    "slide_id", "cell_id", "x", "y", "x_um", "y_um", "area_px", "bbox_x0", "bbox_y0", "bbox_x1",
    "bbox_y1", "eccentricity", "solidity", "seg_source", "seg_score", "tile_id", "edge_dist_px",
}  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return simulate_small(tmp_path_factory.mktemp("seg") / "run", size=1024, seed=4, tile=256)


@pytest.mark.parametrize(
    ("backend", "expected", "stat"),
    [(None, "if-learned", "stain_high"), ("if-nuclear", "if-nuclear", "threshold")],
    ids=["default-if-learned", "classical-if-nuclear"],
)
def test_the_if_backends_segment_and_match_truth(run, backend, expected, stat):
    cfg = load_config(run)
    res = run_segment(cfg, backend=backend, force=True)[0]
    assert res.backend == expected and res.status == "segmented"
    assert (run / "registration/sim000.json").is_file()  # registered on the way
    table = pq.read_table(res.cells).to_pandas()
    assert COLUMNS <= set(table.columns)
    assert (table["seg_source"] == expected).all() and table["cell_id"].is_unique
    mask = np.asarray(zarr.open_array(str(res.mask), mode="r")[:])
    assert set(np.unique(mask)) - {0} == set(table["cell_id"])
    truth = pq.read_table(run / "truth/sim000/cells.parquet", columns=["x", "y"]).to_pandas()
    det = detection_by_distance(
        truth[["x", "y"]].to_numpy() * 0.325, table[["x", "y"]].to_numpy() * 0.325, radius=4.0
    )
    assert det["all"]["recall"] >= 0.95  # the acceptance criterion, on a small slide
    assert det["all"]["precision"] >= 0.85  # not by over-segmenting
    meta = read_segment_meta(res.cells)
    assert meta["stage"] == "segment" and meta["backend"]["backend"] == expected
    assert stat in meta["slide_stats"]


def test_rerun_is_skipped_until_something_changes(run):
    cfg = load_config(run)
    run_segment(cfg)
    assert run_segment(cfg)[0].status == "current"
    params = cfg.segmentation.model_copy(update={"tile_px": 512})
    assert run_segment(cfg, params=params)[0].status == "segmented"


def test_he_only_slides_use_the_he_backend(run, tmp_path):
    cfg_text = yaml.safe_load((run / "immunocto.yaml").read_text())
    slide = cfg_text["slides"][0]
    slide["he"] = str(run / slide["he"])
    del slide["if"], slide["markers"]
    (tmp_path / "immunocto.yaml").write_text(yaml.safe_dump({"slides": [slide]}))
    cfg = load_config(tmp_path)
    res = run_segment(cfg)[0]
    assert res.backend == "he" and res.n_cells > 100
    truth = tifffile.imread(run / "truth/sim000/nuclei.tif")
    _, t = centroids(truth)
    table = pq.read_table(res.cells).to_pandas()
    det = detection_by_distance(t * 0.325, table[["x", "y"]].to_numpy() * 0.325, radius=4.0)
    assert det["all"]["recall"] > 0.9 and det["all"]["precision"] > 0.85
    # every cell carries the network's nucleus type and its probabilities
    types = ["inflammatory", "epithelial", "stromal", "other"]
    probs = table[[f"nucleus_p_{k}" for k in types]]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (table["nucleus_type"] == probs.idxmax(axis=1).str.removeprefix("nucleus_p_")).all()
    # ... and the types are the simulator's: lymphocytes inflammatory, tumour epithelial
    cells = pq.read_table(run / "truth/sim000/cells.parquet").to_pandas()
    dist, near = cKDTree(cells[["x", "y"]].to_numpy()).query(table[["x", "y"]].to_numpy())
    fine = cells["fine_type"].to_numpy()[near[dist < 6]]
    called = table["nucleus_type"].to_numpy()[dist < 6]
    lymph = np.isin(fine, ["cd4_t", "cd8_t", "b_cell", "treg"])
    assert lymph.sum() > 20 and (fine == "tumour").sum() > 20
    assert (called[lymph] == "inflammatory").mean() > 0.85
    assert (called[fine == "tumour"] == "epithelial").mean() > 0.85


def test_segment_and_validate_commands(run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["segment", str(run), "--backend", "he", "--force", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "segmented" in result.output
    from immunocto.segment.stage import read_segment_meta

    meta = read_segment_meta(run / "cells" / "sim000.parquet")
    assert meta["backend"]["backend"] == "he"  # the backend asked for, recorded with the cells
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["validate", "segmentation", "--truth", str(run / "truth/sim000/nuclei.tif"),
                                 "--pred", str(run / "masks/sim000.zarr"), "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    det = report["detection_centroid_4um"]
    assert det["recall"] > 0.9 and det["precision"] > 0.85 and report["object_dice"] > 0.75
    bad = runner.invoke(app, ["segment", str(run), "--backend", "magic"])
    assert bad.exit_code == 2 and "backend" in bad.stderr
    missing = runner.invoke(app, ["segment", str(run), "--backend", "sam", "--force"])
    assert missing.exit_code == 2 and "needs its checkpoint" in missing.stderr
