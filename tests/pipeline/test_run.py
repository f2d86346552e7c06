from __future__ import annotations

from typer.testing import CliRunner

from helpers import simulate_small
from immunocto.cli import app
from immunocto.pipeline import STAGES, run_pipeline


def test_demo_is_simulated_once_then_reused(tmp_path):
    demo = tmp_path / "demo"
    first = run_pipeline(demo_dir=demo, demo_size=512, demo_slides=1, workers=1)
    assert first.simulated and (demo / "truth/sim000/cells.parquet").is_file()
    assert (demo / "preview/sim000.png").is_file()
    stamp = (demo / "slides/sim000/he.ome.tif").stat().st_mtime_ns
    second = run_pipeline(demo_dir=demo, demo_size=512, demo_slides=1, workers=1)
    assert not second.simulated
    assert (demo / "slides/sim000/he.ome.tif").stat().st_mtime_ns == stamp
    # a different demo size is a different demo
    third = run_pipeline(demo_dir=demo, demo_size=768, demo_slides=1, workers=1)
    assert third.simulated and third.config.simulation.size == 768


def test_run_command_prints_the_summary(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--demo-dir",
            str(tmp_path / "d"),
            "--demo-size",
            "512",
            "--demo-slides",
            "1",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "sim000" in result.output and "stages" in result.output and "cd8_t" in result.output


def test_run_on_a_config_runs_every_stage(tmp_path):
    run = simulate_small(tmp_path / "run", size=768, tile=256)
    summary = run_pipeline(run / "immunocto.yaml")
    assert not summary.simulated and summary.config.slides[0].id == "sim000"
    assert [s.name for s in STAGES] == list(summary.stages)
    assert summary.stages["register"]["slides"] == 1
    assert (run / "registration/sim000.json").is_file()
    # V1 is stored in its own database (RUN/v1) and the H&E model trains on it
    import json

    import pyarrow.parquet as pq

    from immunocto.conventions import CLASSES
    from immunocto.models.stage import MIN_HE_CELLS

    v1 = pq.read_table(run / "cells/sim000.parquet", columns=["v1_label"]).column(0).to_pylist()
    n_v1 = sum(v in CLASSES for v in v1)
    assert summary.stages["build-db-v1"]["crops"] == n_v1 > 0
    assert (run / "v1/crops.parquet").is_file()
    if n_v1 >= MIN_HE_CELLS:
        assert summary.stages["train-he"]["status"] == "trained"
        config = json.loads((run / "models/he/config.json").read_text())
        assert config["database"] == str(run / "v1")
