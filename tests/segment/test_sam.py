"""SAM plumbing on CPU with a tiny, randomly initialised model (no weights are downloaded)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from helpers import simulate_small  # noqa: E402
from immunocto.config import SamParams, load_config  # noqa: E402
from immunocto.errors import InputFileError  # noqa: E402
from immunocto.io import open_pair  # noqa: E402
from immunocto.register import load_registration, run_register  # noqa: E402
from immunocto.segment.base import SlideContext  # noqa: E402
from immunocto.segment.classical import IfNuclearBackend  # noqa: E402
from immunocto.segment.sam import SamBackend, build_sam, grid_points, resolve_masks  # noqa: E402


@pytest.fixture(scope="module")
def sam_run(tmp_path_factory):
    return simulate_small(tmp_path_factory.mktemp("sam") / "run", size=768, tile=256)


@pytest.fixture(scope="module")
def ctx(sam_run):
    cfg = load_config(sam_run)
    run_register(cfg)
    he, if_ = open_pair(cfg, 0)
    yield SlideContext("sim000", he, if_, load_registration(cfg, "sim000"))
    he.close()
    if_.close()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(
        InputFileError, match="needs its checkpoint.*`checkpoint` .segmentation.sam.checkpoint"
    ):
        build_sam("vit_h")
    with pytest.raises(InputFileError, match="SAM checkpoint not found"):
        build_sam("vit_t", tmp_path / "nope.pth")


def test_checkpoint_round_trip_and_architecture_mismatch(tmp_path):
    torch.manual_seed(0)
    sam = build_sam("vit_t", random_weights=True)
    path = tmp_path / "tiny.pth"
    torch.save(sam.state_dict(), path)
    again = build_sam("vit_t", path)
    for (k, a), (_, b) in zip(sam.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    bad = tmp_path / "bad.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, bad)
    with pytest.raises(InputFileError, match="do not fit SAM vit_t.*--sam-model"):
        build_sam("vit_t", bad)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputFileError, match="not a readable PyTorch checkpoint"):
        build_sam("vit_t", tmp_path / "junk.pth")


def test_grid_is_immunoctos_64_by_64_per_1024_tile():
    assert len(grid_points(1024, 1024, 64)) == 4096
    assert len(grid_points(512, 256, 64)) == 32 * 16
    pts = grid_points(1024, 1024, 64)
    assert pts.min() == 8.0 and pts.max() == 1016.0  # cell centres, 16 px apart


def test_resolve_masks_paints_best_first_and_drops_swallowed():
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    b = np.zeros((10, 10), bool)
    b[3:7, 3:7] = True  # overlaps a by 9 of 16
    c = np.zeros((10, 10), bool)
    c[3:5, 3:5] = True  # inside a: nothing left once a is painted
    labels, scores = resolve_masks([a, b, c], np.array([0.9, 0.8, 0.95]), (10, 10))
    assert labels.max() == 2  # c first, then a (keeps 12 of 16), b keeps 7/16 < half: dropped
    assert scores.tolist() == [0.0, 0.95, 0.9]
    assert (labels == 1).sum() == 4 and (labels == 2).sum() == 12


@pytest.mark.parametrize("mode", ["grid", "guided"])
def test_backend_runs_end_to_end_on_cpu(ctx, mode):
    params = SamParams(
        model="vit_t",
        random_weights=True,
        mode=mode,
        pred_iou_thresh=0.0,
        points_per_side=16,
        points_per_batch=32,
    )
    torch.manual_seed(0)
    be = SamBackend(params, guide=IfNuclearBackend(), min_area_um2=0.0, max_area_um2=1e9)
    be.prepare(ctx, [(0, 0, 256, 256)])
    labels, scores = be.segment(ctx, 128, 128, 256, 256)
    assert labels.shape == (256, 256) and labels.dtype == np.int32
    assert len(scores) == labels.max() + 1
    assert set(np.unique(labels)) <= set(range(labels.max() + 1))
    assert be.decoded_prompts[-1] > 0


def test_guided_decodes_at_least_5x_fewer_prompts_than_grid(ctx):
    grid = SamBackend(SamParams(model="vit_t", random_weights=True, mode="grid"))
    guided = SamBackend(
        SamParams(model="vit_t", random_weights=True, mode="guided"), guide=IfNuclearBackend()
    )
    guided.guide.prepare(ctx, [(0, 0, 768, 768)])
    n_grid = len(grid.prompts(ctx, 0, 0, 768, 768))
    n_guided = len(guided.prompts(ctx, 0, 0, 768, 768))
    assert n_grid == 48 * 48
    assert 0 < n_guided * 5 <= n_grid


def test_two_guides_prompt_every_true_nucleus_once(ctx, sam_run):
    """he+if-nuclear: the H&E network's centroids, then IF nuclei where no prompt is within
    dedupe x the nucleus diameter. Against the simulator's truth on a 768² slide: >= 99 % of
    the true nuclei (centroid inside the window) hold a prompt, with >= 7x fewer prompts than
    the grid; no two prompts of the second guide closer than the dedupe radius to the first's."""
    import tifffile

    from immunocto.config import SegmentParams
    from immunocto.segment.registry import make_backend

    params = SegmentParams(sam=SamParams(model="vit_t", random_weights=True, guide="he+if-nuclear"))
    be = make_backend("sam", params, has_if=True)
    assert [g.name for g in be.guides] == ["he", "if-nuclear"]
    be.prepare_guides(ctx, [(0, 0, 768, 768)])
    pts = be.prompts(ctx, 0, 0, 768, 768)
    truth = tifffile.imread(sam_run / "truth/sim000/nuclei.tif")
    ids = np.unique(truth)[1:]
    ij = np.clip(np.round(pts).astype(int), 0, 767)
    hit = np.isin(ids, truth[ij[:, 1], ij[:, 0]])
    assert hit.mean() >= 0.99
    assert len(pts) * 7 <= len(grid_points(768, 768, 64))
    # the second guide only fills in: without it, fewer prompts, and no prompt lost
    first = SamBackend(
        SamParams(model="vit_t", random_weights=True, guide="he"), guide=be.guides[0]
    )
    assert len(first.prompts(ctx, 0, 0, 768, 768)) <= len(pts)
    # no IF: the H&E network guides alone
    assert [g.name for g in make_backend("sam", params, has_if=False).guides] == ["he"]
