from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def review_run(db_run, tmp_path):
    """A writable copy of the shared cell-database run (no review.sqlite yet)."""
    run = tmp_path / "run"
    shutil.copytree(db_run, run)
    return run
