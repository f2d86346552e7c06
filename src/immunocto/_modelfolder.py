"""Model folders: ``config.json`` + ``model.safetensors``, read and written by one small module.

It sits low in the package (below every stage) so that ``segment/`` can load its shipped
nucleus network without importing ``models/``. Weights are safetensors (never pickle), so a
folder from anyone can be loaded without running their code. Reading needs only ``numpy`` and
``safetensors``; callers turn the arrays into torch tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from immunocto._fs import atomic_path, atomic_write_text
from immunocto.errors import InputFileError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def write_model_folder(
    folder: str | os.PathLike[str], tensors: dict[str, np.ndarray], config: dict[str, Any]
) -> Path:
    """Write ``tensors`` (name -> array) and ``config`` (JSON-able) into ``folder`` atomically
    (each file to a temporary name, then renamed; weights first, config last)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(arrays, str(tmp))
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=1, default=_json_default) + "\n")
    return folder


def read_model_folder(
    folder: str | os.PathLike[str],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, config)`` of a model folder; a clear error naming the file when one is
    missing or unreadable."""
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG, folder / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise InputFileError(
                f"{p}: missing; a model folder holds {CONFIG} and {WEIGHTS} "
                "(written by `immunocto train`)"
            )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputFileError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputFileError(f"{cfg_path}: must hold a JSON object, not {type(config).__name__}")
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(w_path))
    except ImportError:
        raise
    except Exception as exc:
        raise InputFileError(f"{w_path}: not a readable safetensors file ({exc})") from None
    return tensors, config


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
