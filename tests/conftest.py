"""Shared fixtures: small simulated runs (a few seconds each on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from immunocto.simulate.dataset import simulate_dataset


@pytest.fixture(scope="session")
def sim_run(tmp_path_factory) -> Path:
    """One 768 px slide with the default artifacts (tiles of 256 px, two workers).

    Shared by many tests: treat it as read-only (run stages on your own ``simulate_small``)."""
    out = tmp_path_factory.mktemp("sim") / "run"
    simulate_dataset(out, size=768, slides=1, seed=3, tile=256, workers=2, preview=True)
    return out


@pytest.fixture(scope="session")
def db_run(tmp_path_factory) -> Path:
    """Two 1024 px slides, segmented, quantified, gated (with sensitivity) and built into a
    cell database with IF crops. Read-only: copy it (``shutil.copytree``) to change it."""
    from helpers import simulate_small
    from immunocto.config import load_config
    from immunocto.db import build_db

    run = simulate_small(
        tmp_path_factory.mktemp("db") / "run", size=1024, slides=2, seed=5, workers=2
    )
    build_db(load_config(run), labels="gate", workers=2)
    return run
