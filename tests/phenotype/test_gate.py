from __future__ import annotations

import numpy as np
import pytest

from immunocto.phenotype import (
    AMBIGUOUS,
    UNLABELED,
    gate_cells,
    gmm_threshold,
    load_tree,
    otsu3_threshold,
    otsu_threshold,
    sensitivity,
)


def synthetic(n=4000, seed=0):
    """Log intensities of cells whose true labels are known (CRC markers)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(
        ["other", "cd4_t", "cd8_t", "b_cell", "macrophage"], n, p=[0.5, 0.15, 0.1, 0.15, 0.1]
    )
    lo, hi = 5.4, 7.2
    expr = {
        "CD45": truth != "other",
        "CD3e": np.isin(truth, ["cd4_t", "cd8_t"]),
        "CD4": truth == "cd4_t",
        "CD8a": truth == "cd8_t",
        "CD20": truth == "b_cell",
        "CD68": truth == "macrophage",
        "CD163": (truth == "macrophage") & (rng.random(n) < 0.6),
    }
    z = {m: np.where(pos, hi, lo) + rng.normal(0, 0.25, n) for m, pos in expr.items()}
    return z, truth


def test_recovers_known_labels():
    z, truth = synthetic()
    res = gate_cells(load_tree("builtin:crc"), z, np.ones(len(truth), bool))
    assert np.mean(res.label == truth) > 0.98
    assert res.history[-1] == 0  # the iteration settled


def test_double_positives_are_ambiguous_with_a_reason():
    z, truth = synthetic()
    cd4 = np.flatnonzero(truth == "cd4_t")[:10]
    z["CD8a"][cd4] = 7.3
    res = gate_cells(load_tree("builtin:crc"), z, np.ones(len(truth), bool))
    assert (res.label[cd4] == AMBIGUOUS).all()
    # the cd4_t and cd8_t rules exclude each other, so a double positive matches neither
    assert res.reason[cd4[0]] == "ambiguous at t_cell: no child matched (CD4+ CD8a+)"
    ok = np.flatnonzero(res.label == "cd8_t")[0]
    assert res.reason[ok] == "CD45+ > CD3e+ > CD8a+ CD4-"


def test_ineligible_cells_are_unlabeled():
    z, truth = synthetic()
    eligible = np.ones(len(truth), bool)
    eligible[:5] = False
    res = gate_cells(
        load_tree("builtin:crc"), z, eligible, ineligible_reason="nuclear stain too faint"
    )
    assert (res.label[:5] == UNLABELED).all() and res.reason[
        0
    ] == "unlabeled: nuclear stain too faint"
    assert np.isnan(res.margin[:5]).all() and np.isfinite(res.margin[5:]).all()


def test_margin_is_distance_to_the_nearest_deciding_threshold():
    z, truth = synthetic()
    tree = load_tree("builtin:crc")
    res = gate_cells(tree, z, np.ones(len(truth), bool), iterative=False)
    i = np.flatnonzero(res.label == "other")[0]  # decided only at the root, by CD45
    t, s = res.thresholds["root"]["CD45"], res.scales["root"]["CD45"]
    assert res.margin[i] == pytest.approx(abs(z["CD45"][i] - t) / s)


def test_manual_thresholds_and_sensitivity():
    z, truth = synthetic()
    tree = load_tree("builtin:crc")
    manual = dict.fromkeys(tree.markers, 6.3)
    eligible = np.ones(len(truth), bool)
    res = gate_cells(tree, z, eligible, method="manual", manual=manual)
    assert all(t == 6.3 for ms in res.thresholds.values() for t in ms.values())
    counts, labels, stability = sensitivity(tree, z, eligible, res, [0.5, 1.0, 2.0])
    np.testing.assert_array_equal(labels[1.0], res.label)
    # raising every threshold can only lose positives: fewer immune cells at x2 than at x0.5
    immune = lambda c: sum(v for k, v in c.items() if k not in ("other",))  # noqa: E731
    assert immune(counts[2.0]) < immune(counts[1.0]) <= immune(counts[0.5])
    assert 0 < stability.min() and stability.max() == 1.0


def test_threshold_methods():
    rng = np.random.default_rng(1)
    neg = rng.normal(5.5, 0.1, 8000)
    spill = rng.normal(6.3, 0.15, 1500)  # neighbours' spill
    pos = rng.normal(7.5, 0.2, 600)
    both = np.concatenate([neg, pos])
    assert 5.7 < otsu_threshold(both) < 7.3
    assert 5.7 < gmm_threshold(both) < 7.3
    three = np.concatenate([neg, spill, pos])
    assert otsu_threshold(three) < 6.3 < otsu3_threshold(three) < 7.3  # cuts above the spill
    with pytest.raises(ValueError, match="manual thresholds missing for CD45"):
        gate_cells(
            load_tree("builtin:crc"),
            synthetic()[0],
            np.ones(4000, bool),
            method="manual",
            manual={},
        )


def test_overlapping_children_are_ambiguous():
    from immunocto.phenotype import tree_from_dict

    tree = tree_from_dict(
        {
            "name": "overlap",
            "nodes": [
                {"name": "a", "parent": "root", "rule": {"pos": ["A"]}, "label": "a"},
                {"name": "b", "parent": "root", "rule": {"pos": ["B"]}, "label": "b"},
            ],
        }
    )
    rng = np.random.default_rng(2)
    z = {
        "A": np.r_[rng.normal(7, 0.1, 50), rng.normal(5, 0.1, 50)],
        "B": np.r_[rng.normal(7, 0.1, 50), rng.normal(5, 0.1, 50)],
    }
    z["B"][50:75] = 7.0
    res = gate_cells(tree, z, np.ones(100, bool), method="manual", manual={"A": 6.0, "B": 6.0})
    assert (res.label[:50] == AMBIGUOUS).all()
    assert res.reason[0] == "ambiguous at root: several children matched (A+ B+)"
    assert (res.label[50:75] == "b").all() and (res.label[75:] == AMBIGUOUS).all()
