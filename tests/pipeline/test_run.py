from __future__ import annotations

import pytest
from typer.testing import CliRunner

from helpers import simulate_small
from immunocto.cli import app
from immunocto.errors import ConfigError, InputFileError
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
    # this slide gives enough V1 cells to train on (else the test says so rather than pass)
    assert n_v1 >= MIN_HE_CELLS, f"only {n_v1} V1 cells: the slide no longer exercises train-he"
    assert summary.stages["train-he"]["status"] == "trained"
    config = json.loads((run / "models/he/config.json").read_text())
    assert config["database"] == str(run / "v1")


KI67_TREE = """\
name: proliferation
nodes:
  - {name: ki67_pos, parent: root, rule: {pos: [Ki67]}, label: ki67_pos}
  - {name: ki67_neg, parent: root, rule: {neg: [Ki67]}, label: ki67_neg}
"""


def test_run_on_a_custom_one_marker_panel(tmp_path, caplog):
    """A Ki67 tree, the IF pixel size in the config: `run` gates, skips the immune-class
    stages with the reason, and the cell table carries both frames."""
    import logging

    import numpy as np
    import pyarrow.parquet as pq
    import yaml

    from immunocto.simulate.transform import TruthTransform
    from immunocto.validate import match_points

    run = simulate_small(tmp_path / "run", size=768, tile=256, mpp=0.5, seed=5)
    (run / "ki67.yaml").write_text(KI67_TREE)
    data = yaml.safe_load((run / "immunocto.yaml").read_text())
    data["slides"][0]["if_mpp"] = 0.5
    data["gating"] = {"tree": "ki67.yaml"}
    (run / "immunocto.yaml").write_text(yaml.safe_dump(data))

    summary = run_pipeline(run / "immunocto.yaml", workers=1)
    assert list(summary.stages) == [s.name for s in STAGES]
    immune = [s.name for s in STAGES if s.immune_classes]
    assert immune and all(
        summary.stages[n] == {"skipped": "custom panel (see log)"} for n in immune
    )
    assert "ki67_pos, ki67_neg" in summary.skip_reason
    assert not (run / "db").exists()  # nothing half-built for the immune classes

    cells = pq.read_table(run / "cells/sim000.parquet").to_pandas()
    assert set(cells["gate_label"]) <= {"ki67_pos", "ki67_neg", "ambiguous", "unlabeled"}
    report = (run / "gating/sim000.json").read_text()
    assert '"Ki67": "Ki67_mean"' in report  # a nuclear marker gates on the nucleus mean

    # Ki67+ calls against the truth (cells matched within 4 µm)
    truth = pq.read_table(run / "truth/sim000/cells.parquet").to_pandas()
    truth = truth[truth["nucleus_area_px"] > 0]
    ti, pi = match_points(
        truth[["x", "y"]].to_numpy(), cells[["x", "y"]].to_numpy(), radius=4.0 / 0.5
    )
    t_pos = (truth["expr_Ki67"].to_numpy() > 0.2)[ti]
    p_pos = (cells["gate_label"].to_numpy() == "ki67_pos")[pi]
    tp = int(np.sum(t_pos & p_pos))
    fp = int(np.sum(~t_pos & p_pos))
    fn = int(np.sum(t_pos & ~p_pos)) + int(
        (truth["expr_Ki67"].to_numpy() > 0.2).sum() - t_pos.sum()
    )
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert f1 >= 0.8, (tp, fp, fn)

    # both frames: x_if, y_if follow the true H&E -> IF mapping within a pixel or two
    transform = TruthTransform.from_dict(
        __import__("json").loads((run / "truth/sim000/registration.json").read_text())
    )
    u, v = transform.he_to_if(cells["x"].to_numpy(float), cells["y"].to_numpy(float))
    err = np.hypot(cells["x_if"] - u, cells["y_if"] - v)
    assert np.median(err) < 1.5

    # --from / --until: only the named stages; an unknown name lists the stages
    again = run_pipeline(run / "immunocto.yaml", workers=1, from_stage="quantify", until="gate")
    assert list(again.stages) == ["quantify", "gate"]
    with pytest.raises(ConfigError, match="unknown stage 'gating'.*register, segment"):
        run_pipeline(run / "immunocto.yaml", until="gating")

    # a config pixel size that disagrees with the file: a warning, the config's value used
    data["slides"][0]["if_mpp"] = 0.6
    (run / "immunocto.yaml").write_text(yaml.safe_dump(data))
    with (
        caplog.at_level(logging.WARNING, logger="immunocto"),
        pytest.raises(InputFileError, match=r"physical extent .*`slides\[0\].if_mpp"),
    ):
        run_pipeline(run / "immunocto.yaml", workers=1, until="register")
    assert "the file says 0.5 µm/px, the config's slides[0].if_mpp says 0.6" in caplog.text
    assert (run / "registration/sim000.json").is_file()  # the earlier result is untouched


def test_run_cli_until_flag(tmp_path):
    run = simulate_small(tmp_path / "run")
    result = CliRunner().invoke(
        app, ["run", str(run / "immunocto.yaml"), "--until", "segment", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    assert (run / "cells/sim000.parquet").is_file() and not (run / "gating").exists()
    bad = CliRunner().invoke(app, ["run", str(run / "immunocto.yaml"), "--from", "nope"])
    assert bad.exit_code != 0 and "--from: unknown stage 'nope'" in bad.output


def test_every_stage_of_the_table_resolves_to_a_function():
    import importlib
    import inspect

    for stage in STAGES:
        module, function = stage.target.split(":")
        fn = getattr(importlib.import_module(module), function)
        assert list(inspect.signature(fn).parameters)[:2] == ["cfg", "progress"], stage.name
