"""Paths and URLs: ``file://`` URLs are paths; other URLs (object stores) a clear error that
names the argument and the fix, before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from immunocto._fs import local_path
from immunocto.cli import app
from immunocto.config import load_config
from immunocto.errors import ConfigError, InputFileError

runner = CliRunner()


@pytest.mark.parametrize(
    "given, want",
    [
        ("file:///data/run", "/data/run"),
        ("file://localhost/data/run", "/data/run"),
        (Path("file:///data/run"), "/data/run"),  # how typer hands a URL over: file:/data/run
        ("file:///data/my%20run", "/data/my run"),
        ("data/run", "data/run"),
        ("/data/run", "/data/run"),
        ("C:/data/run", "C:/data/run"),  # a drive letter is not a scheme
    ],
)
def test_file_urls_and_paths_are_paths(given, want):
    assert local_path(given) == Path(want)


@pytest.mark.parametrize("url", ["s3://bucket/run", Path("gs://bucket/run"), "https://host/x"])
def test_other_urls_name_the_argument_and_the_fix(url):
    with pytest.raises(InputFileError) as err:
        local_path(url, "out")
    text = str(err.value)
    scheme = str(url).split(":")[0]
    assert text.startswith(f"{scheme}://")  # the URL as the user wrote it, not pathlib's s3:/
    assert ": out: " in text and "atomic renames" in text and "mount" in text
    with pytest.raises(InputFileError, match="another host"):
        local_path("file://elsewhere/data/run")


def test_cli_takes_file_urls_and_refuses_object_stores_without_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sim"
    result = runner.invoke(
        app,
        ["simulate", out.as_uri(), "--size", "256", "--seed", "2", "--tile", "256",
         "--workers", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "immunocto.yaml").is_file()
    assert load_config(out.as_uri()).run_dir == out.resolve()
    before = sorted(os.listdir(tmp_path))
    for argv in (["simulate", "s3://bucket/sim"], ["run", "s3://bucket/sim/immunocto.yaml"]):
        result = runner.invoke(app, argv)
        assert result.exit_code != 0
        assert "s3://bucket/sim" in result.stderr and "atomic renames" in result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == before  # no local "s3:" folder appeared


def test_slide_paths_in_the_config_may_be_file_urls(tmp_path):
    sim = tmp_path / "sim"
    runner.invoke(app, ["simulate", str(sim), "--size", "256", "--tile", "256", "--workers", "1"])
    cfg_path = sim / "immunocto.yaml"
    data = yaml.safe_load(cfg_path.read_text())
    he = (sim / data["slides"][0]["he"]).resolve()
    data["slides"][0]["he"] = he.as_uri()
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(sim)
    assert cfg.resolve(cfg.slides[0].he) == he
    data["slides"][0]["he"] = "s3://bucket/he.ome.tif"
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"slides\[0\]\.he: s3://bucket/he.ome.tif: .*mount"):
        load_config(sim)
