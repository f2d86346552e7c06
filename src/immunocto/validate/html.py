"""The validation report's figures (matplotlib, embedded as PNG) and its one-page HTML
(``templates/report.html.j2``, rendered with Jinja2)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import pandas as pd

from immunocto.conventions import CLASSES
from immunocto.validate import audits
from immunocto.validate.bias import SUBPOP_FRACTION


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


def figures(rep: dict[str, Any], cells) -> dict[str, str]:
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


def fmt(v: Any) -> str:
    """One table cell as text: 4 significant digits, JSON for lists and dicts, '' for None."""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)[:120]
    return "" if v is None else str(v)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> dict[str, Any]:
    return {"cols": cols, "rows": [[fmt(r.get(c)) for c in cols] for r in rows]}


def _tables(key: str, sec: dict[str, Any]) -> list[dict[str, Any]]:
    """The tables of section ``key`` of the report: which rows and columns it shows."""
    out = []
    if key == "ambiguity" and sec["pairs"]:
        cols = ["population", "channels", "classes", "cells", "ambiguous_fraction", "accuracy"]
        out.append(_table(sec["pairs"], cols))
    if key == "partial_labels":
        cols = ["labelled_immune", "not_labelled_immune", "hidden_immune_estimate",
                "hidden_immune_true", "relative_error", "prior", "c"]  # fmt: skip
        out.append(_table([sec], [c for c in cols if c in sec]))
    if key == "bias_audit":
        g = sec["stain_gradient"]
        rows = [{"test": "membrane markers within class", **(g["membrane_within_class"] or {})},
                {"test": "Hoechst, all cells", **(g["nuclear_all_cells"] or {})}]  # fmt: skip
        out.append(_table(rows, ["test", "cells", "fold_change", "p", "direction", "r2"]))
        cols = ["child_marker", "parent_marker", "child_positive", "failing_parent", "fraction",
                "p", "flagged", "matches"]  # fmt: skip
        out.append(_table(sec["weak_subpopulations"], cols))
        cols = ["nuisance", "class", "rate", "ratio", "chi2", "p", "flagged"]
        out.append(_table(sec["label_rate_vs_nuisance"], cols))
        mis = sec.get("misregistration") or {}
        if mis.get("per_slide"):
            rows = [{"slide": k, **v} for k, v in mis["per_slide"].items()]
            out.append(
                _table(rows, ["slide", "median_um", "p90_um", "max_um", "fraction_at_least"])
            )
    if key == "quality" and sec.get("available"):
        rows = [{"labels": col, **{c: f"P {v['precision']} / R {v['recall']}" for c, v in s.items()}}
                for col, s in sec["classification"].items()]  # fmt: skip
        out.append(_table(rows, ["labels", *CLASSES]))
        rows = [{"slide": k, **v} for k, v in sec["segmentation"].items()]
        out.append(
            _table(rows, ["slide", "truth_cells", "cells", "matched", "recall", "precision"])
        )
    if key == "sources" and sec["pairs"]:
        out.append(_table(sec["pairs"], ["a", "b", "cells", "kappa", "agreement"]))
    return out


def render_html(rep: dict[str, Any], figs: dict[str, str]) -> str:
    """The one-page report from ``templates/report.html.j2`` (Jinja2, every value escaped)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("immunocto.validate", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )  # fmt: skip
    sections = [
        {
            "id": key,
            "title": title,
            "conclusion": rep[key]["conclusion"],
            "flags": rep[key]["flags"] if key == "bias_audit" else [],
            "tables": _tables(key, rep[key]),
            "figures": [
                {"name": f, "png_base64": figs[f]} for f in FIG_OF.get(key, []) if f in figs
            ],
        }
        for key, title in TITLES.items()
    ]
    return env.get_template("report.html.j2").render(
        run=rep["run"], created=rep["created"], cells=rep["cells"], n_slides=len(rep["slides"]),
        simulated=rep["simulated"], sections=sections,
    )  # fmt: skip
