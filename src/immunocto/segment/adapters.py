"""Adapters for cellpose and stardist, when the package and a model path are present.

Neither package is a dependency: install it yourself (``pip install cellpose`` /
``pip install stardist``) and give the model with ``segmentation.model_path``."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from immunocto.errors import ImmunoctoError, InputFileError
from immunocto.segment.base import Backend, SlideContext


def _model_path(path: Path | None, what: str) -> Path:
    if path is None:
        raise InputFileError(
            f"the {what} backend needs a model: set segmentation.model_path (or --model-path)"
        )
    path = Path(path).expanduser()
    if not path.exists():
        raise InputFileError(f"{path}: {what} model not found; fix segmentation.model_path")
    return path


class _UserModelBackend(Backend):
    """A backend around an optional package (``package``, imported on first use) and the
    user's model path; subclasses load the model in :meth:`_load`."""

    package = ""

    def __init__(self, model_path: Path | None) -> None:
        self.model_path = _model_path(model_path, self.name)
        try:
            module = importlib.import_module(self.package)
        except ImportError:
            pip = self.package.split(".")[0]
            raise ImmunoctoError(f"the {self.name} backend needs `pip install {pip}`") from None
        self._model = self._load(module)

    def _load(self, module):  # pragma: no cover - overridden
        raise NotImplementedError


class CellposeBackend(_UserModelBackend):
    """cellpose on the H&E (RGB), with the user's model file."""

    name = "cellpose"
    package = "cellpose.models"

    def _load(self, module):
        return module.CellposeModel(pretrained_model=str(self.model_path), gpu=False)

    def segment(
        self, ctx: SlideContext, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray]:
        rgb = ctx.he.read_region(x, y, w, h)
        masks = self._model.eval(rgb)[0]
        labels = np.asarray(masks, np.int32)
        return labels, np.ones(int(labels.max()) + 1)


class StardistBackend(_UserModelBackend):
    """stardist on the H&E (RGB, percentile-normalised), with the user's model folder."""

    name = "stardist"
    package = "stardist.models"

    def _load(self, module):
        path = self.model_path
        return module.StarDist2D(None, name=path.name, basedir=str(path.parent))

    def segment(
        self, ctx: SlideContext, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray]:
        rgb = ctx.he.read_region(x, y, w, h).astype(np.float32)
        lo, hi = np.percentile(rgb, [1, 99.8])
        labels, details = self._model.predict_instances((rgb - lo) / max(hi - lo, 1e-6))
        prob = np.concatenate([[0.0], np.asarray(details.get("prob", np.ones(int(labels.max()))))])
        return np.asarray(labels, np.int32), prob
