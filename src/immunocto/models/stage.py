"""The ``train`` and ``expand`` stages of ``immunocto run``, skipped when current.

``train`` retrains only when the training labels, the crop store or ``training:`` changed
(a fingerprint in the model's ``config.json``); ``expand`` reruns only when the model or
``min_prob`` changed (recorded in each cell table's metadata).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from immunocto.config import RunConfig
from immunocto.progress import Progress


def _train_fingerprint(cfg: RunConfig, section: str = "training") -> str:
    """Hash of the ``section`` settings, the crop index and the training label column."""
    from immunocto.db.store import index_path, read_index

    params = getattr(cfg, section)
    parts = {
        section: params.model_dump(
            mode="json", exclude={"min_prob", "v1_rule", "v1_support", "v1_keep", "device"}
        )
    }
    data = cfg.run_dir
    if section == "he_training":
        from immunocto.models.he import he_database

        data = he_database(cfg.run_dir, params.labels)
    idx = index_path(data)
    # the build manifest (per-slide fingerprints, labels, splits), not the file's mtime:
    # build-db rewrites an unchanged index on every run
    parts["index"] = read_index(data)[1] if idx.exists() else None
    if section == "training":
        from immunocto.models.train import LABEL_COLUMNS, resolve_labels

        column = LABEL_COLUMNS[resolve_labels(cfg, params.labels)]
    else:
        from immunocto.models.he import HE_LABELS

        column = HE_LABELS[params.labels]
    labels = []
    for s in cfg.slides:
        path = cfg.run_dir / "cells" / f"{s.id}.parquet"
        if column and path.exists() and column in pq.read_schema(path).names:
            col = (
                pq.read_table(path, columns=[column]).column(column).to_numpy(zero_copy_only=False)
            )
            labels.append(hashlib.sha256("\n".join(map(str, col)).encode()).hexdigest()[:16])
    parts["labels"] = labels
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _mark(config, fp: str) -> None:
    from immunocto._fs import atomic_write_text

    data = json.loads(config.read_text())
    data["fingerprint"] = fp
    atomic_write_text(config, json.dumps(data, indent=1) + "\n")


def train_stage(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.models.checkpoint import models_dir
    from immunocto.models.train import train_bootstrap

    folder = models_dir(cfg.run_dir) / "bootstrap"
    fp = _train_fingerprint(cfg)
    config = folder / "config.json"
    if config.exists() and json.loads(config.read_text()).get("fingerprint") == fp:
        metrics = json.loads((folder / "metrics.json").read_text())
        return {
            "model": str(folder),
            "status": "current",
            "val_accuracy": round(metrics["validation"]["accuracy"], 3),
        }
    result = train_bootstrap(cfg, progress=progress)
    _mark(config, fp)
    v = result.metrics["validation"]
    v0 = json.loads(config.read_text()).get("labels")
    return {
        "model": str(folder), "status": "trained", "v0": v0, "arch": cfg.training.arch, "best_epoch": result.best_epoch,
        "val_accuracy": round(v["accuracy"], 3), "val_macro_f1": round(v["macro_f1"], 3),
    }  # fmt: skip


def expand_stage(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    from immunocto.models.checkpoint import models_dir
    from immunocto.models.expand import META_KEY, run_expand

    folder = models_dir(cfg.run_dir) / "bootstrap"
    model_stamp = (folder / "model.pt").stat().st_mtime_ns
    want = {"model": str(folder), "min_prob": cfg.training.min_prob, "model_mtime": model_stamp,
            "v1_rule": cfg.training.v1_rule, "v1_support": cfg.training.v1_support,
            "v1_keep": cfg.training.v1_keep}  # fmt: skip
    current = True
    for s in cfg.slides:
        path = cfg.run_dir / "cells" / f"{s.id}.parquet"
        md = (pq.read_schema(path).metadata or {}).get(META_KEY) if path.exists() else None
        if s.if_ is not None and (md is None or {k: json.loads(md).get(k) for k in want} != want):
            current = False
    totals: dict[str, int] = {}
    if not current:
        for r in run_expand(cfg, progress=progress, stamp=model_stamp):
            for k, v in r.v1_counts.items():
                totals[k] = totals.get(k, 0) + v
    else:
        for s in cfg.slides:
            path = cfg.run_dir / "cells" / f"{s.id}.parquet"
            if "v1_label" in pq.read_schema(path).names:
                values, n = np.unique(
                    pq.read_table(path, columns=["v1_label"])
                    .column(0)
                    .to_numpy(zero_copy_only=False),
                    return_counts=True,
                )
                for k, v in zip(values, n, strict=True):
                    totals[str(k)] = totals.get(str(k), 0) + int(v)
    return {
        "status": "current" if current else "expanded",
        "min_prob": cfg.training.min_prob,
        **{f"v1_{k}": v for k, v in sorted(totals.items())},
    }


MIN_HE_CELLS = 50  # below this, the H&E model is not worth training (e.g. V1 all ambiguous)


def train_he_stage(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Train the H&E-only model (``RUN/models/he``) on ``he_training.labels``; skipped when
    current, and when those labels do not exist yet (e.g. V1 before expansion)."""
    from immunocto.conventions import CLASSES
    from immunocto.db.datasets import _select
    from immunocto.db.store import read_index, store_path
    from immunocto.models.checkpoint import models_dir
    from immunocto.models.he import HE_LABELS, he_database, train_he, training_data

    p = cfg.he_training
    column = HE_LABELS[p.labels]
    if column and not any(
        (path := cfg.run_dir / "cells" / f"{s.id}.parquet").exists()
        and column in pq.read_schema(path).names
        for s in cfg.slides
    ):
        return {"status": f"skipped: no {column} yet"}
    if p.labels == "v1" and not store_path(he_database(cfg.run_dir, p.labels)).exists():
        return {"status": "skipped: no V1 database yet (build-db-v1)"}
    data, column = training_data(cfg.run_dir, p.labels)
    if read_index(data)[0].num_rows == 0:
        return {"status": f"skipped: the {data.name} database is empty (no cell with a class)"}
    _, have, _ = _select(data, None, CLASSES, column)
    if len(have) < MIN_HE_CELLS:
        what = column or f"the {data.name} database"
        return {
            "status": f"skipped: {len(have)} stored cells with a class in {what} (< {MIN_HE_CELLS})"
        }
    folder = models_dir(cfg.run_dir) / "he"
    fp = _train_fingerprint(cfg, "he_training")
    config = folder / "config.json"
    if config.exists() and json.loads(config.read_text()).get("fingerprint") == fp:
        metrics = json.loads((folder / "metrics.json").read_text())
        return {"model": str(folder), "status": "current",
                "val_macro_f1": round(metrics["validation"]["macro_f1"], 3)}  # fmt: skip
    result = train_he(cfg.run_dir, cfg=cfg, kind="he", name="he", progress=progress)
    _mark(config, fp)
    v = result.metrics["validation"]
    out = {"model": str(folder), "status": "trained", "labels": p.labels, "context": p.context,
           "val_accuracy": round(v["accuracy"], 3), "val_macro_f1": round(v["macro_f1"], 3)}  # fmt: skip
    if "test" in result.metrics:
        out["test_macro_f1"] = round(result.metrics["test"]["macro_f1"], 3)
    return out


