from __future__ import annotations

import json

import numpy as np
import pytest

from immunocto.simulate.transform import TruthTransform, make_transform


def test_strength_zero_is_the_identity():
    t = make_transform(2048, 0.0, np.random.default_rng(0))
    x = np.array([0.0, 100.5, 2047.0])
    y = np.array([5.0, 900.0, 17.25])
    u, v = t.he_to_if(x, y)
    np.testing.assert_allclose(u, x, atol=1e-9)
    np.testing.assert_allclose(v, y, atol=1e-9)


@pytest.mark.parametrize("strength", [1.0, 2.5])
def test_inverse_undoes_forward_away_from_fov_seams(strength):
    t = make_transform(4096, strength, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 4096, 5000)
    y = rng.uniform(0, 4096, 5000)
    u, v = t.he_to_if(x, y)
    # a point within one shift of a FOV seam may be seen from the other FOV
    seam = np.minimum(u % t.fov_size, t.fov_size - u % t.fov_size)
    seam = np.minimum(seam, np.minimum(v % t.fov_size, t.fov_size - v % t.fov_size))
    clear = seam > np.abs(t.fov_shift).max() + 1
    xb, yb = t.if_to_he(u[clear], v[clear])
    assert np.abs(xb - x[clear]).max() < 1e-6
    assert np.abs(yb - y[clear]).max() < 1e-6


def test_grid_inverse_matches_pointwise_inverse():
    t = make_transform(4096, 2.5, np.random.default_rng(4))
    gx, gy = t.if_to_he_grid(900, 1000, 300, 200)  # crosses the FOV seam at 1024
    uu, vv = np.meshgrid(np.arange(900, 1200.0), np.arange(1000, 1200.0))
    px, py = t.if_to_he(uu, vv)
    assert np.abs(gx - px).max() < 0.02 and np.abs(gy - py).max() < 0.02


def test_json_round_trip_reproduces_the_mapping():
    t = make_transform(3000, 1.0, np.random.default_rng(5))
    again = TruthTransform.from_dict(json.loads(json.dumps(t.to_dict())))
    x = np.linspace(0, 3000, 50)
    np.testing.assert_allclose(
        np.stack(again.he_to_if(x, x[::-1])), np.stack(t.he_to_if(x, x[::-1])), atol=1e-6
    )


def test_misregistration_is_the_size_we_say():
    t = make_transform(4096, 1.0, np.random.default_rng(6))
    x, y = np.meshgrid(np.arange(0, 4096, 64.0), np.arange(0, 4096, 64.0))
    dx, dy = t.local_displacement(x, y)
    local = np.hypot(dx, dy)
    assert 0.3 < np.median(local) < 6.0  # a few pixels of non-affine error
    u, v = t.he_to_if(x, y)
    assert np.median(np.hypot(u - x, v - y)) > 1.0  # plus a global offset/rotation


def test_affine_is_the_least_squares_affine_of_the_whole_mapping():
    t = make_transform(4096, 2.5, np.random.default_rng(8))
    g = np.linspace(0, 4096, 96)
    x, y = (a.ravel() for a in np.meshgrid(g, g))
    u, v = t.he_to_if(x, y)
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.stack([u, v], axis=1), rcond=None)
    np.testing.assert_allclose(coef.T, t.affine[:2], atol=1e-6)
    dx, dy = t.local_displacement(x, y)
    assert np.hypot(dx, dy).max() > 1.0  # the local part is still there
