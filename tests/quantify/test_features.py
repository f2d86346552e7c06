from __future__ import annotations

import numpy as np
import pytest

from immunocto.quantify import STATS, cell_intensity_stats


def two_cells():
    labels = np.zeros((40, 60), np.int32)
    labels[10:20, 10:20] = 1  # 100 px
    labels[10:20, 40:50] = 2
    rng = np.random.default_rng(0)
    channels = rng.integers(100, 200, (2, 40, 60)).astype(np.uint16)
    return labels, channels


def test_mean_median_p90_match_numpy():
    labels, channels = two_cells()
    out = cell_intensity_stats(
        labels, channels, np.array([2, 1]), ring_px=2, cell_px=4, bg_inner_px=6, bg_outer_px=9
    )
    assert set(out) == set(STATS)
    for row, cid in enumerate([2, 1]):
        for c in range(2):
            v = channels[c][labels == cid]
            assert out["mean"][row, c] == pytest.approx(v.mean())
            s = np.sort(v)
            assert out["median"][row, c] == s[(len(s) - 1) // 2]
            assert out["p90"][row, c] == s[int(np.floor(0.9 * (len(s) - 1)))]


def test_absent_cells_are_nan():
    labels, channels = two_cells()
    out = cell_intensity_stats(labels, channels, np.array([1, 7]))
    assert np.isfinite(out["mean"][0]).all() and np.isnan(out["mean"][1]).all()


def test_ring_cell_and_background_regions():
    labels = np.zeros((60, 60), np.int32)
    labels[25:35, 25:35] = 1
    ch = np.zeros((1, 60, 60), np.uint16)
    ch[0] = 100
    grown = np.zeros((60, 60), bool)
    grown[22:38, 22:38] = True
    ch[0][grown & (labels == 0)] = 1000  # a bright membrane ring just outside the nucleus
    out = cell_intensity_stats(
        labels, ch, np.array([1]), ring_px=3, cell_px=3, bg_inner_px=8, bg_outer_px=14
    )
    assert out["mean"][0, 0] == 100
    assert out["ring"][0, 0] > 900  # the ring sits on the membrane
    assert 100 < out["cell"][0, 0] < out["ring"][0, 0]  # nucleus + ring
    assert out["bg"][0, 0] == 100  # the annulus is beyond the membrane


def test_ring_median_ignores_one_sided_spill():
    labels = np.zeros((50, 70), np.int32)
    labels[20:30, 20:30] = 1
    ch = np.full((1, 50, 70), 100, np.uint16)
    ch[0, :, 30:] = 3000  # a bright neighbour's cytoplasm touches the right side only
    out = cell_intensity_stats(
        labels, ch, np.array([1]), ring_px=4, cell_px=4, bg_inner_px=6, bg_outer_px=10
    )
    assert out["ring"][0, 0] > 500  # the mean is pulled up by the neighbour
    assert out["ringmed"][0, 0] == 100  # the median is not


def test_nuclear_confirmed_pixels_only():
    labels, channels = two_cells()
    ok = np.zeros(labels.shape, bool)
    ok[10:15, 10:20] = True  # half of cell 1, none of cell 2
    out = cell_intensity_stats(labels, channels, np.array([1, 2]), nuclear_ok=ok)
    assert out["nucmean"][0, 0] == pytest.approx(channels[0][10:15, 10:20].mean())
    assert np.isnan(out["nucmean"][1, 0])


def test_inputs_are_checked():
    labels, channels = two_cells()
    with pytest.raises(ValueError, match=r"`labels` \(shape \(40, 60\)\) must match `channels`"):
        cell_intensity_stats(labels, channels[:, :30], np.array([1]))
    with pytest.raises(ValueError, match="must be uint16"):
        cell_intensity_stats(labels, channels.astype(np.float32), np.array([1]))
