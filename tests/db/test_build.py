"""build-db: crops, masks, IF, index, incremental updates, crash safety, splits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from immunocto.config import RunConfig, load_config
from immunocto.conventions import CLASSES, CLASSIFIER_IF_MARKERS
from immunocto.db import CHUNK, CropStore, build_db, read_index, store_path
from immunocto.db.extract import crop_grid, gather
from immunocto.db.split import assign_splits, split_patients
from immunocto.errors import ImmunoctoError
from immunocto.io import open_slide
from immunocto.register.apply import read_if_in_he_frame
from immunocto.register.model import RegistrationModel


def _index(run):
    return read_index(run)[0].to_pandas()


def test_index_matches_the_gated_cell_tables(db_run):
    index, manifest = read_index(db_run)
    df = index.to_pandas()
    assert set(df["label"]) <= set(CLASSES) and len(df) > 500
    assert manifest["labels"] == "gate" and manifest["split_seed"] == 0
    assert manifest["if_markers"] == list(CLASSIFIER_IF_MARKERS)
    for sid, part in df.groupby("slide_id"):
        cells = pq.read_table(db_run / "cells" / f"{sid}.parquet").to_pandas().set_index("cell_id")
        wanted = cells[cells["gate_label"].isin(CLASSES)]
        assert sorted(part["cell_id"]) == sorted(wanted.index)
        assert (
            part.set_index("cell_id")["label"] == wanted.loc[part["cell_id"], "gate_label"]
        ).all()
        # confidence is the gate stability under threshold perturbation
        np.testing.assert_allclose(
            part.set_index("cell_id")["confidence"],
            wanted.loc[part["cell_id"], "gate_stability"],
            rtol=1e-6,
        )
        assert part["split"].nunique() == 1  # a slide never straddles two splits
    assert df["row"].is_unique
    assert set(df["version"]) == {"gate"} and set(df["label_source"]) == {"gate_label"}


def test_crops_are_slide_windows_centred_on_the_cell(db_run):
    cfg = load_config(db_run)
    df = _index(db_run)
    store = CropStore.open_readonly(store_path(db_run))
    assert store.he.shape[1:] == (64, 64, 3) and store.he.dtype == np.uint8
    assert store.mask.shape[1:] == (64, 64)
    assert store.if_.shape[1:] == (len(CLASSIFIER_IF_MARKERS), 64, 64)
    assert store.if_.dtype == np.uint16
    slide = cfg.slides[0]
    reg = RegistrationModel.load(db_run / "registration" / f"{slide.id}.json")
    inner = df[(df["slide_id"] == slide.id) & ~df["border"]].sample(5, random_state=0)
    with (
        open_slide(cfg.resolve(slide.he), mpp=slide.mpp) as he,
        open_slide(cfg.resolve(slide.if_), markers=cfg.resolve(slide.markers)) as ifs,
    ):
        for r in inner.itertuples():
            cx, cy = int(np.rint(r.x)), int(np.rint(r.y))
            np.testing.assert_array_equal(store.he[r.row], he.read_region(cx - 32, cy - 32, 64, 64))
            direct = read_if_in_he_frame(
                ifs, reg, cx - 32, cy - 32, 64, 64, channels=list(CLASSIFIER_IF_MARKERS)
            )
            np.testing.assert_allclose(store.if_[r.row].astype(float), direct, atol=1.0)
    # the cell's own mask sits at the centre
    rows = df["row"].to_numpy()
    masks = store.mask.get_orthogonal_selection((np.sort(rows),))
    assert set(np.unique(masks)) <= {0, 1}
    assert masks[:, 32, 32].mean() > 0.95
    assert 20 < masks.sum(axis=(1, 2)).mean() < 600


def test_border_cells_are_padded_and_flagged(db_run):
    df = _index(db_run)
    border = df[df["border"]]
    assert len(border) > 0
    near = (np.minimum(border["x"], border["y"]) < 33) | (
        np.maximum(border["x"], border["y"]) > 1024 - 33
    )
    assert near.all()
    store = CropStore.open_readonly(store_path(db_run))
    r = border.iloc[0]
    crop = store.he[int(r["row"])]
    if r["x"] < 32:
        assert (crop[:, : int(32 - np.rint(r["x"]))] == 0).all()
    inner = df[~df["border"]]
    assert (
        (np.minimum(inner["x"], inner["y"]) >= 31)
        & (np.maximum(inner["x"], inner["y"]) <= 1024 - 31)
    ).all()


def test_resampled_crops_keep_the_centre_and_record_the_scale():
    yy, xx = np.mgrid[0:400, 0:400].astype(np.float32)
    image = np.stack([xx, yy, xx + yy], axis=-1)
    gx, gy = crop_grid(np.array([200.0]), np.array([150.0]), scale=2.0)
    crops = gather(image, gx, gy, 0, 0, order=1)
    assert crops.shape == (1, 64, 64, 3)
    assert crops[0, 32, 32, 0] == pytest.approx(200.0) and crops[0, 32, 32, 1] == pytest.approx(
        150.0
    )
    # two slide pixels per crop pixel along both axes
    assert crops[0, 32, 33, 0] - crops[0, 32, 32, 0] == pytest.approx(2.0)
    assert crops[0, 33, 32, 1] - crops[0, 32, 32, 1] == pytest.approx(2.0)


def test_rebuilding_skips_unchanged_slides_and_recuts_changed_ones(db_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(db_run, run)
    cfg = load_config(run)
    before = _index(run)
    chunk_files = {
        p: p.stat().st_mtime_ns for p in (store_path(run) / "he").rglob("*") if p.is_file()
    }
    results = build_db(cfg, workers=1)
    assert [r.status for r in results] == ["current", "current"]
    assert {p: p.stat().st_mtime_ns for p in chunk_files} == chunk_files
    # relabel a few cells of sim001: only sim001 is cut again
    path = run / "cells" / "sim001.parquet"
    table = pq.read_table(path)
    labels = table.column("gate_label").to_numpy(zero_copy_only=False).copy()
    flip = np.flatnonzero(labels == "other")[:5]
    labels[flip] = "cd8_t"
    pq.write_table(
        table.set_column(
            table.schema.get_field_index("gate_label"), "gate_label", pa.array(labels)
        ),
        path,
    )
    results = build_db(cfg, workers=1)
    assert [r.status for r in results] == ["current", "built"]
    after = _index(run)
    keep = before[before["slide_id"] == "sim000"].reset_index(drop=True)
    np.testing.assert_array_equal(
        after[after["slide_id"] == "sim000"].reset_index(drop=True)["row"], keep["row"]
    )
    new = after[after["slide_id"] == "sim001"]
    assert new["row"].min() % CHUNK == 0 and new["row"].min() >= before["row"].max()
    ids = table.column("cell_id").to_numpy()[flip]
    assert (new.set_index("cell_id").loc[ids, "label"] == "cd8_t").all()
    assert len(after) == len(before)


_KILLER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import immunocto.db.build as build
from immunocto.db.store import CropStore
from immunocto.config import load_config
build.FLUSH_ROWS = 256  # flush every chunk ...
build.GROUP_PX = 256  # ... of small groups, so the kill lands mid-slide
calls = {{"n": 0}}
original = CropStore.write
def dying_write(self, start, he, mask, if_):
    calls["n"] += 1
    if calls["n"] == {kill_at}:
        self.he.resize((start + len(he), *self.he.shape[1:]))
        self.he[start:start + len(he)] = he  # half of a write is on disk ...
        os.kill(os.getpid(), signal.SIGKILL)  # ... when the process dies
    return original(self, start, he, mask, if_)
CropStore.write = dying_write
build.build_db(load_config({run!r}), labels="gate", rebuild=True, workers=1)
"""


