"""Running `fedmm simulate` from the benchmark scripts, reusing a finished run only when both its config
and the code that produced it are the ones asked for now."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from fedmm.core.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
# What decides a run's result: the packages a run executes and the project file that pins its dependencies.
CODE = ("fedmm", "strategies", "server_app", "client_apps", "pyproject.toml")
CODE_VERSION_FILE = "code-version.txt"


def code_version(root: Path | None = None) -> str:
    """sha256 over the path and bytes of every source file a run executes (and pyproject.toml): the same
    in a clone, a worktree or a copy of one commit; different after any edit, committed or not."""
    root = root or ROOT
    digest = hashlib.sha256()
    for entry in CODE:
        path = root / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        for file in files:
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def simulate_cached(folder: Path, overrides: list[str]) -> dict:
    """The summary of `fedmm simulate --out folder overrides`; a folder that already holds a finished
    run with exactly this config, made by this code version, is read back instead of run again."""
    wanted = to_dict(load_config(overrides=[*overrides, f"out={folder}"]))
    version = code_version()
    done, stamp = folder / "summary.json", folder / CODE_VERSION_FILE
    reusable = (done.is_file() and stamp.is_file() and stamp.read_text().strip() == version
                and json.loads(done.read_text())["config"] == wanted)
    if not reusable:
        stamp.unlink(missing_ok=True)  # a run cut short must not inherit the stamp of an earlier one
        cmd = [sys.executable, "-m", "fedmm.cli", "simulate", "--out", str(folder), *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{folder.name} failed:\n{proc.stderr[-3000:]}")
        stamp.write_text(version + "\n")
    return json.loads(done.read_text())
