"""H&E-only model: context windows, partial-label (nnPU) learning, training kinds, prediction
on an H&E file alone, typed detection metrics and the size + darkness baseline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from immunocto.cli import app as cli
from immunocto.config import load_config
from immunocto.errors import ImmunoctoError
from immunocto.io.array import ArraySlide
from immunocto.models.checkpoint import HEModel, load_model
from immunocto.models.context import box_mean, context_windows
from immunocto.models.he import output_classes, train_he
from immunocto.models.pu import estimate_prior, nnpu_loss
from immunocto.validate.detection import SizeDarknessBaseline, typed_detection

runner = CliRunner()


# ----------------------------------------------------------------------------- context windows


def test_box_mean_matches_a_direct_average():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (23, 17, 3), dtype=np.uint8)
    got = box_mean(img, 4)
    assert got.shape == (20, 14, 3)
    for p, q in [(0, 0), (5, 9), (19, 13)]:
        np.testing.assert_allclose(
            got[p, q], img[p : p + 4, q : q + 4].mean(axis=(0, 1)), atol=1e-4
        )


def test_context_window_is_the_averaged_256px_neighbourhood():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (600, 700, 3), dtype=np.uint8)
    slide = ArraySlide(rgb, mpp=0.325)
    x, y = 300, 250
    win = context_windows(slide, np.array([x, 20.0]), np.array([y, 30.0]))
    assert win.shape == (2, 64, 64, 3) and win.dtype == np.uint8
    # context pixel (i, j) averages slide pixels [y-128+4i, +4) x [x-128+4j, +4)
    for i, j in [(0, 0), (32, 32), (63, 10)]:
        block = rgb[y - 128 + 4 * i : y - 124 + 4 * i, x - 128 + 4 * j : x - 124 + 4 * j]
        assert np.abs(win[0, i, j].astype(float) - block.mean(axis=(0, 1))).max() <= 0.5
    # a cell near the corner: the part of its window outside the slide is black
    assert win[1, :20, :20].max() == 0 and win[1, 40:, 40:].max() > 0


def test_context_window_covers_the_same_micrometres_at_another_pixel_size():
    rgb = np.zeros((800, 800, 3), np.uint8)
    rgb[:, 400:] = 200  # right half bright
    win = context_windows(ArraySlide(rgb, mpp=0.25), np.array([400.0]), np.array([400.0]))
    # 256 px at 0.325 µm = 83.2 µm = 333 px at 0.25 µm; the edge is at the window centre
    assert win[0, :, :31].max() == 0 and win[0, :, 33:].min() == 200


# ----------------------------------------------------------------------------- partial labels


def _pu_problem(seed=0, n=3000, drop=0.4):
    """Two classes (immune = 0, other = 1) in 2-D; ``drop`` of immune labelled other."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.4
    x = rng.normal(0, 1, (n, 2)) + np.where(truth[:, None], [1.3, 1.3], [-0.65, -0.65])
    labels = np.where(truth, 0, 1)
    hidden = truth & (rng.random(n) < drop)
    labels[hidden] = 1
    return x.astype(np.float32), labels, truth, hidden


