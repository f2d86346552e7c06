"""The prepared device check (`benchmarks/gpu.py`) runs end to end on CPU with tiny settings,
so it is ready the day a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("segment_anything")

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--tiny", "--workdir", str(tmp_path / "w"),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]
    by = {(r["check"], r.get("mode") or r.get("precision")): r for r in rows}
    grid, guided = by[("sam", "grid")], by[("sam", "guided")]
    assert grid["prompts_per_tile"] == 4.0  # 8 per 1024 px side -> 2 x 2 on a 256 px tile
    assert guided["prompts_per_tile"] > 0 and guided["tiles_per_s"] > 0
    fp32, bf16 = by[("nucleus network", "fp32")], by[("nucleus network", "bf16")]
    assert fp32["nuclei"] > 20 and abs(fp32["nuclei"] - bf16["nuclei"]) <= 0.05 * fp32["nuclei"]
    boot = by[("bootstrap training", None)]
    assert boot["raw_cells_per_s"] > 0 and 0 < boot["ours_over_raw"]
