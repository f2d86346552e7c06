"""``immunocto validate CONFIG``: how far to trust the labels, as ``RUN/reports/validation.json``
(every number) and ``RUN/reports/validation.html`` (self-contained: figures embedded as PNG).

Sections (JSON keys), each opening with one sentence telling the user what to conclude:
``ambiguity``, ``sensitivity``, ``agreement``, ``partial_labels``, ``bias_audit``, ``quality``,
``sources``. Where the run is simulated (``truth/`` exists), the true numbers and the planted
artifacts stand beside the estimates.
"""

from __future__ import annotations

import base64
import html
import io
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
from immunocto.validate.metrics import match_points

log = logging.getLogger(__name__)

MORPHOLOGY = ["area_px", "eccentricity", "solidity", "major_axis_px", "minor_axis_px"]
LABEL_SOURCES = ["gate_label", "review_label", "model_label", "v1_label"]
GRADIENT_FOLD = 1.2  # flag a staining gradient: membrane markers within class at least this ...
NUCLEAR_FOLD = 1.1  # ... and Hoechst over all cells (attenuated less) at least this, same way
SUBPOP_FRACTION = 0.10  # flag a weak subpopulation above this fraction failing the parent gate
RATE_RATIO = 1.5  # flag a tiling artifact when the label rate differs this much near tile edges
MISREG_UM = 0.3  # a local (non-affine) registration correction of at least this ...
MISREG_FRACTION = 0.10  # ... under at least this share of the cells is flagged
EDGE_UM = 4.0
ALPHA = 1e-4


