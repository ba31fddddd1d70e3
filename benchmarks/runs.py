"""Running `fedmm simulate` from the benchmark scripts, reusing a finished run only when both its config
and the code that produced it are the ones asked for now."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from fedmm.core.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
# What decides a run's result: the packages a run executes, the user attack the benchmarks plug in, and
# the project file's dependency pins and Flower app tables.
CODE = ("fedmm", "strategies", "server_app", "client_apps", "benchmarks/user_attack.py")
PROJECT_FILE = "pyproject.toml"
# Tables of the project file no run reads: editing the test extra or pytest's settings reruns nothing.
PROJECT_NOT_RUN = (("project", "optional-dependencies", "test"), ("tool", "pytest"))
# The model worker serves deployed nodes; `fedmm simulate`, the only thing cached here, never imports it.
DEPLOY_ONLY = ("client_apps/worker.py",)
# Trust scoring's own files: a run with another defence imports them but runs none of their code (the
# runner builds TrustScoring, the only caller of the rest, for defense.name=trust alone; tested), so
# editing them leaves its result as it was and its cached run valid.
TRUST_ONLY = ("fedmm/robustness/trust.py", "fedmm/robustness/behaviour.py", "strategies/trust_scoring.py")
CODE_VERSION_FILE = "code-version.txt"


def source_files(root: Path) -> list[tuple[str, Path]]:
    """(path relative to `root`, file) of every source file under CODE, in a fixed order."""
    files = []
    for entry in CODE:
        path = root / entry
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        files += [(file.relative_to(root).as_posix(), file) for file in found]
    return files


def _project_tables(path: Path) -> bytes:
    """The project file as a run depends on it: parsed, less PROJECT_NOT_RUN, in one canonical form."""
    project = tomllib.loads(path.read_text())
    for *parents, leaf in PROJECT_NOT_RUN:
        table = project
        for key in parents:
            table = table.get(key, {})
        table.pop(leaf, None)
    return json.dumps(project, sort_keys=True).encode()


def code_version(root: Path | None = None, skip: tuple[str, ...] = ()) -> str:
    """sha256 over the path and bytes of every source file a run executes and the project file's run
    tables (see PROJECT_NOT_RUN), less DEPLOY_ONLY and `skip`: the same in a clone, a worktree or a copy
    of one commit; different after any edit that can change a run, committed or not."""
    root = root or ROOT
    digest = hashlib.sha256()
    for name, file in source_files(root):
        if name not in skip and name not in DEPLOY_ONLY:
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    digest.update(PROJECT_FILE.encode() + b"\0" + _project_tables(root / PROJECT_FILE) + b"\0")
    return digest.hexdigest()


def run_code_version(config: dict) -> str:
    """The code version a run of `config` depends on (see TRUST_ONLY)."""
    return code_version(skip=() if config["defense"]["name"] == "trust" else TRUST_ONLY)


def _without_out(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "out"}


def _wanted(folder: Path, overrides: list[str]) -> dict:
    return to_dict(load_config(overrides=[*overrides, f"out={folder}"]))


def _read_back(folder: Path, wanted: dict, version: str) -> dict | None:
    done, stamp = folder / "summary.json", folder / CODE_VERSION_FILE
    if not (done.is_file() and stamp.is_file() and stamp.read_text().strip() == version):
        return None
    summary = json.loads(done.read_text())
    return summary if _without_out(summary["config"]) == _without_out(wanted) else None


def recorded(folder: Path, overrides: list[str]) -> dict | None:
    """The summary of a finished run in `folder` with exactly the config `overrides` give (wherever it
    was written: `out` aside), made by the code version it depends on; None when there is none."""
    wanted = _wanted(folder, overrides)
    return _read_back(folder, wanted, run_code_version(wanted))


def simulate_cached(folder: Path, overrides: list[str]) -> dict:
    """The summary of `fedmm simulate --out folder overrides`, read back from `folder` when it holds
    the same run (`recorded`), run otherwise."""
    wanted = _wanted(folder, overrides)
    version = run_code_version(wanted)
    summary = _read_back(folder, wanted, version)
    if summary is not None:
        return summary
    stamp = folder / CODE_VERSION_FILE
    stamp.unlink(missing_ok=True)  # a run cut short must not inherit the stamp of an earlier one
    cmd = [sys.executable, "-m", "fedmm.cli", "simulate", "--out", str(folder), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{folder.name} failed:\n{proc.stderr[-3000:]}")
    stamp.write_text(version + "\n")
    return json.loads((folder / "summary.json").read_text())
