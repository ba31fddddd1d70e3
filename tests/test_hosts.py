"""A federation over separate network hosts on one machine (deploy/hosts.py, deploy/run-hosts.sh):
Linux network namespaces cabled to a private bridge, real SuperLink and SuperNode processes in them,
TLS for the SuperLink's host address, network faults, and nothing left behind."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from safetensors.numpy import load_file

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(DEPLOY))
import hosts  # noqa: E402

SMALL = "data.examples_per_task=300 train.local_steps=5"
CANNOT = hosts.check()
privileged = pytest.mark.skipif(CANNOT is not None, reason=f"network namespaces: {CANNOT}")


def _serve(tag: str, host: str, port: int) -> subprocess.Popen:
    code = ("import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(('0.0.0.0', {port})); s.listen()\nwhile True: s.accept()[0].close()")
    return subprocess.Popen(["ip", "netns", "exec", hosts.namespace(tag, host), sys.executable, "-c", code])


def _reaches(tag: str, host: str, address: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(('{address}', {port}), timeout=1).close()"
    return subprocess.run(["ip", "netns", "exec", hosts.namespace(tag, host), sys.executable, "-c", code],
                          capture_output=True).returncode == 0


@privileged
def test_hosts_reach_each_other_only_while_cabled_and_leave_nothing_behind():
    tag = f"t{time.time_ns() % 10**6}"
    addresses = hosts.up(tag, ["server", "client"])
    try:
        assert addresses == {"server": str(hosts.subnet_of(tag)[1]), "client": str(hosts.subnet_of(tag)[2])}
        with pytest.raises(hosts.HostsError, match="exists already"):
            hosts.up(tag, ["other"])
        server = _serve(tag, "server", 7000)
        deadline = time.time() + 10
        while not _reaches(tag, "client", addresses["server"], 7000):
            assert time.time() < deadline, "the client host never reached the server host"
        hosts.cable(tag, "client", "down")
        assert not _reaches(tag, "client", addresses["server"], 7000)
        hosts.cable(tag, "client", "up")
        assert _reaches(tag, "client", addresses["server"], 7000)
        # The machine's own network has none of it: no interface, no route to the hosts' subnet.
        names = [name for _, name in socket.if_nameindex()]
        assert not [n for n in names if n.startswith("fedmm") or n == "br0" or re.fullmatch(r"p\d+", n)]
        assert hosts.subnet_of(tag).with_prefixlen not in subprocess.run(["ip", "route"], capture_output=True,
                                                                         text=True).stdout
        # One host's processes stop (a SuperNode restarted); the host stays, cabled, for the next one.
        client = _serve(tag, "client", 7001)
        hosts.stop(tag, "client", grace=5.0)
        assert client.wait(timeout=10) == -signal.SIGTERM and server.poll() is None
        assert len(hosts.namespaces(tag)) == 3 and _reaches(tag, "client", addresses["server"], 7000)
    finally:
        removed = hosts.down(tag)
    assert len(removed) == 3 and not hosts.namespaces(tag)
    assert server.wait(timeout=10) is not None  # the process inside a host was stopped with it


@privileged
@pytest.mark.parametrize("call, message", [
    (lambda: hosts.up("t-1", ["a"]), "tag"),
    (lambda: hosts.up("tx", ["a", "a"]), "distinct"),
    (lambda: hosts.up("tx", ["switch"]), "distinct"),
    (lambda: hosts.cable("nosuch", "a", "down"), "no host"),
    (lambda: hosts.stop("nosuch", "a"), "no host"),
])
def test_bad_network_requests_are_refused_with_what_is_wrong(call, message):
    with pytest.raises(hosts.HostsError, match=message):
        call()


@pytest.mark.parametrize("args, message", [
    (["--supernodes", "3", "--rounds", "3", "--link-down", "3:2"], "NODE in 0..2"),
    (["--supernodes", "3", "--rounds", "3", "--link-down", "1:3"], "ROUND in 1..2"),
    (["--supernodes", "3", "--rounds", "3", "--link-down", "one"], "NODE:ROUND"),
    (["--supernodes", "3", "--rounds", "3", "--superlink-down", "2"], "ROUND:SECONDS"),
    (["--supernodes", "3", "--rounds", "3", "--restart-node", "0:4"], "ROUND in 1..3"),
    (["--supernodes", "3", "--rounds", "3", "--timeout", "soon"], "--timeout S"),
])
def test_run_hosts_refuses_bad_faults_before_making_anything(tmp_path, args, message):
    before = hosts.namespaces() if CANNOT is None else []
    proc = subprocess.run([str(DEPLOY / "run-hosts.sh"), *args, "--out", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
    assert (hosts.namespaces() if CANNOT is None else []) == before


def test_run_local_sends_network_faults_to_run_hosts(tmp_path):
    proc = subprocess.run([str(DEPLOY / "run-local.sh"), "--supernodes", "2", "--rounds", "2", "--out",
                           str(tmp_path / "run"), "--link-down", "1:1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "use deploy/run-hosts.sh" in proc.stderr


@privileged
def test_run_hosts_without_the_privilege_for_namespaces_says_so_and_makes_nothing(tmp_path):
    # root, less the two capabilities namespaces need
    proc = subprocess.run(["setpriv", "--bounding-set", "-net_admin,-sys_admin", str(DEPLOY / "run-hosts.sh"),
                           "--supernodes", "1", "--rounds", "1", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert "cannot make network namespaces" in proc.stderr and "CAP_NET_ADMIN" in proc.stderr
    assert not (tmp_path / "run").exists()


def _rounds(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "stage" not in r]


def _nothing_left(out: Path) -> None:
    tag = re.search(r"network (\w+):", (out / "deploy" / "stdout.txt").read_text()).group(1)
    assert not hosts.namespaces(tag)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert not [line for line in ps if str(out) in line or f"fedmm-{tag}" in line]
    assert not list(Path("/tmp").glob(f"fedmm-{tag}-*.sock"))


def _run_hosts(out: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(DEPLOY / "run-hosts.sh"), "--out", str(out), *args], capture_output=True,
                          text=True, timeout=timeout)
    if (out / "deploy").is_dir():
        (out / "deploy" / "stdout.txt").write_text(proc.stdout)
    return proc


@privileged
@pytest.mark.slow
def test_a_supernode_cut_off_for_a_round_is_counted_missing_then_back_over_tls_and_auth(tmp_path):
    out = tmp_path / "run"
    proc = _run_hosts(out, "--tls", "--auth", "--supernodes", "3", "--rounds", "3", "--link-down", "1:1",
                      "--run-config", SMALL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    addresses = dict(line.split() for line in (out / "deploy" / "hosts.txt").read_text().splitlines())
    assert len(set(addresses.values())) == 5  # a SuperLink host, a user host, three SuperNode hosts
    cert = x509.load_pem_x509_certificate((out / "deploy" / "creds" / "superlink.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert addresses["link"] in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert not names.get_values_for_type(x509.DNSName)  # not "localhost": the host's own address
    logs = out / "deploy" / "logs"
    assert len(re.findall(r"SuperNode \d+ registered successfully", (logs / "register.log").read_text())) == 3
    events = [json.loads(line) for line in (out / "deploy" / "faults.jsonl").read_text().splitlines()]
    assert [(e["event"], e["host"], e["round"]) for e in events] == [("cable-down", "node1", 1), ("cable-up", "node1", 1)]
    first, second, third = _rounds(out)[1:4]
    # Unplugged once it has answered the initial evaluation, node 1 misses round 1: its reply times out,
    # or, when the cut outlasts its heartbeat window (Flower: 60 s after the last heartbeat, sent every
    # 17-23 s), the SuperLink answers for it. Which one depends on the heartbeat's phase, and so does
    # round 2: the node reconnects with backoff (up to 20 s plus a try hung on the dead cable) and may
    # still be listed offline or lapse there. By round 3 it is back.
    assert first["train.clients-sampled"] == 3 and first["train.clients-accepted"] == 2
    log = (logs / "flwr-run.log").read_text()
    if first["train.clients-missing"] == 1:
        assert "round 1: 2 of 3 training replies arrived; missing partitions [1]" in log
    else:
        assert first["train.clients-rejected"] == 1 and "round 1: dropped reply of node" in log
        assert "node-unavailable" in log
    assert second["train.clients-accepted"] >= 2
    assert "Connection successful after" in (logs / "supernode-1.log").read_text()
    assert third["train.clients-sampled"] == third["train.clients-accepted"] == 3  # node 1 is back
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    _nothing_left(out)


@privileged
@pytest.mark.slow
def test_an_unregistered_host_is_refused_and_another_cas_root_fails_tls_verification(tmp_path):
    tag = f"u{time.time_ns() % 10**6}"
    addresses = hosts.up(tag, ["link", "stranger", "fooled"])
    try:
        creds, other = tmp_path / "creds", tmp_path / "other"
        for folder in (creds, other):
            subprocess.run([sys.executable, str(DEPLOY / "certs.py"), "--out", str(folder), "--hosts",
                            addresses["link"], "--supernodes", "1"], check=True, capture_output=True)
        ns = lambda host: ["ip", "netns", "exec", hosts.namespace(tag, host)]  # noqa: E731
        subprocess.Popen([*ns("link"), str(DEPLOY / "superlink.sh"), "--creds", str(creds), "--auth", "--host",
                          "0.0.0.0", "--database", str(tmp_path / "state.db")],
                         stdout=open(tmp_path / "superlink.log", "w"), stderr=subprocess.STDOUT)
        target = f"{addresses['link']}:9092"
        deadline = time.time() + 120
        while not _reaches(tag, "stranger", addresses["link"], 9092):
            assert time.time() < deadline, "the SuperLink did not start"
        # A host whose key was never registered: the SuperLink refuses it, and it stops.
        # (A log file, not a pipe: children such as its SuperExec may hold a pipe open after it exits.)
        stranger = subprocess.Popen([*ns("stranger"), str(DEPLOY / "supernode.sh"), "--superlink", target,
                                     "--partition-id", "0", "--creds", str(creds), "--key", str(creds / "supernode-0"),
                                     "--worker-socket", f"/tmp/fedmm-{tag}-stranger.sock"],
                                    stdout=open(tmp_path / "stranger.log", "w"), stderr=subprocess.STDOUT)
        assert stranger.wait(timeout=300) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "stranger.log").read_text()
        # A host that trusts another CA: it stops before Flower, saying what failed.
        fooled = subprocess.run([*ns("fooled"), str(DEPLOY / "supernode.sh"), "--superlink", target,
                                 "--partition-id", "0", "--creds", str(other), "--no-model-worker"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        assert fooled.returncode == 2, fooled.stderr
        assert f"TLS verification of the SuperLink at {target} failed" in fooled.stderr
        # Both CAs are named alike (certs.py), so OpenSSL finds "an issuer" whose signature does not match.
        assert re.search(r"certificate signature failure|unable to get local issuer", fooled.stderr), fooled.stderr
    finally:
        hosts.down(tag)
    assert "No SuperNode found with the given public key" in (tmp_path / "superlink.log").read_text()
    assert not hosts.namespaces(tag)


@privileged
@pytest.mark.slow
def test_a_run_over_separate_hosts_ends_with_the_arrays_of_the_same_run_on_loopback(tmp_path, loopback_run):
    from conftest import LOOPBACK_ARGS

    local, local_proc = loopback_run
    assert local_proc.returncode == 0, local_proc.stderr[-4000:]
    apart = _run_hosts(tmp_path / "hosts", *LOOPBACK_ARGS)  # TLS for the SuperLink's host address this time
    assert apart.returncode == 0, apart.stderr[-4000:]
    a, b = (load_file(str(folder / "checkpoints" / "round-0002.safetensors")) for folder in (tmp_path / "hosts", local))
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
    _nothing_left(tmp_path / "hosts")


def test_the_image_recipe_copies_no_credentials_and_every_supernode_starts_its_model_worker():
    """What deploy/Dockerfile and deploy/compose.yaml promise (run for real with docker-compose on a
    machine with an engine: docs/deploy.md); checked here where no engine runs."""
    import yaml

    dockerfile = (DEPLOY / "Dockerfile").read_text().splitlines()
    copies = [line.split()[1:] for line in dockerfile if line.startswith("COPY")]
    sources = [s for args in copies for s in args[:-1]]
    assert sources and not [s for s in sources if re.search(r"cred|\.key|\.pem|ca\.|flwr-home|results", s)]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "deploy/creds/" in ignored and "results/" in ignored  # `COPY deploy deploy` takes no keys
    assert any(line.startswith("RUN pip install") and "-e ." in line for line in dockerfile)
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    nodes = {name: s for name, s in services.items() if name.startswith("supernode-")}
    assert len(nodes) == 3
    for i, (name, service) in enumerate(sorted(nodes.items())):
        command = service["command"]
        assert command[0] == "deploy/supernode.sh" and "--no-model-worker" not in command  # worker on
        assert command[command.index("--partition-id") + 1] == str(i)
        assert command[command.index("--key") + 1] == f"/creds/supernode-{i}"
        mounted = sorted(v.split(":")[0] for v in service["volumes"])
        assert mounted == ["./creds/ca.crt", f"./creds/supernode-{i}"]  # its own key, nobody else's
    link = services["superlink"]
    assert "--auth" in link["command"] and "--creds" in link["command"]
    assert not [v for v in link["volumes"] if "ca.key" in v or "supernode-" in v]
    assert not [v for v in services["cli"]["volumes"] if v.split(":")[0].endswith(("key", "-0", "-1", "-2"))]
