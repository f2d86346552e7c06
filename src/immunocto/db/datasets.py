"""PyTorch datasets over the cell database (needs the ``train`` extra: torch).

- :class:`ShuffledCrops` — for training: whole chunks in shuffled order through a shuffle
  buffer (chunk reads run at ~74k crops/s; random single-crop reads through zarr at ~1.3k/s),
  split across DataLoader workers, a new order each epoch (:meth:`set_epoch`). It yields whole
  batches (use ``DataLoader(ds, batch_size=None)``): per-sample Python work would cap the
  stream at a few thousand crops per second.
- :class:`CropDataset` — map-style random access, for evaluation and inspection; batched fetches
  (``__getitems__``) read each touched chunk once.
- :class:`ContextDataset` — 256 x 256 H&E windows around cells, read straight from the slides
  through a small tile cache; files are opened lazily in each worker process.
- :func:`hed_jitter`, :func:`random_flips` — batched augmentations on tensors (run them on the
  GPU when there is one).

Samples are dicts: ``he`` uint8 ``(3, 64, 64)``, ``mask`` uint8 ``(1, 64, 64)``, optionally
``if`` ``(C, 64, 64)`` raw 16-bit counts (uint16 in batches; call ``.float()`` where the model
runs), ``label`` int64 (index into ``classes``), ``row``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from immunocto.conventions import CLASSES
from immunocto.db.store import CHUNK, CropStore, read_index, store_path
from immunocto.db.windows import SlideWindows
from immunocto.errors import ImmunoctoError


def _select(
    run: str | os.PathLike[str],
    split: str | None,
    classes: tuple[str, ...],
    label_column: str | None = None,
):
    """Rows (sorted), label indices and the manifest of the stored crops to use.

    Labels are the index's ``label`` unless ``label_column`` names a column of the cell
    tables (e.g. ``review_label``), joined on (slide_id, cell_id); rows whose label is not one
    of ``classes`` are left out.
    """
    index, manifest = read_index(run)
    if index.num_rows == 0:
        raise ImmunoctoError(f"{run}: the cell database is empty; run `immunocto build-db` first")
    if split is not None:
        index = index.filter(pc.equal(index.column("split"), split))
    if label_column is not None:
        import pandas as pd
        import pyarrow.parquet as pq

        df = index.select(["row", "slide_id", "cell_id"]).to_pandas()
        parts = []
        for sid in df["slide_id"].unique():
            path = Path(run) / "cells" / f"{sid}.parquet"
            if not path.exists() or label_column not in pq.read_schema(path).names:
                raise ImmunoctoError(f"{path}: no {label_column} column to train on")
            parts.append(
                pq.read_table(path, columns=["cell_id", label_column])
                .to_pandas()
                .assign(slide_id=sid)
            )
        joined = df.merge(pd.concat(parts), on=["slide_id", "cell_id"], how="left")
        labels_text = joined[label_column].astype(object).to_numpy()
        rows_all = joined["row"].to_numpy()
    else:
        labels_text = index.column("label").to_numpy(zero_copy_only=False)
        rows_all = index.column("row").to_numpy()
    keep = np.isin(labels_text, list(classes))
    rows = rows_all[keep]
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.array([lookup[v] for v in labels_text[keep]], np.int64)
    order = np.argsort(rows)
    return rows[order], labels[order], manifest


def _sample(
    he: np.ndarray, mask: np.ndarray, if_: np.ndarray | None, label: int, row: int
) -> dict[str, Any]:
    out = {
        "he": torch.from_numpy(np.ascontiguousarray(np.moveaxis(he, -1, 0))),
        "mask": torch.from_numpy(np.ascontiguousarray(mask[None])),
        "label": torch.tensor(label, dtype=torch.int64),
        "row": torch.tensor(row, dtype=torch.int64),
    }
    if if_ is not None:
        out["if"] = torch.from_numpy(if_.astype(np.float32))
    return out


class _StorePerProcess:
    """The crop store of ``self.run``, opened once per process (DataLoader workers fork: a
    zarr handle must not cross). :meth:`_opened` checks what a dataset needs of it."""

    run: Path
    rows: np.ndarray
    _store: CropStore | None = None
    _pid: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def store(self) -> CropStore:
        if self._store is None or self._pid != os.getpid():
            self._store = CropStore.open_readonly(store_path(self.run))
            self._pid = os.getpid()
            self._opened(self._store)
        return self._store

    def _opened(self, store: CropStore) -> None:
        """Called once per process after the store opens."""


class ShuffledCrops(_StorePerProcess, IterableDataset):
    """Training stream over stored crops (see the module docstring).

    Parameters
    ----------
    run : path-like
        The run folder holding ``crops.zarr`` and ``crops.parquet``.
    split : {'train', 'val', 'test'}, optional
    classes : tuple of str
        Labels kept, and the meaning of ``label`` (its index).
    with_if : bool
        Also yield the IF crops.
    buffer_chunks : int
        Chunks mixed in the shuffle buffer (8 x 256 crops by default).
    label_column : str, optional
        Take labels from this cell-table column (e.g. ``review_label``) instead of the index.
    with_context : bool
        Also yield ``context`` ``(B, 3, 64, 64)`` uint8 from ``RUN/context.zarr`` (the 256 px
        window around each cell, see :mod:`immunocto.models.context`).
    batch_size : int
        Crops per yielded batch (the last batch of a buffer may be smaller).
    """

    def __init__(
        self,
        run: str | os.PathLike[str],
        *,
        split: str | None = "train",
        classes: tuple[str, ...] = CLASSES,
        with_if: bool = False,
        shuffle: bool = True,
        buffer_chunks: int = 8,
        batch_size: int = 256,
        seed: int = 0,
        label_column: str | None = None,
        with_context: bool = False,
    ) -> None:
        self.run = Path(run)
        self.batch_size = batch_size
        self.with_context = with_context
        self.rows, self.labels, _ = _select(run, split, classes, label_column)
        self.classes = classes
        self.with_if = with_if
        self.shuffle = shuffle
        self.buffer_chunks = buffer_chunks
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle order for each epoch (same for a given seed and epoch)."""
        self.epoch = epoch

    def _opened(self, store: CropStore) -> None:
        if self.with_if and store.if_ is None:
            raise ImmunoctoError(f"{self.run}: the database has no IF crops; rebuild with IF")
        self._context = None
        if self.with_context:
            import zarr

            ctx_root = self.run / "context.zarr"
            if not ctx_root.exists():
                raise ImmunoctoError(f"{ctx_root}: no context windows; build them first")
            self._context = zarr.open_group(str(ctx_root), mode="r")["context"]

    def __iter__(self):
        store = self.store()
        chunk_of = self.rows // CHUNK
        chunks = np.unique(chunk_of)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle:
            chunks = rng.permutation(chunks)
        info = get_worker_info()
        if info is not None:
            chunks = chunks[info.id :: info.num_workers]
            rng = np.random.default_rng([self.seed, self.epoch, info.id])
        for w in range(0, len(chunks), self.buffer_chunks):
            he, mask, ifs, ctxs, labels, rows = [], [], [], [], [], []
            for ch in chunks[w : w + self.buffer_chunks]:
                lo, hi = int(ch) * CHUNK, min((int(ch) + 1) * CHUNK, store.rows)
                sel = np.flatnonzero(chunk_of == ch)
                local = self.rows[sel] - lo
                he.append(np.asarray(store.he[lo:hi])[local])
                mask.append(np.asarray(store.mask[lo:hi])[local])
                if self.with_if:
                    ifs.append(np.asarray(store.if_[lo:hi])[local])
                if self.with_context:
                    ctxs.append(np.asarray(self._context[lo:hi])[local])
                labels.append(self.labels[sel])
                rows.append(self.rows[sel])
            he_a, mask_a = np.concatenate(he), np.concatenate(mask)
            if_a = np.concatenate(ifs) if self.with_if else None
            ctx_a = np.concatenate(ctxs) if self.with_context else None
            lab_a, row_a = np.concatenate(labels), np.concatenate(rows)
            order = rng.permutation(len(lab_a)) if self.shuffle else np.arange(len(lab_a))
            for b in range(0, len(order), self.batch_size):
                pick = order[b : b + self.batch_size]
                out = _batch(
                    he_a[pick],
                    mask_a[pick],
                    None if if_a is None else if_a[pick],
                    lab_a[pick],
                    row_a[pick],
                )
                if ctx_a is not None:
                    out["context"] = torch.from_numpy(
                        np.ascontiguousarray(np.moveaxis(ctx_a[pick], -1, 1))
                    )
                yield out


