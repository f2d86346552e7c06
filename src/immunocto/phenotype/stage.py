"""``immunocto gate``: labels from the gating tree into ``RUN/cells/<slide>.parquet``.

Adds ``gate_label``, ``gate_margin``, ``gate_reason`` (and ``gate_stability`` with
``--sensitivity``); saves the thresholds and counts in ``RUN/gating/<slide>.json`` and the
figures in ``RUN/figures/``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from immunocto._fs import atomic_path, atomic_write_text
from immunocto._table import append_columns, column_names, read_columns
from immunocto.config import RunConfig
from immunocto.errors import ImmunoctoError
from immunocto.phenotype.gate import AMBIGUOUS, UNLABELED, gate_cells, sensitivity
from immunocto.phenotype.thresholds import log_intensity
from immunocto.phenotype.tree import GateTree, load_tree
from immunocto.progress import NullProgress, Progress

log = logging.getLogger(__name__)

META_KEY = b"immunocto.gate"
GATE_COLUMNS = ("gate_label", "gate_margin", "gate_reason", "gate_stability")


@dataclass
class GateSlideResult:
    slide_id: str
    counts: dict[str, int]
    iterations: int
    report: Path
    sensitivity: dict[float, dict[str, int]] | None = None
    seconds: float = 0.0


def gating_path(cfg: RunConfig, slide_id: str) -> Path:
    return cfg.run_dir / "gating" / f"{slide_id}.json"


def marker_compartments(cfg: RunConfig, slide_id: str | None = None) -> dict[str, str]:
    """Compartments declared in the slide's ``markers.csv`` (first slide when not given)."""
    from immunocto.io.base import read_marker_compartments

    slide = cfg.slide(slide_id) if slide_id else cfg.slides[0]
    return read_marker_compartments(cfg.resolve(slide.markers)) if slide.markers else {}


def marker_features(
    cfg: RunConfig, tree: GateTree, compartments: dict[str, str] | None = None
) -> dict[str, str]:
    """Column of the cell table gating each marker of the tree.

    ``gating.features[marker]`` when set in the config; else the tree's ``features`` entry;
    otherwise by the marker's compartment (``markers.csv``'s ``compartment`` column, else
    :func:`conventions.marker_compartment`):
    ``gating.nuclear_feature`` (default ``mean``, over the nucleus) for nuclear markers such
    as Ki67, ``gating.feature`` (default ``ring``) for membrane and cytoplasm markers.
    """
    from immunocto.conventions import marker_compartment

    g = cfg.gating
    compartments = compartments or {}
    out = {}
    for m in tree.markers:
        if m in g.features:
            stat = g.features[m]
        elif m in tree.features:
            stat = tree.features[m]
        elif marker_compartment(m, compartments.get(m)) == "nuclear":
            stat = g.nuclear_feature
        else:
            stat = g.feature
        out[m] = f"{m}_{stat}"
    return out


