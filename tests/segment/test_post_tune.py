"""Post-processing chosen per slide from the nucleus network's own test-time views."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from skimage.draw import disk

from immunocto.errors import ImmunoctoError
from immunocto.segment import post_tune

DEFAULT = {"fg_threshold": 0.5, "seed_threshold": 0.5, "min_score": 0.0}


def _nuclei(shape=(200, 200), spacing=20, radius=6, seed=0):
    """Foreground / normalised distance maps of a grid of round nuclei."""
    fg = np.zeros(shape, np.float32)
    dist = np.zeros(shape, np.float32)
    for cy in range(spacing // 2, shape[0] - radius, spacing):
        for cx in range(spacing // 2, shape[1] - radius, spacing):
            rr, cc = disk((cy, cx), radius, shape=shape)
            fg[rr, cc] = 0.95
            d = 1 - np.hypot(rr - cy, cc - cx) / radius
            dist[rr, cc] = np.maximum(dist[rr, cc], d)
    return fg, dist


def _blob(fg, dist, cy, cx, p):
    rr, cc = disk((cy, cx), 4, shape=fg.shape)
    fg, dist = fg.copy(), dist.copy()
    fg[rr, cc] = p
    dist[rr, cc] = 0.8
    return fg, dist


def test_faint_blobs_one_view_at_a_time_are_scored_away():
    """Each view sees its own faint blobs (p 0.65) between the nuclei; averaged they vanish. The
    views agree with the averaged maps only once the score floor drops the blobs: the choice
    must use one (any floor above 0.65), where the model's own setting keeps them."""
    fg, dist = _nuclei()
    views = []
    rng = np.random.default_rng(1)
    for _ in range(4):
        vf, vd = fg, dist
        for _ in range(6):  # blobs in the gaps between nuclei
            cy, cx = rng.integers(0, 9, 2) * 20 + 20
            vf, vd = _blob(vf, vd, cy, cx, 0.65)
        views.append((vf, vd))
    comb = (np.mean([v[0] for v in views], 0), np.mean([v[1] for v in views], 0))
    got = post_tune.choose([(comb, views)], mpp=0.5, min_area_px=8, default=DEFAULT)
    assert got["tuned"] and got["min_score"] > 0.65
    table = post_tune.agreement([(comb, views)], mpp=0.5, min_area_px=8)
    f1 = {k: 2 * c[0] / (2 * c[0] + c[1] + c[2]) for k, c in table.items()}
    best = f1[(got["fg_threshold"], got["seed_threshold"], got["min_score"])]
    assert f1[(0.5, 0.5, 0.0)] < best - 0.02 and best > 0.99
    assert got["agreement"] == pytest.approx(max(f1.values()), abs=1e-4)


def test_too_little_to_judge_keeps_the_model_s_setting():
    fg, dist = _nuclei(shape=(40, 40))  # 4 nuclei
    views = [(fg, dist), (fg[:, ::-1].copy(), dist[:, ::-1].copy())]
    got = post_tune.choose([((fg, dist), views)], mpp=0.5, min_area_px=8, default=DEFAULT)
    assert not got["tuned"] and {k: got[k] for k in DEFAULT} == DEFAULT
    one_view = post_tune.choose([((fg, dist), [(fg, dist)])], mpp=0.5, min_area_px=8,
                                default=DEFAULT)  # fmt: skip
    assert not one_view["tuned"]
    assert not post_tune.choose([], mpp=0.5, min_area_px=8, default=DEFAULT)["tuned"]


torch = pytest.importorskip("torch")


def _tiny(tmp_path, **extra):
    from immunocto._modelfolder import write_model_folder
    from immunocto.segment.learned import NucleusModel
    from immunocto.segment.net import TYPES, NucleusNet

    torch.manual_seed(0)
    net = NucleusNet((4, 8))
    cfg = {"mpp": 0.5, "widths": [4, 8], "types": list(TYPES), **extra}
    tensors = {k: v.numpy() for k, v in net.state_dict().items()}
    folder = write_model_folder(tmp_path / "tiny", tensors, cfg)
    return dataclasses.replace(NucleusModel.load(folder), precision="fp32")


