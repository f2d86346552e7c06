from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from immunocto import __version__
from immunocto.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "simulate" in result.output and "run" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"immunocto {__version__}"


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = runner.invoke(app, ["simulate", str(tmp_path / "x"), "--artifacts", "spicy"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: unknown artifact preset 'spicy'; choose one of none, default, harsh, weak-stain"
    ]
    assert "Traceback" not in result.output


def test_verbose_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["-v", "simulate", str(tmp_path / "x"), "--artifact", "glitter=1"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "unknown artifact 'glitter'" in result.stderr


def test_bad_artifact_override_syntax(tmp_path):
    result = runner.invoke(app, ["simulate", str(tmp_path / "x"), "--artifact", "spillover"])
    assert result.exit_code == 2 and "expected NAME=STRENGTH" in result.stderr


def test_run_with_a_broken_config_names_the_key(tmp_path):
    cfg = tmp_path / "immunocto.yaml"
    cfg.write_text("slides:\n  - id: a\n    he: he.tif\n    mpp: 0.3\n    colour: red\n")
    (tmp_path / "he.tif").write_text("x")
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2
    assert "slides[0].colour: unknown key" in result.stderr


def test_simulate_command_end_to_end(tmp_path):
    out = tmp_path / "sim"
    result = runner.invoke(
        app,
        ["simulate", str(out), "--size", "512", "--seed", "5", "--tile", "256", "--workers", "1"],
    )
    assert result.exit_code == 0, result.output
    assert (out / "slides/sim000/he.ome.tif").is_file()
    n = pq.read_table(out / "truth/sim000/cells.parquet").num_rows
    assert str(n) in result.output  # the summary table counts the true cells
    assert "immunocto run" in result.output


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "immunocto", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"immunocto {__version__}"


def test_library_errors_name_arguments_and_the_cli_names_flags(tmp_path):
    from immunocto.errors import ImmunoctoError
    from immunocto.simulate import simulate_dataset

    with pytest.raises(ImmunoctoError, match=r"^`slides` must be at least 1 \(got 0\)$"):
        simulate_dataset(tmp_path / "a", slides=0)
    out = runner.invoke(app, ["simulate", str(tmp_path / "b"), "--slides", "0"])
    assert out.exit_code == 2
    assert "--slides must be at least 1 (got 0)" in out.output and "`" not in out.output
    # an argument whose flag has another name is shown as that flag
    err = ImmunoctoError("`keep` must be in [0, 1] (got 2)", arguments=("keep",))
    assert err.for_cli({"keep": "--v1-keep"}) == "--v1-keep must be in [0, 1] (got 2)"
    assert err.for_cli() == "--keep must be in [0, 1] (got 2)"
