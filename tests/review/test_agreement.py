"""Agreement statistics against textbook values, and the V0 consensus."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from immunocto.review.agreement import (
    agreement_report,
    bootstrap_ci,
    cohen_kappa,
    concordance,
    confusion,
    fleiss_kappa,
)
from immunocto.review.export import consensus


def test_cohen_kappa_textbook_example():
    # 50 items: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> po 0.7, pe 0.5, kappa 0.4
    a = np.array(["cd4_t"] * 25 + ["other"] * 25, object)
    b = np.array(["cd4_t"] * 20 + ["other"] * 5 + ["cd4_t"] * 10 + ["other"] * 15, object)
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == 1.0
    single = np.array(["other"] * 10, object)
    assert cohen_kappa(single, single) == 1.0  # perfect agreement, even on one label
    m = confusion(a, b)
    assert m.sum() == 50 and m[0, 0] == 20 and m[0, 4] == 5


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) / Wikipedia: 10 subjects, 14 raters, 5 categories -> 0.210
    counts = np.array([
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ])  # fmt: skip
    assert fleiss_kappa(counts) == pytest.approx(0.210, abs=5e-4)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[2, 0], [1, 0]]))


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = (rng.random(50) < 0.8).astype(float)
    big = (rng.random(5000) < 0.8).astype(float)
    m, lo, hi = bootstrap_ci(small)
    assert lo < m < hi
    _, lo2, hi2 = bootstrap_ci(big)
    assert hi2 - lo2 < (hi - lo) / 5 and lo2 < 0.8 < hi2


def test_concordance_per_class_leaves_out_unsure():
    auto = np.array(["cd4_t"] * 10 + ["cd8_t"] * 10, object)
    rev = auto.copy()
    rev[:2] = "cd8_t"  # two CD4 calls rejected
    rev[15] = "ambiguous"
    c = concordance(rev, auto, n_boot=200)
    assert c["n"] == 19 and c["ambiguous"] == 1
    assert c["per_class"]["cd4_t"]["value"] == pytest.approx(0.8)
    assert c["per_class"]["cd8_t"]["value"] == 1.0 and c["per_class"]["b_cell"]["n"] == 0


def _latest(rows):
    return pd.DataFrame(rows, columns=["reviewer", "slide_id", "cell_id", "row", "label", "unsure"])


def test_report_pairs_and_fleiss_for_three_reviewers():
    index = pd.DataFrame(
        {"row": range(6), "label": ["cd4_t", "cd8_t", "other", "other", "b_cell", "macrophage"]}
    )
    rows = []
    for r in ("ann", "bob", "cy"):
        for i, lab in enumerate(index["label"]):
            rows.append((r, "s", i, i, "other" if (r == "cy" and i == 0) else lab, 0))
    rep = agreement_report(_latest(rows), index, n_boot=100)
    pair = {(p["a"], p["b"]): p for p in rep["pairs"]}
    assert pair[("ann", "bob")]["kappa"] == 1.0 and pair[("ann", "cy")]["kappa"] < 1.0
    assert rep["fleiss"]["n"] == 6 and 0 < rep["fleiss"]["kappa"] < 1
    assert rep["concordance"]["ann"]["overall"]["value"] == 1.0


def test_consensus_majority_ties_and_agreement():
    rows = [
        ("a", "s", 1, 0, "cd4_t", 0), ("b", "s", 1, 0, "cd4_t", 0), ("c", "s", 1, 0, "cd8_t", 1),
        ("a", "s", 2, 1, "other", 0), ("b", "s", 2, 1, "not_cell", 0),
        ("a", "s", 3, 2, "b_cell", 0),
    ]  # fmt: skip
    out = consensus(_latest(rows)).set_index("cell_id")
    assert out.loc[1, "review_label"] == "cd4_t" and out.loc[1, "review_n"] == 3
    assert out.loc[1, "review_agreement"] == pytest.approx(2 / 3) and bool(
        out.loc[1, "review_unsure"]
    )
    assert out.loc[2, "review_label"] == "ambiguous"  # a tie is never folded into either label
    assert out.loc[3, "review_label"] == "b_cell" and out.loc[3, "review_agreement"] == 1.0
