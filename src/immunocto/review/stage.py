"""The ``review`` stage of ``immunocto run``: reviewing is interactive, so the pipeline only
takes stock. With decisions in ``RUN/review.sqlite`` it writes the agreement report
(``RUN/review/agreement.json`` + ``.png``) and exports ``review_label`` (V0) into the cell
tables; without, it says how to start reviewing."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from immunocto._fs import atomic_write_text
from immunocto.config import RunConfig
from immunocto.progress import Progress


def review_stage(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.db.store import read_index
    from immunocto.review.agreement import agreement_report, save_confusion_figure
    from immunocto.review.export import export_reviews
    from immunocto.review.server import _finite
    from immunocto.review.store import ReviewStore, review_path

    run = cfg.run_dir
    path = review_path(run)
    latest = ReviewStore(path).latest() if path.exists() else None
    if latest is None or latest.empty:
        return {
            "decisions": 0,
            "next": f"immunocto review add-reviewer {run} NAME; immunocto review serve {run}",
        }
    rep = agreement_report(latest, read_index(run)[0].to_pandas(), n_boot=1000)
    folder = run / "review"
    folder.mkdir(exist_ok=True)
    atomic_write_text(folder / "agreement.json", json.dumps(_finite(rep), indent=1) + "\n")
    save_confusion_figure(rep, folder / "agreement.png")
    counts = export_reviews(run)
    kappas = [p["kappa"] for p in rep["pairs"] if np.isfinite(p["kappa"])]
    return {
        "reviewers": len(rep["reviewers"]),
        "cells_reviewed": rep["cells_reviewed"],
        "mean_kappa": round(float(np.mean(kappas)), 3) if kappas else "-",
        "v0_cells": sum(
            v
            for c in counts.values()
            for k, v in c.items()
            if k not in ("unlabeled", "ambiguous", "not_cell")
        ),
    }
