from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import mannwhitneyu
from typer.testing import CliRunner

from helpers import simulate_small
from immunocto.cli import app
from immunocto.config import load_config
from immunocto.conventions import ORION_CHANNELS
from immunocto.quantify import STATS, labels_in_if_space, run_quantify
from immunocto.register import RegistrationModel
from immunocto.validate import match_points


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = simulate_small(tmp_path_factory.mktemp("quant") / "run", size=1024, seed=6, tile=256)
    run_quantify(load_config(out))  # segments and registers on the way
    return out


def cells_with_truth(run):
    cells = pq.read_table(run / "cells/sim000.parquet").to_pandas()
    truth = pq.read_table(run / "truth/sim000/cells.parquet").to_pandas()
    ti, pi = match_points(
        truth[["x", "y"]].to_numpy() * 0.325, cells[["x", "y"]].to_numpy() * 0.325, 4.0
    )
    cls = np.full(len(cells), "", object)
    cls[pi] = truth["fine_type"].to_numpy()[ti]
    return cells, cls


def test_every_marker_and_statistic_is_a_column(run):
    cells = pq.read_table(run / "cells/sim000.parquet")
    for m in ORION_CHANNELS:
        for s in STATS:
            assert f"{m}_{s}" in cells.column_names
    assert "nuclear_confirmed" in cells.column_names and "seg_score" in cells.column_names
    meta = cells.schema.metadata[b"immunocto.quantify"]
    assert b"raw IF pixels" in meta


def test_markers_separate_the_true_populations(run):
    cells, cls = cells_with_truth(run)
    t = np.isin(cls, ["cd4_t", "cd8_t", "treg"])
    auc = mannwhitneyu(cells["CD3e_ring"][t], cells["CD3e_ring"][~t & (cls != "")]).statistic / (
        t.sum() * (~t & (cls != "")).sum()
    )
    assert auc > 0.9
    b = cls == "b_cell"
    assert cells["CD20_ring"][b].median() > 2 * cells["CD20_ring"][cls == "tumour"].median()
    assert cells["nuclear_confirmed"].mean() > 0.95


def test_rerun_is_skipped(run):
    assert run_quantify(load_config(run))[0].status == "current"


def test_masks_map_into_if_space_exactly_without_misregistration():
    model = RegistrationModel(
        "x", np.eye(3), 512, np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), 3.0
    )
    labels = np.arange(1, 31 * 41 + 1).reshape(31, 41)
    out = labels_in_if_space(model, labels, 100, 200, 100, 200, 41, 31)
    np.testing.assert_array_equal(out, labels)
    shifted = RegistrationModel(
        "x",
        np.array([[1, 0, 5.0], [0, 1, -3.0], [0, 0, 1]]),
        512,
        np.zeros((1, 1)),
        np.zeros((1, 1)),
        np.zeros((1, 1)),
        3.0,
    )
    out = labels_in_if_space(shifted, labels, 100, 200, 105, 197, 41, 31)
    np.testing.assert_array_equal(out, labels)  # the IF box moved with the transform


