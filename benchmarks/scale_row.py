"""One row of `benchmarks/scale.py`, run in its own process so the code under test can be any
revision: `PYTHONPATH=<a checkout's src> python benchmarks/scale_row.py RUN MODE`.

Registers RUN when needed (not timed), then times segment + quantify with MODE (`local1`,
`local2`: worker processes; `dask2`: a 2-worker Dask LocalCluster, as `immunocto run` starts
it) and prints one JSON line: the seconds of each stage, the cells, this process' own peak RSS
(the client: `ru_maxrss`) and which `immunocto` was imported. Only public stage functions are
used, so older revisions run it unchanged.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path


def load_older(run: Path, load_config):
    """``load_config(run)``; for an older revision that rejects config keys newer code wrote
    (``a.b: unknown key``) or values it does not know (``a.b: Input should be ...``), those keys
    are dropped from ``immunocto.yaml`` (said on stderr), so each revision runs with its own
    defaults for them."""
    import re

    import yaml

    from immunocto.errors import ConfigError

    path = run / "immunocto.yaml"
    for _ in range(20):
        try:
            return load_config(run)
        except ConfigError as err:
            keys = re.findall(r"([\w.]+): (?:unknown key|Input should be)", str(err))
            if not keys:
                raise
            data = yaml.safe_load(path.read_text())
            for key in keys:
                *parents, last = key.split(".")
                node = data
                for p in parents:
                    node = node[int(p)] if isinstance(node, list) else node[p]
                node.pop(last, None)
                print(
                    f"scale_row: dropped {key} (unknown to this revision or its value)",
                    file=sys.stderr,
                )
            path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(run)


def main() -> None:
    import immunocto
    from immunocto._parallel import use_dask
    from immunocto.config import load_config
    from immunocto.pipeline.run import dask_cluster
    from immunocto.quantify.stage import run_quantify
    from immunocto.register.stage import run_register
    from immunocto.segment.stage import run_segment

    run, mode = Path(sys.argv[1]), sys.argv[2]
    cfg = load_older(run, load_config)
    run_register(cfg)
    workers = int(mode[-1])
    cfg.segmentation.workers = workers
    cfg.quantification.workers = workers
    dask = dask_cluster(workers, None) if mode.startswith("dask") else contextlib.nullcontext()
    with dask as client, use_dask(client):
        t0 = time.perf_counter()
        seg = run_segment(cfg, force=True)
        t1 = time.perf_counter()
        run_quantify(cfg)
        t2 = time.perf_counter()
    print(
        json.dumps(
            {
                "segment_s": t1 - t0,
                "quantify_s": t2 - t1,
                "cells": int(seg[0].n_cells),
                "client_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "immunocto": str(Path(immunocto.__file__).parent),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
