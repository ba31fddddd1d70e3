"""Benchmark runs are reused only for the same config and the same code."""

import json
import shutil
import subprocess
from pathlib import Path

from benchmarks import runs
from fedmm.core.config import load_config, to_dict


def _fake_simulate(calls):
    def run(cmd, **kwargs):
        folder = Path(cmd[cmd.index("--out") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        config = to_dict(load_config(overrides=[*cmd[cmd.index("--out") + 2:], f"out={folder}"]))
        (folder / "summary.json").write_text(json.dumps({"config": config, "run": len(calls)}))
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_a_run_is_reused_for_the_same_config_and_code_and_redone_after_either_changes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runs.subprocess, "run", _fake_simulate(calls))
    folder = tmp_path / "row"
    assert runs.simulate_cached(folder, ["rounds=2"])["run"] == 0
    assert runs.simulate_cached(folder, ["rounds=2"])["run"] == 0 and len(calls) == 1  # reused
    assert runs.simulate_cached(folder, ["rounds=3"])["run"] == 1  # another config
    # The same config after the code changed: a copy of the project with one source file edited.
    copy = tmp_path / "project"
    copy.mkdir()
    for entry in runs.CODE:
        source = runs.ROOT / entry
        if source.is_file():
            shutil.copy(source, copy / entry)
        else:
            shutil.copytree(source, copy / entry, ignore=shutil.ignore_patterns("__pycache__"))
    assert runs.code_version(copy) == runs.code_version()  # a copy of the same code is the same version
    with open(copy / "strategies" / "per_component.py", "a") as f:
        f.write("\n# an edit\n")
    monkeypatch.setattr(runs, "ROOT", copy)
    assert runs.simulate_cached(folder, ["rounds=3"])["run"] == 2 and len(calls) == 3
    assert runs.simulate_cached(folder, ["rounds=3"])["run"] == 2  # and reused again under the new code


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
