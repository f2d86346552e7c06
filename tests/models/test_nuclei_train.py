"""Training the nucleus network: resumable, deterministic, a model folder that loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from immunocto.models.nuclei import NucleusTraining, train_nuclei  # noqa: E402
from immunocto.models.nuclei_data import (  # noqa: E402
    make_tileset,
    read_simulated,
    split_groups,
)
from immunocto.segment.learned import NucleusModel  # noqa: E402


@pytest.fixture(scope="module")
def data(sim_run):
    images = read_simulated(sim_run, window=384)
    assert len(images) == 4 and images[0].types
    parts = split_groups(images, {"val": []})
    train = {"sim": make_tileset("sim", parts["train"][:3], 0.5, 64)}
    return train, {"sim": parts["train"][3:]}


def _settings(steps):
    return NucleusTraining(steps=steps, batch=4, widths=(4, 8), warmup=2, checkpoint_every=2)


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path, data):
    train, _ = data
    whole = train_nuclei(train, tmp_path / "whole", training=_settings(6), device="cpu")
    assert whole["done"] and whole["step"] == 6
    stopped = train_nuclei(
        train, tmp_path / "two", training=_settings(6), stop_after=3, device="cpu"
    )
    assert not stopped["done"] and stopped["step"] == 3
    assert (tmp_path / "two" / "checkpoint.pt").exists()
    assert not (tmp_path / "two" / "config.json").exists()  # no half-made model folder
    torch.manual_seed(123)  # resuming must not depend on the global random state
    resumed = train_nuclei(train, tmp_path / "two", training=_settings(6), device="cpu")
    assert resumed["done"]
    a = NucleusModel.load(tmp_path / "whole").net.state_dict()
    b = NucleusModel.load(tmp_path / "two").net.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_training_starts_from_a_model_folder_and_refuses_one_that_does_not_fit(tmp_path, data):
    train, _ = data
    other_seed = _settings(3)
    other_seed.seed = 5  # so a fresh start (seed 0) begins from other weights than "a" did
    train_nuclei(train, tmp_path / "a", training=other_seed, device="cpu")
    # no steps: the new folder holds exactly the weights it started from
    same = train_nuclei(train, tmp_path / "b", training=_settings(0), init=tmp_path / "a",
                        device="cpu")  # fmt: skip
    assert same["config"]["training"]["init"] == str(tmp_path / "a")
    a = NucleusModel.load(tmp_path / "a").net.state_dict()
    b = NucleusModel.load(tmp_path / "b").net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # two steps on from there: moved, but from those weights (a fresh start is farther away)
    on = train_nuclei(train, tmp_path / "c", training=_settings(2), init=tmp_path / "a",
                      device="cpu")  # fmt: skip
    fresh = train_nuclei(train, tmp_path / "d", training=_settings(2), device="cpu")
    c = NucleusModel.load(tmp_path / "c").net.state_dict()
    d = NucleusModel.load(tmp_path / "d").net.state_dict()
    w = next(k for k in a if k.endswith("weight") and a[k].ndim == 4)
    assert not torch.equal(a[w], c[w])
    assert float((c[w] - a[w]).abs().mean()) < float((d[w] - a[w]).abs().mean())
    assert on["done"] and fresh["done"]
    wide = _settings(1)
    wide.widths = (4, 8, 16)
    with pytest.raises(Exception, match=r"widths \[4, 8\].*same kind"):
        train_nuclei(train, tmp_path / "e", training=wide, init=tmp_path / "a", device="cpu")


def test_validation_tunes_and_records_thresholds(tmp_path, data):
    train, val = data
    out = train_nuclei(
        train, tmp_path / "m", training=_settings(2), validation=val, device="cpu",
        provenance={"command": "test"},
    )  # fmt: skip
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["fg_threshold"] in (0.4, 0.5, 0.6)
    assert cfg["validation"]["images"]["sim"] == sorted({i.group for i in val["sim"]})
    assert cfg["min_score"] in (0.0, 0.7, 0.75, 0.8, 0.85)
    assert 0.0 <= cfg["validation"]["f1_at_best"]["sim"] <= 1.0
    assert cfg["command"] == "test" and cfg["mpp"] == 0.5
    assert out["config"]["seed_threshold"] == cfg["seed_threshold"]
    labels, *_ = NucleusModel.load(tmp_path / "m").segment(val["sim"][0].rgb, 0.325)
    assert labels.shape == val["sim"][0].rgb.shape[:2]


def test_retune_rewrites_thresholds_only_and_refuses_a_left_out_source(tmp_path, data):
    from immunocto._modelfolder import read_model_folder
    from immunocto.models.nuclei import retune_model_folder

    train, val = data
    train_nuclei(train, tmp_path / "m", training=_settings(2), device="cpu",
                 provenance={"excluded_sources": ["gbm40"]})  # fmt: skip
    before, cfg0 = read_model_folder(tmp_path / "m")
    assert cfg0["fg_threshold"] == 0.5 and "validation" not in cfg0  # untuned
    assert cfg0["tta"] == 1 and cfg0["post_tuning"] == "fixed"
    cfg = retune_model_folder(tmp_path / "m", val, tta=4)
    after, cfg1 = read_model_folder(tmp_path / "m")
    assert cfg1["tta"] == 4  # the thresholds were tuned on the 4-view maps users will get
    assert cfg1 == json.loads(json.dumps(cfg)) and "validation" in cfg1
    assert cfg1["validation"]["images"]["sim"] == sorted({i.group for i in val["sim"]})
    assert cfg1["excluded_sources"] == ["gbm40"] and cfg1["history"] == cfg0["history"]
    assert len(cfg1["type_weights"]) == len(cfg1["types"])  # tuned on the typed images
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    with pytest.raises(ValueError, match="trained without gbm40"):
        retune_model_folder(tmp_path / "m", {"gbm40": val["sim"]})


def test_augmentation_keeps_image_and_targets_aligned():
    from immunocto.models.nuclei_aug import geometric

    img = torch.zeros(2, 3, 32, 32)
    img[:, :, 8:14, 20:26] = 200.0
    tgt = (img[:, :1] > 0).float().repeat(1, 7, 1, 1)
    g = torch.Generator().manual_seed(0)
    a, b = geometric(img, tgt, g, 1.3)
    bright = a[:, 0] > 100
    assert bright.any()
    np.testing.assert_array_equal(bright.numpy(), (b[:, 0] > 0.5).numpy())


def test_type_weights_correct_an_under_called_type():
    """A head that gives inflammatory nuclei only 40 % (epithelial 60 %) is fixed by a weight
    tuned on validation images; a type with too few validation nuclei keeps weight 1."""
    from immunocto.models.nuclei import tune_type_weights
    from immunocto.models.nuclei_data import SourceImage
    from immunocto.segment.learned import NucleusModel
    from immunocto.segment.net import TYPES
    from immunocto.validate.metrics import centroids

    inst = np.zeros((320, 320), np.int32)
    types = np.zeros((4, 320, 320), np.float32)
    cls = {}
    k = 0
    for r in range(8):
        for c in range(8):
            k += 1
            y, x = 20 + 40 * r, 20 + 40 * c
            yy, xx = np.ogrid[:320, :320]
            disc = (yy - y) ** 2 + (xx - x) ** 2 <= 8**2
            inst[disc] = k
            t = 0 if k % 2 else 1  # inflammatory / epithelial, 32 each
            t = 3 if k == 64 else t  # one "other": too few to tune
            cls[k] = t
            probs = {0: (0.4, 0.6, 0, 0), 1: (0.05, 0.9, 0.05, 0), 3: (0, 0.5, 0, 0.5)}[t]
            for j, v in enumerate(probs):
                types[j][disc] = v
    fg = (inst > 0).astype(np.float32)
    from scipy import ndimage

    dist = np.zeros_like(fg)
    for i in range(1, k + 1):
        d = ndimage.distance_transform_edt(inst == i)
        dist = np.maximum(dist, d / 8.0)
    img = SourceImage("v_000", "v", np.zeros((320, 320, 3), np.uint8), inst, 0.5, cls)
    model = NucleusModel(None, {"types": list(TYPES), "mpp": 0.5, "widths": [8]})
    out = tune_type_weights(
        model, [(img, (fg, dist, types), centroids(inst)[1])],
        {"fg_threshold": 0.5, "seed_threshold": 0.5, "min_score": 0.0}, min_area_um2=1.0,
    )  # fmt: skip
    w = out["type_weights"]
    assert w[0] > w[1] and w[3] == 1.0 and out["tuned_types"] == ["inflammatory", "epithelial"]
    assert out["type_f1_unweighted"]["inflammatory"] == 0.0
    assert out["type_f1_at_best"]["inflammatory"] == 1.0


def test_a_fluorescence_model_trains_on_the_stain_and_segments_a_run(tmp_path, sim_run):
    import shutil

    from immunocto.config import load_config
    from immunocto.errors import ImmunoctoError
    from immunocto.models.nuclei_data import read_simulated_nuclear
    from immunocto.segment import run_segment, segment_nuclear_stain
    from immunocto.segment.learned import LearnedIfBackend, shipped_model_dir

    images = read_simulated_nuclear(sim_run, window=384)
    img = images[0]
    assert img.rgb.shape[2] == 1 and img.rgb.dtype == np.uint8 and img.types is None
    # the Hoechst, brought into the H&E frame by the true registration, lies on the truth
    stain = img.rgb[..., 0].astype(np.float32)
    assert stain[img.instances > 0].mean() > 2.5 * stain[img.instances == 0].mean()
    parts = split_groups(images, {"val": []})
    train = {"sim": make_tileset("sim", parts["train"][:3], 0.5, 64)}
    t = _settings(3)
    t.input = "nuclear"
    train_nuclei(train, tmp_path / "m", training=t, validation={"sim": parts["train"][3:]},
                 device="cpu")  # fmt: skip
    model = NucleusModel.load(tmp_path / "m")
    assert model.nuclear and model.types == () and model.config["in_channels"] == 1
    assert model.config["kind"] == "if-nuclei" and model.config["bn_adapt"] == 0.0
    raw = stain * 40 + 300  # raw counts: the network scales by the image's percentiles
    labels, types, _ = model.segment(raw, 0.325)
    assert labels.shape == raw.shape and (types == -1).all()
    lab2 = segment_nuclear_stain(raw, mpp=0.325, method="learned", model=tmp_path / "m")
    np.testing.assert_array_equal(lab2, labels)
    with pytest.raises(ImmunoctoError, match="needs a fluorescence model"):
        LearnedIfBackend(shipped_model_dir())  # the H&E network
    # through a run: `if-learned` with this model folder writes a cell table
    run = tmp_path / "run"
    shutil.copytree(sim_run, run)
    cfg = load_config(run)
    params = cfg.segmentation.model_copy(update={"if_nucleus_model": tmp_path / "m"})
    res = run_segment(cfg, backend="if-learned", params=params)[0]
    assert res.status == "segmented" and res.backend == "if-learned" and res.cells.exists()
