"""Reachability across real network boundaries: Linux network namespaces joined by a router
namespace that NATs one of them (iptables MASQUERADE, inbound connections dropped), like a home
router. Needs root, `ip` and `iptables`; skipped otherwise.

Topology (all addresses private to namespaces this test creates):

    C  10.77.1.2 ──┐                 coordinator / dial-back checker
    O  10.77.3.2 ──┼── R (router)    an ordinary, dialable peer
    N  10.77.2.2 ──┘   10.77.{1,2,3}.1; N is NATed to 10.77.1.1 / 10.77.3.1, nothing gets in

This file is also the helper run inside the namespaces: `python test_reachability.py serve|check ...`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmtrain.net.addresses import host_and_announce_maddrs

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
PYTHON = sys.executable
CHECKER_PORT = 4101
FORWARDED_PORT = 4100


# --------------------------------------------------------------------------------------------
# host_and_announce_maddrs: plain unit tests, no root needed
# --------------------------------------------------------------------------------------------


def test_port_and_public_ip_fill_in_the_multiaddrs():
    assert host_and_announce_maddrs(None, None) == (["/ip4/0.0.0.0/tcp/0"], [])
    assert host_and_announce_maddrs(31337, None) == (["/ip4/0.0.0.0/tcp/31337"], [])
    assert host_and_announce_maddrs(31337, "203.0.113.5") == (["/ip4/0.0.0.0/tcp/31337"], ["/ip4/203.0.113.5/tcp/31337"])
    assert host_and_announce_maddrs(4000, "[2001:db8::7]") == (["/ip6/::/tcp/4000"], ["/ip6/2001:db8::7/tcp/4000"])
    # explicit multiaddrs pass through untouched when no shorthand is used
    assert host_and_announce_maddrs(None, None, host_maddrs=["/ip4/127.0.0.1/tcp/5"]) == (["/ip4/127.0.0.1/tcp/5"], [])


@pytest.mark.parametrize("port, ip, message", [
    (None, "203.0.113.5", "--public-ip needs --port"),
    (31337, "example.org", "is not an IP address"),
    (31337, "203.0.113", "is not an IP address"),
    (31337, "0.0.0.0", "means 'any interface'"),
    (31337, "224.0.0.1", "multicast"),
    (0, None, "out of range"),
    (70000, None, "out of range"),
])
def test_bad_port_or_ip_gives_one_clear_line(port, ip, message):
    with pytest.raises(ValueError, match=message) as caught:
        host_and_announce_maddrs(port, ip)
    assert "\n" not in str(caught.value)


def test_shorthand_and_explicit_multiaddrs_conflict():
    with pytest.raises(ValueError, match="either --port or --host-maddrs"):
        host_and_announce_maddrs(31337, None, host_maddrs=["/ip4/0.0.0.0/tcp/1"])
    with pytest.raises(ValueError, match="either --public-ip or --announce-maddrs"):
        host_and_announce_maddrs(31337, "203.0.113.5", announce_maddrs=["/ip4/203.0.113.5/tcp/1"])


# --------------------------------------------------------------------------------------------
# namespaces
# --------------------------------------------------------------------------------------------


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=20)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command (apt-get install iproute2 iptables)"
    return None


class NatLab:
    """Four namespaces as drawn in the module docstring, removed again by `close()`."""

    def __init__(self):
        suffix = os.getpid() % 100000
        self.router, self.coord, self.natted, self.open = (f"st{suffix}{x}" for x in "rcno")
        self.processes: list[subprocess.Popen] = []

    def netns(self, namespace: str, *command: str) -> None:
        _run("ip", "netns", "exec", namespace, *command)

    def build(self) -> None:
        for namespace in (self.router, self.coord, self.natted, self.open):
            _run("ip", "netns", "add", namespace)
            self.netns(namespace, "ip", "link", "set", "lo", "up")
        for namespace, router_side, subnet in ((self.coord, "rc", 1), (self.natted, "rn", 2), (self.open, "ro", 3)):
            _run("ip", "link", "add", router_side, "netns", self.router, "type", "veth",
                 "peer", "name", "eth0", "netns", namespace)
            self.netns(self.router, "ip", "addr", "add", f"10.77.{subnet}.1/24", "dev", router_side)
            self.netns(self.router, "ip", "link", "set", router_side, "up")
            self.netns(namespace, "ip", "addr", "add", f"10.77.{subnet}.2/24", "dev", "eth0")
            self.netns(namespace, "ip", "link", "set", "eth0", "up")
            self.netns(namespace, "ip", "route", "add", "default", "via", f"10.77.{subnet}.1")
        self.netns(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ipt = ("ip", "netns", "exec", self.router, "iptables")
        # a home router: N's connections leave with the router's address, replies come back,
        # nothing new gets in (except what is explicitly port-forwarded: ctstate DNAT)
        _run(*ipt, "-t", "nat", "-A", "POSTROUTING", "-s", "10.77.2.0/24", "!", "-o", "rn", "-j", "MASQUERADE")
        _run(*ipt, "-A", "FORWARD", "-o", "rn", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED,DNAT", "-j", "ACCEPT")
        _run(*ipt, "-A", "FORWARD", "-o", "rn", "-j", "DROP")

    def forward_port(self, port: int) -> None:
        _run("ip", "netns", "exec", self.router, "iptables", "-t", "nat", "-A", "PREROUTING", "-d", "10.77.1.1",
             "-p", "tcp", "--dport", str(port), "-j", "DNAT", "--to-destination", f"10.77.2.2:{port}")

    def start(self, namespace: str, *command: str, log: Path) -> subprocess.Popen:
        env = dict(os.environ, HIVEMIND_LOGLEVEL="WARNING", PYTHONUNBUFFERED="1")
        process = subprocess.Popen(["ip", "netns", "exec", namespace, *command], stdout=open(log, "w"),
                                   stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                pass
            try:  # the whole session: p2pd daemons and hivemind's helper processes too
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for namespace in (self.router, self.coord, self.natted, self.open):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@pytest.fixture
def lab():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    lab = NatLab()
    try:
        lab.build()
    except subprocess.CalledProcessError as error:
        lab.close()
        pytest.skip(f"cannot build network namespaces here: {error.stderr.strip() or error}")
    try:
        yield lab
    finally:
        lab.close()


def _wait_for_line(log: Path, prefix: str, process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # only complete lines: the helper may be caught half-way through writing one
        for line in (log.read_text().split("\n")[:-1] if log.exists() else []):
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no {prefix!r} line; log:\n{log.read_text()[-3000:] if log.exists() else '(none)'}")


def _start_checker(lab: NatLab, tmp_path: Path) -> str:
    log = tmp_path / "checker.log"
    process = lab.start(lab.coord, PYTHON, str(HERE), "serve", f"/ip4/10.77.1.2/tcp/{CHECKER_PORT}", log=log)
    return _wait_for_line(log, "MADDR ", process, 60)


def _check_from(lab: NatLab, namespace: str, checker: str, tmp_path: Path, *options: str) -> dict:
    log = tmp_path / f"check-{namespace}-{len(lab.processes)}.log"
    process = lab.start(namespace, PYTHON, str(HERE), "check", checker, *options, log=log)
    result = json.loads(_wait_for_line(log, "RESULT ", process, 90))
    process.wait(30)
    return result


def test_natted_peer_is_unreachable_and_switches_to_client_mode(lab, tmp_path):
    checker = _start_checker(lab, tmp_path)

    ordinary = _check_from(lab, lab.open, checker, tmp_path)
    assert ordinary["reachable"] is True, ordinary
    assert ordinary["checked_by"].startswith("peer "), ordinary  # dialled from the other namespace
    assert any("10.77.3.2" in m for m in ordinary["dialable_maddrs"]), ordinary
    assert ordinary["client_mode"] is False

    natted = _check_from(lab, lab.natted, checker, tmp_path)
    assert natted["reachable"] is False, natted
    assert natted["checked_by"].startswith("peer "), natted
    # the checker saw N's connection come from the router: that is the address to announce
    assert natted["observed_ips"] == ["10.77.1.1"], natted
    assert "--public-ip 10.77.1.1 --port 31337" in natted["suggestion"], natted
    assert natted["client_mode"] is True
    assert "trains as a client" in natted["log_line"]


def test_following_the_suggestion_makes_the_natted_peer_reachable(lab, tmp_path):
    checker = _start_checker(lab, tmp_path)
    lab.forward_port(FORWARDED_PORT)  # what the volunteer does on their router
    forwarded = _check_from(lab, lab.natted, checker, tmp_path,
                            "--port", str(FORWARDED_PORT), "--public-ip", "10.77.1.1")
    assert forwarded["reachable"] is True, forwarded
    assert forwarded["dialable_maddrs"] == [f"/ip4/10.77.1.1/tcp/{FORWARDED_PORT}"]
    assert forwarded["client_mode"] is False
    # and a forwarded port that the peer does not listen on is still reported unreachable
    wrong = _check_from(lab, lab.natted, checker, tmp_path, "--port", "4200", "--public-ip", "10.77.1.1")
    assert wrong["reachable"] is False, wrong
    assert "port 4200" in wrong["suggestion"], wrong


@pytest.mark.slow
def test_natted_peer_trains_as_a_client(lab, tmp_path):
    """Coordinator in C, a full peer in O, the NATed peer in N with --client-mode: the client's
    gradients count in the averaging rounds (the full peer sees groups of 2)."""
    import yaml

    # 5x the tiny run's batch: a peer alone runs through tiny epochs in about a second, faster
    # than the two peers' start-up times differ on a loaded machine; this way they meet early
    run = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    run["target_batch_size"] *= 5
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    swarmtrain = [PYTHON, "-m", "swarmtrain"]
    coordinator_log = tmp_path / "coordinator.log"
    coordinator = lab.start(lab.coord, *swarmtrain, "coordinator", "--config", str(config),
                            "--identity", str(tmp_path / "coordinator.id"), "--host-maddrs",
                            "/ip4/10.77.1.2/tcp/4102", "--metrics-port", "0", "--log-every", "5", log=coordinator_log)
    deadline = time.monotonic() + 90
    while "Volunteers join with" not in coordinator_log.read_text():
        assert coordinator.poll() is None and time.monotonic() < deadline, coordinator_log.read_text()[-3000:]
        time.sleep(0.5)
    maddr = next(word for word in coordinator_log.read_text().split() if word.startswith("/ip4/10.77.1.2/"))
    common = ("--initial-peers", maddr, "--device", "cpu", "--max-epochs", "10", "--eval-every", "0",
              "--checkpoint-every", "0", "--no-progress")
    client = lab.start(lab.natted, *swarmtrain, "peer", *common, "--client-mode",
                       "--status-file", str(tmp_path / "client.json"), log=tmp_path / "client.log")
    full = lab.start(lab.open, *swarmtrain, "peer", *common, "--host-maddrs", "/ip4/0.0.0.0/tcp/0",
                     "--status-file", str(tmp_path / "full.json"), log=tmp_path / "full.log")
    for process, name in ((full, "full"), (client, "client")):
        try:
            code = process.wait(420)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"{name} peer: {code}\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
    full_status = json.loads((tmp_path / "full.json").read_text())
    client_status = json.loads((tmp_path / "client.json").read_text())
    assert client_status["client_mode"] is True
    assert [r["group_size"] for r in full_status["rounds"] if r["ok"]].count(2) >= 3, full_status["rounds"]
    assert any(r["ok"] and r["group_size"] == 2 for r in client_status["rounds"]), client_status["rounds"]


# --------------------------------------------------------------------------------------------
# helper processes, run inside the namespaces
# --------------------------------------------------------------------------------------------


def _serve(host_maddr: str, initial_peers: list[str]) -> None:
    import hivemind

    from swarmtrain.net.reachability import serve_reachability_checks

    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=[host_maddr], startup_timeout=60, start=True)
    serve_reachability_checks(dht)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # for sigwait below
    print(f"MADDR {dht.get_visible_maddrs()[0]}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        dht.shutdown()


def _check(initial_peer: str, arguments: list[str]) -> None:
    import argparse
    import logging

    import hivemind

    from swarmtrain.net.reachability import start_dht_checking_reachability

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--public-ip")
    options = parser.parse_args(arguments)
    host, announce = host_and_announce_maddrs(options.port, options.public_ip)
    logging.basicConfig(level=logging.INFO)

    def start_dht(client_mode: bool):
        return hivemind.DHT(initial_peers=[initial_peer], host_maddrs=host, announce_maddrs=announce or None,
                            client_mode=client_mode, startup_timeout=60, start=True)

    dht, mode = start_dht_checking_reachability(start_dht, client_mode=False, initial_peers=[initial_peer],
                                                listen_port=options.port, timeout=8)
    reachability = mode.reachability
    result = json.dumps(dict(reachability.__dict__, client_mode=mode.client_mode, log_line=mode.log_line))
    print(f"RESULT {result}", flush=True)
    dht.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        _serve(sys.argv[2], sys.argv[3:])
    else:
        _check(sys.argv[2], sys.argv[3:])
