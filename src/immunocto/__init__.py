"""immunocto: co-registered H&E + multiplexed IF slides -> a single-cell immune database for H&E.

``import immunocto as im`` gives the stages as subpackages, imported on first use so that the
import itself stays cheap::

    im.simulate.simulate_dataset(...)   # a simulated slide pair + its run folder
    im.io.open_slide(path)              # any slide: OME-TIFF, SVS, pyramidal TIFF, OME-Zarr
    im.segment.segment_he(rgb, mpp=0.25)
    im.quantify.run_quantify(cfg)
    im.phenotype.gate_cells(...)
    im.models.train_bootstrap(...)      # needs the ``train`` extra

Every stage also works on a run folder through its ``run_*`` function and on the command line
(:mod:`immunocto.cli`). Coordinates: ``x`` = column, ``y`` = row, H&E level-0 pixels.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

# The library logs; only the CLI configures handlers.
logging.getLogger(__name__).addHandler(logging.NullHandler())

#: The stage subpackages reachable as attributes (imported on first use).
SUBPACKAGES = (
    "config",
    "db",
    "io",
    "models",
    "phenotype",
    "pipeline",
    "quantify",
    "register",
    "review",
    "segment",
    "simulate",
    "validate",
)

__all__ = ["SUBPACKAGES", "__version__", *SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'immunocto' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(SUBPACKAGES))
