"""Workers write their tiles' parts; a segmentation stopped mid-slide (an exception, SIGKILL)
resumes from the finished tiles to the result of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

import immunocto.segment.tiled as tiled
from helpers import simulate_small
from immunocto.config import load_config, write_config
from immunocto.segment.parts import TileParts
from immunocto.segment.stage import parts_path, run_segment


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = simulate_small(tmp_path_factory.mktemp("parts") / "run", size=768, seed=8, tile=256)
    cfg = load_config(out)
    cfg.segmentation.tile_px = 128  # 36 tiles, many cells on tile edges
    cfg.segmentation.workers = 1
    write_config(cfg)
    return out


def _outputs(run_dir):
    table = pq.read_table(run_dir / "cells" / "sim000.parquet")
    mask = np.asarray(zarr.open_array(str(run_dir / "masks" / "sim000.zarr"), mode="r")[:])
    return table, mask


def test_parts_round_trip(tmp_path):
    parts = TileParts(tmp_path / "p").open_for({"a": 1})
    labels = np.zeros((40, 50), np.int32)
    labels[3:9, 4:10] = 1
    labels[20:30, 20:25] = 2
    feats = {"x": np.array([6.5, 22.0]), "y": np.array([5.5, 25.0])}
    assert parts.done(7) is None
    assert parts.write(7, labels, feats, np.array([0.9, 0.8])) == 2
    assert parts.done(7) == 2
    np.testing.assert_array_equal(parts.labels(7), labels)
    assert parts.labels(7).dtype == np.uint16
    np.testing.assert_array_equal(parts.features(7)["x"], feats["x"])
    assert parts.write(8, np.zeros((4, 4), np.int32), {"x": np.zeros(0)}, np.zeros(0)) == 0
    assert parts.done(8) == 0
    # same key: kept; another key (inputs or settings changed): discarded
    assert TileParts(tmp_path / "p").open_for({"a": 1}).done(7) == 2
    assert TileParts(tmp_path / "p").open_for({"a": 2}).done(7) is None
    # a part whose labels file is missing is not done
    parts = TileParts(tmp_path / "q").open_for({})
    parts.write(1, labels, feats, np.array([0.9, 0.8]))
    next(parts.folder.glob("*.labels.zst")).unlink()
    assert parts.done(1) is None


def test_an_exception_mid_slide_keeps_old_outputs_and_finished_tiles(run, monkeypatch):
    cfg = load_config(run)
    first = run_segment(cfg, backend="if-nuclear", force=True)[0]
    ref_table, ref_mask = _outputs(run)
    n_tiles = int(ref_table.column("tile_id").to_numpy().max()) + 1
    assert first.n_cells == ref_table.num_rows > 100

    calls = []
    real = tiled.segment_tile

    def failing(ctx, backend, tile):
        if len(calls) == 10:
            raise RuntimeError("worker lost")
        calls.append(tile.id)
        return real(ctx, backend, tile)

    monkeypatch.setattr(tiled, "segment_tile", failing)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_segment(cfg, backend="if-nuclear", force=True)
    # the previous outputs are untouched, the ten finished tiles are kept
    table, mask = _outputs(run)
    assert table.equals(ref_table) and np.array_equal(mask, ref_mask)
    assert len(list(parts_path(cfg, "sim000").glob("tile-*.parquet"))) == 10

    calls.clear()
    monkeypatch.setattr(tiled, "segment_tile", lambda *a: calls.append(a[2].id) or real(*a))
    run_segment(cfg, backend="if-nuclear", force=True)
    assert 0 < len(calls) < n_tiles - 5  # only the tiles without a part were segmented
    table, mask = _outputs(run)
    assert table.equals(ref_table) and np.array_equal(mask, ref_mask)
    assert not parts_path(cfg, "sim000").exists()  # removed once the slide is done


def test_sigkill_mid_segmentation_resumes_to_the_same_result(run):
    cfg = load_config(run)
    run_segment(cfg, backend="he", force=True)
    ref_table, ref_mask = _outputs(run)
    parts = parts_path(cfg, "sim000")
    cmd = [sys.executable, "-m", "immunocto", "segment", str(run), "--backend", "he", "--force"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(parts.glob("tile-*.parquet"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "segmentation finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("tile-*.parquet")))
    assert done >= 3
    table, mask = _outputs(run)  # the killed run left the finished outputs as they were
    assert table.equals(ref_table) and np.array_equal(mask, ref_mask)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    table, mask = _outputs(run)
    assert table.equals(ref_table) and np.array_equal(mask, ref_mask)


def test_a_dask_worker_killed_mid_segmentation_changes_nothing(run):
    """SIGKILL one of two LocalCluster workers while tiles are being segmented: Dask reruns its
    tasks elsewhere (parts are written under a temporary name and renamed, so a rerun tile just
    replaces its part) and the table and mask equal a one-process run."""
    import threading

    from immunocto._parallel import local_cluster, use_dask

    cfg = load_config(run)
    run_segment(cfg, backend="he", force=True)
    ref_table, ref_mask = _outputs(run)
    parts = parts_path(cfg, "sim000")
    killed: list[int] = []
    with (
        local_cluster(2, dashboard_address=None) as cluster,
        use_dask(cluster.get_client()) as client,
    ):
        pids = list(client.run(os.getpid).values())

        def kill_one() -> None:
            deadline = time.time() + 120
            while time.time() < deadline:
                if len(list(parts.glob("tile-*.parquet"))) >= 2:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=kill_one)
        killer.start()
        run_segment(cfg, backend="he", force=True)
        killer.join()
        assert killed, "no worker was killed"
        assert pids[0] not in client.run(os.getpid).values()  # the nanny started a new one
    table, mask = _outputs(run)
    assert table.equals(ref_table) and np.array_equal(mask, ref_mask)
