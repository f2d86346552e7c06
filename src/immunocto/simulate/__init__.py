"""The built-in simulator: co-registered H&E + multiplexed IF slide pairs with known cell types
and the failure modes of IF-derived labels planted on purpose (see ``docs/simulate.md``).

Coordinates: ``x`` = column, ``y`` = row, in H&E level-0 pixels; the truth tables and masks
under ``RUN/truth/`` are in that frame.
"""

from immunocto.simulate.dataset import simulate_dataset
from immunocto.simulate.params import ARTIFACTS, PRESETS, SimParams, artifact_strengths

__all__ = ["ARTIFACTS", "PRESETS", "SimParams", "artifact_strengths", "simulate_dataset"]
