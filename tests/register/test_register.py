"""Registration on simulated slides, compared with the truth."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from helpers import simulate_small
from immunocto.cli import app
from immunocto.config import load_config
from immunocto.io import open_slide
from immunocto.register import (
    RegistrationModel,
    confirm_nuclei,
    load_registration,
    read_if_in_he_frame,
    robust_affine,
    run_register,
)
from immunocto.simulate.transform import TruthTransform


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    run = simulate_small(
        tmp_path_factory.mktemp("reg") / "run", size=1536, seed=5, tile=512, workers=2
    )
    cfg = load_config(run)
    results = run_register(cfg)
    return run, cfg, results


def truth(run):
    return TruthTransform.from_dict(
        json.loads((run / "truth/sim000/registration.json").read_text())
    )


def test_affine_within_one_pixel_of_the_truth_over_tissue(registered):
    run, _cfg, results = registered
    model = results[0].model
    cells = pq.read_table(run / "truth/sim000/cells.parquet", columns=["x", "y"]).to_pandas()
    x, y = cells["x"].to_numpy(), cells["y"].to_numpy()
    u_est, v_est = model.affine_only(x, y)
    u_true, v_true = truth(run).affine_only(x, y)
    err = np.hypot(u_est - u_true, v_est - v_true)
    assert err.max() <= 1.0
    assert np.median(err) < 0.5


def test_residual_grid_finds_the_planted_local_warp(registered):
    run, _cfg, results = registered
    model = results[0].model
    rows, cols = model.residual_dx.shape
    cy, cx = (np.mgrid[0:rows, 0:cols] + 0.5) * model.tile_px - 0.5
    t = truth(run)
    # the truth's local part, seen relative to the estimated affine
    u, v = t.he_to_if(cx, cy)
    ua, va = model.affine_only(cx, cy)
    ok = np.isfinite(model.residual_dx)
    assert ok.sum() >= 6
    true_dx, true_dy = (u - ua)[ok], (v - va)[ok]
    err = np.hypot(model.residual_dx[ok] - true_dx, model.residual_dy[ok] - true_dy)
    assert np.median(err) < 0.5
    assert np.hypot(true_dx, true_dy).max() > 1.0  # there was something to find
    # affine + residual predicts the true mapping at cells better than the affine alone
    cells = pq.read_table(run / "truth/sim000/cells.parquet", columns=["x", "y"]).to_pandas()
    x, y = cells["x"].to_numpy(), cells["y"].to_numpy()
    ut, vt = t.he_to_if(x, y)
    full = np.hypot(*(np.stack(model.he_to_if(x, y)) - np.stack([ut, vt])))
    aff = np.hypot(*(np.stack(model.affine_only(x, y)) - np.stack([ut, vt])))
    assert np.mean(full) < np.mean(aff)


def test_files_written_and_rerun_skips(registered):
    run, cfg, results = registered
    assert results[0].status == "registered"
    assert (run / "registration/sim000.json").is_file() and (
        run / "registration/sim000_residual.png"
    ).is_file()
    again = run_register(cfg)
    assert again[0].status == "current"
    model = load_registration(cfg, "sim000")
    np.testing.assert_allclose(model.affine, results[0].model.affine)
    assert model.hoechst_otsu and model.hoechst_otsu > 0


def test_flags_tiles_above_the_bound(registered):
    _run, _cfg, results = registered
    model = results[0].model
    mag = model.residual_magnitude
    bound = float(np.nanmedian(mag))
    strict = RegistrationModel.from_dict(
        {**model.to_dict(), "residual": {**model.to_dict()["residual"], "max_residual_px": bound}}
    )
    assert 0 < strict.flagged.sum() < np.isfinite(mag).sum()
    assert np.all(mag[strict.flagged] > bound)


def test_if_read_through_the_registration_lines_up_with_the_nuclei(registered):
    run, _cfg, results = registered
    model = results[0].model
    import tifffile

    nuclei = tifffile.imread(run / "truth/sim000/nuclei.tif")[400:656, 400:656]
    with open_slide(run / "slides/sim000/if.ome.tif") as if_:
        reg = read_if_in_he_frame(if_, model, 400, 400, 256, 256, channels=["Hoechst"])[0]
        naive = if_.read_region(400, 400, 256, 256, channels=["Hoechst"])[0].astype(float)
    inside = nuclei > 0
    contrast = lambda img: img[inside].mean() / img[~inside].mean()  # noqa: E731
    assert contrast(reg) > 3.0
    assert contrast(reg) > 1.5 * contrast(naive)


def test_nuclear_confirmation_rule():
    assert confirm_nuclei(np.array([10.0, 29.9, 30.0, 500.0]), otsu=100.0).tolist() == [
        False,
        False,
        True,
        True,
    ]
    assert confirm_nuclei(np.array([49.0, 50.0]), otsu=100.0, fraction=0.5).tolist() == [
        False,
        True,
    ]


def test_robust_affine_ignores_gross_outliers():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 4000, (60, 2))
    a = np.array([[1.001, -0.004, 12.0], [0.004, 0.999, -7.5]])
    q = p @ a[:, :2].T + a[:, 2] + rng.normal(0, 0.2, (60, 2))
    q[:5] += 40.0  # five failed matches
    fit, inlier = robust_affine(p, q, floor_px=8.0)
    assert not inlier[:5].any() and inlier[5:].all()
    pred = p @ fit[:2, :2].T + fit[:2, 2]
    true = p @ a[:, :2].T + a[:, 2]
    assert np.hypot(*(pred - true).T).max() < 0.25  # the fit is the noise-level truth


def test_register_command(registered):
    run, _cfg, _results = registered
    result = CliRunner().invoke(app, ["register", str(run / "immunocto.yaml")])
    assert result.exit_code == 0, result.output
    assert "sim000" in result.output and "current" in result.output
    bad = CliRunner().invoke(app, ["register", str(run), "--slide", "nope"])
    assert bad.exit_code == 2 and "unknown slide id(s) nope" in bad.stderr


def test_registration_does_not_depend_on_the_blas_thread_count(tmp_path):
    """The sub-pixel step is a matmul: with 2 BLAS threads it summed in another order, and the
    affine moved by ~0.07 px against 1 thread (a run in a process started after a Dask cluster,
    which sets OMP_NUM_THREADS=1, then segmented 2 cells fewer)."""
    from threadpoolctl import threadpool_limits

    from immunocto.io.open import open_pair
    from immunocto.register import estimate_registration

    # a slide on which 1 and 2 threads did differ (on a Haswell OpenBLAS kernel)
    cfg = load_config(simulate_small(tmp_path / "run", size=768, tile=256, seed=4))
    models = []
    for threads in (1, 2):
        he, if_ = open_pair(cfg, 0)
        try:
            with threadpool_limits(limits=threads, user_api="blas"):
                models.append(estimate_registration(he, if_, cfg.registration))
        finally:
            he.close()
            if_.close()
    one, two = models
    assert np.array_equal(one.affine, two.affine)
    assert np.array_equal(one.residual_dx, two.residual_dx, equal_nan=True)
    assert np.array_equal(one.residual_dy, two.residual_dy, equal_nan=True)


def test_window_mapping_equals_the_per_point_mapping():
    """``he_to_if_window`` (separable, used to read IF tiles) gives ``he_to_if`` of every pixel,
    inside the residual grid, past its edges (clamped) and where a tile failed (NaN filled)."""
    from immunocto.register.model import RegistrationModel

    rng = np.random.default_rng(4)
    dx, dy = rng.normal(0, 2, (5, 6)), rng.normal(0, 2, (5, 6))
    dx[1, 2] = np.nan
    dy[1, 2] = np.nan
    affine = np.array([[0.98, 0.03, 12.5], [-0.02, 1.01, -7.0], [0, 0, 1]])
    model = RegistrationModel("s", affine, 200, dx, dy, np.ones((5, 6)), 3.0)
    for x, y, w, h in [(0, 0, 300, 250), (-150, 700, 333, 420), (900, -40, 500, 77)]:
        ys, xs = np.mgrid[y : y + h, x : x + w].astype(np.float64)
        u, v = model.he_to_if(xs, ys)
        uw, vw = model.he_to_if_window(x, y, w, h)
        assert uw.shape == (h, w)
        np.testing.assert_allclose(uw, u, atol=1e-4)
        np.testing.assert_allclose(vw, v, atol=1e-4)


def test_fine_tiles_on_worker_processes_give_the_same_model(registered):
    """The fine tiles are matched on worker processes that reopen the slides (with the
    config's pixel sizes); the model equals the one of a single process."""
    from immunocto.io.open import open_pair
    from immunocto.register import estimate_registration
    from immunocto.segment.base import SlidePaths

    _run, cfg, results = registered
    slide = cfg.slides[0]
    he, if_ = open_pair(cfg, 0)
    with he, if_:
        paths = SlidePaths(
            "sim000", cfg.resolve(slide.he), he.mpp, cfg.resolve(slide.if_), None, None,
            cfg.registration.nuclear_channel, if_mpp=if_.mpp,
        )  # fmt: skip
        two = estimate_registration(he, if_, cfg.registration, paths=paths, workers=2)
        one = estimate_registration(he, if_, cfg.registration)
    assert one.stats["tiles_matched"] >= 9
    assert np.array_equal(one.affine, two.affine)
    assert np.array_equal(one.residual_dx, two.residual_dx, equal_nan=True)
    assert np.array_equal(one.match, two.match, equal_nan=True)
    assert np.array_equal(results[0].model.affine, one.affine)


def test_worker_openers_use_the_configs_if_pixel_size(registered, tmp_path):
    """A pixel size set in the config overrides the file's in every process, not only in the
    one that reads the config (workers reopen the slides themselves)."""
    from immunocto.quantify.stage import QuantifyOpener
    from immunocto.segment.base import SlidePaths

    _run, cfg, _ = registered
    slide = cfg.slides[0].model_copy(update={"if_mpp": 0.41})
    paths = SlidePaths("sim000", cfg.resolve(slide.he), slide.mpp, cfg.resolve(slide.if_), None,
                       None, "Hoechst", if_mpp=slide.if_mpp)  # fmt: skip
    ctx = paths.open({})
    try:
        assert ctx.if_.mpp == pytest.approx(0.41) and ctx.he.mpp == pytest.approx(slide.mpp)
    finally:
        ctx.he.close()
        ctx.if_.close()
    opener = QuantifyOpener.for_slide(cfg, slide)
    assert opener.if_mpp == pytest.approx(0.41)
    without = QuantifyOpener.for_slide(cfg, cfg.slides[0])
    assert without.if_mpp is None and without.he_mpp == cfg.slides[0].mpp
