"""End to end: `fedmm simulate` on Flower's Simulation Engine with real Ray."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import fedmm.engine.ray_cluster as ray_cluster

from ports import unused_port

# The shipped base, IID, 3 rounds of 20 steps: 6 clients learn every task in about a minute (measured
# with this seed: 0.261 -> 0.994, 0.261 -> 1.000, 0.067 -> 0.422 for img_shape / txt_color / vqa).
SMALL = ["clients.num=6", "rounds=3", "train.local_steps=20", "data.examples_per_task=900",
         "data.partitioner=iid", "seed=1"]


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    """The SMALL simulation, run while the machine's Ray cluster file names a dead head (what a Ray head
    that died leaves behind): a local simulation must neither join it nor hang on it."""
    out = tmp_path_factory.mktemp("sim") / "run"
    file = ray_cluster._cluster_file()
    saved = file.read_text() if file.is_file() else None
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        file.write_text(f"127.0.0.1:{unused_port()}")
        proc = subprocess.run([sys.executable, "-m", "fedmm.cli", "simulate", "--out", str(out), *SMALL],
                              capture_output=True, text=True, timeout=900)
    finally:
        if saved is None:
            file.unlink(missing_ok=True)
        else:
            file.write_text(saved)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.mark.slow
def test_simulation_learns_every_task(sim_run):
    out, _ = sim_run
    summary = json.loads((out / "summary.json").read_text())
    for task in ("img_shape", "txt_color", "vqa"):
        gain = summary[f"final.global.{task}.accuracy"] - summary[f"initial.global.{task}.accuracy"]
        assert gain >= 0.25, (task, gain)
    assert summary["rounds"] == 3 and summary["clients"] == 6 and summary["status"] == "completed"
    assert summary["bytes.uplink_per_client_round_mean"] <= 0.05 * summary["bytes.full_model"]
    assert summary["clients_rejected_total"] == 0


@pytest.mark.slow
def test_a_stale_cluster_file_neither_hangs_nor_is_joined(sim_run):
    out, proc = sim_run
    # Joining the dead head would have stopped the run before its first round (exit 2, naming it).
    assert proc.returncode == 0 and json.loads((out / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_simulation_writes_the_results_folder(sim_run):
    out, proc = sim_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3, 3]
    assert records[-1]["stage"] == "final" and "personal.vqa.accuracy" in records[-1]
    records = records[:-1]
    assert all(r["train.clients-accepted"] == 6 for r in records[1:])
    assert (out / "config.yaml").read_text().startswith("seed: 1")
    assert (out / "accuracy.png").stat().st_size > 1000
    first = load_file(str(out / "checkpoints" / "round-0000.safetensors"))
    last = load_file(str(out / "checkpoints" / "round-0003.safetensors"))
    assert first.keys() == last.keys() and len(first) > 10
    assert all(np.isfinite(v).all() for v in last.values())
    assert any(not np.array_equal(first[k], last[k]) for k in first)
    assert "global test accuracy" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_bad_config_stops_before_any_work(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "fedmm.cli", "simulate", "--out", str(out), "train.lrr=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'train.lrr'" in proc.stderr
    assert not out.exists()


def test_a_user_whose_gpu_the_simulated_clients_cannot_see_is_told(monkeypatch):
    import torch

    from fedmm.cli import hidden_gpu_note
    from fedmm.core.config import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "clients.num_gpus" in hidden_gpu_note(load_config())
    assert hidden_gpu_note(load_config(None, ["clients.num_gpus=0.25"])) is None
    assert hidden_gpu_note(load_config(None, ["train.device=cpu"])) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hidden_gpu_note(load_config()) is None


@pytest.mark.slow
def test_an_attacked_simulation_with_trust_scoring_on_real_ray(tmp_path):
    out = tmp_path / "attacked"
    tiny = ["clients.num=6", "rounds=2", "data.examples_per_task=480", "model.image_encoder=", "model.text_encoder=", "model.hidden_size=32",
            "model.intermediate_size=64", "model.fusion_dim=16", "train.local_steps=5"]
    proc = subprocess.run([sys.executable, "-m", "fedmm.cli", "simulate", "--out", str(out), *tiny,
                           "attack.name=scaling", "attack.fraction=0.34", "defense.name=trust",
                           # the statistical stages on real Ray: on tiny random encoders the trigger search
                           # finds noise (it caught an honest client here), and a client it catches leaves
                           # the statistics, too few for the inspection's anchors; it has its own tests
                           "defense.behaviour=false"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["attack.malicious_clients"]) == 2
    per_task = [summary[f"final.backdoor.{task}.success_rate"] for task in ("img_shape", "txt_color", "vqa")]
    assert min(per_task) <= summary["final.attack.success_rate"] <= max(per_task)
    assert summary["detection.client_rounds_malicious"] == 4
    # Scaled updates (x10, clipped at 2x their own norm) stand out: trust scoring flags some of them.
    assert summary["detection.recall"] > 0
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reports = [r["trust"] for r in rounds if "trust" in r]
    assert len(reports) == 2 and all(set(r) == {str(p) for p in range(6)} for r in reports)
    assert (out / "trust.png").stat().st_size > 1000
    assert (out / "checkpoints" / "round-0002.trust.json").is_file()
