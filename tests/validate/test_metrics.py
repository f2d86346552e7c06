from __future__ import annotations

import numpy as np
import pytest

from immunocto.validate import (
    aggregated_jaccard,
    centroids,
    detection_by_distance,
    detection_by_iou,
    match_instances,
    match_points,
    object_dice,
    panoptic_quality,
)


def squares(spec, shape=(20, 20)):
    """Label image with one square per (id, y0, x0, size)."""
    out = np.zeros(shape, np.int32)
    for i, y, x, s in spec:
        out[y : y + s, x : x + s] = i
    return out


def test_identical_labels_score_one_whatever_the_ids():
    truth = squares([(1, 1, 1, 4), (2, 10, 10, 5)])
    pred = squares([(7, 1, 1, 4), (3, 10, 10, 5)])
    assert object_dice(truth, pred) == 1.0
    assert aggregated_jaccard(truth, pred) == 1.0
    assert panoptic_quality(truth, pred) == {"pq": 1.0, "sq": 1.0, "dq": 1.0}
    d = detection_by_iou(truth, pred)
    assert (d.tp, d.fp, d.fn, d.f1) == (2, 0, 0, 1.0)


def test_hand_computed_values():
    truth = squares([(1, 0, 0, 4)])  # 16 px
    pred = squares([(1, 0, 2, 4)])  # 16 px, overlap 8 (rows 0-3, cols 2-3)
    ov = match_instances(truth, pred)
    assert ov.inter.tolist() == [8] and ov.iou[0] == pytest.approx(8 / 24)
    assert object_dice(truth, pred) == pytest.approx(0.5)  # 2*8/32
    assert aggregated_jaccard(truth, pred) == pytest.approx(8 / 24)
    assert detection_by_iou(truth, pred).tp == 0  # IoU 1/3 < 0.5
    assert detection_by_iou(truth, pred, thresh=0.3).tp == 1
    assert panoptic_quality(truth, pred)["pq"] == 0.0


def test_missed_and_spurious_objects():
    truth = squares([(1, 0, 0, 4), (2, 10, 10, 4)])
    pred = squares([(5, 0, 0, 4), (6, 15, 0, 3)])
    d = detection_by_iou(truth, pred)
    assert (d.tp, d.fp, d.fn) == (1, 1, 1)
    assert d.precision == 0.5 and d.recall == 0.5
    # AJI: matched 16/16, missed truth adds 16, unmatched prediction adds 9
    assert aggregated_jaccard(truth, pred) == pytest.approx(16 / (16 + 16 + 9))
    pq = panoptic_quality(truth, pred)
    assert pq["dq"] == pytest.approx(1 / (1 + 0.5 + 0.5)) and pq["sq"] == 1.0


def test_one_prediction_covering_two_truths_counts_once():
    truth = squares([(1, 0, 0, 4), (2, 0, 4, 4)])
    pred = squares([(1, 0, 0, 8)], shape=(20, 20))
    pred[4:, :] = 0
    pred[:4, :8] = 1
    assert detection_by_iou(truth, pred, thresh=0.4).tp == 1  # one-to-one


def test_centroid_matching_is_one_to_one_and_optimal():
    # Greedy nearest-first would pair B with P (3 px) and leave A and Q alone; the optimal
    # assignment matches both.
    truth = np.array([[0.0, 0.0], [8.0, 0.0]])  # A, B
    pred = np.array([[5.0, 0.0], [13.0, 0.0], [50.0, 50.0]])  # P, Q, far
    ti, pi = match_points(truth, pred, radius=6.0)
    assert sorted(zip(ti.tolist(), pi.tolist(), strict=True)) == [(0, 0), (1, 1)]
    res = detection_by_distance(
        truth,
        pred,
        radius=6.0,
        truth_class=np.array(["a", "b"]),
        pred_class=np.array(["a", "a", "b"]),
    )
    assert res["all"]["tp"] == 2 and res["all"]["fp"] == 1
    assert res["recall_by_truth_class"] == {"a": 1.0, "b": 1.0}
    assert res["by_class"]["a"]["tp"] == 1 and res["by_class"]["b"]["tp"] == 0


def test_zero_distance_pairs_match():
    pts = np.array([[1.0, 1.0], [5.0, 5.0]])
    ti, _pi = match_points(pts, pts.copy(), radius=1.0)
    assert len(ti) == 2


def test_centroids():
    labels = squares([(3, 2, 4, 2)])
    ids, xy = centroids(labels)
    assert ids.tolist() == [3] and xy.tolist() == [[4.5, 2.5]]


def test_shapes_must_agree():
    with pytest.raises(
        ValueError, match=r"`truth` \(shape \(2, 2\)\) and `pred` \(shape \(3, 3\)\)"
    ):
        match_instances(np.zeros((2, 2), int), np.zeros((3, 3), int))


def test_empty_images():
    z = np.zeros((5, 5), int)
    assert object_dice(z, z) == 1.0 and aggregated_jaccard(z, z) == 1.0
    one = squares([(1, 0, 0, 2)], shape=(5, 5))
    assert object_dice(one, z) == 0.0 and detection_by_iou(one, z).recall == 0.0


def test_objects_that_never_overlap():
    truth = squares([(1, 0, 0, 3)])
    pred = squares([(1, 10, 10, 3)])
    assert object_dice(truth, pred) == 0.0
    assert aggregated_jaccard(truth, pred) == 0.0
    assert detection_by_iou(truth, pred).f1 == 0.0


def test_centroids_by_direct_bins_equal_the_sorted_path():
    """Non-negative integer ids go straight to bins (no sort of the image); ids with gaps,
    huge ids and float labels take the sorted path: the same ids and centroids either way."""
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 5, 9, 40], size=(37, 53)).astype(np.int32)
    ids, xy = centroids(labels)
    ref_ids, ref_xy = centroids(labels.astype(np.float64))  # sorted path
    np.testing.assert_array_equal(ids, ref_ids.astype(np.int32))
    np.testing.assert_array_equal(xy, ref_xy)
    big = labels.astype(np.int64) * 10**9  # ids far past the image size: sorted path
    np.testing.assert_array_equal(centroids(big)[0], ids.astype(np.int64) * 10**9)
    np.testing.assert_array_equal(centroids(big)[1], xy)
    assert centroids(np.zeros((4, 4), np.int32))[1].shape == (0, 2)
