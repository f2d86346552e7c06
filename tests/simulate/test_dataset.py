"""The simulated run folder: files, formats, determinism and truth consistency."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from helpers import read_if, simulate_small
from immunocto.config import load_config
from immunocto.conventions import CLASSES, ORION_CHANNELS
from immunocto.errors import ImmunoctoError
from immunocto.simulate.dataset import simulate_dataset
from immunocto.simulate.params import ARTIFACTS

EXPECTED_FILES = {
    "immunocto.yaml",
    "preview/sim000.png",
    "slides/sim000/he.ome.tif",
    "slides/sim000/if.ome.tif",
    "slides/sim000/markers.csv",
    "truth/sim000/cells.parquet",
    "truth/sim000/nuclei.tif",
    "truth/sim000/cells.tif",
    "truth/sim000/registration.json",
    "truth/sim000/artifacts.json",
}


def test_writes_exactly_the_documented_files(sim_run):
    files = {p.relative_to(sim_run).as_posix() for p in sim_run.rglob("*") if p.is_file()}
    assert files == EXPECTED_FILES


def test_config_is_ready_to_run(sim_run):
    cfg = load_config(sim_run / "immunocto.yaml")
    assert [s.id for s in cfg.slides] == ["sim000"]
    slide = cfg.slides[0]
    assert slide.mpp == 0.325 and cfg.resolve(slide.if_).is_file()
    assert cfg.simulation.seed == 3 and set(cfg.simulation.artifact_strengths) == set(ARTIFACTS)


def test_he_is_tiled_pyramidal_rgb_with_mpp(sim_run):
    with tifffile.TiffFile(sim_run / "slides/sim000/he.ome.tif") as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert series.axes == "YXS" and series.dtype == np.uint8
        assert [lv.shape for lv in series.levels] == [(768, 768, 3), (384, 384, 3)]
        assert all(p.is_tiled for p in tif.pages)
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert pixels["PhysicalSizeX"] == pytest.approx(0.325)
    assert pixels["PhysicalSizeY"] == pytest.approx(0.325)


def test_if_has_the_19_orion_channels_in_order(sim_run):
    data, names = read_if(sim_run)
    assert names == list(ORION_CHANNELS)
    assert data.dtype == np.uint16 and data.shape == (19, 768, 768)
    with tifffile.TiffFile(sim_run / "slides/sim000/if.ome.tif") as tif:
        assert len(tif.series[0].levels) == 2 and tif.pages[0].is_tiled
    markers = (sim_run / "slides/sim000/markers.csv").read_text().splitlines()
    assert markers[0].split(",")[-1] == "marker_name"
    assert [line.split(",")[-1] for line in markers[1:]] == list(ORION_CHANNELS)


def test_if_signal_lives_in_the_right_compartment(sim_run):
    data, names = read_if(sim_run)
    nuclei = tifffile.imread(sim_run / "truth/sim000/nuclei.tif")
    cells = tifffile.imread(sim_run / "truth/sim000/cells.tif")
    reg = json.loads((sim_run / "truth/sim000/registration.json").read_text())
    # compare inside/outside nuclei where registration is nearly identity locally:
    # resample through the true transform
    from scipy import ndimage

    from immunocto.simulate.transform import TruthTransform

    t = TruthTransform.from_dict(reg)
    ys, xs = np.mgrid[0:768, 0:768]
    u, v = t.he_to_if(xs.ravel().astype(float), ys.ravel().astype(float))

    def sample(ch):
        return ndimage.map_coordinates(
            data[names.index(ch)].astype(float), [v, u], order=1
        ).reshape(768, 768)

    hoechst = sample("Hoechst")
    nuc = nuclei > 0
    cyto = (cells > 0) & ~nuc
    assert np.median(hoechst[nuc]) > 5 * np.median(hoechst[~(cells > 0)])
    blank = sample("Argo550")
    assert np.median(blank[nuc]) < 1.2 * np.median(blank[~(cells > 0)])  # the blank stays blank
    assert cyto.sum() > 0


def test_truth_table_columns_and_classes(sim_run):
    table = pq.read_table(sim_run / "truth/sim000/cells.parquet")
    cols = set(table.column_names)
    assert {"cell_id", "x", "y", "x_um", "y_um", "class", "fine_type", "region"} <= cols
    assert {f"art_{a}" for a in ARTIFACTS} <= cols
    assert {f"expr_{m}" for m in ("CD45", "CD3e", "CD4", "CD8a", "CD20", "CD68", "CD163")} <= cols
    df = table.to_pandas()
    assert set(df["class"]) <= set(CLASSES) and set(df["class"]) == set(CLASSES)
    np.testing.assert_allclose(df["x_um"], df["x"] * 0.325)
    assert df["cell_id"].is_unique
    meta = json.loads(table.schema.metadata[b"immunocto"])
    assert meta["seed"] == 3


def test_every_truth_cell_has_pixels_in_both_label_images(sim_run):
    df = pq.read_table(sim_run / "truth/sim000/cells.parquet").to_pandas()
    nuclei = tifffile.imread(sim_run / "truth/sim000/nuclei.tif")
    cells = tifffile.imread(sim_run / "truth/sim000/cells.tif")
    ids = set(df["cell_id"])
    assert set(np.unique(nuclei)) - {0} == ids
    assert set(np.unique(cells)) - {0} == ids
    inside = nuclei > 0
    assert np.array_equal(cells[inside], nuclei[inside])  # a nucleus lies in its own cell
    areas = np.bincount(nuclei.ravel())
    np.testing.assert_array_equal(areas[df["cell_id"]], df["nucleus_area_px"])
    # the table's centre lies in (or next to) the cell's own nucleus
    x = np.clip(np.rint(df["x"]).astype(int), 0, 767)
    y = np.clip(np.rint(df["y"]).astype(int), 0, 767)
    assert np.mean(nuclei[y, x] == df["cell_id"]) > 0.95


def test_same_seed_gives_byte_identical_files_whatever_the_workers(tmp_path):
    a = simulate_small(tmp_path / "a", workers=1)
    b = simulate_small(tmp_path / "b", workers=2)
    for rel in ("slides/sim000/he.ome.tif", "slides/sim000/if.ome.tif", "truth/sim000/nuclei.tif",
                "truth/sim000/cells.tif", "truth/sim000/cells.parquet", "truth/sim000/registration.json"):  # fmt: skip
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = simulate_small(tmp_path / "c", seed=12)
    assert (a / "slides/sim000/he.ome.tif").read_bytes() != (
        c / "slides/sim000/he.ome.tif"
    ).read_bytes()


def test_rerun_into_the_same_folder_replaces_and_prunes(tmp_path):
    out = simulate_small(tmp_path / "run", slides=2)
    assert (out / "slides/sim001").is_dir()
    simulate_small(out, slides=1)
    assert not (out / "slides/sim001").exists() and not (out / "truth/sim001").exists()
    assert [s.id for s in load_config(out).slides] == ["sim000"]


def test_refuses_a_folder_with_other_content(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ImmunoctoError, match=r"not empty.*--force"):
        simulate_dataset(tmp_path, size=256, tile=256)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"artifacts": "spicy"}, "unknown artifact preset 'spicy'"),
        ({"artifact_overrides": {"glitter": 1.0}}, "unknown artifact 'glitter'"),
        ({"artifact_overrides": {"spillover": -1.0}}, "strength must be >= 0"),
        ({"size": 100}, "at least 256"),
        ({"slides": 0}, "at least 1"),
        ({"tile": 100}, "multiple of 16"),
    ],
)
def test_bad_parameters_are_explained(tmp_path, kwargs, message):
    with pytest.raises(ImmunoctoError, match=message):
        simulate_dataset(tmp_path / "x", **{"size": 256, **kwargs})
