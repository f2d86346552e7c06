"""One row of `benchmarks/crops_scale.py`, in its own process so the code under test can be any
revision: `PYTHONPATH=<a checkout's src> python benchmarks/crops_row.py RUN MODE`.

Times `build_db(labels="gate", rebuild=True)` and then `run_expand` on RUN with MODE (`local1`,
`local2`: worker processes; `dask2`: a 2-worker Dask LocalCluster, as `immunocto run` starts
it) and prints one JSON line: seconds of each, crops and cells, this process' own peak RSS
(`ru_maxrss`) and which `immunocto` was imported. Public stage functions only.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    import pyarrow.parquet as pq

    import immunocto
    from immunocto._parallel import use_dask
    from immunocto.config import load_config
    from immunocto.db import build_db
    from immunocto.models.expand import run_expand
    from immunocto.pipeline.run import dask_cluster

    run, mode = Path(sys.argv[1]), sys.argv[2]
    cfg = load_config(run)
    workers = int(mode[-1])
    dask = dask_cluster(workers, None) if mode.startswith("dask") else contextlib.nullcontext()
    with dask as client, use_dask(client):
        t0 = time.perf_counter()
        built = build_db(cfg, labels="gate", rebuild=True, workers=workers)
        t1 = time.perf_counter()
        expanded = run_expand(cfg, workers=workers)
        t2 = time.perf_counter()
    cells = sum(pq.read_metadata(run / "cells" / f"{s.id}.parquet").num_rows for s in cfg.slides)
    print(
        json.dumps(
            {
                "build_db_s": t1 - t0,
                "expand_s": t2 - t1,
                "crops": sum(r.cells for r in built),
                "cells": cells,
                "v1": {k: v for r in expanded for k, v in r.v1_counts.items()},
                "client_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "immunocto": str(Path(immunocto.__file__).parent),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