def _fig_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(w: float = 8, h: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def load_cells(cfg: RunConfig) -> dict[str, pd.DataFrame]:
    """Each slide's cell table (needs ``gate_label``)."""
    out = {}
    for s in cfg.slides:
        path = cfg.run_dir / "cells" / f"{s.id}.parquet"
        if not path.exists():
            raise ImmunoctoError(f"{path}: no cell table; run `immunocto segment` and `gate` first")
        df = pq.read_table(path).to_pandas()
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


def _matching_artifact(
    flagged: np.ndarray, truth: pd.DataFrame | None, reference: np.ndarray | None = None
) -> dict[str, Any] | None:
    """The planted artifact whose rate rises most among ``flagged`` cells (simulated runs):
    the largest difference between its rate among the flagged cells and among ``reference``
    (default: the rest)."""
    reference = ~flagged if reference is None else reference
    if truth is None or flagged.sum() == 0 or reference.sum() == 0:
        return None
    best = None
    for c in [c for c in truth.columns if c.startswith("art_")]:
        v = truth[c].to_numpy()
        inside, outside = float(v[flagged].mean()), float(v[reference].mean())
        diff = inside - outside
        if best is None or diff > best["difference"]:
            best = {"artifact": c.removeprefix("art_"), "difference": round(diff, 3),
                    "rate_flagged": round(inside, 3), "rate_rest": round(outside, 3)}  # fmt: skip
    return best if best and best["difference"] >= 0.05 else None


# ----------------------------------------------------------------------------- sections


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


def section_partial(cells, truths, *, seed: int = 0) -> dict[str, Any]:
    """PU estimate on nuclear morphology + Hoechst: features the IF labelling did not select on
    (weakly staining cells differ in CD45/CD3e, not in their nuclei), so SCAR holds better."""
    df = pd.concat(cells.values(), ignore_index=True)
    out = audits.pu_estimate(df, [*MORPHOLOGY, "Hoechst_mean"], seed=seed)
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


def _gradient(cells, tree, feats, truths) -> dict[str, Any]:
    """Membrane markers within each gated class + Hoechst over all cells, trend with position."""
    nodes = {n.name: n for n in tree.nodes}
    xs, ys, vs, per = [], [], [], []
    hx, hy, hv = [], [], []
    for sid, df in cells.items():
        x, y = df["x_um"].to_numpy(), df["y_um"].to_numpy()
        for label, paths in audits.leaf_paths(tree).items():
            if label not in audits.IMMUNE:
                continue
            sel = (df["gate_label"] == label).to_numpy()
            for m in dict.fromkeys(m for n in paths[0][1:] for m in nodes[n].rule.get("pos", ())):
                v = df[feats[m]].to_numpy(float)[sel] if feats.get(m) in df else None
                if v is None or sel.sum() < 30:
                    continue
                r = audits.gradient_audit(x[sel], y[sel], v, min_cells=30)
                if r:
                    per.append({"slide": sid, "class": label, "marker": m, **r})
                lv = np.log1p(np.clip(v, 0, None))
                xs.append(x[sel]), ys.append(y[sel]), vs.append(np.expm1(lv - lv.mean() + 5))
        if "Hoechst_mean" in df:
            hx.append(x), hy.append(y), hv.append(df["Hoechst_mean"].to_numpy(float))
    membrane = (
        audits.gradient_audit(np.concatenate(xs), np.concatenate(ys), np.concatenate(vs))
        if xs
        else None
    )
    nuclear = (
        audits.gradient_audit(np.concatenate(hx), np.concatenate(hy), np.concatenate(hv))
        if hx
        else None
    )
    flagged = False
    cos = None
    if membrane and nuclear:
        cos = float(np.dot(membrane["direction"], nuclear["direction"]))
        flagged = (membrane["fold_change"] >= GRADIENT_FOLD and nuclear["fold_change"] >= NUCLEAR_FOLD
                   and membrane["p"] < ALPHA and nuclear["p"] < ALPHA and cos > 0.7)  # fmt: skip
    match = None
    if flagged and all(t is not None for t in truths.values()):
        low, high = [], []
        for df in cells.values():
            d = membrane["direction"]
            along = df["x_um"].to_numpy() * d[0] + df["y_um"].to_numpy() * d[1]
            low.append(along < np.percentile(along, 30))
            high.append(along > np.percentile(along, 70))
        match = _matching_artifact(
            np.concatenate(low), pd.concat(truths.values(), ignore_index=True), np.concatenate(high)
        )
    return {"membrane_within_class": membrane, "nuclear_all_cells": nuclear, "direction_cosine": cos,
            "per_class_marker": per, "flagged": bool(flagged), "matches": match,
            "rule": f"membrane fold >= {GRADIENT_FOLD}, nuclear fold >= {NUCLEAR_FOLD}, p < {ALPHA}, same direction (cos > 0.7)"}  # fmt: skip


def _subpopulations(cells, tree, feats, thresholds, truths) -> list[dict[str, Any]]:
    """Cells clearly positive (> 1.5 x threshold) for a marker of a deeper node, failing a
    positive gate of an ancestor node."""
    nodes = {n.name: n for n in tree.nodes}
    pairs = []
    for paths in audits.leaf_paths(tree).values():
        for path in paths:
            pos = [(n, m) for n in path[1:] for m in nodes[n].rule.get("pos", ())]
            for (na, ma), (nc, mc) in [(a, b) for i, a in enumerate(pos) for b in pos[i + 1 :]]:
                if (ma, mc) not in [(p["parent_marker"], p["child_marker"]) for p in pairs]:
                    pairs.append({"parent_marker": ma, "parent_node": nodes[na].parent,
                                  "child_marker": mc, "child_node": nodes[nc].parent})  # fmt: skip
    out = []
    for p in pairs:
        cp, pn, tr = [], [], []
        for sid, df in cells.items():
            th = thresholds.get(sid, {})
            tc = th.get(p["child_node"], {}).get(p["child_marker"])
            tp = th.get(p["parent_node"], {}).get(p["parent_marker"])
            if tc is None or tp is None or feats.get(p["child_marker"]) not in df:
                continue
            cp.append(df[feats[p["child_marker"]]].to_numpy(float) > 1.5 * tc)
            pn.append(df[feats[p["parent_marker"]]].to_numpy(float) < tp)
            tr.append(truths.get(sid))
        if not cp:
            continue
        c, n = np.concatenate(cp), np.concatenate(pn)
        res = audits.subpopulation_audit(c, n)
        flagged = bool(
            res["fraction"] is not None and res["fraction"] > SUBPOP_FRACTION and res["p"] < ALPHA
        )
        match = None
        if flagged and all(t is not None for t in tr):
            match = _matching_artifact(c & n, pd.concat(tr, ignore_index=True))
        out.append({**p, **res, "flagged": flagged, "matches": match})
    return out


def _rates(cells, cfg, truths) -> list[dict[str, Any]]:
    """Label rate per immune class vs nuisance variables.

    Flagged: cells within ``EDGE_UM`` of a tile edge vs the rest (a tiling artifact; the band
    is spread evenly over the tissue, so tissue composition does not confound it). Reported
    but never flagged: quintiles of the local registration residual and of nucleus size (both
    follow tissue structure or biology, so a dependence is expected even without bias).
    """
    from immunocto.register.model import RegistrationModel

    frames = []
    for sid, df in cells.items():
        mpp = next(s.mpp for s in cfg.slides if s.id == sid)
        f = pd.DataFrame({"label": df["gate_label"].to_numpy(object)})
        if "edge_dist_px" in df:
            f["near a tile edge"] = (df["edge_dist_px"].to_numpy(float) * mpp < EDGE_UM).astype(
                float
            )
        reg = cfg.run_dir / "registration" / f"{sid}.json"
        if reg.exists():
            model = RegistrationModel.load(reg)
            dx, dy = model.residual_at(df["x"].to_numpy(float), df["y"].to_numpy(float))
            f["registration residual (px)"] = np.hypot(dx, dy)
        f["nucleus area (px)"] = df["area_px"].to_numpy(float)
        frames.append(f)
    df = pd.concat(frames, ignore_index=True)
    out = []
    for nuisance in [c for c in df.columns if c != "label"]:
        for c in audits.IMMUNE:
            is_c = (df["label"] == c).to_numpy()
            v = df[nuisance].to_numpy(float)
            if nuisance == "near a tile edge":
                r = audits.rate_audit(is_c, v, bins=1, split=0.5)
            else:
                r = audits.rate_audit(is_c, v)
            if r is None:
                continue
            flag_it = nuisance == "near a tile edge"
            ratio = r["ratio"] if r["ratio"] is not None else np.inf
            flagged = flag_it and ratio > RATE_RATIO and r["p"] < ALPHA
            out.append({"nuisance": nuisance, "class": c, **r, "flagged": bool(flagged),
                        "note": "" if flag_it else "follows tissue structure or biology; reported, never flagged"})  # fmt: skip
    return out


def _misregistration(cells, cfg, truths) -> dict[str, Any]:
    """Local misregistration: how far the registration had to bend the IF beyond its affine.

    Per cell, the registration model's non-affine residual at its centroid, in µm (IF px
    through the affine's scale and the H&E pixel size). A well-behaved pair needs none (the
    simulator's ``none`` preset: 99th percentile 0.1 px); warps and per-field stitching shifts
    need up to a few µm. Flagged when at least :data:`MISREG_FRACTION` of the cells sit where
    the correction reaches :data:`MISREG_UM`: their IF was read through a local correction, so
    their labels are only as good as that correction (see the registration QA figure).
    Label agreement is reported alongside: per residual quintile, the share of gated cells whose
    label survives the threshold perturbation (``gate_stability`` = 1; needs ``gate
    --sensitivity``), and for simulated runs the planted artifact that matches.
    """
    from immunocto.register.model import RegistrationModel

    per_slide, resid, stable, flagged_cells, truth_ok = {}, [], [], [], True
    for sid, df in cells.items():
        reg = cfg.run_dir / "registration" / f"{sid}.json"
        if not reg.exists():
            continue
        model = RegistrationModel.load(reg)
        mpp = next(s.mpp for s in cfg.slides if s.id == sid)
        scale = float(np.sqrt(abs(np.linalg.det(np.asarray(model.affine)[:2, :2])))) or 1.0
        dx, dy = model.residual_at(df["x"].to_numpy(float), df["y"].to_numpy(float))
        r_um = np.hypot(dx, dy) / scale * mpp
        resid.append(r_um)
        if "gate_stability" in df:
            gated = df["gate_label"].to_numpy(object) != "ambiguous"
            stable.append(np.where(gated, df["gate_stability"].to_numpy(float) >= 1.0, np.nan))
        per_slide[sid] = {
            "median_um": round(float(np.median(r_um)), 3) if len(r_um) else None,
            "p90_um": round(float(np.percentile(r_um, 90)), 3) if len(r_um) else None,
            "max_um": round(float(r_um.max()), 3) if len(r_um) else None,
            "fraction_at_least": round(float(np.mean(r_um >= MISREG_UM)), 4) if len(r_um) else 0.0,
        }
        flagged_cells.append(r_um >= MISREG_UM)
        truth_ok &= truths.get(sid) is not None
    if not resid:
        return {"flagged": False, "per_slide": {}, "note": "no registration (H&E-only run)"}
    r_all, f_all = np.concatenate(resid), np.concatenate(flagged_cells)
    fraction = float(f_all.mean()) if len(f_all) else 0.0
    agreement = []
    if stable and len(r_all) >= 10:
        s_all = np.concatenate(stable)
        edges = np.unique(np.quantile(r_all, np.linspace(0, 1, 6)))
        q = np.clip(np.searchsorted(edges, r_all, side="right") - 1, 0, len(edges) - 2)
        for k in range(len(edges) - 1):
            sel = (q == k) & np.isfinite(s_all)
            if sel.any():
                agreement.append({"residual_um": [round(float(edges[k]), 3), round(float(edges[k + 1]), 3)],
                                  "cells": int(sel.sum()), "stable": round(float(np.nanmean(s_all[sel])), 4)})  # fmt: skip
    flagged = fraction >= MISREG_FRACTION
    match = None
    if flagged and truth_ok:
        truth = pd.concat([truths[sid] for sid in cells if sid in per_slide], ignore_index=True)
        match = _matching_artifact(f_all, truth)
    return {"flagged": bool(flagged), "fraction_at_least": round(fraction, 4),
            "threshold_um": MISREG_UM, "per_slide": per_slide,
            "label_stability_by_residual": agreement, "matches": match}  # fmt: skip


def section_bias(cfg, cells, tree, feats, thresholds, truths) -> dict[str, Any]:
    grad = _gradient(cells, tree, feats, truths)
    subs = _subpopulations(cells, tree, feats, thresholds, truths)
    rates = _rates(cells, cfg, truths)
    misreg = _misregistration(cells, cfg, truths)
    flags = []
    if misreg["flagged"]:
        flags.append(f"local misregistration: {100 * misreg['fraction_at_least']:.0f}% of cells sit where the registration corrects the IF by >= {MISREG_UM} µm beyond its affine (labels there rest on that correction)"
                     + (f", matches planted {misreg['matches']['artifact']}" if misreg["matches"] else ""))  # fmt: skip
    if grad["flagged"]:
        flags.append(f"staining gradient (membrane {grad['membrane_within_class']['fold_change']:.2f}x, nuclear {grad['nuclear_all_cells']['fold_change']:.2f}x across the tissue)"
                     + (f", matches planted {grad['matches']['artifact']}" if grad["matches"] else ""))  # fmt: skip
    for s in subs:
        if s["flagged"]:
            flags.append(f"weakly staining subpopulation: {100 * s['fraction']:.0f}% of clearly {s['child_marker']}+ cells fail the {s['parent_marker']} gate"
                         + (f", matches planted {s['matches']['artifact']}" if s["matches"] else ""))  # fmt: skip
    for r in rates:
        if r["flagged"]:
            flags.append(
                f"{r['class']} label rate differs {r['ratio'] or float('inf'):.1f}x {r['nuisance']}"
            )
    return {
        "flags": flags,
        "stain_gradient": grad,
        "weak_subpopulations": subs,
        "label_rate_vs_nuisance": rates,
        "misregistration": misreg,
        "conclusion": ("Labels look unbiased by the audited nuisances: no staining gradient, no weakly staining subpopulation, no local misregistration, no change of label rates near tile edges (size dependences are shown, not judged)."
                       if not flags else "Labels are biased: " + "; ".join(flags) + "."),
    }  # fmt: skip


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


def _figures(rep: dict[str, Any], cells) -> dict[str, str]:
    figs: dict[str, str] = {}
    amb = rep["ambiguity"]
    if amb["pairs"]:
        fig = _figure(8, 2.8)
        ax = fig.add_subplot(1, 1, 1)
        names = [
            f"{p['classes'][0]}|{p['classes'][1]}\n{p['channels'][0]}/{p['channels'][1]}"
            for p in amb["pairs"]
        ]
        ax.bar(
            range(len(names)),
            [100 * p["ambiguous_fraction"] for p in amb["pairs"]],
            color="#4477aa",
        )
        ax.axhline(0.51, color="k", ls="--", lw=0.8, label="Immunocto 0.51%")
        ax.set_xticks(range(len(names)), names, fontsize=6)
        ax.set_ylabel("% in ambiguous band")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs["ambiguity"] = _fig_png(fig)
    sens = rep["sensitivity"].get("slides", {})
    if sens:
        fig = _figure(8, 3)
        ax = fig.add_subplot(1, 1, 1)
        sid, v = next(iter(sens.items()))
        for c in (*CLASSES, "ambiguous"):
            ax.plot(
                v["factors"],
                [
                    v["counts"][str(f)].get(c, 0) if str(f) in v["counts"] else np.nan
                    for f in v["factors"]
                ],
                "o-",
                label=c,
            )
        ax.set_xlabel("threshold factor")
        ax.set_ylabel(f"cells ({sid})")
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        figs["sensitivity"] = _fig_png(fig)
    bias = rep["bias_audit"]
    g = bias["stain_gradient"]
    if g["membrane_within_class"]:
        fig = _figure(9, 3.2)
        df = pd.concat(cells.values(), ignore_index=True)
        d = g["membrane_within_class"]["direction"]
        along = df["x_um"].to_numpy() * d[0] + df["y_um"].to_numpy() * d[1]
        ax = fig.add_subplot(1, 2, 1)
        if "Hoechst_mean" in df:
            ax.scatter(
                along, np.log1p(df["Hoechst_mean"].to_numpy(float)), s=1, alpha=0.3, color="#555"
            )
        ax.set_xlabel("position along the fitted gradient (µm)")
        ax.set_ylabel("log Hoechst (all cells)")
        ax = fig.add_subplot(1, 2, 2)
        edges = np.linspace(along.min(), along.max(), 9)
        b = np.clip(np.searchsorted(edges, along) - 1, 0, 7)
        lab = df["gate_label"].to_numpy(object)
        for c in audits.IMMUNE:
            rate = np.bincount(b, weights=(lab == c).astype(float), minlength=8) / np.maximum(
                np.bincount(b, minlength=8), 1
            )
            ax.plot((edges[:-1] + edges[1:]) / 2, rate, "o-", label=c)
        ax.set_xlabel("position along the fitted gradient (µm)")
        ax.set_ylabel("label rate")
        ax.legend(fontsize=7)
        fig.suptitle("staining gradient audit" + (" — FLAGGED" if g["flagged"] else ""), fontsize=9)
        fig.tight_layout()
        figs["gradient"] = _fig_png(fig)
    subs = bias["weak_subpopulations"]
    if subs:
        fig = _figure(8, 3)
        ax = fig.add_subplot(1, 1, 1)
        names = [f"{s['child_marker']}+ fail {s['parent_marker']}" for s in subs]
        ax.bar(range(len(subs)), [100 * (s["fraction"] or 0) for s in subs],
               color=["#cc3311" if s["flagged"] else "#4477aa" for s in subs])  # fmt: skip
        ax.axhline(100 * SUBPOP_FRACTION, color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(subs)), names, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("% of clearly positive cells")
        fig.tight_layout()
        figs["subpopulations"] = _fig_png(fig)
    rates = [r for r in bias["label_rate_vs_nuisance"]]
    if rates:
        nuis = list(dict.fromkeys(r["nuisance"] for r in rates))
        fig = _figure(3.3 * len(nuis), 3)
        for k, n in enumerate(nuis):
            ax = fig.add_subplot(1, len(nuis), k + 1)
            for r in [r for r in rates if r["nuisance"] == n]:
                ax.plot(range(len(r["rate"])), r["rate"], "o-", label=r["class"])
            ax.set_xlabel(f"{n} quintile", fontsize=8)
            ax.set_ylabel("label rate")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs["rates"] = _fig_png(fig)
    return figs


TITLES = {
    "ambiguity": "1. Ambiguity in IF space",
    "sensitivity": "2. Threshold sensitivity",
    "agreement": "3. Reviewer agreement",
    "partial_labels": "4. Partial labels",
    "bias_audit": "5. Bias audit",
    "quality": "6. Quality against truth",
    "sources": "7. Label sources",
}
FIG_OF = {"ambiguity": ["ambiguity"], "sensitivity": ["sensitivity"],
          "bias_audit": ["gradient", "subpopulations", "rates"]}  # fmt: skip


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)[:120]
    return "" if v is None else str(v)


