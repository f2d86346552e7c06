"""``immunocto train --kind nuclei``: the H&E nucleus network from real and simulated data."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from rich.table import Table

from immunocto.cli._common import RichProgress, console


def train_nuclei_command(
    out: Path,
    *,
    consep: Path | None,
    consep_csv: Path | None,
    gbm40: Path | None,
    sim: Path | None,
    steps: int | None,
    minutes: float | None,
    exclude: tuple[str, ...],
    seed: int,
    batch_size: int | None,
    lr: float | None,
    device: str | None,
) -> None:
    from immunocto.errors import ImmunoctoError
    from immunocto.models.nuclei import NucleusTraining, train_nuclei
    from immunocto.models.nuclei_data import HELD_OUT, prepare_nucleus_data

    bad = [e for e in exclude if e not in HELD_OUT]
    if bad:
        raise ImmunoctoError(f"--exclude takes {', '.join(HELD_OUT)} (got {', '.join(bad)})")
    if not (consep or gbm40 or sim):
        raise ImmunoctoError("--kind nuclei needs training data: --consep, --gbm40 and/or --sim")
    if (out / "config.json").exists() and not (out / "checkpoint.pt").exists():
        raise ImmunoctoError(f"{out}: already holds a model; choose another folder")
    t = NucleusTraining(seed=seed)
    if steps is not None:
        t.steps = steps
    if batch_size is not None:
        t.batch = batch_size
    if lr is not None:
        t.lr = lr
    t.source_weights = {"consep": 0.4, "gbm40": 0.3, "sim": 0.3}
    console.print("reading and resampling the training sources ...")
    data = prepare_nucleus_data(
        consep=consep, consep_csv=consep_csv, gbm40=gbm40, sim_run=sim,
        model_mpp=t.model_mpp, exclude=exclude,
    )  # fmt: skip
    command = "immunocto " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    provenance = {**data.provenance(), "command": command, "excluded_sources": list(exclude)}
    with RichProgress() as progress:
        result = train_nuclei(
            data.train, out, training=t, validation=data.val, minutes=minutes,
            provenance=provenance, progress=progress, device=device or "auto",
        )  # fmt: skip
    if not result["done"]:
        console.print(
            f"stopped at step {result['step']} of {t.steps} (time budget); rerun the same "
            "command to resume from the checkpoint"
        )
        return
    cfg = result["config"]
    table = Table(title=f"{out}: nucleus network, {t.steps} steps")
    table.add_column("validation source")
    table.add_column("detection F1 (1.5 µm)")
    for name, f1 in cfg.get("validation", {}).get("f1_at_best", {}).items():
        table.add_row(name, f"{f1:.3f}")
    console.print(table)
    console.print(
        f"thresholds: foreground {cfg['fg_threshold']}, seed {cfg['seed_threshold']}; "
        f"model folder {out} (config.json + model.safetensors)"
    )
