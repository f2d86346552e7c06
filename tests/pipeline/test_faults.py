"""Faults during `immunocto run`: a disk that fills up mid-stage, and SIGKILL at points in
several stages (the crash-recovery loop of `benchmarks/crash_loop.py`, small)."""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port, simulate_small

ROOT = Path(__file__).resolve().parents[2]


def _digests(run: Path, parts: tuple[str, ...]) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for part in parts
        for p in sorted((run / part).rglob("*"))
        if p.is_file()
    }


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_mid_run_gives_one_clear_line_and_keeps_what_was_done(tmp_path):
    run = simulate_small(tmp_path / "run", size=512, seed=4)
    cmd = [sys.executable, "-m", "immunocto", "run", str(run), "--no-dask", "--workers", "1"]
    # 1 MB per file: the earlier stages' outputs fit, the crop store's IF chunk does not
    full = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_file_size_limit(10**6))
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    assert "error: no space left writing" in full.stderr
    assert "stage build-db's outputs" in full.stderr and "rerun the same command" in full.stderr
    log = (run / "logs" / "run.log").read_text()
    assert "stage gate done" in log and "stage build-db done" not in log
    before = _digests(run, ("cells", "masks", "registration", "gating"))
    assert any(k.startswith("cells/") for k in before)
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]
    # space again: the same command finishes, without redoing (or touching) the done stages
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    text = (run / "logs" / "run.log").read_text()
    second = text[text.rindex(f"run {run}") :]
    assert "stage validate done" in second
    seg = [line for line in second.splitlines() if "stage segment done" in line]
    assert seg and "'new': 0" in seg[0]
    after = _digests(run, ("masks", "registration"))
    assert all(before[k] == v for k, v in after.items())
    assert (run / "crops.zarr").exists() and (run / "models" / "he" / "model.pt").exists()


def test_crash_loop_kills_in_three_stages_resume_to_the_same_result(tmp_path):
    """`benchmarks/crash_loop.py`, small: SIGKILL inside segment, build-db and train-he; each
    resumed run equals the uninterrupted one (models within the documented tolerance)."""
    out = subprocess.run(
        [sys.executable, "benchmarks/crash_loop.py", "--kills", "3", "--size", "384",
         "--stages", "segment,build-db,train-he", "--workdir", str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"kill"')]
    rows = list({r["kill"]: r for r in lines}.values())  # (printed again by the recorder)
    assert len(rows) == 3 and all(r["same_result"] and r["resume_exit"] == 0 for r in rows)
    # the kills landed inside the stages they aimed at (or the run had already moved on)
    assert sum(r["killed_in"] == r["aimed"] for r in rows) >= 2, rows
    shutil.rmtree(tmp_path / "w", ignore_errors=True)


def _wait_for_port(port: int, seconds: float = 60.0) -> None:
    import socket
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"nothing listens on port {port}")


def test_a_scheduler_gone_mid_stage_gives_one_clear_line_and_the_run_resumes(tmp_path, monkeypatch):
    """A real `dask scheduler` + `dask worker` pair (what a cluster user points --scheduler at);
    the scheduler is SIGKILLed while `segment` runs on it: one clear error, no traceback, and
    the same command on local processes resumes to the uninterrupted run's cells."""
    import threading
    import time

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    import immunocto.pipeline.run as pipeline_run
    from immunocto.cli import app
    from immunocto.config import load_config, write_config

    base = simulate_small(tmp_path / "base", size=512, tile=256, seed=4)
    cfg = load_config(base)
    cfg.segmentation.tile_px = 256  # 4 tiles per stage: the work goes to the cluster
    cfg.quantification.tile_px = 256
    write_config(cfg)
    local = ["--no-dask", "--workers", "1", "--until", "quantify"]
    # registration once, shared by both copies (paths in the config are relative to the run)
    assert (
        CliRunner().invoke(app, ["run", str(base), *local[:3], "--until", "register"]).exit_code
        == 0
    )
    ref, run = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(base, ref)
    shutil.copytree(base, run)
    assert CliRunner().invoke(app, ["run", str(ref), *local]).exit_code == 0

    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    address = f"tcp://127.0.0.1:{free_port()}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    port = address.rsplit(":", 1)[1]
    scheduler = subprocess.Popen(
        [*dask, "--host", "127.0.0.1", "--port", port, "--no-dashboard"], **quiet
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
         "--nworkers", "2", "--no-dashboard"], **quiet,
    )  # fmt: skip
    log = run / "logs" / "run.log"
    _wait_for_port(int(port))

    def kill_inside_segment() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if log.exists() and "stage segment:" in log.read_text():
                break  # the stage has begun; its tiles are sent to the cluster next
            time.sleep(0.02)
        scheduler.kill()

    monkeypatch.setattr(pipeline_run, "SCHEDULER_TIMEOUT", "5s")  # also the reconnect wait
    killer = threading.Thread(target=kill_inside_segment, daemon=True)
    try:
        killer.start()
        res = CliRunner().invoke(
            app, ["run", str(run), "--scheduler", address, "--until", "quantify"]
        )
        killer.join(timeout=30)
    finally:
        scheduler.kill()
        worker.kill()
        scheduler.wait()
        worker.wait()
    assert res.exit_code != 0
    assert f"the Dask scheduler at {address} stopped answering" in res.output, res.output
    assert "run the same command to resume" in res.output
    assert "Traceback" not in res.output
    text = log.read_text()
    assert "stage segment:" in text and "stage segment done" not in text
    # the same run on local processes picks up where it stopped
    res = CliRunner().invoke(app, ["run", str(run), *local])
    assert res.exit_code == 0, res.output
    a = pq.read_table(ref / "cells" / "sim000.parquet").to_pandas()
    b = pq.read_table(run / "cells" / "sim000.parquet").to_pandas()
    cols = ["cell_id", "x", "y", "area_px", "CD45_mean", "CD3e_ring"]
    assert len(a) > 50 and a[cols].equals(b[cols])