def test_a_build_killed_half_way_leaves_a_readable_store_and_resumes(db_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(db_run, run)
    complete = _index(db_run)
    # the kill lands in the first slide's second chunk: it must have more than one chunk
    assert (complete["slide_id"] == "sim000").sum() > CHUNK
    reference = CropStore.open_readonly(store_path(db_run))
    script = _KILLER.format(tests=str(os.path.dirname(__file__)), run=str(run), kill_at=2)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    index, manifest = read_index(run)
    partial = index.to_pandas()
    assert 0 < len(partial) == CHUNK  # the finished chunk, nothing of the one being written
    assert manifest["slides"]["sim000"]["complete"] is False
    store = CropStore.open_readonly(store_path(run))
    rows = partial["row"].to_numpy()
    he = store.he.get_orthogonal_selection((rows,))
    ref = complete.set_index(["slide_id", "cell_id"]).loc[
        list(zip(partial["slide_id"], partial["cell_id"], strict=True))
    ]
    np.testing.assert_array_equal(
        he, reference.he.get_orthogonal_selection((ref["row"].to_numpy(),))
    )
    np.testing.assert_array_equal(
        store.if_.get_orthogonal_selection((rows,)),
        reference.if_.get_orthogonal_selection((ref["row"].to_numpy(),)),
    )
    # the next build finishes the job
    results = build_db(load_config(run), labels="gate", workers=1)
    assert [r.status for r in results] == ["built", "built"]
    done = _index(run)
    assert len(done) == len(complete)
    # the interrupted slide was cut again in its place: the same rows as an uninterrupted build
    np.testing.assert_array_equal(done["row"].to_numpy(), complete["row"].to_numpy())
    assert CropStore.open_readonly(store_path(run)).rows == reference.rows
    assert set(zip(done["slide_id"], done["cell_id"], strict=True)) == set(
        zip(complete["slide_id"], complete["cell_id"], strict=True)
    )


def test_other_label_versions_need_their_column(db_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(db_run, run)
    with pytest.raises(ImmunoctoError, match="review_label.*immunocto review export"):
        build_db(load_config(run), labels="review")
    with pytest.raises(ImmunoctoError, match="`labels` must be one of"):
        build_db(load_config(run), labels="truth")
    # a V0 column is taken as it is and recorded as version V0
    for sid in ("sim000", "sim001"):
        path = run / "cells" / f"{sid}.parquet"
        t = pq.read_table(path)
        pq.write_table(t.append_column("review_label", t.column("gate_label")), path)
    build_db(load_config(run), labels="review", with_if=False, workers=1)
    index, manifest = read_index(run)
    assert set(index.column("version").to_pylist()) == {"V0"} and manifest["if_markers"] == []
    assert "if" not in CropStore.open_readonly(store_path(run)).group


def _cfg(slides):
    return RunConfig.model_validate(
        {"slides": [{"id": s, "he": f"{s}.tif", "mpp": 0.5, "patient": p} for s, p in slides]}
    )


def test_splits_keep_patients_whole_and_follow_the_seed():
    slides = [(f"s{i}", f"p{i // 2}") for i in range(40)]  # two slides per patient
    cfg = _cfg(slides)
    a = assign_splits(cfg, seed=1)
    for i in range(0, 40, 2):
        assert a[f"s{i}"] == a[f"s{i + 1}"]
    counts = {k: sum(v == k for v in a.values()) for k in ("train", "val", "test")}
    assert counts["train"] == 28 and counts["val"] == 6 and counts["test"] == 6
    assert assign_splits(cfg, seed=1) == a and assign_splits(cfg, seed=2) != a
    # few patients: each wanted split still gets one
    assert sorted(split_patients(["a", "b", "c"]).values()) == ["test", "train", "val"]
    assert set(split_patients(["a", "b"], fractions=(0.8, 0.2, 0)).values()) == {"train", "val"}
    with pytest.raises(ValueError, match="fractions"):
        split_patients(["a"], fractions=(1, -1, 0))


def test_a_build_killed_in_its_first_write_resumes_to_the_same_store(db_run, tmp_path):
    """Killed before any row reached the index: the half-written chunk is dropped and the
    resumed store has the rows of an uninterrupted build."""
    run = tmp_path / "run"
    shutil.copytree(db_run, run)
    complete = _index(db_run)
    script = _KILLER.format(tests=str(os.path.dirname(__file__)), run=str(run), kill_at=1)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(read_index(run)[0]) == 0 and CropStore.open_readonly(store_path(run)).rows > 0
    build_db(load_config(run), labels="gate", workers=1)
    done = _index(run)
    np.testing.assert_array_equal(done["row"].to_numpy(), complete["row"].to_numpy())
    reference = CropStore.open_readonly(store_path(db_run))
    store = CropStore.open_readonly(store_path(run))
    assert store.rows == reference.rows
    np.testing.assert_array_equal(store.he[:], reference.he[:])


def test_a_dask_worker_killed_mid_build_changes_nothing(db_run, tmp_path, monkeypatch):
    """SIGKILL one of two LocalCluster workers while crops are cut: Dask reruns its tasks on
    the other worker and the store equals a one-process build."""
    import immunocto.db.build as build
    from helpers import WorkerKiller
    from immunocto._parallel import local_cluster, use_dask

    monkeypatch.setattr(build, "FLUSH_ROWS", CHUNK)  # index written after every chunk ...
    monkeypatch.setattr(build, "GROUP_PX", 256)  # ... of many small tasks
    ref, run = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(db_run, ref)
    shutil.copytree(db_run, run)
    build_db(load_config(ref), labels="gate", rebuild=True, workers=1)

    def under_way() -> bool:  # the first chunk is in the index
        try:
            return len(read_index(run)[0]) > 0
        except Exception:  # the index being replaced at this moment
            return False

    with (
        local_cluster(2, dashboard_address=None) as cluster,
        use_dask(cluster.get_client()) as client,
    ):
        pid = next(iter(client.run(os.getpid).values()))
        with WorkerKiller(pid, under_way) as killer:
            results = build_db(load_config(run), labels="gate", rebuild=True, workers=2)
    assert killer.killed, "no worker was killed"
    assert [r.status for r in results] == ["built", "built"]
    a, b = _index(ref), _index(run)
    np.testing.assert_array_equal(a["row"].to_numpy(), b["row"].to_numpy())
    assert a[["slide_id", "cell_id", "label"]].equals(b[["slide_id", "cell_id", "label"]])
    sa, sb = CropStore.open_readonly(store_path(ref)), CropStore.open_readonly(store_path(run))
    assert sa.rows == sb.rows
    np.testing.assert_array_equal(sa.he[:], sb.he[:])
    np.testing.assert_array_equal(sa.if_[:], sb.if_[:])


def test_workers_write_the_crops_and_send_back_only_flags(db_run, tmp_path, monkeypatch):
    """Forked workers cut and write their own chunk-aligned blocks: what reaches this process
    is a border flag and a scale per crop (5 bytes, not the ~29 kB of a crop with IF), and
    the store equals the fixture's."""
    import immunocto.db.build as build

    run = tmp_path / "run"
    shutil.copytree(db_run, run)
    received: list[int] = []
    original = build.cut_slide

    def counting(*args, **kwargs):
        for lo, hi, border, scale in original(*args, **kwargs):
            assert lo % CHUNK == 0 and border.shape == scale.shape == (hi - lo,)
            received.append(border.nbytes + scale.nbytes)
            yield lo, hi, border, scale

    monkeypatch.setattr(build, "cut_slide", counting)
    monkeypatch.setattr(build, "GROUP_PX", 512)  # blocks span several squares
    build_db(load_config(run), labels="gate", rebuild=True, workers=2)
    index = _index(run)
    assert sum(received) == 5 * len(index) and len(received) > 2
    a, b = CropStore.open_readonly(store_path(db_run)), CropStore.open_readonly(store_path(run))
    ref = _index(db_run).set_index(["slide_id", "cell_id"])["row"]
    rows = ref.loc[list(zip(index["slide_id"], index["cell_id"], strict=True))].to_numpy()
    for name in ("he", "mask", "if_"):
        np.testing.assert_array_equal(
            getattr(b, name).get_orthogonal_selection((index["row"].to_numpy(),)),
            getattr(a, name).get_orthogonal_selection((rows,)),
        )


def test_row_blocks_split_at_squares_and_chunk_boundaries():
    from immunocto.db.extract import row_blocks

    blocks = row_blocks([3, 5, 0, 4], 4)  # squares of 3, 5, (none), 4 cells
    assert blocks == [
        (0, 4, [(0, 3), (3, 4)]),
        (4, 8, [(4, 8)]),
        (8, 12, [(8, 12)]),
    ]
    assert row_blocks([], 4) == []
    assert row_blocks([2], 4) == [(0, 2, [(0, 2)])]


def test_blocks_are_whole_chunks_about_four_per_worker_and_at_most_one_index_step():
    from immunocto.db.build import FLUSH_ROWS, block_rows

    assert block_rows(7367, 1) == FLUSH_ROWS  # one process: the index's step
    assert block_rows(7367, 2) == 4 * CHUNK  # 29 chunks -> 8 tasks of 4 chunks
    assert block_rows(100, 2) == CHUNK and block_rows(0, 4) == CHUNK
    assert block_rows(10**7, 8) == FLUSH_ROWS
    for rows, workers in ((1, 1), (5000, 3), (123_456, 16)):
        assert block_rows(rows, workers) % CHUNK == 0