def test_export_mcquant(run, tmp_path):
    result = CliRunner().invoke(app, ["export", "mcquant", str(run), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(tmp_path / "sim000.csv")
    assert list(df.columns[:2]) == ["CellID", "Hoechst"]
    assert {
        "X_centroid",
        "Y_centroid",
        "Area",
        "MajorAxisLength",
        "Solidity",
        "Extent",
        "CD3e",
        "Pan-CK",
    } <= set(df.columns)
    assert len(df) == pq.read_metadata(run / "cells/sim000.parquet").num_rows


def test_mcquant_export_streams_batches_into_the_same_csv(run, tmp_path, monkeypatch):
    """Written a few rows at a time (here 7, so many batches and a short last one), the CSV
    holds every cell once, in table order, with the values of the table."""
    from immunocto.quantify import mcquant

    src = run / "cells/sim000.parquet"
    monkeypatch.setattr(mcquant, "BATCH_ROWS", 7)
    df = pd.read_csv(mcquant.write_mcquant_csv(src, tmp_path / "small.csv"))
    table = pq.read_table(src).to_pandas()
    assert len(table) > 7 * 3 and len(table) % 7
    assert df["CellID"].tolist() == table["cell_id"].tolist()
    np.testing.assert_allclose(df["CD3e"], table["CD3e_mean"], rtol=1e-12)
    np.testing.assert_allclose(df["X_centroid"], table["x"], rtol=1e-12)
    assert (df["Extent"] > 0).all() and (df["Extent"] <= 1).all()
    monkeypatch.setattr(mcquant, "BATCH_ROWS", 1 << 20)
    whole = mcquant.write_mcquant_csv(src, tmp_path / "whole.csv")
    assert whole.read_bytes() == (tmp_path / "small.csv").read_bytes()
    # a table without cells gives the header alone
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(src).slice(0, 0), empty)
    lines = mcquant.write_mcquant_csv(empty, tmp_path / "empty.csv").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("CellID,Hoechst,")


def test_workers_give_the_same_statistics(run):
    cfg = load_config(run)
    tables = []
    for workers in (1, 2):
        cfg.quantification.workers = workers
        run_quantify(cfg, force=True)
        tables.append(pq.read_table(run / "cells/sim000.parquet").to_pandas())
    pd.testing.assert_frame_equal(tables[0], tables[1])


def _quantified_36_tiles(tmp_path):
    """A 768² slide quantified in one process with 128 px tiles: (config, table path, table)."""
    from immunocto.config import write_config

    out = simulate_small(tmp_path / "run", size=768, seed=9, tile=256)
    cfg = load_config(out)
    cfg.quantification.tile_px = 128  # 36 tiles
    cfg.quantification.workers = 1
    write_config(cfg)
    cfg = load_config(out)
    run_quantify(cfg)
    path = out / "cells/sim000.parquet"
    return cfg, path, pq.read_table(path).to_pandas()


def test_one_process_reads_each_next_tile_ahead_and_gets_the_same_table(tmp_path, monkeypatch):
    """With one process every tile's inputs were asked for before its turn (read ahead on the
    background thread); without the read-ahead the table is the same."""
    import immunocto.quantify.stage as stage
    from immunocto._readahead import ReadAhead

    cfg, path, ref = _quantified_36_tiles(tmp_path)  # read ahead
    taken = []
    real_get = ReadAhead.get

    def get(self, key, read):
        taken.append(key in self._pending)
        return real_get(self, key, read)

    monkeypatch.setattr(ReadAhead, "get", get)
    run_quantify(cfg, force=True)
    n_jobs = len(taken)  # the tiles holding cells (of 36)
    assert 30 <= n_jobs <= 36 and all(taken)
    pd.testing.assert_frame_equal(pq.read_table(path).to_pandas(), ref)
    taken.clear()
    monkeypatch.setattr(stage, "_prefetch_part", None)
    run_quantify(cfg, force=True)
    assert len(taken) == n_jobs and not any(taken)
    pd.testing.assert_frame_equal(pq.read_table(path).to_pandas(), ref)


def test_quantify_stopped_mid_slide_resumes_from_its_parts(tmp_path, monkeypatch):
    """Workers write one part per tile; a run stopped after some tiles keeps them, leaves the
    cell table as it was, and the next run quantifies only the rest to the same table."""
    import immunocto.quantify.stage as stage

    cfg, path, ref = _quantified_36_tiles(tmp_path)
    monkeypatch.setattr(stage, "ROW_GROUP", 100)  # several row groups, parts spanning them
    calls = []
    real = stage.quantify_tile

    def failing(ctx, job):
        if len(calls) == 8:
            raise RuntimeError("worker lost")
        calls.append(job[0].id)
        return real(ctx, job)

    monkeypatch.setattr(stage, "quantify_tile", failing)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_quantify(cfg, force=True)
    pd.testing.assert_frame_equal(pq.read_table(path).to_pandas(), ref)  # untouched
    assert len(list(stage.quantify_parts_path(cfg, "sim000").glob("tile-*"))) == 8
    calls.clear()
    monkeypatch.setattr(stage, "quantify_tile", lambda c, j: calls.append(j[0].id) or real(c, j))
    res = run_quantify(cfg, force=True)[0]
    n_jobs = len({*calls}) + 8
    assert res.status == "quantified" and len(calls) == n_jobs - 8 > 0
    assert pq.ParquetFile(path).num_row_groups > 3
    new = pq.read_table(path).to_pandas()
    pd.testing.assert_frame_equal(new, ref)  # NaNs compare equal here
    assert not stage.quantify_parts_path(cfg, "sim000").exists()


def test_a_dask_worker_killed_mid_quantify_changes_nothing(tmp_path):
    """SIGKILL one of two LocalCluster workers while tiles are quantified: Dask reruns its tasks
    on the other worker and the cell table equals a one-process run."""
    import os

    import immunocto.quantify.stage as stage
    from helpers import WorkerKiller
    from immunocto._parallel import local_cluster, use_dask

    cfg, path, ref = _quantified_36_tiles(tmp_path)
    parts = stage.quantify_parts_path(cfg, "sim000")
    with (
        local_cluster(2, dashboard_address=None) as cluster,
        use_dask(cluster.get_client()) as client,
    ):
        pid = next(iter(client.run(os.getpid).values()))
        ready = lambda: len(list(parts.glob("tile-*.stats.zst"))) >= 2  # noqa: E731
        with WorkerKiller(pid, ready) as killer:
            run_quantify(cfg, force=True)
    assert killer.killed, "no worker was killed"
    pd.testing.assert_frame_equal(pq.read_table(path).to_pandas(), ref)
