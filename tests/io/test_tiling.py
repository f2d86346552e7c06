from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from immunocto.io import make_tiles, open_slide, tile_of, tiles_on_tissue, tissue_mask


def test_cores_partition_the_slide_and_each_centroid_has_one_tile():
    tiles = make_tiles(1000, 700, tile=256, halo=32)
    assert len(tiles) == 4 * 3
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1000, 5000), rng.uniform(0, 700, 5000)
    owners = np.stack([t.responsible(x, y) for t in tiles])
    assert np.all(owners.sum(axis=0) == 1)
    np.testing.assert_array_equal(np.argmax(owners, axis=0), tile_of(tiles, x, y))
    assert tile_of(tiles, np.array([-1.0, 1000.0]), np.array([5.0, 5.0])).tolist() == [-1, -1]


def test_objects_smaller_than_the_halo_are_whole_in_their_window():
    halo = 40
    tiles = make_tiles(900, 900, tile=300, halo=halo)
    rng = np.random.default_rng(1)
    cx, cy = rng.uniform(0, 900, 2000), rng.uniform(0, 900, 2000)
    radius = rng.uniform(1, halo, 2000)
    for t in tiles:
        mine = t.responsible(cx, cy)
        x0, y0, x1, y1 = t.window
        # the object's extent, clipped to the slide, lies inside the window
        assert np.all(np.maximum(cx[mine] - radius[mine], 0) >= x0)
        assert np.all(np.minimum(cx[mine] + radius[mine], 900) <= x1)
        assert np.all(np.maximum(cy[mine] - radius[mine], 0) >= y0)
        assert np.all(np.minimum(cy[mine] + radius[mine], 900) <= y1)


def test_window_is_clipped_at_the_slide_edge():
    t = make_tiles(500, 500, tile=256, halo=64)[0]
    assert t.window == (0, 0, 256 + 64, 256 + 64)
    last = make_tiles(500, 500, tile=256, halo=64)[-1]
    assert last.window == (256 - 64, 256 - 64, 500, 500)


def test_bad_tiling_arguments():
    with pytest.raises(ValueError, match="tile must be > 0"):
        make_tiles(10, 10, tile=0)


def test_tissue_detection_finds_the_cells_and_skips_glass(sim_run):
    with open_slide(sim_run / "slides/sim000/he.ome.tif") as he:
        mask, ds = tissue_mask(he)
        tiles = make_tiles(he.width, he.height, tile=128)
    cells = pq.read_table(sim_run / "truth/sim000/cells.parquet", columns=["x", "y"]).to_pandas()
    r = np.clip((cells["y"] / ds).astype(int), 0, mask.shape[0] - 1)
    c = np.clip((cells["x"] / ds).astype(int), 0, mask.shape[1] - 1)
    assert mask[r, c].mean() > 0.97  # cells lie on detected tissue
    assert 0.3 < mask.mean() < 1.0  # and some glass is skipped
    kept = tiles_on_tissue(tiles, mask, ds)
    assert 0 < len(kept) <= len(tiles)
