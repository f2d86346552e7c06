"""`immunocto run`: a run killed with SIGKILL mid-stage resumes to the same result, and the
per-tile work on a 2-worker Dask LocalCluster gives the same cell tables as one process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from helpers import simulate_small
from immunocto.cli import app

# columns that depend only on the data (model outputs are compared separately)
STABLE = ("cell_id", "x", "y", "area_px", "CD45_mean", "CD3e_ring", "gate_label", "gate_margin")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from immunocto.config import load_config, write_config

    run = simulate_small(tmp_path_factory.mktemp("ref") / "run", size=768, tile=256, seed=4)
    cfg = load_config(run)
    # several tiles per slide, so per-tile work really is spread over the workers
    cfg.segmentation.tile_px = 256
    cfg.quantification.tile_px = 256
    write_config(cfg)
    pristine = tmp_path_factory.mktemp("pristine") / "run"
    shutil.copytree(run, pristine)
    res = CliRunner().invoke(app, ["run", str(run), "--no-dask", "--workers", "1"])
    assert res.exit_code == 0, res.output
    return run, pristine


def _table(run: Path):
    return pq.read_table(run / "cells" / "sim000.parquet").to_pandas()


def test_two_dask_workers_give_the_same_cell_tables(reference, tmp_path):
    ref, pristine = reference
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    res = CliRunner().invoke(app, ["run", str(run), "--workers", "2"])
    assert res.exit_code == 0, res.output
    a, b = _table(ref), _table(run)
    assert list(a.columns) == list(b.columns)
    assert a["tile_id"].nunique() >= 4  # the work was split into tiles
    assert a[list(STABLE)].equals(b[list(STABLE)])
    assert (a["v1_label"] == b["v1_label"]).mean() > 0.99  # same model training, same crops
    log = (run / "logs" / "run.log").read_text()
    assert "Dask LocalCluster of 2 workers" in log and "stage validate done" in log


def test_an_existing_cluster_by_scheduler_address(reference, tmp_path, monkeypatch):
    """What dask-jobqueue / dask-kubernetes users do: the cluster runs apart, the run
    connects to its scheduler."""
    import dask
    from distributed import LocalCluster

    import immunocto.pipeline.run as pipeline_run

    ref, pristine = reference
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    # a plain LocalCluster's nanny writes OMP_NUM_THREADS=1 etc. into this process: keep them
    # from leaking into later tests' subprocesses (monkeypatch restores them as they were)
    for name in dask.config.get("distributed.nanny.pre-spawn-environ"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:  # fmt: skip
        address = cluster.scheduler_address
        res = CliRunner().invoke(app, ["run", str(run), "--scheduler", address])
        assert res.exit_code == 0, res.output
        # the tiles ran on the cluster's workers
        seen = cluster.scheduler.task_prefixes
        assert "dask_task" in seen  # (prefixes drop the leading underscore)
    a, b = _table(ref), _table(run)
    assert a[list(STABLE)].equals(b[list(STABLE)])
    assert f"per-tile work on the Dask cluster at {address}" in (run / "logs/run.log").read_text()
    # no scheduler there: a clear error, nothing run
    monkeypatch.setattr(pipeline_run, "SCHEDULER_TIMEOUT", "1s")
    run2 = tmp_path / "run2"
    shutil.copytree(pristine, run2)
    res = CliRunner().invoke(app, ["run", str(run2), "--scheduler", "tcp://127.0.0.1:9"])
    assert res.exit_code != 0
    assert "no Dask scheduler answered" in res.output and "--scheduler" in res.output
    assert not (run2 / "cells").exists()


def test_a_run_killed_mid_stage_resumes_to_the_same_result(reference, tmp_path):
    ref, pristine = reference
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    cmd = [sys.executable, "-m", "immunocto", "run", str(run), "--no-dask", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run / "logs" / "run.log"
    deadline = time.time() + 240
    while time.time() < deadline:  # the first epoch logged: inside the training loop
        if log.exists() and "immunocto.models.loop: bootstrap epoch 1:" in log.read_text():
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the run never reached the training loop")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "stage train done" not in log.read_text()  # killed mid-stage, not after it
    res = CliRunner().invoke(app, ["run", str(run), "--no-dask", "--workers", "1"])
    assert res.exit_code == 0, res.output
    a, b = _table(ref), _table(run)
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    assert a[list(STABLE)].equals(b[list(STABLE)])
    assert (a["v1_label"] == b["v1_label"]).all()
    # nothing half-written is left behind, and the stages before the kill were not redone
    leftovers = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []
    text = (run / "logs" / "run.log").read_text()
    second = text[text.rindex(f"run {run}") :]
    seg = [line for line in second.splitlines() if "stage segment done" in line]
    assert seg and "'new': 0" in seg[0], second[:4000]  # not redone on resume
