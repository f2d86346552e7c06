"""Training data for the nucleus network: real and simulated H&E with instance masks.

Every source is brought to the network's resolution (``model_mpp``) once, with its targets,
and cut into square base tiles; batches are drawn from those tiles (random crops, rotation,
scale, stain and blur augmentation in :mod:`immunocto.models.nuclei_aug`).

Targets per tile, ``(7, S, S)`` float16: ``foreground``, ``distance`` (normalised distance to
the nucleus edge, 1 at the centre), one-hot ``types`` (:data:`immunocto.segment.net.TYPES`)
and ``type_known`` (0 where a source has no types, e.g. GBM40).

Sources
-------
- CoNSeP (``consep_train.npz`` + its nuclei CSV): 40x (0.25 um/px), typed; patches are grouped
  by their source image (``train_<k>_<patch>``), and splits are whole source images.
- GBM40 (``gbm40_he.npz``): 40x, another organ and lab, instances only.
- The built-in simulator: a run folder of ``immunocto simulate`` (0.325 um/px), typed by fine
  cell type.

For the fluorescence nucleus network (``input: nuclear``) the image of a :class:`SourceImage`
is the nuclear stain scaled to 0-255 (``(h, w, 1)`` uint8, :func:`nuclear_to_uint8` with the
slide's own percentiles), and its sources are:

- the simulator's Hoechst channel, resampled into the H&E frame through the slide's *true*
  registration (``truth/<slide>/registration.json``) so it lies on ``truth/nuclei.tif``;
- DSB 2018 (``dsb2018_nuclei_img.tif`` + mask, cultured cells, no pixel size: read at
  :data:`DSB_MPP`): split into a training quarter, a tuning quarter and a held-out test half.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.transform import resize

from immunocto.errors import InputFileError
from immunocto.segment.learned import nuclear_scale, nuclear_to_uint8
from immunocto.segment.net import TYPES

N_TARGETS = 3 + len(TYPES)  # foreground, distance, types..., type_known
#: CoNSeP's merged type codes -> our type names.
CONSEP_TYPES = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "stromal"}
#: Simulator fine cell types -> nucleus type.
SIM_TYPES = {
    "tumour": "epithelial",
    "fibroblast": "stromal",
    "endothelial": "stromal",
    "smooth_muscle": "stromal",
    "plasma": "inflammatory",
    "neutrophil": "inflammatory",
    "cd4_t": "inflammatory",
    "treg": "inflammatory",
    "cd8_t": "inflammatory",
    "b_cell": "inflammatory",
    "macrophage": "inflammatory",
}
CONSEP_MPP = 0.25
#: DSB 2018 images carry no pixel size; cultured-cell nuclei are ~10 µm (~24 px here).
DSB_MPP = 0.42
GBM40_MPP = 0.25


@dataclass
class SourceImage:
    """One annotated image at its own resolution.

    ``instances`` (h, w) int, 0 = background; ``types`` maps instance id -> type index into
    ``TYPES`` (``None``: the source has no types).
    """

    name: str
    group: str  # the source image it came from (splits never cut a group)
    rgb: np.ndarray
    instances: np.ndarray
    mpp: float
    types: dict[int, int] | None = None


@dataclass
class TileSet:
    """Base tiles of one source at the model's resolution."""

    name: str
    images: np.ndarray  # (n, S, S, 3) uint8
    targets: np.ndarray  # (n, N_TARGETS, S, S) float16
    groups: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def nucleus_targets(instances: np.ndarray, types: dict[int, int] | None) -> np.ndarray:
    """``(N_TARGETS, h, w)`` float32 targets of an instance map at its own resolution.

    The distance channel is each pixel's Euclidean distance to the nearest pixel outside
    its own nucleus (touching nuclei count as outside), divided by that nucleus' maximum.
    """
    inst = np.asarray(instances).astype(np.int64)
    h, w = inst.shape
    out = np.zeros((N_TARGETS, h, w), np.float32)
    fg = inst > 0
    out[0] = fg
    # pixels touching another nucleus are cut out so each nucleus gets its own distance peak
    border = np.zeros_like(fg)
    down = (inst[:-1] != inst[1:]) & (inst[:-1] > 0) & (inst[1:] > 0)
    right = (inst[:, :-1] != inst[:, 1:]) & (inst[:, :-1] > 0) & (inst[:, 1:] > 0)
    border[:-1] |= down
    border[1:] |= down
    border[:, :-1] |= right
    border[:, 1:] |= right
    edt = ndi.distance_transform_edt(fg & ~border).astype(np.float32)
    n = int(inst.max())
    if n:
        peak = ndi.maximum(edt, inst, index=np.arange(n + 1))
        peak = np.maximum(np.asarray(peak, np.float32), 1.0)
        out[1] = np.where(fg, np.clip(edt / peak[inst], 0.0, 1.0), 0.0)
        # pixels of the cut-out border keep a small distance so the nucleus stays one piece
        out[1][fg & ~(edt > 0)] = 0.05
    if types is not None and n:
        lookup = np.full(n + 1, -1, np.int64)
        for k, t in types.items():
            if 0 < k <= n:
                lookup[k] = t
        t_img = lookup[inst]
        for i in range(len(TYPES)):
            out[2 + i] = t_img == i
        out[2 + len(TYPES)] = (t_img >= 0) | ~fg
    return out


