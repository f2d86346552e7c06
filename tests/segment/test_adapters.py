"""cellpose/stardist adapters: clear errors without the package or model; a real run when both
are installed (skipped otherwise)."""

from __future__ import annotations

import importlib.util

import pytest

from immunocto.config import SegmentParams
from immunocto.errors import ImmunoctoError, InputFileError
from immunocto.segment import make_backend


@pytest.mark.parametrize("name", ["cellpose", "stardist"])
def test_missing_model_path_is_explained(name):
    with pytest.raises(
        InputFileError, match=f"the {name} backend needs a model: set segmentation.model_path"
    ):
        make_backend(name, SegmentParams(), has_if=False)


@pytest.mark.parametrize("name", ["cellpose", "stardist"])
def test_missing_package_or_model_file_is_explained(name, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    if importlib.util.find_spec(name) is None:
        with pytest.raises(ImmunoctoError, match=f"needs `pip install {name}`"):
            make_backend(name, SegmentParams(model_path=model), has_if=False)
    with pytest.raises(InputFileError, match="model not found"):
        make_backend(name, SegmentParams(model_path=tmp_path / "absent"), has_if=False)


def test_unknown_backend_and_if_nuclear_without_if():
    with pytest.raises(ImmunoctoError, match="unknown segmentation backend 'x'"):
        make_backend("x", SegmentParams(), has_if=True)
    with pytest.raises(ImmunoctoError, match="needs an IF image"):
        make_backend("if-nuclear", SegmentParams(), has_if=False)