def _batch(
    he: np.ndarray, mask: np.ndarray, if_: np.ndarray | None, labels: np.ndarray, rows: np.ndarray
) -> dict[str, Any]:
    """One batch as tensors: ``he`` ``(B, 3, 64, 64)`` uint8, ``mask`` ``(B, 1, 64, 64)`` uint8,
    ``if`` ``(B, C, 64, 64)`` uint16, ``label``/``row`` ``(B,)`` int64."""
    out = {
        "he": torch.from_numpy(np.ascontiguousarray(np.moveaxis(he, -1, 1))),
        "mask": torch.from_numpy(np.ascontiguousarray(mask[:, None])),
        "label": torch.from_numpy(labels.astype(np.int64)),
        "row": torch.from_numpy(rows.astype(np.int64)),
    }
    if if_ is not None:
        out["if"] = torch.from_numpy(np.ascontiguousarray(if_))  # raw uint16 counts
    return out


class CropDataset(_StorePerProcess, Dataset):
    """Random access to stored crops (same samples as :class:`ShuffledCrops`)."""

    def __init__(
        self,
        run: str | os.PathLike[str],
        *,
        split: str | None = None,
        classes: tuple[str, ...] = CLASSES,
        with_if: bool = False,
        label_column: str | None = None,
    ) -> None:
        self.run = Path(run)
        self.rows, self.labels, _ = _select(run, split, classes, label_column)
        self.classes = classes
        self.with_if = with_if

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        store = self.store()
        idx = np.asarray(indices, np.int64)
        rows = self.rows[idx]
        order = np.argsort(rows)
        he = store.he.get_orthogonal_selection((rows[order],))
        mask = store.mask.get_orthogonal_selection((rows[order],))
        ifs = store.if_.get_orthogonal_selection((rows[order],)) if self.with_if else None
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return [
            _sample(
                he[back[k]],
                mask[back[k]],
                None if ifs is None else ifs[back[k]],
                int(self.labels[i]),
                int(self.rows[i]),
            )
            for k, i in enumerate(idx)
        ]


