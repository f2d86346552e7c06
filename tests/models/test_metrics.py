"""``classification_metrics`` cross-checked against scikit-learn (a test-only dependency) with
``zero_division=0`` and ``labels`` = the classes present in the truth or the predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from immunocto.models.metrics import classification_metrics

sk = pytest.importorskip("sklearn.metrics")

CLASSES = ("a", "b", "c", "d", "e")
K = len(CLASSES)
KEYS = {"accuracy", "macro_f1", "kappa", "per_class", "confusion", "n"}


def _check_against_sklearn(true: np.ndarray, pred: np.ndarray, check_kappa: bool = True) -> dict:
    r = classification_metrics(true, pred, CLASSES)
    assert set(r) == KEYS
    labels = sorted(set(true.tolist()) | set(pred.tolist()))
    prec, rec, f1, support = sk.precision_recall_fscore_support(
        true, pred, labels=labels, zero_division=0
    )
    for j, i in enumerate(labels):
        got = r["per_class"][CLASSES[i]]
        assert got["precision"] == pytest.approx(prec[j], abs=1e-12), CLASSES[i]
        assert got["recall"] == pytest.approx(rec[j], abs=1e-12), CLASSES[i]
        assert got["f1"] == pytest.approx(f1[j], abs=1e-12), CLASSES[i]
        assert got["support"] == support[j]
    for i in set(range(K)) - set(labels):  # absent on both sides
        got = r["per_class"][CLASSES[i]]
        assert math.isnan(got["precision"]) and math.isnan(got["recall"])
        assert math.isnan(got["f1"]) and got["support"] == 0
    macro = sk.f1_score(true, pred, labels=labels, average="macro", zero_division=0)
    assert r["macro_f1"] == pytest.approx(macro, abs=1e-12)
    assert r["accuracy"] == pytest.approx(sk.accuracy_score(true, pred), abs=1e-12)
    if check_kappa:
        assert r["kappa"] == pytest.approx(
            sk.cohen_kappa_score(true, pred, labels=labels), abs=1e-12
        )
    np.testing.assert_array_equal(
        r["confusion"], sk.confusion_matrix(true, pred, labels=list(range(K)))
    )
    assert r["n"] == len(true)
    return r


def _random_labels(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, K, n)
    # a better-than-chance classifier: right 60 % of the time, otherwise uniform
    pred = np.where(rng.random(n) < 0.6, true, rng.integers(0, K, n))
    return true, pred


@pytest.mark.parametrize("seed", range(6))
def test_random_labels_match_sklearn(seed):
    true, pred = _random_labels(seed)
    r = _check_against_sklearn(true, pred)
    assert all(np.isfinite(v["f1"]) for v in r["per_class"].values())


@pytest.mark.parametrize("seed", range(6))
def test_class_never_predicted_scores_zero_and_counts(seed):
    true, pred = _random_labels(seed)
    gone = seed % K
    pred = np.where(pred == gone, (gone + 1) % K, pred)
    assert (true == gone).any() and not (pred == gone).any()
    r = _check_against_sklearn(true, pred)
    got = r["per_class"][CLASSES[gone]]
    assert (got["precision"], got["recall"], got["f1"]) == (0.0, 0.0, 0.0)
    f1s = [v["f1"] for v in r["per_class"].values()]
    assert r["macro_f1"] == pytest.approx(np.mean(f1s))  # all K classes, the zero included


@pytest.mark.parametrize("seed", range(6))
def test_class_absent_from_truth_but_predicted_counts(seed):
    true, pred = _random_labels(seed)
    gone = seed % K
    true = np.where(true == gone, (gone + 2) % K, true)
    assert not (true == gone).any() and (pred == gone).any()
    r = _check_against_sklearn(true, pred)
    got = r["per_class"][CLASSES[gone]]
    assert (got["precision"], got["recall"], got["f1"], got["support"]) == (0.0, 0.0, 0.0, 0)
    f1s = [v["f1"] for v in r["per_class"].values()]
    assert r["macro_f1"] == pytest.approx(np.mean(f1s))


@pytest.mark.parametrize("seed", range(4))
def test_class_absent_on_both_sides_is_left_out(seed):
    true, pred = _random_labels(seed)
    gone = seed % K
    keep = (true != gone) & (pred != gone)
    true, pred = true[keep], pred[keep]
    r = _check_against_sklearn(true, pred)
    assert math.isnan(r["per_class"][CLASSES[gone]]["f1"])
    f1s = [v["f1"] for c, v in r["per_class"].items() if c != CLASSES[gone]]
    assert np.isfinite(r["macro_f1"]) and r["macro_f1"] == pytest.approx(np.mean(f1s))


def test_hand_computed_example():
    # a: 2 cells, both right; b: 2 cells, never predicted (both called a); c: never in truth
    # but predicted once (for a d); d: 1 cell; e: absent on both sides
    true = np.array([0, 0, 1, 1, 3])
    pred = np.array([0, 0, 0, 0, 2])
    r = _check_against_sklearn(true, pred)
    per = r["per_class"]
    assert per["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 2}
    assert per["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert per["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert per["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert all(math.isnan(per["e"][m]) for m in ("precision", "recall", "f1"))
    assert r["macro_f1"] == pytest.approx((2 / 3) / 4)  # a, b, c, d count; e does not
    assert r["accuracy"] == pytest.approx(0.4)


def test_all_correct():
    true = np.random.default_rng(7).integers(0, K, 200)
    r = _check_against_sklearn(true, true.copy())
    assert r["accuracy"] == 1.0 and r["macro_f1"] == 1.0 and r["kappa"] == pytest.approx(1.0)
    assert all(v["f1"] == 1.0 for v in r["per_class"].values())


def test_all_correct_on_one_class_kappa_is_one():
    # documented departure from sklearn (which gives NaN here): perfect agreement is κ = 1
    true = np.full(10, 2)
    r = _check_against_sklearn(true, true.copy(), check_kappa=False)
    assert r["kappa"] == 1.0 and r["macro_f1"] == 1.0 and r["accuracy"] == 1.0


def test_every_prediction_wrong():
    true = np.random.default_rng(11).integers(0, K, 200)
    pred = (true + 1 + np.random.default_rng(12).integers(0, K - 1, 200)) % K
    assert not (pred == true).any()
    r = _check_against_sklearn(true, pred)
    assert r["accuracy"] == 0.0 and r["macro_f1"] == 0.0 and r["kappa"] < 0
    assert all(v["f1"] == 0.0 for v in r["per_class"].values())


@pytest.mark.parametrize("empty", [np.array([], dtype=np.int64), []])
def test_empty_input(empty):
    r = classification_metrics(empty, empty, CLASSES)
    assert set(r) == KEYS and r["n"] == 0
    assert math.isnan(r["accuracy"]) and math.isnan(r["macro_f1"]) and math.isnan(r["kappa"])
    assert r["confusion"] == [[0] * K for _ in range(K)]
    for v in r["per_class"].values():
        assert v["support"] == 0 and all(math.isnan(v[m]) for m in ("precision", "recall", "f1"))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(np.array([0, K]), np.array([0, 1]), CLASSES)
    with pytest.raises(ValueError, match="length"):
        classification_metrics(np.array([0, 1]), np.array([0]), CLASSES)
    with pytest.raises(TypeError, match="integer"):
        classification_metrics(np.array([0.0, 1.0]), np.array([0.0, 1.0]), CLASSES)
