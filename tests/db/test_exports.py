"""Exports (QuPath GeoJSON, AnnData, the Immunocto PNG layout), the PNG import, DuckDB queries."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image
from skimage.draw import polygon as fill_polygon

from immunocto.conventions import CLASSES
from immunocto.db import CropStore, read_index, store_path
from immunocto.db.anndata_export import write_anndata
from immunocto.db.geojson import CLASS_COLOURS, write_geojson
from immunocto.db.immunocto_png import export_png, import_png
from immunocto.db.query import query, stats
from immunocto.errors import ImmunoctoError, InputFileError


def test_geojson_is_a_qupath_feature_collection_of_mask_outlines(db_run, tmp_path):
    cells = pq.read_table(db_run / "cells/sim000.parquet").to_pandas().set_index("cell_id")
    out, n = write_geojson(
        db_run / "cells/sim000.parquet",
        db_run / "masks/sim000.zarr",
        tmp_path / "s.geojson",
        tile=512,
    )
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == n == len(cells)
    labels = set()
    mask = zarr.open_array(str(db_run / "masks/sim000.zarr"), mode="r")[:]
    errors = []
    for f in doc["features"]:
        p = f["properties"]
        assert p["objectType"] == "cell" and p["nucleusGeometry"] == f["geometry"]
        name = p["classification"]["name"]
        labels.add(name)
        assert p["classification"]["color"] == list(CLASS_COLOURS[name])
        cid = int(f["id"].split("-")[1])
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert f["geometry"]["type"] == "Polygon" and (ring[0] == ring[-1]).all()
        row = cells.loc[cid]
        assert name == row["gate_label"]
        assert p["measurements"]["area_um2"] == pytest.approx(row["area_um2"], rel=1e-3)
        # the polygon covers the cell's own mask pixels
        rr, cc = fill_polygon(ring[:, 1], ring[:, 0], mask.shape)
        inside = np.zeros(mask.shape, bool)
        inside[rr, cc] = True
        own = mask == cid
        errors.append(np.logical_xor(inside, own).sum() / own.sum())
        if len(errors) > 40:
            break
    assert np.median(errors) < 0.35
    assert {"cd4_t", "other"} <= labels <= set(CLASSES) | {"ambiguous", "unlabeled"}
    out, _ = write_geojson(
        db_run / "cells/sim000.parquet",
        db_run / "masks/sim000.zarr",
        tmp_path / "d.geojson",
        object_type="detection",
    )
    first = json.loads(out.read_text())["features"][0]["properties"]
    assert first["objectType"] == "detection" and "nucleusGeometry" not in first
    with pytest.raises(ImmunoctoError, match="cell or detection"):
        write_geojson(
            db_run / "cells/sim000.parquet",
            db_run / "masks/sim000.zarr",
            tmp_path / "x.geojson",
            object_type="tile",
        )


def test_anndata_has_markers_labels_and_spatial(db_run, tmp_path):
    import anndata as ad

    paths = [db_run / "cells/sim000.parquet", db_run / "cells/sim001.parquet"]
    adata = ad.read_h5ad(write_anndata(paths, tmp_path / "cells.h5ad"))
    tables = [pq.read_table(p).to_pandas() for p in paths]
    assert adata.n_obs == sum(len(t) for t in tables)
    assert "CD8a" in adata.var_names and "Hoechst" in adata.var_names
    first = tables[0].iloc[10]
    name = f"sim000:{first['cell_id']}"
    assert adata[name].X[0, list(adata.var_names).index("CD8a")] == pytest.approx(
        first["CD8a_mean"], rel=1e-5
    )
    assert adata.obs.loc[name, "gate_label"] == first["gate_label"]
    np.testing.assert_allclose(adata[name].obsm["spatial"][0], [first["x"], first["y"]])


def test_png_layout_round_trip_keeps_pixels_masks_and_labels(db_run, tmp_path):
    out = tmp_path / "png"
    n = export_png(db_run, out)
    index = read_index(db_run)[0].to_pandas()
    assert n == len(index)
    r = index.iloc[0]
    name = f"{r['label']}_{round(r['x'])}_{round(r['y'])}.png"
    he_file = out / r["patient"] / "HE" / name
    assert he_file.exists() and (out / r["patient"] / "mask" / name).exists()
    assert np.asarray(Image.open(he_file)).shape == (64, 64, 3)
    imported = tmp_path / "imported"
    assert import_png(out, imported) == n
    back = read_index(imported)[0].to_pandas()
    src_store = CropStore.open_readonly(store_path(db_run))
    new_store = CropStore.open_readonly(store_path(imported))
    a = (
        index.assign(cx=np.round(index["x"]), cy=np.round(index["y"]))
        .set_index(["patient", "cx", "cy"])
        .sort_index()
    )
    b = back.set_index(["patient", "x", "y"]).sort_index()
    assert list(a.index) == list(b.index)
    assert (a["label"].to_numpy() == b["label"].to_numpy()).all()
    he_a = src_store.he.get_orthogonal_selection((a["row"].to_numpy(),))
    order = np.argsort(b["row"].to_numpy())
    he_b = new_store.he.get_orthogonal_selection((np.sort(b["row"].to_numpy()),))[np.argsort(order)]
    np.testing.assert_array_equal(he_a, he_b)
    mk_a = src_store.mask.get_orthogonal_selection((a["row"].to_numpy(),))
    mk_b = new_store.mask.get_orthogonal_selection((np.sort(b["row"].to_numpy()),))[
        np.argsort(order)
    ]
    np.testing.assert_array_equal(mk_a, mk_b)
    # one patient, one split; the existing database is not overwritten by accident
    assert (back.groupby("patient")["split"].nunique() == 1).all()
    with pytest.raises(ImmunoctoError, match="--overwrite"):
        import_png(out, imported)


def test_png_import_names_the_bad_file(tmp_path):
    (tmp_path / "p1" / "HE").mkdir(parents=True)
    (tmp_path / "p1" / "mask").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "p1" / "HE" / "CD8_10_20.png")
    with pytest.raises(InputFileError, match=r"mask.*CD8_10_20.png"):
        import_png(tmp_path, tmp_path / "out")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "p1" / "mask" / "CD8_10_20.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(
        tmp_path / "p1" / "HE" / "neutrophil_1_2.png"
    )
    with pytest.raises(InputFileError, match="unknown class 'neutrophil'"):
        import_png(tmp_path, tmp_path / "out")
    (tmp_path / "p1" / "HE" / "neutrophil_1_2.png").unlink()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "p1" / "HE" / "cd4_1_2.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "p1" / "mask" / "cd4_1_2.png")
    with pytest.raises(InputFileError, match=r"cd4_1_2.png: expected a \(64, 64, 3\) image"):
        import_png(tmp_path, tmp_path / "out")
    (tmp_path / "p1" / "HE" / "cd4_1_2.png").unlink()
    assert import_png(tmp_path, tmp_path / "out") == 1
    assert read_index(tmp_path / "out")[0].column("label").to_pylist() == [
        "cd8_t"
    ]  # alias CD8 -> cd8_t


def test_duckdb_views_over_crops_and_cells(db_run):
    index = read_index(db_run)[0].to_pandas()
    s = stats(db_run)
    assert s["cells"].sum() == len(index)
    per = s.groupby("label")["cells"].sum()
    assert (per == index["label"].value_counts().sort_index()).all()
    joined = query(
        db_run,
        "SELECT k.label, avg(c.CD8a_mean) AS cd8 FROM crops k JOIN cells c USING (slide_id, cell_id) GROUP BY k.label",
    ).set_index("label")
    assert joined.loc["cd8_t", "cd8"] > joined.loc["cd4_t", "cd8"]
    n_cells = query(db_run, "SELECT count(*) AS n FROM cells")["n"][0]
    assert n_cells == sum(
        pq.read_metadata(p).num_rows for p in (db_run / "cells").glob("*.parquet")
    )
    with pytest.raises(ImmunoctoError, match="query failed.*views: crops, cells"):
        query(db_run, "SELECT nope FROM crops")
