"""The cell database: crops, masks and IF of labelled cells, their index, queries, datasets,
imports and exports."""

from immunocto.db.build import build_db
from immunocto.db.split import assign_splits
from immunocto.db.store import CHUNK, CROP, CropStore, index_path, read_index, store_path

__all__ = [
    "CHUNK",
    "CROP",
    "CropStore",
    "assign_splits",
    "build_db",
    "index_path",
    "read_index",
    "store_path",
]
