"""Models: the 12-channel bootstrap classifier (H&E + mask + 8 IF) and its expansion to every
candidate (V0 -> V1), the H&E-only model and prediction on H&E-only slides, and the metrics
they are scored with. Needs the ``train`` extra (torch, torchvision).

The names below are imported on first use, so ``import immunocto.models`` stays cheap and
``immunocto.models.classification_metrics`` works without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_EXPORTS = {
    "classification_metrics": "immunocto.models.metrics",
    "train_bootstrap": "immunocto.models.train",
    "run_expand": "immunocto.models.expand",
    "predict_slide": "immunocto.models.expand",
    "decide_v1": "immunocto.models.v1",
    "train_he": "immunocto.models.he",
    "predict_file": "immunocto.models.predict",
    "classify_cells": "immunocto.models.predict",
    "train_nuclei": "immunocto.models.nuclei",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'immunocto.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
