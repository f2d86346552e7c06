"""``immunocto validate CONFIG``: how far to trust the labels, as ``RUN/reports/validation.json``
(every number) and ``RUN/reports/validation.html`` (self-contained: figures embedded as PNG).

Sections (JSON keys), each opening with one sentence telling the user what to conclude:
``ambiguity``, ``sensitivity``, ``agreement``, ``partial_labels``, ``bias_audit``, ``quality``,
``sources``. Where the run is simulated (``truth/`` exists), the true numbers and the planted
artifacts stand beside the estimates.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from immunocto.config import RunConfig
from immunocto.conventions import CLASSES
from immunocto.errors import ImmunoctoError
from immunocto.progress import NullProgress, Progress
from immunocto.validate import audits
from immunocto.validate.bias import section_bias
from immunocto.validate.html import figures, render_html
from immunocto.validate.metrics import match_points

log = logging.getLogger(__name__)

MORPHOLOGY = ["area_px", "eccentricity", "solidity", "major_axis_px", "minor_axis_px"]
NUCLEAR_MEAN = "Hoechst_mean"
LABEL_SOURCES = ["gate_label", "review_label", "model_label", "v1_label"]


def load_cells(
    cfg: RunConfig, keep_stats: set[str] | None = None, *, exclusion_means: bool = False
) -> dict[str, pd.DataFrame]:
    """Each slide's cell table (needs ``gate_label``). ``keep_stats``: the per-marker statistic
    columns (``<marker>_<stat>``, most of a quantified table: 8 per channel) to read; the others
    stay on disk. ``None`` reads every column. ``exclusion_means``: also the means of the
    exclusion markers the table has (:func:`_exclusion_means`)."""
    from immunocto.quantify.features import STATS

    out = {}
    for s in cfg.slides:
        path = cfg.run_dir / "cells" / f"{s.id}.parquet"
        if not path.exists():
            raise ImmunoctoError(f"{path}: no cell table; run `immunocto segment` and `gate` first")
        names = pq.read_schema(path).names
        markers = {c[: -len("_mean")] for c in names if c.endswith("_mean")}
        keep = (keep_stats or set()) | set(_exclusion_means(names) if exclusion_means else ())
        stats = {f"{m}_{st}" for m in markers for st in STATS} - keep
        columns = names if keep_stats is None else [c for c in names if c not in stats]
        df = pq.read_table(path, columns=columns).to_pandas()
        if "gate_label" not in df:
            raise ImmunoctoError(f"{path}: no gate_label; run `immunocto gate` first")
        out[s.id] = df
    return out


def truth_labels(cfg: RunConfig, sid: str, cells: pd.DataFrame) -> pd.DataFrame | None:
    """Per cell of the table: ``true`` class (or ``unmatched``) and the truth's ``art_*`` flags,
    matched within 4 µm; ``None`` when the run has no truth."""
    path = cfg.run_dir / "truth" / sid / "cells.parquet"
    if not path.exists():
        return None
    t = pq.read_table(path).to_pandas()
    mpp = next(s.mpp for s in cfg.slides if s.id == sid)
    ti, pi = match_points(t[["x", "y"]].to_numpy() * mpp, cells[["x", "y"]].to_numpy() * mpp, 4.0)
    out = pd.DataFrame(index=cells.index)
    out["true"] = "unmatched"
    out.iloc[pi, 0] = t["class"].to_numpy()[ti]
    for c in [c for c in t.columns if c.startswith("art_")]:
        col = np.zeros(len(cells), bool)
        col[pi] = t[c].to_numpy()[ti].astype(bool)
        out[c] = col
    out.attrs["truth_cells"] = len(t)
    out.attrs["truth_immune"] = int(t["class"].isin(audits.IMMUNE).sum())
    return out


def section_ambiguity(cells, tree, feats) -> dict[str, Any]:
    res = audits.ambiguity(pd.concat(cells.values(), ignore_index=True), tree, feats)
    frac = res["ambiguous_fraction"]
    res["conclusion"] = (
        "No two gated classes share a pair of deciding channels here."
        if frac is None
        else f"{100 * frac:.2f}% of gated cells lie in the band where a linear classifier on two "
        f"deciding IF channels cannot separate their classes (Immunocto reports 0.51%): "
        + ("the classes are cleanly separated in IF space." if frac < 0.02 else "their IF separation is weak; expect label noise at the class boundaries.")
    )  # fmt: skip
    return res


def section_sensitivity(cfg: RunConfig) -> dict[str, Any]:
    per = {}
    for s in cfg.slides:
        path = cfg.run_dir / "gating" / f"{s.id}.json"
        if not path.exists():
            continue
        sens = json.loads(path.read_text()).get("sensitivity")
        if not sens:
            continue
        counts = sens["counts"]
        base = counts.get("1.0") or counts.get("1")
        total = sum(base.values()) if base else 0
        moved = sum(f["cells"] for f in sens["flips"])
        per[s.id] = {"factors": sens["factors"], "counts": counts, "stability_mean": sens["stability_mean"],
                     "cells": total, "label_changes_over_sweep": moved}  # fmt: skip
    if not per:
        return {
            "conclusion": "No threshold sweep was run (`immunocto gate --sensitivity`).",
            "slides": {},
        }
    stab = float(np.mean([v["stability_mean"] for v in per.values()]))
    return {
        "slides": per,
        "stability_mean": round(stab, 4),
        "conclusion": f"On average a cell keeps its label at {100 * stab:.0f}% of the threshold factors "
        f"between {min(next(iter(per.values()))['factors'])} and {max(next(iter(per.values()))['factors'])}: "
        + ("labels hardly depend on the exact thresholds." if stab > 0.9 else "a sizeable share of labels depends on where the thresholds sit."),
    }  # fmt: skip


def section_agreement(cfg: RunConfig) -> dict[str, Any]:
    path = cfg.run_dir / "review" / "agreement.json"
    model = cfg.run_dir / "models" / "bootstrap" / "config.json"
    v0 = json.loads(model.read_text()) if model.exists() else {}
    if not path.exists():
        note = ""
        if v0.get("labels") == "gate-margin":
            note = (f" The bootstrap classifier's V0 is therefore not reviewed: it is the gate labels "
                    f"with a margin of at least {v0.get('min_margin')} robust SD from their thresholds.")  # fmt: skip
        elif v0.get("labels") == "gate":
            note = " The bootstrap classifier's V0 is therefore the raw gate labels, unreviewed."
        return {"conclusion": "No review decisions yet (`immunocto review`); agreement unknown." + note,
                "available": False, "v0": v0.get("labels")}  # fmt: skip
    rep = json.loads(path.read_text())
    kappas = [p["kappa"] for p in rep.get("pairs", []) if p.get("kappa") is not None]
    conc = {r: v.get("agreement") for r, v in rep.get("concordance", {}).items()}
    mean_k = float(np.mean(kappas)) if kappas else None
    return {"available": True, **rep, "mean_kappa": mean_k, "conclusion":
            (f"Reviewers agree with each other at mean κ = {mean_k:.2f}" if mean_k is not None else "One reviewer so far")
            + "; agreement with the automatic labels per reviewer: "
            + ", ".join(f"{r} {v:.2f}" if isinstance(v, float) else f"{r} {v}" for r, v in conc.items()) + "."}  # fmt: skip


def pu_columns(cells: dict[str, pd.DataFrame], tree_markers) -> list[str]:
    """Features of the partial-label estimate: nuclear morphology, the nuclear stain's mean and
    the means of the panel's non-immune lineage markers (:data:`EXCLUSION_MARKERS`, e.g.
    Pan-CK, SMA, CD31) that the gating tree does not use. None of them is what the immune
    gates selected on: a weakly stained or gradient-dimmed T cell differs from a labelled one
    in CD45/CD3e, not in its nucleus or its (background) Pan-CK, so "labelled at random among
    positives" holds for them; the exclusion markers separate the epithelial and stromal cells
    whose nuclei resemble lymphocytes."""
    names = set().union(*(df.columns for df in cells.values())) if cells else set()
    used = {f"{m}_mean" for m in tree_markers}
    extra = [c for c in _exclusion_means(names) if c not in used]
    return [*MORPHOLOGY, NUCLEAR_MEAN, *extra]


def section_partial(
    cells, truths, columns: list[str] | None = None, *, seed: int = 0
) -> dict[str, Any]:
    """PU estimate (:func:`audits.pu_estimate`) on :func:`pu_columns` (``columns``), with the
    nuclear stain's linear trend across each slide removed (:func:`audits.remove_spatial_trend`)."""
    columns = columns or [*MORPHOLOGY, NUCLEAR_MEAN]
    frames = []
    for df in cells.values():
        if NUCLEAR_MEAN in df and len(df):
            df = df.assign(**{NUCLEAR_MEAN: audits.remove_spatial_trend(
                df[NUCLEAR_MEAN].to_numpy(), df["x"].to_numpy(), df["y"].to_numpy())})  # fmt: skip
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    out = audits.pu_estimate(df, columns, seed=seed)
    labelled = out.pop("labelled")
    est = {"hidden": out["hidden_immune_estimate"], "prior": out["prior"]}
    if all(t is not None for t in truths.values()):
        tr = pd.concat(truths.values(), ignore_index=True)
        hidden = int((~labelled & tr["true"].isin(audits.IMMUNE).to_numpy()).sum())
        out["hidden_immune_true"] = hidden
        out["relative_error"] = round((est["hidden"] - hidden) / max(hidden, 1), 3)
    out["conclusion"] = (
        f"About {est['hidden']:.0f} immune cells ({100 * est['prior']:.1f}% of the cells not labelled immune) "
        f"likely hide in other/ambiguous/unlabeled; the immune classes are missing roughly "
        f"{100 * est['hidden'] / max(est['hidden'] + labelled.sum(), 1):.0f}% of their cells"
        + (f" (truth: {out['hidden_immune_true']})." if "hidden_immune_true" in out else ".")
    )  # fmt: skip
    return out


