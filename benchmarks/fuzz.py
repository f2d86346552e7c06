"""Fuzzing at size: every reader/parser family of ``tests/fuzz`` with N generated bad inputs
(new random cases each run), printing per family the cases run, failures and seconds.

    python benchmarks/fuzz.py --examples 300

A failure prints the smallest input hypothesis found; the exit status is non-zero then.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--examples", type=int, default=300, help="generated inputs per family")
    args = ap.parse_args()
    env = {
        **os.environ,
        "IMMUNOCTO_FUZZ_EXAMPLES": str(args.examples),
        "IMMUNOCTO_FUZZ_RANDOM": "1",
    }
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/fuzz", "-p", "no:logging", "-p", "no:cacheprovider",
         "--hypothesis-show-statistics", "-W", "ignore::hypothesis.errors.HypothesisWarning"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    families = re.findall(
        r"test_fuzz_inputs.py::(\w+):\n.*?- (\d+) passing, (\d+) failing", out.stdout, re.S
    )
    print(f"{'family':32} {'cases':>6} {'failures':>8}")
    for name, passing, failing in families:
        print(f"{name:32} {int(passing) + int(failing):6d} {int(failing):8d}")
    print(f"total {seconds:.1f} s; pytest exit status {out.returncode}")
    if out.returncode:
        print(out.stdout[-6000:])
    sys.exit(out.returncode)


if __name__ == "__main__":
    main()
