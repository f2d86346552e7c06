"""The learned H&E nucleus model: post-processing, targets, model folders, the shipped model."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from immunocto._modelfolder import read_model_folder, write_model_folder
from immunocto.errors import ImmunoctoError, InputFileError
from immunocto.io import open_slide
from immunocto.segment import segment_he
from immunocto.segment.learned import NucleusModel, shipped_model_dir
from immunocto.segment.nucleus_post import drop_objects, instances_from_maps, type_per_object
from immunocto.validate import centroids, detection_by_distance

torch = pytest.importorskip("torch")


def test_watershed_splits_touching_nuclei_and_keeps_faint_ones():
    fg = np.zeros((80, 120))
    dist = np.zeros((80, 120))
    for cy, cx, r in [(40, 30, 12), (40, 52, 12), (40, 100, 3)]:  # two touch; one small
        rr, cc = disk((cy, cx), r, shape=fg.shape)
        fg[rr, cc] = 0.9
        d = 1 - np.hypot(rr - cy, cc - cx) / r
        dist[rr, cc] = np.maximum(dist[rr, cc], d)
    rr, cc = disk((40, 100), 3, shape=fg.shape)
    dist[rr, cc] = 0.2  # the small one has no seed above the threshold
    labels = instances_from_maps(fg, dist, seed_threshold=0.5, min_area_px=5)
    assert labels.max() == 3
    assert labels[40, 30] != labels[40, 52]
    assert labels[40, 100] > 0
    # below the area floor, the small one goes
    assert instances_from_maps(fg, dist, seed_threshold=0.5, min_area_px=40).max() == 2


def test_faint_objects_go_under_the_score_floor():
    fg = np.zeros((40, 80))
    dist = np.zeros((40, 80))
    for cx, p in [(20, 0.95), (60, 0.65)]:  # a confident nucleus and a faint blob
        rr, cc = disk((20, cx), 8, shape=fg.shape)
        fg[rr, cc] = p
        dist[rr, cc] = 1 - np.hypot(rr - 20, cc - cx) / 8
    both = instances_from_maps(fg, dist, min_area_px=5)
    assert both.max() == 2
    kept = instances_from_maps(fg, dist, min_area_px=5, min_score=0.8)
    assert kept.max() == 1 and kept[20, 20] == 1 and kept[20, 60] == 0
    # renumbered 1..m, same pixels for what is kept
    np.testing.assert_array_equal(kept > 0, both == both[20, 20])
    cut = drop_objects(both, fg, min_score=0.99)
    assert cut.max() == 0 and cut.dtype == both.dtype


def test_type_per_object_takes_the_mean_probability():
    labels = np.array([[1, 1, 2, 2]])
    probs = np.array([[[0.9, 0.2, 0.1, 0.1]], [[0.1, 0.8, 0.9, 0.9]]])
    np.testing.assert_array_equal(type_per_object(labels, probs), [-1, 0, 1])


def test_targets_give_each_touching_nucleus_its_own_peak():
    from immunocto.models.nuclei_data import nucleus_targets

    inst = np.zeros((40, 60), np.int32)
    inst[10:30, 5:25] = 1
    inst[10:30, 25:45] = 2  # shares an edge with 1
    t = nucleus_targets(inst, {1: 0, 2: 2})
    assert t[0].sum() == 800
    assert t[1][inst == 1].max() == pytest.approx(1.0) and t[1][inst == 2].max() == pytest.approx(
        1.0
    )
    assert t[1][20, 15] > 0.8 and t[1][20, 35] > 0.8
    assert t[1][20, 24] < 0.2 and t[1][20, 25] < 0.2  # the shared edge is a valley
    assert t[2][20, 15] == 1 and t[4][20, 35] == 1 and t[2][20, 35] == 0
    assert np.all(t[6] == 1)  # every pixel typed or background
    assert np.all(nucleus_targets(inst, None)[6] == 0)  # no types: nothing counts


def _tiny_folder(tmp_path, widths=(4, 8)):
    from immunocto.segment.net import TYPES, NucleusNet

    torch.manual_seed(0)
    net = NucleusNet(widths)
    cfg = {"mpp": 0.5, "widths": list(widths), "types": list(TYPES)}
    tensors = {k: v.numpy() for k, v in net.state_dict().items()}
    return write_model_folder(tmp_path / "tiny", tensors, cfg), net


@pytest.mark.parametrize(
    ("shape", "mpp"), [((100, 130), 0.25), ((61, 77), 0.5), ((1200, 300), 0.5)]
)
def test_any_input_size_and_pixel_size_gives_labels_on_the_input_grid(tmp_path, shape, mpp):
    folder, _ = _tiny_folder(tmp_path)
    model = NucleusModel.load(folder)
    rgb = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    fg, dist, types = model.maps(rgb, mpp)
    assert fg.shape == shape and dist.shape == shape and types.shape == (4, *shape)
    np.testing.assert_allclose(types.sum(axis=0), 1.0, atol=1e-5)
    labels, tidx, scores = model.segment(rgb, mpp)
    assert labels.shape == shape and labels.dtype == np.int32
    assert len(tidx) == len(scores) == labels.max() + 1


@pytest.mark.parametrize("shape", [(600, 700), (300, 1700)])
def test_tiled_inference_equals_one_pass(tmp_path, monkeypatch, shape):
    """Inputs past TILE run in overlapping tiles; their centres equal one whole pass."""
    import dataclasses

    from immunocto.segment import learned

    monkeypatch.setattr(learned, "TILE", 256)
    folder, _ = _tiny_folder(tmp_path)
    model = dataclasses.replace(NucleusModel.load(folder), precision="fp32")
    h, w = shape
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 3, h, w)).astype(np.float32))
    tiled = model._run(x)
    with torch.inference_mode():
        whole = model.net.eval()(
            torch.nn.functional.pad(x, (0, -w % 4, 0, -h % 4), mode="replicate")
        )
    whole = whole[..., :h, :w]
    # receptive field of the 2-level tiny net is far below the overlap
    # (away from the image border, where padding differs)
    np.testing.assert_allclose(
        tiled.numpy()[..., :-16, :-16], whole.numpy()[..., :-16, :-16], atol=1e-4
    )


@pytest.mark.parametrize("n", [100, 768, 769, 1000, 1248, 2000, 5001])
def test_tile_plan_covers_the_input_with_the_fewest_equal_tiles(n):
    from immunocto.segment.learned import tile_plan

    edge, starts = tile_plan(n, 768, 48, 8)
    starts = np.asarray(starts)
    assert edge <= 768 and starts[0] == 0 and n <= starts[-1] + edge < n + 8
    # neighbours overlap by at least twice the border each keeps out of its centre
    assert np.all(starts[:-1] + edge - 48 >= starts[1:] + 48)
    assert len(starts) == (1 if n <= 768 else -(-(n - 96) // (768 - 96)))
    assert len(starts) == 1 or (edge % 8 == 0 and np.all(starts % 8 == 0))


def test_maps_do_not_depend_on_the_thread_count():
    """One process runs the network on all its threads, workers on one: the shipped models'
    maps must be the same either way (to float rounding: a vectorised loop's tail falls on
    other pixels when the rows are split otherwise) and so must the nuclei."""
    from immunocto.segment.learned import SHIPPED_IF

    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)
    stain = (rng.random((300, 300)) * 4000).astype(np.uint16)
    n = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            he = NucleusModel.load(None)
            fl = NucleusModel.load(shipped_model_dir(SHIPPED_IF))
            labels = (he.segment(rgb, 0.25)[0], fl.segment(stain, 0.25)[0])
            out[threads] = (*he.maps(rgb, 0.25), *fl.maps(stain, 0.25), *labels)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(out[1][:-2], out[2][:-2], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for a, b in zip(out[1][-2:], out[2][-2:], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("k", range(8))
def test_each_test_time_view_is_undone_exactly(k):
    from immunocto.segment.learned import _dihedral

    t = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    view = _dihedral(t, k)
    assert view.shape[-2:] == ((7, 5) if k & 4 else (5, 7))
    assert torch.equal(_dihedral(view, k, inverse=True), t)
    assert k == 0 or not torch.equal(view, t) or view.shape != t.shape


def test_test_time_views_average_the_flipped_passes(tmp_path):
    """``tta`` 2 = the mean of the plain pass and the left-right flipped one (flipped back);
    8 views make the maps symmetric under every flip of the input."""
    import dataclasses

    folder, _ = _tiny_folder(tmp_path)
    base = dataclasses.replace(NucleusModel.load(folder), precision="fp32")
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 3, 64, 96)).astype(np.float32))
    with torch.inference_mode():
        plain = base.net.eval()(x)
        flipped = base.net(x.flip(-1)).flip(-1)
    two = dataclasses.replace(base, config={**base.config, "tta": 2})._run(x)
    np.testing.assert_allclose(two.numpy(), ((plain + flipped) / 2).numpy(), atol=1e-5)
    assert not np.allclose(two.numpy(), plain.numpy(), atol=1e-3)
    eight = dataclasses.replace(base, config={**base.config, "tta": 8})
    sq = x[..., :64, :64]
    np.testing.assert_allclose(
        eight._run(sq.flip(-2)).flip(-2).numpy(), eight._run(sq).numpy(), atol=1e-4
    )
    with pytest.raises(ImmunoctoError, match="'tta' must be one of 1, 2, 4, 8"):
        from immunocto.segment.learned import check_nucleus_config

        check_nucleus_config({**base.config, "tta": 3}, "m/config.json")


def test_model_folder_errors_name_the_file(tmp_path):
    with pytest.raises(InputFileError, match=r"config\.json: missing"):
        NucleusModel.load(tmp_path)
    folder, _ = _tiny_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["widths"] = [8, 16]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImmunoctoError, match=r"model\.safetensors does not fit"):
        NucleusModel.load(folder)
    (folder / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(InputFileError, match="not a readable safetensors"):
        NucleusModel.load(folder)


def test_model_folder_round_trip_is_exact(tmp_path):
    folder, net = _tiny_folder(tmp_path)
    tensors, cfg = read_model_folder(folder)
    assert cfg["widths"] == [4, 8]
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(tensors[k], v.numpy())
    assert not any(p.suffix in (".pt", ".pkl") for p in folder.iterdir())


def test_model_digest_follows_weights_and_thresholds_not_provenance(tmp_path):
    from immunocto.segment.stage import nucleus_model_digest

    folder, _ = _tiny_folder(tmp_path)
    d0 = nucleus_model_digest(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "command": "another note"}))
    assert nucleus_model_digest(folder) == d0  # provenance does not re-segment
    (folder / "config.json").write_text(json.dumps({**cfg, "min_score": 0.8}))
    assert nucleus_model_digest(folder) != d0  # a re-tuned threshold does
    (folder / "config.json").write_text(json.dumps({**cfg, "bn_adapt": 0.3}))
    assert nucleus_model_digest(folder) != d0  # and so does the slide adaptation
    (folder / "config.json").write_text(json.dumps({**cfg, "post_tuning": "views"}))
    assert nucleus_model_digest(folder) != d0  # and choosing thresholds per slide
    assert nucleus_model_digest(tmp_path / "nowhere") == "missing"


# --- the shipped model ---------------------------------------------------------------------


def test_shipped_model_is_in_the_package_and_small():
    folder = shipped_model_dir()
    cfg = json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors").stat().st_size < 8e6
    for key in ("mpp", "types", "command", "data", "validation", "fg_threshold"):
        assert key in cfg, key
    # no test image of the held-out split was trained on
    from immunocto.models.nuclei_data import HELD_OUT

    for src, parts in HELD_OUT.items():
        used = set(cfg["data"].get(src, {}).get("train_images", []))
        assert not used & set(parts["test"] + parts["val"]), src


def test_blank_glass_has_no_nuclei():
    assert segment_he(np.zeros((256, 256, 3), np.uint8) + 230, mpp=0.25).max() == 0


def _sim_tile(sim_run, size=512):
    with open_slide(sim_run / "slides/sim000/he.ome.tif") as he:
        rgb = he.read_region(0, 0, size, size)
    truth = tifffile.imread(sim_run / "truth/sim000/nuclei.tif")[:size, :size]
    return rgb, truth


def _f1(truth, pred, mpp, radius=1.5):
    _, t = centroids(truth)
    _, p = centroids(pred)
    return detection_by_distance(t * mpp, p * mpp, radius=radius)["all"]


def test_shipped_model_finds_the_simulated_nuclei_with_types(sim_run):
    rgb, truth = _sim_tile(sim_run)
    labels, types = segment_he(rgb, mpp=0.325, return_types=True)
    det = _f1(truth, labels, 0.325, radius=4.0)
    assert det["recall"] > 0.9 and det["precision"] > 0.85
    assert set(types) == set(range(1, labels.max() + 1))
    assert set(types.values()) <= {"inflammatory", "epithelial", "stromal", "other"}
    assert len(set(types.values())) >= 2


def test_a_20x_input_gives_the_same_nuclei(sim_run):
    from skimage.transform import resize

    rgb, truth = _sim_tile(sim_run)
    half = np.rint(resize(rgb, (256, 256), anti_aliasing=True, preserve_range=True)).astype(
        np.uint8
    )
    labels = segment_he(half, mpp=0.65)
    assert labels.shape == (256, 256)
    assert _f1(truth[::2, ::2], labels, 0.65, radius=4.0)["f1"] > 0.85


def test_stain_perturbation_costs_little(sim_run):
    from immunocto.models.nuclei_aug import hed_perturb

    rgb, truth = _sim_tile(sim_run)
    base = _f1(truth, segment_he(rgb, mpp=0.325), 0.325)["f1"]
    for f in [(0.65, 1, 1), (1.35, 1, 1), (1, 0.65, 1), (1, 1.35, 1)]:
        f1 = _f1(truth, segment_he(hed_perturb(rgb, f), mpp=0.325), 0.325)["f1"]
        assert f1 >= base - 0.05, (f, base, f1)


def test_classical_method_is_still_there(sim_run):
    rgb, truth = _sim_tile(sim_run)
    pred = segment_he(rgb, mpp=0.325, method="classical")
    det = _f1(truth, pred, 0.325, radius=4.0)
    assert det["recall"] > 0.85 and det["precision"] > 0.75
    with pytest.raises(ValueError, match="return_types=True` needs method='learned'"):
        segment_he(rgb, mpp=0.325, method="classical", return_types=True)
    with pytest.raises(ValueError, match="`method` must be"):
        segment_he(rgb, mpp=0.325, method="magic")


def test_without_torch_the_error_names_the_extra(tmp_path, monkeypatch):
    folder, _ = _tiny_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(ImmunoctoError, match=r"pip install 'immunocto\[train\]'"):
        segment_he(np.zeros((64, 64, 3), np.uint8), mpp=0.25, model=folder)


def test_bf16_inference_matches_fp32_and_the_setting_is_checked(monkeypatch):
    """The shipped model in bf16 (the fast CPU path) gives the fp32 maps within 2e-2 and
    nearly the same nuclei; a wrong precision name is a clear error."""
    import dataclasses

    from immunocto.errors import ImmunoctoError
    from immunocto.segment.learned import inference_precision

    model = NucleusModel.load(None)
    rng = np.random.default_rng(0)
    rgb = np.full((256, 256, 3), 225, np.uint8)
    yy, xx = np.mgrid[0:256, 0:256]
    for cy, cx in rng.uniform(20, 236, (25, 2)):
        rgb[np.hypot(yy - cy, xx - cx) < 14] = (70, 40, 120)  # hematoxylin-dark discs
    fp32 = dataclasses.replace(model, precision="fp32")
    bf16 = dataclasses.replace(model, precision="bf16")
    fg32, _, _ = fp32.maps(rgb, 0.25)
    fg16, _, _ = bf16.maps(rgb, 0.25)
    assert np.abs(fg32 - fg16).max() < 2e-2
    n32, n16 = fp32.segment(rgb, 0.25)[0].max(), bf16.segment(rgb, 0.25)[0].max()
    assert n32 > 10 and abs(int(n32) - int(n16)) <= 1
    monkeypatch.setenv("IMMUNOCTO_NUCLEUS_PRECISION", "fp32")
    assert inference_precision() == "fp32"
    monkeypatch.setenv("IMMUNOCTO_NUCLEUS_PRECISION", "half")
    with pytest.raises(ImmunoctoError, match="IMMUNOCTO_NUCLEUS_PRECISION"):
        inference_precision()
