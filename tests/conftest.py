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