def run_gate(
    cfg: RunConfig,
    *,
    slides: list[str] | None = None,
    with_sensitivity: bool = False,
    progress: Progress | None = None,
) -> list[GateSlideResult]:
    """Gate every slide's quantified cells."""
    from immunocto.quantify.stage import META_KEY as QUANT_KEY
    from immunocto.quantify.stage import run_quantify
    from immunocto.segment.stage import cells_path

    progress = progress or NullProgress()
    g = cfg.gating
    tree = load_tree(g.tree, base=cfg.run_dir)
    chosen = cfg.select_slides(slides)
    results = []
    progress.start("gate", len(chosen), unit="slides")
    for slide in chosen:
        if slide.if_ is None:
            log.info("%s: no IF, nothing to gate", slide.id)
            continue
        columns = marker_features(cfg, tree, marker_compartments(cfg, slide.id))
        path = cells_path(cfg, slide.id)
        meta = (pq.read_schema(path).metadata or {}) if path.exists() else {}
        if QUANT_KEY not in meta:
            run_quantify(cfg, slides=[slide.id], progress=progress)
        t0 = time.perf_counter()
        present = column_names(path)
        missing = [c for c in columns.values() if c not in present]
        if missing:
            raise ImmunoctoError(
                f"{path}: no column(s) {', '.join(missing)}; the tree's markers must be IF channels "
                f"and gating.feature(s) quantify statistics (e.g. ring, cell, mean)"
            )
        # only the columns the gates read, not the ~150 of a quantified table
        confirm = g.nuclear_confirmation and "nuclear_confirmed" in present
        values = read_columns(
            path, sorted({*columns.values(), *(["nuclear_confirmed"] if confirm else [])})
        )
        z = {m: log_intensity(values[c]) for m, c in columns.items()}
        n = pq.read_metadata(path).num_rows
        if confirm:
            eligible = np.asarray(values["nuclear_confirmed"], bool)
        else:
            eligible = np.ones(n, bool)
        eligible &= np.all([np.isfinite(v) for v in z.values()], axis=0)
        frac = cfg.registration.nuclear_confirm_fraction
        manual = {m: float(np.log(v)) for m, v in g.manual_thresholds.items()}
        res = gate_cells(
            tree, z, eligible, method=g.method, methods=g.methods, iterative=g.iterative,
            max_iterations=g.max_iterations, manual=manual,
            ineligible_reason=f"nuclear stain below {frac:g} x Otsu (or not quantified)",
        )  # fmt: skip
        new = {
            "gate_label": pa.array(res.label.astype(str)),
            "gate_margin": pa.array(res.margin.astype(np.float32)),
            "gate_reason": pa.array(res.reason.astype(str)),
        }
        sens_counts = None
        report: dict[str, Any] = {
            "slide_id": slide.id,
            "tree": tree.to_dict(),
            "method": g.method,
            "methods": g.methods,
            "features": columns,
            "iterative": g.iterative,
            "iterations": res.iterations,
            "label_changes_per_iteration": res.history,
            "thresholds": {
                p: {m: round(float(np.exp(t)), 3) for m, t in ms.items()}
                for p, ms in res.thresholds.items()
            },
            "log_scale": {
                p: {m: round(s, 4) for m, s in ms.items()} for p, ms in res.scales.items()
            },
            "counts": res.counts(),
            "margin_units": "robust standard deviations (1.4826 x MAD) of log intensity in the deciding population",
        }
        classes = [*tree.labels, AMBIGUOUS, UNLABELED]
        fig_dir = cfg.run_dir / "figures"
        if with_sensitivity:
            factors = sorted(set(g.sensitivity_factors) | {1.0})
            sens_counts, sens_labels, stability = sensitivity(tree, z, eligible, res, factors)
            new["gate_stability"] = pa.array(stability.astype(np.float32))
            flips: dict[tuple[str, str], int] = {}
            for lab in sens_labels.values():
                changed = lab != res.label
                for a, b in zip(
                    res.label[changed].astype(str), lab[changed].astype(str), strict=True
                ):
                    flips[(a, b)] = flips.get((a, b), 0) + 1
            report["sensitivity"] = {
                "factors": factors,
                "counts": {str(f): c for f, c in sens_counts.items()},
                "flips": [{"from": a, "to": b, "cells": k} for (a, b), k in sorted(flips.items())],
                "stability_mean": round(float(stability.mean()), 4) if n else None,
            }
            _save_figure(
                fig_dir / f"{slide.id}_sensitivity.png",
                "sensitivity",
                sens_counts,
                flips,
                classes,
                slide.id,
            )
        _save_figure(fig_dir / f"{slide.id}_gates.png", "gates", tree, z, res, slide.id, columns)
        del values
        stage_meta = {"stage": "gate", **{k: v for k, v in report.items() if k != "sensitivity"}}
        append_columns(
            path, new, drop=GATE_COLUMNS, meta={META_KEY: json.dumps(stage_meta).encode()}
        )
        rpath = atomic_write_text(gating_path(cfg, slide.id), json.dumps(report, indent=1) + "\n")
        results.append(
            GateSlideResult(
                slide.id, res.counts(), res.iterations, rpath, sens_counts, time.perf_counter() - t0
            )
        )
        progress.advance("gate")
    return results


def _save_figure(path: Path, kind: str, *args: Any) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from immunocto.phenotype.figures import plot_gates, plot_sensitivity

    if kind == "gates":
        tree, z, res, sid, columns = args
        fig = Figure(figsize=(13, 8), dpi=100)
        FigureCanvasAgg(fig)
        plot_gates(
            tree,
            z,
            res,
            features=columns,
            fig=fig,
            title=f"{sid}: gates of {tree.name} (lines: thresholds of each population)",
        )
    else:
        counts, flips, classes, sid = args
        fig = Figure(figsize=(13, 5.5), dpi=100)
        FigureCanvasAgg(fig)
        plot_sensitivity(counts, flips, classes, fig=fig, title=f"{sid}: threshold sensitivity")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def gate_stage(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Pipeline stage: gate with sensitivity; summary for `immunocto run`."""
    results = run_gate(cfg, with_sensitivity=True, progress=progress)
    total: dict[str, int] = {}
    for r in results:
        for k, v in r.counts.items():
            total[k] = total.get(k, 0) + v
    return {"slides": len(results), **total}