def to_model_resolution(img: SourceImage, model_mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb (H, W, 3) uint8, targets (N_TARGETS, H, W) float32)`` resampled to
    ``model_mpp`` (anti-aliased; targets are computed at the native resolution first)."""
    tg = nucleus_targets(img.instances, img.types)
    factor = img.mpp / model_mpp
    h, w = img.instances.shape
    H, W = max(1, round(h * factor)), max(1, round(w * factor))
    if (H, W) == (h, w):
        return img.rgb.astype(np.uint8), tg
    rgb = resize(img.rgb, (H, W), order=1, anti_aliasing=factor < 1, preserve_range=True)
    tgr = resize(tg.transpose(1, 2, 0), (H, W), order=1, anti_aliasing=factor < 1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), tgr.transpose(2, 0, 1).astype(np.float32)


def cut_tiles(rgb: np.ndarray, targets: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square ``size`` tiles covering the image (the last row/column shifted inward; images
    smaller than ``size`` reflect-padded)."""
    h, w = rgb.shape[:2]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        targets = np.pad(targets, ((0, 0), (0, ph), (0, pw)), mode="reflect")
        h, w = rgb.shape[:2]
    ys = sorted({*range(0, h - size + 1, size), h - size})
    xs = sorted({*range(0, w - size + 1, size), w - size})
    imgs = [rgb[y : y + size, x : x + size] for y in ys for x in xs]
    tgts = [targets[:, y : y + size, x : x + size] for y in ys for x in xs]
    return np.stack(imgs), np.stack(tgts)


def make_tileset(name: str, images: list[SourceImage], model_mpp: float, size: int) -> TileSet:
    """Bring ``images`` to ``model_mpp`` and cut them into ``size`` tiles."""
    ims, tgs, groups = [], [], []
    for img in images:
        rgb, tg = to_model_resolution(img, model_mpp)
        a, b = cut_tiles(rgb, tg, size)
        ims.append(a)
        tgs.append(b.astype(np.float16))
        groups += [img.group] * len(a)
    if not ims:
        raise ValueError(f"source {name!r} has no images for this split")
    return TileSet(name, np.concatenate(ims), np.concatenate(tgs), groups)


# --- readers -------------------------------------------------------------------------------


