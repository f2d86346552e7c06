from __future__ import annotations

import numpy as np

from immunocto.simulate.cells import placeholder_objects
from immunocto.simulate.raster import rasterize


def make_objects(xs, ys, a, b, theta=0.0, cyto=1.4):
    n = len(xs)
    base = placeholder_objects()
    obj = base.take(np.zeros(n, int))
    obj.x = np.asarray(xs, np.float32)
    obj.y = np.asarray(ys, np.float32)
    obj.a = np.full(n, a, np.float32)
    obj.b = np.full(n, b, np.float32)
    obj.theta = np.full(n, theta, np.float32)
    obj.cyto_a = obj.a * cyto
    obj.cyto_b = obj.b * cyto
    return obj


def grid(h, w):
    return np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))


def test_single_ellipse_area_and_orientation():
    X, Y = grid(80, 80)
    obj = make_objects([40.3], [39.7], a=15.0, b=7.0, theta=np.pi / 2)
    r = rasterize(obj, obj.x, obj.y, X, Y)
    nucleus = r.nuc_obj == 0
    assert abs(nucleus.sum() / (np.pi * 15 * 7) - 1) < 0.03
    ys, xs = np.nonzero(nucleus)
    assert np.ptp(ys) > 2 * np.ptp(xs)  # theta = 90 deg: long axis along y
    cell = r.cell_obj == 0
    assert np.all(cell[nucleus]) and cell.sum() > nucleus.sum()


def test_touching_nuclei_split_and_every_pixel_has_one_owner():
    X, Y = grid(60, 100)
    obj = make_objects([35.0, 55.0], [30.0, 30.0], a=12.0, b=12.0)
    r = rasterize(obj, obj.x, obj.y, X, Y)
    a, b = (r.nuc_obj == 0).sum(), (r.nuc_obj == 1).sum()
    assert abs(a - b) <= 13  # symmetric split; the tied column x = 45 (13 px) goes to one
    # the boundary is the perpendicular bisector at x = 45
    assert np.all(np.nonzero(r.nuc_obj == 0)[1] <= 45) and np.all(
        np.nonzero(r.nuc_obj == 1)[1] >= 45
    )
    assert np.all(r.cell_obj[r.nuc_obj >= 0] == r.nuc_obj[r.nuc_obj >= 0])


def test_warped_grid_moves_the_cell():
    X, Y = grid(60, 60)
    obj = make_objects([30.0], [30.0], a=8.0, b=8.0)
    # the tile shows H&E positions shifted by (+5, -3): the cell appears at (25, 33)
    r = rasterize(obj, obj.x - 5, obj.y + 3, X + 5, Y - 3)
    ys, xs = np.nonzero(r.nuc_obj == 0)
    assert abs(xs.mean() - 25) < 0.5 and abs(ys.mean() - 33) < 0.5


def test_no_objects_gives_an_empty_raster():
    X, Y = grid(20, 30)
    r = rasterize(placeholder_objects().take(np.zeros(0, int)), np.zeros(0), np.zeros(0), X, Y)
    assert (r.nuc_obj == -1).all() and (r.cell_obj == -1).all() and r.ring.sum() == 0
