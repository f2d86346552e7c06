from __future__ import annotations

import numpy as np

from immunocto.simulate.noise import fbm, hash_uniform, lattice_noise, lattice_noise_grid


def test_hash_is_deterministic_uniform_and_seed_dependent():
    ix, iy = np.meshgrid(np.arange(300), np.arange(300))
    a = hash_uniform(ix, iy, 1)
    assert np.array_equal(a, hash_uniform(ix, iy, 1))
    assert -1 <= a.min() and a.max() < 1
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1 / np.sqrt(3)) < 0.01
    assert np.corrcoef(a.ravel(), hash_uniform(ix, iy, 2).ravel())[0, 1] < 0.02


def test_noise_is_a_function_of_position_not_of_the_tile():
    x, y = np.meshgrid(np.arange(0, 400.0), np.arange(0, 300.0))
    whole = lattice_noise(x, y, scale=6.0, seed=5)
    part = lattice_noise(x[100:150, 250:330], y[100:150, 250:330], scale=6.0, seed=5)
    np.testing.assert_allclose(part, whole[100:150, 250:330], atol=1e-5)


def test_scattered_points_use_the_same_field_as_a_grid():
    xs = np.arange(50.0, 250.0)
    ys = np.arange(-40.0, 90.0)
    grid = lattice_noise_grid(xs, ys, scale=3.3, seed=9)
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(ys), 200), rng.integers(0, len(xs), 200)
    # far-apart points trigger the per-point path, which must agree with the grid
    far_x = np.concatenate([xs[j], [1e6]])
    far_y = np.concatenate([ys[i], [1e6]])
    scattered = lattice_noise(far_x, far_y, scale=3.3, seed=9)[:-1]
    np.testing.assert_allclose(scattered, grid[i, j], atol=1e-5)


def test_unit_variance_and_smoothness():
    x, y = np.meshgrid(np.arange(0, 2000.0, 1.0), np.arange(0, 500.0, 1.0))
    n = lattice_noise(x, y, scale=20.0, seed=3)
    assert 0.85 < n.std() < 1.15
    # neighbours 1 px apart at scale 20 are strongly correlated
    assert np.corrcoef(n[:, :-1].ravel(), n[:, 1:].ravel())[0, 1] > 0.95
    f = fbm(x[:100, :100], y[:100, :100], scale=30.0, seed=1)
    assert f.shape == (100, 100) and np.isfinite(f).all()
