"""Fuzzing every input a user hands us (issue 24, part 1): mutated copies of valid files and
generated garbage go to the public readers; each must either read the file or raise one
:class:`~immunocto.errors.ImmunoctoError` naming it, never a traceback from inside a library.

``IMMUNOCTO_FUZZ_EXAMPLES`` sets the cases per family (default 40 here; ``benchmarks/fuzz.py``
runs hundreds). A case may take at most 5 s (no hangs). Bugs this found and fixed: a binary
config or gating file (UnicodeDecodeError), a scimap CSV row of one column (IndexError), damaged
OME-XML in a TIFF (ParseError), a model ``config.json`` with wrong value types (TypeError, or a
network of 10^9 channels), GateTree errors that did not name the file."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from immunocto.errors import ImmunoctoError

N = int(os.environ.get("IMMUNOCTO_FUZZ_EXAMPLES", "40"))
#: The same cases on every run (CI); ``IMMUNOCTO_FUZZ_RANDOM=1`` draws new ones.
FUZZ = settings(
    max_examples=N, deadline=5000, database=None,
    derandomize=os.environ.get("IMMUNOCTO_FUZZ_RANDOM", "") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 flip a byte, 1 delete a run, 2 insert a byte,
    3 truncate."""
    buf = bytearray(data)
    for kind, pos, val in ops:
        if not buf:
            break
        i = pos % len(buf)
        if kind == 0:
            buf[i] = val % 256
        elif kind == 1:
            del buf[i : i + 1 + val % 16]
        elif kind == 2:
            buf.insert(i, val % 256)
        else:
            del buf[i:]
    return bytes(buf)


OPS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)),
               min_size=1, max_size=6)  # fmt: skip
#: Either a mutated copy of the valid file or arbitrary bytes.
SOURCE = st.one_of(
    st.tuples(st.just("mutate"), OPS), st.tuples(st.just("bytes"), st.binary(max_size=400))
)


#: One folder for every case's files, removed when the module's tests end (hypothesis runs
#: each test many times outside pytest's function fixtures, so ``tmp_path`` cannot serve).
_SCRATCH: list[Path] = []


def scratch(prefix: str) -> str:
    """A new empty folder under this module's scratch folder."""
    if not _SCRATCH:
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix="immunocto-fuzz-")))
    return tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH[0])


@pytest.fixture(scope="module", autouse=True)
def _remove_scratch():
    yield
    import shutil

    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)
    small_tiff.cache_clear()
    small_svs.cache_clear()
    small_zarr.cache_clear()


def bad_file(valid: bytes, how, name: str) -> Path:
    kind, arg = how
    data = mutate(valid, arg) if kind == "mutate" else arg
    folder = Path(scratch("fuzz-"))
    path = folder / name
    path.write_bytes(data)
    return path


def reads_or_names_the_file(fn, path: Path, *, name_in_message: str | None = None) -> None:
    """``fn(path)`` returns, or raises an ImmunoctoError whose message names the file."""
    try:
        fn(path)
    except ImmunoctoError as err:
        assert (name_in_message or path.name) in str(err), str(err)
    # any other exception propagates: the test fails with the input hypothesis found


def open_and_read(path: Path, size: int) -> None:
    """Open a slide file and read its top-left ``size`` x ``size`` region."""
    from immunocto.io import open_slide

    with open_slide(path) as s:
        s.read_region(0, 0, min(s.width, size), min(s.height, size))


# ---- markers.csv --------------------------------------------------------------------------
MARKERS = b"channel_number,cycle_number,marker_name,compartment\n1,1,DAPI,nuclear\n2,1,Ki67,nuclear\n3,1,CD3e,membrane\n"


@FUZZ
@given(how=SOURCE)
def test_fuzz_markers_csv(how):
    from immunocto.io.base import read_marker_compartments, read_markers_csv

    path = bad_file(MARKERS, how, "markers.csv")
    reads_or_names_the_file(read_markers_csv, path)
    reads_or_names_the_file(read_marker_compartments, path)


# ---- the run config -------------------------------------------------------------------------
CONFIG = yaml.safe_dump({
    "slides": [{"id": "s1", "he": "he.ome.tif", "if": "if.ome.tif", "mpp": 0.5, "if_mpp": 0.5}],
    "registration": {"nuclear_channel": "DAPI"},
    "segmentation": {"backend": "auto", "nucleus_diameter_um": "auto"},
    "gating": {"tree": "builtin:crc"},
    "training": {"epochs": 3},
}).encode()  # fmt: skip


