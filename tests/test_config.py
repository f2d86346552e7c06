from __future__ import annotations

from pathlib import Path

import pytest

from immunocto.config import load_config, write_config
from immunocto.errors import ConfigError

GOOD = """\
slides:
  - id: s1
    he: he.tif
    if: if.tif
    markers: markers.csv
    mpp: 0.325
"""


def write(tmp_path: Path, text: str, touch: bool = True) -> Path:
    if touch:
        for name in ("he.tif", "if.tif", "markers.csv"):
            (tmp_path / name).write_text("x")
    path = tmp_path / "immunocto.yaml"
    path.write_text(text)
    return path


def test_loads_and_resolves_paths_relative_to_the_run_folder(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.run_dir == tmp_path.resolve()
    assert cfg.slides[0].id == "s1"
    assert cfg.resolve(cfg.slides[0].if_) == tmp_path.resolve() / "if.tif"
    assert load_config(tmp_path).slides[0].mpp == 0.325  # the folder works too


def test_unknown_key_names_its_path_and_the_allowed_keys(tmp_path):
    with pytest.raises(
        ConfigError, match=r"slides\[0\]\.colour: unknown key \(allowed here: id, he, if"
    ):
        load_config(write(tmp_path, GOOD + "    colour: red\n"))


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"immunocto.yaml: segmnt: unknown key"):
        load_config(write(tmp_path, GOOD + "segmnt: {}\n"))


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    with pytest.raises(ConfigError, match=r"slides\[0\]\.mpp: .*number.*\(got 'fast'\)"):
        load_config(write(tmp_path, GOOD.replace("0.325", "fast")))


def test_out_of_range_value(tmp_path):
    with pytest.raises(ConfigError, match=r"slides\[0\]\.mpp: .*greater than 0"):
        load_config(write(tmp_path, GOOD.replace("0.325", "-1")))


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"slides\[0\]\.he: required key is missing"):
        load_config(write(tmp_path, GOOD.replace("    he: he.tif\n", "")))


def test_duplicate_slide_ids(tmp_path):
    text = GOOD + GOOD.split("\n", 1)[1]
    with pytest.raises(ConfigError, match="duplicate slide id 's1'"):
        load_config(write(tmp_path, text))


def test_duplicate_yaml_key_is_an_error_not_a_silent_override(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key 'mpp' at line 7"):
        load_config(write(tmp_path, GOOD + "    mpp: 0.5\n"))


def test_missing_input_file_names_the_field_and_the_path(tmp_path):
    path = write(tmp_path, GOOD)
    (tmp_path / "if.tif").unlink()
    with pytest.raises(ConfigError, match=r"slides\[0\]\.if: file not found: .*if\.tif"):
        load_config(path)
    assert load_config(path, check_files=False).slides[0].id == "s1"


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "slides: [\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_slide_id(tmp_path):
    with pytest.raises(ConfigError, match=r"slides\[0\]\.id: String should match pattern"):
        load_config(write(tmp_path, GOOD.replace("id: s1", "id: '../evil'")))


def test_write_then_load_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    cfg.slides[0].mpp = 0.5
    out = write_config(cfg)
    text = out.read_text()
    assert "he: he.tif" in text  # paths stay relative to the run folder
    again = load_config(out)
    assert again.slides[0].mpp == 0.5
    assert again.model_dump() == cfg.model_dump()


def test_every_stage_refuses_a_slide_id_not_in_the_config(tmp_path):
    """``--slide`` ids go through one check: an unknown id is an error naming the known ones
    (quantify and gate used to skip it silently and report success)."""
    from immunocto.phenotype import run_gate
    from immunocto.quantify import run_quantify
    from immunocto.register.stage import run_register
    from immunocto.segment.stage import run_segment

    cfg = load_config(write(tmp_path, GOOD + GOOD.replace("s1", "s2").replace("slides:\n", "")))
    assert [s.id for s in cfg.select_slides(["s2"])] == ["s2"]
    assert [s.id for s in cfg.select_slides(None)] == ["s1", "s2"]
    for stage in (run_register, run_segment, run_quantify, run_gate):
        with pytest.raises(ConfigError, match=r"unknown slide id\(s\) nope \(known: s1, s2\)"):
            stage(cfg, slides=["s1", "nope"])
    assert not (tmp_path / "cells").exists() and not (tmp_path / "masks").exists()
