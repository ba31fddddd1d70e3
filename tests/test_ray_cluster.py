"""A simulation never joins a Ray cluster nobody named, and a named one that does not answer is a
clear error, not a hang. (End to end, a stale cluster file: tests/test_simulation.py's simulation runs
with one planted.)"""

import os
import sys
import time

import pytest

import fedmm.engine.ray_cluster as ray_cluster
from fedmm.cli import main
from fedmm.engine.ray_cluster import RayClusterUnreachable, check_reachable, ray_init_args, resolve_address

from ports import unused_port

TINY = ["clients.num=3", "rounds=1", "data.examples_per_task=240", "model.image_encoder=", "model.text_encoder=",
        "model.hidden_size=32", "model.intermediate_size=64", "model.fusion_dim=16", "train.local_steps=3",
        "train.batch_size=8"]


def test_a_local_simulation_starts_its_own_ray_instance():
    assert ray_init_args("") == {"address": "local"}


def test_a_dead_head_is_named_within_the_timeout():
    address = f"127.0.0.1:{unused_port()}"
    start = time.monotonic()
    with pytest.raises(RayClusterUnreachable, match=f"the Ray head at {address} .* did not answer"):
        check_reachable(address, timeout_s=5)
    assert time.monotonic() - start < 6


def test_auto_reads_the_cluster_file_and_names_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    file = tmp_path / "ray_current_cluster"
    monkeypatch.setattr(ray_cluster, "_cluster_file", lambda: file)
    with pytest.raises(RayClusterUnreachable, match="no Ray cluster runs on this machine"):
        resolve_address("auto")
    file.write_text(f"127.0.0.1:{unused_port()}\n")
    assert resolve_address("auto") == (file.read_text().strip(), str(file))
    with pytest.raises(RayClusterUnreachable, match=str(file)):
        ray_init_args("auto")
    with pytest.raises(RayClusterUnreachable, match="is not host:port"):
        check_reachable("nonsense")


@pytest.mark.parametrize("argv0, named, expected", [
    ("/venv/bin/flwr-simulation", None, "local"),  # flwr run's simulation process: a local instance
    ("/venv/bin/flwr-simulation", "10.0.0.7:6379", "10.0.0.7:6379"),  # a cluster the user named is kept
    ("/venv/bin/fedmm", None, None),  # anywhere else nothing changes
])
def test_flwr_runs_simulation_process_starts_a_local_ray_unless_told_otherwise(monkeypatch, argv0, named, expected):
    monkeypatch.setattr(sys, "argv", [argv0])
    if named is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", named)
    ray_cluster.keep_flower_simulation_local()
    assert os.environ.get("RAY_ADDRESS") == expected


def test_simulate_with_a_dead_cluster_exits_2_naming_the_address(tmp_path, capsys):
    address = f"127.0.0.1:{unused_port()}"
    assert main(["simulate", "--out", str(tmp_path / "run"), "--ray-address", address, *TINY]) == 2
    err = capsys.readouterr().err
    assert address in err and "--ray-address" in err
    assert not (tmp_path / "run" / "summary.json").exists()
