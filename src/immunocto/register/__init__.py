"""H&E <-> IF registration: estimate (coarse + per-tile), store as data, apply, QA."""

from immunocto.register.apply import read_if_in_he_frame
from immunocto.register.estimate import (
    estimate_coarse,
    estimate_registration,
    nuclear_otsu,
    robust_affine,
)
from immunocto.register.features import hematoxylin_density, nuclear_signal
from immunocto.register.model import RegistrationModel, confirm_nuclei
from immunocto.register.stage import load_registration, registration_path, run_register

__all__ = [
    "RegistrationModel",
    "confirm_nuclei",
    "estimate_coarse",
    "estimate_registration",
    "hematoxylin_density",
    "load_registration",
    "nuclear_otsu",
    "nuclear_signal",
    "read_if_in_he_frame",
    "registration_path",
    "robust_affine",
    "run_register",
]