class ContextDataset(Dataset):
    """``size`` x ``size`` H&E windows centred on stored cells, read from the slides.

    The slide files of the run are opened lazily in each worker process; 512 px tiles are
    kept in an LRU cache of ``cache_tiles`` entries, so neighbouring cells share reads
    (:class:`immunocto.db.windows.SlideWindows`).
    """

    def __init__(
        self,
        config: str | os.PathLike[str],
        *,
        split: str | None = None,
        classes: tuple[str, ...] = CLASSES,
        size: int = 256,
        cache_tiles: int = 64,
    ) -> None:
        from immunocto.config import load_config

        cfg = load_config(config)
        index, _ = read_index(cfg.run_dir)
        if split is not None:
            index = index.filter(pc.equal(index.column("split"), split))
        keep = np.isin(index.column("label").to_numpy(zero_copy_only=False), list(classes))
        table = index.to_pandas()[keep]
        self.windows = SlideWindows(
            {s.id: (cfg.resolve(s.he), s.mpp) for s in cfg.slides},
            size=size,
            cache_tiles=cache_tiles,
        )
        self.items = list(
            zip(
                table["slide_id"], table["x"], table["y"], table["label"], table["row"], strict=True
            )
        )
        self.classes = classes
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def window(self, sid: str, x: float, y: float) -> np.ndarray:
        """``(size, size, 3)`` uint8 window centred on ``(x, y)`` (level-0 px)."""
        return self.windows.window(sid, x, y)

    def close(self) -> None:
        """Close the slides this process opened (also done when the dataset is collected)."""
        self.windows.close()

    def __getitem__(self, i: int) -> dict[str, Any]:
        sid, x, y, label, row = self.items[i]
        img = self.window(sid, x, y)
        return {
            "context": torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, -1, 0))),
            "label": torch.tensor(self.classes.index(label), dtype=torch.int64),
            "row": torch.tensor(int(row), dtype=torch.int64),
        }


# ----------------------------------------------------------------------------- augmentations

_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def hed_jitter(
    images: torch.Tensor,
    *,
    sigma: float = 0.05,
    bias: float = 0.02,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stain augmentation in hematoxylin-eosin-DAB optical-density space, batched.

    Each image's H, E and D concentrations are scaled by ``1 + N(0, sigma)`` and shifted by
    ``N(0, bias)``. ``images``: ``(B, 3, H, W)`` uint8 or float in [0, 255]; returns float32 in
    [0, 255] of the same shape.
    """
    x = images.float()
    od = -torch.log((x + 1.0) / 256.0)
    m_in = _HED_FROM_RGB.to(x.device)
    m_out = _RGB_FROM_HED.to(x.device)
    hed = torch.einsum("bchw,cd->bdhw", od, m_in)
    b = x.shape[0]
    alpha = 1.0 + sigma * torch.randn(b, 3, 1, 1, generator=generator, device="cpu").to(x.device)
    beta = bias * torch.randn(b, 3, 1, 1, generator=generator, device="cpu").to(x.device)
    hed = hed * alpha + beta
    od2 = torch.einsum("bdhw,dc->bchw", hed, m_out)
    return (256.0 * torch.exp(-od2) - 1.0).clamp(0.0, 255.0)


def random_flips(
    *tensors: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, ...]:
    """The same random horizontal/vertical flips and 90° rotations applied to every tensor
    ``(B, C, H, W)`` of a batch (image, mask, IF stay aligned)."""
    b = tensors[0].shape[0]
    flip_h = torch.rand(b, generator=generator) < 0.5
    flip_v = torch.rand(b, generator=generator) < 0.5
    rot = torch.rand(b, generator=generator) < 0.5
    out = []
    for t in tensors:
        t = t.clone()
        t[flip_h] = t[flip_h].flip(-1)
        t[flip_v] = t[flip_v].flip(-2)
        t[rot] = t[rot].transpose(-1, -2)
        out.append(t)
    return tuple(out)
