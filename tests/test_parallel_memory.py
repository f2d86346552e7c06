"""Freed memory kept for reuse between tiles (``immunocto._memory``)."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str, **env: str) -> str:
    import os

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_thresholds_are_set_once_and_can_be_left_alone():
    code = "from immunocto._memory import reuse_freed_memory as r; import sys;print(r(), r())"
    assert _run(code) in ("True True", "False False")  # False only where there is no glibc
    assert _run(code, IMMUNOCTO_MALLOC="system") == "False False"
