"""Benchmark runs are reused only for the same config and the same code."""

import ast
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import runs
from fedmm.core.config import load_config, to_dict


def _fake_simulate(calls, metrics=None):
    def run(cmd, **kwargs):
        folder = Path(cmd[cmd.index("--out") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        config = to_dict(load_config(overrides=[*cmd[cmd.index("--out") + 2:], f"out={folder}"]))
        (folder / "summary.json").write_text(json.dumps({"config": config, "run": len(calls), **(metrics or {})}))
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def _copy_of_the_code(root: Path) -> Path:
    root.mkdir()
    for entry in (*runs.CODE, runs.PROJECT_FILE):
        source = runs.ROOT / entry
        (root / entry).parent.mkdir(parents=True, exist_ok=True)
        if source.is_file():
            shutil.copy(source, root / entry)
        else:
            shutil.copytree(source, root / entry, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_run_is_reused_for_the_same_config_and_code_and_redone_after_either_changes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runs.subprocess, "run", _fake_simulate(calls))
    folder = tmp_path / "row"
    assert runs.simulate_cached(folder, ["rounds=2"])["run"] == 0
    assert runs.simulate_cached(folder, ["rounds=2"])["run"] == 0 and len(calls) == 1  # reused
    assert runs.simulate_cached(folder, ["rounds=3"])["run"] == 1  # another config
    # The same config after the code changed: a copy of the project with one source file edited.
    copy = _copy_of_the_code(tmp_path / "project")
    assert runs.code_version(copy) == runs.code_version()  # a copy of the same code is the same version
    with open(copy / "strategies" / "per_component.py", "a") as f:
        f.write("\n# an edit\n")
    monkeypatch.setattr(runs, "ROOT", copy)
    assert runs.simulate_cached(folder, ["rounds=3"])["run"] == 2 and len(calls) == 3
    assert runs.simulate_cached(folder, ["rounds=3"])["run"] == 2  # and reused again under the new code


def test_the_code_version_sees_dependency_pins_and_not_test_settings_or_the_model_worker(tmp_path):
    copy = _copy_of_the_code(tmp_path / "project")
    before = runs.code_version(copy)
    project = copy / runs.PROJECT_FILE
    text = project.read_text()
    assert 'markers = [' in text and 'test = [' in text
    project.write_text(text.replace('markers = [', 'markers = ["grid: a new marker", ').replace(
        'test = [', 'test = ["pytest-timeout>=2", ') + "\n# a comment\n")
    with open(copy / runs.DEPLOY_ONLY[0], "a") as f:
        f.write("\n# an edit to the model worker\n")
    assert runs.code_version(copy) == before  # nothing a simulated run reads
    project.write_text(project.read_text().replace('"numpy>=1.26"', '"numpy>=2.0"'))
    assert runs.code_version(copy) != before  # a dependency pin can change a result


def test_a_finished_run_is_read_back_from_another_folder_and_only_trust_runs_see_trust_edits(tmp_path, monkeypatch):
    """A run is found wherever its record was moved (the robustness grid's records travel in git); an
    edit to trust scoring's own files redoes the trust runs and leaves the other defences' runs valid,
    an edit anywhere else redoes both."""
    calls = []
    monkeypatch.setattr(runs.subprocess, "run", _fake_simulate(calls))
    for defense in ("trust", "median"):
        runs.simulate_cached(tmp_path / "first" / defense, [f"defense.name={defense}"])
    shutil.copytree(tmp_path / "first", tmp_path / "moved")
    for defense in ("trust", "median"):
        runs.simulate_cached(tmp_path / "moved" / defense, [f"defense.name={defense}"])
    assert len(calls) == 2  # both read back from their new folder

    copy = _copy_of_the_code(tmp_path / "project")
    monkeypatch.setattr(runs, "ROOT", copy)
    with open(copy / runs.TRUST_ONLY[0], "a") as f:
        f.write("\n# an edit to trust scoring\n")
    runs.simulate_cached(tmp_path / "moved" / "median", ["defense.name=median"])
    assert len(calls) == 2  # still valid
    runs.simulate_cached(tmp_path / "moved" / "trust", ["defense.name=trust"])
    assert len(calls) == 3 and "defense.name=trust" in calls[-1]
    with open(copy / "fedmm" / "core" / "aggregation.py", "a") as f:
        f.write("\n# an edit to what every run executes\n")
    runs.simulate_cached(tmp_path / "moved" / "median", ["defense.name=median"])
    assert len(calls) == 4


def test_only_trust_scoring_runs_the_trust_only_files(monkeypatch):
    """What lets runs.TRUST_ONLY leave other defences' code version alone: every other defence builds
    its strategy without TrustScoring or the behaviour check (their only way into those files)."""
    from fedmm.core.config import DEFENSES
    from fedmm.robustness import behaviour
    from server_app import runner
    from strategies.nodes import NodeRegistry

    def refuse(*args, **kwargs):
        raise AssertionError("trust scoring's code ran")

    monkeypatch.setattr(runner.TrustScoring, "__init__", refuse)
    monkeypatch.setattr(behaviour.BehaviourCheck, "__init__", refuse)
    for defense in DEFENSES:
        run = load_config(overrides=[f"defense.name={defense}", "attack.name=backdoor", "attack.fraction=0.3"])
        if defense == "trust":
            with pytest.raises(AssertionError, match="trust scoring's code ran"):
                runner.build_strategy(run, NodeRegistry(run))
        else:
            runner.build_strategy(run, NodeRegistry(run))


def test_only_the_worker_command_imports_the_deploy_only_files():
    """What lets runs.DEPLOY_ONLY leave the code version alone: no module a run executes imports the
    model worker; `fedmm worker` alone does, inside its own branch of the command line."""
    importers = set()
    for relative, file in runs.source_files(runs.ROOT):
        for node in ast.walk(ast.parse(file.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.value for a in node.args if isinstance(a, ast.Constant)]
                     if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" else [])
            if any(name.replace(".", "/") + ".py" in runs.DEPLOY_ONLY for name in names):
                importers.add(relative)
    assert importers == {"fedmm/cli.py"}
    cli = (runs.ROOT / "fedmm" / "cli.py").read_text()
    branch = cli[cli.index('if args.command == "worker":'):]
    assert branch.index('import_module("client_apps.worker")') < branch.index("\n    if ")


def test_the_grid_reads_back_recorded_cells_and_keeps_another_setting_apart(tmp_path, monkeypatch):
    from benchmarks import robustness

    calls = []
    metrics = {f"final.global.{t}.accuracy": 0.9 for t in robustness.TASKS}
    monkeypatch.setattr(runs.subprocess, "run", _fake_simulate(calls, metrics))
    assert robustness.run_one("backdoor", "median", 0, tmp_path, [], run=False) is None and not calls
    ran = robustness.run_one("backdoor", "median", 0, tmp_path, [])
    robustness.run_one("backdoor", "median", 0, tmp_path, robustness.SMALL)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2  # the small pass did not overwrite the cell
    assert robustness.run_one("backdoor", "median", 0, tmp_path, [], run=False) == ran
    assert ran["clean_accuracy"] == 0.9 and len(ran["code_version"]) == 64


def test_a_run_without_its_code_stamp_is_not_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runs.subprocess, "run", _fake_simulate(calls))
    folder = tmp_path / "row"
    runs.simulate_cached(folder, ["rounds=2"])
    (folder / runs.CODE_VERSION_FILE).unlink()  # e.g. a folder from before runs were stamped
    assert runs.simulate_cached(folder, ["rounds=2"])["run"] == 1 and len(calls) == 2


def test_the_robustness_table_flags_a_frozen_cell_and_gives_the_spread_over_seeds():
    from benchmarks.robustness import table

    def result(defense, seed, success, problems=()):
        return {"attack": "backdoor", "defense": defense, "seed": seed, "clean_accuracy": 0.9,
                "attack_success": success, "problems": list(problems)}

    results = [result("none", 0, 0.8), result("none", 1, 0.6),
               result("krum", 0, 0.01, ["component 'head.vqa' never changed"]), result("krum", 1, 0.02)]
    row = table(results, ["backdoor"], ["none", "krum"]).splitlines()[-1]
    none_cell, krum_cell = row.split(" | ")[1:3]
    assert none_cell == "0.900 ± 0.000 / 0.700 ± 0.100"
    assert krum_cell.endswith("(frozen) |") or krum_cell.endswith("(frozen)")
    assert "(frozen)" not in none_cell


def test_the_user_mimicry_attack_keeps_the_backdoor_direction_in_benign_statistics():
    import numpy as np

    from fedmm.core.schema import AttackConfig
    from fedmm.robustness.attacks import AttackContext, resolve_attack

    attack = resolve_attack(AttackConfig(name="benchmarks.user_attack:backdoor_mimicry", fraction=0.3,
                                         data="backdoor"))
    assert attack.data == "backdoor"
    rng = np.random.default_rng(0)
    benign = rng.standard_normal(500).astype(np.float32) * 0.01
    poisoned = rng.standard_normal((3, 500)).astype(np.float32) * 5.0  # far larger than any honest update
    out = attack.model(poisoned, AttackContext(AttackConfig(), rng, benign, 10))
    for row, original in zip(out, poisoned):
        np.testing.assert_allclose(np.sort(np.abs(row)), np.sort(np.abs(benign)))  # norm, spikiness: benign's
        assert (np.sign(row) == np.sign(original)).all()  # the direction is the attacker's
        assert np.corrcoef(np.abs(row), np.abs(original))[0, 1] > 0.9  # rank by magnitude kept
    assert attack.model(poisoned, AttackContext(AttackConfig(), rng, None, 10)) is poisoned  # nothing seen yet


def test_the_robustness_grid_refuses_fewer_than_one_seed_before_writing_anything(tmp_path):
    import sys

    proc = subprocess.run([sys.executable, str(runs.ROOT / "benchmarks" / "robustness.py"), "--seeds", "0",
                           "--recorded", "--out", str(tmp_path / "grid")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--seeds must be at least 1" in proc.stderr
    assert not (tmp_path / "grid").exists()
