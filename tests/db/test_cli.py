"""The acceptance commands of the cell database, through the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from immunocto.cli import app
from immunocto.conventions import CLASSES
from immunocto.db import read_index

runner = CliRunner()


def _ok(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_build_query_gallery_export_import(db_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(db_run, run)
    out = _ok("build-db", run / "immunocto.yaml", "--labels", "gate")
    assert "current" in out and "kB per cell" in out
    out = _ok("db", "stats", run)
    assert "per class:" in out and "cd8_t" in out
    out = _ok(
        "db", "query", run, "SELECT label, count(*) AS n FROM crops GROUP BY label ORDER BY n DESC"
    )
    assert "5 rows" in out
    _ok("db", "query", run, "SELECT * FROM crops", "--csv", tmp_path / "q.csv")
    assert len((tmp_path / "q.csv").read_text().splitlines()) == read_index(run)[0].num_rows + 1
    _ok("db", "gallery", run, "--label", "cd8_t", "-n", "12", "--out", tmp_path / "g.png")
    sheet = np.asarray(Image.open(tmp_path / "g.png"))
    assert sheet.ndim == 3 and sheet.shape[0] > 100
    _ok(
        "export",
        "geojson",
        run / "immunocto.yaml",
        "--slide",
        "sim000",
        "--out",
        tmp_path / "s.geojson",
    )
    doc = json.loads((tmp_path / "s.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    assert {f["properties"]["classification"]["name"] for f in doc["features"]} & set(CLASSES)
    assert all("objectType" in f["properties"] for f in doc["features"])
    _ok("export", "anndata", run, "--out", tmp_path / "c.h5ad")
    assert (tmp_path / "c.h5ad").stat().st_size > 10_000
    _ok("export", "immunocto-png", run / "immunocto.yaml", "--out", tmp_path / "png")
    out = _ok("import", "immunocto-png", tmp_path / "png", "--out", tmp_path / "imported")
    assert f"imported {read_index(run)[0].num_rows} cells" in out


def test_clear_errors(db_run, tmp_path):
    result = runner.invoke(
        app,
        ["export", "geojson", str(db_run), "--slide", "nope", "--out", str(tmp_path / "x.geojson")],
    )
    assert (
        result.exit_code == 2
        and "--slide 'nope' is not in" in result.output
        and "sim000" in result.output
    )
    result = runner.invoke(app, ["db", "stats", str(tmp_path)])
    assert result.exit_code == 2 and "no crops.parquet" in result.output
    result = runner.invoke(app, ["build-db", str(db_run), "--splits", "0.5,0.5"])
    assert result.exit_code == 2 and "--splits must be three" in result.output
    result = runner.invoke(
        app, ["import", "immunocto-png", str(tmp_path), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "release layout" in result.output
