"""Slide-adaptive batch-norm statistics of the nucleus network (AdaBN)."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from immunocto._modelfolder import write_model_folder
from immunocto.errors import ImmunoctoError
from immunocto.segment.learned import LearnedHeBackend, NucleusModel

torch = pytest.importorskip("torch")


def _folder(tmp_path, **config):
    from immunocto.segment.net import TYPES, NucleusNet

    torch.manual_seed(0)
    net = NucleusNet((4, 8))
    with torch.no_grad():  # trained statistics far from any image's, so a shift is visible
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(0.0)
                m.running_var.fill_(4.0)
    cfg = {"mpp": 0.5, "widths": [4, 8], "types": list(TYPES), **config}
    tensors = {k: v.numpy() for k, v in net.state_dict().items()}
    return write_model_folder(tmp_path / "m", tensors, cfg)


def _tissue(shape=(512, 512), seed=0):
    """Pink-purple 'tissue' (well above the glass optical density) with some texture."""
    rng = np.random.default_rng(seed)
    base = np.array([170, 90, 160], np.float32)
    return np.clip(base + rng.normal(0, 25, (*shape, 3)), 0, 255).astype(np.uint8)


def _first_bn(model):
    return next(m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_statistics_move_toward_the_image_by_alpha(tmp_path):
    from immunocto.segment import bn_adapt
    from immunocto.segment.net import normalise_rgb

    model = dataclasses.replace(NucleusModel.load(_folder(tmp_path)), precision="fp32")
    rgb = _tissue()
    full = model.adapted([rgb], 1.0, alpha=1.0)
    half = model.adapted([rgb], 1.0, alpha=0.5)
    assert full is not model and full.adaptation["alpha"] == 1.0
    # alpha 1: the first layer's statistics are the image's own (its conv output, averaged
    # over the four 512 px windows of the 1024 px model-resolution image)
    wins = bn_adapt.tissue_windows(model._resampled(rgb, 1.0))
    assert len(wins) == 4 and full.adaptation["windows"] == 4
    with torch.no_grad():
        conv = [model.net.down[0][0](normalise_rgb(w)).mean(dim=(0, 2, 3)) for w in wins]
    np.testing.assert_allclose(
        _first_bn(full).running_mean.numpy(), torch.stack(conv).mean(0).numpy(), atol=1e-5
    )
    # alpha 0.5: half-way between the trained and the image's statistics
    trained = _first_bn(model).running_mean.numpy()
    np.testing.assert_allclose(
        _first_bn(half).running_mean.numpy(),
        0.5 * trained + 0.5 * _first_bn(full).running_mean.numpy(),
        atol=1e-5,
    )
    assert np.all(_first_bn(model).running_mean.numpy() == 0.0)  # the loaded model is untouched
    # the adapted network really computes something else
    assert not np.allclose(full.maps(rgb, 1.0)[0], model.maps(rgb, 1.0)[0])
    assert model.adapted([rgb], 1.0, alpha=0.0) is model


def test_bf16_statistics_stay_close_to_fp32(tmp_path):
    """The probe's bf16 convolutions (used where the forward pass is bf16) move each layer's
    statistics by a small fraction of its standard deviation only."""
    from immunocto.segment import bn_adapt
    from immunocto.segment.net import normalise_rgb

    model = NucleusModel.load(_folder(tmp_path))
    wins = [normalise_rgb(w) for w in bn_adapt.tissue_windows(model._resampled(_tissue(), 1.0))]
    fp32 = bn_adapt.batchnorm_statistics(model.net, wins)
    bf16 = bn_adapt.batchnorm_statistics(model.net, wins, bf16=True)
    assert fp32.keys() == bf16.keys() and len(fp32) == 6  # 3 blocks x 2
    for name, (mean, var) in fp32.items():
        sd = np.sqrt(var) + 1e-3
        assert np.max(np.abs(bf16[name][0] - mean) / sd) < 0.05, name
        assert np.max(np.abs(bf16[name][1] / var - 1)) < 0.05, name
        assert not np.allclose(mean, 0.0)  # real statistics, not the reset buffers


@pytest.mark.parametrize("bf16", [False, True])
def test_statistics_do_not_depend_on_the_thread_count(bf16):
    """A slide's adapted network, and so its nuclei, must be the same on 1 core as on 2 (one
    process vs workers, or a client under Dask's OMP_NUM_THREADS=1): bit-identical statistics
    (the shipped network, a 256 px window; without the probe's fixed thread count this fails)."""
    from immunocto.segment import bn_adapt
    from immunocto.segment.net import normalise_rgb

    model = NucleusModel.load()
    window = torch.from_numpy(_tissue((256, 256), seed=3)).permute(2, 0, 1)[None].float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bn_adapt.batchnorm_statistics(model.net, [normalise_rgb(window)], bf16=bf16)
        torch.set_num_threads(2)
        two = bn_adapt.batchnorm_statistics(model.net, [normalise_rgb(window)], bf16=bf16)
    finally:
        torch.set_num_threads(before)
    assert one.keys() == two.keys() and len(one) == 14
    for name in one:
        assert np.array_equal(one[name][0], two[name][0]), name
        assert np.array_equal(one[name][1], two[name][1]), name


def test_glass_and_small_images_are_not_adapted(tmp_path):
    model = NucleusModel.load(_folder(tmp_path, bn_adapt=0.5))
    glass = np.full((1024, 1024, 3), 232, np.uint8)
    assert model.adapted([glass], 0.5) is model
    assert model.adapted([_tissue((200, 200))], 0.5) is model  # 40k px < bn_adapt_min_px
    assert model.adapted([_tissue((300, 300))], 0.5) is not model  # 90k px
    with pytest.raises(ImmunoctoError, match="bn_adapt must be between 0 and 1"):
        model.adapted([_tissue()], 0.5, alpha=1.5)


def test_segment_adapts_only_when_the_config_asks(tmp_path):
    rgb = _tissue((600, 600))
    off = NucleusModel.load(_folder(tmp_path))  # no bn_adapt key: older folders stay as they were
    on = NucleusModel.load(_folder(tmp_path / "b", bn_adapt=1.0))
    direct = on.adapted([rgb], 0.5).segment(rgb, 0.5, adapt=False)
    np.testing.assert_array_equal(on.segment(rgb, 0.5)[0], direct[0])
    np.testing.assert_array_equal(off.segment(rgb, 0.5)[0], on.segment(rgb, 0.5, adapt=False)[0])


def test_shipped_model_adapts_by_half():
    model = NucleusModel.load()
    assert model.config["bn_adapt"] == 0.5


def test_slide_backend_adapts_once_per_slide_and_ships_the_state_to_workers(tmp_path, sim_run):
    from immunocto.io import open_slide
    from immunocto.segment.base import SlideContext
    from immunocto.segment.tiled import segment_slide

    folder = _folder(tmp_path, bn_adapt=0.5, fg_threshold=0.5, seed_threshold=0.5)
    be = LearnedHeBackend(folder)
    with open_slide(sim_run / "slides/sim000/he.ome.tif") as he:
        ctx = SlideContext("sim000", he)
        a = segment_slide(ctx, be, tmp_path / "a.zarr", tile=256, halo=32)
        assert ctx.stats["bn_adapt_windows"] >= 1
        assert set(be._bn_states) == {"sim000"}
        # a worker gets the backend pickled: the states travel, the cached models do not
        clone = pickle.loads(pickle.dumps(be))
        assert clone._models == {} and set(clone._bn_states) == {"sim000"}
        labels = be.segment(ctx, 0, 0, 256, 256)[0]
        again = clone.segment(ctx, 0, 0, 256, 256)[0]
        np.testing.assert_array_equal(labels, again)
        # the adapted network is what tiles use, not the trained one
        rgb = he.read_region(256, 256, 256, 256)[..., :3]
        used = be._model("sim000")
        assert used.adaptation is not None
        assert not np.allclose(
            used.maps(rgb, ctx.mpp)[0], NucleusModel.load(folder).maps(rgb, ctx.mpp)[0]
        )
        # the tile size does not change what the slide-level adaptation sees
        ctx2 = SlideContext("sim000", he)
        be2 = LearnedHeBackend(folder)
        segment_slide(ctx2, be2, tmp_path / "b.zarr", tile=512, halo=32)
    assert ctx2.stats["bn_adapt_windows"] == ctx.stats["bn_adapt_windows"]
    for k, v in be._bn_states["sim000"].items():
        np.testing.assert_array_equal(v, be2._bn_states["sim000"][k])
    assert len(a["cell_id"]) >= 1


def test_types_come_from_the_trained_network(tmp_path):
    from immunocto.segment.nucleus_post import type_per_object

    folder = _folder(tmp_path, bn_adapt=1.0, fg_threshold=0.3, seed_threshold=0.3)
    model = NucleusModel.load(folder)
    rgb = _tissue((600, 600), seed=2)
    adapted = model.adapted([rgb], 0.5)
    assert adapted.base is model and adapted.adapted([rgb], 0.5) is adapted
    labels, tidx, _ = model.segment(rgb, 0.5)
    assert labels.max() > 0
    np.testing.assert_array_equal(tidx, type_per_object(labels, model.maps(rgb, 0.5)[2]))
    # the labels are the adapted network's, and without types nothing is typed
    np.testing.assert_array_equal(labels, adapted.segment(rgb, 0.5, adapt=False)[0])
    bare = model.segment(rgb, 0.5, with_types=False)
    np.testing.assert_array_equal(bare[0], labels)
    assert np.all(bare[1] == -1) and len(bare[1]) == labels.max() + 1


def test_types_of_an_adapted_model_come_from_one_view_of_the_trained_network(tmp_path, monkeypatch):
    """Four views of the adapted network find the nuclei; the type pass runs the trained
    network on one view (the same held-out type F1 at a quarter of the cost)."""
    from dataclasses import replace

    from immunocto.segment.learned import TYPE_VIEWS
    from immunocto.segment.nucleus_post import type_probs_per_object

    folder = _folder(tmp_path, bn_adapt=1.0, fg_threshold=0.3, seed_threshold=0.3, tta=4)
    model = NucleusModel.load(folder)
    rgb = _tissue((600, 600), seed=2)
    passes = []
    maps = NucleusModel.maps

    def spy(self, image, mpp, **kw):
        passes.append((self.net is model.net, int(self.config.get("tta", 1))))
        return maps(self, image, mpp, **kw)

    monkeypatch.setattr(NucleusModel, "maps", spy)
    labels, probs, _ = model.segment_objects(rgb, 0.5)
    assert TYPE_VIEWS == 1 and labels.max() > 0
    # the adapted network (another net) with 4 views, then the trained one with 1
    assert passes == [(False, 4), (True, 1)]
    one = replace(model, config={**model.config, "tta": 1})
    np.testing.assert_allclose(probs, type_probs_per_object(labels, maps(one, rgb, 0.5)[2]))
    np.testing.assert_allclose(probs[1:].sum(axis=1), 1.0)