def predict_stage(cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """Run ``predict`` (H&E alone) with ``RUN/models/he`` on every slide's H&E into
    ``RUN/predictions/<slide>.parquet``; a slide is redone only when the model changed.
    Returns the summary and, under ``tables``, slide id -> prediction table."""
    from immunocto.models.checkpoint import models_dir
    from immunocto.models.predict import predict_file
    from immunocto.segment.stage import META_KEY

    folder = models_dir(cfg.run_dir) / "he"
    if not (folder / "model.pt").exists():
        return {"status": "skipped: no H&E-only model yet", "tables": {}}
    stamp = (folder / "model.pt").stat().st_mtime_ns
    out = cfg.run_dir / "predictions"
    summary: dict[str, Any] = {"status": "current", "tables": {}}
    cells = 0
    for s in cfg.slides:
        table = out / f"{s.id}.parquet"
        meta = (pq.read_schema(table).metadata or {}) if table.exists() else {}
        done = META_KEY in meta and json.loads(meta[META_KEY]).get("model_mtime") == stamp
        if not done:
            predict_file(
                cfg.resolve(s.he), folder, out, mpp=s.mpp, slide_id=s.id,
                device=cfg.he_training.device, progress=progress, extra_meta={"model_mtime": stamp},
            )  # fmt: skip
            summary["status"] = "predicted"
        cells += pq.read_metadata(table).num_rows
        summary["tables"][s.id] = table
    summary["cells"] = cells
    return summary
