"""Crash-recovery loop: `immunocto run` killed with SIGKILL at many points across every
stage, resumed, and compared with an uninterrupted run of the same slides.

One uninterrupted reference run times each stage. Then, per kill, a fresh copy of the
simulated slides runs in a subprocess; kill ``k`` aims at stage ``k mod 12`` (so every stage
is hit): it waits for the stage's start line in ``logs/run.log``, sleeps a random fraction of
that stage's reference duration and sends SIGKILL. The same command then resumes the run to
the end, and every output is compared with the reference:

- tables (Parquet: cells, crop indexes, predictions): every column, exactly;
- arrays (zarr: label masks, crop stores, context, prediction masks): exactly;
- models (`model.pt`): every tensor, exactly;
- JSON records (registration, gating, validation report, model configs): every value but
  timings and paths;
- nothing half-written left (`*.tmp`, `*.old`, `*.partial`).

    python benchmarks/crash_loop.py --kills 20

`--stages a,b` aims only at those stages; `--size` sets the two simulated slides (512 px: a run takes ~30 s on 2 cores). Printed and
appended to benchmarks/results/crash_loop.jsonl; the exit status is 1 when any resumed run
differs from the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _results import record

STAGE_LINE = re.compile(r"immunocto\.pipeline\.run: stage (\S+): ")
DONE_LINE = re.compile(r"immunocto\.pipeline\.run: stage (\S+) done in ([0-9.]+) s")
#: JSON keys whose values are timings, paths or dates: not part of a run's result.
VOLATILE = re.compile(
    r"^(.*seconds.*|.*_s|.*time.*|elapsed|started|finished|created|date|.*_at|command|fingerprint)$",
    re.I,
)
LEFTOVER = (".tmp", ".old", ".partial")


def run_cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "immunocto", "run", str(run), "--no-dask", "--workers", "1"]


def simulate(out: Path, size: int, seed: int) -> None:
    subprocess.run([sys.executable, "-m", "immunocto", "simulate", str(out), "--size", str(size),
                    "--slides", "2", "--seed", str(seed)], check=True, capture_output=True)  # fmt: skip


def stage_durations(log: str) -> dict[str, float]:
    """Reference seconds per stage from a finished run's log."""
    return {m.group(1): float(m.group(2)) for m in DONE_LINE.finditer(log)}


def kill_during(run: Path, stage: str, delay: float, timeout: float = 600) -> dict:
    """Start the run, SIGKILL it ``delay`` s after ``stage`` starts (or when it ends, if
    sooner). Returns where the kill landed."""
    log = run / "logs" / "run.log"
    proc = subprocess.Popen(run_cmd(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    started = None
    while time.time() < deadline and proc.poll() is None:
        text = log.read_text() if log.exists() else ""
        if started is None and f"stage {stage}: " in text:
            started = time.time()
        if started is not None and time.time() - started >= delay:
            break
        time.sleep(0.01)
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    text = log.read_text() if log.exists() else ""
    started_stages = [m.group(1) for m in STAGE_LINE.finditer(text)]
    done = {m.group(1) for m in DONE_LINE.finditer(text)}
    inside = [s for s in started_stages if s not in done]
    return {
        "aimed": stage,
        "delay_s": round(delay, 3),
        "killed_in": inside[-1] if inside else ("finished" if finished else "between stages"),
        "stages_done_before_kill": len(done),
    }


def _json_clean(obj):
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items() if not VOLATILE.search(str(k))}
    if isinstance(obj, list):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, str) and ("/" in obj and obj.startswith("/")):
        return "<path>"
    return obj


#: Columns holding a trained model's probabilities: compared within :data:`PROB_TOL`.
MODEL_COLUMNS = re.compile(r"^(model_prob_|pred_prob_|pred_confidence)")
#: Largest difference of a model probability (or a model folder's JSON figure) that still
#: counts as the same result when the weights are not bit-identical (see the module notes).
PROB_TOL = 1e-3


def compare(ref: Path, run: Path) -> tuple[list[str], list[str]]:
    """``(differences, within_tolerance)`` between two run folders' results: the first must
    be empty for the runs to agree; the second lists model outputs that are not bit-identical
    but within :data:`PROB_TOL` (labels equal)."""
    import pyarrow.parquet as pq

    diffs: list[str] = []
    near: list[str] = []
    ref_files = {p.relative_to(ref) for p in ref.rglob("*") if p.is_file()}
    run_files = {p.relative_to(run) for p in run.rglob("*") if p.is_file()}
    for p in sorted(run_files):
        if str(p).endswith(LEFTOVER):
            diffs.append(f"half-written file left: {p}")
    for p in sorted(ref_files - run_files):
        if not str(p).startswith(("logs", "figures")) and p.suffix not in (".png", ".html"):
            diffs.append(f"missing: {p}")
    for p in sorted(ref_files & run_files):
        a, b = ref / p, run / p
        if p.suffix == ".parquet":
            da, db = pq.read_table(a).to_pandas(), pq.read_table(b).to_pandas()
            if list(da.columns) != list(db.columns) or len(da) != len(db):
                diffs.append(f"{p}: columns or rows differ ({len(da)} vs {len(db)} rows)")
                continue
            for c in da.columns:
                if da[c].equals(db[c]):  # NaN == NaN here, unlike Arrow's equals
                    continue
                gap = _max_gap(da[c], db[c]) if MODEL_COLUMNS.match(c) else None
                if gap is not None and gap <= PROB_TOL:
                    near.append(f"{p}:{c} (max {gap:.1e})")
                else:
                    diffs.append(f"{p}: column {c} differs")
        elif p.name == "model.pt":
            gap = _weights_gap(a, b)
            if gap is None:
                diffs.append(f"{p}: different tensors")
            elif gap > 0:
                near.append(f"{p} (weights max {gap:.1e})")
        elif p.suffix == ".json" and p.name != "zarr.json":
            ja, jb = (_json_clean(json.loads(x.read_text())) for x in (a, b))
            if ja == jb:
                continue
            if p.parts[0] == "models" and _json_close(ja, jb):
                near.append(f"{p} (figures within {PROB_TOL:g})")
            else:
                diffs.append(f"{p}: values differ")
    for root in sorted({_zarr_root(p) for p in ref_files if _zarr_root(p)}):
        diffs += _compare_zarr(ref / root, run / root, root)
    return diffs, near