def _class_scores(label: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    out = {}
    for c in CLASSES:
        given = label == c
        out[c] = {
            "precision": round(float(np.mean(true[given] == c)), 4) if given.any() else None,
            "recall": round(float(np.mean(label[true == c] == c)), 4)
            if (true == c).any()
            else None,
        }
    return out


def section_quality(cfg, cells, truths) -> dict[str, Any]:
    if not all(t is not None for t in truths.values()):
        return {
            "available": False,
            "conclusion": "No ground truth in this run (only simulated runs have one).",
        }
    segs, classes = {}, {}
    for sid, df in cells.items():
        t = truths[sid]
        matched = int((t["true"] != "unmatched").sum())
        n_truth = t.attrs["truth_cells"]
        segs[sid] = {"truth_cells": n_truth, "cells": len(df), "matched": matched,
                     "recall": round(matched / max(n_truth, 1), 4), "precision": round(matched / max(len(df), 1), 4)}  # fmt: skip
    df = pd.concat(cells.values(), ignore_index=True)
    tr = pd.concat(truths.values(), ignore_index=True)["true"].to_numpy(object)
    for col in [c for c in LABEL_SOURCES if c in df]:
        classes[col] = _class_scores(df[col].to_numpy(object), tr)
    pred_dir = cfg.run_dir / "predictions"
    preds = {}
    for s in cfg.slides:
        p = pred_dir / f"{s.id}.parquet"
        if p.exists():
            from immunocto.validate.detection import evaluate_tables

            det = evaluate_tables(cfg.run_dir / "truth" / s.id / "cells.parquet", p, mpp=s.mpp)
            preds[s.id] = {"lymphocyte": det["groups"]["lymphocyte"], "macrophage": det["groups"]["macrophage"],
                           "by_class": det["by_class"]}  # fmt: skip
    rec = np.mean([v["recall"] for v in segs.values()])
    g = classes.get("gate_label", {})
    worst = (
        min((v["precision"], c) for c, v in g.items() if v["precision"] is not None) if g else None
    )
    return {"available": True, "segmentation": segs, "classification": classes, "predictions": preds,
            "conclusion": f"Segmentation finds {100 * rec:.0f}% of the true cells; the gates' least precise class is "
                          f"{worst[1]} ({worst[0]:.2f})." if worst else "Scored against the truth."}  # fmt: skip


def section_sources(cells) -> dict[str, Any]:
    from immunocto.review.agreement import cohen_kappa, confusion

    df = pd.concat(cells.values(), ignore_index=True)
    cols = [c for c in LABEL_SOURCES if c in df] + sorted(
        c for c in df if c.startswith("source_") and c.endswith("_label")
    )
    pairs = []
    order = (*CLASSES, "ambiguous", "unlabeled")
    for i, a in enumerate(cols):
        for b in cols[i + 1 :]:
            both = df[[a, b]].dropna()
            both = both[both[a].isin(CLASSES) & both[b].isin(CLASSES)]
            if len(both) < 2:
                continue
            k = cohen_kappa(both[a].to_numpy(object), both[b].to_numpy(object), order)
            pairs.append({"a": a, "b": b, "cells": len(both), "kappa": round(float(k), 4),
                          "agreement": round(float(np.mean(both[a].to_numpy() == both[b].to_numpy())), 4),
                          "confusion": confusion(both[a].to_numpy(object), both[b].to_numpy(object), order).tolist()})  # fmt: skip
    extra = [c for c in cols if c.startswith("source_")]
    return {"sources": cols, "imported": extra, "labels": list(order), "pairs": pairs,
            "conclusion": ("Agreement between label sources (Cohen's κ on cells both call one of the five classes): "
                           + ", ".join(f"{p['a']} vs {p['b']} {p['kappa']:.2f}" for p in pairs) + ".") if pairs
            else "Only one label source so far; import others with `immunocto import labels`."}  # fmt: skip


# ----------------------------------------------------------------------------- figures + html


def run_validate(
    cfg: RunConfig, *, progress: Progress | None = None
) -> tuple[Path, Path, dict[str, Any]]:
    """Write ``RUN/reports/validation.json`` and ``.html``; returns both paths and the report."""
    from immunocto._fs import atomic_write_text
    from immunocto.phenotype.stage import gating_path, marker_compartments, marker_features
    from immunocto.phenotype.tree import load_tree

    progress = progress or NullProgress()
    progress.start("validate", 7)
    tree = load_tree(cfg.gating.tree, base=cfg.run_dir)
    feats = marker_features(cfg, tree, marker_compartments(cfg))
    # of the marker statistics only the gates' features and the means the PU estimate uses
    cells = load_cells(cfg, keep_stats={*feats.values(), NUCLEAR_MEAN}, exclusion_means=True)
    thresholds = {}
    for s in cfg.slides:
        p = gating_path(cfg, s.id)
        if p.exists():
            thresholds[s.id] = json.loads(p.read_text())["thresholds"]
    truths = {sid: truth_labels(cfg, sid, df) for sid, df in cells.items()}
    rep: dict[str, Any] = {"run": str(cfg.run_dir), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "slides": list(cells), "cells": int(sum(len(d) for d in cells.values())),
                           "simulated": all(t is not None for t in truths.values())}  # fmt: skip
    steps = [
        ("ambiguity", lambda: section_ambiguity(cells, tree, feats)),
        ("sensitivity", lambda: section_sensitivity(cfg)),
        ("agreement", lambda: section_agreement(cfg)),
        ("partial_labels", lambda: section_partial(cells, truths, pu_columns(cells, tree.markers))),
        ("bias_audit", lambda: section_bias(cfg, cells, tree, feats, thresholds, truths)),
        ("quality", lambda: section_quality(cfg, cells, truths)),
        ("sources", lambda: section_sources(cells)),
    ]
    for key, fn in steps:
        rep[key] = fn()
        progress.advance("validate")
    figs = figures(rep, cells)
    folder = cfg.run_dir / "reports"
    folder.mkdir(exist_ok=True)
    jpath, hpath = folder / "validation.json", folder / "validation.html"
    atomic_write_text(jpath, json.dumps(_finite(rep), indent=1, default=_json_default) + "\n")
    atomic_write_text(hpath, render_html(rep, figs))
    return jpath, hpath, rep


def _exclusion_means(names) -> list[str]:
    """The ``<marker>_mean`` columns among ``names`` whose marker is an exclusion marker, sorted."""
    from immunocto.conventions import is_exclusion_marker

    return sorted(
        c for c in names if c.endswith("_mean") and is_exclusion_marker(c[: -len("_mean")])
    )


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _finite(o: Any) -> Any:
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (float, np.floating)) and not np.isfinite(o):
        return None
    return o
