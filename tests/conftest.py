import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: torch in each (and in every process a test starts) takes one thread,
    # or both slow down several times.
    os.environ["OMP_NUM_THREADS"] = "1"
    # Each worker's Ray sessions and its "current cluster" file apart: the tests that plant a dead head
    # there must not see the other worker's live one, nor clobber it.
    os.environ["RAY_TMPDIR"] = os.path.join("/tmp", f"fedmm-ray-{os.environ['PYTEST_XDIST_WORKER']}")

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


def _ours(fixture) -> bool:
    """A fixture defined in this folder (not pytest's own, such as tmp_path_factory)."""
    return Path(fixture.__code__.co_filename).parent == Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the group marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, the README's command): tests using the same module- or
    session-scoped fixtures form one group, run on one worker that builds them once; every slow
    test is a group of its own; groups holding slow tests are handed out first, so the long end-to-end
    runs (mostly waiting on Flower's timeouts) overlap the unit tests instead of ending the run alone."""
    # A worker sees dist "no" and loadgroup set (xdist's own setup); the controller collects nothing.
    if not config.getoption("loadgroup", False):
        return
    group_of = {}
    for item in items:
        shared = {name: defs[-1].scope for name, defs in item._fixtureinfo.name2fixturedefs.items()
                  if defs[-1].scope in ("module", "session") and _ours(defs[-1].func)}
        # One group per set of shared fixtures: a cheap fixture (a SuperLink) may be built on both
        # workers so that two long runs behind it need not wait for each other.
        group = ("session" if "session" in shared.values() else f"{item.path.name}:{','.join(sorted(shared))}"
                 if shared else item.nodeid if item.get_closest_marker("slow") else None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        group_of[item.nodeid] = group or item.nodeid
    slow = {group_of[item.nodeid] for item in items if item.get_closest_marker("slow")}
    first: dict[str, int] = {}

    def order(pair):
        index, item = pair
        group = group_of[item.nodeid]
        return group not in slow, first.setdefault(group, index), index

    items[:] = [item for _, item in sorted(enumerate(items), key=order)]
