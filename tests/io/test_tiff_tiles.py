"""The direct tile reader of tiled TIFFs gives exactly what tifffile's zarr store gives."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from immunocto.io import open_slide


def _both(monkeypatch, slide, *args, **kw):
    monkeypatch.setenv("IMMUNOCTO_TIFF_READER", "zarr")
    ref = slide.read_region(*args, **kw)
    monkeypatch.setenv("IMMUNOCTO_TIFF_READER", "tiles")
    return ref, slide.read_region(*args, **kw)


@pytest.mark.parametrize("name", ["if.ome.tif", "he.ome.tif"])
def test_random_regions_levels_and_channels_match_the_zarr_path(sim_run, monkeypatch, name):
    rng = np.random.default_rng(7)
    with open_slide(sim_run / "slides/sim000" / name) as s:
        assert s._level_pages(0) is not None  # the tile reader is really used
        for _ in range(40):
            level = int(rng.integers(0, len(s.levels)))
            x, y = (int(v) for v in rng.integers(-200, 900, 2))
            w, h = (int(v) for v in rng.integers(1, 700, 2))
            channels = None
            if s.kind == "fluorescence" and rng.random() < 0.7:
                k = int(rng.integers(1, 5))
                channels = list(rng.choice(s.channel_names, size=k, replace=False))
            ref, got = _both(monkeypatch, s, x, y, w, h, level=level, channels=channels)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("compression", ["lzw", "zstd", "jpeg", None])
def test_other_codecs_and_odd_sizes(tmp_path, monkeypatch, compression):
    rng = np.random.default_rng(1)
    if compression == "jpeg":
        img = rng.integers(0, 255, (300, 333, 3), dtype=np.uint8)
        kw = {"photometric": "rgb"}
    else:
        img = rng.integers(0, 4000, (3, 300, 333), dtype=np.uint16)
        kw = {"photometric": "minisblack", "metadata": {"axes": "CYX"}}
    path = tmp_path / "t.ome.tif"
    tifffile.imwrite(path, img, tile=(64, 64), compression=compression, **kw)
    with open_slide(path, mpp=0.5) as s:
        assert s._level_pages(0) is not None
        ref, got = _both(monkeypatch, s, 10, 250, 320, 60)
        np.testing.assert_array_equal(got, ref)
        ref, got = _both(monkeypatch, s, 0, 0, 333, 300)
        np.testing.assert_array_equal(got, ref)


def test_striped_files_keep_the_zarr_path(tmp_path):
    path = tmp_path / "strips.tif"
    img = np.arange(2 * 50 * 70, dtype=np.uint16).reshape(2, 50, 70)
    tifffile.imwrite(path, img, photometric="minisblack", metadata={"axes": "CYX"})
    with open_slide(path, mpp=0.5) as s:
        assert s._level_pages(0) is None
        np.testing.assert_array_equal(s.read_region(5, 5, 20, 10), img[:, 5:15, 5:25])


def test_a_damaged_tile_names_the_file(tmp_path):
    path = tmp_path / "bad.ome.tif"
    img = np.random.default_rng(0).integers(0, 4000, (2, 256, 256), dtype=np.uint16)
    tifffile.imwrite(path, img, tile=(128, 128), compression="zlib", photometric="minisblack",
                     metadata={"axes": "CYX"})  # fmt: skip
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        off, n = page.dataoffsets[3], page.databytecounts[3]
    raw = bytearray(path.read_bytes())
    raw[off : off + n] = b"\x00" * n  # the last tile of channel 0 is garbage now
    path.write_bytes(bytes(raw))
    with open_slide(path, mpp=0.5) as s:
        with pytest.raises(Exception, match="bad.ome.tif"):
            s.read_region(128, 128, 100, 100)
