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
    retune: bool = False,
    dsb: tuple[Path, Path] | None = None,
    nuclear: bool = False,
    tta: int | None = None,
    init: Path | None = None,
) -> None:
    """``--kind nuclei`` (H&E: CoNSeP, GBM40, the simulator's H&E) or, with ``nuclear``,
    ``--kind if-nuclei`` (fluorescence: the simulator's Hoechst, DSB 2018)."""
    from immunocto.errors import ImmunoctoError
    from immunocto.models.nuclei import NucleusTraining, train_nuclei
    from immunocto.models.nuclei_data import HELD_OUT, prepare_nucleus_data

    bad = [e for e in exclude if e not in HELD_OUT]
    if bad:
        raise ImmunoctoError(f"--exclude takes {', '.join(HELD_OUT)} (got {', '.join(bad)})")
    if nuclear and not (dsb or sim):
        raise ImmunoctoError("--kind if-nuclei needs training data: --dsb and/or --sim")
    if not nuclear and not (consep or gbm40 or sim):
        raise ImmunoctoError("--kind nuclei needs training data: --consep, --gbm40 and/or --sim")
    from immunocto.segment.learned import TTA_VIEWS

    if tta is not None and tta not in TTA_VIEWS:
        raise ImmunoctoError(f"--tta takes {', '.join(map(str, TTA_VIEWS))} (got {tta})")
    if retune:
        _retune(out, consep=consep, consep_csv=consep_csv, gbm40=gbm40, tta=tta)
        return
    if (out / "config.json").exists() and not (out / "checkpoint.pt").exists():
        raise ImmunoctoError(f"{out}: already holds a model; choose another folder")
    t = NucleusTraining(seed=seed)
    if steps is not None:
        t.steps = steps
    if init is not None:  # anything but a model folder fails in train_nuclei, naming it
        from immunocto.models.arch import nucleus_model_folder
        from immunocto.segment.learned import SHIPPED, SHIPPED_IF

        init = nucleus_model_folder(init, shipped=SHIPPED_IF if nuclear else SHIPPED) or init
    if batch_size is not None:
        t.batch = batch_size
    if lr is not None:
        t.lr = lr
    t.source_weights = {"consep": 0.4, "gbm40": 0.3, "sim": 0.3}
    # test-time views: 4 for H&E (the shipped folder's), 1 for fluorescence (untried with views)
    t.tta = tta if tta is not None else (1 if nuclear else 4)
    if nuclear:
        from immunocto.models.nuclei_aug import AugmentParams

        t.input = "nuclear"
        t.source_weights = {"sim": 0.6, "dsb": 0.4}
        # fluorescence nuclei span 5-25 µm (lymphocytes to cultured and tumour cells)
        t.augment = AugmentParams(max_scale=1.8)
    console.print("reading and resampling the training sources ...")
    data = prepare_nucleus_data(
        consep=consep, consep_csv=consep_csv, gbm40=gbm40, sim_run=sim, dsb=dsb,
        nuclear=nuclear, model_mpp=t.model_mpp, exclude=exclude,
    )  # fmt: skip
    command = _command()
    provenance = {**data.provenance(), "command": command, "excluded_sources": list(exclude)}
    with RichProgress() as progress:
        result = train_nuclei(
            data.train, out, training=t, validation=data.val, minutes=minutes,
            provenance=provenance, progress=progress, device=device or "auto", init=init,
        )  # fmt: skip
    if not result["done"]:
        console.print(
            f"stopped at step {result['step']} of {t.steps} (time budget); rerun the same "
            "command to resume from the checkpoint"
        )
        return
    cfg = result["config"]
    table = Table(
        title=f"{out}: {'fluorescence ' if nuclear else ''}nucleus network, {t.steps} steps"
    )
    table.add_column("validation source")
    table.add_column("detection F1 (1.5 µm)")
    for name, f1 in cfg.get("validation", {}).get("f1_at_best", {}).items():
        table.add_row(name, f"{f1:.3f}")
    console.print(table)
    console.print(
        f"thresholds: foreground {cfg['fg_threshold']}, seed {cfg['seed_threshold']}; "
        f"model folder {out} (config.json + model.safetensors)"
    )


def _command() -> str:
    """The command line that ran, for the model folder's provenance."""
    return "immunocto " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _retune(
    out: Path,
    *,
    consep: Path | None,
    consep_csv: Path | None,
    gbm40: Path | None,
    tta: int | None = None,
) -> None:
    """Re-tune a finished model folder's thresholds on the validation images of the real
    sources it trained on (never on a source it left out)."""
    from immunocto._modelfolder import read_model_folder
    from immunocto.errors import ImmunoctoError
    from immunocto.models.nuclei import retune_model_folder
    from immunocto.models.nuclei_data import HELD_OUT, read_consep, read_gbm40, split_groups

    _, config = read_model_folder(out)
    if config.get("kind") != "nuclei":
        raise ImmunoctoError(
            f"{out}/config.json: not a nucleus model (kind {config.get('kind')!r})"
        )
    excluded = set(config.get("excluded_sources", []))
    readers = {
        "consep": (lambda: read_consep(consep, consep_csv)) if consep else None,
        "gbm40": (lambda: read_gbm40(gbm40)) if gbm40 else None,
    }
    validation = {
        name: split_groups(read(), HELD_OUT[name])["val"]
        for name, read in readers.items()
        if read is not None and name not in excluded
    }
    if not validation:
        raise ImmunoctoError(
            "--retune needs the validation images of a source the model trained on: "
            "--consep/--consep-csv and/or --gbm40"
        )
    console.print(f"re-tuning {out} on {', '.join(validation)} validation images ...")
    command = _command()
    cfg = retune_model_folder(out, validation, command=command, tta=tta)
    f1 = ", ".join(f"{n} {v:.3f}" for n, v in cfg["validation"]["f1_at_best"].items())
    console.print(
        f"thresholds: foreground {cfg['fg_threshold']}, seed {cfg['seed_threshold']}, "
        f"min score {cfg['min_score']}, {cfg.get('tta', 1)} view(s) per window; validation "
        f"detection F1 (1.5 µm): {f1}"
    )
    if "types" in cfg["validation"]:
        t = cfg["validation"]["types"]
        w = ", ".join(f"{n} {v:g}" for n, v in zip(cfg["types"], cfg["type_weights"], strict=True))
        f = ", ".join(f"{n} {t['type_f1_unweighted'][n]:.3f} -> {t['type_f1_at_best'][n]:.3f}"
                      for n in t["tuned_types"])  # fmt: skip
        console.print(f"type weights: {w}; validation type F1: {f}")