def _fit(x, labels, loss_kind, prior=None, steps=400):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)
    for _ in range(steps):
        z = model(xt)
        loss = (
            torch.nn.functional.cross_entropy(z, yt)
            if loss_kind == "ce"
            else nnpu_loss(z, yt, other=1, prior=prior)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return model(xt).argmax(1).numpy()


def test_nnpu_recovers_positives_hidden_in_other():
    x, labels, truth, hidden = _pu_problem()
    prior = hidden.sum() / (labels == 1).sum()
    ce = _fit(x, labels, "ce")
    pu = _fit(x, labels, "nnpu", prior=float(prior))
    recall_ce = np.mean(ce[truth] == 0)
    recall_pu = np.mean(pu[truth] == 0)
    # plain cross-entropy learns to miss the hidden positives; nnPU finds most of them
    assert recall_pu > recall_ce + 0.1
    assert np.mean(pu[hidden] == 0) > 0.7
    # ... without calling most true negatives immune
    assert np.mean(pu[~truth] == 1) > 0.8


def test_nnpu_with_zero_prior_is_plain_binary_cross_entropy():
    z = torch.randn(64, 5)
    y = torch.randint(0, 5, (64,))
    other = 4
    s = torch.logsumexp(z[:, :4], 1) - z[:, 4]
    pos = y != other
    immune_ce = torch.nn.functional.cross_entropy(z[pos][:, :4], y[pos]) * pos.float().mean()
    binary = (
        torch.nn.functional.softplus(-s[pos]).sum() / 64
        + torch.nn.functional.softplus(s[~pos]).sum() / 64
    )
    torch.testing.assert_close(nnpu_loss(z, y, other, 0.0), immune_ce + binary)


def test_prior_estimate_is_close_to_the_planted_fraction():
    x, labels, _, hidden = _pu_problem(seed=3, n=6000, drop=0.4)
    est = estimate_prior(x, labels == 0, seed=0)
    true = hidden.sum() / (labels == 1).sum()
    assert abs(est["prior"] - true) < 0.35 * true


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def he_run(db_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("he") / "run"
    shutil.copytree(db_run, run)
    cfg = load_config(run)
    result = train_he(
        run, cfg=cfg, kind="he", labels="gate", epochs=3, batch_size=128, lr=3e-3, name="he"
    )
    return run, result


def test_he_model_trains_with_context_and_reloads_identically(he_run):
    run, result = he_run
    hist = result.metrics["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    folder = run / "models" / "he"
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "he" and config["context"] is True
    assert config["input"]["channels"] == ["R", "G", "B", "mask"]
    assert (run / "context.zarr").exists() and (folder / "metrics.png").exists()
    m1, m2 = load_model(folder, "cpu"), load_model(folder, "cpu")
    assert isinstance(m1, HEModel)
    g = torch.Generator().manual_seed(0)
    he = torch.randint(0, 256, (6, 3, 64, 64), generator=g, dtype=torch.uint8)
    mask = (torch.rand(6, 1, 64, 64, generator=g) > 0.7).to(torch.uint8)
    ctx = torch.randint(0, 256, (6, 3, 64, 64), generator=g, dtype=torch.uint8)
    p1 = m1.predict(he, mask, ctx)
    torch.testing.assert_close(p1, m2.predict(he, mask, ctx), rtol=0, atol=0)
    torch.testing.assert_close(p1.sum(1), torch.ones(6))
    with pytest.raises(ValueError, match="context"):
        m1.predict(he, mask, None)


def test_context_store_is_reused_and_rows_match_cells(he_run):
    import zarr

    from immunocto.db.store import read_index
    from immunocto.models.context import ensure_context

    run, _ = he_run
    cfg = load_config(run)
    _, cut = ensure_context(cfg)
    assert cut == 0  # already there
    index = read_index(run)[0].to_pandas()
    ctx = zarr.open_group(str(run / "context.zarr"), mode="r")["context"]
    row = index.iloc[len(index) // 2]
    slide = cfg.slides[[s.id for s in cfg.slides].index(row["slide_id"])]
    from immunocto.io import open_slide

    with open_slide(cfg.resolve(slide.he), mpp=slide.mpp) as s:
        expect = context_windows(s, np.array([row["x"]]), np.array([row["y"]]))[0]
    np.testing.assert_array_equal(ctx[int(row["row"])], expect)


def test_collapsed_classes_and_regression_kind(db_run, tmp_path):
    assert output_classes(True)[0] == ("lymphocyte", "macrophage", "other")
    assert output_classes(True)[1].tolist() == [0, 0, 0, 1, 2]
    run = tmp_path / "run"
    shutil.copytree(db_run, run)
    cfg = load_config(run)
    r = train_he(
        run, cfg=cfg, kind="he", labels="gate", collapse_lymphocytes=True, context=False,
        epochs=1, max_steps=2, name="collapsed",
    )  # fmt: skip
    assert json.loads((r.folder / "config.json").read_text())["classes"] == [
        "lymphocyte",
        "macrophage",
        "other",
    ]
    reg = train_he(run, cfg=cfg, kind="he-regression", context=False, epochs=2, batch_size=128)
    per = reg.metrics["validation"]["per_marker"]
    assert set(per) == {"Hoechst", "CD45", "CD3e", "CD4", "CD8a", "CD20", "CD163", "CD68"}
    assert all(np.isfinite(v["pearson_r"]) for v in per.values())
    model = load_model(reg.folder, "cpu")
    out = model.predict(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 8)
    nn = train_he(
        run, cfg=cfg, kind="he", labels="gate", partial_labels="nnpu", context=False,
        epochs=1, max_steps=2, name="pu",
    )  # fmt: skip
    prior = json.loads((nn.folder / "config.json").read_text())["pu_prior"]
    assert prior["source"].startswith("Elkan") and 0.0 <= prior["prior"] < 1.0
    # the crop branch can start from the shipped nucleus network's encoder
    ni = train_he(
        run, cfg=cfg, kind="he", labels="gate", context=False, init="nuclei",
        epochs=1, max_steps=2, name="from_nuclei",
    )  # fmt: skip
    ncfg = json.loads((ni.folder / "config.json").read_text())
    assert ncfg["arch"] == "nuclei" and ncfg["train"]["init"]["tensors"] > 0
    model = load_model(ni.folder, "cpu")
    probs = model.predict(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.zeros(2, 1, 64, 64))
    assert probs.shape == (2, 5)


def test_train_cli_on_a_store_without_config(db_run, tmp_path):
    """An imported release is a run folder with a crop store and no slides."""
    run = tmp_path / "release"
    run.mkdir()
    for name in ("crops.zarr", "crops.parquet"):
        src = db_run / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, run / name)
    res = runner.invoke(cli, ["train", str(run), "--kind", "he", "--labels", "store"])
    assert res.exit_code != 0 and "--no-context" in res.output
    res = runner.invoke(
        cli,
        ["train", str(run), "--kind", "he", "--labels", "store", "--no-context", "--epochs", "1",
         "--arch", "small"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (run / "models" / "he" / "model.pt").exists()
    res = runner.invoke(cli, ["train", str(run), "--kind", "nope"])
    assert res.exit_code != 0 and "--kind must be one of" in res.output


# ----------------------------------------------------------------------------- prediction


def test_predict_on_an_he_file_alone(he_run, tmp_path):
    run, _ = he_run
    cfg = load_config(run)
    slide = cfg.resolve(cfg.slides[0].he)
    out = tmp_path / "pred"
    res = runner.invoke(
        cli,
        ["predict", str(slide), "--model", str(run / "models" / "he"), "--out", str(out),
         "--workers", "1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    sid = cfg.slides[0].id  # he.ome.tif in slides/<id>/ takes the folder's name
    table = pq.read_table(out / f"{sid}.parquet").to_pandas()
    assert len(table) > 100
    probs = table[[f"pred_prob_{c}" for c in ("cd4_t", "cd8_t", "b_cell", "macrophage", "other")]]
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert (table["pred_label"] == probs.idxmax(axis=1).str.removeprefix("pred_prob_")).all()
    geo = json.loads((out / f"{sid}.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(table)
    names = {f["properties"]["classification"]["name"] for f in geo["features"]}
    assert names == set(table["pred_label"])
    assert (out / f"{sid}.png").stat().st_size > 10_000
    # the bootstrap model needs IF: a clear refusal; and an IF image is not H&E
    res = runner.invoke(cli, ["predict", str(slide), "--model", str(run), "--out", str(out)])
    assert res.exit_code != 0 and "model.pt" in res.output
    res = runner.invoke(
        cli,
        ["predict", str(cfg.resolve(cfg.slides[0].if_)), "--model", str(run / "models" / "he"),
         "--out", str(tmp_path / "x")],
    )  # fmt: skip
    assert res.exit_code != 0 and "fluorescence" in res.output
    # typed detection against the simulator's truth, through the CLI
    res = runner.invoke(
        cli,
        ["validate", "detection", "--truth", str(run / "truth" / sid / "cells.parquet"),
         "--pred", str(out / f"{sid}.parquet"), "--json", str(tmp_path / "det.json")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    det = json.loads((tmp_path / "det.json").read_text())
    assert det["all"]["recall"] > 0.7 and set(det["groups"]) == {"lymphocyte", "macrophage"}


def test_predict_workers_classify_and_the_client_only_writes(he_run, tmp_path, monkeypatch):
    """With 2 forked workers the H&E model runs there, never in this process, and the table
    equals a one-process predict's."""
    import immunocto.config
    from helpers import count_calls
    from immunocto.models.checkpoint import HEModel
    from immunocto.models.predict import predict_file

    class FourTiles(immunocto.config.SegmentParams):
        tile_px: int = 512  # the 1024 px slide in four tiles: four classification tasks

    monkeypatch.setattr(immunocto.config, "SegmentParams", FourTiles)

    run, _ = he_run
    cfg = load_config(run)
    slide = cfg.resolve(cfg.slides[0].he)
    calls = count_calls(monkeypatch, HEModel, "predict")
    model = run / "models" / "he"
    one = predict_file(slide, model, tmp_path / "one", workers=1, device="cpu")
    assert calls["n"] > 0
    calls["n"] = 0
    two = predict_file(slide, model, tmp_path / "two", workers=2, device="cpu")
    assert calls["n"] == 0, "the H&E model ran in the client"
    assert one.cells == two.cells > 100 and one.counts == two.counts
    a = pq.read_table(one.files["cells"]).to_pandas()
    b = pq.read_table(two.files["cells"]).to_pandas()
    assert list(a.columns) == list(b.columns)
    probs = [c for c in a.columns if c.startswith("pred_prob_")]
    np.testing.assert_allclose(a[probs].to_numpy(), b[probs].to_numpy(), atol=1e-6)
    assert a["pred_label"].equals(b["pred_label"]) and a["cell_id"].equals(b["cell_id"])


def test_predict_without_a_model_gives_the_nucleus_network_s_types(sim_run, tmp_path):
    """Nothing trained yet: the shipped nucleus network's type head classifies the cells."""
    from scipy.spatial import cKDTree

    slide = sim_run / "slides" / "sim000" / "he.ome.tif"
    out = tmp_path / "pred"
    res = runner.invoke(cli, ["predict", str(slide), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "inflammatory" in res.output
    table = pq.read_table(out / "sim000.parquet").to_pandas()
    assert len(table) > 100 and "pred_label" not in table
    assert set(table["nucleus_type"]) <= {"inflammatory", "epithelial", "stromal", "other"}
    geo = json.loads((out / "sim000.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in geo["features"]}
    assert len(geo["features"]) == len(table) and names == set(table["nucleus_type"])
    colour = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"]
              for f in geo["features"]}  # fmt: skip
    assert colour["inflammatory"] == [230, 30, 30] and colour["epithelial"] == [30, 200, 60]
    assert (out / "sim000.png").stat().st_size > 10_000
    truth = pq.read_table(sim_run / "truth" / "sim000" / "cells.parquet").to_pandas()
    dist, near = cKDTree(truth[["x", "y"]].to_numpy()).query(table[["x", "y"]].to_numpy())
    fine = truth["fine_type"].to_numpy()[near[dist < 6]]
    lymph = np.isin(fine, ["cd4_t", "cd8_t", "b_cell", "treg"])
    assert (table["nucleus_type"].to_numpy()[dist < 6][lymph] == "inflammatory").mean() > 0.85
    # the classical backend types nothing: without a model that is refused, naming both ways
    res = runner.invoke(
        cli, ["predict", str(slide), "--out", str(tmp_path / "c"), "--backend", "he-classical"]
    )
    assert res.exit_code != 0 and "model" in res.output and "backend he" in res.output
    assert not (tmp_path / "c").exists()


def test_a_predict_stopped_after_segmenting_resumes_to_the_same_table(
    sim_run, tmp_path, monkeypatch, caplog
):
    """Workers write tile parts next to the outputs; a run that dies before the table is
    written leaves them, and the next run segments nothing again and writes what an
    uninterrupted run writes."""
    import logging

    import immunocto.segment.stage as seg_stage
    from immunocto.models.predict import predict_file

    slide = sim_run / "slides" / "sim000" / "he.ome.tif"
    whole = predict_file(slide, None, tmp_path / "whole", workers=2)
    assert not (tmp_path / "whole" / ".sim000.parts").exists()  # removed once done

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(seg_stage, "write_cell_table_parts", crash)
        with pytest.raises(RuntimeError, match="killed"):
            predict_file(slide, None, tmp_path / "again", workers=2)
    assert not (tmp_path / "again" / "sim000.parquet").exists()
    assert list((tmp_path / "again" / ".sim000.parts").glob("tile-*.parquet"))
    with caplog.at_level(logging.INFO, logger="immunocto.segment.tiled"):
        again = predict_file(slide, None, tmp_path / "again", workers=2)
    assert "already segmented (resuming)" in caplog.text
    assert again.cells == whole.cells and again.counts == whole.counts
    a = pq.read_table(tmp_path / "whole" / "sim000.parquet").to_pandas()
    b = pq.read_table(tmp_path / "again" / "sim000.parquet").to_pandas()
    pd.testing.assert_frame_equal(a, b)


# ----------------------------------------------------------------------------- metrics


def test_typed_detection_counts():
    truth_xy = np.array([[0, 0], [10, 0], [20, 0], [30, 0]], float)
    truth_cls = np.array(["cd4_t", "cd8_t", "macrophage", "other"])
    pred_xy = np.array([[1, 0], [10, 1], [21, 0], [50, 0]], float)
    pred_cls = np.array(["cd8_t", "cd8_t", "other", "b_cell"])
    r = typed_detection(truth_xy, truth_cls, pred_xy, pred_cls, radius=4.0)
    assert r["all"]["tp"] == 3 and r["all"]["fn"] == 1 and r["all"]["fp"] == 1
    assert r["by_class"]["cd8_t"] == {
        "tp": 1, "fp": 1, "fn": 0, "precision": 0.5, "recall": 1.0, "f1": 0.6667,
    }  # fmt: skip
    # lymphocyte group: cd4_t called cd8_t still counts; the unmatched b_cell is a false positive
    lym = r["groups"]["lymphocyte"]
    assert (lym["tp"], lym["fp"], lym["fn"]) == (2, 1, 0)
    mac = r["groups"]["macrophage"]
    assert (mac["tp"], mac["fp"], mac["fn"]) == (0, 0, 1)


def test_size_darkness_baseline_separates_what_size_and_darkness_separate():
    rng = np.random.default_rng(0)
    area = np.concatenate([rng.normal(40, 5, 300), rng.normal(90, 10, 300)])
    grey = np.concatenate([rng.normal(60, 8, 300), rng.normal(120, 10, 300)])
    labels = np.array(["cd4_t"] * 300 + ["other"] * 300)
    base = SizeDarknessBaseline().fit(area, grey, labels)
    assert np.mean(base.predict(area, grey) == labels) > 0.95
    with pytest.raises(ImmunoctoError):
        train_he("/nonexistent/run", kind="he", context=False)


# ----------------------------------------------------------------------------- the V1 database


def test_v1_database_holds_every_v1_cell_and_the_he_model_trains_on_it(db_run, tmp_path):
    """V1 goes to its own store (RUN/v1), with the expanded cells the gates left unlabelled,
    split by patient as the gate store, which stays as it was."""
    import pandas as pd

    from immunocto.db.build import v1_db_stage
    from immunocto.db.store import read_index
    from immunocto.models.stage import train_he_stage
    from immunocto.progress import NullProgress

    run = tmp_path / "run"
    shutil.copytree(db_run, run)
    cfg = load_config(run)
    main_before = read_index(run)
    assert v1_db_stage(cfg, NullProgress())["status"].startswith("skipped")
    with pytest.raises(ImmunoctoError, match="build-db CONFIG --labels v1"):
        train_he(run, cfg=cfg, kind="he", labels="v1", context=False, epochs=1, max_steps=1)
    # a stand-in for `expand`: V1 = the gate's classes, plus 'other' for a third of the cells
    # the gates left without a class (what expansion adds)
    added = 0
    for s in cfg.slides:
        path = run / "cells" / f"{s.id}.parquet"
        df = pq.read_table(path).to_pandas()
        v1 = df["gate_label"].astype(str).to_numpy().copy()
        open_ = np.flatnonzero(~np.isin(v1, ["cd4_t", "cd8_t", "b_cell", "macrophage", "other"]))
        pick = open_[::3]
        v1[pick] = "other"
        added += len(pick)
        df["v1_label"] = v1
        df.to_parquet(path)
    assert added > 20
    out = v1_db_stage(cfg, NullProgress())
    v1_index, manifest = read_index(run / "v1")
    assert out["crops"] == v1_index.num_rows == main_before[0].num_rows + added
    assert manifest["version"] == "V1" and manifest["if_markers"] == []
    assert set(v1_index.column("version").to_pylist()) == {"V1"}
    # the gate store is untouched and the patients keep their splits
    main_after = read_index(run)
    assert main_after[0].equals(main_before[0]) and main_after[1] == main_before[1]
    split_of = lambda t: dict(  # noqa: E731
        pd.DataFrame(t.select(["slide_id", "split"]).to_pydict()).drop_duplicates().values
    )
    assert split_of(v1_index) == split_of(main_before[0])
    # the stage is current the second time
    assert v1_db_stage(cfg, NullProgress())["built"] == 0
    # the H&E model trains on the V1 database, its context windows beside it
    cfg.he_training.epochs = 1
    cfg.he_training.arch = "small"
    summary = train_he_stage(cfg, NullProgress())
    assert summary["status"] == "trained", summary
    config = json.loads((run / "models" / "he" / "config.json").read_text())
    assert config["database"] == str(run / "v1") and config["label_version"] == "V1"
    n_train = (np.asarray(v1_index.column("split")) == "train").sum()
    assert sum(config["train"]["train_counts"]) == n_train
    assert (run / "v1" / "context.zarr").exists() and not (run / "context.zarr").exists()
    assert train_he_stage(cfg, NullProgress())["status"] == "current"
    # the CLI stores V1 in RUN/v1 too, and --out elsewhere
    res = runner.invoke(
        cli, ["build-db", str(run), "--labels", "v1", "--no-if", "--out", str(tmp_path / "elsewhere"),
              "--workers", "1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert read_index(tmp_path / "elsewhere")[0].num_rows == v1_index.num_rows
    # a V1 store built by hand with IF is kept by the pipeline stage, not rebuilt without it
    res = runner.invoke(cli, ["build-db", str(run), "--labels", "v1", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert read_index(run / "v1")[1]["if_markers"] != []
    assert v1_db_stage(cfg, NullProgress())["built"] == 0