def _need(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: {what} not found; check the path")
    return path


def consep_group(name: str) -> str:
    """``train_10_003`` -> ``train_10`` (the CoNSeP source image of a patch)."""
    m = re.match(r"^(.*)_\d+$", str(name))
    return m.group(1) if m else str(name)


def read_consep(npz: Path, csv: Path | None = None) -> list[SourceImage]:
    """CoNSeP patches (``images``, ``instances``, ``names``) with types from the nuclei CSV
    (``patch_index, instance_id, type``; codes :data:`CONSEP_TYPES`)."""
    data = np.load(_need(npz, "CoNSeP npz"))
    for key in ("images", "instances", "names"):
        if key not in data.files:
            raise InputFileError(f"{npz}: no array {key!r} (expected images, instances, names)")
    types: dict[int, dict[int, int]] = {}
    if csv is not None:
        import pandas as pd

        table = pd.read_csv(_need(csv, "CoNSeP nuclei CSV"))
        missing = {"patch_index", "instance_id", "type"} - set(table.columns)
        if missing:
            raise InputFileError(f"{csv}: missing columns {sorted(missing)}")
        t_index = {code: TYPES.index(name) for code, name in CONSEP_TYPES.items()}
        for p, i, t in table[["patch_index", "instance_id", "type"]].itertuples(index=False):
            types.setdefault(int(p), {})[int(i)] = t_index.get(int(t), TYPES.index("other"))
    rgbs, instances = data["images"], data["instances"]  # an npz decompresses on each access
    return [
        SourceImage(
            name=str(n),
            group=consep_group(str(n)),
            rgb=rgbs[k],
            instances=instances[k],
            mpp=CONSEP_MPP,
            types=types.get(k, {}) if csv is not None else None,
        )
        for k, n in enumerate(data["names"])
    ]


def read_gbm40(npz: Path) -> list[SourceImage]:
    """GBM40 tiles (``images``, ``instances``, ``names``); no types."""
    data = np.load(_need(npz, "GBM40 npz"))
    for key in ("images", "instances"):
        if key not in data.files:
            raise InputFileError(f"{npz}: no array {key!r} (expected images, instances, names)")
    names = (
        data["names"] if "names" in data.files else [f"gbm_{k}" for k in range(len(data["images"]))]
    )
    rgbs, instances = data["images"], data["instances"]  # an npz decompresses on each access
    return [
        SourceImage(str(n), str(n), rgbs[k], instances[k], GBM40_MPP, None)
        for k, n in enumerate(names)
    ]


def _simulated_slides(run: Path):
    """``(config, slide, truth folder)`` of each slide of a simulator run folder."""
    from immunocto.config import load_config

    run = Path(run)
    cfg = load_config(_need(run / "immunocto.yaml", "simulator run config"))
    for slide in cfg.slides:
        truth = cfg.run_dir / "truth" / slide.id
        for name in ("nuclei.tif", "registration.json"):
            if not (truth / name).is_file():
                raise InputFileError(f"{truth}: no {name} (is {run} a simulator run folder?)")
        yield cfg, slide, truth


def _windows(
    slide_id: str, image: np.ndarray, nuclei: np.ndarray, mpp: float, types, window: int
) -> list[SourceImage]:
    """Non-overlapping ``window`` squares of a slide's image and its truth nuclei."""
    h, w = nuclei.shape
    wy, wx = min(window, h), min(window, w)
    return [
        SourceImage(
            f"{slide_id}_{y}_{x}",
            slide_id,
            image[y : y + wy, x : x + wx],
            nuclei[y : y + wy, x : x + wx],
            mpp,
            types,
        )
        for y in range(0, h - wy + 1, wy)
        for x in range(0, w - wx + 1, wx)
    ]


def read_simulated(run: Path, *, window: int = 1024) -> list[SourceImage]:
    """Windows of every slide of a simulator run folder (H&E level 0 + ``truth/nuclei.tif``),
    typed by the truth table's fine cell type."""
    import pyarrow.parquet as pq
    import tifffile

    out = []
    for cfg, slide, truth in _simulated_slides(run):
        he = tifffile.imread(cfg.resolve(slide.he), level=0)
        nuclei = tifffile.imread(truth / "nuclei.tif")
        table = pq.read_table(truth / "cells.parquet", columns=["cell_id", "fine_type"]).to_pandas()
        types = {
            int(c): TYPES.index(SIM_TYPES.get(str(f), "other"))
            for c, f in zip(table["cell_id"], table["fine_type"], strict=True)
        }
        out += _windows(slide.id, he, nuclei, float(slide.mpp), types, window)
    return out


def read_simulated_nuclear(run: Path, *, window: int = 1024) -> list[SourceImage]:
    """Windows of every slide of a simulator run folder: the IF nuclear stain (Hoechst) in the
    H&E frame through the true registration, scaled by the slide's percentiles, on
    ``truth/nuclei.tif``. No types."""
    import json

    import tifffile

    from immunocto.io import open_slide
    from immunocto.simulate.transform import TruthTransform

    out = []
    for cfg, slide, truth in _simulated_slides(run):
        nuclei = tifffile.imread(truth / "nuclei.tif")
        transform = TruthTransform.from_dict(json.loads((truth / "registration.json").read_text()))
        with open_slide(cfg.resolve(slide.if_)) as fl:
            stain = fl.read_region(0, 0, fl.width, fl.height, channels=["Hoechst"])[0]
        h, w = nuclei.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        u, v = transform.he_to_if(xx.ravel(), yy.ravel())
        he_frame = ndi.map_coordinates(
            stain.astype(np.float32), [v.reshape(h, w), u.reshape(h, w)], order=1, mode="nearest"
        )
        image = np.rint(nuclear_to_uint8(he_frame, nuclear_scale([he_frame]))).astype(np.uint8)
        out += _windows(slide.id, image, nuclei, float(slide.mpp), None, window)
    return out


def read_dsb(image: Path, mask: Path) -> list[SourceImage]:
    """The DSB 2018 image in three parts (groups ``dsb_train``: top-left quarter, ``dsb_val``:
    top-right quarter, ``dsb_test``: the bottom half), scaled by the whole image's percentiles
    and read at :data:`DSB_MPP`."""
    import tifffile

    img = tifffile.imread(_need(image, "DSB image")).astype(np.float32)
    inst = tifffile.imread(_need(mask, "DSB mask"))
    if img.ndim != 2 or img.shape != inst.shape:
        raise InputFileError(f"{image}: expected one 2-D image the shape of {mask}")
    scaled = np.rint(nuclear_to_uint8(img, nuclear_scale([img]))).astype(np.uint8)
    h, w = img.shape
    parts = {
        "dsb_train": (slice(0, h // 2), slice(0, w // 2)),
        "dsb_val": (slice(0, h // 2), slice(w // 2, w)),
        "dsb_test": (slice(h // 2, h), slice(0, w)),
    }
    return [
        SourceImage(name, name, scaled[ys, xs], inst[ys, xs], DSB_MPP)
        for name, (ys, xs) in parts.items()
    ]


def split_groups(
    images: list[SourceImage], groups: dict[str, list[str]]
) -> dict[str, list[SourceImage]]:
    """Partition ``images`` by their ``group`` into named splits (``{"train": [...], ...}``);
    a group not listed goes to ``train``."""
    where = {g: split for split, gs in groups.items() for g in gs}
    out: dict[str, list[SourceImage]] = {s: [] for s in [*groups, "train"]}
    for img in images:
        out[where.get(img.group, "train")].append(img)
    return out


#: Whole source images never used for training, by source: ``test`` for the figures,
#: ``val`` for tuning the post-processing thresholds. Everything else trains.
HELD_OUT: dict[str, dict[str, list[str]]] = {
    "consep": {
        "test": ["train_2", "train_7", "train_12", "train_17", "train_22", "train_27"],
        "val": ["train_4", "train_14", "train_20"],
    },
    "gbm40": {
        "test": [f"gbm40_{k:02d}" for k in range(31, 41)],
        "val": [f"gbm40_{k:02d}" for k in range(26, 31)],
    },
    "sim": {"test": [], "val": []},
    "dsb": {"test": ["dsb_test"], "val": ["dsb_val"]},
}


@dataclass
class NucleusData:
    """Training tiles, validation and test images per source, and what was used for what."""

    train: dict[str, TileSet]
    val: dict[str, list[SourceImage]]
    test: dict[str, list[SourceImage]]

    def provenance(self) -> dict[str, object]:
        return {
            "data": {
                name: {
                    "train_images": sorted(set(ts.groups)),
                    "train_tiles": len(ts),
                    "val_images": sorted({i.group for i in self.val.get(name, [])}),
                    "test_images": sorted({i.group for i in self.test.get(name, [])}),
                }
                for name, ts in self.train.items()
            }
        }


def prepare_nucleus_data(
    *,
    consep: Path | None = None,
    consep_csv: Path | None = None,
    gbm40: Path | None = None,
    sim_run: Path | None = None,
    dsb: tuple[Path, Path] | None = None,
    nuclear: bool = False,
    model_mpp: float = 0.5,
    tile: int = 128,
    exclude: tuple[str, ...] = (),
    held_out: dict[str, dict[str, list[str]]] | None = None,
) -> NucleusData:
    """Read the sources given, split each by whole source image (:data:`HELD_OUT`), and cut
    the training part into ``tile`` tiles at ``model_mpp``. A source in ``exclude`` is not
    trained on at all (leave-one-source-out); its images all become test images.
    ``nuclear``: the fluorescence network's data (the simulator's Hoechst, DSB 2018)."""
    held_out = HELD_OUT if held_out is None else held_out
    if nuclear:
        readers = {
            "sim": (lambda: read_simulated_nuclear(sim_run)) if sim_run else None,
            "dsb": (lambda: read_dsb(*dsb)) if dsb else None,
        }
    else:
        readers = {
            "consep": (lambda: read_consep(consep, consep_csv)) if consep else None,
            "gbm40": (lambda: read_gbm40(gbm40)) if gbm40 else None,
            "sim": (lambda: read_simulated(sim_run)) if sim_run else None,
        }
    train, val, test = {}, {}, {}
    for name, read in readers.items():
        if read is None:
            continue
        images = read()
        if name in exclude:
            test[name] = images
            continue
        parts = split_groups(images, held_out.get(name, {"test": [], "val": []}))
        if parts.get("test"):
            test[name] = parts["test"]
        if parts.get("val"):
            val[name] = parts["val"]
        train[name] = make_tileset(name, parts["train"], model_mpp, tile)
    if not train:
        raise ValueError(
            "no training source left (give --consep, --gbm40, --dsb or --sim, and exclude fewer)"
        )
    return NucleusData(train, val, test)