def _max_gap(a, b) -> float | None:
    try:
        return float(np.nanmax(np.abs(a.to_numpy(float) - b.to_numpy(float))))
    except (TypeError, ValueError):
        return None


def _weights_gap(a: Path, b: Path) -> float | None:
    """Largest absolute weight difference of two ``model.pt`` files (None: other tensors)."""
    import torch

    sa, sb = (torch.load(x, map_location="cpu", weights_only=False) for x in (a, b))
    sa, sb = (s.get("model", s) for s in (sa, sb))
    if set(sa) != set(sb):
        return None
    gap = 0.0
    for k, v in sa.items():
        if torch.is_tensor(v):
            if v.shape != sb[k].shape:
                return None
            gap = max(gap, float((v.double() - sb[k].double()).abs().max()) if v.numel() else 0.0)
    return gap


def _json_close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
            return False
        return (a != a and b != b) or abs(a - b) <= PROB_TOL * max(1.0, abs(a))  # NaN == NaN
    return a == b


def _compare_zarr(a: Path, b: Path, root: Path) -> list[str]:
    import zarr

    if not b.exists():
        return [f"missing zarr store: {root}"]
    za, zb = zarr.open(str(a), mode="r"), zarr.open(str(b), mode="r")
    out = []
    for name, arr in _arrays(za):
        other = _get(zb, name)
        if other is None or other.shape != arr.shape:
            out.append(f"{root}/{name}: shape differs")
        elif not np.array_equal(arr[...], other[...]):
            out.append(f"{root}/{name}: values differ")
    return out


def _zarr_root(p: Path) -> Path | None:
    for i, part in enumerate(p.parts):
        if part.endswith(".zarr"):
            return Path(*p.parts[: i + 1])
    return None


def _arrays(node, prefix: str = ""):
    import zarr

    if isinstance(node, zarr.Array):
        yield prefix or ".", node
        return
    for name, child in node.members():
        yield from _arrays(child, f"{prefix}/{name}" if prefix else name)


def _get(node, name: str):
    import zarr

    if name == ".":
        return node if isinstance(node, zarr.Array) else None
    try:
        return node[name]
    except KeyError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=4, help="simulator seed")
    ap.add_argument("--rng", type=int, default=0, help="seed of the kill points")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--stages", default=None, help="comma-separated stages to aim at (default: all)"
    )
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="crash-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    pristine, ref = work / "pristine", work / "reference"
    for p in (pristine, ref):
        shutil.rmtree(p, ignore_errors=True)
    simulate(pristine, args.size, args.seed)
    shutil.copytree(pristine, ref)
    t0 = time.perf_counter()
    subprocess.run(run_cmd(ref), check=True, capture_output=True)
    ref_seconds = time.perf_counter() - t0
    durations = stage_durations((ref / "logs" / "run.log").read_text())
    stages = list(durations)
    aims = args.stages.split(",") if args.stages else stages
    unknown = [s for s in aims if s not in durations]
    if unknown:
        raise SystemExit(f"--stages: {unknown} not among the run's stages {stages}")
    print(f"reference run: {ref_seconds:.1f} s, stages {durations}", flush=True)
    rng = random.Random(args.rng)
    rows = []
    for k in range(args.kills):
        stage = aims[k % len(aims)]
        run = work / f"kill{k:03d}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(pristine, run)
        where = kill_during(run, stage, rng.uniform(0, durations[stage]))
        t1 = time.perf_counter()
        res = subprocess.run(run_cmd(run), capture_output=True, text=True)
        resume_s = time.perf_counter() - t1
        if res.returncode == 0:
            diffs, near = compare(ref, run)
        else:
            diffs, near = [f"resume failed: {res.stderr[-500:]}"], []
        row = {"kill": k, **where, "resume_exit": res.returncode, "resume_s": round(resume_s, 1),
               "same_result": not diffs, "bit_identical": not diffs and not near,
               "differences": diffs[:10], "within_tolerance": near[:10]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not diffs:
            shutil.rmtree(run, ignore_errors=True)  # keep a differing run to look at
    hit = sorted({r["killed_in"] for r in rows})
    summary = {
        "kills": len(rows),
        "same_result": sum(r["same_result"] for r in rows),
        "bit_identical": sum(r["bit_identical"] for r in rows),
        "stages_hit": hit,
        "stages_hit_count": len([h for h in hit if h in stages]),
        "stages": len(stages),
        "reference_s": round(ref_seconds, 1),
        "size": args.size,
    }
    record("crash_loop", [*rows, {"summary": summary}])
    print(json.dumps(summary))
    print(f"{summary['same_result']} of {summary['kills']} killed runs resumed to the reference's "
          f"result ({summary['bit_identical']} bit for bit); kills landed in "
          f"{summary['stages_hit_count']} of {len(stages)} stages")  # fmt: skip
    sys.exit(0 if summary["same_result"] == summary["kills"] else 1)


if __name__ == "__main__":
    main()