def render_html(rep: dict[str, Any], figs: dict[str, str]) -> str:
    parts = [f"<h1>immunocto validation report</h1><p class=meta>{html.escape(rep['run'])} — {rep['created']} — "
             f"{rep['cells']} cells on {len(rep['slides'])} slide(s){' (simulated: truth shown)' if rep['simulated'] else ''}</p>"]  # fmt: skip
    for key, title in TITLES.items():
        sec = rep[key]
        parts.append(
            f"<section id={key}><h2>{title}</h2><p class=conclusion>{html.escape(sec['conclusion'])}</p>"
        )
        if key == "ambiguity" and sec["pairs"]:
            parts.append(
                _table(
                    sec["pairs"],
                    [
                        "population",
                        "channels",
                        "classes",
                        "cells",
                        "ambiguous_fraction",
                        "accuracy",
                    ],
                )
            )
        if key == "partial_labels":
            parts.append(
                _table(
                    [sec],
                    [
                        c
                        for c in (
                            "labelled_immune",
                            "not_labelled_immune",
                            "hidden_immune_estimate",
                            "hidden_immune_true",
                            "relative_error",
                            "prior",
                            "c",
                        )
                        if c in sec
                    ],
                )
            )
        if key == "bias_audit":
            if sec["flags"]:
                parts.append(
                    "<ul class=flags>"
                    + "".join(f"<li>{html.escape(f)}</li>" for f in sec["flags"])
                    + "</ul>"
                )
            g = sec["stain_gradient"]
            rows = [{"test": "membrane markers within class", **(g["membrane_within_class"] or {})},
                    {"test": "Hoechst, all cells", **(g["nuclear_all_cells"] or {})}]  # fmt: skip
            parts.append(_table(rows, ["test", "cells", "fold_change", "p", "direction", "r2"]))
            parts.append(
                _table(
                    sec["weak_subpopulations"],
                    [
                        "child_marker",
                        "parent_marker",
                        "child_positive",
                        "failing_parent",
                        "fraction",
                        "p",
                        "flagged",
                        "matches",
                    ],
                )
            )
            parts.append(
                _table(
                    sec["label_rate_vs_nuisance"],
                    ["nuisance", "class", "rate", "ratio", "chi2", "p", "flagged"],
                )
            )
            mis = sec.get("misregistration") or {}
            if mis.get("per_slide"):
                parts.append(
                    _table(
                        [{"slide": k, **v} for k, v in mis["per_slide"].items()],
                        ["slide", "median_um", "p90_um", "max_um", "fraction_at_least"],
                    )
                )
        if key == "quality" and sec.get("available"):
            rows = [
                {
                    "labels": col,
                    **{c: f"P {v['precision']} / R {v['recall']}" for c, v in s.items()},
                }
                for col, s in sec["classification"].items()
            ]
            parts.append(_table(rows, ["labels", *CLASSES]))
            parts.append(
                _table(
                    [{"slide": k, **v} for k, v in sec["segmentation"].items()],
                    ["slide", "truth_cells", "cells", "matched", "recall", "precision"],
                )
            )
        if key == "sources" and sec["pairs"]:
            parts.append(_table(sec["pairs"], ["a", "b", "cells", "kappa", "agreement"]))
        for f in FIG_OF.get(key, []):
            if f in figs:
                parts.append(f'<img alt="{f}" src="data:image/png;base64,{figs[f]}">')
        parts.append("</section>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "h2{border-bottom:1px solid #ccc}.conclusion{font-size:1.05em;background:#f3f6fa;padding:.5em}"
             "table{border-collapse:collapse;font-size:.8em;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px}"
             ".flags li{color:#a00}img{max-width:100%}.meta{color:#666}")  # fmt: skip
    return f"<!doctype html><html><head><meta charset=utf-8><title>immunocto validation</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"


def run_validate(
    cfg: RunConfig, *, progress: Progress | None = None
) -> tuple[Path, Path, dict[str, Any]]:
    """Write ``RUN/reports/validation.json`` and ``.html``; returns both paths and the report."""
    from immunocto._fs import atomic_write_text
    from immunocto.phenotype.stage import gating_path, marker_compartments, marker_features
    from immunocto.phenotype.tree import load_tree

    progress = progress or NullProgress()
    progress.start("validate", 7)
    cells = load_cells(cfg)
    tree = load_tree(cfg.gating.tree, base=cfg.run_dir)
    feats = marker_features(cfg, tree, marker_compartments(cfg))
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
        ("partial_labels", lambda: section_partial(cells, truths)),
        ("bias_audit", lambda: section_bias(cfg, cells, tree, feats, thresholds, truths)),
        ("quality", lambda: section_quality(cfg, cells, truths)),
        ("sources", lambda: section_sources(cells)),
    ]
    for key, fn in steps:
        rep[key] = fn()
        progress.advance("validate")
    figs = _figures(rep, cells)
    folder = cfg.run_dir / "reports"
    folder.mkdir(exist_ok=True)
    jpath, hpath = folder / "validation.json", folder / "validation.html"
    atomic_write_text(jpath, json.dumps(_finite(rep), indent=1, default=_json_default) + "\n")
    atomic_write_text(hpath, render_html(rep, figs))
    return jpath, hpath, rep


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
