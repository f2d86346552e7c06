from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.spatial import cKDTree

from immunocto.simulate.biology import FINE_INDEX, FINE_TYPES
from immunocto.simulate.cells import HARD_CORE_UM, _greedy_hard_core, generate_objects
from immunocto.simulate.layout import COMPOSITION, REGION_INDEX, REGIONS, make_layout
from immunocto.simulate.params import SimParams


@pytest.fixture(scope="module")
def big_slide():
    params = SimParams(size=8192, seed=4)
    layout = make_layout(params, np.random.default_rng(1))
    return params, layout, generate_objects(layout, params, np.random.default_rng(2))


def test_fine_type_proportions_per_region_are_the_configured_ones(big_slide):
    _, _, obj = big_slide
    tested = 0
    for region, comp in COMPOSITION.items():
        sel = obj.region == REGION_INDEX[region]
        if len(comp) == 1:
            assert np.all(obj.fine[sel] == FINE_INDEX[next(iter(comp))])
            continue
        if sel.sum() < 300:
            continue
        names = list(comp)
        observed = np.array([np.sum(obj.fine[sel] == FINE_INDEX[n]) for n in names])
        assert observed.sum() == sel.sum()  # no type outside the composition
        expected = np.array([comp[n] for n in names]) / sum(comp.values()) * sel.sum()
        assert stats.chisquare(observed, expected).pvalue > 1e-3, region
        tested += 1
    assert tested >= 5


def test_regions_are_those_of_the_layout(big_slide):
    _, layout, obj = big_slide
    assert np.array_equal(layout.regions(obj.x, obj.y), obj.region)
    assert not np.any(obj.region == REGION_INDEX["glass"])


def test_hard_core_holds_and_density_is_tissue_like(big_slide):
    params, _, obj = big_slide
    cells = obj.is_cell
    pts = np.stack([obj.x[cells], obj.y[cells]], 1)
    nn = cKDTree(pts).query(pts, k=2)[0][:, 1] * params.mpp
    assert nn.min() >= min(HARD_CORE_UM.values()) - 1e-3
    lymphoid = obj.region[cells] == REGION_INDEX["lymphoid_core"]
    # packed lymphocytes: nearest neighbour 6-9 um in follicles, sparser in stroma
    assert 5.5 < np.median(nn[lymphoid]) < 9.5
    assert np.median(nn[obj.region[cells] == REGION_INDEX["stroma"]]) > np.median(nn[lymphoid])


def test_lymphocyte_nuclei_are_6_to_8_um_and_tumour_nuclei_larger(big_slide):
    params, _, obj = big_slide
    diameter = 2 * np.sqrt(obj.a * obj.b) * params.mpp
    lymph = np.isin(obj.fine, [FINE_INDEX[t] for t in ("cd4_t", "cd8_t", "treg", "b_cell")])
    assert 6.0 <= np.median(diameter[lymph]) <= 8.0
    assert np.mean((diameter[lymph] > 5.0) & (diameter[lymph] < 9.0)) > 0.9
    tumour = obj.fine == FINE_INDEX["tumour"]
    assert np.median(diameter[tumour]) > 1.3 * np.median(diameter[lymph])


def test_macrophage_morphologies_are_diverse(big_slide):
    _, _, obj = big_slide
    mac = obj.fine == FINE_INDEX["macrophage"]
    assert set(np.unique(obj.morph[mac])) == {0, 1, 2, 3}
    aspect = obj.a[mac] / obj.b[mac]
    assert aspect.max() > 2.5 and np.percentile(aspect, 10) < 1.3  # spindle and round


def test_every_region_and_type_appears(big_slide):
    _, _, obj = big_slide
    assert {REGIONS[r] for r in np.unique(obj.region)} >= {
        "stroma",
        "tumour",
        "lymphoid_core",
        "vessel_wall",
    }
    assert {FINE_TYPES[t] for t in np.unique(obj.fine)} == set(FINE_TYPES)


def test_greedy_hard_core_equals_sequential_adsorption():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 100, (400, 2))
    core = rng.uniform(4, 9, 400)
    prio = rng.random(400)
    fast = _greedy_hard_core(pts, core, prio)
    slow = np.zeros(400, bool)
    for i in np.argsort(prio):
        d = np.hypot(*(pts[slow] - pts[i]).T)
        if not np.any(d < (core[slow] + core[i]) / 2):
            slow[i] = True
    assert np.array_equal(fast, slow)


def test_cells_are_deterministic_for_a_seed():
    params = SimParams(size=2048, seed=9)
    a = generate_objects(
        make_layout(params, np.random.default_rng(1)), params, np.random.default_rng(2)
    )
    b = generate_objects(
        make_layout(params, np.random.default_rng(1)), params, np.random.default_rng(2)
    )
    assert (
        np.array_equal(a.x, b.x)
        and np.array_equal(a.fine, b.fine)
        and np.array_equal(a.theta, b.theta)
    )
