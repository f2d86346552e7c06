from __future__ import annotations

import numpy as np
import pytest
import tifffile

from immunocto.io.ome_tiff import pyramid_shapes, write_ome_tiff
from immunocto.io.pyramid import downsample2, downsample_store
from immunocto.io.tilestore import TileStore


def ome(path):
    with tifffile.TiffFile(path) as tif:
        return tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]


def test_rgb_pyramid_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)
    levels = [img, downsample2(img)]
    path = write_ome_tiff(
        tmp_path / "he.ome.tif", levels, layout="rgb", mpp=0.325, tile=256, uuid="1234"
    )
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert series.axes == "YXS"
        assert [lv.shape for lv in series.levels] == [(700, 900, 3), (350, 450, 3)]
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
        np.testing.assert_array_equal(series.levels[0].asarray(), img)
        np.testing.assert_array_equal(series.levels[1].asarray(), levels[1])
    pixels = ome(path)
    assert pixels["PhysicalSizeX"] == pytest.approx(0.325) and pixels["PhysicalSizeXUnit"] == "µm"


def test_channels_are_named_and_encoded_stores_stream_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 60000, (3, 300, 520), dtype=np.uint16)
    store = TileStore(tmp_path / "s", img.shape, img.dtype, 256, layout="channels", encoded=True)
    for ty in range(2):
        for tx in range(3):
            store.write_planes(ty, tx, img[:, ty * 256 : (ty + 1) * 256, tx * 256 : (tx + 1) * 256])
    names = ["Hoechst", "CD45", "CD3e"]
    path = write_ome_tiff(
        tmp_path / "if.ome.tif", [store], layout="channels", mpp=0.5, channel_names=names, tile=256
    )
    with tifffile.TiffFile(path) as tif:
        np.testing.assert_array_equal(tif.series[0].asarray(), img)
    assert [c["Name"] for c in ome(path)["Channel"]] == names
    assert len(list(store.root.glob("*.bin"))) == 3 * 2 * 3  # kept by default
    # a scratch store consumed on the way in: same file, tile files gone
    again = write_ome_tiff(
        tmp_path / "if2.ome.tif", [store], layout="channels", mpp=0.5, channel_names=names,
        tile=256, consume_stores=True,
    )  # fmt: skip
    with tifffile.TiffFile(again) as tif:
        np.testing.assert_array_equal(tif.series[0].asarray(), img)
    assert list(store.root.glob("*.bin")) == []


def test_same_input_gives_identical_bytes(tmp_path):
    img = np.arange(300 * 300, dtype=np.uint32).reshape(300, 300)
    a = write_ome_tiff(tmp_path / "a.tif", [img], layout="labels", mpp=1.0, tile=128)
    b = write_ome_tiff(tmp_path / "b.tif", [img], layout="labels", mpp=1.0, tile=128)
    assert a.read_bytes() == b.read_bytes()
    np.testing.assert_array_equal(tifffile.imread(a), img)


def test_bad_arguments_are_explained(tmp_path):
    img = np.zeros((2, 64, 64), np.uint16)
    with pytest.raises(ValueError, match="channel_names must name each of the 2 channels"):
        write_ome_tiff(tmp_path / "x.tif", [img], layout="channels", mpp=1.0, channel_names=["a"])
    with pytest.raises(ValueError, match="multiple of 16"):
        write_ome_tiff(tmp_path / "x.tif", [img[0]], layout="labels", mpp=1.0, tile=100)
    assert not (tmp_path / "x.tif").exists()


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "keep.tif"
    path.write_bytes(b"old")

    class Level:
        shape = (128, 64)
        dtype = np.dtype(np.uint8)

        def __getitem__(self, key):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_ome_tiff(path, [Level()], layout="labels", mpp=1.0, tile=64)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.tif"]


def test_tile_store_regions_and_downsampling(tmp_path):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (333, 517, 3), dtype=np.uint8)
    store = TileStore(tmp_path / "t", img.shape, img.dtype, 64, layout="rgb")
    rows, cols = store.grid
    for ty in range(rows):
        for tx in range(cols):
            store.write(0, ty, tx, img[ty * 64 : (ty + 1) * 64, tx * 64 : (tx + 1) * 64])
    np.testing.assert_array_equal(store[10:300, 33:500], img[10:300, 33:500])
    half = downsample_store(store, tmp_path / "h", tile=128)
    np.testing.assert_array_equal(half[0:None, 0:None], downsample2(img))
    assert half.shape == (167, 259, 3)


def test_downsample2_rounds_the_mean():
    block = np.array([[0, 1], [1, 1]], np.uint8)
    assert downsample2(block)[0, 0] == 1  # 0.75 rounds to 1
    assert downsample2(np.full((3, 5), 7, np.uint16)).shape == (2, 3)


def test_pyramid_shapes():
    assert pyramid_shapes(2048, 2048) == [(2048, 2048), (1024, 1024), (512, 512)]
    assert pyramid_shapes(300, 200) == [(300, 200)]
    assert pyramid_shapes(1025, 600)[-1] == (513 // 2 + 1, 150)
