from __future__ import annotations

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from immunocto.io import open_slide
from immunocto.segment import object_features, segment_he, segment_nuclear_stain
from immunocto.validate import centroids, detection_by_distance, object_dice


def blobs(centres, radius, shape=(200, 200), bright=1000.0, seed=0):
    img = np.full(shape, 100.0)
    for cy, cx in centres:
        rr, cc = disk((cy, cx), radius, shape=shape)
        img[rr, cc] = bright
    return img + np.random.default_rng(seed).normal(0, 20, shape)


def test_nuclear_stain_counts_separate_and_touching_nuclei():
    centres = [(40, 40), (40, 140), (150, 60), (150, 83)]  # the last two touch
    labels = segment_nuclear_stain(blobs(centres, 12), mpp=0.325)
    assert labels.max() == 4
    _ids, xy = centroids(labels)
    d = detection_by_distance(np.array(centres)[:, ::-1], xy, radius=4.0)["all"]
    assert d["tp"] == 4


def test_debris_and_clumps_are_dropped_by_area():
    labels = segment_nuclear_stain(blobs([(50, 50)], 2) + blobs([(150, 150)], 11) - 100, mpp=0.325)
    assert labels.max() == 1  # the 2-px speck (<7 µm²) is gone


def test_he_finds_the_simulated_nuclei(sim_run):
    with open_slide(sim_run / "slides/sim000/he.ome.tif") as he:
        rgb = he.read_region(0, 0, 512, 512)
    truth = tifffile.imread(sim_run / "truth/sim000/nuclei.tif")[:512, :512]
    pred = segment_he(rgb, mpp=0.325)
    _, t = centroids(truth)
    _, p = centroids(pred)
    det = detection_by_distance(t * 0.325, p * 0.325, radius=4.0)["all"]
    assert det["recall"] > 0.85 and det["precision"] > 0.75
    assert object_dice(truth, pred) > 0.6


@pytest.mark.parametrize("bad", [np.zeros((10, 10)), np.zeros((10, 10, 4), np.uint8)])
def test_he_rejects_non_rgb(bad):
    with pytest.raises(ValueError, match=r"`rgb` must be \(h, w, 3\)"):
        segment_he(bad, mpp=0.3)


def test_mpp_must_be_positive():
    with pytest.raises(ValueError, match="`mpp` must be > 0"):
        segment_nuclear_stain(np.zeros((10, 10)), mpp=0)


def test_object_features_match_skimage():
    from skimage.measure import regionprops_table

    labels = np.zeros((80, 90), np.int32)
    rr, cc = disk((30, 30), 10)
    labels[rr, cc] = 1
    labels[50:70, 40:45] = 2
    labels[60:65, 60:80] = 3
    labels[62, 60:80] = 0  # a notch: not convex
    f = object_features(labels, x0=100, y0=7)
    r = regionprops_table(
        labels,
        properties=("area", "centroid", "eccentricity", "solidity", "bbox", "axis_major_length"),
    )
    np.testing.assert_array_equal(f["area_px"], r["area"])
    np.testing.assert_allclose(f["x"], r["centroid-1"] + 100)
    np.testing.assert_allclose(f["y"], r["centroid-0"] + 7)
    np.testing.assert_allclose(f["eccentricity"], r["eccentricity"], atol=1e-6)
    np.testing.assert_allclose(f["major_axis_px"], r["axis_major_length"], atol=1e-6)
    np.testing.assert_allclose(f["solidity"], r["solidity"], atol=0.03)
    np.testing.assert_array_equal(f["bbox_x1"], r["bbox-3"] + 100)
