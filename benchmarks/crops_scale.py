"""build-db and expand at slide scale: wall time, crops/s and the peak memory of the client
(the process that schedules) and of all processes, for this checkout and, with `--compare REV`,
an older commit in the same invocation.

RUN is a segmented, quantified run folder (e.g. one of `benchmarks/scale.py`'s, or
`immunocto simulate` + `immunocto run --until quantify`). Not timed, once, with this checkout:
`gate`, and a small bootstrap classifier (`train --arch small --epochs 2`) if RUN has none.
Then for each code and `--modes` entry (`local1`, `local2`: worker processes; `dask2`: a
2-worker LocalCluster), on a fresh copy of RUN (cell tables and masks copied, slides linked),
one process (`crops_row.py`) runs `build-db --rebuild` (gate labels, H&E + mask + 8 IF
markers) and then `expand`, and prints the seconds of each and its own peak RSS
(`client_peak_mb`); `all_peak_mb` is the summed RSS of it and its children sampled every
0.2 s. Rows go to `benchmarks/results/crops_scale.jsonl`.

    python benchmarks/crops_scale.py RUN --modes local2 dask2 --compare 5837946
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from _results import print_table, record
from scale import REPO, checkout, run_row

ROW = Path(__file__).with_name("crops_row.py")


def prepare(run: Path) -> None:
    """Gate and (if missing) train the bootstrap classifier, with this checkout, untimed."""
    from immunocto.config import load_config
    from immunocto.models.train import train_bootstrap
    from immunocto.phenotype.stage import run_gate

    cfg = load_config(run)
    run_gate(cfg, with_sensitivity=True)
    if not (run / "models" / "bootstrap" / "model.pt").exists():
        train_bootstrap(cfg, labels="gate", arch="small", epochs=2, batch_size=256)


def fresh_copy(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    skip = shutil.ignore_patterns("slides", "truth", "preview", "crops.zarr", "crops.parquet", "v1")
    shutil.copytree(src, dst, ignore=skip, symlinks=True)
    for sub in ("slides", "truth"):
        if (src / sub).exists() and not (dst / sub).exists():
            (dst / sub).symlink_to((src / sub).resolve(), target_is_directory=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run", type=Path)
    ap.add_argument("--modes", nargs="+", default=["local1", "local2", "dask2"])
    ap.add_argument("--compare", metavar="REV", help="also run every row with commit REV")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the codes this often")
    args = ap.parse_args()
    prepare(args.run)
    work = Path(tempfile.mkdtemp(prefix="bench-crops-"))
    rows = []
    with contextlib.ExitStack() as stack:
        codes = {"this": REPO / "src"}
        if args.compare:
            codes[args.compare] = stack.enter_context(checkout(args.compare, work))
        for _ in range(args.repeats):
            for mode in args.modes:
                for name, src in codes.items():
                    copy = work / f"run-{name}-{mode}"
                    fresh_copy(args.run, copy)
                    row = {"mode": mode, "code": name, **run_row(copy, mode, src, ROW)}
                    row["all_peak_mb"] = round(row["all_peak_mb"])
                    row["crops_per_s"] = round(row["crops"] / row["build_db_s"])
                    row["expand_cells_per_s"] = round(row["cells"] / row["expand_s"])
                    rows.append(row)
                    record("crops_scale", [row], echo=False)
                    print(json.dumps(row), flush=True)
                    shutil.rmtree(copy, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    print_table(
        ["mode", "code", "build-db s", "crops/s", "expand s", "cells/s", "client MB", "all MB"],
        [[r["mode"], r["code"], f"{r['build_db_s']:.1f}", r["crops_per_s"], f"{r['expand_s']:.1f}",
          r["expand_cells_per_s"], f"{r['client_peak_mb']:.0f}", r["all_peak_mb"]] for r in rows],
    )  # fmt: skip


if __name__ == "__main__":
    main()
