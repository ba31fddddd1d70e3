"""The oracle bound: FedAvg over exactly the clients the simulator did not make malicious."""

import numpy as np
import pytest
from flwr.app import Error, Message
from local_grid import LocalGrid
from safetensors.numpy import load_file

from client_apps.app import make_client_app
from fedmm.robustness.attacks import malicious_clients
from fedmm.core.config import load_config
from fedmm.core.schema import ConfigError
from server_app.runner import run_federation

FAST = ["clients.num=5", "data.examples_per_task=400", "model.image_encoder=", "model.text_encoder=", "model.hidden_size=32", "model.intermediate_size=64",
        "model.fusion_dim=16", "rounds=2", "train.local_steps=3", "train.batch_size=8"]


def _failed(reply: Message) -> Message:
    return Message(Error(code=0, reason="left out"), reply_to=reply)


def test_the_oracle_aggregates_exactly_the_honest_clients(tmp_path):
    run = load_config(overrides=[*FAST, "attack.name=sign_flip", "attack.fraction=0.4", "defense.name=oracle",
                                 f"out={tmp_path / 'oracle'}"])
    malicious = malicious_clients(run)
    assert len(malicious) == 2
    oracle = run_federation(LocalGrid(make_client_app(run), 5), run)
    # The same federation without an attack, where the malicious clients' training replies never arrive.
    plain = load_config(overrides=[*FAST, f"out={tmp_path / 'plain'}"])
    run_federation(LocalGrid(make_client_app(plain), 5, tamper={p: _failed for p in malicious}), plain)
    for r in (1, 2):
        a = load_file(str(tmp_path / "oracle" / "checkpoints" / f"round-{r:04d}.safetensors"))
        b = load_file(str(tmp_path / "plain" / "checkpoints" / f"round-{r:04d}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert oracle["attack.malicious_clients"] == sorted(malicious)


def test_the_oracle_needs_an_attack():
    with pytest.raises(ConfigError, match="oracle"):
        load_config(overrides=["defense.name=oracle"])
