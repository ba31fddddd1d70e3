"""`flwr run .` through a real local SuperLink gives the same run as `fedmm simulate`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from ports import unused_port

ROOT = Path(__file__).parents[1]
# A Flower strategy with an argument, behind client-side DP: the proximal term, the node's clipping mod,
# the seeded DP noise and the privacy ledger all have to come out the same both ways.
CONFIG = {"clients.num": 3, "rounds": 2, "data.examples_per_task": 300, "train.local_steps": 5, "seed": 3,
          "strategy.name": "flwr.serverapp.strategy.FedProx", "strategy.args": "proximal_mu=0.01",
          "dp.name": "client-fixed", "dp.clipping_norm": 5.0, "dp.noise_multiplier": 0.01}


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """Our own SuperLink on a free port with its own FLWR_HOME, stopped after the tests."""
    home = tmp_path_factory.mktemp("flwr-home")
    port = unused_port()
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0")
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local-in-memory:"\n')
    proc = subprocess.Popen(
        ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
         "--port", str(port), "--log-file", str(home / "superlink.log")],
        env=env, cwd=home, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the SuperLink did not start")
        time.sleep(0.3)
    yield env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _run_config(out: Path) -> str:
    return " ".join([f'out="{out}"'] + [f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in CONFIG.items()])


@pytest.fixture(scope="module")
def flwr_run(superlink, tmp_path_factory):
    """One complete `flwr run` of CONFIG: (results folder, run id). The machine's Ray cluster file names
    a dead head meanwhile, as a Ray head that died leaves it: the run must neither hang nor join it."""
    from fedmm.engine.ray_cluster import _cluster_file

    out = tmp_path_factory.mktemp("flwr") / "run"
    file = _cluster_file()
    saved = file.read_text() if file.is_file() else None
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(f"127.0.0.1:{unused_port()}")
    try:
        return out, _flwr_run(superlink, _run_config(out))["run-id"]
    finally:
        if saved is None:
            file.unlink(missing_ok=True)
        else:
            file.write_text(saved)


@pytest.mark.slow
def test_flwr_run_matches_fedmm_simulate(superlink, flwr_run, tmp_path):
    (flwr_out, run_id), sim_out = flwr_run, tmp_path / "sim"
    listing = subprocess.run(["flwr", "ls", "--run-id", str(run_id), "--format", "json"], env=superlink,
                             capture_output=True, text=True, timeout=120)
    assert json.loads(listing.stdout)["runs"][0]["status"] == "finished:completed", listing.stdout
    assert (flwr_out / "summary.json").is_file()

    sim = subprocess.run([sys.executable, "-m", "fedmm.cli", "simulate", "--out", str(sim_out),
                          *[f"{k}={v}" for k, v in CONFIG.items()]], capture_output=True, text=True, timeout=600)
    assert sim.returncode == 0, sim.stderr[-3000:]

    a = load_file(str(flwr_out / "checkpoints" / "round-0002.safetensors"))
    b = load_file(str(sim_out / "checkpoints" / "round-0002.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
    summary_a = json.loads((flwr_out / "summary.json").read_text())
    summary_b = json.loads((sim_out / "summary.json").read_text())
    assert summary_a["strategy.composition"] == summary_b["strategy.composition"] == (
        "DP clip (client, fixed, per component) -> FedProx per component -> DP noise "
        "(DifferentialPrivacyClientSideFixedClipping)")
    assert summary_a["dp"]["epsilon"] == pytest.approx(summary_b["dp"]["epsilon"]) and summary_a["dp"]["epsilon"] > 0
    accuracies = [k for k in summary_a if k.endswith(".accuracy")]
    assert accuracies and all(summary_a[k] == pytest.approx(summary_b[k], abs=1e-9) for k in accuracies)


@pytest.mark.slow
def test_a_server_killed_under_flwr_run_resumes_to_the_same_arrays(superlink, flwr_run, tmp_path):
    full, _ = flwr_run
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    # What a server killed during round 2 leaves: rounds 0 and 1 recorded and checkpointed, no summary.
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows
                                               if r["round"] <= 1 and "stage" not in r))
    (cut / "checkpoints" / "round-0002.safetensors").unlink()
    (cut / "summary.json").unlink()
    reply = _flwr_run(superlink, _run_config(cut) + " resume=true")
    listing = subprocess.run(["flwr", "ls", "--run-id", str(reply["run-id"]), "--format", "json"], env=superlink,
                             capture_output=True, text=True, timeout=120)
    assert json.loads(listing.stdout)["runs"][0]["status"] == "finished:completed", listing.stdout
    a = load_file(str(full / "checkpoints" / "round-0002.safetensors"))
    b = load_file(str(cut / "checkpoints" / "round-0002.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
    resumed = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in resumed if "stage" not in r] == [0, 1, 2]  # round 2 run once, after the cut
    assert (cut / "summary.json").is_file()


def _flwr_run(env: dict, run_config: str, timeout: int = 600) -> dict:
    cmd = ["flwr", "run", str(ROOT), "--stream", "--format", "json", "--federation-config",
           f"num-supernodes={CONFIG['clients.num']} client-resources-num-cpus=1", "--run-config", run_config]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_flwr_run_refuses_an_unknown_key(superlink, tmp_path):
    reply = _flwr_run(superlink, f'out="{tmp_path}" train.lrr=1')
    assert reply["success"] is False and "Invalid run configuration" in reply["error-message"]


@pytest.mark.slow
def test_flwr_run_with_a_bad_value_fails_before_any_round(superlink, tmp_path):
    out = tmp_path / "bad"
    reply = _flwr_run(superlink, f'out="{out}" train.lr=-1.0')
    listing = subprocess.run(["flwr", "ls", "--run-id", str(reply["run-id"]), "--format", "json"], env=superlink,
                             capture_output=True, text=True, timeout=120)
    assert json.loads(listing.stdout)["runs"][0]["status"] == "finished:failed"
    assert not (out / "metrics.jsonl").exists()


# SPEAR on the shipped language-model base: sampling, revisions and unlikelihood must come out the same.
SPEAR = {"clients.num": 3, "rounds": 2, "seed": 1, "model.language_model": "fedmm:arith-lm",
         "data.source": "arithmetic", "clients.profiles": "arithmetic=arithmetic", "train.objective": "spear",
         "feedback.prompts_per_round": 16, "train.local_steps": 3, "data.examples_per_task": 300}


@pytest.mark.slow
def test_a_spear_run_through_flwr_run_matches_fedmm_simulate(superlink, tmp_path):
    flwr_out, sim_out = tmp_path / "flwr", tmp_path / "sim"
    config = " ".join([f'out="{flwr_out}"'] + [f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}"
                                               for k, v in SPEAR.items()])
    reply = _flwr_run(superlink, config)
    listing = subprocess.run(["flwr", "ls", "--run-id", str(reply["run-id"]), "--format", "json"], env=superlink,
                             capture_output=True, text=True, timeout=120)
    assert json.loads(listing.stdout)["runs"][0]["status"] == "finished:completed", listing.stdout
    sim = subprocess.run([sys.executable, "-m", "fedmm.cli", "simulate", "--out", str(sim_out),
                          *[f"{k}={v}" for k, v in SPEAR.items()]], capture_output=True, text=True, timeout=600)
    assert sim.returncode == 0, sim.stderr[-3000:]
    a = load_file(str(flwr_out / "checkpoints" / "round-0002.safetensors"))
    b = load_file(str(sim_out / "checkpoints" / "round-0002.safetensors"))
    before = load_file(str(sim_out / "checkpoints" / "round-0000.safetensors"))
    assert a.keys() == b.keys() and any(not np.array_equal(b[k], before[k]) for k in b)  # it trained
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
    rows = [json.loads(line) for line in (sim_out / "metrics.jsonl").read_text().splitlines()]
    flwr_rows = [json.loads(line) for line in (flwr_out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train.feedback.wins") for r in rows] == [r.get("train.feedback.wins") for r in flwr_rows]
    assert all(r["train.feedback.wins"] > 0 for r in rows if "train.feedback.prompts" in r)
