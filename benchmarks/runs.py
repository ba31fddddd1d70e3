"""Running `fedmm simulate` from the benchmark scripts, reusing a finished run with the same config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedmm.core.config import load_config, to_dict


def simulate_cached(folder: Path, overrides: list[str]) -> dict:
    """The summary of `fedmm simulate --out folder overrides`; a folder that already holds a finished
    run with exactly this config is read back instead of run again."""
    wanted = to_dict(load_config(overrides=[*overrides, f"out={folder}"]))
    done = folder / "summary.json"
    if not (done.is_file() and json.loads(done.read_text())["config"] == wanted):
        cmd = [sys.executable, "-m", "fedmm.cli", "simulate", "--out", str(folder), *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{folder.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(done.read_text())