@FUZZ
@given(how=SOURCE)
def test_fuzz_run_config(how):
    from immunocto.config import load_config

    path = bad_file(CONFIG, how, "immunocto.yaml")
    reads_or_names_the_file(lambda p: load_config(p, check_files=False), path)


# ---- gating trees: YAML and scimap CSV -----------------------------------------------------
TREE = yaml.safe_dump({
    "name": "ki67",
    "nodes": [{"name": "pos", "parent": "root", "rule": {"Ki67": "+"}, "label": "ki67_pos"},
              {"name": "neg", "parent": "root", "rule": {"Ki67": "-"}, "label": "ki67_neg"}],
}).encode()  # fmt: skip
SCIMAP = b"population,parent,marker,direction\nimmune,all,CD45,pos\nt_cell,immune,CD3e,pos\n"


@FUZZ
@given(how=SOURCE, csv=st.booleans())
def test_fuzz_gating_trees(how, csv):
    from immunocto.phenotype import load_tree

    path = bad_file(SCIMAP if csv else TREE, how, "tree.csv" if csv else "tree.yaml")
    reads_or_names_the_file(lambda p: load_tree(str(p)), path)


# ---- model folders -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    pytest.importorskip("torch")
    from immunocto._modelfolder import write_model_folder
    from immunocto.segment.net import NucleusNet

    net = NucleusNet((4, 8), n_types=0, in_channels=1)
    out = tmp_path_factory.mktemp("model") / "m"
    config = {"kind": "if-nuclei", "input": "nuclear", "in_channels": 1, "mpp": 0.5,
              "widths": [4, 8], "types": []}  # fmt: skip
    write_model_folder(out, {k: v.numpy() for k, v in net.state_dict().items()}, config)
    return out


@FUZZ
@given(how=SOURCE, which=st.sampled_from(["config.json", "model.safetensors"]))
def test_fuzz_model_folders(model_folder, how, which):
    import shutil

    from immunocto.segment.learned import NucleusModel, _load_cached

    folder = Path(scratch("fuzz-model-")) / "m"
    shutil.copytree(model_folder, folder)
    bad = bad_file((model_folder / which).read_bytes(), how, which)
    shutil.copy(bad, folder / which)
    _load_cached.cache_clear()
    reads_or_names_the_file(NucleusModel.load, folder, name_in_message=str(folder))


def test_fuzz_model_config_values(model_folder, tmp_path):
    """Well-formed JSON with wrong values: every field of config.json set to odd values."""
    import shutil

    from immunocto.segment.learned import NucleusModel, _load_cached

    base = json.loads((model_folder / "config.json").read_text())
    odd = [None, -1, 0, 1e9, "x", [], {}, [0], [4, 8, 16], True]
    for key in base:
        for value in odd:
            folder = tmp_path / f"{key}-{odd.index(value)}"
            shutil.copytree(model_folder, folder)
            (folder / "config.json").write_text(json.dumps({**base, key: value}))
            _load_cached.cache_clear()
            reads_or_names_the_file(NucleusModel.load, folder, name_in_message=str(folder))


# ---- slide files ---------------------------------------------------------------------------
@functools.cache
def small_tiff(name: str) -> bytes:
    """A small valid H&E (RGB, tiled, OME) or IF (3 named channels, zlib) OME-TIFF, as bytes
    (not a fixture, so a failing case's report stays short)."""
    import tifffile

    path = Path(scratch("fuzz-tiff-")) / name
    if name == "he.ome.tif":
        rgb = (np.random.default_rng(0).random((64, 48, 3)) * 255).astype(np.uint8)
        tifffile.imwrite(path, rgb, photometric="rgb", tile=(16, 16), ome=True,
                         metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})  # fmt: skip
    else:
        fl = (np.random.default_rng(1).random((3, 32, 32)) * 4000).astype(np.uint16)
        tifffile.imwrite(path, fl, ome=True, compression="zlib",
                         metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD3e", "Ki67"]}})  # fmt: skip
    return path.read_bytes()


@FUZZ
@given(how=SOURCE, which=st.sampled_from(["he.ome.tif", "if.ome.tif"]))
def test_fuzz_slide_files(how, which):
    reads_or_names_the_file(
        functools.partial(open_and_read, size=16), bad_file(small_tiff(which), how, which)
    )


# ---- SVS (tiffslide) and OME-Zarr slides --------------------------------------------------
@functools.cache
def small_svs() -> bytes:
    """A tiled RGB TIFF with an Aperio description, as tiffslide reads SVS files."""
    import tifffile

    path = Path(scratch("fuzz-svs-")) / "he.svs"
    rgb = (np.random.default_rng(2).random((64, 48, 3)) * 255).astype(np.uint8)
    desc = "Aperio Image Library v12.0.15\r\n48x64 [0,0 48x64] (16x16) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2500"
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(16, 16), description=desc)
    return path.read_bytes()


