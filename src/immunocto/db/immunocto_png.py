"""The public Immunocto release layout, both ways.

``<patient>/HE/<class>_<cx>_<cy>.png`` (64 x 64 RGB) and ``<patient>/mask/<same name>`` (0/255),
where **cx is the column (x) and cy the row (y)** of the cell centroid in level-0 pixels of the
slide, rounded to integers. Importing builds a crop store (``crops.zarr`` + ``crops.parquet``)
that our models train on; class names are mapped to ours (case-insensitive aliases below).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from immunocto.db.store import (
    CHUNK,
    CROP,
    INDEX_COLUMNS,
    CropStore,
    index_path,
    read_index,
    store_path,
    write_index,
)
from immunocto.errors import ImmunoctoError, InputFileError
from immunocto.progress import NullProgress, Progress

NAME = re.compile(r"^(?P<cls>.+)_(?P<cx>-?\d+)_(?P<cy>-?\d+)\.png$")
ALIASES = {
    "cd4": "cd4_t", "cd4_t": "cd4_t", "cd4+ t": "cd4_t", "cd8": "cd8_t", "cd8_t": "cd8_t",
    "cd20": "b_cell", "b": "b_cell", "b_cell": "b_cell", "bcell": "b_cell", "cd68": "macrophage",
    "cd68_cd163": "macrophage", "macrophage": "macrophage", "other": "other", "non-immune": "other",
    "nonimmune": "other",
}  # fmt: skip


def export_png(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    threads: int = 4,
    progress: Progress | None = None,
) -> int:
    """Write every stored crop in the release layout; returns the number of cells.

    Names are checked for collisions before anything is written; PNG encoding runs on
    ``threads`` threads (zlib releases the GIL).
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    progress = progress or NullProgress()
    index, _ = read_index(run)
    if index.num_rows == 0:
        raise ImmunoctoError(f"{run}: the cell database is empty; run `immunocto build-db` first")
    store = CropStore.open_readonly(store_path(run))
    df = index.to_pandas().sort_values("row")
    names = [
        f"{lab}_{round(x)}_{round(y)}.png"
        for lab, x, y in zip(df["label"], df["x"], df["y"], strict=True)
    ]
    df = df.assign(name=names)
    dup = df.duplicated(["patient", "name"], keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        raise ImmunoctoError(
            f"{int(dup.sum())} cells share a file name within their patient (e.g. {first['patient']}/{first['name']}); "
            "the layout cannot hold them — export a database without duplicated centroids"
        )
    out = Path(out)
    for patient in df["patient"].unique():
        (out / str(patient) / "HE").mkdir(parents=True, exist_ok=True)
        (out / str(patient) / "mask").mkdir(parents=True, exist_ok=True)

    def save(img: np.ndarray, path: Path) -> None:
        Image.fromarray(img).save(path)

    progress.start("export png", len(df), unit="cells")
    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        for lo in range(0, len(df), CHUNK):
            part = df.iloc[lo : lo + CHUNK]
            rows = part["row"].to_numpy()
            he = store.he.get_orthogonal_selection((rows,))
            mask = (store.mask.get_orthogonal_selection((rows,)) > 0).astype(np.uint8) * 255
            folders = [out / str(p) for p in part["patient"]]
            jobs = [
                pool.submit(save, he[k], f / "HE" / n)
                for k, (f, n) in enumerate(zip(folders, part["name"], strict=True))
            ]
            jobs += [
                pool.submit(save, mask[k], f / "mask" / n)
                for k, (f, n) in enumerate(zip(folders, part["name"], strict=True))
            ]
            for job in jobs:
                job.result()
            progress.advance("export png", len(part))
    return len(df)


def import_png(
    src: str | os.PathLike[str],
    run: str | os.PathLike[str],
    *,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> int:
    """Build ``RUN/crops.zarr`` + ``RUN/crops.parquet`` from a release-layout folder.

    Each patient folder becomes one ``slide_id``/``patient`` and goes wholly to one split
    (seeded). An existing database in ``RUN`` is kept unless ``overwrite``; the index is
    written last, so an interrupted import leaves no half-listed store.
    """

    from concurrent.futures import ThreadPoolExecutor

    from immunocto.db.split import split_patients

    progress = progress or NullProgress()
    src, run = Path(src), Path(run)
    patients = sorted(p for p in src.iterdir() if (p / "HE").is_dir()) if src.is_dir() else []
    if not patients:
        raise InputFileError(
            f"{src}: no <patient>/HE/ folders; expected the Immunocto release layout"
        )
    items = []
    for p in patients:
        for f in sorted((p / "HE").glob("*.png")):
            m = NAME.match(f.name)
            if not m:
                raise InputFileError(f"{f}: name is not <class>_<cx>_<cy>.png")
            cls = ALIASES.get(m["cls"].lower())
            if cls is None:
                raise InputFileError(
                    f"{f}: unknown class {m['cls']!r}; known: {', '.join(sorted(set(ALIASES)))}"
                )
            mask = p / "mask" / f.name
            if not mask.exists():
                raise InputFileError(f"{mask}: missing mask for {f.name}")
            items.append((p.name, f, mask, cls, int(m["cx"]), int(m["cy"])))
    if index_path(run).exists() and not overwrite:
        raise ImmunoctoError(
            f"{index_path(run)}: a cell database is already there; choose another --out or pass --overwrite"
        )
    run.mkdir(parents=True, exist_ok=True)
    index_path(run).unlink(missing_ok=True)
    store = CropStore(store_path(run), if_markers=[], create=True)
    split_of = split_patients((p.name for p in patients), seed=seed)
    progress.start("import png", len(items), unit="cells")
    tables = []
    pool = ThreadPoolExecutor(max_workers=4)  # PNG decoding releases the GIL
    for lo in range(0, len(items), CHUNK):
        part = items[lo : lo + CHUNK]
        he = np.stack(
            list(pool.map(_read, [f for _, f, *_ in part], [(CROP, CROP, 3)] * len(part)))
        )
        mk = (
            np.stack(list(pool.map(_read, [m for _, _, m, *_ in part], [(CROP, CROP)] * len(part))))
            > 0
        )
        store.write(lo, he, mk.astype(np.uint8), None)
        n = len(part)
        tables.append(pa.table({
            "row": pa.array(np.arange(lo, lo + n, dtype=np.int64)),
            "slide_id": pa.array([p for p, *_ in part]),
            "patient": pa.array([p for p, *_ in part]),
            "cell_id": pa.array(np.arange(lo + 1, lo + n + 1, dtype=np.int64)),
            "x": pa.array([float(i[4]) for i in part]),
            "y": pa.array([float(i[5]) for i in part]),
            "label": pa.array([i[3] for i in part]),
            "label_source": pa.array(["immunocto-png"] * n),
            "version": pa.array(["import"] * n),
            "split": pa.array([split_of[p] for p, *_ in part]),
            "confidence": pa.array(np.ones(n, np.float32)),
            "border": pa.array(np.zeros(n, bool)),
            "scale": pa.array(np.ones(n, np.float32)),
        }))  # fmt: skip
        progress.advance("import png", n)
    pool.shutdown()
    index = pa.concat_tables(tables).select(list(INDEX_COLUMNS))
    write_index(
        run,
        index,
        {
            "labels": "import",
            "version": "import",
            "if_markers": [],
            "source": str(src),
            "split_seed": seed,
            "slides": {},
        },
    )
    return len(items)


def _read(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            arr = np.asarray(image)
    except (OSError, ValueError, SyntaxError) as err:  # PIL's kinds for damaged images
        raise InputFileError(
            f"{path}: not a readable PNG ({type(err).__name__}: {str(err)[:120]}); "
            "copy or export the release again"
        ) from None
    if arr.ndim == 3 and arr.shape[2] == 4 and len(shape) == 3:
        arr = arr[..., :3]
    if arr.shape != shape:
        raise InputFileError(f"{path}: expected a {shape} image, found {arr.shape}")
    return arr
