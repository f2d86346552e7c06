"""``immunocto train`` and ``immunocto expand``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from immunocto.cli._common import RichProgress, console, handle_errors


@handle_errors
def train(
    config: Path = typer.Argument(
        ...,
        help="immunocto.yaml (or its folder); for --kind he with --labels store --no-context, "
        "a run folder holding only a crop store (e.g. `immunocto import immunocto-png`); "
        "for --kind nuclei, the model folder to write.",
    ),
    kind: str = typer.Option(
        "bootstrap",
        "--kind",
        help="bootstrap: 12-channel H&E + mask + IF classifier; he: H&E-only classifier "
        "(crop + context); he-regression: virtual IF (marker intensities from H&E); nuclei: "
        "the H&E nucleus segmentation + type network; if-nuclei: the fluorescence nucleus network.",
    ),
    labels: str | None = typer.Option(
        None,
        "--labels",
        help="bootstrap: review|gate (default training.labels); he: v1|v0|gate|store "
        "(default he_training.labels).",
    ),
    arch: str | None = typer.Option(
        None,
        "--arch",
        help="resnet50, resnet18, small, or (he) nuclei: the nucleus network's encoder. "
        "Default: from the config.",
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Most epochs (early stopping on validation loss)."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(
        None, "--lr", help="Peak learning rate (AdamW, one-cycle cosine)."
    ),
    device: str | None = typer.Option(
        None, "--device", help="auto, cpu, cuda, cuda:1 (auto: a GPU when there is one)."
    ),
    init: Path | None = typer.Option(
        None,
        "--init",
        help="Local weights to start from (never downloaded); for --kind he also `nuclei` "
        "(the shipped nucleus network's encoder) or a nucleus model folder; for --kind nuclei "
        "`nuclei` (the shipped network) or a nucleus model folder (fresh optimiser).",
    ),
    name: str | None = typer.Option(
        None, "--name", help="Model folder: RUN/models/<name> (default: the kind)."
    ),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
    context: bool | None = typer.Option(
        None, "--context/--no-context", help="he: the 256 px context branch (default on)."
    ),
    collapse: bool | None = typer.Option(
        None,
        "--collapse-lymphocytes/--five-classes",
        help="he: lymphocyte / macrophage / other instead of the five classes.",
    ),
    partial: str | None = typer.Option(
        None,
        "--partial-labels",
        help="he: ignore (unlabeled/ambiguous left out) or nnpu (`other` as unlabelled, nnPU loss).",
    ),
    pu_prior: float | None = typer.Option(
        None,
        "--pu-prior",
        help="he + nnpu: fraction of hidden positives among `other` (default: estimated).",
    ),
    consep: Path | None = typer.Option(
        None, "--consep", help="nuclei: CoNSeP npz (images, instances, names)."
    ),
    consep_csv: Path | None = typer.Option(
        None, "--consep-csv", help="nuclei: CoNSeP nuclei CSV with the types."
    ),
    gbm40: Path | None = typer.Option(None, "--gbm40", help="nuclei: GBM40 npz."),
    dsb: tuple[Path, Path] | None = typer.Option(
        None, "--dsb", help="if-nuclei: the DSB 2018 image and its instance mask (IMAGE MASK)."
    ),
    sim: Path | None = typer.Option(
        None, "--sim", help="nuclei: a simulator run folder (`immunocto simulate`)."
    ),
    steps: int | None = typer.Option(None, "--steps", help="nuclei: optimiser steps."),
    minutes: float | None = typer.Option(
        None, "--minutes", help="nuclei: stop after this long with a checkpoint; rerun to resume."
    ),
    exclude: list[str] = typer.Option(
        [], "--exclude", help="nuclei: leave this source out of training (consep, gbm40, sim)."
    ),
    seed: int = typer.Option(0, "--seed", help="nuclei: random seed."),
    tta: int | None = typer.Option(
        None,
        "--tta",
        help="nuclei/if-nuclei: views of each window averaged at inference, 1, 2, 4 or 8 (flips "
        "and transposes; default 4 for H&E, 1 for fluorescence); with --retune it replaces the "
        "folder's.",
    ),
    retune: bool = typer.Option(
        False,
        "--retune",
        help="nuclei: re-tune the post-processing thresholds of the finished model folder on "
        "its validation images (weights unchanged).",
    ),
) -> None:
    """Train a model into RUN/models/<name>/ (model.pt, config.json, metrics.json, metrics.png): the bootstrap classifier on V0, or the H&E-only model (--kind he / he-regression)."""
    from immunocto.errors import ImmunoctoError

    kinds = ("bootstrap", "he", "he-regression", "nuclei", "if-nuclei")
    if kind not in kinds:
        raise ImmunoctoError(f"--kind must be one of {', '.join(kinds)} (got {kind!r})")
    if kind in ("nuclei", "if-nuclei"):
        from immunocto.cli.train_nuclei import train_nuclei_command

        train_nuclei_command(
            config, consep=consep, consep_csv=consep_csv, gbm40=gbm40, sim=sim, steps=steps,
            minutes=minutes, exclude=tuple(exclude), seed=seed, batch_size=batch_size, lr=lr,
            device=device, retune=retune, dsb=dsb, nuclear=kind == "if-nuclei", tta=tta,
            init=init,
        )  # fmt: skip
        return
    if kind == "bootstrap":
        _train_bootstrap(config, labels, arch, epochs, batch_size, lr, device, init, name, workers)
        return
    _train_he(
        config, kind, labels=labels, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
        device=device, init=init, name=name, workers=workers, context=context,
        collapse_lymphocytes=collapse, partial_labels=partial, pu_prior=pu_prior,
    )  # fmt: skip


def _train_he(config: Path, kind: str, *, name, workers, **options) -> None:
    from immunocto.config import CONFIG_NAME, load_config
    from immunocto.db.store import index_path
    from immunocto.errors import ImmunoctoError
    from immunocto.models.he import train_he

    cfg = None
    if config.is_dir() and not (config / CONFIG_NAME).exists():
        if not index_path(config).exists():
            raise ImmunoctoError(f"{config}: neither an immunocto.yaml nor a crop store here")
        run = config
        if options.get("context") is not False:
            raise ImmunoctoError(
                f"{config}: no immunocto.yaml, so no slides to cut context windows from; "
                "add --no-context (and --labels store for an imported release)"
            )
    else:
        cfg = load_config(config)
        run = cfg.run_dir
    overrides = {"context": options.pop("context"), **options}
    if overrides.get("labels") is not None and overrides["labels"] not in (
        "v1",
        "v0",
        "gate",
        "store",
    ):
        raise ImmunoctoError(
            f"--labels for --kind {kind} must be v1, v0, gate or store (got {overrides['labels']!r})"
        )
    if overrides.get("partial_labels") is not None and overrides["partial_labels"] not in (
        "ignore",
        "nnpu",
    ):
        raise ImmunoctoError(
            f"--partial-labels must be ignore or nnpu (got {overrides['partial_labels']!r})"
        )
    with RichProgress() as progress:
        result = train_he(
            run, cfg=cfg, kind=kind, name=name, workers=workers, progress=progress, **overrides
        )
    m = result.metrics
    title = f"{result.folder} (best epoch {result.best_epoch}, {result.seconds:.0f} s on {m['speed']['device']})"
    table = Table(title=title)
    splits = [s for s in ("validation", "test") if s in m]
    if kind == "he":
        table.add_column("class")
        for split in splits:
            for what in ("precision", "recall", "F1"):
                table.add_column(f"{split} {what}")
        for c in m["validation"]["per_class"]:
            row = [c]
            for split in splits:
                v = m[split]["per_class"][c]
                row += [f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}"]
            table.add_row(*row)
        console.print(table)
        console.print(
            f"validation accuracy {m['validation']['accuracy']:.3f}, macro F1 {m['validation']['macro_f1']:.3f}; "
            f"{m['speed']['train_cells_per_s']:.0f} training cells/s; figure {result.folder / 'metrics.png'}"
        )
    else:
        table.add_column("marker")
        for split in splits:
            table.add_column(f"{split} Pearson r")
        for mk in m["validation"]["per_marker"]:
            table.add_row(mk, *(f"{m[s]['per_marker'][mk]['pearson_r']:.3f}" for s in splits))
        console.print(table)
        console.print(f"figure {result.folder / 'metrics.png'}")


def _train_bootstrap(
    config, labels, arch, epochs, batch_size, lr, device, init, name, workers
) -> None:
    from immunocto.config import load_config
    from immunocto.models.train import train_bootstrap

    cfg = load_config(config)
    with RichProgress() as progress:
        result = train_bootstrap(
            cfg, labels=labels, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, device=device,
            init=init, name=name or "bootstrap", workers=workers, progress=progress,
        )  # fmt: skip
    m = result.metrics
    table = Table(
        title=f"{result.folder} (best epoch {result.best_epoch}, {result.seconds:.0f} s on {m['speed']['device']})"
    )
    table.add_column("class")
    for split in ("validation", "test"):
        if split in m:
            table.add_column(f"{split} precision")
            table.add_column(f"{split} recall")
            table.add_column(f"{split} F1")
    for c in m["validation"]["per_class"]:
        row = [c]
        for split in ("validation", "test"):
            if split in m:
                v = m[split]["per_class"][c]
                row += [f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}"]
        table.add_row(*row)
    console.print(table)
    console.print(
        f"validation accuracy {m['validation']['accuracy']:.3f}, macro F1 {m['validation']['macro_f1']:.3f}; "
        f"{m['speed']['train_cells_per_s']:.0f} training cells/s; figure {result.folder / 'metrics.png'}"
    )


@handle_errors
def expand(
    config: Path = typer.Argument(..., help="immunocto.yaml (or its folder)."),
    min_prob: float | None = typer.Option(
        None,
        "--min-prob",
        help="Keep predictions with calibrated probability >= this (default training.min_prob, 0.95).",
    ),
    v1_rule: str | None = typer.Option(
        None,
        "--v1-rule",
        help="expand (V0 kept, conflicts ambiguous, additions need IF support) or model "
        "(the classifier's call everywhere, Immunocto's rule); default training.v1_rule.",
    ),
    v1_support: float | None = typer.Option(
        None,
        "--v1-support",
        help="An added cell's positive markers must reach this x the gate threshold "
        "(default training.v1_support, 0.7; 0 = no check).",
    ),
    v1_keep: float | None = typer.Option(
        None,
        "--v1-keep",
        help="A V0 label stays when the classifier gives it at least this probability "
        "(default training.v1_keep, 0.5; 0 = keep all but confident conflicts).",
    ),
    model: str = typer.Option("bootstrap", "--model", help="Model folder name under RUN/models."),
    device: str | None = typer.Option(None, "--device"),
    workers: int = typer.Option(
        0, "--workers", help="Crop-cutting worker processes (0 = one per CPU)."
    ),
) -> None:
    """Label every candidate cell with the bootstrap classifier: model_label, model_prob_<class>, and v1_label / v1_source by the V1 rule (calls at >= --min-prob)."""
    from immunocto.config import load_config
    from immunocto.models.expand import run_expand

    cfg = load_config(config)
    with RichProgress() as progress:
        results = run_expand(
            cfg, model=model, min_prob=min_prob, rule=v1_rule, support=v1_support, keep=v1_keep,
            device=device, workers=workers or None, progress=progress
        )  # fmt: skip
    classes = ["cd4_t", "cd8_t", "b_cell", "macrophage", "other", "ambiguous"]
    table = Table(title="V1 (v1_label) per slide")
    table.add_column("slide")
    for c in classes:
        table.add_column(c, justify="right")
    table.add_column("cells/s", justify="right")
    for r in results:
        table.add_row(
            r.slide_id,
            *(str(r.v1_counts.get(c, 0)) for c in classes),
            f"{r.cells / max(r.seconds, 1e-9):.0f}",
        )
    console.print(table)
    for r in results:
        if not r.versus_gate:
            continue
        diff = Table(title=f"{r.slide_id}: gate_label (rows) -> v1_label (columns)")
        diff.add_column("gate")
        for c in classes:
            diff.add_column(c, justify="right")
        for g, row in r.versus_gate.items():
            diff.add_row(g, *(str(row.get(c, 0)) for c in classes))
        console.print(diff)


@handle_errors
def predict(
    slide: Path = typer.Argument(..., help="An H&E slide (OME-TIFF, TIFF, SVS, OME-Zarr)."),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="An H&E-only model folder (RUN/models/he from `train --kind he`). Without it the "
        "nucleus network's types (inflammatory, epithelial, stromal, other) are the classes.",
    ),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    backend: str = typer.Option(
        "he",
        "--backend",
        help="Segmentation: he (the nucleus network), he-classical (hematoxylin threshold) or sam.",
    ),
    nucleus_model: Path | None = typer.Option(
        None,
        "--nucleus-model",
        help="A nucleus model folder for --backend he (default: the one shipped in the package).",
    ),
    sam_checkpoint: Path | None = typer.Option(
        None, "--sam-checkpoint", help="SAM weights (.pth) for --backend sam (never downloaded)."
    ),
    mpp: float | None = typer.Option(
        None, "--mpp", help="µm per pixel, when the file does not say."
    ),
    slide_id: str | None = typer.Option(
        None, "--slide-id", help="Name of the outputs (default: the file name)."
    ),
    device: str = typer.Option("auto", "--device"),
    workers: int = typer.Option(0, "--workers", help="Segmentation processes (0 = one per CPU)."),
) -> None:
    """Segment and classify an H&E slide (no IF): OUT/<slide>.parquet, .geojson (QuPath), .masks.zarr and .png (density maps)."""
    from immunocto.models.predict import predict_file

    with RichProgress() as progress:
        r = predict_file(
            slide, model, out, backend=backend, mpp=mpp, slide_id=slide_id, device=device,
            workers=workers or None, sam_checkpoint=sam_checkpoint, progress=progress,
            nucleus_model=nucleus_model,
        )  # fmt: skip
    table = Table(title=f"{r.slide_id}: {r.cells} cells")
    table.add_column("class")
    table.add_column("cells", justify="right")
    for c, n in r.counts.items():
        table.add_row(c, str(n))
    console.print(table)
    rate = r.cells / max(sum(r.seconds.values()), 1e-9)
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items())
    console.print(
        f"{rate:.0f} cells/s ({steps}); wrote " + ", ".join(str(p) for p in r.files.values())
    )