@FUZZ
@given(how=SOURCE)
def test_fuzz_svs_files(how):
    reads_or_names_the_file(
        functools.partial(open_and_read, size=16), bad_file(small_svs(), how, "he.svs")
    )


@functools.cache
def small_zarr() -> Path:
    import zarr

    root = Path(scratch("fuzz-zarr-")) / "if.zarr"
    group = zarr.open_group(str(root), mode="w", zarr_format=2)
    data = (np.random.default_rng(3).random((2, 32, 32)) * 4000).astype(np.uint16)
    group.create_array("0", data=data, chunks=(1, 16, 16))
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
                 {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 0.5, 0.5]}]}],
    }]  # fmt: skip
    return root


@FUZZ
@given(how=SOURCE, which=st.sampled_from([".zattrs", "0/.zarray", "0/0.0.0"]))
def test_fuzz_ome_zarr(how, which):
    """A damaged OME-Zarr: its group metadata, its array metadata or one chunk."""
    import shutil

    src = small_zarr()
    root = Path(scratch("fuzz-zarr-")) / "if.zarr"
    shutil.copytree(src, root)
    target = root / which
    target.write_bytes(bad_file(target.read_bytes(), how, target.name).read_bytes())

    reads_or_names_the_file(
        functools.partial(open_and_read, size=32), root, name_in_message="if.zarr"
    )


# ---- label tables (`immunocto import labels`) and Immunocto-PNG releases -------------------
POINTS = b"x,y,label\n10,12,cd4_t\n30.5,40,macrophage\n5,60,other\n"


@FUZZ
@given(how=SOURCE)
def test_fuzz_label_tables(how):
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from immunocto.validate.sources import import_labels

    path = bad_file(POINTS, how, "points.csv")
    run = path.parent / "run"
    (run / "cells").mkdir(parents=True)
    cells = pa.table({"cell_id": [1, 2, 3], "x": [10.0, 30.0, 5.0], "y": [12.0, 40.0, 61.0]})
    pq.write_table(cells, run / "cells" / "s1.parquet")
    before = (run / "cells" / "s1.parquet").read_bytes()
    cfg = SimpleNamespace(slides=[SimpleNamespace(id="s1", mpp=0.5)], run_dir=run)
    try:
        import_labels(cfg, path, "fuzz")
    except ImmunoctoError as err:
        assert path.name in str(err), str(err)
        assert (run / "cells" / "s1.parquet").read_bytes() == before  # nothing half-written


@functools.cache
def small_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(4).random((64, 64, 3)) * 255).astype(np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


@FUZZ
@given(how=SOURCE, which=st.sampled_from(["HE", "mask"]))
def test_fuzz_immunocto_png_release(how, which):
    """A release folder whose one H&E crop or mask PNG is damaged."""
    from PIL import Image

    from immunocto.db.immunocto_png import import_png

    src = Path(scratch("fuzz-png-")) / "release"
    for sub in ("HE", "mask"):
        (src / "p1" / sub).mkdir(parents=True)
    for name in ("cd4_10_12.png", "other_30_40.png"):
        (src / "p1" / "HE" / name).write_bytes(small_png())
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(src / "p1" / "mask" / name)
    bad = src / "p1" / which / "other_30_40.png"
    bad.write_bytes(bad_file(bad.read_bytes(), how, bad.name).read_bytes())
    run = src.parent / "run"
    try:
        import_png(src, run)
    except ImmunoctoError as err:
        assert "other_30_40.png" in str(err), str(err)
        assert not (run / "crops.parquet").exists()  # no half-listed database
