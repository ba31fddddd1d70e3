"""The deployment recipes in deploy/, run for real: a SuperLink and SuperNodes as separate processes on
loopback, talking Flower's gRPC/HTTPS transport with TLS and SuperNode authentication."""

import json
import os
import re
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from ports import unused_port

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
SMALL = "data.examples_per_task=300 train.local_steps=5"


def _flower_processes_of(root: Path) -> list[str]:
    """Flower processes whose command line mentions `root` (what a test started there)."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if str(root) in line and ("flower-" in line or "flwr" in line)]


def test_certs_make_a_ca_a_superlink_certificate_for_its_hosts_and_openssh_node_keys(tmp_path):
    subprocess.run(["python", str(DEPLOY / "certs.py"), "--out", str(tmp_path), "--hosts", "localhost,10.0.0.7",
                    "--supernodes", "2"], check=True, capture_output=True)
    cert = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.0.0.7", "127.0.0.1"}
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (tmp_path / "supernode-1").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (tmp_path / "supernode-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct((tmp_path / "supernode-0").stat().st_mode & 0o777) == "0o600"
    before = (tmp_path / "ca.crt").read_bytes()
    subprocess.run(["python", str(DEPLOY / "certs.py"), "--out", str(tmp_path), "--supernodes", "3"], check=True,
                   capture_output=True)
    assert (tmp_path / "ca.crt").read_bytes() == before and (tmp_path / "supernode-2").is_file()  # nothing overwritten


@pytest.mark.parametrize("args, message", [
    (["--supernodes", "3", "--rounds", "2"], "--out DIR is required"),
    (["--auth", "--supernodes", "3", "--rounds", "2", "--out", "x"], "--auth needs --tls"),
    (["--supernodes", "0", "--rounds", "2", "--out", "x"], "--supernodes N"),
    (["--supernodes", "2", "--rounds", "2", "--out", "x", "--run-config", "rounds=5"], "set out, clients.num and rounds"),
])
def test_run_local_refuses_bad_arguments_before_starting_anything(tmp_path, args, message):
    proc = subprocess.run([str(DEPLOY / "run-local.sh"), *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--superlink", "127.0.0.1:9092", "--partition-id", "0", "--connect-timeout", "soon"], "--connect-timeout must"),
    (["--superlink", "superlink.example.org", "--partition-id", "0"], "is not HOST:PORT"),
])
def test_supernode_refuses_bad_arguments(args, message):
    proc = subprocess.run([str(DEPLOY / "supernode.sh"), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_supernode_given_a_ca_file_that_is_no_certificate_says_so_before_flower_starts(tmp_path):
    (tmp_path / "ca.crt").write_text("not a certificate\n")
    proc = subprocess.run([str(DEPLOY / "supernode.sh"), "--superlink", "127.0.0.1:9", "--partition-id", "0",
                           "--creds", str(tmp_path), "--no-model-worker"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"{tmp_path / 'ca.crt'} is not a CA certificate" in proc.stderr


@pytest.mark.slow
def test_a_supernode_whose_superlink_never_answers_says_so_and_stops(tmp_path):
    address = f"127.0.0.1:{unused_port()}"  # nothing listens there
    start, log = time.monotonic(), tmp_path / "supernode.log"
    # A log file, not a pipe: the SuperNode's SuperExec child may hold its output open for a while.
    node = subprocess.Popen([str(DEPLOY / "supernode.sh"), "--superlink", address, "--partition-id", "0",
                             "--no-model-worker", "--connect-timeout", "5", "--port", str(unused_port())],
                            start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        returncode = node.wait(timeout=120)
    finally:
        _stop(node.pid)
    assert returncode == 1
    assert f"the SuperLink at {address} does not answer yet; this node waits up to 5 s" in log.read_text()
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_run_local_with_tls_and_auth_runs_fedmm_through_a_real_superlink(loopback_run):
    # A Flower strategy with an argument behind client-side adaptive DP (conftest.LOOPBACK_ARGS): the
    # clipping mod runs on each node in front of its model worker, the norm bits come back over gRPC.
    out, proc = loopback_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["clients"] == 3 and summary["status"] == "completed"
    assert summary["strategy.composition"].startswith("DP clip (client, adaptive") and "FedAvgM" in summary["strategy.composition"]
    assert summary["clients_rejected_total"] == 0  # every node clipped every component and sent its norm bits
    assert {"final.global.img_shape.accuracy", "final.global.txt_color.accuracy",
            "final.global.vqa.accuracy"} <= summary.keys()
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train.clients-accepted"] == 3 for r in rounds if "train.clients-accepted" in r)
    logs = out / "deploy" / "logs"
    # --auth: each node's key was registered with the SuperLink before it connected (a TLS-only run has none).
    assert len(re.findall(r"SuperNode \d+ registered successfully", (logs / "register.log").read_text())) == 3
    assert not _flower_processes_of(out)  # every process it started is gone
    # Each node's model worker answered its messages (query, 2 trainings, 3 evaluations at least) and is gone.
    for i in range(3):
        log = (logs / f"supernode-{i}.log").read_text()
        assert len(re.findall(r"model worker: message \d+ answered", log)) >= 6, log[-2000:]
        worker = int(re.search(r"model worker listening on .* \(pid (\d+)\)", log).group(1))
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)


def _stop(group: int) -> None:
    """Stop a process group we started (gone already is fine)."""
    try:
        os.killpg(group, signal.SIGTERM)
        time.sleep(2)
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_healthy(port: int, ca: Path | None, timeout: float = 120) -> None:
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}/health"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url, context=context, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail("the SuperLink did not start")


@pytest.mark.slow
def test_an_unregistered_supernode_is_refused(tmp_path):
    creds = tmp_path / "creds"
    subprocess.run(["python", str(DEPLOY / "certs.py"), "--out", str(creds), "--supernodes", "1"], check=True,
                   capture_output=True)
    port = unused_port()
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "home"))
    superlink = subprocess.Popen([str(DEPLOY / "superlink.sh"), "--creds", str(creds), "--auth", "--port", str(port),
                                  "--database", str(tmp_path / "state.db")], env=env, start_new_session=True,
                                 stdout=open(tmp_path / "superlink.log", "w"), stderr=subprocess.STDOUT)
    try:
        _wait_healthy(port, creds / "ca.crt")
        # Its own process group and a log file: the node's SuperExec child may outlive it for a while.
        node = subprocess.Popen([str(DEPLOY / "supernode.sh"), "--superlink", f"127.0.0.1:{port}", "--partition-id",
                                 "0", "--creds", str(creds), "--key", str(creds / "supernode-0"), "--port",
                                 str(unused_port())], env=env, start_new_session=True,
                                stdout=open(tmp_path / "supernode.log", "w"), stderr=subprocess.STDOUT)
        try:
            returncode = node.wait(timeout=180)
        finally:
            _stop(node.pid)
    finally:
        _stop(superlink.pid)
    log = (tmp_path / "supernode.log").read_text()
    assert returncode != 0, log[-2000:]
    assert "Failed to activate SuperNode" in log or "2004" in log, log[-2000:]
    assert "No SuperNode found with the given public key" in (tmp_path / "superlink.log").read_text()


@pytest.mark.slow
def test_a_supernode_killed_mid_run_costs_one_round_its_replies_then_drops_out(tmp_path):
    port, out = unused_port(), tmp_path / "run"
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "here"\n\n[superlink.here]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0")
    logs = []

    def start(name, *cmd):
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        return subprocess.Popen([*cmd], env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    superlink = start("superlink", str(DEPLOY / "superlink.sh"), "--port", str(port))
    _wait_healthy(port, None)
    nodes = [start(f"supernode-{i}", str(DEPLOY / "supernode.sh"), "--superlink", f"127.0.0.1:{port}",
                   "--partition-id", str(i), "--port", str(unused_port())) for i in range(3)]
    config = f'out="{out}" rounds=3 clients.num=3 strategy.reply_timeout=60 {SMALL}'
    run = start("flwr-run", "flwr", "run", str(ROOT), "here", "--stream", "--run-config", config)
    try:
        deadline = time.time() + 900
        while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
            assert time.time() < deadline and run.poll() is None, (tmp_path / "flwr-run.log").read_text()[-3000:]
            time.sleep(1)
        os.killpg(nodes[2].pid, signal.SIGKILL)  # round 1 is done: the multimodal client crashes
        run.wait(timeout=900)
        run_id = (tmp_path / "flwr-run.log").read_text().split("Successfully started run ")[1].split()[0]
        listing = subprocess.run(["flwr", "ls", "here", "--run-id", run_id, "--format", "json"], env=env,
                                 capture_output=True, text=True, timeout=120)
    finally:
        for proc in [run, *nodes, superlink]:
            _stop(proc.pid)
        for log in logs:
            log.close()
    assert json.loads(listing.stdout)["runs"][0]["status"] == "finished:completed", listing.stdout
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    second, third = [r for r in rounds if r["round"] >= 2 and "stage" not in r]
    assert second["train.clients-sampled"] == 3 and second["train.clients-accepted"] == 2
    assert second["train.clients-missing"] + second["train.clients-rejected"] == 1  # the loss is reported
    # By round 3 its heartbeats have lapsed (60 s): the SuperLink lists it offline, so round 3 samples
    # the two live nodes and waits for nobody.
    assert third["train.clients-sampled"] == 2 and third["train.clients-missing"] == 0
    assert third["evaluate.clients-missing"] == 0 and third["time.round_s"] < 60
    assert "global.img_shape.accuracy" in third and (out / "summary.json").is_file()
