"""Train/validation/test splits by patient: one patient's slides never straddle two splits."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from immunocto.config import RunConfig

SPLITS = ("train", "val", "test")


def split_patients(
    patients: Iterable[str],
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, str]:
    """Split name per patient.

    Patients are sorted, shuffled with ``seed`` and cut by cumulative ``fractions``. With few
    patients (at most two per wanted split) the first goes to ``train``, the second to ``val``,
    the third to ``test`` (skipping splits whose fraction is 0) so no wanted split stays empty.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (got {fractions})")
    unique = sorted(set(patients))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    wanted = [name for name, f in zip(SPLITS, fractions, strict=True) if f > 0]
    cum = np.cumsum(fractions) / sum(fractions)
    few = len(order) <= len(wanted) * 2
    out: dict[str, str] = {}
    for k, patient in enumerate(order):
        if few:
            out[patient] = wanted[k % len(wanted)] if k < len(wanted) else "train"
        else:
            out[patient] = SPLITS[min(int(np.searchsorted(cum, (k + 0.5) / len(order))), 2)]
    return out


def assign_splits(
    cfg: RunConfig, *, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, str]:
    """Split name per slide id (``slides[i].patient``, default the slide id, decides)."""
    of_patient = split_patients(
        (s.patient or s.id for s in cfg.slides), fractions=fractions, seed=seed
    )
    return {s.id: of_patient[s.patient or s.id] for s in cfg.slides}
