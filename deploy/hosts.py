"""Separate network hosts on one Linux machine: one network namespace per host, each with its own
address, cabled by a veth pair to a bridge that lives in a namespace of its own. Nothing is added to
the machine's own network, and traffic between hosts never leaves the namespaces made here.

    python deploy/hosts.py check                          can this user make namespaces? (exit 0 / 3)
    python deploy/hosts.py up --tag T link user node0     make hosts T-link (.1), T-user (.2), T-node0 (.3)
    python deploy/hosts.py cable --tag T node0 down|up    unplug / plug a host's cable at the bridge
    python deploy/hosts.py stop --tag T node0             stop the processes inside one host (TERM, then KILL)
    python deploy/hosts.py down --tag T                   stop every process inside, remove everything
    python deploy/hosts.py list                           the namespaces some run left (tags)

A command runs inside host H with `ip netns exec fedmm-T-H CMD`. Needs root (CAP_NET_ADMIN and
CAP_SYS_ADMIN) and iproute2; `check` says which is missing. `down` is safe to repeat and to call on
a half-made network.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
import zlib

PREFIX = "fedmm-"
SWITCH = "switch"  # the namespace holding the bridge; host names may not take it
NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")


class HostsError(RuntimeError):
    """Namespaces could not be made, changed or removed; the message says which command failed."""


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HostsError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def namespace(tag: str, host: str) -> str:
    return f"{PREFIX}{tag}-{host}"


def subnet_of(tag: str) -> ipaddress.IPv4Network:
    """A /24 inside 10.200.0.0/13 chosen by the tag, so that runs with different tags do not meet."""
    return ipaddress.ip_network(f"10.{200 + zlib.crc32(tag.encode()) % 8}.{zlib.crc32(tag.encode()) // 8 % 256}.0/24")


def namespaces(tag: str | None = None) -> list[str]:
    listed = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
    want = PREFIX if tag is None else f"{PREFIX}{tag}-"
    return sorted(n for n in listed if n.startswith(want))


def check() -> str | None:
    """None if this process can make network namespaces, else why not."""
    if subprocess.run(["which", "ip"], capture_output=True).returncode != 0:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except HostsError as err:
        return f"cannot make network namespaces (needs root: CAP_NET_ADMIN and CAP_SYS_ADMIN): {err}"
    try:
        _ip("netns", "del", probe)
    except HostsError as err:
        return str(err)
    return None


def up(tag: str, hosts: list[str]) -> dict[str, str]:
    """Make the bridge and one namespace per host, cabled and addressed (host i of `hosts` gets
    address .i+1 of the tag's subnet); on any failure, remove what was made and raise. Returns
    host -> address."""
    if not re.fullmatch(r"[a-z0-9]{1,8}", tag):
        raise HostsError(f"tag {tag!r} must be 1-8 lowercase letters or digits")
    bad = [h for h in hosts if not NAME.match(h) or h == SWITCH]
    if bad or len(set(hosts)) != len(hosts) or not 1 <= len(hosts) <= 250:
        raise HostsError(f"host names must be distinct, 1-12 lowercase letters or digits, not {SWITCH!r}, "
                         f"1 to 250 of them: got {hosts}")
    if namespaces(tag):
        raise HostsError(f"a network tagged {tag!r} exists already ({namespaces(tag)}); "
                         f"remove it with `python deploy/hosts.py down --tag {tag}`")
    switch, net = namespace(tag, SWITCH), subnet_of(tag)
    try:
        _ip("netns", "add", switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        out = {}
        for i, host in enumerate(hosts):
            ns = namespace(tag, host)
            _ip("netns", "add", ns)
            # Both ends are made inside their namespaces: no name in the machine's own network.
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", switch)
            _ip("-n", switch, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{net[i + 1]}/{net.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            out[host] = str(net[i + 1])
        return out
    except HostsError:
        down(tag)
        raise


def cable(tag: str, host: str, state: str) -> None:
    """Unplug (`down`) or plug (`up`) a host's cable at the bridge: its packets are lost, as in a
    network partition; its own interface and addresses stay as they were."""
    if state not in ("up", "down"):
        raise HostsError(f"cable state must be up or down, not {state!r}")
    switch, ns = namespace(tag, SWITCH), namespace(tag, host)
    if ns not in namespaces(tag):
        raise HostsError(f"no host {host!r} in the network tagged {tag!r}")
    peer = _ip("-n", ns, "-o", "link", "show", "eth0").split("@if", 1)[1].split(":", 1)[0]  # the peer's ifindex
    name = next(line.split(": ")[1].split("@")[0] for line in _ip("-n", switch, "-o", "link", "show").splitlines()
                if line.split(": ")[0] == peer)
    _ip("-n", switch, "link", "set", name, state)


def _pids(ns: str) -> list[int]:
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _stop(names: list[str], grace: float) -> None:
    """Stop every process inside these namespaces: TERM, then KILL whatever is left after `grace` seconds."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = [p for ns in names for p in _pids(ns)]
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline and any(_pids(ns) for ns in names):
            time.sleep(0.2)


def stop(tag: str, host: str, grace: float = 10.0) -> None:
    """Stop the processes of one host (a SuperNode restarted mid-run); the host and its cable stay."""
    ns = namespace(tag, host)
    if ns not in namespaces(tag):
        raise HostsError(f"no host {host!r} in the network tagged {tag!r}")
    _stop([ns], grace)


def down(tag: str, grace: float = 10.0) -> list[str]:
    """Stop every process inside the tag's namespaces (TERM, then KILL after `grace` seconds) and
    delete the namespaces, which removes their links. Returns what was removed."""
    names = namespaces(tag)
    _stop(names, grace)
    errors = []
    for ns in names:
        try:
            _ip("netns", "del", ns)
        except HostsError as err:
            errors.append(str(err))
    if errors:
        raise HostsError("; ".join(errors))
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check")
    sub.add_parser("list")
    for name in ("up", "cable", "stop", "down"):
        p = sub.add_parser(name)
        p.add_argument("--tag", required=True)
        if name == "up":
            p.add_argument("hosts", nargs="+")
        if name in ("cable", "stop"):
            p.add_argument("host")
        if name == "cable":
            p.add_argument("state", choices=["up", "down"])
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            why = check()
            if why:
                print(f"hosts.py: {why}", file=sys.stderr)
                return 3
        elif args.command == "list":
            print("\n".join(sorted({n[len(PREFIX):].split("-")[0] for n in namespaces()})))
        elif args.command == "up":
            for host, addr in up(args.tag, args.hosts).items():
                print(host, addr)
        elif args.command == "cable":
            cable(args.tag, args.host, args.state)
        elif args.command == "stop":
            stop(args.tag, args.host)
        else:
            removed = down(args.tag)
            print(f"removed {len(removed)} namespaces" + (f": {' '.join(removed)}" if removed else ""))
    except HostsError as err:
        print(f"hosts.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
