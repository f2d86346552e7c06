"""Each planted artifact does what it claims, measured on the rendered images.

Runs are paired: the same seed with every artifact off, then with one artifact on, so a
difference can only come from that artifact.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from scipy import ndimage, stats
from scipy.spatial import cKDTree

from helpers import measure_in_if, read_if, simulate_small
from immunocto.simulate.params import ARTIFACTS
from immunocto.simulate.transform import TruthTransform

SIZE = 768


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(name: str | None = None, strength: float = 0.0):
        key = (name, strength)
        if key not in cache:
            out = tmp_path_factory.mktemp("art") / f"{name}-{strength}"
            overrides = {name: strength} if name else {}
            simulate_small(out, size=SIZE, seed=21, artifacts="none", artifact_overrides=overrides)
            cache[key] = out
        return cache[key]

    return get


def truth(run):
    return pq.read_table(run / "truth/sim000/cells.parquet").to_pandas()


def test_none_plants_nothing(runs):
    df = truth(runs())
    for name in ARTIFACTS:
        assert not df[f"art_{name}"].any(), name
    reg = json.loads((runs() / "truth/sim000/registration.json").read_text())
    np.testing.assert_allclose(reg["affine"], np.eye(3))
    assert np.abs(reg["warp"]["amp_px"]).max() == 0 and np.abs(reg["fov"]["shift_px"]).max() == 0


def hoechst_centroids(run, predicted_uv):
    """Background-subtracted Hoechst centroid in a 12 px disc around each predicted point."""
    data, names = read_if(run)
    hoechst = data[names.index("Hoechst")].astype(float)
    hoechst = np.clip(hoechst - np.median(hoechst), 0, None)
    r = 12
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = dx**2 + dy**2 <= r * r
    out = []
    for u, v in predicted_uv:
        iu, iv = round(u), round(v)
        win = hoechst[iv - r : iv + r + 1, iu - r : iu + r + 1] * disc
        w = win.sum()
        out.append((iu + (win * dx).sum() / w, iv + (win * dy).sum() / w))
    return np.array(out)


@pytest.mark.parametrize("strength", [0.0, 2.5])
def test_if_nucleus_sits_where_registration_json_says(runs, strength):
    run = runs("misregistration", strength)
    df = truth(run)
    nuclei = tifffile.imread(run / "truth/sim000/nuclei.tif")
    ids = df["cell_id"].to_numpy()
    he = np.array(ndimage.center_of_mass(nuclei > 0, nuclei, ids))[:, ::-1]  # (x, y)
    pts = df[["x", "y"]].to_numpy()
    nn = cKDTree(pts).query(pts, k=2)[0][:, 1]
    small = (df["nucleus_major_um"] < 9.0).to_numpy()
    transform = TruthTransform.from_dict(
        json.loads((run / "truth/sim000/registration.json").read_text())
    )
    u, v = transform.he_to_if(he[:, 0], he[:, 1])
    inside = (u > 20) & (u < SIZE - 20) & (v > 20) & (v < SIZE - 20)
    sel = small & (nn > 32) & inside
    assert sel.sum() >= 8
    predicted = np.stack([u[sel], v[sel]], 1)
    measured = hoechst_centroids(run, predicted)
    error = np.hypot(*(measured - predicted).T)
    shift = np.hypot(*(predicted - he[sel]).T)
    assert np.median(error) < 1.0
    if strength > 0:
        assert np.median(shift) > 5.0  # the test is not trivial: the IF really moved
        naive = np.hypot(*(hoechst_centroids(run, he[sel]) - predicted).T)
        assert np.median(naive) > 3 * np.median(error)
        assert df["art_misregistration"].any()


def test_stain_gradient_attenuates_measured_signal(runs):
    run = runs("stain_gradient", 2.0)
    df = truth(run)
    cd45 = measure_in_if(run, "CD45")
    immune = df[df["expr_CD45"] > 0.3]
    ratio = np.array([cd45[i] - 180 for i in immune["cell_id"]]) / immune["expr_CD45"].to_numpy()
    rho = stats.spearmanr(ratio, immune["stain_attenuation"]).statistic
    assert rho > 0.5
    assert df["stain_attenuation"].min() < 0.5 and df["art_stain_gradient"].any()


def test_weak_t_cells_have_faint_cd3e(runs):
    run = runs("weak_staining", 3.0)
    df = truth(run)
    cd3 = measure_in_if(run, "CD3e")
    t = df[df["fine_type"].isin(["cd4_t", "cd8_t", "treg"])]
    weak = t[t["art_weak_staining"]]
    normal = t[~t["art_weak_staining"]]
    assert len(weak) >= 5 and len(normal) >= 5
    med = lambda rows: np.median([cd3[i] for i in rows["cell_id"]]) - 180  # noqa: E731
    assert med(weak) < 0.4 * med(normal)
    assert not df.loc[~df["fine_type"].isin(["cd4_t", "cd8_t", "treg"]), "art_weak_staining"].any()


def test_weak_lineage_dims_b_cells_and_macrophages_only(runs):
    run = runs("weak_lineage", 5.0)
    df = truth(run)
    for cell_type, marker in (("macrophage", "CD68"), ("b_cell", "CD20")):
        signal = measure_in_if(run, marker)
        rows = df[df["fine_type"] == cell_type]
        weak, normal = rows[rows["art_weak_lineage"]], rows[~rows["art_weak_lineage"]]
        assert len(weak) >= 3 and len(normal) >= 1, cell_type
        med = lambda r: np.median([signal[i] for i in r["cell_id"]]) - 180  # noqa: E731, B023
        assert med(weak) < 0.75 * med(normal), cell_type
    others = ~df["fine_type"].isin(["macrophage", "b_cell"])
    assert not df.loc[others, "art_weak_lineage"].any()
    assert not df["art_weak_staining"].any()  # the T-cell artifact is its own


def test_weak_stain_preset_and_old_presets_unchanged():
    from immunocto.simulate.params import artifact_strengths

    for preset, value in (("none", 0.0), ("default", 1.0), ("harsh", 2.5)):
        strengths = artifact_strengths(preset)
        assert strengths.pop("weak_lineage") == 0.0  # added later: old slides stay the same
        assert set(strengths.values()) == {value}
    weak = artifact_strengths("weak-stain")
    assert weak["weak_lineage"] > 1 and weak["weak_staining"] > 1
    assert weak["spillover"] == 1.0  # the rest as in default
    assert artifact_strengths("weak-stain", {"weak_lineage": 0.5})["weak_lineage"] == 0.5


def test_nonspecific_binding_lights_up_non_immune_cells(runs):
    run = runs("nonspecific", 8.0)
    df = truth(run)
    cd45 = measure_in_if(run, "CD45")
    other = df[df["fine_type"].isin(["tumour", "fibroblast", "endothelial", "smooth_muscle"])]
    hit = other[other["art_nonspecific"]]
    assert len(hit) >= 5
    med = lambda rows: np.median([cd45[i] for i in rows["cell_id"]]) - 180  # noqa: E731
    assert med(hit) > 3 * med(other[~other["art_nonspecific"]])
    assert (hit["expr_CD45"] < 0.1).all()  # biology says CD45-negative


def test_cd4_macrophages(runs):
    run = runs("cd4_macrophage", 1.5)
    df = truth(run)
    cd4 = measure_in_if(run, "CD4")
    mac = df[df["fine_type"] == "macrophage"]
    flagged, plain = mac[mac["art_cd4_macrophage"]], mac[~mac["art_cd4_macrophage"]]
    assert len(flagged) >= 3 and len(plain) >= 3
    med = lambda rows: np.median([cd4[i] for i in rows["cell_id"]]) - 180  # noqa: E731
    assert med(flagged) > 3 * med(plain)
    assert (
        df.loc[df["art_cd4_macrophage"], "class"].eq("macrophage").all()
    )  # truth stays macrophage


def test_spillover_moves_cd4_signal_into_cd8a(runs):
    base, spill = runs(), runs("spillover", 2.5)
    df = truth(spill)
    before, after = measure_in_if(base, "CD8a"), measure_in_if(spill, "CD8a")
    gain = lambda rows: np.median([after[i] - before[i] for i in rows["cell_id"]])  # noqa: E731
    cd4_t = df[df["fine_type"] == "cd4_t"]
    b = df[df["fine_type"] == "b_cell"]
    assert gain(cd4_t) > 30 and gain(cd4_t) > 5 * max(gain(b), 1.0)
    assert (
        df.loc[df["art_spillover"], "fine_type"]
        .isin(["cd4_t", "treg", "cd8_t", "macrophage"])
        .mean()
        > 0.8
    )
    # the H&E is untouched by an IF artifact
    he_a = (base / "slides/sim000/he.ome.tif").read_bytes()
    assert he_a == (spill / "slides/sim000/he.ome.tif").read_bytes()


def test_out_of_focus_blurs_the_he_only_inside_its_patches(runs):
    base, blur = runs(), runs("out_of_focus", 2.0)
    a = tifffile.imread(base / "slides/sim000/he.ome.tif").astype(float).mean(axis=2)
    b = tifffile.imread(blur / "slides/sim000/he.ome.tif").astype(float).mean(axis=2)
    record = json.loads((blur / "truth/sim000/artifacts.json").read_text())["out_of_focus"]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    near = np.zeros((SIZE, SIZE), bool)
    core = np.zeros((SIZE, SIZE), bool)
    for cx, cy, r in record["patches_px"]:
        d = np.hypot(xx - cx, yy - cy)
        near |= d < r + 24
        core |= d < 0.5 * r
    assert core.any()
    assert np.array_equal(a[~near], b[~near])
    lap = lambda img: ndimage.laplace(img)[core].var()  # noqa: E731
    assert lap(b) < 0.4 * lap(a)
    df = truth(blur)
    assert df["art_out_of_focus"].any()
    # IF is scanned separately: unchanged
    assert np.array_equal(read_if(base)[0], read_if(blur)[0])
