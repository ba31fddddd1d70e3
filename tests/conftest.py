import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedmm.core.config import load_config
from fedmm.core.schema import RunConfig


@pytest.fixture
def small_run() -> RunConfig:
    """A small, fast federation for unit tests."""
    return load_config(overrides=["clients.num=6", "data.examples_per_task=300", "model.image_encoder=", "model.text_encoder=", "model.hidden_size=32",
                                  "model.intermediate_size=64", "model.fusion_dim=16", "rounds=2",
                                  "train.local_steps=3", "train.batch_size=8"])


# One real loopback federation (deploy/run-local.sh, TLS + node auth, a Flower strategy behind client
# DP), shared by the test that checks it and by the one that reruns it over separate hosts.
LOOPBACK_ARGS = ["--tls", "--auth", "--supernodes", "3", "--rounds", "2", "--run-config",
                 'data.examples_per_task=300 train.local_steps=5 strategy.name="flwr.serverapp.strategy.FedAvgM" '
                 'strategy.args="server_momentum=0.5" dp.name="client-adaptive" dp.noise_multiplier=0.01']


@pytest.fixture(scope="session")
def loopback_run(tmp_path_factory):
    """(results folder, completed process) of deploy/run-local.sh with LOOPBACK_ARGS."""
    import subprocess
    from pathlib import Path

    out = tmp_path_factory.mktemp("loopback") / "run"
    proc = subprocess.run([str(Path(__file__).parents[1] / "deploy" / "run-local.sh"), *LOOPBACK_ARGS, "--out",
                           str(out)], capture_output=True, text=True, timeout=1200)
    return out, proc
