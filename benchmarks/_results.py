"""Where benchmark rows go: printed as JSON lines and appended to benchmarks/results/<name>.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def record(name: str, rows: list[dict], *, extra: dict | None = None, echo: bool = True) -> Path:
    """Print ``rows`` (unless ``echo`` is False) and append them, time-stamped, to the log."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.jsonl"
    stamp = {"when": time.strftime("%Y-%m-%d %H:%M"), **(extra or {})}
    with open(path, "a") as fh:
        for row in rows:
            if echo:
                print(json.dumps(row), flush=True)
            fh.write(json.dumps({**stamp, **row}) + "\n")
    return path


def print_table(header: list[str], rows: list[list]) -> None:
    """Print a Markdown table (after a blank line): ``header`` names, one list of cells per row."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")
