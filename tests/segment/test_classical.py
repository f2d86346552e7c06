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
    # hulls deferred (what a tile does), then only for the objects it keeps: the same values
    from immunocto.segment.measure import solidity

    lazy = object_features(labels, hulls=False)
    assert np.all(np.isnan(lazy["solidity"]))
    np.testing.assert_array_equal(solidity(labels, [3, 1]), f["solidity"][[2, 0]])
    assert len(solidity(labels, [])) == 0


def test_vectorised_hulls_equal_qhull_per_object():
    """The monotone chain over row extremes gives Qhull's hull of the pixel centres, object by
    object: random blobs (concave, holed, touching the border) and degenerate shapes."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    from immunocto.segment.measure import solidity

    rng = np.random.default_rng(4)
    labels, n = ndimage.label(ndimage.gaussian_filter(rng.random((160, 160)), 2.5) > 0.51)
    extra = {
        n + 1: (5, slice(2, 9)),
        n + 2: (slice(20, 27), 150),
        n + 3: (40, 40),
        n + 4: (slice(60, 62), slice(60, 62)),
    }  # a row, a column, a dot, a 2x2 square
    for i, where in extra.items():
        labels[where] = i
    ids = np.arange(1, n + 5)
    expected = []
    for i in ids:
        ys, xs = np.nonzero(labels == i)
        try:
            hull = ConvexHull(np.stack([xs, ys], 1)) if len(xs) >= 4 else None
        except QhullError:
            hull = None
        expected.append(
            1.0 if hull is None else min(len(xs) / (hull.volume + hull.area / 2 + 1), 1)
        )
    assert n > 20 and min(expected) < 0.8
    np.testing.assert_allclose(solidity(labels, ids), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(solidity(labels, ids[::-1]), expected[::-1], rtol=0, atol=1e-12)


def textured_blobs(centres_um, radius_um, mpp, size_um=120.0, seed=0):
    """Discs with a grainy, spotted interior (real DAPI chromatin), drawn at ``mpp``."""
    rng = np.random.default_rng(seed)
    n = round(size_um / mpp)
    yy, xx = np.mgrid[0:n, 0:n] * mpp
    img = np.full((n, n), 100.0)
    for cy, cx in centres_um:
        inside = np.hypot(yy - cy, xx - cx) <= radius_um
        img[inside] = 800.0
    spots = rng.uniform(0, size_um, (400, 2))
    for sy, sx in spots:  # chromatin clumps: bright specks 1 µm across
        img[(np.hypot(yy - sy, xx - sx) <= 1.0) & (img > 400)] += 500.0
    return img + rng.normal(0, 30, img.shape)


@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0])
def test_large_nuclei_stay_whole_with_the_measured_size(mpp):
    # 20 µm nuclei: 12 apart, plus two that touch (centres 18 µm apart)
    centres = [(15, 15 + 30 * k) for k in range(4)] + [(55, 15 + 30 * k) for k in range(4)]
    centres += [(95, 15 + 25 * k) for k in range(3)] + [(95, 92)]
    centres += [(95, 110)]  # touches (95, 92)
    centres = [(y, x) for y, x in centres if x <= 110]
    img = textured_blobs(centres, 10.0, mpp)
    truth = np.array(centres)[:, ::-1]

    def objects_per_nucleus(labels):
        _ids, xy = centroids(labels)
        d = detection_by_distance(truth, xy * mpp, radius=5.0)["all"]
        return labels.max() / len(centres), d

    fixed = segment_nuclear_stain(img, mpp=mpp, diameter_um=10.0)
    auto = segment_nuclear_stain(img, mpp=mpp)  # default: "auto"
    ratio_fixed, _ = objects_per_nucleus(fixed)
    _, det = objects_per_nucleus(auto)
    assert ratio_fixed > 1.3  # the 10 µm settings cut 20 µm nuclei into pieces
    assert det["tp"] == len(centres) and det["fp"] == 0  # one object per nucleus, touching split


def test_nucleus_diameter_estimate_is_scale_free():
    from immunocto.segment.if_nuclear import IF_PARAMS
    from immunocto.segment.nuclei import estimate_nucleus_diameter, foreground_image, otsu

    centres = [(12 + 24 * i, 12 + 24 * j) for i in range(5) for j in range(5)]
    estimates = {}
    for mpp in (0.25, 0.5, 1.0):
        img = textured_blobs(centres, 4.0, mpp)  # 8 µm nuclei
        fg = foreground_image(img, mpp=mpp, params=IF_PARAMS)
        estimates[mpp] = estimate_nucleus_diameter(
            [fg], mpp=mpp, threshold=otsu(fg), params=IF_PARAMS
        )
    assert all(7.0 <= d <= 11.0 for d in estimates.values()), estimates
    assert max(estimates.values()) - min(estimates.values()) < 1.0, estimates
    # too few nuclei: no estimate (the caller falls back to 10 µm)
    one = textured_blobs([(50, 50)], 4.0, 0.5)
    fg = foreground_image(one, mpp=0.5, params=IF_PARAMS)
    assert estimate_nucleus_diameter([fg], mpp=0.5, threshold=otsu(fg), params=IF_PARAMS) is None


def test_nucleus_diameter_setting_is_checked():
    from immunocto.config import SegmentParams
    from immunocto.segment.nuclei import NucleusParams, scale_params

    assert scale_params(NucleusParams(), 10.0) == NucleusParams()
    assert scale_params(NucleusParams(), 20.0).min_area_um2 == pytest.approx(28.0)
    with pytest.raises(ValueError, match="diameter_um"):
        scale_params(NucleusParams(), 100.0)
    with pytest.raises(ValueError, match="3-60"):
        SegmentParams(nucleus_diameter_um=0.5)
    with pytest.raises(ValueError, match="auto"):
        segment_nuclear_stain(np.zeros((64, 64)), mpp=0.5, diameter_um="large")
