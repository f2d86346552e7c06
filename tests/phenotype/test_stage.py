from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from helpers import simulate_small
from immunocto.cli import app
from immunocto.config import load_config
from immunocto.phenotype import run_gate
from immunocto.validate import match_points


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    run = simulate_small(
        tmp_path_factory.mktemp("gate") / "run", size=1536, seed=3, tile=512, workers=2
    )
    cfg = load_config(run)
    results = run_gate(cfg, with_sensitivity=True)  # quantifies, segments, registers on the way
    return run, results


def test_labels_reasons_margins_and_stability(gated):
    run, _results = gated
    cells = pq.read_table(run / "cells/sim000.parquet").to_pandas()
    for col in ("gate_label", "gate_margin", "gate_reason", "gate_stability"):
        assert col in cells
    assert set(cells["gate_label"]) <= {
        "cd4_t",
        "cd8_t",
        "b_cell",
        "macrophage",
        "other",
        "ambiguous",
        "unlabeled",
    }
    t = cells[cells["gate_label"] == "cd8_t"].iloc[0]
    assert t["gate_reason"] == "CD45+ > CD3e+ > CD8a+ CD4-"
    assert 0 <= cells["gate_stability"].min() and cells["gate_stability"].max() == 1
    # low-margin cells flip more under threshold changes
    low = cells["gate_margin"] < cells["gate_margin"].quantile(0.2)
    assert cells.loc[low, "gate_stability"].mean() < cells.loc[~low, "gate_stability"].mean()


def test_precision_against_truth(gated):
    run, _ = gated
    cells = pq.read_table(run / "cells/sim000.parquet").to_pandas()
    truth = pq.read_table(run / "truth/sim000/cells.parquet").to_pandas()
    ti, pi = match_points(
        truth[["x", "y"]].to_numpy() * 0.325, cells[["x", "y"]].to_numpy() * 0.325, 4.0
    )
    label = cells["gate_label"].to_numpy()[pi]
    true = truth["class"].to_numpy()[ti]
    for c in ("cd4_t", "cd8_t", "b_cell"):
        assert np.mean(true[label == c] == c) > 0.9, c
    for c in ("macrophage", "other"):
        assert np.mean(true[label == c] == c) > 0.75, c  # small slide: a few cells decide


def test_report_and_figures(gated):
    run, _results = gated
    report = json.loads((run / "gating/sim000.json").read_text())
    assert report["iterations"] >= 2 and report["label_changes_per_iteration"][-1] == 0
    assert set(report["thresholds"]) == {"root", "immune", "t_cell", "non_t"}
    assert report["thresholds"]["root"]["CD45"] > 0
    assert report["features"]["CD45"] == "CD45_cell" and report["methods"]["CD68"] == "otsu3"
    factors = report["sensitivity"]["factors"]
    assert 0.7 in factors and 1.3 in factors
    lo, hi = report["sensitivity"]["counts"]["0.7"], report["sensitivity"]["counts"]["1.3"]
    assert lo["other"] < hi["other"]  # higher thresholds: more cells fall out of CD45+
    assert (run / "figures/sim000_gates.png").stat().st_size > 10_000
    assert (run / "figures/sim000_sensitivity.png").stat().st_size > 10_000


def test_gate_command(gated):
    run, _ = gated
    result = CliRunner().invoke(app, ["gate", str(run), "--sensitivity"])
    assert result.exit_code == 0, result.output
    assert "counts at x0.7 / x1 / x1.3" in result.output
    bad = run / "bad.yaml"
    bad.write_text("name: t\nnodes:\n  - {name: a, parent: root, rule: {pos: [CD999]}, label: a}\n")
    text = (run / "immunocto.yaml").read_text()
    data = yaml.safe_load(text)
    data["gating"]["tree"] = str(bad)
    (run / "immunocto.yaml").write_text(yaml.safe_dump(data))
    try:
        result = CliRunner().invoke(app, ["gate", str(run)])
        assert result.exit_code == 2 and "CD999_ring" in result.stderr
    finally:
        (run / "immunocto.yaml").write_text(text)


def test_gate_statistic_follows_the_marker_compartment(tmp_path):
    from immunocto.errors import ConfigError, InputFileError
    from immunocto.io.base import read_marker_compartments
    from immunocto.phenotype.stage import marker_features
    from immunocto.phenotype.tree import tree_from_dict

    tree = tree_from_dict(
        {
            "name": "prolif",
            "nodes": [
                {"name": "ki67_pos", "parent": "root", "rule": {"pos": ["Ki67"]}, "label": "p"},
                {"name": "ki67_neg", "parent": "root", "rule": {"neg": ["Ki67"]}},
                {"name": "x", "parent": "ki67_neg", "rule": {"pos": ["CD3e", "Lamin-B1"]}},
                {"name": "y", "parent": "x", "rule": {"pos": ["MyMarker"]}, "label": "y"},
            ],
        }
    )
    cfg = load_config(_cfg(tmp_path), check_files=False)
    feats = marker_features(cfg, tree)
    # nuclear markers on the nucleus mean, membrane markers on the ring (the defaults)
    assert feats == {
        "Ki67": "Ki67_mean",
        "CD3e": "CD3e_ring",
        "Lamin-B1": "Lamin-B1_mean",
        "MyMarker": "MyMarker_ring",
    }
    # markers.csv says MyMarker is nuclear; the config's per-marker choice wins over both
    csv = tmp_path / "markers.csv"
    csv.write_text("marker_name,compartment\nKi67,\nCD3e,membrane\nMyMarker,Nuclear\n")
    comp = read_marker_compartments(csv)
    assert comp == {"CD3e": "membrane", "MyMarker": "nuclear"}
    cfg.gating.features = {"Ki67": "p90"}
    assert marker_features(cfg, tree, comp)["MyMarker"] == "MyMarker_mean"
    assert marker_features(cfg, tree, comp)["Ki67"] == "Ki67_p90"
    # the tree's own `features` sit between the config and the compartment default
    with_features = tree_from_dict(
        {**tree.to_dict(), "features": {"Ki67": "nucmean", "CD3e": "cell"}}
    )
    feats = marker_features(cfg, with_features, comp)
    assert feats["Ki67"] == "Ki67_p90" and feats["CD3e"] == "CD3e_cell"
    with pytest.raises(ConfigError, match=r"features\.CD3e: 'avg' is not a statistic"):
        tree_from_dict({**tree.to_dict(), "features": {"CD3e": "avg"}})
    csv.write_text("marker_name,compartment\nKi67,nucleus\n")
    with pytest.raises(InputFileError, match=r"markers.csv: row 2 \(Ki67\).*nuclear, membrane"):
        read_marker_compartments(csv)


def _cfg(tmp_path):
    path = tmp_path / "immunocto.yaml"
    path.write_text(yaml.safe_dump({"slides": [{"id": "a", "he": "he.tif", "mpp": 0.5}]}))
    return path
