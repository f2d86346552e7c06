"""``immunocto review add-reviewer|serve|stats|export``."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import typer
from rich.table import Table

from immunocto.cli._common import console, err_console, handle_errors

app = typer.Typer(
    help="Review cells in the browser, measure agreement, export V0.", no_args_is_help=True
)


def _run(path: Path) -> Path:
    from immunocto.errors import ImmunoctoError

    folder = path.parent if path.is_file() else path
    if not (folder / "crops.parquet").exists():
        raise ImmunoctoError(
            f"{folder}: no cell database (crops.parquet); run `immunocto build-db` first"
        )
    return folder


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("add-reviewer")
@handle_errors
def add_reviewer(
    run: Path = typer.Argument(..., help="Run folder with a cell database."),
    name: str = typer.Argument(..., help="Reviewer name (letters, digits, _ . -)."),
    admin: bool = typer.Option(
        False, "--admin", help="An admin: may also mint and revoke tokens and export V0 in the app."
    ),
) -> None:
    """Register a reviewer and print their token once (only its hash is stored)."""
    from immunocto.review.store import ReviewStore, review_path

    role = "admin" if admin else "reviewer"
    token = ReviewStore(review_path(_run(run))).add_reviewer(name, role)
    console.print(f"{role} [bold]{name}[/] added; token (shown once, keep it):")
    typer.echo(token)


@app.command("revoke")
@handle_errors
def revoke(
    run: Path = typer.Argument(..., help="Run folder with a cell database."),
    name: str = typer.Argument(..., help="The reviewer whose token stops working."),
) -> None:
    """Revoke a reviewer's token (their decisions stay)."""
    from immunocto.review.store import ReviewStore, review_path

    ReviewStore(review_path(_run(run))).revoke(name)
    console.print(f"{name}: token revoked")


@app.command("serve")
@handle_errors
def serve(
    run: Path = typer.Argument(..., help="Run folder with a cell database."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port"),
    blind: bool = typer.Option(
        False, "--blind", help="Hide the proposed labels and margins from reviewers."
    ),
    strategy: str = typer.Option(
        "random", "--strategy", help="Default batches: random, stratified, margin, disagreements."
    ),
    batch_size: int = typer.Option(24, "--batch-size", help="Cells per batch."),
) -> None:
    """Serve the review page and its API (FastAPI + uvicorn) over RUN's cell database and RUN/review.sqlite."""
    import uvicorn

    from immunocto.review.server import create_app
    from immunocto.review.store import ReviewStore, review_path

    folder = _run(run)
    app_ = create_app(folder, blind=blind, strategy=strategy, batch_size=batch_size)
    if not ReviewStore(review_path(folder)).reviewers():
        err_console.print(
            f"[yellow]no reviewers yet: run `immunocto review add-reviewer {folder} NAME` first[/]"
        )
    if not is_loopback(host):
        err_console.print(
            f"[bold red]WARNING: binding to {host}, reachable from other machines. Tokens travel in clear "
            "text over plain HTTP: put the server behind HTTPS or bind to 127.0.0.1 and use an SSH tunnel.[/]"
        )
    console.print(
        f"review server on http://{host}:{port}/  (blind={blind}, strategy={strategy}); Ctrl-C stops it"
    )
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command("stats")
@handle_errors
def stats(
    run: Path = typer.Argument(..., help="Run folder with a cell database."),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for agreement.json and agreement.png (default RUN/review)."
    ),
    n_boot: int = typer.Option(2000, "--bootstrap", help="Bootstrap resamples for the intervals."),
) -> None:
    """Cohen's kappa per reviewer pair, Fleiss' kappa (3+ reviewers), concordance with the automatic labels per class with bootstrap 95% CIs, confusion matrices."""
    from immunocto._fs import atomic_write_text
    from immunocto.db.store import read_index
    from immunocto.errors import ImmunoctoError
    from immunocto.review.agreement import agreement_report, save_confusion_figure
    from immunocto.review.server import _finite
    from immunocto.review.store import ReviewStore, review_path

    folder = _run(run)
    if not review_path(folder).exists():
        raise ImmunoctoError(f"{review_path(folder)}: no reviews yet")
    latest = ReviewStore(review_path(folder)).latest()
    if latest.empty:
        raise ImmunoctoError(f"{review_path(folder)}: no decisions yet")
    rep = agreement_report(latest, read_index(folder)[0].to_pandas(), n_boot=n_boot)
    target = out or folder / "review"
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target / "agreement.json", json.dumps(_finite(rep), indent=1) + "\n")
    fig = save_confusion_figure(rep, target / "agreement.png")
    pairs = Table(title=f"{rep['cells_reviewed']} cells reviewed by {', '.join(rep['reviewers'])}")
    for col in ("reviewer A", "reviewer B", "cells", "Cohen's kappa", "agreement"):
        pairs.add_column(col)
    for p in rep["pairs"]:
        pairs.add_row(p["a"], p["b"], str(p["n"]), f"{p['kappa']:.3f}", f"{p['agreement']:.3f}")
    console.print(pairs)
    if "fleiss" in rep:
        console.print(
            f"Fleiss' kappa over {rep['fleiss']['n']} cells: {rep['fleiss']['kappa']:.3f}"
        )
    conc = Table(title="concordance with the automatic labels (95% bootstrap CI)")
    conc.add_column("reviewer")
    conc.add_column("overall")
    classes = rep["labels"][:5]
    for c in classes:
        conc.add_column(c)
    for name, c in rep["concordance"].items():
        o = c["overall"]
        cells = [
            f"{v['value']:.2f} [{v['lo']:.2f}, {v['hi']:.2f}] n={v['n']}" if v["n"] else "-"
            for v in (c["per_class"][k] for k in classes)
        ]
        conc.add_row(name, f"{o['value']:.3f} [{o['lo']:.3f}, {o['hi']:.3f}]", *cells)
    console.print(conc)
    console.print(f"written: {target / 'agreement.json'}, {fig}")


@app.command("export")
@handle_errors
def export(
    run: Path = typer.Argument(..., help="Run folder with a cell database and reviews."),
) -> None:
    """Write review_label (the reviewers' consensus), review_n, review_agreement, review_unsure into RUN/cells/*.parquet; then `immunocto build-db CONFIG --labels review` makes V0."""
    from immunocto.review.export import export_reviews

    counts = export_reviews(_run(run))
    for sid, c in counts.items():
        console.print(f"{sid}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