def test_view_maps_are_the_maps_and_each_flip_s_own(tmp_path):
    model = _tiny(tmp_path, tta=4)
    rgb = np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8)
    (fg, _dist, types), views = model.view_maps(rgb, 0.25)  # resampled: the layouts agree
    ref = model.maps(rgb, 0.25)
    np.testing.assert_array_equal(fg, ref[0])
    np.testing.assert_array_equal(types, ref[2])
    assert len(views) == 4 and all(v[0].shape == (90, 70) for v in views)
    # each view = a plain pass of the flipped input, flipped back (at the model's own pixel
    # size and a multiple of the network's stride, so no resampling or padding differs)
    rgb = rgb[:64, :64]
    views = model.view_maps(rgb, 0.5)[1]
    one = dataclasses.replace(model, config={**model.config, "tta": 1})
    plain = one.maps(rgb, 0.5)
    flipped = one.maps(np.ascontiguousarray(rgb[:, ::-1]), 0.5)
    np.testing.assert_allclose(views[0][0], plain[0], atol=1e-5)
    np.testing.assert_allclose(views[1][1], flipped[1][:, ::-1], atol=1e-5)
    assert not np.allclose(views[0][0], views[1][0], atol=1e-4)


def test_segment_tunes_only_when_the_config_asks_and_explicit_settings_win(tmp_path, monkeypatch):
    from immunocto.segment.learned import check_nucleus_config

    seen = []
    real = post_tune.choose

    def spy(*a, **k):
        seen.append(1)
        return {**real(*a, **k), "fg_threshold": 0.99, "tuned": True}

    monkeypatch.setattr(post_tune, "choose", spy)
    rgb = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    fixed = _tiny(tmp_path / "a", tta=4)
    fixed.segment(rgb, 0.5)
    assert not seen  # post_tuning absent: the folder's thresholds
    tuned = dataclasses.replace(fixed, config={**fixed.config, "post_tuning": "views"})
    assert tuned.self_tuning
    lab, _, _ = tuned.segment(rgb, 0.5)
    assert seen and lab.max() <= tuned.segment(rgb, 0.5, fg_threshold=0.2)[0].max()
    seen.clear()
    _lab2, _, _ = tuned.segment(rgb, 0.5, tune=False)
    assert not seen
    one_view = dataclasses.replace(tuned, config={**tuned.config, "tta": 1})
    assert not one_view.self_tuning  # one view cannot disagree with itself
    with pytest.raises(ImmunoctoError, match="'post_tuning' must be 'fixed' or 'views'"):
        check_nucleus_config({**tuned.config, "post_tuning": "auto"}, "m/config.json")


def test_the_slide_backend_tunes_once_per_slide_and_records_it(tmp_path, sim_run):
    """A self-tuning folder (the shipped weights with ``post_tuning: views``): ``prepare``
    picks the slide's settings from its sample windows, every tile then uses them, and the
    slide's stats record them. The shipped folder itself keeps its fixed thresholds."""
    import shutil

    from immunocto.io import open_slide
    from immunocto.segment.base import SlideContext
    from immunocto.segment.learned import LearnedHeBackend, NucleusModel, shipped_model_dir

    assert not NucleusModel.load().self_tuning
    folder = tmp_path / "views"
    shutil.copytree(shipped_model_dir(), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "post_tuning": "views"}))
    backend = LearnedHeBackend(folder)
    with open_slide(sim_run / "slides/sim000/he.ome.tif") as he:
        ctx = SlideContext(slide_id="s", he=he)
        backend.prepare(ctx, [(0, 0, 768, 768)])
        post = backend._post["s"]
        assert set(post) == set(DEFAULT)
        assert ctx.stats["post_fg_threshold"] == post["fg_threshold"]
        assert 0.5 < ctx.stats["post_view_agreement"] <= 1.0
        labels = backend.segment(ctx, 0, 0, 256, 256)[0]
        fixed = LearnedHeBackend()
        fixed.prepare(ctx, [(0, 0, 768, 768)])
        assert fixed._post["s"] == NucleusModel.load().default_post()
    assert labels.shape == (256, 256) and labels.max() > 5
    assert backend.describe()["post_tuning"] == "views"


def test_tune_post_reads_images_up_to_its_budget_and_falls_back_without_views(tmp_path):
    model = _tiny(tmp_path, tta=2, post_tuning="views")
    rgb = np.random.default_rng(4).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    calls = []
    real = model._logits

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    model._logits = counting
    got = model.tune_post([rgb, rgb, rgb], 0.5, max_px=2 * 128 * 128)
    assert len(calls) == 2  # the third image would pass the budget: not even run
    assert set(DEFAULT) <= set(got) and "tuned" in got
    fixed = _tiny(tmp_path / "f", tta=2)
    assert fixed.tune_post([rgb], 0.5) == {**fixed.default_post(), "agreement": pytest.approx(
        float("nan"), nan_ok=True), "nuclei": 0.0, "tuned": False}  # fmt: skip
