"""PyTorch datasets over the cell database, and the batched augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from immunocto.config import load_config
from immunocto.conventions import CLASSES, CLASSIFIER_IF_MARKERS
from immunocto.db import CropStore, read_index, store_path
from immunocto.db.datasets import (
    ContextDataset,
    CropDataset,
    ShuffledCrops,
    hed_jitter,
    random_flips,
)
from immunocto.io import open_slide


def _rows(run, split):
    df = read_index(run)[0].to_pandas()
    return df[df["split"] == split] if split else df


def test_shuffled_stream_yields_every_row_once_per_epoch(db_run):
    ds = ShuffledCrops(db_run, split="train", batch_size=64, buffer_chunks=2, seed=1)
    expected = _rows(db_run, "train")
    batches = list(ds)
    rows = torch.cat([b["row"] for b in batches]).numpy()
    assert sorted(rows) == sorted(expected["row"]) and len(ds) == len(expected)
    b = batches[0]
    assert b["he"].shape == (64, 3, 64, 64) and b["he"].dtype == torch.uint8
    assert b["mask"].shape == (64, 1, 64, 64) and b["label"].dtype == torch.int64
    # labels are indices into CLASSES and agree with the index
    lookup = expected.set_index("row")["label"]
    assert all(
        CLASSES[int(lab)] == lookup[int(r)] for lab, r in zip(b["label"], b["row"], strict=True)
    )
    # pixels are the stored crop of that row
    store = CropStore.open_readonly(store_path(db_run))
    r = int(b["row"][5])
    np.testing.assert_array_equal(b["he"][5].permute(1, 2, 0).numpy(), store.he[r])
    # same seed + epoch -> same order; a new epoch -> a new order
    again = torch.cat(
        [
            x["row"]
            for x in ShuffledCrops(db_run, split="train", batch_size=64, buffer_chunks=2, seed=1)
        ]
    )
    np.testing.assert_array_equal(again.numpy(), rows)
    ds.set_epoch(1)
    assert not np.array_equal(torch.cat([x["row"] for x in ds]).numpy(), rows)


def test_dataloader_workers_split_the_stream_with_if(db_run):
    ds = ShuffledCrops(db_run, split=None, batch_size=128, with_if=True)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    seen = []
    for b in loader:
        assert (
            b["if"].shape[1:] == (len(CLASSIFIER_IF_MARKERS), 64, 64)
            and b["if"].dtype == torch.uint16
        )
        seen.append(b["row"])
    rows = torch.cat(seen).numpy()
    assert len(rows) == len(np.unique(rows)) == len(_rows(db_run, None))


def test_crop_dataset_random_access_matches_the_store(db_run):
    ds = CropDataset(db_run, split="val", with_if=True)
    store = CropStore.open_readonly(store_path(db_run))
    picks = [7, 0, 3]
    items = ds.__getitems__(picks)
    for k, i in enumerate(picks):
        row = int(ds.rows[i])
        assert int(items[k]["row"]) == row
        np.testing.assert_array_equal(items[k]["he"].permute(1, 2, 0).numpy(), store.he[row])
        np.testing.assert_array_equal(items[k]["mask"][0].numpy(), store.mask[row])
        np.testing.assert_array_equal(items[k]["if"].numpy(), store.if_[row].astype(np.float32))
    batch = next(iter(DataLoader(ds, batch_size=16, shuffle=True)))
    assert batch["he"].shape == (16, 3, 64, 64)
    only = CropDataset(db_run, classes=("cd8_t",))
    assert (
        len(only) == (_rows(db_run, None)["label"] == "cd8_t").sum() and int(only[0]["label"]) == 0
    )


def test_context_windows_come_from_the_slide_in_worker_processes(db_run):
    ds = ContextDataset(db_run, split="train", size=256, cache_tiles=4)
    cfg = load_config(db_run)
    item = ds[3]
    sid, x, y = ds.items[3][:3]
    slide = next(s for s in cfg.slides if s.id == sid)
    with open_slide(cfg.resolve(slide.he), mpp=slide.mpp) as he:
        direct = he.read_region(round(x) - 128, round(y) - 128, 256, 256)
    np.testing.assert_array_equal(item["context"].permute(1, 2, 0).numpy(), direct)
    loader = DataLoader(ds, batch_size=32, num_workers=2)
    total = 0
    for b in loader:
        assert b["context"].shape[1:] == (3, 256, 256)
        total += len(b["label"])
    assert total == len(ds)


def test_hed_jitter_is_identity_at_zero_and_perturbs_stains_otherwise():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(30, 250, (4, 3, 16, 16), dtype=np.uint8))
    same = hed_jitter(images, sigma=0.0, bias=0.0)
    assert same.dtype == torch.float32 and same.shape == images.shape
    assert (same - images.float()).abs().max() < 0.01
    g = torch.Generator().manual_seed(0)
    moved = hed_jitter(images, sigma=0.1, bias=0.05, generator=g)
    diff = (moved - images.float()).abs().mean(dim=(1, 2, 3))
    assert (diff > 1.0).all() and moved.min() >= 0 and moved.max() <= 255
    # each image gets its own draw
    assert not torch.allclose(diff[0], diff[1])


def test_random_flips_keep_image_mask_and_if_aligned():
    g = torch.Generator().manual_seed(0)
    image = torch.arange(8 * 3 * 8 * 8, dtype=torch.float32).reshape(8, 3, 8, 8)
    mask = image[:, :1].clone()
    ifs = image.clone() * 2
    a, m, f = random_flips(image, mask, ifs, generator=g)
    np.testing.assert_array_equal(a[:, :1].numpy(), m.numpy())
    np.testing.assert_array_equal((a * 2).numpy(), f.numpy())
    changed = [(a[i] != image[i]).any().item() for i in range(8)]
    assert sum(changed) >= 4  # 7 in 8 draws change the image
    # every output is one of the 8 symmetries of its input
    for i in range(8):
        options = [image[i].rot90(k, (-2, -1)) for k in range(4)]
        options += [o.flip(-1) for o in options]
        assert any(torch.equal(a[i], o) for o in options)


def test_empty_or_missing_database_is_a_clear_error(tmp_path):
    from immunocto.errors import ImmunoctoError

    with pytest.raises(ImmunoctoError, match="build-db"):
        ShuffledCrops(tmp_path)
