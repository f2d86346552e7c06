"""Readers on tiny pyramidal files written inside the tests."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from immunocto.errors import InputFileError
from immunocto.io import check_pair, open_slide, read_markers_csv
from immunocto.io.ome_tiff import write_ome_tiff
from immunocto.io.pyramid import downsample2

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 255, (300, 420, 3), dtype=np.uint8)
IF = RNG.integers(0, 60000, (4, 300, 420), dtype=np.uint16)
NAMES = ["Hoechst", "CD45", "CD3e", "CD20"]


@pytest.fixture
def he_path(tmp_path):
    return write_ome_tiff(
        tmp_path / "he.ome.tif", [RGB, downsample2(RGB)], layout="rgb", mpp=0.5, tile=128
    )


@pytest.fixture
def if_path(tmp_path):
    return write_ome_tiff(
        tmp_path / "if.ome.tif",
        [IF, downsample2(IF, 1, 2)],
        layout="channels",
        mpp=0.5,
        channel_names=NAMES,
        tile=128,
    )


def test_ome_rgb(he_path):
    with open_slide(he_path) as s:
        assert s.kind == "brightfield" and s.shape == (300, 420, 3) and s.mpp == pytest.approx(0.5)
        assert [lv.shape for lv in s.levels] == [(300, 420), (150, 210)]
        assert s.levels[1].downsample == 2.0
        np.testing.assert_array_equal(s.read_region(37, 55, 100, 80), RGB[55:135, 37:137])
        # level 1: location in level-0 px, size in level-1 px
        np.testing.assert_array_equal(
            s.read_region(40, 60, 50, 30, level=1), downsample2(RGB)[30:60, 20:70]
        )


def test_out_of_bounds_is_zero_padded(he_path):
    with open_slide(he_path) as s:
        block = s.read_region(-10, 290, 30, 20)
    assert block.shape == (20, 30, 3)
    np.testing.assert_array_equal(block[:10, 10:], RGB[290:300, 0:20])
    assert not block[10:].any() and not block[:, :10].any()


def test_ome_channels_by_name(if_path):
    with open_slide(if_path) as s:
        assert s.kind == "fluorescence" and s.channel_names == tuple(NAMES)
        assert s.shape == (4, 300, 420) and s.dtype == np.uint16
        block = s.read_region(100, 20, 64, 48, channels=["CD20", "Hoechst"])
        np.testing.assert_array_equal(block, IF[[3, 0], 20:68, 100:164])
        with pytest.raises(InputFileError, match=r"no channel 'CD8a' \(channels: Hoechst, CD45"):
            s.read_region(0, 0, 4, 4, channels=["CD8a"])


def test_markers_csv_names_the_channels(tmp_path):
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, IF, photometric="minisblack", tile=(128, 128))
    markers = tmp_path / "markers.csv"
    markers.write_text("channel_number,marker_name\n1,DAPI\n2,CD45\n3,CD3e\n4,CD20\n")
    with open_slide(plain, markers=markers, mpp=0.65) as s:
        assert s.channel_names == ("DAPI", "CD45", "CD3e", "CD20") and s.mpp == 0.65
        np.testing.assert_array_equal(s.read_region(0, 0, 420, 300, channels=[1]), IF[[1]])


def test_plain_pyramidal_tiff_with_resolution_tags(tmp_path):
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path) as tif:
        opts = {"photometric": "rgb", "tile": (128, 128), "resolutionunit": "CENTIMETER"}
        tif.write(RGB, subifds=1, resolution=(1e4 / 0.25, 1e4 / 0.25), **opts)
        tif.write(downsample2(RGB), subfiletype=1, resolution=(1e4 / 0.5, 1e4 / 0.5), **opts)
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.25) and len(s.levels) == 2
        np.testing.assert_array_equal(s.read_region(0, 0, 210, 150, level=1), downsample2(RGB))


def test_svs_through_tiffslide(tmp_path):
    path = tmp_path / "tiny.svs"
    desc = "Aperio Image Library v12.0.15\n420x300 (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.499"
    tifffile.imwrite(path, RGB, photometric="rgb", tile=(128, 128), description=desc)
    with open_slide(path) as s:
        assert type(s).__name__ == "SvsSlide"
        assert s.mpp == pytest.approx(0.499) and s.shape == (300, 420, 3)
        np.testing.assert_array_equal(s.read_region(10, 20, 64, 32), RGB[20:52, 10:74])
    # a pixel size that is not a number is unknown (the run's mpp must give it), not an error
    tifffile.imwrite(path, RGB, photometric="rgb", tile=(128, 128),
                     description=desc.replace("0.499", "0.4x9"))  # fmt: skip
    with open_slide(path) as s:
        assert s.file_mpp is None and s.mpp is None
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5


def test_ome_zarr(tmp_path):
    root = tmp_path / "if.zarr"
    group = zarr.open_group(str(root), mode="w")
    group.create_array("0", data=IF, chunks=(1, 128, 128))
    group.create_array("1", data=downsample2(IF, 1, 2), chunks=(1, 128, 128))
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": [
                {
                    "path": "0",
                    "coordinateTransformations": [{"type": "scale", "scale": [1, 0.325, 0.325]}],
                },
                {
                    "path": "1",
                    "coordinateTransformations": [{"type": "scale", "scale": [1, 0.65, 0.65]}],
                },
            ],
        }
    ]
    group.attrs["omero"] = {"channels": [{"label": n} for n in NAMES]}
    with open_slide(root) as s:
        assert (
            s.kind == "fluorescence"
            and s.channel_names == tuple(NAMES)
            and s.mpp == pytest.approx(0.325)
        )
        np.testing.assert_array_equal(
            s.read_region(8, 8, 40, 30, channels=["CD45"]), IF[[1], 8:38, 8:48]
        )
        np.testing.assert_array_equal(s.read_region(0, 0, 210, 150, level=1), downsample2(IF, 1, 2))


# ---------------------------------------------------------------------------- bad input


def test_truncated_tiff(if_path, tmp_path):
    data = if_path.read_bytes()
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        InputFileError, match=r"cut\.ome\.tif: .*(truncated|corrupt).*export it again"
    ):
        open_slide(cut)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + bytes(RNG.integers(0, 255, 500, dtype=np.uint8)))
    with pytest.raises(InputFileError, match=r"bad\.tif: not a readable TIFF"):
        open_slide(bad)
    with pytest.raises(InputFileError, match=r"file not found"):
        open_slide(tmp_path / "missing.tif")


def test_rgba_he(tmp_path):
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(
        path, np.zeros((64, 64, 4), np.uint8), photometric="rgb", extrasamples=["unassalpha"]
    )
    with pytest.raises(InputFileError, match=r"RGBA image .* save the H&E as RGB without alpha"):
        open_slide(path)


def test_z_stack_is_refused(tmp_path):
    path = tmp_path / "z.ome.tif"
    tifffile.imwrite(path, np.zeros((3, 2, 32, 32), np.uint16), metadata={"axes": "ZCYX"})
    with pytest.raises(InputFileError, match=r"more than one plane along Z"):
        open_slide(path)


def test_channel_count_differs_from_markers(if_path, tmp_path):
    markers = tmp_path / "m.csv"
    markers.write_text("marker_name\nHoechst\nCD45\nCD3e\n")
    with pytest.raises(InputFileError, match=r"4 channels but markers.csv names 3"):
        open_slide(if_path, markers=markers)


def test_duplicate_marker_names(tmp_path):
    markers = tmp_path / "m.csv"
    markers.write_text("marker_name\nHoechst\nCD45\nCD45\nCD3e\n")
    with pytest.raises(InputFileError, match=r"duplicate marker names 'CD45'"):
        read_markers_csv(markers)
    (tmp_path / "n.csv").write_text("name\nHoechst\n")
    with pytest.raises(InputFileError, match=r"no 'marker_name' column"):
        read_markers_csv(tmp_path / "n.csv")


def test_pair_checks(tmp_path, he_path, if_path):
    with open_slide(he_path) as he, open_slide(if_path) as if_:
        check_pair(he, if_)  # fine
        with pytest.raises(InputFileError, match=r"expected an RGB H&E .* swap"):
            check_pair(if_, he)
    # 8-bit IF
    p8 = write_ome_tiff(
        tmp_path / "if8.ome.tif",
        [IF.astype(np.uint8)],
        layout="channels",
        mpp=0.5,
        channel_names=NAMES,
        tile=128,
    )
    with open_slide(he_path) as he, open_slide(p8) as if8:
        with pytest.raises(InputFileError, match=r"8-bit IF.*export the raw 16-bit"):
            check_pair(he, if8)
    # physical extents disagree
    big = write_ome_tiff(
        tmp_path / "ifbig.ome.tif", [IF], layout="channels", mpp=1.0, channel_names=NAMES, tile=128
    )
    with open_slide(he_path) as he, open_slide(big) as ifbig:
        with pytest.raises(
            InputFileError,
            match=r"physical extent 420 x 300 µm disagrees with the H&E .* \(210 x 150 µm\)",
        ):
            check_pair(he, ifbig)
    # missing mpp
    nompp = tmp_path / "nompp.tif"
    tifffile.imwrite(nompp, RGB, photometric="rgb")
    with open_slide(nompp) as he:
        assert he.mpp is None
        with pytest.raises(
            InputFileError, match=r"no pixel size .* add `mpp:` .* to slides\[0\] in immunocto.yaml"
        ):
            check_pair(he, None)
